"""``audit``: does a protection stop free-riders, before and after adaptive attacks?

For a family of task models sharing one base (see :mod:`mergeshield.evaluation.zoo`), one
victim task and its free-riders:

1. the victim is protected with each defense, and optionally attacked (aligned back to the
   public base) by each attack;
2. every variant's backbone is merged with each free-rider's backbone (and optionally with all
   of them) by each mergekit method; the attacker sweeps the merge coefficient and keeps the
   best one on held-out victim-task data (the validation split);
3. at that coefficient the merged backbone is scored on the test split of the victim task and
   of the free-rider task, each with its own fine-tuned head.

The headline number is the share of the fine-tuning gain that survives the merge,
``kept = (acc_merged - acc_base) / (acc_finetuned - acc_base)``: a protection holds when
``kept <= 5%`` for the victim and the free-rider; the unprotected merge should keep much more
(otherwise the audit could not tell a defense from a broken merge).  Also measured: the
accuracy along the straight path ``theta_base + alpha (theta_variant - theta_base)`` (the
linear-mode-connectivity picture).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from mergeshield.errors import MergeShieldError
from mergeshield.evaluation.accuracy import evaluate
from mergeshield.evaluation.zoo import Family, build_family
from mergeshield.folders import atomic_dir, load_tensors
from mergeshield.merging import extract_backbone, get_method, sweep
from mergeshield.progress import console
from mergeshield.protect import protect

HOLDS = 0.05  # a protection holds when at most this share of the gain survives the merge
UNPROTECTED_MIN = 0.60  # an unprotected merge must keep at least this share (sanity check)
# methods whose coefficient-1 merge adds every task vector unscaled to the base
INSERTING_METHODS = ("task_arithmetic", "dare_linear", "breadcrumbs")


@dataclass(frozen=True)
class AuditPlan:
    """What to measure.  ``None`` for ``victim``/``free_riders`` means the family's first task /
    all other tasks; ``grid`` ``None`` means each method's own coefficient grid, thinned to
    every ``grid_stride``-th value counted from the largest (which is always tried).  The victim
    is merged with each free-rider in ``pairs`` (``None``: all of them) and, with
    ``merge_all``, with all free-riders at once."""

    kind: str = "text"
    setting: str = "small"
    tasks: tuple[str, ...] | None = None  # the family's tasks (None: all of the kind)
    victim: str | None = None
    free_riders: tuple[str, ...] | None = None
    defenses: tuple[str, ...] = ("params", "mergelock", "mergebarrier")
    methods: tuple[str, ...] = ("task_arithmetic", "ties")
    attacks: tuple[str, ...] = ()
    grid: tuple[float, ...] | None = None
    grid_stride: int = 1  # with grid None: every k-th coefficient of each method's grid
    pairs: tuple[str, ...] | None = None  # free-riders merged pairwise (None: all of them)
    merge_all: bool = False
    attacked_only: bool = False  # merge only the attacked variants (e.g. to add an attack)
    interpolation: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    seed: int = 0


@dataclass
class MergeRow:
    variant: str  # "unprotected", a defense, or "defense+attack"
    defense: str
    attack: str
    method: str
    partners: list[str]
    coefficient: float
    sweep: list[tuple[float, float]]
    victim_accuracy: float
    victim_kept: float
    partner_accuracy: dict[str, float]
    partner_kept: dict[str, float]

    @property
    def holds(self) -> bool:
        return self.victim_kept <= HOLDS and all(k <= HOLDS for k in self.partner_kept.values())


@dataclass
class AuditResult:
    plan: AuditPlan
    family: dict[str, Any]
    victim: str
    free_riders: list[str]
    standalone: dict[str, float] = field(default_factory=dict)  # variant -> victim test accuracy
    merges: list[MergeRow] = field(default_factory=list)
    interpolation: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # method/group pairs a method cannot merge
    seconds: float = 0.0


def kept(acc: float, base: float, finetuned: float) -> float:
    """Share of the fine-tuning gain present in ``acc`` (0: base level, 1: fine-tuned level)."""
    gap = finetuned - base
    return (acc - base) / gap if gap > 0 else float("nan")


def run_audit(
    plan: AuditPlan,
    out: Path,
    *,
    family: Family | None = None,
    progress: bool = True,
) -> AuditResult:
    """Run ``plan`` and write the report (``report.md``, ``report.json``, PNG plots) to ``out``."""
    start = time.perf_counter()
    if family is None:
        tasks = list(plan.tasks) if plan.tasks else None
        family = build_family(plan.kind, plan.setting, tasks=tasks, progress=progress)
    victim = plan.victim or next(iter(family.tasks))
    riders = list(plan.free_riders or [t for t in family.tasks if t != victim])
    result = AuditResult(plan, _family_summary(family), victim, riders)
    pairs = riders if plan.pairs is None else list(plan.pairs)
    unknown = sorted(set(pairs) - set(riders))
    if unknown:
        raise MergeShieldError(f"pairs {unknown} are not free-riders of this audit ({riders})")
    groups = [[r] for r in pairs] + ([riders] if plan.merge_all and len(riders) > 1 else [])
    if not groups:
        raise MergeShieldError("nothing to merge: give pairs or merge_all")
    if plan.attacked_only and not (plan.attacks and plan.defenses):
        raise MergeShieldError("attacked_only needs at least one defense and one attack")
    if plan.grid_stride < 1:
        raise MergeShieldError(f"grid_stride must be at least 1, got {plan.grid_stride}")
    out = Path(out)
    partial = out.parent / f"{out.name}.partial.jsonl"  # one line per finished merge row
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mergeshield-audit-"))
    try:
        variants = _variants(plan, family, victim, work, progress)
        if plan.attacked_only:
            variants = {k: v for k, v in variants.items() if v[2]}
        backbones = {
            t: extract_backbone(family.tasks[t], family.base, work / "bb" / t) for t in riders
        }
        for name, (model, _, _) in variants.items():
            result.standalone[name] = evaluate(model, victim, family=family)
        runs = []
        for method in plan.methods:
            for partners in groups:
                if _takes(method, 1 + len(partners)):
                    runs.append((method, partners))
                else:
                    result.skipped.append(
                        f"{method} with {'+'.join(partners)} ({1 + len(partners)} models)"
                    )
        total = len(variants) * len(runs)
        done = 0
        for name, (model, defense, attack) in variants.items():
            # mergekit reads "a+b" in a path as model a with LoRA b: no "+" in folder names
            backbone = extract_backbone(
                model, family.base, work / "vb" / name.replace("+", "-then-")
            )
            for method, partners in runs:
                done += 1
                if progress:
                    console.print(
                        f"[{done}/{total}] merge {name} + {'+'.join(partners)} with {method}"
                    )
                row = _merge_row(
                    plan,
                    family,
                    victim,
                    name,
                    defense,
                    attack,
                    method,
                    partners,
                    backbone,
                    [backbones[p] for p in partners],
                    work,
                )
                result.merges.append(row)
                with partial.open("a") as log:  # progress survives a crash of a long run
                    log.write(json.dumps(asdict(row)) + "\n")
            if attack == "":
                result.interpolation[name] = _interpolate(
                    plan, family, victim, backbone, result.standalone[name], work
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.seconds = time.perf_counter() - start
    write_report(result, out)
    partial.unlink(missing_ok=True)
    return result


def _takes(method: str, n_models: int) -> bool:
    """Whether ``method`` merges ``n_models`` models (slerp takes two, model_stock two or more)."""
    spec = get_method(method)
    return n_models >= spec.min_models and (spec.max_models is None or n_models <= spec.max_models)


def _family_summary(family: Family) -> dict[str, Any]:
    return {
        "kind": family.kind,
        "setting": family.setting,
        "root": str(family.root),
        "tasks": list(family.tasks),
        "base_accuracy": family.base_accuracy,
        "finetuned_accuracy": family.finetuned_accuracy,
    }


def _variants(
    plan: AuditPlan, family: Family, victim: str, work: Path, progress: bool
) -> dict[str, tuple[Path, str, str]]:
    """``name -> (classification checkpoint, defense, attack)`` for every variant of the victim."""
    original = family.tasks[victim]
    variants = {"unprotected": (original, "none", "")}
    for defense in plan.defenses:
        protected = work / "protected" / defense
        protect(original, protected, defense, base=family.base, seed=plan.seed, progress=progress)
        variants[defense] = (protected, defense, "")
        for attack_name in plan.attacks:
            from mergeshield.attacks import attack

            attacked = work / "attacked" / f"{defense}-then-{attack_name}"
            attack(protected, family.base, attacked, attack_name)
            variants[f"{defense}+{attack_name}"] = (attacked, defense, attack_name)
    return variants


def _merge_row(
    plan: AuditPlan,
    family: Family,
    victim: str,
    name: str,
    defense: str,
    attack: str,
    method: str,
    partners: list[str],
    backbone: Path,
    partner_backbones: list[Path],
    work: Path,
) -> MergeRow:
    def score(path: Path) -> float:
        return evaluate(family.tasks[victim], victim, family=family, split="val", backbone=path)

    best = work / "best"
    grid = coefficient_grid(plan, method)
    result = sweep(
        method,
        family.base,
        [backbone, *partner_backbones],
        score,
        grid=grid,
        workdir=work / "sweep",
        keep_best=best,
        seed=plan.seed,
    )
    acc = evaluate(family.tasks[victim], victim, family=family, backbone=best)
    partner_acc = {p: evaluate(family.tasks[p], p, family=family, backbone=best) for p in partners}
    shutil.rmtree(best, ignore_errors=True)
    return MergeRow(
        variant=name,
        defense=defense,
        attack=attack,
        method=method,
        partners=partners,
        coefficient=result.best_coefficient,
        sweep=list(result.scores),
        victim_accuracy=acc,
        victim_kept=kept(acc, family.base_accuracy[victim], family.finetuned_accuracy[victim]),
        partner_accuracy=partner_acc,
        partner_kept={
            p: kept(a, family.base_accuracy[p], family.finetuned_accuracy[p])
            for p, a in partner_acc.items()
        },
    )


def coefficient_grid(plan: AuditPlan, method: str) -> tuple[float, ...]:
    """The coefficients the attacker tries for ``method`` under ``plan``."""
    spec = get_method(method)
    if spec.knob is None:  # model_stock computes its own ratio
        return spec.grid
    if plan.grid is not None:
        return plan.grid
    return tuple(reversed(tuple(reversed(spec.grid))[:: plan.grid_stride]))


def _interpolate(
    plan: AuditPlan, family: Family, victim: str, backbone: Path, standalone: float, work: Path
) -> list[tuple[float, float]]:
    """Victim accuracy of ``theta_base + alpha (theta - theta_base)`` for each alpha.

    The end points are known without a forward pass: alpha 0 is the base backbone (the
    family's base accuracy) and alpha 1 the model itself (its standalone accuracy).
    """
    base, theta = load_tensors(family.base), load_tensors(backbone)
    points = []
    for alpha in plan.interpolation:
        if alpha == 0.0:
            points.append((alpha, family.base_accuracy[victim]))
            continue
        if alpha == 1.0:
            points.append((alpha, standalone))
            continue
        folder = work / "interpolated"
        folder.mkdir(parents=True, exist_ok=True)
        mixed = {
            k: (b + alpha * (theta[k] - b)) if b.is_floating_point() else b for k, b in base.items()
        }
        save_file(mixed, str(folder / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy2(family.base / "config.json", folder / "config.json")
        acc = evaluate(family.tasks[victim], victim, family=family, backbone=folder)
        points.append((alpha, acc))
        shutil.rmtree(folder)
    return points


# --- report ------------------------------------------------------------------------------


def _verdict(row: MergeRow) -> str:
    if row.defense == "none":
        ok = min(row.victim_kept, *row.partner_kept.values()) >= UNPROTECTED_MIN
        return "merge works" if ok else f"merge itself weak (a task keeps <{UNPROTECTED_MIN:.0%})"
    if row.attack:
        return f"attack recovers {row.victim_kept:.0%} of the victim's gain"
    return "protection holds" if row.holds else "PROTECTION FAILS"


def summary_table(result: AuditResult) -> list[list[str]]:
    """Rows of the headline table (also printed by the CLI)."""
    rows = []
    for r in result.merges:
        partner = ", ".join(
            f"{p} {a:.3f} ({r.partner_kept[p]:.0%})" for p, a in r.partner_accuracy.items()
        )
        rows.append(
            [
                r.variant,
                r.method,
                "+".join(r.partners),
                f"{r.coefficient:g}",
                " ".join(f"{c:g}:{v:.2f}" for c, v in r.sweep),
                f"{r.victim_accuracy:.3f} ({r.victim_kept:.0%})",
                partner,
                _verdict(r),
            ]
        )
    return rows


HEADER = [
    "victim model",
    "merge",
    "with",
    "best coef",
    "sweep (coef: victim val acc)",
    "victim acc (gain kept)",
    "free-rider acc (gain kept)",
    "verdict",
]


def write_report(result: AuditResult, out: Path) -> None:
    """Write report.json, report.md and the plots to a temporary folder, then rename to ``out``."""
    with atomic_dir(out) as tmp:
        _write_report(result, tmp)


def _write_report(result: AuditResult, out: Path) -> None:
    data = {
        "plan": asdict(result.plan),
        "family": result.family,
        "victim": result.victim,
        "free_riders": result.free_riders,
        "standalone": result.standalone,
        "merges": [asdict(r) | {"holds": r.holds, "verdict": _verdict(r)} for r in result.merges],
        "interpolation": result.interpolation,
        "skipped": result.skipped,
        "seconds": result.seconds,
    }
    (out / "report.json").write_text(json.dumps(data, indent=2))
    plots = _plots(result, out)
    (out / "report.md").write_text(_markdown(result, plots))


def _markdown(result: AuditResult, plots: list[str]) -> str:
    f, v = result.family, result.victim
    lines = [
        f"# mergeshield audit: victim `{v}`",
        "",
        f"Family: {f['kind']} ({f['setting']}), tasks {', '.join(f['tasks'])}. "
        f"Run time {result.seconds:.0f} s.",
        "",
        f"Merge methods: {', '.join(result.plan.methods)}; coefficient grids: "
        + "; ".join(f"{m} {list(coefficient_grid(result.plan, m))}" for m in result.plan.methods)
        + ".",
        "",
        "Gain kept = (merged accuracy - base accuracy) / (fine-tuned accuracy - base accuracy); "
        f"a protection holds when at most {HOLDS:.0%} of the gain survives, for the victim and "
        "the free-rider, at the attacker's best coefficient (chosen on held-out victim data).",
        "",
        "## Tasks",
        "",
        "| task | base backbone + task head | fine-tuned |",
        "|---|---|---|",
        *[
            f"| {t} | {f['base_accuracy'][t]:.3f} | {f['finetuned_accuracy'][t]:.3f} |"
            for t in f["tasks"]
        ],
        "",
        "## Standalone accuracy of the victim (test split)",
        "",
        "| model | accuracy |",
        "|---|---|",
        *[f"| {k} | {a:.4f} |" for k, a in result.standalone.items()],
        "",
        "## Merges",
        "",
        *(
            [
                f"Not run (the method cannot merge that many models): {'; '.join(result.skipped)}.",
                "",
            ]
            if result.skipped
            else []
        ),
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
        *["| " + " | ".join(row) + " |" for row in summary_table(result)],
        "",
    ]
    failures = [r for r in result.merges if r.defense != "none" and not r.attack and not r.holds]
    attacked = [r for r in result.merges if r.attack]
    lines += ["## Findings", ""]
    if failures:
        lines.append(
            "- Without any attack, these merges still keep more than "
            f"{HOLDS:.0%} of a gain: "
            + "; ".join(f"{r.variant}/{r.method} (victim {r.victim_kept:.0%})" for r in failures)
        )
    elif any(r.defense != "none" and not r.attack for r in result.merges):
        lines.append(
            "- Without an adaptive attack every defense held for every merge method "
            f"({HOLDS:.0%} bound)."
        )
    inserted = [r for r in failures if r.coefficient == 1.0 and r.method in INSERTING_METHODS]
    if inserted:
        lines.append(
            "- Why: at coefficient 1, "
            + "/".join(sorted({r.method for r in inserted}))
            + " computes theta_protected + (free-rider task vector): the protected model is "
            "inserted whole, so a function-preserving defense cannot stop its task from "
            "surviving; only the free-rider's own task degrades. Coefficients below 1 "
            "interpolate toward the base and collapse (see the sweep column and the "
            "interpolation plot)."
        )
    if attacked:
        best = max(attacked, key=lambda r: r.victim_kept)
        lines.append(
            f"- Strongest adaptive result: {best.variant} merged by {best.method} keeps "
            f"{best.victim_kept:.0%} of the victim's gain (accuracy {best.victim_accuracy:.3f})."
        )
    lines += ["", *[f"![{p}]({p})" for p in plots], ""]
    return "\n".join(lines)


def _plots(result: AuditResult, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    f, v = result.family, result.victim
    methods = list(dict.fromkeys(r.method for r in result.merges))
    variants = list(dict.fromkeys(r.variant for r in result.merges))
    if result.merges:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(variants) * len(methods)), 4))
        width = 0.8 / max(1, len(methods))
        for j, method in enumerate(methods):
            accs = []
            for variant in variants:
                rows = [r for r in result.merges if r.variant == variant and r.method == method]
                accs.append(max((r.victim_accuracy for r in rows), default=float("nan")))
            ax.bar([i + j * width for i in range(len(variants))], accs, width, label=method)
        ax.axhline(f["base_accuracy"][v], color="k", ls="--", lw=1, label="base backbone")
        ax.axhline(f["finetuned_accuracy"][v], color="g", ls=":", lw=1, label="fine-tuned")
        ax.set_xticks(
            [i + width * (len(methods) - 1) / 2 for i in range(len(variants))],
            variants,
            rotation=20,
            ha="right",
        )
        ax.set_ylabel(f"merged accuracy on {v}")
        ax.set_title("victim-task accuracy after merging (attacker's best coefficient)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "merged_accuracy.png", dpi=110)
        plt.close(fig)
        names.append("merged_accuracy.png")
    if result.interpolation:
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant, points in result.interpolation.items():
            ax.plot([a for a, _ in points], [acc for _, acc in points], marker="o", label=variant)
        ax.set_xlabel("alpha in theta_base + alpha (theta_model - theta_base)")
        ax.set_ylabel(f"accuracy on {v}")
        ax.set_title("interpolation from the base model (linear mode connectivity)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "interpolation.png", dpi=110)
        plt.close(fig)
        names.append("interpolation.png")
    return names
