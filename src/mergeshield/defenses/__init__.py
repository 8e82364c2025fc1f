"""Defenses: registry keyed by name; each samples an exact :class:`BlockTransform` per block."""

from mergeshield.defenses import published as _published  # noqa: F401  (registers them)
from mergeshield.defenses.base import DEFENSES, BlockContext, Defense, DefenseOptions, get_defense

__all__ = ["DEFENSES", "BlockContext", "Defense", "DefenseOptions", "get_defense"]
