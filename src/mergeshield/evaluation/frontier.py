"""The frontier study: standalone cost of a protection vs what the best attack still merges.

For each candidate release of the victim task (unprotected, a symmetry defense, a hardened
model from :mod:`mergeshield.hardening.harden`, or hardened then symmetry-protected):

1. **standalone**: test accuracy of the release with its own head (a causal LM's family,
   kind ``llm``: exact match of its greedy answers, the score of every step below too);
2. **attacked variants**: the release as is, and aligned to the public base by each attack of
   :mod:`mergeshield.attacks` (``aga``, ``rebasin``, ``procrustes``), optionally followed by
   pruning or noising the aligned update (``aga+prune``, :func:`parse_attack`);
3. for every variant, merge method (any of :data:`mergeshield.merging.methods.METHODS`) and
   group of free-riders (each alone: two-model merges; all of them: the all-task merge,
   :meth:`FrontierPlan.groups`), the attacker's **coefficient search**: ``merge(theta_0;
   variant, free-riders; c)`` over the method's grid (:meth:`FrontierPlan.grid`), plus, for
   the task-vector methods, the **coefficient-1 insertion** ``theta_0 + tau_variant + lam
   sum tau_free-rider`` over ``insertion_grid`` (:mod:`mergeshield.attacks.adaptive`);
4. the attacker's choice on the *validation* split, for the sweep and for insertion alike:
   the coefficient with the best joint score over the merged tasks under ``plan.objective``
   (:mod:`mergeshield.objective`; by default the weakest task's share of gain kept, so a
   ``lam -> 0`` insertion, which is the release alone, scores as what it is);
5. **best attack** per method and merge kind (:func:`merge_key`) = the variant/search with
   the best validation joint score; its *test* accuracies are reported, re-merged by real
   mergekit when ``verify_mergekit`` (the sweeps themselves run the same formulas in memory,
   see :mod:`mergeshield.merging.kernels`, parity-tested against mergekit);
6. optionally the **short fine-tune** attack from the best task-arithmetic merge
   (:func:`mergeshield.attacks.adaptive.finetune_recovery`), next to the same fine-tune from
   ``theta_0 + lam tau_free-rider`` (a merge without the victim).

The victim is scored with the *release's* head (what a free-rider has), free-riders with their
own heads (causal LMs have none: the merged model answers every task);
``kept = (acc - acc_base) / (acc_ft - acc_base)`` as in the audit.  Target (issues
4 and 19): standalone within 0.5 points of the fine-tune and, after the best attack, at most
10% of the *weakest* merged task's gain kept, for every method.

Entry points: :func:`evaluate_release` (one release; what the audit can call) and
:func:`run_frontier` (all candidates, JSON + PNG).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergeshield.attacks.adaptive import (
    INSERTION_METHODS,
    finetune_recovery,
    insert,
    perturb_then_align,
)
from mergeshield.errors import MergeShieldError
from mergeshield.evaluation.accuracy import Scorer, backbone_tensors, score
from mergeshield.evaluation.family import Family
from mergeshield.folders import scratch
from mergeshield.merging import extract_backbone, merge
from mergeshield.merging.kernels import merge_tensors, prepare
from mergeshield.merging.methods import get_method
from mergeshield.modeling import load_model, merged_part, stored_to_module_names
from mergeshield.objective import check_objective, choose, joint_score, kept, weakest

Tensors = dict[str, torch.Tensor]
TARGET_KEPT = 0.10
TARGET_COST = 0.005


@dataclass(frozen=True)
class Candidate:
    """A release: ``harden`` method (or None) with ``harden_kwargs``, then ``defense`` (a
    :func:`mergeshield.protect.protect` defense, or None)."""

    name: str
    harden: str | None = None
    harden_kwargs: dict[str, Any] = field(default_factory=dict)
    defense: str | None = None


@dataclass(frozen=True)
class FrontierPlan:
    victim: str = "wordnet_noun"
    free_riders: tuple[str, ...] = ("bbc_news",)
    proxies: tuple[str, ...] = ("wordnet_verb",)  # proxy fine-tunes for harden "merge"
    methods: tuple[str, ...] = ("task_arithmetic", "ties")
    grids: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {
            "task_arithmetic": (0.5, 0.7, 1.0),
            "ties": (1.0, 1.5, 2.0),
        }
    )
    grid_stride: int = 2  # methods without a grid above: every k-th of the method's own grid
    insertion_grid: tuple[float, ...] = (0.3, 0.5, 1.0)
    attacks: tuple[str, ...] = ("none", "aga", "rebasin", "procrustes")
    merge_all: bool = True  # also merge the victim with every free-rider at once (all-task)
    objective: str = "min"
    verify_mergekit: bool = True
    finetune: tuple[int, int] | None = (64, 24)  # (examples, steps) or None
    seed: int = 0

    def grid(self, method: str) -> tuple[float, ...]:
        """The sweep's coefficients for ``method``: ``grids[method]``, else every
        ``grid_stride``-th of the method's own grid (:meth:`MergeMethod.thinned`)."""
        return self.grids.get(method) or get_method(method).thinned(self.grid_stride)

    def searches(self, method: str) -> tuple[str, ...]:
        """The coefficient sweep, and the coefficient-1 insertion for the task-vector methods
        (:data:`mergeshield.attacks.adaptive.INSERTION_METHODS`)."""
        return ("sweep", "insertion") if method in INSERTION_METHODS else ("sweep",)

    def groups(self) -> list[tuple[str, ...]]:
        """The free-riders merged with the victim: each alone (two-model merges) and, with
        ``merge_all`` and two or more of them, all at once (the all-task merge)."""
        groups = [(p,) for p in self.free_riders]
        if self.merge_all and len(self.free_riders) > 1:
            groups.append(tuple(self.free_riders))
        return groups


def merge_key(method: str, partners: Sequence[str]) -> str:
    """The name of a method's merge kind in the results: ``ties`` (the victim and one
    free-rider), ``ties, all tasks`` (the victim and every free-rider)."""
    return method if len(partners) == 1 else f"{method}, all tasks"


@dataclass
class MergeResult:
    """The attacker's choice for one method, merge kind and variant: validation scores of the
    victim and of each merged free-rider; test scores once chosen as the best attack."""

    method: str
    partners: tuple[str, ...]  # the free-riders merged with the victim
    variant: str  # attack name
    search: str  # "sweep" or "insertion"
    coefficient: float
    val_victim: float
    val_partners: dict[str, float]
    val_joint: float = float("nan")
    test_victim: float = float("nan")
    test_partners: dict[str, float] = field(default_factory=dict)
    test_victim_mergekit: float = float("nan")
    test_partners_mergekit: dict[str, float] = field(default_factory=dict)
    curve: list[tuple[float, ...]] = field(default_factory=list)  # (c, victim, *partners)

    @property
    def key(self) -> str:
        return merge_key(self.method, self.partners)


@dataclass
class ReleaseResult:
    name: str
    standalone: float
    base: float
    finetuned: float
    rows: list[MergeResult] = field(default_factory=list)
    best: dict[str, MergeResult] = field(default_factory=dict)  # merge_key -> best attack
    finetune: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    partner_refs: dict[str, tuple[float, float]] = field(default_factory=dict)  # test

    def kept(self, acc: float) -> float:
        return kept(acc, self.base, self.finetuned)

    def summary(self) -> dict[str, Any]:
        """Per method and merge kind (:func:`merge_key`): test accuracies and shares kept of
        the best attack (mergekit's figures where re-merged), the weakest share over the merged
        tasks, the attack; and whether the target is met."""
        out: dict[str, Any] = {
            "name": self.name,
            "standalone": self.standalone,
            "cost": self.finetuned - self.standalone,
        }
        for m, r in self.best.items():
            acc = _prefer(r.test_victim_mergekit, r.test_victim)
            partners = r.test_partners_mergekit or r.test_partners
            victim_kept = self.kept(acc)
            partner_kept = {p: kept(a, *self.partner_refs[p]) for p, a in partners.items()}
            out[m] = {
                "victim": acc,
                "kept": victim_kept,
                "partners": partners,
                "partner_kept": partner_kept,
                "weakest": weakest(victim_kept, partner_kept),
                "attack": f"{r.variant}/{r.search}@{r.coefficient:g}",
            }
        out["meets_target"] = (self.finetuned - self.standalone) <= TARGET_COST and all(
            out[m]["weakest"] <= TARGET_KEPT for m in self.best
        )
        return out


def _prefer(mergekit_value: float, in_memory: float) -> float:
    """mergekit's figure where the merge was re-run by mergekit, else the in-memory one."""
    return in_memory if math.isnan(mergekit_value) else mergekit_value


# ----------------------------------------------------------------------------- one release


def evaluate_release(
    family: Family,
    released: Path,
    plan: FrontierPlan,
    *,
    name: str = "release",
    progress: bool = True,
) -> ReleaseResult:
    """Standalone accuracy and the best attack per merge method for one release of
    ``plan.victim`` (a classification checkpoint folder, or a causal LM for an ``llm``
    family); see the module docstring for the protocol.  Intermediate folders live in a
    temporary folder, removed in every case."""
    from mergeshield.attacks import attack as run_attack

    check_objective(plan.objective)
    start = time.perf_counter()
    with scratch("frontier") as work:
        base = backbone_tensors(family.base)
        victim_scorer = Scorer(family, plan.victim, released)
        result = ReleaseResult(
            name=name,
            standalone=victim_scorer.standalone("test"),
            base=family.base_accuracy[plan.victim],
            finetuned=family.finetuned_accuracy[plan.victim],
            partner_refs={
                p: (family.base_accuracy[p], family.finetuned_accuracy[p]) for p in plan.free_riders
            },
        )
        partner_scorers = {p: Scorer(family, p, family.tasks[p]) for p in plan.free_riders}
        partner_folders = {
            p: extract_backbone(family.tasks[p], family.base, work / "partners" / p)
            for p in plan.free_riders
        }
        partner_models = {p: backbone_tensors(f) for p, f in partner_folders.items()}
        variant_folders: dict[str, Path] = {}
        for attack_name in plan.attacks:
            source = released
            # mergekit reads "a+b" in a path as model a with LoRA b: no "+" in folder names
            folder_name = attack_name.replace("+", "-then-")
            align, perturb = parse_attack(attack_name)
            if perturb:
                source = perturb_then_align(
                    released, family.base, work / "attacked" / folder_name, attack=align, **perturb
                )
            elif align != "none":
                source = run_attack(released, family.base, work / "attacked" / folder_name, align)
            variant_folders[attack_name] = extract_backbone(
                source, family.base, work / "variants" / folder_name
            )
        runs = [
            (method, partners)
            for method in plan.methods
            for partners in plan.groups()
            if get_method(method).takes(1 + len(partners))
        ]
        for variant, folder in variant_folders.items():
            theta = backbone_tensors(folder)
            for method, partners in runs:
                models = [theta, *(partner_models[p] for p in partners)]
                scorers = {p: partner_scorers[p] for p in partners}
                for search in plan.searches(method):
                    row = _search(
                        plan, family, method, search, variant, base, models, victim_scorer, scorers
                    )
                    result.rows.append(row)
                    if progress:
                        print(
                            f"  {name} {variant:10s} {row.key:25s} {search:9s} "
                            f"c={row.coefficient:<5g} val victim {row.val_victim:.3f} "
                            f"free-riders {_scores(row.val_partners)} joint {row.val_joint:.2f}",
                            flush=True,
                        )
        for key in dict.fromkeys(merge_key(method, partners) for method, partners in runs):
            rows = [r for r in result.rows if r.key == key]
            best = max(rows, key=lambda r: -math.inf if math.isnan(r.val_joint) else r.val_joint)
            method, partners = best.method, best.partners
            folders = [variant_folders[best.variant], *(partner_folders[p] for p in partners)]
            models = [backbone_tensors(folders[0]), *(partner_models[p] for p in partners)]
            merged = _merged(method, best.search, base, models, best.coefficient, plan.seed)
            best.test_victim = victim_scorer(merged, "test")
            best.test_partners = {p: partner_scorers[p](merged, "test") for p in partners}
            if plan.verify_mergekit:
                folder = work / "mergekit" / key.replace(", ", "-").replace(" ", "-")
                if best.search == "insertion":
                    insert(
                        family.base,
                        folders[0],
                        folders[1:],
                        folder,
                        coefficient=best.coefficient,
                        method=method,
                        seed=plan.seed,
                    )
                else:
                    merge(
                        method,
                        family.base,
                        folders,
                        folder,
                        coefficient=best.coefficient,
                        seed=plan.seed,
                    )
                by_mergekit = backbone_tensors(folder)
                best.test_victim_mergekit = victim_scorer(by_mergekit, "test")
                best.test_partners_mergekit = {
                    p: partner_scorers[p](by_mergekit, "test") for p in partners
                }
                shutil.rmtree(folder, ignore_errors=True)
            result.best[key] = best
            if progress:
                print(
                    f"  {name} best {key}: {best.variant}/{best.search}@{best.coefficient:g}"
                    f" test victim {best.test_victim:.3f} (mergekit "
                    f"{best.test_victim_mergekit:.3f}) free-riders {_scores(best.test_partners)}",
                    flush=True,
                )
        if plan.finetune is not None and "task_arithmetic" in result.best:
            best = result.best["task_arithmetic"]
            result.finetune = _finetune_attack(
                plan,
                family,
                released,
                base,
                variant_folders,
                partner_models,
                victim_scorer,
                partner_scorers[best.partners[0]],
                best,
            )
    result.seconds = time.perf_counter() - start
    return result


def _scores(scores: dict[str, float]) -> str:
    return " ".join(f"{t} {a:.3f}" for t, a in scores.items())


def _merged(
    method: str, search: str, base: Tensors, models: list[Tensors], c: float, seed: int = 0
) -> Tensors:
    """Sweep: ``method`` at coefficient ``c``; insertion: model weights ``(1, c)`` at
    ``lambda = 1`` (:func:`mergeshield.attacks.adaptive.insertion_config`), in memory."""
    if search == "insertion":
        weights = [1.0, *[c] * (len(models) - 1)]
        return merge_tensors(
            method, base, models, coefficient=1.0, params={"weights": weights}, seed=seed
        )
    return merge_tensors(method, base, models, coefficient=c, seed=seed)


def _search(
    plan: FrontierPlan,
    family: Family,
    method: str,
    search: str,
    variant: str,
    base: Tensors,
    models: list[Tensors],
    victim_scorer: Scorer,
    partner_scorers: dict[str, Scorer],
) -> MergeResult:
    """Try every coefficient of the search on ``models`` (the variant, then the free-riders of
    ``partner_scorers``, in that order); keep the one with the best joint validation score
    under ``plan.objective`` (first on ties, NaN never wins)."""
    grid = plan.grid(method) if search == "sweep" else plan.insertion_grid
    refs = {
        t: (
            family.manifest["tasks"][t]["base_val_accuracy"],
            family.manifest["tasks"][t]["finetuned_val_accuracy"],
        )
        for t in (plan.victim, *partner_scorers)
    }
    curve, shares = [], []
    sweep = prepare(method, base, models, seed=plan.seed) if search == "sweep" else None
    for c in grid:
        merged = sweep(c) if sweep else _merged(method, search, base, models, c, plan.seed)
        v = victim_scorer(merged, "val")
        p = {t: scorer(merged, "val") for t, scorer in partner_scorers.items()}
        curve.append((c, v, *p.values()))
        shares.append(
            (c, kept(v, *refs[plan.victim]), {t: kept(a, *refs[t]) for t, a in p.items()})
        )
    chosen = choose(shares, plan.objective)
    index = 0 if math.isnan(chosen) else [c for c, _, _ in shares].index(chosen)
    c, v, *p = curve[index]
    score = joint_score(shares[index][1], shares[index][2], plan.objective)
    partners = dict(zip(partner_scorers, p, strict=True))
    return MergeResult(method, tuple(partners), variant, search, c, v, partners, score, curve=curve)


def _finetune_attack(
    plan: FrontierPlan,
    family: Family,
    released: Path,
    base: Tensors,
    variant_folders: dict[str, Path],
    partner_models: dict[str, Tensors],
    victim_scorer: Scorer,
    partner_scorer: Scorer,
    best: MergeResult,
) -> dict[str, Any]:
    """Fine-tune the best task-arithmetic merge, and the victim-free merge ``theta_0 + c
    tau_partner``, on ``n`` victim training examples (:func:`training_inputs`, shuffled; a
    causal LM's prompt/answer pairs, the loss on the answer).  Along the way, ``[step, victim
    test score, free-rider test score]``: the free-rider's task scored on the trained model's
    merged part under its own head, so that the fine-tuned merge is judged on both tasks."""
    n, steps = plan.finetune
    train = training_inputs(family, plan.victim)
    perm = torch.randperm(len(train["labels"]), generator=torch.Generator().manual_seed(plan.seed))
    train = {k: v[perm] for k, v in train.items()}
    test = victim_scorer.data["test"]
    theta = backbone_tensors(variant_folders[best.variant])
    partner = partner_models[best.partners[0]]
    c = best.coefficient
    starts = {
        "best_merge": _merged("task_arithmetic", best.search, base, [theta, partner], c),
        "merge_without_victim": merge_tensors(
            "task_arithmetic", base, [partner], coefficient=c if best.search == "sweep" else 1.0
        ),
    }
    out: dict[str, Any] = {"examples": n, "steps": steps}
    for label, backbone in starts.items():
        model = load_model(released, family.kind)
        names = stored_to_module_names(merged_part(model), family.base)
        curve = finetune_recovery(
            model,
            {names.get(k, k): v for k, v in backbone.items()},
            train,
            n_examples=n,
            steps=steps,
            evaluate=lambda m: (score(m, test, family.kind), partner_scorer.of_module(m, "test")),
            seed=plan.seed,
        )
        out[label] = [[step, *scores] for step, scores in curve]
    return out


# ----------------------------------------------------------------------------- study


def _file_family(family: Family) -> bool:
    """A family materialized from an audit file of the user's own models."""
    return family.setting == "file"


def training_data(family: Family, task: str) -> tuple[Any, int | None]:
    """``task``'s training data as ``harden`` reads it, and the token length to train on
    (None for images): a built-in task's train split (``load_task``, or ``load_gen_task`` for
    the LLM family) at the length the family was built with, or the audit file's ``train:``
    data at the file's ``max_length``."""
    if _file_family(family):
        path = family.manifest["tasks"][task].get("train")
        if path is None:
            raise MergeShieldError(
                f"task {task!r} has no training data: add train: DATA to it in the audit file"
            )
        return Path(path), family.manifest["max_length"] if family.kind != "image" else None
    from mergeshield.evaluation.generative import load_gen_task
    from mergeshield.tasks import load_task

    s = family.manifest["settings"]
    sizes = (s["n_train"], s["n_val"], s["n_test"], s["seed"])
    data = load_gen_task(task, *sizes) if family.kind == "llm" else load_task(task, *sizes)
    if family.kind == "image":
        return data, None
    return data, dict(s.get("max_len_overrides") or ()).get(task, s["max_len"])


def training_inputs(family: Family, task: str) -> Tensors:
    """Model inputs and ``labels`` of ``task``'s train split: a built-in task tokenized as the
    zoo does (:func:`mergeshield.evaluation.zoo.encode_split`), an audit file's ``train:``
    data as :func:`mergeshield.evaluation.audit_file.materialize` encoded it."""
    if _file_family(family):
        training_data(family, task)  # the one-line error when the file names no train data
        return torch.load(family.root / "data" / f"{task}.pt", weights_only=True)["train"]
    from mergeshield.evaluation.zoo import ZooSettings, encode_split

    data, _ = training_data(family, task)
    return encode_split(family, data, "train", ZooSettings(**family.manifest["settings"]))


BUILD_RECORD = "frontier_build.json"


def build_settings(candidate: Candidate, family: Family, plan: FrontierPlan) -> dict[str, Any]:
    """What a candidate's release depends on (recorded beside it as :data:`BUILD_RECORD`): the
    victim and base folders, the proxies, the hardening method and options, the defense and
    the seed it was protected with."""
    return {
        "candidate": candidate.name,
        "victim": str(Path(family.tasks[plan.victim]).resolve()),
        "base": str(Path(family.base).resolve()),
        "proxies": [str(Path(family.tasks[p]).resolve()) for p in plan.proxies],
        "harden": candidate.harden,
        "harden_kwargs": dict(sorted(candidate.harden_kwargs.items())),
        "defense": candidate.defense,
        "seed": plan.seed,
    }


def check_build_folder(folder: Path, settings: dict[str, Any]) -> None:
    """Claim ``folder`` for a candidate built with ``settings``: a new folder gets the record;
    one that holds another build (other settings, or no record) is refused in one line, so a
    reused ``--builds`` folder never passes a release off as another's."""
    record = folder / BUILD_RECORD
    want = json.loads(json.dumps(settings, default=str))  # as the record reads back
    if record.is_file():
        held = json.loads(record.read_text())
        if held != want:
            diff = sorted(k for k in want | held if held.get(k) != want.get(k))
            raise MergeShieldError(
                f"{folder} holds {held.get('candidate')!r} built with other {', '.join(diff)}; "
                "pass another --builds folder or remove it"
            )
        return
    if folder.exists() and any(folder.iterdir()):
        raise MergeShieldError(
            f"{folder} is not a frontier build (no {BUILD_RECORD}); pass another --builds "
            "folder or remove it"
        )
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(want, indent=1) + "\n")


def build_candidate(
    candidate: Candidate, family: Family, plan: FrontierPlan, folder: Path, *, progress: bool
) -> Path:
    """The release folder of ``candidate`` (hardened and/or protected), built under ``folder``
    unless already there with the same settings (:func:`check_build_folder`)."""
    from mergeshield.hardening.harden import harden
    from mergeshield.protect import protect

    check_build_folder(folder, build_settings(candidate, family, plan))
    model = family.tasks[plan.victim]
    if candidate.harden is not None:
        hardened = folder / "hardened"
        if not (hardened / "config.json").is_file():
            data, max_len = training_data(family, plan.victim)
            kwargs: dict[str, Any] = {"proxies": tuple(str(family.tasks[p]) for p in plan.proxies)}
            if max_len is not None:  # train on the token length the family was built with
                kwargs["max_len"] = max_len
            harden(
                model,
                family.base,
                data,
                hardened,
                method=candidate.harden,
                progress=progress,
                **(kwargs | candidate.harden_kwargs),
            )
        model = hardened
    if candidate.defense is not None:
        protected = folder / f"protected-{candidate.defense}"
        if not (protected / "config.json").is_file():
            protect(model, protected, candidate.defense, base=family.base, seed=plan.seed)
        model = protected
    return model


def run_frontier(
    plan: FrontierPlan,
    candidates: Sequence[Candidate],
    out: Path,
    *,
    family: Family | None = None,
    builds: Path | None = None,
    progress: bool = True,
) -> list[ReleaseResult]:
    """Build and evaluate every candidate; write ``frontier.json`` and ``frontier.png`` to
    ``out``.  ``builds`` keeps the candidate releases between runs (default ``out/builds``):
    a release already built there with the same settings is evaluated again, not rebuilt, so
    more attacks or methods can be run on a finished study's releases."""
    from mergeshield.evaluation.zoo import build_family

    family = family or build_family("text", "small", progress=progress)
    out = Path(out)
    builds = Path(builds or out / "builds")
    folders = [builds / cand.name.replace("/", "_") for cand in candidates]  # flat, one each
    for cand, folder in zip(candidates, folders, strict=True):  # refused before any work
        check_build_folder(folder, build_settings(cand, family, plan))
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for cand, folder in zip(candidates, folders, strict=True):
        released = build_candidate(cand, family, plan, folder, progress=progress)
        res = evaluate_release(family, released, plan, name=cand.name, progress=progress)
        results.append(res)
        write_frontier(results, plan, family, out)
    return results


def write_frontier(
    results: Sequence[ReleaseResult], plan: FrontierPlan, family: Family, out: Path
) -> None:
    data = {
        "plan": asdict(plan),
        "victim": plan.victim,
        "base_accuracy": family.base_accuracy[plan.victim],
        "finetuned_accuracy": family.finetuned_accuracy[plan.victim],
        "target": {"max_cost": TARGET_COST, "max_kept": TARGET_KEPT},
        "summary": [r.summary() for r in results],
        "details": [
            {
                "name": r.name,
                "standalone": r.standalone,
                "rows": [asdict(x) for x in r.rows],
                "best": {m: asdict(x) for m, x in r.best.items()},
                "finetune": r.finetune,
                "seconds": r.seconds,
            }
            for r in results
        ],
    }
    (out / "frontier.json").write_text(json.dumps(data, indent=1))
    plot_frontier(results, plan, family, out / "frontier.png")
    (out / "frontier.md").write_text(frontier_markdown(results, plan, family))


PERTURBATIONS = {"prune": 0.2, "noise": 0.1}  # defaults of the post-alignment perturbations


def parse_attack(text: str) -> tuple[str, dict[str, float]]:
    """``none``, an alignment attack (``aga``), or one followed by a perturbation of the aligned
    update (:func:`mergeshield.attacks.adaptive.perturb_then_align`): ``aga+prune`` (each
    tensor's 20% smallest update entries zeroed), ``aga+noise`` (Gaussian noise of 10% relative
    size), ``aga+prune=0.5+noise=0.05``.  Returns ``(attack, {"prune": f, "noise": f})``."""
    from mergeshield.attacks import ATTACKS

    align, *extras = text.split("+")
    if align != "none" and align not in ATTACKS:
        raise MergeShieldError(f"unknown attack {align!r}; known: none, {', '.join(ATTACKS)}")
    perturb: dict[str, float] = {}
    for extra in extras:
        key, _, value = extra.partition("=")
        if key not in PERTURBATIONS or align == "none":
            raise MergeShieldError(
                f"attack {text!r}: after an alignment attack, add +prune or +noise (=fraction)"
            )
        try:
            perturb[key] = float(value) if value else PERTURBATIONS[key]
        except ValueError:
            raise MergeShieldError(f"attack {text!r}: {value!r} is not a number") from None
        if not 0 <= perturb[key] < 1:
            raise MergeShieldError(f"attack {text!r}: {key} must lie in [0, 1)")
    return align, perturb


def parse_candidate(text: str) -> Candidate:
    """``unprotected``, a defense (``mergelock``), a harden method (``trap2+merge``) or both
    (``trap2+merge/mergelock``: harden, then protect)."""
    from mergeshield.defenses import DEFENSES
    from mergeshield.hardening.config import parse_method

    if text == "unprotected":
        return Candidate(text)
    harden, _, defense = text.partition("/")
    if not defense and harden in DEFENSES:
        return Candidate(text, defense=harden)
    parse_method(harden)
    if defense and defense not in DEFENSES:
        raise MergeShieldError(f"unknown defense {defense!r} in candidate {text!r}")
    return Candidate(text, harden=harden, defense=defense or None)


def frontier_markdown(results: Sequence[ReleaseResult], plan: FrontierPlan, family: Family) -> str:
    """The frontier table: standalone cost and what the best attack keeps, per merge method."""
    v = plan.victim
    lines = [
        f"# mergeshield frontier: victim `{v}`",
        "",
        f"Family: {family.kind} ({family.setting}); base backbone + victim head "
        f"{family.base_accuracy[v]:.3f}, fine-tuned {family.finetuned_accuracy[v]:.3f}. "
        f"Free-riders: {', '.join(plan.free_riders)}; proxies for the merge-aware term: "
        f"{', '.join(plan.proxies) or 'none'}.",
        "",
        f"Attacker per method: the best (on validation data) of {{{', '.join(plan.attacks)}}} x "
        "{coefficient sweep, coefficient-1 insertion (task-vector methods)}; test accuracy of "
        "that choice"
        + (" re-merged by mergekit." if plan.verify_mergekit else " (in-memory merge).")
        + " Sweep grids: "
        + "; ".join(f"{m} {list(plan.grid(m))}" for m in plan.methods)
        + f"; insertion weights {list(plan.insertion_grid)}.",
        f"The attacker's objective: `{plan.objective}` (a free-rider wants one merged model "
        "that keeps every merged task). "
        f"Target: cost <= {100 * TARGET_COST:.1f} points and at most {TARGET_KEPT:.0%} of the "
        "weakest merged task's gain kept, for every method.",
        "",
        "Per candidate: the method whose best attacked merge keeps the most of the weakest "
        "merged task's gain, and whether the target is met.",
        "",
        "| candidate | standalone (cost) | worst method: weakest kept (attack) | meets target |",
        "|---|---|---|---|",
    ]
    summaries = [r.summary() for r in results]
    for r, s in zip(results, summaries, strict=True):
        worst = max(r.best, key=lambda m: s[m]["weakest"], default=None)
        cell = f"{worst} {s[worst]['weakest']:.0%} ({s[worst]['attack']})" if worst else "-"
        lines.append(
            f"| {r.name} | {r.standalone:.3f} ({100 * s['cost']:+.1f} pt) | {cell} | "
            + ("yes" if s["meets_target"] else "**no**")
            + " |"
        )
    lines += [
        "",
        "Per candidate and method, the attacker's best merge with one free-rider and, marked "
        "`all tasks`, with every free-rider at once: victim accuracy (share of its gain kept); "
        "each free-rider's accuracy in the same merge (share of *its* gain kept); the weakest "
        "share; the attack (`variant/search@coefficient`).",
        "",
        "| candidate | method | victim (kept) | free-riders (kept) | weakest | attack |",
        "|---|---|---|---|---|---|",
    ]
    for r, s in zip(results, summaries, strict=True):
        for m in r.best:
            c = s[m]
            riders = ", ".join(
                f"{p} {a:.3f} ({c['partner_kept'][p]:.0%})" for p, a in c["partners"].items()
            )
            lines.append(
                f"| {r.name} | {m} | {c['victim']:.3f} ({c['kept']:.0%}) | {riders} | "
                f"{c['weakest']:.0%} | {c['attack']} |"
            )
    tuned = [r for r in results if r.finetune]
    if tuned:
        lines += [
            "",
            "Short fine-tune attack on victim training examples, from the best task-arithmetic "
            "merge and from the same merge without the victim (test scores after each step "
            "block, victim / free-rider):",
            "",
        ]
        for r in tuned:
            ft = r.finetune
            starts = [k for k in ft if k not in ("examples", "steps")]
            lines.append(
                f"- {r.name}: {ft['examples']} examples, {ft['steps']} steps: "
                + "; ".join(
                    f"{k} " + ", ".join(f"@{s} {v:.3f} / {p:.3f}" for s, v, p in ft[k])
                    for k in starts
                )
            )
    lines += ["", "![frontier](frontier.png)", ""]
    return "\n".join(lines)


def plot_frontier(
    results: Sequence[ReleaseResult], plan: FrontierPlan, family: Family, path: Path
) -> None:
    """x: standalone accuracy cost (points); y: the weakest merged task's share of gain kept
    after the best attack; one marker per candidate, method and merge kind (all-task: faint,
    ``*``), the target box shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = dict(zip(plan.methods, "os^vD<>pP*h", strict=False))
    for r in results:
        cost = 100 * (r.finetuned - r.standalone)
        summary = r.summary()
        for m, best in r.best.items():
            y = summary[m]["weakest"]
            all_tasks = len(best.partners) > 1
            ax.scatter(cost, y, marker=markers.get(best.method, "x"), alpha=0.5 if all_tasks else 1)
            ax.annotate(f"{r.name} ({m[:4]}{'*' if all_tasks else ''})", (cost, y), fontsize=7)
    ax.axvspan(-100, 100 * TARGET_COST, ymax=1, alpha=0.05, color="g")
    ax.axhline(TARGET_KEPT, color="g", ls="--", lw=1, label=f"target weakest <= {TARGET_KEPT:.0%}")
    ax.axvline(100 * TARGET_COST, color="g", ls=":", lw=1, label="target cost <= 0.5 pt")
    ax.set_xlabel("standalone accuracy cost (points below the fine-tune)")
    ax.set_ylabel("weakest merged task's gain kept, best attack")
    ax.set_title("protection frontier (lower left is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
