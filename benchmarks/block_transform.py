"""CPU time of one block's ``all`` transform (sampling + products + streamed MLP), no file I/O.

For each synthetic shape of ``make_synthetic.py`` one block of random bf16 weights is built in
memory and protected as ``protect`` does it (numpy, single-threaded BLAS, the MLP's
:class:`Gathered` maps materialized as the writer would); prints CPU and wall seconds of each
repetition.  Separates the transform from the page-cache and disk costs that dominate
``scale.py`` on a shared machine.

    PYTHONPATH=src python benchmarks/block_transform.py 8b-slice qwen3-8b-slice gemma3-12b-slice
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
from mergeshield.symmetries.transform import Float64View, apply_transform  # noqa: E402


def block_times(shape: str, runs: int) -> tuple[float, list[tuple[float, float]]]:
    """(parameters per block in billions, [(CPU s, wall s) per run])."""
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
    times = []
    with single_threaded_numpy_blas():
        for run in range(runs):
            tensors = {k: v.copy() for k, v in src.items()}
            cpu, wall = time.process_time(), time.perf_counter()
            options = DefenseOptions(low_precision=True)
            ctx = BlockContext(
                block, Float64View(tensors), None, np.random.default_rng(run), options
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
    args = parser.parse_args()
    for shape in args.shapes:
        params, times = block_times(shape, args.runs)
        cpu = " ".join(f"{c:.2f}" for c, _ in times)
        wall = " ".join(f"{w:.2f}" for _, w in times)
        print(f"{shape}: {params:.3f} B per block; CPU s {cpu}; wall s {wall}", flush=True)


if __name__ == "__main__":
    main()
