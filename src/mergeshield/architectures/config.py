"""``config.json`` read without transformers: the fields the family adapters need.

Importing transformers and parsing a config through ``AutoConfig`` costs 1.5-4 s on this
machine, more than copying a 1B checkpoint; ``protect`` only needs a dozen integers.  Each
model type lists the fields its adapter reads with transformers' defaults for them (a field
absent from ``config.json`` takes the value transformers would give it; tested against
``AutoConfig.for_model`` in ``tests/test_protect.py``).  Composite models (CLIP) name the
model type of each sub-config.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from mergeshield.errors import MergeShieldError

_ENCODER = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
}
_DECODER = _ENCODER | {  # Llama's defaults; Mistral and Qwen2 differ in two fields
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "intermediate_size": 11008,
    "num_key_value_heads": None,
    "head_dim": None,
    "hidden_act": "silu",
}

# --- decoder families of issue 16 -------------------------------------------------------
_GEMMA = {
    "hidden_size": 2304,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "intermediate_size": 9216,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
}
_ROTARY = {"rope_parameters": None, "rope_scaling": None, "partial_rotary_factor": None}
_EXPERTS = {"num_experts": None, "num_local_experts": None}  # either name; families.py's default
_QWEN_MOE = _EXPERTS | {
    "decoder_sparse_step": 1,
    "mlp_only_layers": None,
    "moe_intermediate_size": 1408,
}
DECODER_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3": _DECODER | {"intermediate_size": 22016, "num_key_value_heads": 32, "head_dim": 128},
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "phi3": _DECODER | {"hidden_size": 3072, "intermediate_size": 8192} | _ROTARY,
    "mixtral": _DECODER | _EXPERTS | {"intermediate_size": 14336, "num_key_value_heads": 8},
    "qwen2_moe": _DECODER
    | _QWEN_MOE
    | {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24}
    | {"num_attention_heads": 16, "num_key_value_heads": 16}
    | {"shared_expert_intermediate_size": 5632},
    "qwen3_moe": _DECODER
    | _QWEN_MOE
    | {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24}
    | {"num_attention_heads": 32, "num_key_value_heads": 4}
    | {"moe_intermediate_size": 768},
}

DEFAULTS: dict[str, dict[str, Any]] = {
    "bert": _ENCODER,
    "roberta": _ENCODER,
    "vit": _ENCODER,
    "clip_text_model": _ENCODER
    | {"hidden_size": 512, "num_attention_heads": 8, "intermediate_size": 2048}
    | {"hidden_act": "quick_gelu"},
    "clip_vision_model": _ENCODER | {"hidden_act": "quick_gelu"},
    "gpt2": {
        "n_layer": 12,
        "n_embd": 768,
        "n_head": 12,
        "n_inner": None,
        "activation_function": "gelu_new",
    },
    "llama": _DECODER,
    "mistral": _DECODER | {"intermediate_size": 14336, "num_key_value_heads": 8},
    "qwen2": _DECODER | {"intermediate_size": 22016, "num_key_value_heads": 32},
    # encoder / seq2seq families (issue 16)
    "xlm-roberta": _ENCODER,
    "distilbert": {
        "dim": 768,
        "n_layers": 6,
        "n_heads": 12,
        "hidden_dim": 3072,
        "activation": "gelu",
    },
    "t5": {
        "d_model": 512,
        "d_kv": 64,
        "d_ff": 2048,
        "num_layers": 6,
        "num_decoder_layers": None,
        "num_heads": 8,
        "feed_forward_proj": "relu",
    },
} | DECODER_DEFAULTS
SUB_CONFIGS: dict[str, dict[str, str]] = {
    "clip": {"text_config": "clip_text_model", "vision_config": "clip_vision_model"},
}
_STRINGS = {"hidden_act", "activation_function", "activation", "feed_forward_proj"}
_STRINGS |= {"hidden_activation"}
_FREE = {"mlp_only_layers"} | set(_ROTARY)  # checked where read (families._rotary_fraction)


def read_config(raw: dict[str, Any], model_type: str | None = None) -> SimpleNamespace:
    """The adapter's view of a parsed ``config.json``: its fields, defaults filled in.

    Integer fields must be positive integers (or null where their default is null), the
    activation a string; anything else raises :class:`MergeShieldError` naming the field.
    """
    model_type = model_type or raw.get("model_type")
    if model_type not in DEFAULTS and model_type not in SUB_CONFIGS:
        raise MergeShieldError(f"config.json: unsupported model_type {model_type!r}")
    fields: dict[str, Any] = {"model_type": model_type}
    for key, default in DEFAULTS.get(model_type, {}).items():
        value = raw.get(key, default)
        nullable = default is None  # e.g. num_key_value_heads: null means "as many as heads"
        if key in _STRINGS:
            if not isinstance(value, str):
                raise MergeShieldError(f"config.json: {key} must be a string, got {value!r}")
        elif key not in _FREE and not (nullable and value is None) and not _positive_int(value):
            raise MergeShieldError(f"config.json: {key} must be a positive integer, got {value!r}")
        fields[key] = value
    for key, sub_type in SUB_CONFIGS.get(model_type, {}).items():
        sub = raw.get(key) or {}
        if not isinstance(sub, dict):
            raise MergeShieldError(f"config.json: {key} must be an object, got {sub!r}")
        fields[key] = read_config(sub, sub_type)
    return SimpleNamespace(**fields)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


_LAYER_COUNTS = ("num_hidden_layers", "n_layer")


def check_layer_counts(config: SimpleNamespace, n_tensors: int, where: object) -> None:
    """Refuse a config whose layer count exceeds the checkpoint's tensor count (every layer
    stores several tensors), before anything is built per layer: ``num_hidden_layers: 1e18``
    is a one-line error, not a loop that never ends or exhausts memory."""
    for key, value in vars(config).items():
        if isinstance(value, SimpleNamespace):
            check_layer_counts(value, n_tensors, where)
        elif key in _LAYER_COUNTS and isinstance(value, int) and value > n_tensors:
            raise MergeShieldError(
                f"{where}: config.json says {key}={value}, but the checkpoint stores only "
                f"{n_tensors} tensors: config.json is not this model's"
            )
