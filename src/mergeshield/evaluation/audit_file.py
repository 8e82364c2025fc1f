"""An audit described in a YAML file, the way mergekit describes a merge.

Your own release::

    base: models/base              # the shared pretrained base (a checkpoint folder)
    victim:                        # your fine-tune: a classification checkpoint of the base
      name: noun                   # optional (default: the folder's name)
      model: models/noun
      val: data/noun-val.jsonl     # the split a free-rider may tune the merge on
      test: data/noun-test.jsonl   # the split the report is scored on
    free_riders:                   # the public fine-tunes of the same base they would merge
      - {model: models/verb, val: data/verb-val.jsonl, test: data/verb-test.jsonl}
    metric: accuracy
    defenses: [params, mergelock, mergebarrier]
    attacks: [aga]
    methods: [task_arithmetic, ties]
    objective: min                 # min, mean or victim (mergeshield.objective)
    grid: [0.3, 0.5, 0.7, 1.0]     # optional: the coefficients tried (default: each method's)
    merge_all: false               # also merge the victim with all free-riders at once
    max_length: 128                # token limit of text inputs

A built-in family (the ones ``--kind`` builds, ``llm`` included): ``family: {kind: text, setting:
small}`` and
tasks by name (``victim: wordnet_noun``, ``free_riders: [wordnet_verb]``); the package ships
these as ``families/*.yml`` (:func:`builtin_file`).

Data splits are anything :func:`mergeshield.hardening.data.read_examples` reads: JSONL
or CSV text with ``text`` and ``label``, an image folder ``root/<label>/<image>``, a
``datasets`` ``save_to_disk`` folder.  Each task is scored with its own model's head, so the
labels must be that head's (``config.label2id`` names or ids).  Paths are relative to the
file.  Every field is checked before any work: a bad file gets a one-line error.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeshield.errors import MergeShieldError
from mergeshield.evaluation.audit import PAPER_SETTINGS, AuditPlan
from mergeshield.objective import check_objective

PACKAGE_FILES = Path(__file__).parent / "families"
METRICS = ("accuracy",)
_TOP = {
    "base", "victim", "free_riders", "family", "metric", "defenses", "attacks", "methods",
    "objective", "grid", "grid_stride", "merge_all", "pairs", "protocol", "max_length", "seed",
    "tasks",
}  # fmt: skip
_TASK = {"name", "model", "val", "test"}


@dataclass(frozen=True)
class TaskEntry:
    """One model of a user's family and its evaluation data."""

    name: str
    model: Path
    val: Path
    test: Path


@dataclass(frozen=True)
class AuditFile:
    """A validated audit file: the plan, and either a built-in family (``kind``/``setting`` of
    the plan) or the user's models (``base``, ``tasks``: the victim first)."""

    plan: AuditPlan
    base: Path | None = None
    tasks: tuple[TaskEntry, ...] = ()
    max_length: int = 128

    @property
    def builtin(self) -> bool:
        return self.base is None


def builtin_file(name: str) -> Path:
    """The shipped audit file ``families/<name>.yml`` (``text-small``, ``demo``, ...)."""
    path = PACKAGE_FILES / f"{name}.yml"
    if not path.is_file():
        known = sorted(p.stem for p in PACKAGE_FILES.glob("*.yml"))
        raise MergeShieldError(f"no shipped audit file {name!r}; shipped: {known}")
    return path


def load_audit_file(path: Path) -> AuditFile:
    """Read and validate an audit file (see the module docstring)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MergeShieldError(f"audit file {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0]
        raise MergeShieldError(f"{path}: not a YAML file ({first})") from None
    if not isinstance(data, dict):
        raise MergeShieldError(f"{path}: an audit file is a YAML mapping (base: ..., victim: ...)")
    unknown = sorted(set(map(str, data)) - _TOP)
    if unknown:
        raise MergeShieldError(f"{path}: unknown fields {unknown}; known: {sorted(_TOP)}")
    metric = data.get("metric", "accuracy")
    if metric not in METRICS:
        raise MergeShieldError(
            f"{path}: unknown metric {metric!r}; classifiers are scored by {METRICS} "
            "(exact match of greedy answers needs the causal-LM audit, not built yet)"
        )
    plan_fields = _plan_fields(path, data)
    if "family" in data:
        family = data["family"]
        if not isinstance(family, dict) or set(family) - {"kind", "setting"}:
            raise MergeShieldError(
                f"{path}: family is {{kind: text|image|llm, setting: small|full}}"
            )
        if "base" in data:
            raise MergeShieldError(f"{path}: give either family (built-in) or base, not both")
        victim = _name(path, data["victim"], "victim") if "victim" in data else None
        riders = [_name(path, r, "free_riders") for r in _list(path, data, "free_riders")]
        plan = AuditPlan(
            kind=family.get("kind", "text"),
            setting=family.get("setting", "small"),
            tasks=tuple(_list(path, data, "tasks")) or None,
            victim=victim,
            free_riders=tuple(riders) or None,
            **plan_fields,
        )
        if plan.kind not in ("text", "image", "llm") or plan.setting not in ("small", "full"):
            raise MergeShieldError(f"{path}: family kind text|image|llm, setting small|full")
        return AuditFile(plan)
    if "base" not in data:
        raise MergeShieldError(f"{path}: name the base model (base: FOLDER) or a built-in family")
    root = path.parent
    base = _folder(root, data["base"], "base")
    entries = [_task(root, data.get("victim"), "victim")]
    entries += [_task(root, r, "free_riders") for r in _list(path, data, "free_riders")]
    if len(entries) < 2:
        raise MergeShieldError(f"{path}: give at least one free-rider model (free_riders: [...])")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise MergeShieldError(f"{path}: task names must differ, got {names}")
    max_length = data.get("max_length", 128)
    if not isinstance(max_length, int) or max_length < 1:
        raise MergeShieldError(f"{path}: max_length must be a positive integer")
    plan = AuditPlan(
        kind="file",
        setting=path.name,
        tasks=tuple(names),
        victim=names[0],
        free_riders=tuple(names[1:]),
        **plan_fields,
    )
    return AuditFile(plan, base=base, tasks=tuple(entries), max_length=max_length)


def _plan_fields(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """The AuditPlan fields the file sets, checked against the registries."""
    from mergeshield.attacks import ATTACKS
    from mergeshield.defenses import DEFENSES
    from mergeshield.merging import get_method

    out: dict[str, Any] = {}
    for key, known in (("defenses", DEFENSES), ("attacks", ATTACKS)):
        if key in data:
            values = _list(path, data, key)
            bad = sorted(set(values) - set(known))
            if bad:
                raise MergeShieldError(f"{path}: unknown {key} {bad}; known: {sorted(known)}")
            out[key] = tuple(values)
    if "methods" in data:
        out["methods"] = tuple(_list(path, data, "methods"))
        for method in out["methods"]:
            try:
                get_method(method)
            except MergeShieldError as err:
                raise MergeShieldError(f"{path}: {err}") from None
    if "objective" in data:
        try:
            out["objective"] = check_objective(data["objective"])
        except MergeShieldError as err:
            raise MergeShieldError(f"{path}: {err}") from None
    if "grid" in data:
        grid = _list(path, data, "grid")
        if not grid or not all(isinstance(c, int | float) and c == c for c in grid):
            raise MergeShieldError(f"{path}: grid is a list of numbers, e.g. [0.5, 1.0]")
        out["grid"] = tuple(float(c) for c in grid)
    for key, kind in (("grid_stride", int), ("merge_all", bool), ("seed", int)):
        if key in data:
            if not isinstance(data[key], kind):
                raise MergeShieldError(f"{path}: {key} must be a {kind.__name__}")
            out[key] = data[key]
    if "pairs" in data:
        out["pairs"] = tuple(_list(path, data, "pairs"))
    if "protocol" in data:
        protocol = data["protocol"]
        if protocol is False or protocol == []:
            out["protocol"] = ()
        elif protocol is not True:
            raise MergeShieldError(f"{path}: protocol is true (the papers' settings) or false")
        else:
            out["protocol"] = PAPER_SETTINGS
    return out


def _list(path: Path, data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    if value is None:
        return []
    if not isinstance(value, list):
        raise MergeShieldError(f"{path}: {key} must be a list")
    return value


def _name(path: Path, value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise MergeShieldError(f"{path}: with a built-in family, {key} names its tasks")
    return value


def _folder(root: Path, value: Any, what: str) -> Path:
    if not isinstance(value, str):
        raise MergeShieldError(f"{what}: expected a folder path, got {value!r}")
    folder = (root / value).resolve()
    if not (folder / "config.json").is_file():
        raise MergeShieldError(f"{what}: {folder} is not a checkpoint folder (no config.json)")
    return folder


def _task(root: Path, value: Any, what: str) -> TaskEntry:
    if not isinstance(value, dict):
        raise MergeShieldError(f"{what}: each model is {{model: FOLDER, val: DATA, test: DATA}}")
    unknown = sorted(set(map(str, value)) - _TASK)
    if unknown:
        raise MergeShieldError(f"{what}: unknown fields {unknown}; known: {sorted(_TASK)}")
    model = _folder(root, value.get("model"), f"{what} model")
    splits = {}
    for split in ("val", "test"):
        if split not in value:
            raise MergeShieldError(
                f"{what} {model.name}: no {split!r} split "
                + ("(the data the attacker tunes the merge on)" if split == "val" else "")
            )
        splits[split] = (root / str(value[split])).resolve()
        if not splits[split].exists():
            raise MergeShieldError(f"{what} {model.name}: {split} data {splits[split]} not found")
    name = str(value.get("name") or model.name)
    return TaskEntry(name, model, splits["val"], splits["test"])


def materialize(audit: AuditFile, root: Path):
    """The user's models as a :class:`~mergeshield.evaluation.zoo.Family` under ``root``:
    each split encoded with its own model's tokenizer/processor and label map (``data/``),
    then the base and fine-tuned accuracies measured, as the zoo records them."""
    import json

    import torch

    from mergeshield.evaluation.accuracy import evaluate
    from mergeshield.evaluation.family import Family
    from mergeshield.folders import read_config
    from mergeshield.hardening.data import encode_examples, read_examples
    from mergeshield.merging import extract_backbone

    assert audit.base is not None
    base_config = read_config(audit.base)
    kinds = set()
    family = Family("text", "file", Path(root), audit.base, {}, {}, {}, {}, manifest={"tasks": {}})
    (family.root / "data").mkdir(parents=True, exist_ok=True)
    for entry in audit.tasks:
        config = read_config(entry.model)
        if config.get("model_type") != base_config.get("model_type"):
            raise MergeShieldError(
                f"{entry.name}: {entry.model} is a {config.get('model_type')} model, the base "
                f"{audit.base} a {base_config.get('model_type')}: not a fine-tune of that base"
            )
        extract_backbone(entry.model, audit.base, family.root / "check" / entry.name)
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(entry.model, local_files_only=True)
        stored: dict[str, Any] = {}
        for split in ("val", "test"):
            examples = read_examples(getattr(entry, split))
            kinds.add(examples.kind)
            text = examples.kind == "text"
            try:
                encoded = encode_examples(
                    examples,
                    entry.model,
                    hf_config,
                    tokenizer_dir=_tokenizer_dir(entry.model, audit.base) if text else entry.model,
                    max_len=audit.max_length,
                )
            except MergeShieldError as err:
                raise MergeShieldError(f"{entry.name} {split} data: {err}") from None
            stored[split] = encoded.tensors
        labels = [hf_config.id2label[i] for i in range(hf_config.num_labels)]
        stored["labels"] = labels
        torch.save(stored, family.root / "data" / f"{entry.name}.pt")
        family.tasks[entry.name] = entry.model
        family.labels[entry.name] = labels
    if len(kinds) != 1:
        raise MergeShieldError("the family mixes text and image data")
    family.kind = kinds.pop()
    shutil.rmtree(family.root / "check", ignore_errors=True)
    for entry in audit.tasks:
        acc = {
            (split, backbone is None): evaluate(
                entry.model, entry.name, family=family, split=split, backbone=backbone
            )
            for split in ("val", "test")
            for backbone in (None, audit.base)
        }
        family.finetuned_accuracy[entry.name] = acc[("test", True)]
        family.base_accuracy[entry.name] = acc[("test", False)]
        family.manifest["tasks"][entry.name] = {
            "finetuned_val_accuracy": acc[("val", True)],
            "base_val_accuracy": acc[("val", False)],
        }
    (family.root / "manifest.json").write_text(json.dumps(family.manifest, indent=2))
    return family


def _tokenizer_dir(model: Path, base: Path) -> Path:
    """The model's own tokenizer files, else the base's."""
    for folder in (model, base):
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            return folder
    raise MergeShieldError(f"{model}: no tokenizer files in the model or the base folder")


def run_audit_file(path: Path, out: Path, *, progress: bool = True):
    """Run the audit a file describes and write its report to ``out``; the result."""
    import tempfile

    from mergeshield.evaluation.audit import run_audit

    audit = load_audit_file(path)
    if audit.builtin:
        return run_audit(audit.plan, out, progress=progress)
    with tempfile.TemporaryDirectory(prefix="mergeshield-family-") as tmp:
        family = materialize(audit, Path(tmp))
        return run_audit(audit.plan, out, family=family, progress=progress)
