"""Cut the shared backbone out of a task model, in the base model's own layout.

Free-riders merge the backbone that all task models share and keep each task's own head (heads
of different sizes cannot be merged).  :func:`extract_backbone` turns a task checkpoint such as a
``BertForSequenceClassification`` (tensor names ``bert.encoder.layer.0...`` plus
``classifier.*``) into a checkpoint with exactly the base folder's tensor names and
``config.json`` (a ``BertModel`` with names ``encoder.layer.0...``), which mergekit can then merge
with the base and the other backbones.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

from mergeshield.errors import MergeShieldError
from mergeshield.folders import atomic_dir, load_tensors, save_tensors, tensor_names

LOG = logging.getLogger(__name__)


def backbone_prefix(task_names: list[str], base_names: list[str]) -> str:
    """The prefix ``p`` such that ``p + b`` is a task tensor for the most base tensors ``b``.

    Every task tensor name that equals a base name or ends with ``"." + base_name`` votes for
    the prefix in front of it (``""``, ``"bert."``, ``"vit."``, ``"model."`` ...); the prefix
    with most votes wins, ties going to the shorter prefix.  No per-model rule is involved.
    """
    votes: Counter[str] = Counter()
    base_set = set(base_names)
    for task_name in task_names:
        if task_name in base_set:
            votes[""] += 1
        parts = task_name.split(".")
        for cut in range(1, len(parts)):
            if ".".join(parts[cut:]) in base_set:
                votes[".".join(parts[:cut]) + "."] += 1
    if not votes:
        raise MergeShieldError("no tensor of the task model matches a tensor of the base model")
    return min(votes, key=lambda prefix: (-votes[prefix], len(prefix), prefix))


def extract_backbone(task_model: Path, base: Path, out: Path) -> Path:
    """Write the task model's backbone to ``out`` in the base folder's layout; return ``out``.

    ``out`` gets the base's ``config.json`` and one ``model.safetensors`` whose tensor names are
    exactly the base's: each base tensor ``b`` is the task tensor ``prefix + b``
    (:func:`backbone_prefix`), or the base's own ``b`` where the task model lacks it (buffers
    such as ``embeddings.position_ids``, or a pooler the task model does not use).  Task tensors
    that are not in the base (the classification head) are dropped.  A task model already in
    the base layout is copied.  Written to a temporary folder, then renamed into place.
    """
    task_model, base, out = Path(task_model), Path(base), Path(out)
    base_names = tensor_names(base)
    task_names = tensor_names(task_model)
    prefix = backbone_prefix(task_names, base_names)
    task_set = set(task_names)
    from_task = [name for name in base_names if prefix + name in task_set]
    from_base = [name for name in base_names if prefix + name not in task_set]
    if len(from_base) > len(from_task):
        raise MergeShieldError(
            f"{task_model} holds only {len(from_task)} of the {len(base_names)} tensors of "
            f"base {base} (prefix {prefix!r}): is it a fine-tune of that base?"
        )
    if from_base:
        LOG.info(
            "backbone of %s: %d tensors taken from base: %s", task_model, len(from_base), from_base
        )

    task_tensors = load_tensors(task_model, [prefix + name for name in from_task])
    base_tensors = load_tensors(base, base_names)
    tensors = {}
    for name in base_names:
        if name in from_base:
            tensors[name] = base_tensors[name]
            continue
        tensor = task_tensors[prefix + name]
        if tensor.shape != base_tensors[name].shape:
            raise MergeShieldError(
                f"tensor {name}: shape {tuple(tensor.shape)} in {task_model} but "
                f"{tuple(base_tensors[name].shape)} in base {base}"
            )
        tensors[name] = tensor

    with atomic_dir(out) as tmp:
        save_tensors(tensors, tmp)
        shutil.copy2(base / "config.json", tmp / "config.json")
    return out
