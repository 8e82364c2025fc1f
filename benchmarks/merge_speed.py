"""Where a mergekit merge of two MiniLM backbones spends its time, and the in-memory kernels.

For every merge method of the registry, on the cached small text family's base and two task
backbones (MiniLM-L6, 22.7M parameters): the wall time of one ``methods.merge`` (mergekit
in-process, folder in, folder out), the time of the kernel's preparation (``kernels.prepare``:
everything that does not depend on the coefficient) and of one more coefficient, and the
largest relative difference between the two merges.  With ``--profile METHOD`` the mergekit
merge of that method is also run under cProfile and its top functions printed.

    python benchmarks/merge_speed.py [--profile ties]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import tempfile
import time
from pathlib import Path

from mergeshield.evaluation.zoo import build_family
from mergeshield.folders import load_tensors
from mergeshield.merging import METHODS, extract_backbone, merge
from mergeshield.merging.kernels import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", help="also cProfile mergekit's merge of this method")
    args = parser.parse_args()
    family = build_family("text", "small", progress=False)
    work = Path(tempfile.mkdtemp(prefix="merge-speed-"))
    tasks = list(family.tasks)[:2]
    folders = [extract_backbone(family.tasks[t], family.base, work / t) for t in tasks]
    base, models = load_tensors(family.base), [load_tensors(f) for f in folders]
    rows = {}
    for method, spec in METHODS.items():
        c = spec.grid[len(spec.grid) // 2]
        start = time.perf_counter()
        out = merge(method, family.base, folders, work / "merged", coefficient=c, seed=0)
        mergekit_s = time.perf_counter() - start
        start = time.perf_counter()
        at = prepare(method, base, models, seed=0)
        ours = at(c)
        prepare_s = time.perf_counter() - start
        start = time.perf_counter()
        at(spec.grid[-1])
        next_s = time.perf_counter() - start
        theirs = load_tensors(out)
        worst = max(
            float((ours[k].double() - t.double()).abs().max() / t.double().abs().max())
            for k, t in theirs.items()
            if t.is_floating_point() and t.abs().max() > 0
        )
        rows[method] = {
            "mergekit_s": round(mergekit_s, 2),
            "kernel_first_s": round(prepare_s, 2),
            "kernel_next_coefficient_s": round(next_s, 3),
            "max_relative_difference": worst,
        }
        print(method, json.dumps(rows[method]), flush=True)
    if args.profile:
        c = METHODS[args.profile].grid[0]
        profile = cProfile.Profile()
        profile.runcall(
            merge, args.profile, family.base, folders, work / "merged", coefficient=c, seed=0
        )
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
