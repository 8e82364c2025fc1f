"""Declarative architecture specs, one adapter per model family."""

from mergeshield.architectures.families import FAMILIES, SUPPORTED_MODEL_TYPES, describe
from mergeshield.architectures.spec import AttentionSpec, BlockSpec, MLPSpec, ModelSpec, Slot

__all__ = [
    "FAMILIES",
    "SUPPORTED_MODEL_TYPES",
    "AttentionSpec",
    "BlockSpec",
    "MLPSpec",
    "ModelSpec",
    "Slot",
    "describe",
]
