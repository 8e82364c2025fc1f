"""Condense one or more ``mergeshield audit`` reports (report.json) into compact Markdown tables.

One table per merge group (the victim with one free-rider, or with all of them): a row per
victim variant (unprotected, each defense, each defense + attack), a column per merge method,
each cell ``victim kept / free-rider kept (joint score) @ coefficient`` at the attacker's best
joint setting (several free-riders: their minimum), then the victim-only view (what the
victim-only objective picks, at its coefficient; validation shares since session 10); bold
where a protection holds (the weakest task keeps <= 5%).  Then the papers' fixed-protocol table.

    python benchmarks/audit_tables.py reports/full-text-*/report.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cell(row: dict) -> str:
    partner = min(row["partner_kept"].values())
    text = f"{row['victim_kept']:.0%} / {partner:.0%} ({row['joint']:.0%}) @{row['coefficient']:g}"
    text = f"**{text}**" if row["holds"] and row["defense"] != "none" else text
    view = row.get("victim_view")
    if view:
        vp = min(view["partner_kept"].values())
        text += f"; victim view {view['victim_kept']:.0%} / {vp:.0%} @{view['coefficient']:g}"
    return text


def protocol_table(reports: list[dict]) -> list[str]:
    rows = [r for rep in reports for r in rep.get("protocol", [])]
    if not rows:
        return []
    settings = list(dict.fromkeys((r["method"], r["coefficient"]) for r in rows))
    groups = list(dict.fromkeys("+".join(r["partners"]) for r in rows))
    out = []
    for group in groups:
        sel = {
            (r["variant"], r["method"], r["coefficient"]): r
            for r in rows
            if "+".join(r["partners"]) == group
        }
        out += [
            f"Papers' protocol, victim merged with `{group}` (cells: mean test accuracy over the "
            "merged tasks, relative degradation against the unprotected merge):",
            "",
            "| victim model | " + " | ".join(f"{m} {c:g}" for m, c in settings) + " |",
            "|---|" + "---|" * len(settings),
        ]
        for v in dict.fromkeys(k[0] for k in sel):
            cells = [
                f"{sel[(v, m, c)]['mean_accuracy']:.3f} ({sel[(v, m, c)]['degradation']:.0%})"
                if (v, m, c) in sel
                else "-"
                for m, c in settings
            ]
            out.append(f"| {v} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def tables(reports: list[dict]) -> str:
    rows = [r for rep in reports for r in rep["merges"]]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    groups = list(dict.fromkeys("+".join(r["partners"]) for r in rows))
    out = []
    for group in groups:
        sel = {(r["variant"], r["method"]): r for r in rows if "+".join(r["partners"]) == group}
        used = [m for m in methods if any(k[1] == m for k in sel)]
        out += [
            f"Victim merged with `{group}`, objective `{reports[0].get('objective', 'victim')}` "
            "(cells: victim kept / free-rider kept (joint) @coef; victim-only view):",
            "",
            "| victim model | " + " | ".join(used) + " |",
            "|---|" + "---|" * len(used),
        ]
        for v in variants:
            if any(k[0] == v for k in sel):
                cells = [cell(sel[(v, m)]) if (v, m) in sel else "-" for m in used]
                out.append(f"| {v} | " + " | ".join(cells) + " |")
        out.append("")
    out += protocol_table(reports)
    standalone = {k: a for rep in reports for k, a in rep["standalone"].items()}
    out.append(
        "Standalone victim test accuracy: "
        + ", ".join(f"{k} {a:.4f}" for k, a in standalone.items())
        + "."
    )
    seconds = ", ".join(f"{rep['seconds']:.0f} s" for rep in reports)
    out.append(f"Audit run times: {seconds}.")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", type=Path, nargs="+", help="report.json files")
    args = parser.parse_args()
    print(tables([json.loads(p.read_text()) for p in args.reports]))


if __name__ == "__main__":
    main()
