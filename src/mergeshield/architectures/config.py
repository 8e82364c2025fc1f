"""``config.json`` read without transformers: the fields the family adapters need.

Importing transformers and parsing a config through ``AutoConfig`` costs 1.5-4 s on this
machine, more than copying a 1B checkpoint; ``protect`` only needs a dozen integers.  Each
model type lists the fields its adapter reads with transformers' defaults for them (a field
absent from ``config.json`` takes the value transformers would give it; tested against
``AutoConfig.for_model`` in ``tests/test_protect.py``).  Composite models (CLIP) name the
model type of each sub-config.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

from mergeshield.architectures.families import FAMILIES
from mergeshield.errors import MergeShieldError

# Per model type: the fields its adapter reads, with transformers' defaults (kept beside the
# adapter in families.FAMILIES); composite types (CLIP) name the model type of each sub-config.
DEFAULTS: dict[str, Mapping[str, Any]] = {t: a.defaults for t, a in FAMILIES.items() if a.defaults}
SUB_CONFIGS: dict[str, Mapping[str, str]] = {
    t: a.sub_configs for t, a in FAMILIES.items() if a.sub_configs
}
_STRINGS = {"hidden_act", "activation_function", "activation", "feed_forward_proj"}
_STRINGS |= {"hidden_activation"}
_FREE = {
    "mlp_only_layers",
    "rope_parameters",
    "rope_scaling",
    "partial_rotary_factor",
}  # checked where read (families._rotary_fraction)


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
