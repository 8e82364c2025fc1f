"""``audit``: does a protection stop free-riders, before and after adaptive attacks?

For a family of task models sharing one base (see :mod:`mergeshield.evaluation.zoo`), one
victim task and its free-riders:

1. the victim is protected with each defense, and optionally attacked (aligned back to the
   public base) by each attack;
2. every variant's backbone is merged with each free-rider's backbone (and optionally with all
   of them) by each mergekit method; the attacker sweeps the merge coefficient and keeps the
   one with the best *joint* validation score over all merged tasks
   (:mod:`mergeshield.objective`: by default the smallest share of gain kept, since a
   free-rider wants one model that keeps every task).  The sweep runs in memory
   (:mod:`mergeshield.merging.kernels`, parity-tested against mergekit): no folder per
   coefficient;
3. at that coefficient the merge is computed again by mergekit and that backbone is scored on
   the test split of the victim task and of each free-rider task, each with its own
   fine-tuned head (the reported figures).  The in-memory merge's test accuracies are kept
   next to them (``MergeRow.kernel_check``); more than one test example apart on any task is
   flagged in the report.  The coefficient that the victim-only view (``objective="victim"``)
   would pick is reported too, for comparison, with its validation figures; the papers' fixed
   merges are scored in memory.

Each merged task's share of its fine-tuning gain that survives is
``kept = (acc_merged - acc_base) / (acc_finetuned - acc_base)``; the verdicts are those of
:func:`mergeshield.objective.verdict`.  Also measured: the papers' fixed protocol
(:data:`PAPER_SETTINGS`, relative degradation against the unprotected merge; for the unprotected
and protected releases, not the attacked variants, which the sweep covers) and the accuracy
along the straight path ``theta_base + alpha (theta_variant - theta_base)``.

``AuditPlan.dtype`` (e.g. ``"bfloat16"``): the base, the victim and the free-riders are
released in that dtype (:func:`mergeshield.evaluation.zoo.family_in_dtype`, with the reference
scores measured again on those copies), protected, attacked and merged in it (merges computed
in float32 and written in the dtype, by mergekit and in memory alike), and scored in float32.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergeshield.errors import MergeShieldError
from mergeshield.evaluation.accuracy import Scorer, evaluate
from mergeshield.evaluation.family import Family
from mergeshield.evaluation.zoo import build_family, check_dtype, family_in_dtype
from mergeshield.folders import atomic_dir, load_tensors, scratch
from mergeshield.merging import extract_backbone, get_method, merge
from mergeshield.merging.kernels import SparseCache, Tensors, prepare, reuse_freed_memory
from mergeshield.objective import (
    HOLDS,
    INSERTED_TEXT,
    UNPROTECTED_MIN,
    USEFUL_TEXT,
    check_objective,
    choose,
    joint_score,
    kept,
    unprotected_verdict,
    verdict,
    weakest,
)
from mergeshield.progress import console
from mergeshield.protect import protect

# The published papers' fixed merges (papers.md): task arithmetic at the task-vectors paper's
# 0.3 and PaRaMS' headline 0.8, TIES with top-20% density (mergekit's TIES is a disjoint
# mean, so lambda 1 is its plain setting), and weight averaging of the models.
PAPER_SETTINGS: tuple[tuple[str, float], ...] = (
    ("task_arithmetic", 0.3),
    ("task_arithmetic", 0.8),
    ("ties", 1.0),
    ("linear", 1.0),
)


@dataclass(frozen=True)
class AuditPlan:
    """What to measure.  ``None`` for ``victim``/``free_riders`` means the family's first task /
    all other tasks; ``grid`` ``None`` means each method's own coefficient grid, thinned to
    every ``grid_stride``-th value counted from the largest (which is always tried).  The victim
    is merged with each free-rider in ``pairs`` (``None``: all of them) and, with
    ``merge_all``, with all free-riders at once.  ``objective`` is the attacker's score of a
    merge (:data:`mergeshield.objective.OBJECTIVES`); ``protocol`` the papers' fixed
    merges to run as well (:data:`PAPER_SETTINGS`; empty: none)."""

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
    objective: str = "min"
    protocol: tuple[tuple[str, float], ...] = PAPER_SETTINGS
    interpolation: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    seed: int = 0
    dtype: str = "float32"  # the models as released and merged: float32, bfloat16 or float16


@dataclass
class MergeRow:
    """The attacker's best merge of one variant with one group of free-riders by one method.

    ``sweep``: ``(coefficient, joint validation score)`` for each coefficient tried;
    ``val_kept``: ``(coefficient, victim kept, {free-rider: kept})`` on validation data.
    Test accuracies and shares kept are at ``coefficient``, of mergekit's merge; ``victim_view``
    is the contrast with the victim-only objective: the coefficient it picks and the shares kept
    there on the *validation* split (what that attacker saw; ``split: "val"``: scoring its test
    split too would cost about a fifth of the audit's time); ``kernel_check`` the in-memory merge's
    test accuracies at ``coefficient`` and how many test examples they are apart from
    mergekit's (``agrees``: at most one on every task), the tensors in which the two merges
    are not bit for bit equal (none: the in-memory merge scores exactly as mergekit's and is
    not scored again), and the seconds spent in memory (the sweep) and on mergekit's recheck
    (its merge and the test scoring).
    """

    variant: str  # "unprotected", a defense, or "defense+attack"
    defense: str
    attack: str
    method: str
    partners: list[str]
    objective: str
    coefficient: float
    sweep: list[tuple[float, float]]
    val_kept: list[tuple[float, float, dict[str, float]]]
    victim_accuracy: float
    victim_kept: float
    partner_accuracy: dict[str, float]
    partner_kept: dict[str, float]
    victim_view: dict[str, Any] = field(default_factory=dict)
    kernel_check: dict[str, Any] = field(default_factory=dict)

    @property
    def joint(self) -> float:
        """The test score of this merge under the plan's objective."""
        return joint_score(self.victim_kept, self.partner_kept, self.objective)

    @property
    def weakest(self) -> float:
        """The smallest share of gain kept over the merged tasks (test split)."""
        return weakest(self.victim_kept, self.partner_kept)

    @property
    def holds(self) -> bool:
        """No merged model a free-rider can use: the weakest task keeps at most HOLDS."""
        return self.weakest <= HOLDS


@dataclass
class ProtocolRow:
    """One of the papers' fixed merges (no coefficient search) of one variant and group."""

    variant: str
    method: str
    coefficient: float
    partners: list[str]
    accuracy: dict[str, float]  # task -> test accuracy of the merged model
    mean_accuracy: float
    degradation: float  # 1 - mean_accuracy / the unprotected merge's mean_accuracy


@dataclass
class AuditResult:
    plan: AuditPlan
    family: dict[str, Any]
    victim: str
    free_riders: list[str]
    standalone: dict[str, float] = field(default_factory=dict)  # variant -> victim test accuracy
    merges: list[MergeRow] = field(default_factory=list)
    protocol: list[ProtocolRow] = field(default_factory=list)
    interpolation: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # method/group pairs a method cannot merge
    seconds: float = 0.0


def run_audit(
    plan: AuditPlan,
    out: Path,
    *,
    family: Family | None = None,
    progress: bool = True,
) -> AuditResult:
    """Run ``plan`` and write the report (``report.md``, ``report.json``, PNG plots) to ``out``."""
    start = time.perf_counter()
    check_objective(plan.objective)
    check_dtype(plan.dtype)
    for method, _ in plan.protocol:
        get_method(method)
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
    with scratch("audit") as work, reuse_freed_memory():
        family = family_in_dtype(family, plan.dtype, work / "dtype")
        result.family = _family_summary(family)
        variants = _variants(plan, family, victim, work, progress)
        if plan.attacked_only:
            variants = {k: v for k, v in variants.items() if v[2]}
        backbones = {
            t: extract_backbone(family.tasks[t], family.base, work / "bb" / t) for t in riders
        }
        for name, (model, _, _) in variants.items():
            result.standalone[name] = evaluate(model, victim, family=family)
        rider_tensors = {t: load_tensors(b) for t, b in backbones.items()}
        memory = InMemory(family, [victim, *riders], shared=list(rider_tensors.values()))
        runs = []
        for method in plan.methods:
            for partners in groups:
                if get_method(method).takes(1 + len(partners)):
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
            variant_tensors = load_tensors(backbone)
            for method, partners in runs:
                done += 1
                if progress:
                    console.print(
                        f"[{done}/{total}] merge {name} + {'+'.join(partners)} with {method}"
                    )
                row = _merge_row(
                    plan,
                    memory,
                    victim,
                    (name, defense, attack),
                    method,
                    partners,
                    [
                        (backbone, variant_tensors),
                        *((backbones[p], rider_tensors[p]) for p in partners),
                    ],
                    work,
                )
                if not row.kernel_check["agrees"] and progress:
                    console.print(
                        f"[red]in-memory merge and mergekit differ by "
                        f"{row.kernel_check['examples_apart']} test examples[/red]"
                    )
                result.merges.append(row)
                with partial.open("a") as log:  # progress survives a crash of a long run
                    log.write(json.dumps(asdict(row)) + "\n")
            # the papers' protocol measures releases as the papers did: no attacker
            for method, coefficient in plan.protocol if attack == "" else ():
                for partners in groups:
                    if get_method(method).takes(1 + len(partners)):
                        result.protocol.append(
                            _protocol_row(
                                plan,
                                memory,
                                victim,
                                name,
                                method,
                                coefficient,
                                partners,
                                [variant_tensors, *(rider_tensors[p] for p in partners)],
                            )
                        )
            if attack == "":
                result.interpolation[name] = _interpolate(
                    plan, memory, victim, variant_tensors, result.standalone[name]
                )
    _relative_degradation(result.protocol)
    result.seconds = time.perf_counter() - start
    write_report(result, out)
    partial.unlink(missing_ok=True)
    return result


def _family_summary(family: Family) -> dict[str, Any]:
    return {
        "kind": family.kind,
        "setting": family.setting,
        "dtype": family.manifest.get("dtype", "float32"),
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


class InMemory:
    """The audit's in-memory side: the base's tensors and, per task, a classifier with the
    task's own fine-tuned head that scores backbone tensors (base layout) on a split.

    The seam for other scorers: :meth:`scores` maps merged tensors to (accuracy, kept).
    ``sparse`` caches the sparsification of ``shared`` (the free-riders' tensors, merged with
    every variant)."""

    def __init__(
        self, family: Family, tasks: list[str], shared: list[Tensors] | None = None
    ) -> None:
        self.family = family
        self.base = load_tensors(family.base)
        self.scorers = {t: Scorer(family, t, family.tasks[t]) for t in tasks}
        self.sparse = SparseCache(shared or [])

    def scores(
        self, tensors: Tensors, tasks: list[str], split: str
    ) -> dict[str, tuple[float, float]]:
        """task -> (accuracy on ``split``, share of gain kept) of a merged backbone."""
        out = {}
        for task in tasks:
            acc = self.scorers[task](tensors, split)
            out[task] = (acc, kept(acc, *_references(self.family, task, split)))
        return out

    def test_size(self, task: str) -> int:
        return len(self.scorers[task].data["test"]["labels"])


def _merge_row(
    plan: AuditPlan,
    memory: InMemory,
    victim: str,
    variant: tuple[str, str, str],
    method: str,
    partners: list[str],
    models: list[tuple[Path, Tensors]],
    work: Path,
) -> MergeRow:
    """Sweep ``method``'s grid in memory, keep the coefficient with the best joint validation
    score, merge at it again with mergekit and score that merge on the test split (the victim-
    only view's choice is reported with its validation figures).  ``variant``: (name, defense,
    attack); ``models``: (backbone folder, its tensors) for the variant and each partner."""
    family, tasks = memory.family, [victim, *partners]
    start = time.perf_counter()
    at = prepare(method, memory.base, [t for _, t in models], seed=plan.seed, cache=memory.sparse)
    val_kept: list[tuple[float, float, dict[str, float]]] = []
    for c in coefficient_grid(plan, method):
        val = memory.scores(at(c), tasks, "val")
        val_kept.append((c, val[victim][1], {p: val[p][1] for p in partners}))
    coefficient = choose(val_kept, plan.objective)
    if math.isnan(coefficient):
        raise MergeShieldError(f"every score of the {method} sweep was NaN")
    merged = at(coefficient)
    in_memory_seconds = time.perf_counter() - start
    folder = work / "best"
    merge(
        method,
        family.base,
        [f for f, _ in models],
        folder,
        coefficient=coefficient,
        seed=plan.seed,
        out_dtype=None if plan.dtype == "float32" else plan.dtype,
    )
    rechecked = load_tensors(folder)
    differing = differing_tensors(merged, rechecked)
    test = memory.scores(rechecked, tasks, "test")
    shutil.rmtree(folder, ignore_errors=True)
    mergekit_seconds = time.perf_counter() - start - in_memory_seconds
    # bit-identical tensors score identically: the in-memory merge is scored only if it differs
    in_memory = memory.scores(merged, tasks, "test") if differing else test
    apart = {t: round(abs(test[t][0] - in_memory[t][0]) * memory.test_size(t)) for t in tasks}
    row = MergeRow(
        variant=variant[0],
        defense=variant[1],
        attack=variant[2],
        method=method,
        partners=partners,
        objective=plan.objective,
        coefficient=coefficient,
        sweep=[(c, joint_score(v, p, plan.objective)) for c, v, p in val_kept],
        val_kept=val_kept,
        victim_accuracy=test[victim][0],
        victim_kept=test[victim][1],
        partner_accuracy={p: test[p][0] for p in partners},
        partner_kept={p: test[p][1] for p in partners},
        kernel_check={
            "accuracy": {t: in_memory[t][0] for t in tasks},
            "examples_apart": apart,
            "agrees": max(apart.values()) <= 1,
            "differing_tensors": differing,
            "in_memory_seconds": round(in_memory_seconds, 2),
            "mergekit_seconds": round(mergekit_seconds, 2),
        },
    )
    victim_choice = choose(val_kept, "victim")
    _, victim_share, partner_shares = next(v for v in val_kept if v[0] == victim_choice)
    row.victim_view = {
        "coefficient": victim_choice,
        "split": "val",
        "victim_kept": victim_share,
        "partner_kept": partner_shares,
    }
    return row


def differing_tensors(merged: Tensors, rechecked: Tensors) -> list[str]:
    """Names of the tensors in which two merges are not bit for bit equal (shape, dtype and
    every value; a name present in only one of them counts)."""
    return sorted(
        name
        for name in merged.keys() | rechecked.keys()
        if name not in merged
        or name not in rechecked
        or merged[name].dtype != rechecked[name].dtype
        or not torch.equal(merged[name], rechecked[name])
    )


def _references(family: Family, task: str, split: str) -> tuple[float, float]:
    """(base backbone + task head, fine-tuned) accuracy of ``task`` on ``split``."""
    if split == "test":
        return family.base_accuracy[task], family.finetuned_accuracy[task]
    entry = family.manifest["tasks"][task]
    return entry[f"base_{split}_accuracy"], entry[f"finetuned_{split}_accuracy"]


def _protocol_row(
    plan: AuditPlan,
    memory: InMemory,
    victim: str,
    name: str,
    method: str,
    coefficient: float,
    partners: list[str],
    models: list[Tensors],
) -> ProtocolRow:
    """The papers' fixed merge (in memory): no search, mean test accuracy over the tasks."""
    params = {"density": 0.2} if method == "ties" else None
    at = prepare(method, memory.base, models, params=params, seed=plan.seed, cache=memory.sparse)
    merged = at(coefficient)
    scores = memory.scores(merged, [victim, *partners], "test")
    accuracy = {t: a for t, (a, _) in scores.items()}
    return ProtocolRow(
        variant=name,
        method=method,
        coefficient=coefficient,
        partners=partners,
        accuracy=accuracy,
        mean_accuracy=sum(accuracy.values()) / len(accuracy),
        degradation=math.nan,
    )


def _relative_degradation(rows: list[ProtocolRow]) -> None:
    """Fill ``degradation = 1 - mean_accuracy / mean_accuracy(unprotected)`` (the papers'
    relative drop of the merged model) for every row that has an unprotected counterpart."""
    reference = {
        (r.method, r.coefficient, tuple(r.partners)): r.mean_accuracy
        for r in rows
        if r.variant == "unprotected"
    }
    for r in rows:
        ref = reference.get((r.method, r.coefficient, tuple(r.partners)))
        if ref:
            r.degradation = 1.0 - r.mean_accuracy / ref


def coefficient_grid(plan: AuditPlan, method: str) -> tuple[float, ...]:
    """The coefficients the attacker tries for ``method`` under ``plan``."""
    spec = get_method(method)
    if spec.knob is None:  # model_stock computes its own ratio
        return spec.grid
    if plan.grid is not None:
        return plan.grid
    return spec.thinned(plan.grid_stride)


def _interpolate(
    plan: AuditPlan, memory: InMemory, victim: str, theta: Tensors, standalone: float
) -> list[tuple[float, float]]:
    """Victim accuracy of ``theta_base + alpha (theta - theta_base)`` for each alpha.

    The end points are known without a forward pass: alpha 0 is the base backbone (the
    family's base accuracy) and alpha 1 the model itself (its standalone accuracy).
    """
    base = memory.base
    points = []
    for alpha in plan.interpolation:
        if alpha == 0.0:
            points.append((alpha, memory.family.base_accuracy[victim]))
            continue
        if alpha == 1.0:
            points.append((alpha, standalone))
            continue
        mixed = {
            k: (b + alpha * (theta[k] - b)) if b.is_floating_point() else b for k, b in base.items()
        }
        points.append((alpha, memory.scorers[victim](mixed, "test")))
    return points


# --- report ------------------------------------------------------------------------------


def row_verdict(row: MergeRow) -> str:
    """The verdict on one merge row (unprotected rows get the sanity verdict)."""
    if row.defense == "none":
        return unprotected_verdict(row.victim_kept, row.partner_kept)
    return verdict(row.victim_kept, row.partner_kept)


def summary_table(result: AuditResult) -> list[list[str]]:
    """Rows of the headline table (also printed by the CLI)."""
    rows = []
    for r in result.merges:
        partner = ", ".join(
            f"{p} {a:.3f} ({r.partner_kept[p]:.0%})" for p, a in r.partner_accuracy.items()
        )
        view = r.victim_view
        rows.append(
            [
                r.variant,
                r.method,
                "+".join(r.partners),
                f"{r.coefficient:g}",
                " ".join(f"{c:g}:{v:.2f}" for c, v in r.sweep),
                f"{r.victim_accuracy:.3f} ({r.victim_kept:.0%})",
                partner,
                f"{r.joint:.0%}",
                row_verdict(r),
                f"{view['coefficient']:g}: {view['victim_kept']:.0%} / "
                + ", ".join(f"{k:.0%}" for k in view["partner_kept"].values())
                if view
                else "",
            ]
        )
    return rows


HEADER = [
    "victim model",
    "merge",
    "with",
    "coef",
    "sweep (coef: joint val score)",
    "victim acc (gain kept)",
    "free-rider acc (gain kept)",
    "joint",
    "verdict",
    "victim-only view (coef: victim / free-rider kept, validation)",
]


def write_report(result: AuditResult, out: Path) -> None:
    """Write report.json, report.md and the plots to a temporary folder, then rename to ``out``."""
    with atomic_dir(out) as tmp:
        _write_report(result, tmp)


def _write_report(result: AuditResult, out: Path) -> None:
    data = {
        "plan": asdict(result.plan),
        "objective": result.plan.objective,
        "family": result.family,
        "victim": result.victim,
        "free_riders": result.free_riders,
        "standalone": result.standalone,
        "merges": [
            asdict(r)
            | {"joint": r.joint, "weakest": r.weakest, "holds": r.holds, "verdict": row_verdict(r)}
            for r in result.merges
        ],
        "protocol": [asdict(r) for r in result.protocol],
        "interpolation": result.interpolation,
        "skipped": result.skipped,
        "seconds": result.seconds,
    }
    (out / "report.json").write_text(json.dumps(data, indent=2))
    plots = _plots(result, out)
    (out / "report.md").write_text(_markdown(result, plots))


OBJECTIVE_TEXT = {
    "min": "the smallest share of gain kept over the merged tasks (the weakest task decides)",
    "mean": "the mean share of gain kept over the merged tasks (the papers' average)",
    "victim": "the victim's share of gain kept alone (the strictest view of insertion)",
}


def _markdown(result: AuditResult, plots: list[str]) -> str:
    f, v, plan = result.family, result.victim, result.plan
    lines = [
        f"# mergeshield audit: victim `{v}`",
        "",
        f"Family: {f['kind']} ({f['setting']}), tasks {', '.join(f['tasks'])}. "
        f"Run time {result.seconds:.0f} s.",
        "",
        f"Merge methods: {', '.join(plan.methods)}; coefficient grids: "
        + "; ".join(f"{m} {list(coefficient_grid(plan, m))}" for m in plan.methods)
        + ".",
        "",
        "Gain kept = (merged accuracy - base accuracy) / (fine-tuned accuracy - base accuracy), "
        "per merged task. A free-rider wants one merged model that keeps every merged task, so "
        f"the attacker picks the coefficient that maximizes **objective `{plan.objective}`**: "
        f"{OBJECTIVE_TEXT[plan.objective]}, on held-out validation data. Verdicts: "
        f"*protection holds* when the best merge keeps at most {HOLDS:.0%} of the weakest "
        f"task's gain; *{INSERTED_TEXT}* when the victim keeps more but a free-rider task keeps "
        f"at most {HOLDS:.0%} (the merged model is the release itself); *{USEFUL_TEXT}* when "
        f"every merged task keeps more than {HOLDS:.0%}. An unprotected merge should keep at "
        f"least {UNPROTECTED_MIN:.0%} of every task's gain. The last column is what the "
        "victim-only objective would have chosen (validation shares kept at its coefficient: "
        "what that attacker saw). The sweeps run in memory (parity-tested kernels); each "
        "chosen merge is computed again by "
        f"mergekit and its figures are the ones shown ({_agreement(result)}).",
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
        "## Merges at the attacker's best joint setting",
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
    if result.protocol:
        lines += [
            "## The papers' protocol (fixed settings, no search)",
            "",
            "Mean test accuracy over the merged tasks, and the relative degradation against the "
            'unprotected merge, 1 - mean / mean(unprotected), as PaRaMS ("over 40% on '
            'average") and MergeLock (">95%") report it. TIES: density 0.2, mergekit\'s '
            "disjoint mean at lambda 1; linear 1: the plain average of the models.",
            "",
            "| victim model | merge | with | mean accuracy | degradation | per task |",
            "|---|---|---|---|---|---|",
            *[
                f"| {r.variant} | {r.method} {r.coefficient:g} | {'+'.join(r.partners)} | "
                f"{r.mean_accuracy:.3f} | {r.degradation:.0%} | "
                + ", ".join(f"{t} {a:.3f}" for t, a in r.accuracy.items())
                + " |"
                for r in result.protocol
            ],
            "",
        ]
    lines += ["## Findings", "", *_findings(result), "", *[f"![{p}]({p})" for p in plots], ""]
    return "\n".join(lines)


def _agreement(result: AuditResult) -> str:
    """How far the in-memory merges' test accuracies are from mergekit's, in test examples."""
    checks = [r.kernel_check for r in result.merges if r.kernel_check]
    if not checks:
        return "no merge rows"
    worst = max(max(c["examples_apart"].values()) for c in checks)
    agree = sum(c["agrees"] for c in checks)
    identical = sum(not c.get("differing_tensors", [None]) for c in checks)
    return (
        f"{agree} of {len(checks)} within one test example; at most {worst} apart; "
        f"{identical} of {len(checks)} bit for bit identical to mergekit's merge"
    )


def _findings(result: AuditResult) -> list[str]:
    """Plain statements of what the merges show, in the free-rider's terms."""
    lines = []
    apart = [r for r in result.merges if r.kernel_check and not r.kernel_check["agrees"]]
    if apart:
        lines.append(
            "- **The in-memory sweep and mergekit disagree** (more than one test example apart) "
            "for "
            + "; ".join(
                f"{r.variant}/{r.method}@{r.coefficient:g} {r.kernel_check['examples_apart']}"
                for r in apart
            )
            + ": the reported figures are mergekit's, but the sweep that chose them is suspect."
        )
    protected = [r for r in result.merges if r.defense != "none"]
    weak = [r for r in result.merges if r.defense == "none" and r.weakest < UNPROTECTED_MIN]
    if weak:
        lines.append(
            "- The unprotected merge itself keeps less than "
            f"{UNPROTECTED_MIN:.0%} of some task's gain for "
            + "; ".join(f"{r.method} with {'+'.join(r.partners)}" for r in weak)
            + ": there the audit cannot tell a defense from a weak merge."
        )
    for attacked, what in ((False, "Without an attack"), (True, "After an alignment attack")):
        rows = [r for r in protected if bool(r.attack) == attacked]
        if not rows:
            continue
        useful = [r for r in rows if row_verdict(r) == USEFUL_TEXT]
        inserted = [r for r in rows if row_verdict(r) == INSERTED_TEXT]
        if useful:
            lines.append(
                f"- {what}, these merges are useful to the free-rider (every task keeps more "
                f"than {HOLDS:.0%}): "
                + "; ".join(
                    f"{r.variant}/{r.method}@{r.coefficient:g} (weakest {r.weakest:.0%})"
                    for r in useful
                )
            )
        else:
            lines.append(
                f"- {what}, no merge the attacker found serves both tasks: every protected "
                f"variant's best merge keeps at most {HOLDS:.0%} of the weakest task's gain."
            )
        if inserted:
            lines.append(
                f"- {what}, the best merge keeps the victim only because it is the release "
                "inserted whole (the free-rider's own task keeps at most "
                f"{HOLDS:.0%}): "
                + "; ".join(
                    f"{r.variant}/{r.method}@{r.coefficient:g} (victim {r.victim_kept:.0%})"
                    for r in inserted
                )
            )
    if protected:
        best = max(protected, key=lambda r: (r.weakest, r.victim_kept))
        lines.append(
            f"- Strongest result for the free-rider: {best.variant} merged by {best.method} "
            f"at {best.coefficient:g} keeps {best.weakest:.0%} of the weakest task's gain "
            f"(victim {best.victim_kept:.0%})."
        )
    return lines


def _plots(result: AuditResult, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    v = result.victim
    methods = list(dict.fromkeys(r.method for r in result.merges))
    if result.merges:
        fig, axes = plt.subplots(1, len(methods), figsize=(8 * len(methods), 5), squeeze=False)
        variants = list(dict.fromkeys(r.variant for r in result.merges))
        colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(variants)}
        for ax, method in zip(axes[0], methods, strict=True):
            rows = [r for r in result.merges if r.method == method]
            xs = [r.victim_kept for r in rows]
            ys = [min(r.partner_kept.values()) for r in rows]
            low = min(-0.1, *xs, *ys) - 0.05
            high = max(1.1, *xs, *ys) + 0.05
            ax.fill_between([HOLDS, high], HOLDS, high, color="tab:red", alpha=0.12, lw=0)
            ax.fill_between([low, high], low, HOLDS, color="tab:green", alpha=0.12, lw=0)
            ax.fill_between([low, HOLDS], HOLDS, high, color="tab:green", alpha=0.12, lw=0)
            ax.text(
                high - 0.02,
                high - 0.03,
                "merge serves both tasks:\nuseful to the free-rider",
                ha="right",
                va="top",
                fontsize=8,
                color="tab:red",
            )
            ax.text(
                high - 0.02,
                low + 0.02,
                f"a task keeps <= {HOLDS:.0%}: protection holds",
                ha="right",
                va="bottom",
                fontsize=8,
                color="tab:green",
            )
            for r, x, y in zip(rows, xs, ys, strict=True):
                attacked = bool(r.attack)
                ax.scatter(
                    x,
                    y,
                    s=160 if attacked else 60,
                    marker="^" if attacked else ("o" if r.defense == "none" else "s"),
                    facecolors="none" if attacked else colors[r.variant],
                    edgecolors=colors[r.variant],
                    linewidths=1.8,
                    label=f"{r.variant} + {'+'.join(r.partners)} @{r.coefficient:g}",
                )
            ax.set_xlim(low, high)
            ax.set_ylim(low, high)
            ax.set_xlabel(f"victim ({v}) gain kept")
            ax.set_ylabel("free-rider gain kept (weakest free-rider task)")
            ax.set_title(f"{method}: attacker's best merge ({result.plan.objective} objective)")
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.tight_layout()
        fig.savefig(out / "merge_map.png", dpi=110)
        plt.close(fig)
        names.append("merge_map.png")
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
