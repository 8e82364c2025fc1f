"""The full text audit matrix of issue 15, timed: 9 methods x 3 defenses x 3 attacks, two-model
(wordnet_noun victim + wordnet_verb free-rider, the full text setting's experts), under the
joint objective, swept in memory and every reported cell merged again by mergekit.

    python benchmarks/full_text_matrix.py --out /tmp/full-text-matrix [--grid-stride 3]

``--grid-stride 3`` (the default) thins each method's coefficient grid as the matrix of
BENCHMARKS "Audit, full text setting ... victim-only objective" did (that run took about 2.5
hours of mergekit merges); ``--grid-stride 1`` sweeps every coefficient.

Builds (or reuses) the two-task full text family first; the audit's own run time (report.json
``seconds``) excludes that build.  Prints where the time went: the in-memory sweeps and the
mergekit rechecks (``kernel_check`` of each row).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mergeshield.evaluation.audit import AuditPlan, run_audit
from mergeshield.evaluation.zoo import build_family
from mergeshield.merging.methods import METHODS

TASKS = ("wordnet_noun", "wordnet_verb")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="report folder")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--grid-stride", type=int, default=3)
    args = parser.parse_args()
    family = build_family("text", "full", tasks=list(TASKS))
    plan = AuditPlan(
        kind="text",
        setting="full",
        tasks=TASKS,
        victim=TASKS[0],
        free_riders=TASKS[1:],
        pairs=TASKS[1:],
        defenses=("params", "mergelock", "mergebarrier"),
        attacks=("aga", "rebasin", "procrustes"),
        methods=tuple(args.methods),
        grid_stride=args.grid_stride,
        seed=0,
    )
    start = time.perf_counter()
    result = run_audit(plan, args.out, family=family)
    wall = time.perf_counter() - start
    checks = [r.kernel_check for r in result.merges]
    summary = {
        "rows": len(result.merges),
        "wall_seconds": round(wall, 1),
        "in_memory_seconds": round(sum(c["in_memory_seconds"] for c in checks), 1),
        "mergekit_recheck_seconds": round(sum(c["mergekit_seconds"] for c in checks), 1),
        "max_examples_apart": max(max(c["examples_apart"].values()) for c in checks),
        "cells_apart_more_than_one": sum(not c["agrees"] for c in checks),
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
