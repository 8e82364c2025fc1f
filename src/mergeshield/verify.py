"""``verify``: does the protected model compute the same function as the original?

Both folders are loaded with stock ``transformers`` Auto classes (no ``trust_remote_code``)
and run on the same inputs: the given texts (tokenized with the original's tokenizer) or
random token ids / pixel tensors of the model's shapes.  Reported: the max absolute and max
relative error ``max|y_p - y_o| / max|y_o|`` of the outputs (logits, embeddings or last hidden
state) and, per tensor group, the relative L2 distance ``||W_p - W_o|| / ||W_o||``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeshield.checkpoint import Checkpoint, open_checkpoint, reader

if TYPE_CHECKING:
    import torch

AUTO_CLASSES = {  # architecture-name suffix -> transformers Auto class
    "ForCausalLM": "AutoModelForCausalLM",
    "LMHeadModel": "AutoModelForCausalLM",
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForImageClassification": "AutoModelForImageClassification",
    "ForMaskedLM": "AutoModelForMaskedLM",
    "ForConditionalGeneration": "AutoModelForSeq2SeqLM",  # T5
    "T5EncoderModel": "AutoModelForTextEncoding",
}
OUTPUT_FIELDS = ("logits", "logits_per_image", "last_hidden_state", "image_embeds")


@dataclass
class VerifyReport:
    max_abs_error: float
    max_rel_error: float
    tolerance: float
    outputs: str  # which output was compared
    moved: dict[str, float] = field(default_factory=dict)  # tensor group -> relative L2 distance

    @property
    def ok(self) -> bool:
        return self.max_rel_error <= self.tolerance


def load_model(folder: Path, dtype: torch.dtype | None = None) -> Any:
    """The model in ``folder`` through the Auto class matching its ``architectures`` entry."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    arch = (getattr(config, "architectures", None) or [""])[0]
    auto = next((cls for suffix, cls in AUTO_CLASSES.items() if arch.endswith(suffix)), "AutoModel")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = getattr(transformers, auto).from_pretrained(
        str(folder), local_files_only=True, **kwargs
    )
    return model.eval()


def make_inputs(
    folder: Path, config: Any, texts: list[str] | None = None, seed: int = 0, batch: int = 4
) -> dict[str, torch.Tensor]:
    """Model inputs: tokenized ``texts``, else random token ids and/or pixels."""
    import torch

    g = torch.Generator().manual_seed(seed)
    text_cfg = getattr(config, "text_config", None) or config
    vision_cfg = getattr(config, "vision_config", None)
    if vision_cfg is None and getattr(config, "model_type", "") in ("vit", "clip_vision_model"):
        vision_cfg = config
    inputs: dict[str, torch.Tensor] = {}
    if vision_cfg is not None:
        size, channels = vision_cfg.image_size, getattr(vision_cfg, "num_channels", 3)
        inputs["pixel_values"] = torch.randn(batch, channels, size, size, generator=g)
    if vision_cfg is None or getattr(config, "model_type", "") == "clip":
        if texts:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
            inputs |= {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        else:
            max_len = min(16, getattr(text_cfg, "max_position_embeddings", 16) or 16)
            ids = torch.randint(0, text_cfg.vocab_size, (batch, max_len), generator=g)
            inputs["input_ids"] = ids
            inputs["attention_mask"] = torch.ones_like(ids)
    if getattr(config, "is_encoder_decoder", False):  # T5: the decoder reads the same ids
        inputs["decoder_input_ids"] = inputs["input_ids"]
    return inputs


def model_output(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
    import torch

    with torch.inference_mode():
        out = model(**inputs)
    for name in OUTPUT_FIELDS:
        value = getattr(out, name, None)
        if value is not None:
            return name, value.double()
    raise AssertionError(f"no comparable output in {type(out).__name__}")


def tensor_group_distances(original: Checkpoint, protected: Checkpoint) -> dict[str, float]:
    """``||W_p - W_o|| / ||W_o||`` per attention block, MLP block, and everything else."""
    groups: dict[str, list[str]] = {}
    for block in original.spec.blocks:
        att = {n for s in block.attention.slots().values() for n in s.names()}
        mlp = {n for s in block.slots().values() for n in s.names()} - att
        groups[f"{block.name} attention"] = sorted(att)
        if mlp:  # none in an attention-only block (T5's cross-attention)
            groups[f"{block.name} mlp"] = sorted(mlp)
    groups["embeddings, norms, heads"] = list(original.spec.residual)
    distances = {}
    with reader(original) as a, reader(protected) as b:
        for group, names in groups.items():
            diff = norm = 0.0
            for name in names:
                x = a.get(name)
                if not x.is_floating_point():
                    continue
                x = x.double()
                diff += (b.get(name).double() - x).square().sum().item()
                norm += x.square().sum().item()
            distances[group] = (diff / norm) ** 0.5 if norm else 0.0
    return distances


def verify(
    original: str | os.PathLike,
    protected: str | os.PathLike,
    *,
    texts: list[str] | None = None,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> VerifyReport:
    """Compare the two models' outputs on the same inputs, and how far their weights moved."""
    original, protected = Path(original), Path(protected)
    ckpt_o, ckpt_p = open_checkpoint(original), open_checkpoint(protected)
    if ckpt_o.shapes != ckpt_p.shapes:
        from mergeshield.errors import MergeShieldError

        raise MergeShieldError(f"{protected}: tensors differ in names or shapes from {original}")
    model_o = load_model(original)
    inputs = make_inputs(original, model_o.config, texts, seed)
    name, y_o = model_output(model_o, inputs)
    _, y_p = model_output(load_model(protected), inputs)
    abs_err = (y_p - y_o).abs().max().item()
    rel_err = abs_err / max(y_o.abs().max().item(), 1e-30)
    return VerifyReport(
        max_abs_error=abs_err,
        max_rel_error=rel_err,
        tolerance=tolerance,
        outputs=name,
        moved=tensor_group_distances(ckpt_o, ckpt_p),
    )
