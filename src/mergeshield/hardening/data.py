"""The owner's task data for ``harden``: read it from disk and turn it into model inputs.

Accepted sources (``labels`` are ints or label names from the model's ``config.label2id``):

* a JSONL file (one object per line with ``text`` and ``label``) or a CSV file with a header
  holding ``text`` and ``label`` columns: text classification;
* an image folder ``root/<label>/<image>`` (png, jpg, jpeg, bmp, gif, webp): image
  classification, the sub-folder names are the labels;
* a Hugging Face ``datasets`` folder written by ``save_to_disk`` (a ``DatasetDict`` uses its
  ``train`` split), with a ``label``/``labels`` column and a ``text``/``sentence`` or
  ``image``/``img`` column;
* a :class:`~mergeshield.tasks.TaskData` (its train split) or a sequence of
  ``(input, label)`` pairs.

A causal LM's task (:func:`prompt_answers`): prompt/answer pairs, a JSONL or CSV file or
a ``datasets`` folder with ``prompt`` and ``answer`` columns (:func:`read_prompt_answers`), a
generative task's train split, or a sequence of ``(prompt, answer)`` pairs; encoded as
``prompt + answer + eos`` with the loss on the answer and eos (:func:`encode_prompt_answers`).

Images are resized (bilinear) to the model's ``config.image_size`` and mapped to ``[-1, 1]``
(``(v / 255 - 0.5) / 0.5``, the ``ViTImageProcessor`` defaults and the zoo's convention),
unless the model folder ships a ``preprocessor_config.json``, which is then used instead.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergeshield.errors import MergeShieldError
from mergeshield.tasks import Splits, TaskData

Tensors = dict[str, torch.Tensor]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
IGNORE = -100  # a label no loss and no score looks at (transformers' ignore_index)


@dataclass
class Examples:
    """Raw training examples: texts, PIL images or a ready ``pixel_values`` tensor."""

    kind: str  # "text" or "image"
    inputs: list[Any] | torch.Tensor
    labels: list[Any]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class TrainingSet:
    """Model inputs (``input_ids`` + ``attention_mask``, or ``pixel_values``) and ``labels``."""

    tensors: Tensors = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tensors["labels"])


def read_examples(data: TaskData | str | Path | Sequence[tuple[Any, Any]]) -> Examples:
    """Read the examples of any accepted source (see the module docstring)."""
    if isinstance(data, TaskData):
        x, y = data.train.x, [int(v) for v in data.train.y]
        if data.kind == "image":
            return Examples("image", torch.as_tensor(x).float(), y)
        return Examples("text", [str(t) for t in x], y)
    if isinstance(data, str | Path):
        path = Path(data)
        if path.is_dir():
            if _is_datasets_folder(path):
                return _read_datasets_folder(path)
            return _read_image_folder(path)
        if not path.is_file():
            raise MergeShieldError(f"training data {path} not found")
        return _read_table(path)
    pairs = list(data)
    if pairs and not isinstance(pairs[0][0], str):
        return Examples("image", [x for x, _ in pairs], [y for _, y in pairs])
    return Examples("text", [str(t) for t, _ in pairs], [y for _, y in pairs])


def _read_table(path: Path) -> Examples:
    rows = _table_rows(path)
    try:
        return Examples("text", [str(r["text"]) for r in rows], [r["label"] for r in rows])
    except (KeyError, TypeError) as err:
        raise MergeShieldError(f"{path}: every row needs 'text' and 'label' ({err})") from err


def _table_rows(path: Path) -> list[Any]:
    """The rows of a JSONL file (one object a line) or a CSV file with a header."""
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise MergeShieldError(f"{path}:{i}: not a JSON object ({err.msg})") from err
        return rows
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    raise MergeShieldError(
        f"{path}: data must be .jsonl, .csv, an image folder or a datasets folder"
    )


def _is_datasets_folder(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_dataset(root: Path) -> Any:
    """A ``datasets`` ``save_to_disk`` folder (a ``DatasetDict``: its ``train`` split)."""
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError as err:
        raise MergeShieldError(
            f"reading {root} needs the datasets package: pip install datasets"
        ) from err
    ds = load_from_disk(str(root))
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise MergeShieldError(f"{root}: the DatasetDict has no 'train' split ({list(ds)})")
        ds = ds["train"]
    return ds


def read_prompt_answers(path: str | Path) -> tuple[list[str], list[str]]:
    """Prompts and reference answers of a causal-LM task: a JSONL or CSV file, or a
    ``datasets`` folder, with ``prompt`` and ``answer`` columns (strings, used as they are)."""
    path = Path(path)
    if path.is_dir() and _is_datasets_folder(path):
        ds = _load_dataset(path)
        missing = sorted({"prompt", "answer"} - set(ds.column_names))
        if missing:
            raise MergeShieldError(
                f"{path}: no {missing} column; prompt/answer data has 'prompt' and 'answer' "
                f"columns, this one has {sorted(ds.column_names)}"
            )
        rows = [{"prompt": p, "answer": a} for p, a in zip(ds["prompt"], ds["answer"], strict=True)]
    elif path.is_file():
        rows = _table_rows(path)
    else:
        raise MergeShieldError(f"{path}: not a JSONL/CSV file or a datasets folder")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not {"prompt", "answer"} <= set(row):
            have = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise MergeShieldError(f"{path}: row {i} needs 'prompt' and 'answer' (has {have})")
        if not isinstance(row["prompt"], str) or not isinstance(row["answer"], str):
            raise MergeShieldError(f"{path}: row {i}: prompt and answer must be strings")
        if not row["answer"]:
            raise MergeShieldError(f"{path}: row {i}: empty answer")
    return [r["prompt"] for r in rows], [r["answer"] for r in rows]


def prompt_answers(data: Any) -> tuple[list[str], list[str]]:
    """Prompts and answers of a causal LM's training data: a path
    (:func:`read_prompt_answers`), a generative task (its train split's ``prompts`` and
    ``answers``) or a sequence of ``(prompt, answer)`` string pairs."""
    if isinstance(data, str | Path):
        return read_prompt_answers(data)
    if isinstance(data, Splits):
        part = data.split("train")
        if not hasattr(part, "prompts"):
            raise MergeShieldError("a causal LM trains on prompt/answer pairs, not labelled data")
        return list(part.prompts), list(part.answers)
    pairs = list(data)
    if not all(len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], str) for p in pairs):
        raise MergeShieldError("a causal LM trains on (prompt, answer) string pairs")
    return [p for p, _ in pairs], [a for _, a in pairs]


def encode_prompt_answers(
    prompts: Sequence[str], answers: Sequence[str], tokenizer: Any, max_len: int
) -> Tensors:
    """``input_ids``/``attention_mask`` of ``prompt + answer + eos`` (right-padded, sorted by
    length) and ``labels``: the answer and eos ids, :data:`IGNORE` elsewhere.  Prompts are cut
    from the left so that the answer always fits in ``max_len`` tokens."""
    if not prompts:
        raise MergeShieldError("no prompt/answer examples")
    eos = tokenizer.eos_token_id
    rows, targets = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
        p = p[max(0, len(p) - (max_len - len(a))) :]
        rows.append(p + a)
        targets.append([IGNORE] * len(p) + a)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), eos, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, targets, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, : len(t)] = torch.tensor(t)
    order = torch.argsort(mask.sum(1), stable=True)
    return {"input_ids": ids[order], "attention_mask": mask[order], "labels": labels[order]}


def _read_image_folder(root: Path) -> Examples:
    try:
        from PIL import Image
    except ImportError as err:
        raise MergeShieldError(
            f"reading images from {root} needs Pillow: pip install pillow"
        ) from err

    images, labels = [], []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(label_dir.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(file) as im:
                    images.append(im.copy())
                labels.append(label_dir.name)
    if not images:
        raise MergeShieldError(
            f"{root}: no images found; an image folder holds root/<label>/<image>.png, "
            "a datasets folder holds dataset_dict.json or state.json"
        )
    return Examples("image", images, labels)


def _read_datasets_folder(root: Path) -> Examples:
    ds = _load_dataset(root)
    columns = set(ds.column_names)
    label = next((c for c in ("label", "labels") if c in columns), None)
    text = next((c for c in ("text", "sentence") if c in columns), None)
    image = next((c for c in ("image", "img") if c in columns), None)
    if label is None or (text is None and image is None):
        raise MergeShieldError(
            f"{root}: needs a label/labels column and a text/sentence or image/img column, "
            f"has {sorted(columns)}"
        )
    labels = list(ds[label])
    if text is not None:
        return Examples("text", [str(t) for t in ds[text]], labels)
    return Examples("image", list(ds[image]), labels)


def label_ids(labels: list[Any], label2id: dict[str, int], n_labels: int) -> torch.Tensor:
    """Labels as ids: ints (or digit strings) as they are, names through ``label2id``."""
    ids = []
    for y in labels:
        if isinstance(y, str) and not y.lstrip("-").isdigit():
            if y not in label2id:
                raise MergeShieldError(f"unknown label {y!r}; the model has {sorted(label2id)}")
            ids.append(label2id[y])
        else:
            ids.append(int(y))
    out = torch.as_tensor(ids, dtype=torch.long)
    if len(out) and (int(out.max()) >= n_labels or int(out.min()) < 0):
        raise MergeShieldError(f"labels must lie in [0, {n_labels}) (the model's num_labels)")
    return out


def encode_examples(
    examples: Examples, model_dir: Path, config: Any, *, tokenizer_dir: Path, max_len: int
) -> TrainingSet:
    """Tokenize texts (padding to the longest) or preprocess images; map labels to ids."""
    if not len(examples):
        raise MergeShieldError("no training examples")
    labels = label_ids(examples.labels, dict(config.label2id or {}), int(config.num_labels))
    if examples.kind == "text":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        enc = tokenizer(
            list(examples.inputs),
            truncation=True,
            max_length=max_len,
            padding="longest",
            return_tensors="pt",
        )
        return TrainingSet(
            {
                "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"],
                "labels": labels,
            }
        )
    return TrainingSet(
        {"pixel_values": pixel_values(examples.inputs, model_dir, config), "labels": labels}
    )


def pixel_values(images: list[Any] | torch.Tensor, model_dir: Path, config: Any) -> torch.Tensor:
    """``[N, C, s, s]`` model inputs for ``images`` (a tensor is taken as already prepared)."""
    if isinstance(images, torch.Tensor):
        return images.float()
    if (Path(model_dir) / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
        return processor(images=images, return_tensors="pt")["pixel_values"].float()
    size = int(config.image_size)
    channels = int(getattr(config, "num_channels", 3))
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for im in images:
        im = im.convert(mode).resize((size, size), resample=2)  # 2: PIL bilinear
        a = np.asarray(im, dtype=np.float32) / 255.0
        arrays.append(a[None] if channels == 1 else a.transpose(2, 0, 1))
    return (torch.from_numpy(np.stack(arrays)) - 0.5) / 0.5
