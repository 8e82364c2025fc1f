"""Attacks by an informed adversary who holds the public base model.

``attack(protected, base, out, method)`` rewrites a protected checkpoint so that its weights
line up with the base model again (same layout, loadable by stock transformers), working from
the two sets of weights only, never from the key.  The maths of each method is in
:mod:`mergeshield.attacks.align`.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeshield.architectures.spec import BlockSpec
from mergeshield.checkpoint import (
    Checkpoint,
    check_output_path,
    check_same_architecture,
    open_checkpoint,
)
from mergeshield.progress import progress_bar
from mergeshield.registry import Registry
from mergeshield.rewrite import rewrite
from mergeshield.shards import reader
from mergeshield.symmetries.transform import BlockTransform, apply_transform
from mergeshield.version import __version__

if TYPE_CHECKING:
    import torch

    Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Attack:
    """``align_block(block, protected float64 tensors, base float64 tensors) -> tensors``: the
    function ``function`` of :mod:`mergeshield.attacks.align` (imported on first use, so that
    listing the attacks imports neither torch nor scipy)."""

    name: str
    summary: str
    function: str

    def align_block(self, block: BlockSpec, prot: Tensors, base: Tensors) -> Tensors:
        align = importlib.import_module("mergeshield.attacks.align")
        return getattr(align, self.function)(block, prot, base)

    def stack_order(self, blocks: list[tuple[BlockSpec, Tensors, Tensors]]) -> BlockTransform:
        """One head permutation for a stack of layers that share it (``align.stack_head_order``)."""
        align = importlib.import_module("mergeshield.attacks.align")
        return align.stack_head_order(blocks, self.function)


ATTACKS: Registry[Attack] = Registry("attack")
ATTACKS.register(
    Attack(
        "aga",
        "anchor alignment: per-head ridge least squares to the base, Hungarian on MLP units",
        "aga",
    )
)
ATTACKS.register(
    Attack(
        "rebasin", "Git Re-Basin weight matching: head and MLP unit permutations only", "rebasin"
    )
)
ATTACKS.register(
    Attack(
        "procrustes",
        "orthogonal Procrustes per head (jointly on QK and on VO, exact), Hungarian on MLP",
        "procrustes",
    )
)
get_attack = ATTACKS.lookup


def attack(
    protected: str | os.PathLike,
    base: str | os.PathLike,
    out: str | os.PathLike,
    method: str = "aga",
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write ``protected`` aligned to the public ``base`` with ``method`` to ``out``.

    Blocks are processed one at a time (the base block is read alongside, matched by block
    index and role, so a task model ``bert.encoder...`` may be aligned to a base
    ``encoder...``); tensors outside the blocks are copied unchanged.  Returns ``out``.
    """
    spec = get_attack(method)
    src, out = open_checkpoint(protected), Path(out)
    check_output_path(src.path, out, overwrite, [base])
    base_ckpt = open_checkpoint(base)
    check_same_architecture(src, base_ckpt)

    with (
        reader(base_ckpt) as base_reader,
        progress_bar(f"attack ({method})", len(src.spec.blocks), progress) as bar,
    ):
        orders = _stack_orders(spec, src, base_ckpt, base_reader)

        def transform_block(index: int, block: BlockSpec, tensors: Tensors) -> Tensors:
            base_block = base_reader.block(base_ckpt.spec.blocks[index], like=block)
            order = orders.get(block.attention.shared_heads)
            if order is not None:  # T5: the stack's heads, and its position bias, in order
                apply_transform(tensors, block, order)
            return spec.align_block(block, tensors, base_block)

        metadata = {"mergeshield_version": __version__, "mergeshield_attack": method}
        rewrite(src, out, transform_block, metadata, overwrite=overwrite, on_block=bar, also=[base])
    return out


def _stack_orders(
    spec: Attack, src: Checkpoint, base: Checkpoint, base_reader: Any
) -> dict[str, BlockTransform]:
    """Per stack whose layers share one head order (T5): the attack's head permutation,
    matched on all of the stack's blocks at once (read here once more, before the rewrite)."""
    stacks: dict[str, list[tuple[BlockSpec, Tensors, Tensors]]] = {}
    with reader(src) as src_reader:
        for block, base_block in zip(src.spec.blocks, base.spec.blocks, strict=True):
            stack = block.attention.shared_heads
            if stack is not None:
                pair = (src_reader.block(block), base_reader.block(base_block, like=block))
                stacks.setdefault(stack, []).append((block, *pair))
    return {stack: spec.stack_order(blocks) for stack, blocks in stacks.items()}


__all__ = ["ATTACKS", "Attack", "attack", "get_attack"]
