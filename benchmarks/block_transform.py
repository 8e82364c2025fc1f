"""CPU time of one block's ``all`` transform (sampling + products + streamed MLP), no file I/O.

For each synthetic shape of ``make_synthetic.py`` one block of random bf16 weights is built in
memory and protected as ``protect`` does it (numpy, single-threaded BLAS, the MLP's
:class:`Gathered` maps materialized as the writer would); prints CPU and wall seconds of each
repetition.  Separates the transform from the page-cache and disk costs that dominate
``scale.py`` on a shared machine.

    PYTHONPATH=src python benchmarks/block_transform.py 8b-slice qwen3-8b-slice gemma3-12b-slice

``--steps`` prints the CPU seconds of each step instead (sampling, then the steps of
``apply_transform`` in its order, then writing the streamed MLP): the profile behind the
Gemma 3 speed-up (BENCHMARKS.md, "Gemma 3 speed").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_synthetic import SHAPES, tensor_shapes  # noqa: E402

from mergeshield.architectures import describe  # noqa: E402
from mergeshield.architectures.config import read_config  # noqa: E402
from mergeshield.arrays import Gathered, bfloat16  # noqa: E402
from mergeshield.defenses import DEFENSES, BlockContext, DefenseOptions  # noqa: E402
from mergeshield.protect import single_threaded_numpy_blas  # noqa: E402
from mergeshield.symmetries import transform  # noqa: E402
from mergeshield.symmetries.transform import Float64View, apply_transform  # noqa: E402

LOW_PRECISION = DefenseOptions(low_precision=True)  # as protect runs bf16 checkpoints


def synthetic_block(shape: str):
    """One block of ``shape`` (its spec) and random bf16 weights for it."""
    cfg = dict(SHAPES[shape], num_hidden_layers=1)
    raw = {"model_type": "llama"} | cfg
    shapes = dict(tensor_shapes(cfg))
    block = describe(read_config(raw), shapes).blocks[0]
    rng = np.random.default_rng(0)
    src = {}
    for name in block.tensor_names():
        w = rng.standard_normal(shapes[name], dtype=np.float32)
        w = 1 + 0.05 * w if name in block.attention.norms() else 0.02 * w
        src[name] = w.astype(bfloat16)
    return block, src, shapes


def step_times(shape: str, runs: int) -> list[dict[str, float]]:
    """CPU seconds of each step of ``runs`` ``all`` transforms of one block of ``shape``."""
    block, src, _ = synthetic_block(shape)
    att, rows = block.attention, []
    with single_threaded_numpy_blas():
        for run in range(runs):
            tensors, times = {k: v.copy() for k, v in src.items()}, {}
            cpu = time.process_time()
            ctx = BlockContext(
                block, Float64View(tensors), None, np.random.default_rng(run), LOW_PRECISION
            )
            t = DEFENSES["all"].sample(ctx)
            times["sample"] = time.process_time() - cpu
            for name in ("head", "qk", "norm", "vo", "mlp"):
                cpu = time.process_time()
                step = getattr(transform, f"_{name}_step")
                kwargs = {"stream": True, "extras": block.extra_mlps} if name == "mlp" else {}
                step(tensors, att, block.mlp, att.head_dim, att.group_size, t, False, **kwargs)
                times[name] = time.process_time() - cpu
            cpu = time.process_time()
            for value in tensors.values():
                if isinstance(value, Gathered):
                    value.materialize()
            times["write MLP"] = time.process_time() - cpu
            rows.append(times)
    return rows


def block_times(shape: str, runs: int) -> tuple[float, list[tuple[float, float]]]:
    """(parameters per block in billions, [(CPU s, wall s) per run])."""
    block, src, shapes = synthetic_block(shape)
    times = []
    with single_threaded_numpy_blas():
        for run in range(runs):
            tensors = {k: v.copy() for k, v in src.items()}
            cpu, wall = time.process_time(), time.perf_counter()
            ctx = BlockContext(
                block, Float64View(tensors), None, np.random.default_rng(run), LOW_PRECISION
            )
            apply_transform(tensors, block, DEFENSES["all"].sample(ctx), stream_mlp=True)
            for value in tensors.values():
                if isinstance(value, Gathered):
                    value.materialize()
            times.append((time.process_time() - cpu, time.perf_counter() - wall))
    return sum(int(np.prod(shapes[n])) for n in block.tensor_names()) / 1e9, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shapes", nargs="+", choices=sorted(SHAPES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", action="store_true", help="CPU s per step, --runs times")
    args = parser.parse_args()
    for shape in args.shapes:
        if args.steps:
            for times in step_times(shape, args.runs):
                row = " ".join(f"{k} {v:.3f}" for k, v in times.items())
                print(f"{shape}: CPU s per step: {row}, total {sum(times.values()):.2f}")
            continue
        params, times = block_times(shape, args.runs)
        cpu = " ".join(f"{c:.2f}" for c, _ in times)
        wall = " ".join(f"{w:.2f}" for _, w in times)
        print(f"{shape}: {params:.3f} B per block; CPU s {cpu}; wall s {wall}", flush=True)


if __name__ == "__main__":
    main()
