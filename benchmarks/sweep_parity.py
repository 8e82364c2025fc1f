"""An audit's sweeps run again through mergekit alone, compared with the audit (issue 15: every
cell within one test example of the same matrix run through mergekit alone).

For each merge row of a ``report.json`` (optionally only ``--methods``), every coefficient of
its sweep is merged again by mergekit (on disk), scored on the validation split of every merged
task by the audit's own scorers, and the objective's choice from those mergekit scores is
compared with the audit's choice.  Where both choose the same coefficient, the audit's test
figures are mergekit's already (the audit re-merges its chosen cell with mergekit); where they
differ, the mergekit-alone choice is merged, scored on the test split and compared.

The victim's variants are rebuilt as the audit built them (the same plan and seed: protection
and the alignment attacks are deterministic given the seed).

    python benchmarks/sweep_parity.py /tmp/full-text-matrix/report.json --methods slerp
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from mergeshield.evaluation.audit import AuditPlan, InMemory, _variants
from mergeshield.evaluation.zoo import build_family
from mergeshield.folders import load_tensors, scratch
from mergeshield.merging import extract_backbone, merge
from mergeshield.objective import choose


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="an audit's report.json")
    parser.add_argument("--methods", nargs="+", help="only these merge methods (default all)")
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in report["plan"].items()}
    fields["protocol"] = tuple(tuple(p) for p in report["plan"]["protocol"])
    plan = AuditPlan(**fields)
    family = build_family(plan.kind, plan.setting, tasks=list(plan.tasks))
    rows = [r for r in report["merges"] if not args.methods or r["method"] in args.methods]
    victim = report["victim"]
    start = time.perf_counter()
    checked, same, apart = 0, 0, 0
    with scratch("sweep-parity") as work:
        variants = _variants(plan, family, victim, work, progress=False)
        riders = sorted({p for r in rows for p in r["partners"]})
        memory = InMemory(family, [victim, *riders])
        backbones = {t: extract_backbone(family.tasks[t], family.base, work / t) for t in riders}
        variant_backbones: dict[str, Path] = {}
        for row in rows:
            name = row["variant"]
            if name not in variant_backbones:
                model = variants[name][0]
                folder = work / "vb" / name.replace("+", "-then-")
                variant_backbones[name] = extract_backbone(model, family.base, folder)
            models = [variant_backbones[name], *(backbones[p] for p in row["partners"])]
            tasks = [victim, *row["partners"]]
            curve = []
            for c, *_ in row["val_kept"]:
                folder = merge(row["method"], family.base, models, work / "m", coefficient=c)
                val = memory.scores(load_tensors(folder), tasks, "val")
                shutil.rmtree(folder)
                curve.append((c, val[victim][1], {p: val[p][1] for p in row["partners"]}))
            chosen = choose(curve, plan.objective)
            checked += 1
            if chosen == row["coefficient"]:
                same += 1
                continue
            folder = merge(row["method"], family.base, models, work / "m", coefficient=chosen)
            test = memory.scores(load_tensors(folder), tasks, "test")
            shutil.rmtree(folder)
            reported = {victim: row["victim_accuracy"], **row["partner_accuracy"]}
            examples = {
                t: round(abs(test[t][0] - reported[t]) * memory.test_size(t)) for t in tasks
            }
            apart = max(apart, *examples.values())
            print(f"{name} {row['method']}: mergekit alone picks {chosen}, the audit "
                  f"{row['coefficient']}; test examples apart {examples}")  # fmt: skip
    print(
        json.dumps(
            {
                "rows": checked,
                "same_coefficient": same,
                "max_test_examples_apart_where_different": apart,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
