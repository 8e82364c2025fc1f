"""Mutation check: does the test suite notice when the code stops doing what it claims?

Each mutation edits one line of a copy of ``src/`` (the working tree is never touched), then
runs the tests that should catch it with that copy first on ``PYTHONPATH``.  A mutation is
*caught* when at least one of those tests fails.

    python benchmarks/mutation.py            # every mutation
    python benchmarks/mutation.py --only verdict-flipped
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to src/mergeshield
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments


MUTATIONS = (
    Mutation(
        "defense-transform-disabled",  # every defense returns the input weights
        "symmetries/transform.py",
        "    steps = [_head_step, _qk_step, _norm_step, _vo_step, mlp_step]\n",
        "    steps = []\n",
        ("tests/test_protective_effect.py", "tests/test_protect.py"),
    ),
    Mutation(
        "verdict-flipped",  # "holds" and "useful" swapped
        "objective.py",
        "    if weakest(victim_kept, partner_kept) > HOLDS:",
        "    if weakest(victim_kept, partner_kept) <= HOLDS:",
        ("tests/test_objective.py",),
    ),
    Mutation(
        "audit-picks-by-victim-only",  # the attacker ignores the plan's objective
        "evaluation/audit.py",
        "        return joint_score(v, p, plan.objective)",
        '        return joint_score(v, p, "victim")',
        ("tests/test_objective.py",),
    ),
    Mutation(
        "min-objective-is-mean",
        "objective.py",
        '    if objective == "min":\n        return min(shares)',
        '    if objective == "min":\n        return sum(shares) / len(shares)',
        ("tests/test_objective.py",),
    ),
    Mutation(
        "kept-ignores-the-base",  # gain kept measured from 0 instead of the base accuracy
        "objective.py",
        '    return (acc - base) / gap if gap > 0 else float("nan")',
        '    return acc / finetuned if gap > 0 else float("nan")',
        ("tests/test_objective.py",),
    ),
)


def run(mutation: Mutation, workdir: Path) -> tuple[bool, float, str]:
    """(caught, seconds, last line of pytest's output) for one mutation."""
    src = workdir / mutation.name / "src"
    shutil.copytree(ROOT / "src", src)
    path = src / "mergeshield" / mutation.file
    text = path.read_text()
    if text.count(mutation.old) != 1:
        raise SystemExit(f"{mutation.name}: the line to mutate is not in {mutation.file} once")
    path.write_text(text.replace(mutation.old, mutation.new))
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{ROOT}")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutation.tests],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return proc.returncode != 0, time.perf_counter() - start, lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", help="mutation names")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    with tempfile.TemporaryDirectory(prefix="mergeshield-mutation-") as tmp:
        print("| mutation | tests | caught | seconds | pytest |")
        print("|---|---|---|---|---|")
        for m in chosen:
            caught, seconds, last = run(m, Path(tmp))
            print(
                f"| {m.name} | {' '.join(m.tests)} | {'yes' if caught else '**NO**'} | "
                f"{seconds:.0f} | {last} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
