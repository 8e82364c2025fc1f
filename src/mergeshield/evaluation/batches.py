"""The two helpers every evaluation and training loop shares at the transformers boundary:
batches cut to their longest row, and quiet model loading.  Imports nothing of mergeshield,
so the zoo and the accuracy module can both stand on it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


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
