"""Accuracy of a classification checkpoint on a family task, optionally on a swapped backbone.

A free-rider merges the *backbones* (``bert.*`` / ``vit.*``) of several fine-tuned models and
keeps each task's own classification head.  :func:`evaluate` scores exactly that: it loads the
task's classifier checkpoint, replaces its base-model weights by those of ``backbone`` (when
given), and measures accuracy on the task's cached val/test inputs.

Speed: the task inputs are read once per process from ``<family>/data/<task>.pt`` (already
tokenized, sorted by length), models are loaded with stock ``transformers`` Auto classes from
local folders (about 0.1 s for MiniLM), and evaluation runs under ``torch.inference_mode()`` in
batches of 128.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mergeshield.errors import MergeShieldError
from mergeshield.evaluation.batches import quiet_transformers, take_batch
from mergeshield.evaluation.generative import exact_match, load_causal_lm

if TYPE_CHECKING:
    from mergeshield.evaluation.zoo import Family

EVAL_BATCH_SIZE = 128


def evaluate(
    task_model: Path,
    task: str,
    *,
    family: Family,
    split: str = "test",
    backbone: Path | None = None,
) -> float:
    """Fraction of ``split`` examples of ``task`` that ``task_model`` classifies correctly
    (family kind ``llm``: exact match of the greedy answer of ``backbone``, else of
    ``task_model``; see :mod:`mergeshield.evaluation.generative`).

    ``task_model``: a classification checkpoint folder (its head is the one used).
    ``backbone``: a checkpoint folder whose base-model weights replace the task model's
    ``model.base_model`` before evaluating; either base-model layout (``encoder.layer.0``
    ...) or a full classification checkpoint (its ``bert.``/``vit.`` part is taken).  Every
    backbone tensor must be present except BERT's pooler, which is kept from ``task_model``
    when the backbone lacks it.
    """
    data, label_names = _eval_split(str(family.root), task, split)
    if family.kind == "llm":  # no head: the (merged) causal LM itself answers
        return exact_match(load_causal_lm(backbone or task_model), data)
    model = load_classifier(task_model, family.kind)
    n_classes = len(label_names)
    if model.config.num_labels != n_classes:
        raise MergeShieldError(
            f"{task_model} has {model.config.num_labels} labels but task {task!r} has {n_classes}"
        )
    if backbone is not None:
        swap_backbone(model, Path(backbone))
    return accuracy(model, data)


def evaluate_backbone(
    backbone: Path | None, family: Family, split: str = "test"
) -> dict[str, float]:
    """``{task: evaluate(family.tasks[task], task, backbone=backbone)}`` for every task of the
    family: how well one (e.g. merged) backbone serves each task with that task's own head."""
    return {
        task: evaluate(path, task, family=family, split=split, backbone=backbone)
        for task, path in family.tasks.items()
    }


def accuracy(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> float:
    """Accuracy of ``model`` (argmax of its logits) on inputs/``labels`` in ``data``."""
    model.eval()
    n = len(data["labels"])
    correct = 0
    with torch.inference_mode():
        for i in range(0, n, EVAL_BATCH_SIZE):
            batch = take_batch(data, slice(i, i + EVAL_BATCH_SIZE))
            labels = batch.pop("labels")
            logits = model(**batch).logits
            correct += int((logits.argmax(-1) == labels).sum())
    return correct / n


def load_classifier(folder: Path, kind: str) -> torch.nn.Module:
    """A classification checkpoint loaded with ``AutoModelFor{Sequence,Image}Classification``
    from a local folder (no remote code, no hub access), in eval mode."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise MergeShieldError(f"{folder} is not a model checkpoint folder (no config.json)")
    auto = AutoModelForSequenceClassification if kind == "text" else AutoModelForImageClassification
    with quiet_transformers():
        model = auto.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    return model.eval()


def swap_backbone(model: torch.nn.Module, backbone: Path) -> list[str]:
    """Copy the base-model weights stored in folder ``backbone`` into ``model.base_model``.

    The folder is read with the stock ``from_pretrained`` of the base-model class (so both the
    base layout and a full ``bert.``/``vit.``-prefixed checkpoint work, with transformers' own
    tensor-name conversions) and ``model.config`` (so a folder without ``config.json``, such as
    ``mergekit-pytorch`` output, works too).  Every base-model tensor must be present except the
    BERT pooler, which stays the task model's when absent.  Returns the names (relative to
    ``model.base_model``) of the replaced tensors.
    """
    backbone = Path(backbone)
    if not backbone.is_dir():
        raise MergeShieldError(f"backbone {backbone} is not a checkpoint folder")
    target = model.base_model.state_dict()
    try:
        with quiet_transformers():
            loaded, info = type(model.base_model).from_pretrained(
                backbone,
                config=model.config,
                local_files_only=True,
                dtype=torch.float32,
                ignore_mismatched_sizes=True,
                output_loading_info=True,
            )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MergeShieldError(f"cannot read backbone {backbone}: {first}") from err
    if info["mismatched_keys"]:
        name = sorted(info["mismatched_keys"])[0]
        raise MergeShieldError(f"backbone {backbone}: tensor {name} has the wrong shape")
    missing = set(info["missing_keys"])
    absent = sorted(k for k in missing if k in target and not k.startswith("pooler."))
    if absent:
        raise MergeShieldError(
            f"backbone {backbone} lacks {len(absent)} of the {len(target)} tensors of a "
            f"{type(model.base_model).__name__} (e.g. {absent[0]})"
        )
    new = {k: v for k, v in loaded.state_dict().items() if k in target and k not in missing}
    model.base_model.load_state_dict(new, strict=False)
    return sorted(new)


@functools.lru_cache(maxsize=64)
def _eval_split(root: str, task: str, split: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The cached model inputs and labels of ``task``'s ``split`` ("val" or "test"), and the
    task's label names."""
    if split not in ("val", "test"):
        raise MergeShieldError(f"evaluate() supports split 'val' or 'test', not {split!r}")
    path = Path(root) / "data" / f"{task}.pt"
    if not path.is_file():
        raise MergeShieldError(f"task {task!r} has no cached inputs at {path}: not in this family")
    stored = torch.load(path, weights_only=True)
    return stored[split], list(stored["labels"])
