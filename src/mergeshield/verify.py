"""``verify``: does the protected model compute the same function as the original?

Both folders are loaded with stock ``transformers`` Auto classes (no ``trust_remote_code``)
and run on the same inputs: the given texts (tokenized with the original's tokenizer) or
random token ids / pixel tensors of the model's shapes.  Reported: the max absolute and max
relative error ``max|y_p - y_o| / max|y_o|`` of the outputs (logits, embeddings or last hidden
state) and, per tensor group, the relative L2 distance ``||W_p - W_o|| / ||W_o||``.

The yardstick depends on the precision.  fp32 (and wider) checkpoints: the relative error must
stay within ``tolerance``.  bf16/fp16 checkpoints: every protected weight was rounded once in
that dtype, so both models run in fp32 and the protected model's error is compared with a
*round trip* of the original, its weights rounded once more in the same dtype (scaled by
``ROUND_TRIP_SCALE`` first, so the rounding is a fresh one): the protected error may be up
to ``LOW_PRECISION_FACTOR`` times the round trip's (or ``tolerance``, whichever is larger).
For causal language models the greedy next tokens at every input position are compared too;
in low precision they may differ at most ``LOW_PRECISION_FACTOR`` times as often as the round
trip's, or at one position or 1% of them (a near-tie may flip either way).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeshield.arrays import LOW_PRECISION_CODES
from mergeshield.checkpoint import Checkpoint, open_checkpoint
from mergeshield.errors import MergeShieldError
from mergeshield.folders import VOCABULARY_FILES
from mergeshield.shards import reader

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
# README: SmolLM2's bf16 logit error is 2.2x a plain round trip's; tests allow MiniLM 3x.
LOW_PRECISION_FACTOR = 4.0
ROUND_TRIP_SCALE = 1.3  # not a power of two: w * 1.3 rounds afresh


@dataclass
class VerifyReport:
    max_abs_error: float
    max_rel_error: float
    tolerance: float
    outputs: str  # which output was compared
    moved: dict[str, float] = field(default_factory=dict)  # tensor group -> relative L2 distance
    yardstick: str = "tolerance"  # or "bf16 round trip" / "fp16 round trip"
    round_trip_error: float | None = None  # relative error of the round trip (low precision)
    tokens_compared: int = 0  # greedy next-token positions compared (causal LMs)
    tokens_differ: int | None = None
    round_trip_tokens_differ: int | None = None

    @property
    def bound(self) -> float:
        """The largest relative error accepted."""
        if self.round_trip_error is None:
            return self.tolerance
        return max(self.tolerance, LOW_PRECISION_FACTOR * self.round_trip_error)

    @property
    def ok(self) -> bool:
        if self.max_rel_error > self.bound:
            return False
        if self.tokens_differ is None or self.round_trip_tokens_differ is None:
            return True  # full precision: the tolerance decides, the tokens are reported
        allowed = max(
            LOW_PRECISION_FACTOR * self.round_trip_tokens_differ, 0.01 * self.tokens_compared, 1
        )
        return self.tokens_differ <= allowed


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
            tok = load_tokenizer(folder)
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


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer saved in ``folder``; one error line when it has none or it fails."""
    if not any((Path(folder) / name).is_file() for name in VOCABULARY_FILES):
        raise MergeShieldError(
            f"{folder}: no tokenizer files ({', '.join(VOCABULARY_FILES)}); --text needs them "
            "(leave --text out to compare on random token ids)"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:
        message = f"{folder}: cannot load its tokenizer ({_first_line(err)})"
        raise MergeShieldError(message) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def model_output(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
    import torch

    with torch.inference_mode():
        out = model(**inputs)
    for name in OUTPUT_FIELDS:
        value = getattr(out, name, None)
        if value is not None:
            return name, value.double()
    raise AssertionError(f"no comparable output in {type(out).__name__}")


def tensor_groups(spec: Any) -> dict[str, list[str]]:
    """Tensor names per group: each block's attention (with its per-head norms), each MLP of a
    block (``layer 0 mlp``; a mixture-of-experts layer's ``layer 0 expert3 mlp`` for every
    expert and ``layer 0 shared mlp``), and everything else."""
    groups: dict[str, list[str]] = {}
    for block in spec.blocks:
        att = {n for s in block.attention.slots().values() for n in s.names()}
        groups[f"{block.name} attention"] = sorted(att | set(block.attention.norms()))
        for mlp in block.mlps():  # none in an attention-only block (T5's cross-attention)
            label = f"{block.name} {mlp.label}" if mlp.label else block.name
            groups[f"{label} mlp"] = sorted({n for s in mlp.slots().values() for n in s.names()})
    groups["embeddings, norms, heads"] = list(spec.residual)
    return groups


def tensor_group_distances(original: Checkpoint, protected: Checkpoint) -> dict[str, float]:
    """``||W_p - W_o|| / ||W_o||`` per group of :func:`tensor_groups`."""
    distances = {}
    with reader(original) as a, reader(protected) as b:
        for group, names in tensor_groups(original.spec).items():
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


def low_precision_code(checkpoint: Checkpoint) -> str | None:
    """``BF16`` or ``F16`` when a transformed (block) tensor is stored in it, else None."""
    codes = {checkpoint.codes[n] for b in checkpoint.spec.blocks for n in b.tensor_names()}
    return next((code for code in LOW_PRECISION_CODES if code in codes), None)


def round_trip(model: Any, dtype: torch.dtype) -> None:
    """Round every floating weight of ``model`` once more through ``dtype``, in place:
    ``w <- dtype(w * ROUND_TRIP_SCALE) / ROUND_TRIP_SCALE`` (the error one rounding costs)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.copy_((p * ROUND_TRIP_SCALE).to(dtype).to(p.dtype) / ROUND_TRIP_SCALE)


def _run(folder: Path, inputs: dict[str, torch.Tensor], model: Any) -> tuple[str, torch.Tensor]:
    try:
        return model_output(model, inputs)
    except Exception as err:
        raise MergeShieldError(f"{folder}: the model fails to run ({_first_line(err)})") from None


def _load(folder: Path, dtype: torch.dtype | None) -> Any:
    try:
        return load_model(folder, dtype)
    except Exception as err:
        raise MergeShieldError(
            f"{folder}: transformers cannot load this model ({_first_line(err)})"
        ) from None


def _greedy(name: str, y: torch.Tensor, inputs: dict[str, torch.Tensor], causal: bool):
    """Greedy next tokens at every attended position of a causal LM's logits, else None."""
    if not causal or name != "logits":
        return None
    mask = inputs.get("attention_mask")
    tokens = y.argmax(-1)
    return tokens[mask.bool()] if mask is not None else tokens.reshape(-1)


def verify(
    original: str | os.PathLike,
    protected: str | os.PathLike,
    *,
    texts: list[str] | None = None,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> VerifyReport:
    """Compare the two models' outputs on the same inputs, and how far their weights moved;
    low-precision checkpoints are judged against a round trip of the original (module doc).
    A model that transformers cannot load or run is bad input (:class:`MergeShieldError`)."""
    import torch

    original, protected = Path(original), Path(protected)
    ckpt_o, ckpt_p = open_checkpoint(original), open_checkpoint(protected)
    if ckpt_o.shapes != ckpt_p.shapes:
        raise MergeShieldError(f"{protected}: tensors differ in names or shapes from {original}")
    low = low_precision_code(ckpt_o) or low_precision_code(ckpt_p)
    run_dtype = torch.float32 if low is not None else None
    model_o = _load(original, run_dtype)
    causal = type(model_o).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    inputs = make_inputs(original, model_o.config, texts, seed)
    name, y_o = _run(original, inputs, model_o)
    _, y_p = _run(protected, inputs, _load(protected, run_dtype))
    scale = max(y_o.abs().max().item(), 1e-30)
    abs_err = (y_p - y_o).abs().max().item()
    tokens_o, tokens_p = _greedy(name, y_o, inputs, causal), _greedy(name, y_p, inputs, causal)
    report = VerifyReport(
        max_abs_error=abs_err,
        max_rel_error=abs_err / scale,
        tolerance=tolerance,
        outputs=name,
        moved=tensor_group_distances(ckpt_o, ckpt_p),
    )
    if tokens_o is not None and tokens_p is not None:
        report.tokens_compared = len(tokens_o)
        report.tokens_differ = int((tokens_o != tokens_p).sum())
    if low is not None:
        round_trip(model_o, torch.bfloat16 if low == "BF16" else torch.float16)
        _, y_r = _run(original, inputs, model_o)
        report.yardstick = {"BF16": "bf16", "F16": "fp16"}[low] + " round trip"
        report.round_trip_error = (y_r - y_o).abs().max().item() / scale
        tokens_r = _greedy(name, y_r, inputs, causal)
        if tokens_o is not None and tokens_r is not None:
            report.round_trip_tokens_differ = int((tokens_o != tokens_r).sum())
    return report


def _kind(group: str) -> str | None:
    """``attention``, ``mlp``, ``expert`` (an MLP of a mixture-of-experts layer) or None."""
    words = group.split()
    if words[-1] == "attention":
        return "attention"
    if words[-1] != "mlp":
        return None
    return "expert" if re.fullmatch(r"expert\d+|shared", words[-2]) else "mlp"


def moved_summary(moved: dict[str, float]) -> str:
    """One line: the range of the relative L2 distance moved by attention groups, dense MLPs
    and experts (shared experts included) across blocks, and by everything else."""
    parts = []
    for kind, unit in (("attention", "blocks"), ("mlp", "blocks"), ("expert", "experts")):
        values = [v for group, v in moved.items() if _kind(group) == kind]
        if values:
            name = "experts" if kind == "expert" else kind
            parts.append(f"{name} {min(values):.3f}-{max(values):.3f} ({len(values)} {unit})")
    for group, value in moved.items():
        if _kind(group) is None:
            parts.append(f"{group} {value:.3f}")
    return "weights moved (relative L2 distance): " + "; ".join(parts)
