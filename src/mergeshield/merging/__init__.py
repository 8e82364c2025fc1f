"""Merges exactly as free-riders run them, through mergekit 0.1.5 (see ``methods.py``)."""

from mergeshield.merging.backbone import backbone_prefix, extract_backbone
from mergeshield.merging.mergekit_runner import (
    aliases_bug_present,
    mergekit_workarounds,
    run_mergekit,
)
from mergeshield.merging.methods import METHODS, MergeMethod, get_method, merge, merge_config
from mergeshield.merging.sweep import SweepResult, sweep

__all__ = [
    "METHODS",
    "MergeMethod",
    "SweepResult",
    "aliases_bug_present",
    "backbone_prefix",
    "extract_backbone",
    "get_method",
    "merge",
    "merge_config",
    "mergekit_workarounds",
    "run_mergekit",
    "sweep",
]
