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
from mergeshield.evaluation.generative import exact_match
from mergeshield.folders import load_tensors
from mergeshield.modeling import (
    load_causal_lm,
    load_classifier,
    load_merged,
    load_model,
    merged_part,
    share_correct,
    stored_to_module_names,
    swap_backbone,
)

if TYPE_CHECKING:
    from mergeshield.evaluation.family import Family


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
    return share_correct(
        model, data, lambda m, inputs, labels: m(**inputs).logits.argmax(-1) == labels
    )


def score(model: torch.nn.Module, data: dict[str, torch.Tensor], kind: str) -> float:
    """A family's score of ``model`` on ``data``: exact match of the greedy answer for kind
    ``llm``, else accuracy."""
    return exact_match(model, data) if kind == "llm" else accuracy(model, data)


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


class Scorer:
    """Score merged tensors (base layout) on a task's cached ``val``/``test`` split without
    writing a folder: a classifier family's task model ``head_model`` with the tensors loaded
    into its base model (accuracy, its own head), or, for an ``llm`` family, the causal LM
    with the tensors loaded whole (exact match of the greedy answer)."""

    def __init__(self, family: Family, task: str, head_model: Path) -> None:
        self.kind = family.kind
        self.model = load_model(head_model, family.kind)
        self.data = {s: _eval_split(str(family.root), task, s)[0] for s in ("val", "test")}
        self.names = stored_to_module_names(merged_part(self.model), family.base)

    def __call__(self, backbone: dict[str, torch.Tensor], split: str) -> float:
        load_merged(self.model, {self.names.get(k, k): v for k, v in backbone.items()})
        return self.standalone(split)

    def of_module(self, module: torch.nn.Module, split: str) -> float:
        """The score of ``module``'s merged part (a model of the same class, e.g. one trained
        after a merge) under this task's head, without renaming."""
        load_merged(self.model, merged_part(module).state_dict())
        return self.standalone(split)

    def standalone(self, split: str) -> float:
        """The score of the model as it is now: ``head_model`` itself until tensors are
        loaded."""
        return score(self.model, self.data[split], self.kind)


def backbone_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """A backbone folder's tensors, floating ones as float32 (what the scorers load)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in load_tensors(folder).items()}
