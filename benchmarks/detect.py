"""Detection study (issue 18): true-positive rate over models that contain the victim, false-
positive rate over models that do not, and run time against one mergekit merge.

    python benchmarks/detect.py [--kind text|image|llm] [--setting small] [--seeds 6]

The family comes from :func:`mergeshield.evaluation.zoo.build_family`; the victim is its first
task.  Same-task hard negatives are fine-tunes of the victim's task with other seeds and other
data splits (the zoo's own fine-tune, ``seed`` changed), cached under
``<cache>/detect-bench/<family>/``.

Positives (every one contains the victim's backbone):
- every method of ``merging/methods.py`` at every coefficient of 0.2-1.0 (model_stock: its
  own), two-model (victim + one other task; slerp: ``slerp(other, victim; t)``, so ``t`` is the
  victim's weight) and all-task;
- the release protected with ``all``, aligned with aga / procrustes / rebasin, then merged
  (task arithmetic 0.6 two-model, TIES 1.0 all-task); aligned then pruned (50%) or noised
  (0.5), then merged; the protected release merged as published (task arithmetic 0.6), which
  only the ``key`` view can see;
- a task-arithmetic all-task merge (0.6) fine-tuned for 50 steps on another task's data (the
  free-rider's) and on the victim's data.

Null models: calibration (``--null``): same-task seeds 1-3 and two other tasks; evaluation:
same-task seeds 4+, the remaining other task, every method's merges without the victim
(coefficients 0.4 and 1.0, with a same-task seed inside, two-model and all-task) and a
fine-tuned merge without the victim.  Two modes: with the calibration null models, and
without null models (sign-flip null + effect floor).  Results go to
``<cache>/detect-bench/<family>/results.json`` and are printed as markdown.

``--kind llm`` (SmolLM2-135M, victim antonym, others arithmetic and bbc_topic): the same study
(no head: the task models are the backbones, and a fine-tuned merge is the zoo's own fine-tune,
one epoch); calibration: same-task seeds 1-3 and arithmetic; nulls: same-task seeds 4+,
bbc_topic, the merges without the victim and merges of the two other experts.  ``--discard``
deletes each merge once scored (a SmolLM2 merge takes 540 MB: the study's hundred do not fit).

``--many-nulls N`` / ``--short-nulls M`` (with ``--discard`` to delete each once scored): only
the false-positive study over ``N`` (victim's recipe) and ``M`` (one epoch) independent null
fine-tunes (:func:`null_specs`, :func:`many_nulls`), each with its own test accuracy;
``--shard I/N`` splits them over ``N`` processes (rows in ``many-nulls-shardI.jsonl``; any
``many-nulls*.jsonl`` in the study's folder counts as done, so rows kept elsewhere resume a run).

``--key``: every positive and null model (``--many-nulls`` too) is also scored with the key of
the study's protected release, what its owner runs; rows under ``"key"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from mergeshield.attacks import attack
from mergeshield.attacks.adaptive import finetune_recovery, perturb_then_align
from mergeshield.detect import detect, detect_all
from mergeshield.evaluation import zoo
from mergeshield.evaluation.accuracy import accuracy
from mergeshield.evaluation.generative import exact_match, load_gen_task
from mergeshield.folders import atomic_dir, load_tensors, save_tensors
from mergeshield.merging import METHODS, backbone_prefix, extract_backbone, merge
from mergeshield.modeling import load_causal_lm, load_classifier
from mergeshield.protect import protect
from mergeshield.tasks import load_task

COEFFICIENTS = (0.2, 0.4, 0.6, 0.8, 1.0)
CALIBRATION_SEEDS = (1, 2, 3)
BATCH = 12  # suspects scored per streaming pass
Model = Path | Callable[[], Path]  # a folder, or a merge built when it is scored


def cached(path: Path, build) -> Path:
    """``build(tmp)`` into ``path`` once (atomic)."""
    if not path.is_dir():
        with atomic_dir(path) as tmp:
            build(tmp)
    return path


def task_data(family: zoo.Family, task: str, seed: int, n_train: int | None = None):
    """``task``'s balanced split drawn with ``seed`` at the family's sizes (``n_train``:
    instead of the family's; a generative task for the llm family)."""
    settings = zoo.SETTINGS[(family.kind, family.setting)]
    sizes = (n_train or settings.n_train, settings.n_val, settings.n_test, seed)
    if family.kind == "llm":
        return load_gen_task(task, *sizes)
    return load_task(task, *sizes, settings.image_size)


def same_task_model(
    family: zoo.Family, task: str, seed: int, out: Path, epochs: int | None = None, **recipe
) -> Path:
    """The zoo's fine-tune of ``task`` with another seed and another balanced data split
    (``epochs`` and ``recipe``, e.g. ``n_train`` or ``batch_size``: instead of the zoo's).
    ``family.base`` is where it starts (a merge, for the llm family's fine-tuned merges)."""
    settings = dataclasses.replace(zoo.SETTINGS[(family.kind, family.setting)], seed=seed)
    if epochs is not None:
        settings = dataclasses.replace(settings, epochs=epochs)
    settings = dataclasses.replace(settings, **recipe)

    def build(tmp: Path) -> None:
        data = task_data(family, task, seed, settings.n_train)
        zoo._finetune(family, data, settings, tmp, lambda label, total: lambda: None)

    return cached(out, build)


def own_accuracy(family: zoo.Family, task: str, seed: int, model: Path, split: str) -> float:
    """Accuracy (llm: exact match) of a fine-tune on the ``split`` ("val" or "test") of its own
    ``seed``, held out from its training data: does a short null fine-tune learn its task?"""
    settings = zoo.SETTINGS[(family.kind, family.setting)]
    data = zoo.encode_split(family, task_data(family, task, seed), split, settings)
    if family.kind == "llm":
        return exact_match(load_causal_lm(model), data)
    return accuracy(load_classifier(model, family.kind), data)


def backbone(task_model: Path, base: Path, out: Path) -> Path:
    if not out.is_dir():
        extract_backbone(task_model, base, out)
    return out


def merged(work: Path, name: str, method: str, base: Path, models: list[Path], c: float) -> Path:
    out = work / "merges" / name
    if not out.is_dir():
        merge(method, base, models, out, coefficient=c)
    return out


def later(work: Path, name: str, method: str, base: Path, models: list[Path], c: float) -> Model:
    """:func:`merged`, built only when :func:`score` gets to it (and deleted after with
    ``discard``)."""
    return lambda: merged(work, name, method, base, models, c)


def materialise(model: Model) -> Path:
    return model() if callable(model) else model


def finetuned(
    family: zoo.Family, merged_backbone: Model, task: str, out: Path, steps: int = 50
) -> Path:
    """``merged_backbone`` with ``task``'s head, fine-tuned ``steps`` steps on ``task``'s
    training data (:func:`finetune_recovery`); its backbone is written to ``out``.  The model
    is loaded from a folder (backbone + head under the task model's names), so transformers'
    own name conversion applies (ViT's in-memory names differ from its stored ones).  The llm
    family has no head: the merge gets the zoo's own fine-tune (its trained layers, one
    epoch of ``task``; ``steps`` is not used).  The merge is built only when ``out`` is not
    cached yet."""
    if out.is_dir():
        return out
    merged_backbone = materialise(merged_backbone)
    if family.kind == "llm":
        return same_task_model(dataclasses.replace(family, base=merged_backbone), task, 0, out, 1)
    import torch
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    def build(tmp: Path) -> None:
        settings = zoo.SETTINGS[(family.kind, family.setting)]
        auto = (
            AutoModelForSequenceClassification
            if family.kind == "text"
            else AutoModelForImageClassification
        )
        head = load_tensors(family.tasks[task])
        weights = load_tensors(merged_backbone)
        prefix = backbone_prefix(list(head), list(weights))
        task_folder = tmp / "task"
        task_folder.mkdir()
        save_tensors(head | {prefix + k: v for k, v in weights.items()}, task_folder)
        shutil.copy2(family.tasks[task] / "config.json", task_folder / "config.json")
        with zoo.quiet_transformers():
            model = auto.from_pretrained(task_folder)
        data = load_task(
            task, settings.n_train, settings.n_val, settings.n_test, 0, settings.image_size
        )
        train = zoo.encode_split(family, data, "train", settings)
        torch.manual_seed(0)
        finetune_recovery(
            model,
            model.base_model.state_dict(),
            train,
            n_examples=len(train["labels"]),
            steps=steps,
            evaluate=lambda m: 0.0,
        )
        with zoo.quiet_transformers():
            model.save_pretrained(tmp / "tuned")
        extract_backbone(tmp / "tuned", family.base, tmp / "backbone")
        for item in (tmp / "backbone").iterdir():
            item.rename(tmp / item.name)
        for folder in ("task", "tuned", "backbone"):
            shutil.rmtree(tmp / folder)

    return cached(out, build)


def null_specs(
    family: zoo.Family, n: int, first_seed: int = 100, epochs: int | None = None, **recipe
) -> list[tuple[str, str, int, dict]]:
    """``(name, task, seed, recipe)`` of ``n`` independent fine-tunes of the base that do not
    contain the victim, for the false-positive rate: two of every three fine-tune the victim's
    own task (the hard negatives: other seed, other balanced data split, the victim's recipe,
    or with ``epochs`` / ``recipe`` (``n_train``, ``batch_size``) a shorter one), the third
    cycles through the other tasks.  Seeds ``first_seed, first_seed + 1, ...`` (none shared
    with the calibration models); each is an independent run of the zoo's fine-tune, so the
    rule of three applies: 0 false positives in ``n`` bounds the FPR below ``3 / n`` (95%)."""
    tasks = list(family.tasks)
    victim, others = tasks[0], tasks[1:]
    recipe = {k: v for k, v in recipe.items() if v is not None}
    if epochs is not None:
        recipe = {"epochs": epochs} | recipe
    suffix = "".join(f"-{k.replace('_', '')}{v}" for k, v in recipe.items())
    specs = []
    for i in range(n):
        seed = first_seed + i
        task = victim if i % 3 != 2 else others[(i // 3) % len(others)]
        specs.append((f"{task}-seed{seed}{suffix}", task, seed, recipe))
    return specs


def many_nulls(
    family: zoo.Family,
    models: dict,
    work: Path,
    specs: list,
    discard: bool,
    shard: str = "",
    key: Path | None = None,
) -> dict[str, dict]:
    """Build, score (:func:`score`, against the calibration null models) and, with
    ``discard``, delete the null fine-tunes of ``specs``, :data:`BATCH` at a time (a MiniLM
    fine-tune and its backbone take 180 MB: hundreds do not fit on disk).  Each row, with the
    fine-tune's accuracy on its own validation split and its build time, is appended to
    ``work/many-nulls.jsonl`` (``many-nulls-shard<shard>.jsonl`` for one of several processes)
    as its batch is scored; a rerun skips the names already in any of these files.  ``key``:
    each is also scored with the owner's key (:func:`score`'s ``also_key``)."""
    log = work / f"many-nulls{'-shard' + shard if shard else ''}.jsonl"
    rows = {}
    for old in sorted(work.glob("many-nulls*.jsonl")):
        rows |= {r["name"]: r for r in map(json.loads, old.read_text().splitlines())}
    todo = [spec for spec in specs if spec[0] not in rows]
    start = time.perf_counter()
    for i in range(0, len(todo), BATCH):
        built = {}
        for name, task, seed, recipe in todo[i : i + BATCH]:
            t = time.perf_counter()
            model = same_task_model(family, task, seed, work / "many" / name, **recipe)
            info = {"name": name, "task": task, "seed": seed, "recipe": recipe}
            info["accuracy"] = round(own_accuracy(family, task, seed, model, "val"), 4)
            bb = backbone(model, family.base, work / "bb-many" / name)
            info["build_seconds"] = round(time.perf_counter() - t, 1)
            built[name] = (bb, info)
        suspects = {name: bb for name, (bb, _) in built.items()}
        scored = score(models, family.base, suspects, also_key=key)
        with log.open("a") as f:
            for name, (bb, info) in built.items():
                rows[name] = info | scored[name]
                f.write(json.dumps(rows[name]) + "\n")
                if discard:
                    shutil.rmtree(work / "many" / name)
                    shutil.rmtree(bb)
        done = i + len(built)
        took = time.perf_counter() - start
        print(f"  null fine-tunes {done}/{len(todo)} built and scored in {took:.0f} s", flush=True)
    return {spec[0]: rows[spec[0]] for spec in specs}


def knob_grid(method: str) -> tuple[float, ...]:
    return (1.0,) if METHODS[method].knob is None else COEFFICIENTS


def full_grid() -> list[tuple[str, str, float]]:
    """``(method, mode, coefficient)``: every method at every coefficient of
    :data:`COEFFICIENTS` (model_stock: its own), two-model and, where the method takes more
    models, all-task."""
    return [
        (method, mode, c)
        for method, spec in METHODS.items()
        for c in knob_grid(method)
        for mode in (("two", "all") if spec.max_models is None else ("two",))
    ]


def grid_merges(
    work: Path, prefix: str, base: Path, grid, first: Path, partner: Path, rest: list[Path]
) -> dict[str, Model]:
    """mergekit merges ``prefix + method-mode-c`` of ``grid``, built when scored: two-model
    ``[first, partner]`` (slerp: ``slerp(partner, first; t)``, so ``t`` is ``first``'s weight),
    all-task ``[first, *rest]``."""
    out = {}
    for method, mode, c in grid:
        if mode == "two":
            models = [partner, first] if method == "slerp" else [first, partner]
        else:
            models = [first, *rest]
        name = f"{prefix}{method}-{mode}-{c:g}"
        out[name] = later(work, name, method, base, models, c)
    return out


def build_models(
    family: zoo.Family, work: Path, n_seeds: int, calibration_only: bool = False
) -> dict:
    """Every model of the study: ``{"positives": {name: model}, "key_positives": ...,
    "calibration": [...], "nulls": {name: model}}`` (a model: a folder, or a merge that
    :func:`score` builds).  The llm family (no head: its task models are the backbones) has
    one other expert among the calibration null models (it has two) and its two other experts'
    merges among the nulls.  With
    ``calibration_only`` (the false-positive study of :func:`many_nulls`): only
    ``{"original", "calibration"}``, without the merges and attacks."""
    base = family.base
    llm = family.kind == "llm"
    tasks = list(family.tasks)
    victim, others = tasks[0], tasks[1:]

    def bb_of(model: Path, name: str) -> Path:
        return model if llm else backbone(model, base, work / "bb" / name)

    bb = {t: bb_of(family.tasks[t], t) for t in tasks}
    seeds = {}
    for seed in CALIBRATION_SEEDS if calibration_only else range(1, n_seeds + 1):
        model = same_task_model(family, victim, seed, work / "same" / f"{victim}-seed{seed}")
        seeds[seed] = bb_of(model, f"{victim}-seed{seed}")
    v, o1 = bb[victim], bb[others[0]]
    rest = [bb[t] for t in others]
    in_calibration = 1 if llm else 2  # other tasks among the calibration null models
    calibration = [seeds[s] for s in CALIBRATION_SEEDS] + rest[:in_calibration]
    key = work / "protected.key"
    if calibration_only:
        found = key if key.is_file() else None
        return {"original": family.tasks[victim], "calibration": calibration, "key": found}

    positives = grid_merges(work, "", base, full_grid(), v, o1, rest)

    prot = work / "protected"
    if not prot.is_dir():
        protect(family.tasks[victim], prot, "all", base=base, key_out=key, seed=1)
    for method in ("aga", "procrustes", "rebasin"):
        aligned = work / f"aligned-{method}"
        if not aligned.is_dir():
            attack(prot, base, aligned, method)
        a = bb_of(aligned, f"aligned-{method}")
        positives[f"{method}-aligned-ta-two-0.6"] = later(
            work, f"{method}-ta", "task_arithmetic", base, [a, o1], 0.6
        )
        positives[f"{method}-aligned-ties-all-1"] = later(
            work, f"{method}-ties", "ties", base, [a, *rest], 1.0
        )
    for kind, kw in (("pruned", {"prune": 0.5}), ("noised", {"noise": 0.5})):
        p = work / f"aga-{kind}"
        if not p.is_dir():
            perturb_then_align(prot, base, p, attack="aga", **kw)
        pb = bb_of(p, f"aga-{kind}")
        positives[f"aga-{kind}-ta-two-0.6"] = later(
            work, f"aga-{kind}-ta", "task_arithmetic", base, [pb, o1], 0.6
        )
    ta_all = positives["task_arithmetic-all-0.6"]
    for task, name in ((others[0], "other"), (victim, "victim")):
        positives[f"ta-all-0.6-finetuned-{name}-task"] = finetuned(
            family, ta_all, task, work / "merges" / f"ft-{name}"
        )
    pb = bb_of(prot, "protected")
    key_positives = {
        "protected-as-published-ta-two-0.6": later(
            work, "protected-ta", "task_arithmetic", base, [pb, o1], 0.6
        ),
        "protected-as-published-ties-all-1": later(
            work, "protected-ties", "ties", base, [pb, *rest], 1.0
        ),
    }

    nulls: dict[str, Model] = {f"same-task-seed{s}": seeds[s] for s in seeds if s > 3}
    nulls.update({f"task-{t}": bb[t] for t in others[in_calibration:]})
    hard = [seeds[s] for s in seeds if s > 3] or [seeds[1]]
    if llm:
        experts = [("task_arithmetic", "two", 1.0), ("ties", "two", 1.0)]
        nulls |= grid_merges(work, "null-experts-", base, experts, rest[1], o1, rest)
    for method, spec in METHODS.items():
        for c in (0.4, 1.0) if spec.knob is not None else (1.0,):
            modes = {"two": [hard[0], o1]}
            if spec.max_models is None:
                modes["all"] = [hard[-1], *rest]
            for mode, models in modes.items():
                name = f"null-{method}-{mode}-{c:g}"
                nulls[name] = later(work, name, method, base, models, c)
    nulls["null-ta-all-1-finetuned"] = finetuned(
        family, nulls["null-task_arithmetic-all-1"], others[0], work / "merges" / "ft-null"
    )
    return {
        "victim": bb[victim],
        "partner": o1,
        "backbones": [bb[t] for t in tasks],
        "original": family.tasks[victim],
        "key": key,
        "positives": positives,
        "key_positives": key_positives,
        "calibration": calibration,
        "nulls": nulls,
    }


def score(
    models: dict,
    base: Path,
    names: dict[str, Model],
    discard: bool = False,
    key: Path | None = None,
    also_key: Path | None = None,
) -> dict[str, dict]:
    """detect_all with the calibration null models, in batches; both verdicts from one pass:
    ``{name: {with, without, statistic, p_null, p_flip, effect, view}}`` (``with``: the
    verdict with the null models, ``without``: the sign-flip null, the effect floor and the
    shape floor); ``key``: detect with ``--key``.  ``also_key``: a second pass with that key
    on the same models, its row under ``"key"`` (what an owner who protected the release
    runs).  Merges not built yet are built batch by batch and, with ``discard``, deleted once
    scored."""
    out = {}
    items = list(names.items())
    for i in range(0, len(items), BATCH):
        part = items[i : i + BATCH]
        paths = [materialise(m) for _, m in part]
        results = detect_all(paths, models["original"], base, null=models["calibration"], key=key)
        keyed = (
            detect_all(paths, models["original"], base, null=models["calibration"], key=also_key)
            if also_key is not None
            else None
        )
        for (_, m), path in zip(part, paths, strict=True):
            if discard and callable(m):
                shutil.rmtree(path)
        for j, (name, _) in enumerate(part):
            out[name] = _row(results[j])
            if keyed is not None:
                out[name]["key"] = _row(keyed[j])
        print(f"  scored {i + len(part)}/{len(items)} in {results[0].seconds:.0f} s", flush=True)
    return out


def _row(r) -> dict:
    """One suspect's verdicts and statistics, as the study keeps them."""
    return {
        "with": r.found,
        "without": r.found_without_nulls,
        "statistic": round(r.statistic, 2),
        "p_null": r.p_null,
        "p_flip": r.p_flip,
        "effect": round(r.effect, 3),
        "shape": round(r.shape, 3),
        "view": max(r.views, key=r.views.get),
        "null_statistics": [round(z, 2) for z in r.null_statistics],
        "signed": round(max(r.scores.signed.values()), 2),
        "signed_nulls": [round(max(n.signed.values()), 2) for n in r.null_scores],
    }


def explain(models: dict, base: Path, path: Path) -> dict[str, dict]:
    """Why a positive is missed: per matrix, the victim's least-squares weight ``w`` in the
    suspect's task vector (fitted on every task's task vector together: ``x - b ~ sum_j w_j
    (theta_j - b)``) next to the matrix's ``z`` (raw view).  ``Z`` sums ``z`` with signs, so
    it cancels where ``w`` changes sign across matrices."""
    import torch

    (result,) = detect_all([path], models["original"], base)
    b, x = load_tensors(base), load_tensors(path)
    tasks = [load_tensors(t) for t in models["backbones"]]
    rows = {}
    for name, z in result.scores.z["raw"].items():
        if name not in x or name not in b or b[name].dim() != 2:
            continue
        cols = torch.stack([(t[name] - b[name]).double().reshape(-1) for t in tasks], 1)
        target = (x[name] - b[name]).double().reshape(-1, 1)
        w = float(torch.linalg.lstsq(cols, target).solution[0, 0])
        rows[name] = {"weight": round(w, 4), "z": round(z, 2)}
    return rows


def timing(models: dict, family: zoo.Family, work: Path, runs: int) -> dict:
    """Median seconds of one mergekit merge (task arithmetic, victim + one other task) and of
    ``detect`` on it (no null models; with the calibration null models), interleaved."""
    base, o1 = family.base, models["partner"]
    merge_s, detect_s, detect_null_s, raw_s = [], [], [], []
    for _ in range(runs):
        out = work / "timing-merge"
        t = time.perf_counter()
        merge("task_arithmetic", base, [models["victim"], o1], out, coefficient=0.6)
        merge_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        detect(out, models["original"], base)
        detect_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        detect(out, models["original"], base, null=models["calibration"])  # 5 null models
        detect_null_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        detect(out, models["original"], base, attack=None)  # raw view only
        raw_s.append(time.perf_counter() - t)
        shutil.rmtree(out)
    return {
        "merge_s": statistics.median(merge_s),
        "detect_s": statistics.median(detect_s),
        "detect_with_nulls_s": statistics.median(detect_null_s),
        "detect_without_alignment_s": statistics.median(raw_s),
        "runs": runs,
        "all": {
            "merge": merge_s,
            "detect": detect_s,
            "detect_with_nulls": detect_null_s,
            "detect_without_alignment": raw_s,
        },
    }


KEYS = (
    "positives",
    "nulls",
    "key positives, with --key",
    "key positives, without --key",
)


def rate(rows: dict[str, dict], mode: str, want: bool) -> str:
    hits = sum(r[mode] == want for r in rows.values())
    return f"{hits}/{len(rows)} ({100 * hits / max(len(rows), 1):.1f}%)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="text")
    parser.add_argument("--setting", default="small")
    parser.add_argument("--seeds", type=int, default=6, help="same-task fine-tunes to build")
    parser.add_argument("--runs", type=int, default=3, help="timing repetitions")
    parser.add_argument("--timing-only", action="store_true", help="skip the TPR/FPR study")
    parser.add_argument(
        "--many-nulls",
        type=int,
        default=0,
        help="only the false-positive study: build this many independent null fine-tunes "
        "(many_nulls) and score them against the calibration null models",
    )
    parser.add_argument(
        "--short-nulls",
        type=int,
        default=0,
        help="only the false-positive study: this many more null fine-tunes, one epoch "
        "(seeds from 1000)",
    )
    parser.add_argument(
        "--short-train", type=int, help="with --short-nulls: training examples (default: zoo's)"
    )
    parser.add_argument(
        "--short-batch", type=int, help="with --short-nulls: batch size (default: zoo's)"
    )
    parser.add_argument(
        "--discard",
        action="store_true",
        help="delete each merge (with --many-nulls / --short-nulls: each null fine-tune) once "
        "scored",
    )
    parser.add_argument(
        "--shard",
        help="with --many-nulls / --short-nulls: I/N builds and scores only every N-th null "
        "fine-tune from the I-th (0-based), so that N processes share the work; a run without "
        "it then summarises the rows they wrote",
    )
    parser.add_argument(
        "--key",
        action="store_true",
        help="also score every positive and null model with the owner's key (detect --key, "
        "what an owner who protected the release runs; the key of the study's protected "
        "release, which --many-nulls needs the whole study to have built)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for everything, mergekit included (1: on this shared 2-core VM two "
        "threads spin against other processes; measured 3.7 s vs 17 s for one detect)",
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    family = zoo.build_family(args.kind, args.setting, progress=False)
    work = zoo.default_cache_dir() / "detect-bench" / family.root.name
    start = time.perf_counter()
    only_nulls = bool(args.many_nulls or args.short_nulls) and not args.timing_only
    models = build_models(family, work, args.seeds, calibration_only=only_nulls)
    print(f"models built in {time.perf_counter() - start:.0f} s", flush=True)

    results: dict = {
        "command": f"python benchmarks/detect.py --kind {args.kind} --setting {args.setting} "
        f"--seeds {args.seeds} --runs {args.runs} --threads {args.threads}",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({platform.machine()}, 2-core VM)",
        "family": str(family.root),
    }
    results["command"] += " --discard" if args.discard else ""
    base = family.base
    if args.timing_only:
        print(json.dumps(timing(models, family, work, args.runs), indent=2))
        return
    key = models["key"] if args.key else None
    if args.key and (key is None or not key.is_file()):
        raise SystemExit("--key: the study's protected release is not built: run it without "
                         "--many-nulls / --short-nulls first")  # fmt: skip
    results["command"] += " --key" if args.key else ""
    if only_nulls:
        victim = list(family.tasks)[0]
        specs = null_specs(family, args.many_nulls)
        short = {"n_train": args.short_train, "batch_size": args.short_batch}
        specs += null_specs(family, args.short_nulls, first_seed=1000, epochs=1, **short)
        if args.shard:
            index, count = map(int, args.shard.split("/"))
            part = specs[index::count]
            many_nulls(family, models, work, part, args.discard, str(index), key)
            return
        rows = many_nulls(family, models, work, specs, args.discard, key=key)
        results["command"] += f" --many-nulls {args.many_nulls} --short-nulls {args.short_nulls}"
        for flag, value in (("train", args.short_train), ("batch", args.short_batch)):
            results["command"] += f" --short-{flag} {value}" if value else ""
        results["build_and_score_seconds"] = round(sum(r["build_seconds"] for r in rows.values()))
        results["calibration_accuracy"] = {
            f"{victim}-seed{s}": own_accuracy(
                family, victim, s, work / "same" / f"{victim}-seed{s}", "val"
            )
            for s in CALIBRATION_SEEDS
        }
        results["many_nulls"] = rows
        (work / "results-many-nulls.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"\n{results['command']}  ({results['date']}, {results['machine']})")
        groups = {
            "all": rows,
            "same task": {k: v for k, v in rows.items() if k.startswith(victim + "-")},
            "other tasks": {k: v for k, v in rows.items() if not k.startswith(victim + "-")},
            "short recipe": {k: v for k, v in rows.items() if "-epochs" in k},
            "same task, short recipe": {
                k: v for k, v in rows.items() if k.startswith(victim + "-") and "-epochs" in k
            },
        }
        for group, part in groups.items():
            if not part:
                continue
            top = max(part.values(), key=lambda v: v["statistic"])
            cells = [f"{mode} null models {rate(part, mode, True)}" for mode in ("with", "without")]
            keyed = {k: v["key"] for k, v in part.items() if "key" in v}
            if keyed:
                cells += [
                    f"--key, {m} null models {rate(keyed, m, True)}" for m in ("with", "without")
                ]
            worst = f"{top['statistic']} (effect {top['effect']}, p_null {top['p_null']:.2g})"
            acc = sorted(v["accuracy"] for v in part.values())
            low = sum(v["p_null"] < 0.05 for v in part.values())
            print(
                f"FPR, {group}: " + ", ".join(cells) + f"; largest statistic {worst}; "
                f"p_null < 0.05: {low}; own val accuracy median {statistics.median(acc):.3f} "
                f"(min {acc[0]:.3f}, max {acc[-1]:.3f})"
            )
        print(f"calibration same-task val accuracy: {results['calibration_accuracy']}")
        print(f"built and scored in {results['build_and_score_seconds']} s (sum over rows)")
        return
    results["positives"] = score(models, base, models["positives"], args.discard, also_key=key)
    results["nulls"] = score(models, base, models["nulls"], args.discard, also_key=key)
    results["key positives, with --key"] = score(
        models, base, models["key_positives"], key=models["key"]
    )
    keyless = score(models, base, models["key_positives"], args.discard)
    results["key positives, without --key"] = keyless
    results["timing"] = timing(models, family, work, args.runs)
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    print(f"\n{results['command']}  ({results['date']}, {results['machine']})\n")
    print("| mode | TPR: merges, aligned, pruned/noised, fine-tuned | protected as published,"
          " --key | same, no key | FPR: null models |")  # fmt: skip
    print("|---|---|---|---|---|")
    for mode, label in (("with", "with null models"), ("without", "without null models")):
        rows = [results[k] for k in KEYS]
        cells = [rate(rows[0], mode, True), rate(rows[2], mode, True)]
        cells += [rate(rows[3], mode, True), rate(rows[1], mode, False)]
        print(f"| {label} | " + " | ".join(cells) + " |")
        missed = {k: v["statistic"] for k, v in rows[0].items() if not v[mode]}
        false = {k: v["statistic"] for k, v in rows[1].items() if v[mode]}
        print(f"\n{label}: missed {missed}; false positives {false}\n")
    if key is not None:
        print("| mode, with --key | TPR | FPR: null models |\n|---|---|---|")
        for mode, label in (("with", "with null models"), ("without", "without null models")):
            pos = {k: v["key"] for k, v in results["positives"].items()}
            neg = {k: v["key"] for k, v in results["nulls"].items()}
            print(f"| {label} | {rate(pos, mode, True)} | {rate(neg, mode, False)} |")
            missed = {k: v["statistic"] for k, v in pos.items() if not v[mode]}
            false = {k: v["statistic"] for k, v in neg.items() if v[mode]}
            print(f"\n{label}, --key: missed {missed}; false positives {false}\n")
    missed = [k for k, v in results["positives"].items() if not (v["with"] and v["without"])]
    results["explain"] = {}
    for k in missed:  # a merge deleted after scoring is built again, and deleted again
        model = models["positives"][k]
        results["explain"][k] = explain(models, base, materialise(model))
        if args.discard and callable(model):
            shutil.rmtree(materialise(model))
    for name, rows in results["explain"].items():
        w = [r["weight"] for r in rows.values()]
        agree = sum((r["weight"] > 0) == (r["z"] > 0) for r in rows.values())
        print(
            f"missed {name}: victim weight per matrix median {statistics.median(w):.3f}, "
            f"range {min(w):.3f} to {max(w):.3f}; sign of z = sign of w in {agree}/{len(w)}"
        )
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    for key in ("signed",):
        pos = sorted((v[key], k) for k, v in results["positives"].items())[:3]
        neg = sorted(((v[key], k) for k, v in results["nulls"].items()), reverse=True)[:3]
        calibration = next(iter(results["positives"].values()))["signed_nulls"]
        print(
            f"{key} (not used): smallest positives {pos}; largest nulls {neg}; "
            f"calibration nulls {calibration}"
        )
    pos = [v["statistic"] for v in results["positives"].values()]
    neg = [v["statistic"] for v in results["nulls"].values()]
    print(f"statistic: positives min {min(pos):.1f}, nulls max {max(neg):.1f}")
    print(f"\ntiming: {json.dumps(results['timing'])}")


if __name__ == "__main__":
    main()
