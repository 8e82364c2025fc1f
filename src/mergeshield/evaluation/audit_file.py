"""An audit described in a YAML file, the way mergekit describes a merge.

Your own release::

    base: models/base              # the shared pretrained base (a checkpoint folder)
    victim:                        # your fine-tune: a classification checkpoint of the base
      name: noun                   # optional (default: the folder's name)
      model: models/noun
      val: data/noun-val.jsonl     # the split a free-rider may tune the merge on
      test: data/noun-test.jsonl   # the split the report is scored on
      train: data/noun-train.jsonl # optional: training data (frontier's hardening, fine-tune)
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
    dtype: float32                 # or bfloat16: the models as released and merged

A built-in family (the ones ``--kind`` builds, ``llm`` included): ``family: {kind: text, setting:
small}`` and
tasks by name (``victim: wordnet_noun``, ``free_riders: [wordnet_verb]``); the package ships
these as ``families/*.yml`` (:func:`builtin_file`).

Data splits are anything :func:`mergeshield.hardening.data.read_examples` reads: JSONL
or CSV text with ``text`` and ``label``, an image folder ``root/<label>/<image>``, a
``datasets`` ``save_to_disk`` folder.  Each task is scored with its own model's head, so the
labels must be that head's (``config.label2id`` names or ids).  Paths are relative to the
file.  Every field is checked before any work: a bad file gets a one-line error.
``train`` (optional, any entry, the same formats and label check) is only read by
``frontier``: the victim's train split is what its hardening candidates (``trap2+merge``,
``merge/mergelock``, ...) train on and what its short fine-tune attack draws its examples from,
as ``load_task``'s train split is for a built-in family; ``audit`` ignores it.

Your own causal LM (any model type ``protect`` supports: llama, qwen2, mistral, ...)::

    base: models/base-lm           # a ...ForCausalLM checkpoint
    metric: exact_match            # the greedy answer, then end-of-sequence, must be the answer
    victim: {model: models/antonyms, val: data/ant-val.jsonl, test: data/ant-test.csv}
    free_riders:
      - {model: models/sums, val: data/sums-val, test: data/sums-test}   # datasets folders
    max_length: 64                 # tokens of prompt + answer + eos (prompts cut from the left)

Each split holds prompt/answer pairs (:func:`mergeshield.hardening.data.read_prompt_answers`:
JSONL, CSV or a ``datasets`` folder with ``prompt`` and ``answer`` columns); the answer is
what the model should write after the prompt, as the tokenizer splits ``prompt + answer``
(usually with its leading space: ``"The opposite of hot is"`` -> ``" cold"``).  It is scored
exactly as the built-in ``llm`` family (:func:`mergeshield.evaluation.generative.exact_match`:
one teacher-forced pass, which is greedy decoding's verdict); causal LMs have no heads, so the
merged model itself answers every task.  ``metric: accuracy`` (the default) needs
classifiers, ``exact_match`` causal LMs; every model must have the base's model type and
tensor shapes.

Command-line options override the file's fields (:func:`load_audit_file` ``overrides``, the
same checks); ``mergeshield audit --kind K --setting S`` is the shipped file ``K-S.yml``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeshield.errors import MergeShieldError
from mergeshield.evaluation.audit import PAPER_SETTINGS, AuditPlan
from mergeshield.evaluation.zoo import check_dtype
from mergeshield.folders import read_config, scratch
from mergeshield.objective import check_objective

if TYPE_CHECKING:
    from mergeshield.evaluation.family import Family

PACKAGE_FILES = Path(__file__).parent / "families"
# metric -> (what it scores, the architecture name endings of such checkpoints)
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "accuracy": ("a classifier", ("ForSequenceClassification", "ForImageClassification")),
    "exact_match": ("a causal LM", ("ForCausalLM", "LMHeadModel")),
}
_TOP = {
    "base", "victim", "free_riders", "family", "metric", "defenses", "attacks", "methods",
    "objective", "grid", "grid_stride", "merge_all", "attacked_only", "pairs", "protocol",
    "interpolation", "max_length", "seed", "tasks", "dtype",
}  # fmt: skip
_TASK = {"name", "model", "val", "test", "train"}


@dataclass(frozen=True)
class TaskEntry:
    """One model of a user's family and its evaluation data."""

    name: str
    model: Path
    val: Path
    test: Path
    train: Path | None = None  # optional: what frontier hardens and fine-tunes on


@dataclass(frozen=True)
class AuditFile:
    """A validated audit file: the plan, and either a built-in family (``kind``/``setting`` of
    the plan) or the user's models (``base``, ``tasks``: the victim first)."""

    plan: AuditPlan
    base: Path | None = None
    tasks: tuple[TaskEntry, ...] = ()
    max_length: int = 128
    metric: str = "accuracy"

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


def load_audit_file(path: Path, overrides: dict[str, Any] | None = None) -> AuditFile:
    """Read and validate an audit file (see the module docstring).  ``overrides``: fields that
    replace the file's (the command line's options), checked as if the file held them; a
    ``victim`` without ``free_riders`` makes every other task a free-rider."""
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
    if overrides:
        if "base" in data and {"victim", "free_riders"} & set(overrides):
            raise MergeShieldError(
                f"{path}: the victim and free-riders of your own models are the file's "
                "(edit victim/free_riders there)"
            )
        if "victim" in overrides and "free_riders" not in overrides:
            data.pop("free_riders", None)
        data = data | overrides
    unknown = sorted(set(map(str, data)) - _TOP)
    if unknown:
        raise MergeShieldError(f"{path}: unknown fields {unknown}; known: {sorted(_TOP)}")
    metric = data.get("metric")
    if metric is not None and metric not in METRICS:
        raise MergeShieldError(
            f"{path}: unknown metric {metric!r}; known: "
            + ", ".join(f"{m} ({what})" for m, (what, _) in METRICS.items())
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
        victim = _name(path, data["victim"], "victim") if data.get("victim") else None
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
        implied = "exact_match" if plan.kind == "llm" else "accuracy"
        if metric not in (None, implied):
            raise MergeShieldError(
                f"{path}: the built-in {plan.kind} family is scored by {implied}"
            )
        return AuditFile(plan, metric=implied)
    if "base" not in data:
        raise MergeShieldError(f"{path}: name the base model (base: FOLDER) or a built-in family")
    metric = metric or "accuracy"
    root = path.parent
    base = _folder(root, data["base"], "base")
    entries = [_task(root, data.get("victim"), "victim")]
    entries += [_task(root, r, "free_riders") for r in _list(path, data, "free_riders")]
    if len(entries) < 2:
        raise MergeShieldError(f"{path}: give at least one free-rider model (free_riders: [...])")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise MergeShieldError(f"{path}: task names must differ, got {names}")
    _check_models(base, entries, metric)
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
    return AuditFile(plan, base=base, tasks=tuple(entries), max_length=max_length, metric=metric)


def _check_models(base: Path, entries: list[TaskEntry], metric: str) -> None:
    """Every model has the base's model type and is what ``metric`` scores (a causal LM's
    base is a causal LM too); a classifier's base may be a bare backbone."""
    base_type = read_config(base).get("model_type")
    what, endings = METRICS[metric]
    for entry in entries:
        config = read_config(entry.model)
        if config.get("model_type") != base_type:
            raise MergeShieldError(
                f"{entry.name}: {entry.model} is a {config.get('model_type')} model, the base "
                f"{base} a {base_type}: not a fine-tune of that base"
            )
        architectures = config.get("architectures") or []
        if not any(a.endswith(endings) for a in architectures):
            other = next(m for m in METRICS if m != metric)
            hint = (
                f"; it is {METRICS[other][0]}: use metric: {other}"
                if any(a.endswith(METRICS[other][1]) for a in architectures)
                else ""
            )
            raise MergeShieldError(
                f"{entry.name}: metric {metric} scores {what} (...{endings[0]}), but "
                f"{entry.model} is a {architectures or 'model without architectures'}{hint}"
            )
    if metric == "exact_match":
        architectures = read_config(base).get("architectures") or []
        if not any(a.endswith(endings) for a in architectures):
            raise MergeShieldError(
                f"base {base}: metric exact_match needs the base as a causal LM checkpoint "
                f"(...ForCausalLM, it answers for the base's score), not {architectures}"
            )


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
    if "interpolation" in data:
        alphas = _list(path, data, "interpolation")
        if not alphas or not all(isinstance(a, int | float) and 0 <= a <= 1 for a in alphas):
            raise MergeShieldError(f"{path}: interpolation is a list of alphas in [0, 1]")
        out["interpolation"] = tuple(float(a) for a in alphas)
    kinds = (("grid_stride", int), ("merge_all", bool), ("attacked_only", bool), ("seed", int))
    for key, kind in kinds:
        if key in data:
            if not isinstance(data[key], kind):
                raise MergeShieldError(f"{path}: {key} must be a {kind.__name__}")
            out[key] = data[key]
    if "pairs" in data:
        out["pairs"] = tuple(_list(path, data, "pairs"))
    if "dtype" in data:
        try:
            out["dtype"] = check_dtype(data["dtype"])
        except MergeShieldError as err:
            raise MergeShieldError(f"{path}: {err}") from None
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
    train = None
    if value.get("train") is not None:
        train = (root / str(value["train"])).resolve()
        if not train.exists():
            raise MergeShieldError(f"{what} {model.name}: train data {train} not found")
    name = str(value.get("name") or model.name)
    return TaskEntry(name, model, splits["val"], splits["test"], train)


def materialize(audit: AuditFile, root: Path) -> Family:
    """The user's models as a :class:`~mergeshield.evaluation.family.Family` under ``root``:
    each split (``train`` too where given) encoded with its own model's tokenizer/processor and
    label map (``data/``), then the base and fine-tuned scores measured, as the zoo records
    them (kind ``llm`` for ``exact_match``: the causal LM's greedy answers, as the built-in LLM
    family).  The manifest keeps each ``train`` path and ``max_length`` for frontier's
    hardening (:func:`mergeshield.evaluation.frontier.training_data`)."""
    import json

    import torch

    from mergeshield.evaluation.accuracy import evaluate
    from mergeshield.evaluation.family import Family
    from mergeshield.merging import extract_backbone

    assert audit.base is not None
    kinds = set()
    manifest: dict[str, Any] = {"tasks": {}, "max_length": audit.max_length}
    family = Family("text", "file", Path(root), audit.base, {}, {}, {}, {}, manifest=manifest)
    (family.root / "data").mkdir(parents=True, exist_ok=True)
    for entry in audit.tasks:
        try:
            extract_backbone(entry.model, audit.base, family.root / "check" / entry.name)
        except MergeShieldError as err:
            raise MergeShieldError(f"{entry.name}: {err}") from None
        stored: dict[str, Any] = {}
        for split in ("val", "test") + (("train",) if entry.train is not None else ()):
            try:
                kind, stored[split], stored["labels"] = _encode(audit, entry, split)
            except MergeShieldError as err:
                raise MergeShieldError(f"{entry.name} {split} data: {err}") from None
            kinds.add(kind)
        torch.save(stored, family.root / "data" / f"{entry.name}.pt")
        family.tasks[entry.name] = entry.model
        family.labels[entry.name] = stored["labels"]
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
            "train": None if entry.train is None else str(entry.train),
        }
    (family.root / "manifest.json").write_text(json.dumps(family.manifest, indent=2))
    return family


def _encode(audit: AuditFile, entry: TaskEntry, split: str) -> tuple[str, Any, list[str]]:
    """(family kind, model inputs, label names) of one split of ``entry``: prompt + answer +
    eos for a causal LM (:func:`mergeshield.evaluation.generative.encode`), else the
    classifier's inputs with its own head's label ids."""
    from transformers import AutoConfig, AutoTokenizer

    from mergeshield.evaluation.generative import GenSplit, encode
    from mergeshield.hardening.data import encode_examples, read_examples, read_prompt_answers
    from mergeshield.modeling import quiet_transformers

    path = getattr(entry, split)
    if audit.metric == "exact_match":
        prompts, answers = read_prompt_answers(path)
        if not prompts:
            raise MergeShieldError(f"{path} holds no examples")
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(
                _tokenizer_dir(entry.model, audit.base), local_files_only=True
            )
        if tokenizer.eos_token_id is None:
            raise MergeShieldError(
                f"{entry.model}: the tokenizer has no eos token (exact match scores the answer "
                "then end-of-sequence)"
            )
        return "llm", encode(GenSplit(prompts, answers), tokenizer, audit.max_length), []
    examples = read_examples(path)
    if not len(examples):
        raise MergeShieldError(f"{path} holds no examples")
    with quiet_transformers():
        config = AutoConfig.from_pretrained(entry.model, local_files_only=True)
    text = examples.kind == "text"
    encoded = encode_examples(
        examples,
        entry.model,
        config,
        tokenizer_dir=_tokenizer_dir(entry.model, audit.base) if text else entry.model,
        max_len=audit.max_length,
    )
    labels = [config.id2label[i] for i in range(config.num_labels)]
    return examples.kind, encoded.tensors, labels


def _tokenizer_dir(model: Path, base: Path) -> Path:
    """The model's own tokenizer files, else the base's."""
    for folder in (model, base):
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            return folder
    raise MergeShieldError(f"{model}: no tokenizer files in the model or the base folder")


@contextmanager
def audit_family(audit: AuditFile, *, progress: bool = True) -> Iterator[Family]:
    """The family an audit file describes: the built-in one (built or reused from the cache)
    or the user's models materialized in a temporary folder for the duration."""

    from mergeshield.evaluation.zoo import build_family

    if audit.builtin:
        tasks = list(audit.plan.tasks) if audit.plan.tasks else None
        yield build_family(audit.plan.kind, audit.plan.setting, tasks=tasks, progress=progress)
        return
    with scratch("family") as tmp:
        yield materialize(audit, tmp)


def run_audit_file(
    path: Path, out: Path, *, overrides: dict[str, Any] | None = None, progress: bool = True
):
    """Run the audit a file describes (with ``overrides``, see :func:`load_audit_file`) and
    write its report to ``out``; the result."""
    from mergeshield.evaluation.audit import run_audit

    audit = load_audit_file(path, overrides)
    if audit.builtin:  # run_audit builds (or reuses) the family after checking the plan
        return run_audit(audit.plan, out, progress=progress)
    with audit_family(audit, progress=progress) as family:
        return run_audit(audit.plan, out, family=family, progress=progress)
