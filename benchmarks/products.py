"""The per-layer steps of ``protect --defense all`` on one bf16 Llama-3.2-1B layer, timed alone.

For one layer's tensors (random ``N(0, 1)`` in bf16; W_Q 2048 x 2048, W_K and W_V 512 x 2048,
W_O 2048 x 2048, up/gate 8192 x 2048, down 2048 x 8192) and one random transform of the kind
``all`` samples (per key/value head a rotary ``c_j R(phi_j)`` map for QK, a dense map for VO,
sign flips of the MLP units), times on one thread (best of ``--repeat``):

- the QK/VO products as mergeshield runs them (:func:`map_row_blocks` and
  :func:`map_column_blocks`: a 1 MiB chunk widened, multiplied and rounded at a time; rotary
  maps as 4 products per weight), against the whole-tensor way (widen the tensor to float64,
  one batched product, cast back) and against a dense product for the rotary maps;
- the MLP steps: the row gather of up/gate, the column gather of down, the sign flips in place
  against a flipped copy written back, and the NaN/Inf check of one output; and the three
  together per tensor, whole (session 5) against streamed (:class:`Gathered` filled, flipped
  and checked ``GATHER_CHUNK_BYTES`` at a time into one buffer, as ``protect`` now writes
  them; the page-cache write that follows either is not timed).

Where a variant computes the same tensor, the number of elements whose bytes differ from
mergeshield's way is printed.

    python benchmarks/products.py
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from mergeshield.arrays import (
    Gathered,
    all_finite,
    bfloat16,
    cast,
    float64,
    scale_exactly,
    uint_view,
)
from mergeshield.shards import GATHER_CHUNK_BYTES
from mergeshield.symmetries.linalg import rope_commuting
from mergeshield.symmetries.transform import map_column_blocks, map_row_blocks, take

D, HEADS, KV_HEADS, HIDDEN, UNITS = 64, 32, 8, 2048, 8192


def best_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def whole_rows(x: np.ndarray, mats: np.ndarray) -> np.ndarray:
    """The whole-tensor way: one float64 copy, one batched product, one cast."""
    wide = float64(x).reshape(len(mats), D, -1)
    return cast((mats @ wide).reshape(x.shape), x)


def whole_columns(x: np.ndarray, mats: np.ndarray) -> np.ndarray:
    wide = float64(x).reshape(x.shape[0], len(mats), D)
    return cast(np.einsum("ohd,hed->ohe", wide, mats, optimize=True).reshape(x.shape), x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    def weights(rows: int, cols: int) -> np.ndarray:
        return rng.standard_normal((rows, cols), dtype=np.float32).astype(bfloat16)

    q, k, v = (
        weights(HEADS * D, HIDDEN),
        weights(KV_HEADS * D, HIDDEN),
        weights(KV_HEADS * D, HIDDEN),
    )
    o = weights(HIDDEN, HEADS * D)
    up, down = weights(UNITS, HIDDEN), weights(HIDDEN, UNITS)
    half = D // 2
    qk = np.stack(
        [rope_commuting(rng.uniform(0.1, 10, half), rng.uniform(0, 6.3, half)) for _ in range(8)]
    )
    vo = rng.standard_normal((KV_HEADS, D, D))
    q_maps = np.repeat(qk, HEADS // KV_HEADS, axis=0)
    o_maps = np.repeat(np.swapaxes(np.linalg.inv(vo), 1, 2), HEADS // KV_HEADS, axis=0)
    dense_qk = q_maps.copy()
    dense_qk[:, 0, 1] = 1e-300  # one entry outside the rotary pairs: the general product
    perm, signs = rng.permutation(UNITS), rng.choice([-1.0, 1.0], UNITS)
    rows: list[dict[str, object]] = []

    def measure(step: str, variant: str, fn: Callable[[], object], first=None) -> np.ndarray:
        """Time ``fn``; with ``first`` (the step's first result), count the elements whose
        bytes differ from it."""
        ms = best_ms(fn, args.repeat)
        result = fn()
        differ = None
        if first is not None:
            differ = int(np.count_nonzero(uint_view(first) != uint_view(result)))
        rows.append({"step": step, "variant": variant, "ms": round(ms, 1), "differ": differ})
        return result

    flipped = take(up, perm, 0)

    def copy_back() -> None:  # the previous way: a flipped copy, written back
        bits = uint_view(flipped)
        mask = np.where(signs < 0, np.uint16(0x8000), np.uint16(0))[:, None]
        bits[...] = bits ^ mask

    def whole(x: np.ndarray, axis: int) -> np.ndarray:  # session 5: gather, flip, check
        out = take(x, perm, axis)
        scale_exactly(out, np.expand_dims(signs, 1 - axis))
        all_finite(out)
        return out

    def streamed(g: Gathered) -> None:  # as ShardWriter.write_gathered, without the write
        rows_per = max(1, GATHER_CHUNK_BYTES // (g.shape[1] * g.dtype.itemsize))
        buf = np.empty((rows_per, g.shape[1]), dtype=g.dtype)
        for start in range(0, g.shape[0], rows_per):
            part = buf[: min(rows_per, g.shape[0] - start)]
            g.fill(start, start + len(part), part)
            all_finite(part)

    lazy_up, lazy_down = Gathered(up, 0, perm, signs < 0), Gathered(down, 1, perm, signs < 0)

    with threadpool_limits(1, user_api="blas"):
        first = measure(
            "W_Q (rotary)", "chunked, 4 products/weight", lambda: map_row_blocks(q, q_maps, D)
        )
        measure(
            "W_Q (rotary)", "chunked, dense product", lambda: map_row_blocks(q, dense_qk, D), first
        )
        measure("W_Q (rotary)", "whole tensor, dense product", lambda: whole_rows(q, q_maps), first)
        measure("W_K (rotary)", "chunked, 4 products/weight", lambda: map_row_blocks(k, qk, D))
        first = measure("W_V", "chunked", lambda: map_row_blocks(v, vo, D))
        measure("W_V", "whole tensor", lambda: whole_rows(v, vo), first)
        first = measure("W_O", "chunked (64 rows)", lambda: map_column_blocks(o, o_maps, D))
        measure("W_O", "whole tensor", lambda: whole_columns(o, o_maps), first)
        measure("up (or gate)", "row gather", lambda: take(up, perm, 0))
        measure("down", "column gather", lambda: take(down, perm, 1))
        measure("up sign flips", "in place", lambda: scale_exactly(flipped, signs[:, None]))
        measure("up sign flips", "copy written back", copy_back)
        measure("any MLP output", "NaN/Inf check", lambda: all_finite(flipped))
        for name, x, axis, lazy in (("up", up, 0, lazy_up), ("down", down, 1, lazy_down)):
            first = measure(
                name,
                "gather + flips + check, whole (session 5)",
                functools.partial(whole, x, axis),
            )
            measure(name, "the same streamed in chunks (now)", functools.partial(streamed, lazy))
            measure(name, "streamed, made whole (bytes)", lazy.materialize, first)
    for row in rows:
        print(json.dumps(row))
    print(
        f"\n| step | variant | ms (best of {args.repeat}) | elements differing from the first row |"
    )
    print("| --- | --- | --- | --- |")
    for row in rows:
        n = "" if row["differ"] is None else row["differ"]
        print(f"| {row['step']} | {row['variant']} | {row['ms']} | {n} |")


if __name__ == "__main__":
    main()
