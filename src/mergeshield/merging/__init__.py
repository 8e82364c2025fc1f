"""Merges exactly as free-riders run them: real mergekit 0.1.5 runs on local folders, offline.

* :func:`extract_backbone` cuts a task model's backbone out, in the base model's layout.
* :func:`merge` runs one method of :data:`METHODS` at one coefficient (formulas in
  ``methods.py``); :func:`sweep` is the strong attacker that tries a whole grid of coefficients
  and keeps the best-scoring merge.
* ``kernels.py`` is the task-vector room: the same nine formulas on tensors in memory
  (sparsify, sign election, linear, slerp, model_stock), parity-tested against mergekit, for
  sweeps that need no folder per coefficient (:func:`~mergeshield.merging.kernels.prepare`).
* ``mergekit_runner.py`` holds every contact with mergekit's internals, including the one
  context manager that works around its known bugs (:func:`mergekit_workarounds`).
"""

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
