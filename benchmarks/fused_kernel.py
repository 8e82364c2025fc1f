"""Would one compiled pass per MLP tensor (gather, sign flip and NaN/Inf check together) pay?

protect moves every MLP weight with numpy in three passes per tensor: ``take`` (the unit
permutation), an in-place XOR of the sign bits (``all``'s sign flips) and the NaN/Inf check of
the result. This script times those passes against one numba kernel per tensor that does all
three, on one bf16 Llama-3.2-1B layer (up 8192 x 2048 by rows, down 2048 x 8192 by columns),
and the price of numba itself: its import and the first call (a compile, or a load from its
on-disk cache on later runs). numba is not a mergeshield dependency; install it beside
mergeshield:

    pip install numba && python benchmarks/fused_kernel.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from products import best_ms  # noqa: E402

start = time.perf_counter()
import numba  # noqa: E402

IMPORT_S = time.perf_counter() - start
EXPONENT = 0x7F80  # bf16: NaN and Inf have every exponent bit set


@numba.njit(cache=True, nogil=True)
def columns_fused(src, perm, mask, out):
    """``out[r, j] = src[r, perm[j]] ^ mask[j]``; whether any result is NaN or Inf."""
    bad = 0
    for r in range(src.shape[0]):
        row = src[r]
        for j in range(perm.shape[0]):
            v = row[perm[j]] ^ mask[j]
            out[r, j] = v
            bad |= (v & EXPONENT) == EXPONENT
    return bad != 0


@numba.njit(cache=True, nogil=True)
def rows_fused(src, perm, mask, out):
    """``out[i, c] = src[perm[i], c] ^ mask[i]``; whether any result is NaN or Inf."""
    bad = 0
    for i in range(perm.shape[0]):
        row, m = src[perm[i]], mask[i]
        for c in range(src.shape[1]):
            v = row[c] ^ m
            out[i, c] = v
            bad |= (v & EXPONENT) == EXPONENT
    return bad != 0


def numpy_passes(x: np.ndarray, perm: np.ndarray, mask: np.ndarray, axis: int) -> bool:
    """What protect does: gather, XOR in place, check (bits as uint16)."""
    out = np.take(x, perm, axis=axis)
    np.bitwise_xor(out, mask[:, None] if axis == 0 else mask[None, :], out=out)
    return bool(np.bitwise_and(out, EXPONENT).max() == EXPONENT)


def main() -> None:
    rng = np.random.default_rng(0)
    up = rng.integers(0, 0x7F00, (8192, 2048)).astype(np.uint16)  # finite bf16 bit patterns
    down = rng.integers(0, 0x7F00, (2048, 8192)).astype(np.uint16)
    perm = rng.permutation(8192)
    mask = np.where(rng.random(8192) < 0.5, np.uint16(0x8000), np.uint16(0))
    out_up, out_down = np.empty_like(up), np.empty_like(down)
    t = time.perf_counter()
    rows_fused(up, perm, mask, out_up)
    columns_fused(down, perm, mask, out_down)
    first_call = time.perf_counter() - t
    assert np.array_equal(out_down, np.take(down, perm, axis=1) ^ mask[None, :])
    assert np.array_equal(out_up, np.take(up, perm, axis=0) ^ mask[:, None])
    print(f"numba {numba.__version__}: import {IMPORT_S:.3f} s, first calls {first_call:.3f} s")
    print("| tensor | numpy: take, XOR, check (ms) | numba: one pass (ms) |")
    print("| --- | --- | --- |")
    for name, x, axis, fused in (
        ("up (rows)", up, 0, lambda: rows_fused(up, perm, mask, out_up)),
        ("down (columns)", down, 1, lambda: columns_fused(down, perm, mask, out_down)),
    ):
        ours = best_ms(lambda x=x, axis=axis: numpy_passes(x, perm, mask, axis), 7)
        print(f"| {name} | {ours:.1f} | {best_ms(fused, 7):.1f} |")


if __name__ == "__main__":
    main()
