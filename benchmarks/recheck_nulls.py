"""Re-judge stored null rows of ``benchmarks/detect.py --many-nulls`` with the sign-flip
p-value's Bonferroni count at one view (``detect.distinct_views``: a view equal to another on
every tensor counts once).  One view is the smallest count a row can have, so this is the most
any stored row could gain from the change: it prints the rows that would now be found.

    python benchmarks/recheck_nulls.py [FOLDER ...]   (default: every study folder in the cache)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mergeshield.detect import ALPHA, flip_verdict
from mergeshield.evaluation import zoo


def recheck(row: dict, views_before: int) -> tuple[bool, bool]:
    """``(with null models, without)`` for a row scored with ``views_before`` views counted."""
    p_flip = row["p_flip"] / views_before if row["p_flip"] < 1 else 1 / views_before
    with_nulls = row.get("p_null") is not None and max(row["p_null"], p_flip) <= ALPHA
    # rows scored before the shape rule have none: judged as if it passed
    without = flip_verdict(p_flip, row["effect"], row.get("shape", 1.0), ALPHA)
    return with_nulls, without


def main() -> None:
    folders = [Path(a) for a in sys.argv[1:]] or sorted(
        (zoo.default_cache_dir() / "detect-bench").glob("*")
    )
    for folder in folders:
        for log in sorted(folder.glob("many-nulls*.jsonl")):
            rows = [json.loads(line) for line in log.read_text().splitlines()]
            judged, found = 0, []
            for row in rows:
                for mode, scored, views in (("no key", row, 2), ("key", row.get("key"), 3)):
                    if scored is not None:
                        judged += 1
                        if any(recheck(scored, views)):
                            found.append((row["name"], mode))
            print(f"{log}: {len(rows)} rows, {judged} verdicts re-judged, now found: {found}")


if __name__ == "__main__":
    main()
