"""The torch/transformers boundary: models from folders, stored names, batches, quiet loading.

Everything that loads a transformers model for training or scoring stands on this room:
:func:`load_classifier` (stock ``AutoModelFor...Classification``, local files only),
:func:`swap_backbone` (a merged backbone into a task model), :func:`stored_to_module_names`
(the one mapping between the names a checkpoint stores and the names a loaded module uses),
:func:`backbone_map` (a task model's backbone parameters to base tensors), :func:`take_batch`,
:func:`quiet_transformers`, and :func:`train_steps`, the one training loop.  Causal LMs
(:func:`load_causal_lm`) have no head: a merge replaces the whole model (:func:`merged_part`).
"""

from __future__ import annotations

import contextlib
import functools
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from mergeshield.errors import MergeShieldError
from mergeshield.folders import load_tensors, save_tensors, scratch, weight_files

Tensors = dict[str, torch.Tensor]


def take_batch(
    data: dict[str, torch.Tensor], index: torch.Tensor | slice
) -> dict[str, torch.Tensor]:
    """Rows ``index`` of every tensor in ``data``; token tensors (and per-token ``labels`` of a
    causal LM) are cut to the longest row."""
    batch = {k: v[index] for k, v in data.items()}
    if "attention_mask" in batch:
        length = max(int(batch["attention_mask"].sum(1).max()), 1)
        for k in ("input_ids", "attention_mask", "token_type_ids", "labels"):
            if k in batch and batch[k].dim() == 2:
                batch[k] = batch[k][:, :length]
    return batch


def share_correct(
    model: torch.nn.Module,
    data: dict[str, torch.Tensor],
    judge: Callable[[torch.nn.Module, Tensors, torch.Tensor], torch.Tensor],
    batch_size: int = 32,
) -> float:
    """Share of the rows of ``data`` that ``judge(model, inputs, labels)`` (it runs the model;
    one bool per row) calls right, the model in eval mode, without gradients,
    :func:`take_batch` at a time (32 rows: on 2 CPU cores 15-25% faster than 128 for MiniLM
    and the small ViT, the activations stay in cache; the family caches store rows sorted by
    length, so batches are barely padded)."""
    model.eval()
    n = len(data["labels"])
    correct = 0
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            batch = take_batch(data, slice(i, i + batch_size))
            labels = batch.pop("labels")
            correct += int(judge(model, batch, labels).sum())
    return correct / n


def train_steps(
    model: torch.nn.Module,
    data: dict[str, torch.Tensor],
    batches: Iterable[torch.Tensor],
    *,
    lr: float,
    weight_decay: float = 0.0,
    warmup: tuple[int, int] | None = None,
    after_step: Callable[[int, float], None] | None = None,
    loss: Callable[[Tensors], torch.Tensor] | None = None,
    dropout: bool = True,
) -> list[float]:
    """The one training loop: for each row index in ``batches``, the loss on :func:`take_batch`
    of ``data`` (``loss(batch)``, default the model's own loss on inputs and ``labels``), AdamW
    on the parameters that require gradients, their norm clipped at 1, and ``after_step(step,
    loss)`` (steps count from 1).  ``warmup = (w, total)``: linear warm-up over ``w`` steps,
    then linear decay to 0 at ``total``.  ``dropout=False`` trains in eval mode.  Returns the
    losses; the model is left in eval mode.  ``batches`` is read lazily, one index per step."""
    trained = [p for p in model.parameters() if p.requires_grad]  # frozen ones stay
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=weight_decay)
    sched = None
    if warmup is not None:
        from transformers import get_linear_schedule_with_warmup

        sched = get_linear_schedule_with_warmup(opt, *warmup)
    losses: list[float] = []
    for step, index in enumerate(batches, start=1):
        model.train(dropout)
        batch = take_batch(data, index)
        value = model(**batch).loss if loss is None else loss(batch)
        value.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(value.item())
        if after_step is not None:
            after_step(step, losses[-1])
    model.eval()
    return losses


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and weight-loading progress bars for a block."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


CAUSAL_LM_ENDINGS = ("ForCausalLM", "LMHeadModel")  # architecture names of causal LMs


def model_kind(folder: Path) -> str:
    """``"llm"`` for a causal LM checkpoint (``...ForCausalLM``), ``"image"`` for an
    ``...ForImageClassification`` one, else ``"text"``."""
    from transformers import AutoConfig

    with quiet_transformers():
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    architectures = config.architectures or []
    if any(a.endswith(CAUSAL_LM_ENDINGS) for a in architectures):
        return "llm"
    image = any(a.endswith("ForImageClassification") for a in architectures)
    return "image" if image else "text"


def load_model(folder: Path, kind: str) -> torch.nn.Module:
    """:func:`load_causal_lm` for kind ``llm``, else :func:`load_classifier`."""
    return load_causal_lm(folder) if kind == "llm" else load_classifier(folder, kind)


def load_classifier(folder: Path, kind: str) -> torch.nn.Module:
    """A classification checkpoint loaded with ``AutoModelFor{Sequence,Image}Classification``
    from a local folder (no remote code, no hub access), float32, in eval mode."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if kind == "text" else AutoModelForImageClassification
    return _load(auto, folder)


def load_causal_lm(folder: Path) -> torch.nn.Module:
    """A causal LM loaded in fp32 with the stock ``AutoModelForCausalLM`` from a local folder,
    in eval mode."""
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, folder)


def _load(auto: Any, folder: Path) -> torch.nn.Module:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise MergeShieldError(f"{folder} is not a model checkpoint folder (no config.json)")
    with quiet_transformers():
        model = auto.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    return model.eval()


def is_causal_lm(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a causal LM (``...ForCausalLM``/``...LMHeadModel`` class)."""
    return type(model).__name__.endswith(CAUSAL_LM_ENDINGS)


def merged_part(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose weights a merge replaces: a classifier's base model (each task keeps
    its own head), a causal LM whole (no head: the merged model itself answers)."""
    return model if is_causal_lm(model) else model.base_model


def load_merged(model: torch.nn.Module, tensors: Tensors) -> None:
    """Load ``tensors`` (named as :func:`merged_part`'s state dict) into that part of
    ``model``; every tensor must be given except BERT's pooler and a tied ``lm_head``."""
    tied = is_causal_lm(model) and getattr(model.config, "tie_word_embeddings", False)
    optional = ("pooler.",) + (("lm_head.",) if tied else ())
    missing = merged_part(model).load_state_dict(tensors, strict=False).missing_keys
    absent = [k for k in missing if not k.startswith(optional)]
    if absent:
        raise MergeShieldError(f"backbone lacks {absent[:3]}")


def merged_prefix(model: torch.nn.Module) -> str:
    """The prefix of :func:`merged_part`'s parameter names in ``model`` ('' for a causal LM)."""
    return "" if is_causal_lm(model) else getattr(model, "base_model_prefix", "")


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


def stored_to_module_names(module: torch.nn.Module, base: Path) -> dict[str, str]:
    """``stored tensor name -> state_dict name`` for the base-model class of ``module``.

    transformers 5 renames some checkpoints on load (ViT's ``encoder.layer.0.attention.
    attention.query`` is ``layers.0.attention.q_proj`` in memory), and in-memory merges load
    stored names with ``load_state_dict``.  The map is read off the stock loader: a copy of
    ``base`` whose ``i``-th tensor is filled with the marker ``i + 1`` is loaded with
    ``from_pretrained``, and each module tensor's marker names its source.  Empty (identity)
    where the names already agree; only the safetensors headers are read for that check, and
    the marker load is done once per class and folder."""
    if _float_names(Path(base)) <= set(module.state_dict()):
        return {}
    return dict(_marker_names(type(module), str(Path(base).resolve())))


def _float_names(folder: Path) -> set[str]:
    """Names of the floating tensors of a checkpoint folder (headers only)."""
    from safetensors import safe_open

    names = set()
    for file in sorted(set(weight_files(folder).values())):
        with safe_open(str(file), framework="pt") as f:
            names |= {n for n in f.keys() if f.get_slice(n).get_dtype().startswith(("F", "BF"))}  # noqa: SIM118
    return names


@functools.lru_cache(maxsize=16)
def _marker_names(module_class: type, base: str) -> tuple[tuple[str, str], ...]:
    layout = load_tensors(Path(base), sorted(_float_names(Path(base))))
    order = sorted(layout)
    with scratch("names") as tmp:
        marked = {
            k: torch.full(layout[k].shape, i + 1.0, dtype=layout[k].dtype)
            for i, k in enumerate(order)
        }
        save_tensors(marked, tmp)
        shutil.copy2(Path(base) / "config.json", tmp / "config.json")
        with quiet_transformers():
            loaded = module_class.from_pretrained(tmp, local_files_only=True, dtype=torch.float32)
    names: dict[str, str] = {}
    for target, tensor in loaded.state_dict().items():
        values = tensor.unique() if tensor.numel() else tensor
        if len(values) == 1 and 1 <= values.item() <= len(order) and values.item() % 1 == 0:
            names[order[int(values.item()) - 1]] = target
    missing = sorted(set(order) - set(names))
    if missing:
        raise MergeShieldError(
            f"cannot tell which {module_class.__name__} tensor {missing[0]} of {base} loads into"
        )
    return tuple(names.items())


def base_in_module_names(model: torch.nn.Module, base: Path) -> Tensors:
    """The base folder's tensors (float32) keyed as :func:`merged_part` names them."""
    rename = stored_to_module_names(merged_part(model), base)
    return {rename.get(k, k): v.float() for k, v in load_tensors(Path(base)).items()}


def backbone_map(model: torch.nn.Module, base: Tensors) -> dict[str, str]:
    """``model parameter name -> base tensor name`` for every backbone parameter of ``model``
    (``bert.encoder...`` -> ``encoder...``; a causal LM's every parameter, named as stored)
    whose shape matches the base tensor (``base`` keyed as :func:`base_in_module_names` keys
    it)."""
    prefix = merged_prefix(model)
    mapping = {}
    for name, p in model.named_parameters():
        short = name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name
        if short in base and base[short].shape == p.shape:
            mapping[name] = short
    if not mapping:
        raise MergeShieldError("no parameter of the task model matches a base tensor")
    return mapping
