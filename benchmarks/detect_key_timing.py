"""Run time of ``detect --key`` on SmolLM2 merges of the protected release, against the mergekit
merge itself (issue 18: at most twice one merge).

Uses the models of ``benchmarks/detect.py --kind llm --setting small`` (run it first): the
release protected with ``all`` (``protected``, ``protected.key``) and re-basin-aligned
(``aligned-rebasin``).  Per case, ``--runs`` times: merge with mergekit, then ``detect`` of
the merge with the key, each timed on its own; the merge is deleted after.  In process
(``merge`` and ``detect`` called from Python on ``--threads`` torch threads: start-up left
out), or with ``--cli`` as the tools are run, each a fresh process on torch's default
threads: ``mergekit-yaml CONFIG OUT`` (the config ``merge`` writes) against ``mergeshield
detect OUT --original --base --key``.

    python benchmarks/detect_key_timing.py [--runs 2] [--cli]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from mergeshield.detect import detect
from mergeshield.evaluation import zoo
from mergeshield.merging import merge, merge_config

BIN = Path(sys.executable).parent  # the environment's console scripts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="in process: torch threads")
    parser.add_argument("--cli", action="store_true", help="time the two command lines")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    family = zoo.build_family("llm", "small", progress=False)
    victim, other, third = list(family.tasks)
    work = zoo.default_cache_dir() / "detect-bench" / family.root.name
    if not (work / "protected.key").is_file():
        raise SystemExit(f"{work}: run benchmarks/detect.py --kind llm --setting small first")
    models = family.tasks
    cases = {
        "re-basin-aligned, task arithmetic 0.6": (
            "task_arithmetic", [work / "aligned-rebasin", models[other]], 0.6
        ),
        "as published, task arithmetic 0.6": (
            "task_arithmetic", [work / "protected", models[other]], 0.6
        ),
        "as published, all-task TIES": (
            "ties", [work / "protected", models[other], models[third]], 1.0
        ),
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name, (method, parts, c) in cases.items():
            merge_s, detect_s = [], []
            config = Path(tmp) / "merge.yml"  # what mergekit-yaml reads (--cli)
            config.write_text(
                yaml.safe_dump(merge_config(method, family.base, parts, coefficient=c))
            )
            for run in range(args.runs):
                out = Path(tmp) / f"merge{run}"
                if args.cli:
                    merge_s.append(_timed([BIN / "mergekit-yaml", config, out]))
                    detect_s.append(
                        _timed(
                            [BIN / "mergeshield", "detect", out, "--original", models[victim]]
                            + ["--base", family.base, "--key", work / "protected.key"]
                        )
                    )
                else:
                    start = time.perf_counter()
                    merge(method, family.base, parts, out, coefficient=c)
                    merge_s.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    result = detect(out, models[victim], family.base, key=work / "protected.key")
                    detect_s.append(time.perf_counter() - start)
                    if not result.found:
                        raise SystemExit(f"{name}: the release was not found")
                shutil.rmtree(out)
            ratio = statistics.median(detect_s) / statistics.median(merge_s)
            print(
                f"{name}: merge {[round(t, 2) for t in merge_s]} s, detect --key "
                f"{[round(t, 2) for t in detect_s]} s, {ratio:.1f}x",
                flush=True,
            )


def _timed(command: list) -> float:
    """Seconds of one command; exit status 0 (``detect``: the release found) required."""
    start = time.perf_counter()
    subprocess.run([str(part) for part in command], check=True, capture_output=True)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
