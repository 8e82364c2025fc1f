"""One table from several ``frontier`` runs on the same release (``mergeshield frontier
--builds DIR`` with other ``--attacks`` or ``--methods``).

For every candidate and merge key (method, and "all tasks" for the all-task merge) the
attacker's best merge over all the runs is the one with the best validation joint score, as
within one run; where runs tie on it (e.g. every merge answers nothing), the one whose test
figures keep most of the weakest task is shown (the defender's worst case).  A last column
gives the largest test share any run's own best merge keeps (what an attacker who ran only
that run's attacks would have got).  Runs whose
candidates report different standalone scores are refused (not the same release).

    python benchmarks/combine_frontiers.py RUN1/frontier.json RUN2/frontier.json ...
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def run_name(path: Path) -> str:
    """``RUN`` for ``RUN/frontier.json``, the file's stem otherwise."""
    return path.parent.name if path.stem == "frontier" else path.stem


def combine(files: list[Path]) -> dict[str, dict[str, dict]]:
    """candidate -> merge key -> ``{"chosen": summary entry, "run": run, "worst": (largest
    test weakest share of any run's best, its run)}``."""
    out: dict[str, dict[str, dict]] = {}
    standalone: dict[str, float] = {}
    for path in files:
        data = json.loads(path.read_text())
        for detail, summary in zip(data["details"], data["summary"], strict=True):
            name = detail["name"]
            if standalone.setdefault(name, detail["standalone"]) != detail["standalone"]:
                raise SystemExit(
                    f"{path}: {name} scores {detail['standalone']} standalone, "
                    f"another run {standalone[name]}: not the same release"
                )
            for key, row in detail["best"].items():
                entry, joint = summary[key], row["val_joint"]
                rank = (
                    -math.inf if joint is None or math.isnan(joint) else joint,
                    entry["weakest"],
                )
                held = out.setdefault(name, {}).get(key)
                worst = (entry["weakest"], run_name(path))
                if held is None:
                    out[name][key] = {"chosen": entry, "run": run_name(path), "rank": rank}
                    out[name][key]["worst"] = worst
                    continue
                if rank > held["rank"]:
                    held |= {"chosen": entry, "run": run_name(path), "rank": rank}
                held["worst"] = max(held["worst"], worst)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path, help="frontier.json files")
    args = ap.parse_args()
    for name, keys in combine(args.reports).items():
        print(f"\n{name}\n")
        print(
            "| merge | weakest kept | victim (kept) | free-riders (kept) | attack (run) | "
            "largest of any run (run) |"
        )
        print("|---|---:|---|---|---|---|")
        for key, k in sorted(keys.items()):
            s = k["chosen"]
            riders = ", ".join(
                f"{p} {a:.3f} ({s['partner_kept'][p]:.0%})" for p, a in s["partners"].items()
            )
            print(
                f"| {key} | {s['weakest']:.0%} | {s['victim']:.3f} ({s['kept']:.0%}) | "
                f"{riders} | {s['attack']} ({k['run']}) | {k['worst'][0]:.0%} ({k['worst'][1]}) |"
            )


if __name__ == "__main__":
    main()
