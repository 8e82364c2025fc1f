"""Defense registry and the sampling pieces the defenses share.

A defense maps one block (its spec, its float64 weights, optionally the public base model's
weights of the same block) and a random generator to a :class:`BlockTransform`.  The
transform is exact by construction; defenses differ only in how they sample it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mergeshield.architectures.spec import AttentionSpec, BlockSpec, MLPSpec
from mergeshield.arrays import Array, concat, float32, to_numpy
from mergeshield.errors import MergeShieldError
from mergeshield.registry import Registry
from mergeshield.symmetries.linalg import (
    VO_BLOCK,
    block_permuted,
    bound_blocks,
    log_uniform,
    rope_commuting,
)
from mergeshield.symmetries.transform import BlockTransform

Tensors = dict[str, Array]


# PaRaMS' attention variants (their scale ranges: defenses.published.PAPER_SCALES).
SCALINGS = ("diagonal", "symmetric", "nonsymmetric")


def _fail(message: str) -> None:
    raise MergeShieldError(message)


@dataclass(frozen=True)
class DefenseOptions:
    """Knobs of the defenses, with their papers' defaults.

    ``scaling``: PaRaMS attention variant (``diagonal``, ``symmetric``, ``nonsymmetric``).
    ``scale``: range of the random scales; ``None`` takes each variant's paper default.
    ``max_cond``: bound on the condition number of every QK/VO matrix (see
    :mod:`mergeshield.symmetries.linalg` for the float error it costs).
    ``flip_fraction``: MergeBarrier's share of head directions that are flipped.
    ``low_precision``: dense QK/VO maps sampled as ``D Q`` (diagonal times orthogonal, see
    :func:`mergeshield.symmetries.linalg.diagonal_orthogonal`), which add no more than bf16
    rounding however wide ``D`` is; ``None`` (default): on for bf16/fp16 checkpoints, off for
    fp32/fp64 (where the papers' dense maps, bounded by ``max_cond``, are used).
    ``exact_assignment_max``: PaRaMS's MLP mismatching uses the exact Hungarian assignment
    up to this many units and :func:`greedy_assignment` above (measured in ``BENCHMARKS.md``,
    "Scale": at 14336 units exact 63 s, greedy 11 s and within 0.05% of its distance; the
    ``n x n`` cost matrix itself, 109 s, dominates either way).
    """

    scaling: str = "nonsymmetric"
    scale: tuple[float, float] | None = None
    max_cond: float | None = 100.0
    flip_fraction: float = 0.5
    exact_assignment_max: int = 16384
    low_precision: bool | None = None

    def __post_init__(self) -> None:
        """One-line errors for knobs no defense can use (the CLI's flags are these fields)."""
        if self.scaling not in SCALINGS:
            _fail(f"unknown PaRaMS scaling {self.scaling!r}; choose from {', '.join(SCALINGS)}")
        if self.scale is not None and not (
            len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] < math.inf
        ):
            _fail("--scale needs finite 0 < LOW <= HIGH")
        if self.max_cond is not None and not self.max_cond >= 1:  # NaN fails too
            _fail("--max-cond must be at least 1 (or inf: unbounded)")
        if not 0 < self.flip_fraction <= 1:  # NaN fails too
            _fail("--flip-fraction must be in (0, 1]")
        if not (isinstance(self.exact_assignment_max, int) and self.exact_assignment_max >= 0):
            _fail("exact_assignment_max must be a non-negative int")
        if self.low_precision not in (None, True, False):
            _fail("low_precision must be None, True or False")


@dataclass
class BlockContext:
    """What a defense sees of one block."""

    block: BlockSpec
    weights: Tensors  # float64 copies of the protected model's block tensors
    base: Tensors | None  # float64 copies of the public base model's block tensors, if given
    rng: np.random.Generator
    options: DefenseOptions
    # seeded per stack whose layers share one head permutation (AttentionSpec.shared_heads)
    stack_rng: np.random.Generator | None = None


@dataclass(frozen=True)
class Defense:
    name: str
    summary: str
    sample: Callable[[BlockContext], BlockTransform]
    uses_base: bool = False


DEFENSES: Registry[Defense] = Registry("defense")
register = DEFENSES.register
get_defense = DEFENSES.lookup


# --- shared sampling pieces -------------------------------------------------------------


def random_head_permutation(
    att: AttentionSpec, rng: np.random.Generator, stack_rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Key/value heads permuted, and query heads permuted within their (moved) group.  Heads
    that every layer of a stack must permute alike (T5's shared relative position bias) draw
    from ``stack_rng``, a generator seeded the same for every block of the stack; without one
    they stay in order."""
    if att.shared_heads is not None:
        if stack_rng is None:
            return np.arange(att.n_kv_heads), np.arange(att.n_heads)
        rng = stack_rng
    r = att.group_size
    kv = rng.permutation(att.n_kv_heads)
    q = np.concatenate([g * r + rng.permutation(r) for g in kv])
    return kv, q


def blocked(
    rng: np.random.Generator,
    d: int,
    sample: Callable[[int], np.ndarray],
    max_cond: float | None = None,
) -> np.ndarray:
    """A V/O map for a head of ``d`` dimensions: ``sample(d)`` up to ``VO_BLOCK`` dimensions;
    for wider heads (Gemma 2/3: 256) ``blockdiag(sample(c), ...) P`` with ``c = VO_BLOCK`` and
    ``P`` a random permutation of the head's dimensions (:func:`.linalg.block_permuted`), whose
    cost per weight is that of a ``c``-dimensional head (``max_cond``: the blocks bounded
    jointly, :func:`.linalg.bound_blocks`).  A block of ``D Q`` maps is again ``D Q``, so
    ``low_precision`` keeps its rounding guarantee."""
    if d <= VO_BLOCK or d % VO_BLOCK:
        return sample(d)
    blocks = bound_blocks([sample(VO_BLOCK) for _ in range(d // VO_BLOCK)], max_cond)
    return block_permuted(blocks, rng.permutation(d))


def random_rope_matrix(
    rng: np.random.Generator, head_dim: int, scale: tuple[float, float]
) -> np.ndarray:
    """A random ``c_j R(phi_j)`` on every rotary pair (``c`` log-uniform, ``phi`` uniform)."""
    half = head_dim // 2
    return rope_commuting(log_uniform(rng, *scale, half), rng.uniform(0, 2 * np.pi, half))


def rope_safe_qk(
    att: AttentionSpec, rng: np.random.Generator, scale: tuple[float, float]
) -> np.ndarray:
    """One :func:`random_rope_matrix` per key/value head."""
    return np.stack([random_rope_matrix(rng, att.head_dim, scale) for _ in range(att.n_kv_heads)])


def unit_vectors(mlp: MLPSpec, weights: Tensors) -> Array:
    """One row per hidden unit: its up row, up bias, gate row and down column, concatenated."""
    parts = []
    for slot in (mlp.up, mlp.gate):
        if slot is None:
            continue
        w, b = slot.view(weights)
        parts.append(w)
        if b is not None:
            parts.append(b[:, None])
    parts.append(mlp.down.view(weights)[0].T)
    return concat(parts, axis=1)


def mismatch_permutation(
    mlp: MLPSpec, weights: Tensors, base: Tensors, exact_max: int | None = None
) -> np.ndarray:
    """PaRaMS "mismatching": the unit permutation farthest from the base model.

    ``||theta_base - P theta||^2 = const - 2 sum_i <base_i, theta_perm[i]>``, so the farthest
    permutation solves the linear assignment ``min sum_i C[i, perm[i]]`` with
    ``C[i, j] = <base unit i, protected unit j>`` (Git Re-Basin with the sign reversed).
    Exact (Hungarian) up to ``exact_max`` units (all when ``None``), greedy above.
    """
    cost = mismatch_cost(unit_vectors(mlp, base), unit_vectors(mlp, weights))
    if exact_max is not None and cost.shape[0] > exact_max:
        return greedy_assignment(cost)
    from scipy.optimize import linear_sum_assignment  # imported here: 0.5-1 s, rarely needed

    _, perm = linear_sum_assignment(cost, maximize=False)
    return perm


def mismatch_cost(base_units: Array, units: Array) -> np.ndarray:
    """``C = U_base U^T`` in float32: the ``n x n x 3h`` product is the expensive part of
    mismatching (float64 doubled it), and only the permutation it selects is used, which
    float32's relative 6e-8 can change only between near-equal choices (any far permutation
    protects; the transform itself stays exact)."""
    return to_numpy(float32(base_units) @ float32(units).T)


def greedy_assignment(cost: np.ndarray) -> np.ndarray:
    """Approximate ``argmin_perm sum_i C[i, perm[i]]`` in ``O(n^2)``.

    Rows are visited in order of their best (smallest) entry, most negative first, and each
    takes its cheapest column still free.  For mismatching a fine-tuned model against its base
    the cost matrix has a strongly negative diagonal, which the first choices avoid; measured
    against the exact Hungarian solution in ``BENCHMARKS.md``.
    """
    cost = np.array(cost, dtype=np.float64)  # a copy: taken columns are set to +inf
    n = cost.shape[0]
    perm = np.empty(n, dtype=np.int64)
    for i in np.argsort(cost.min(axis=1), kind="stable"):
        j = int(np.argmin(cost[i]))
        perm[i] = j
        cost[:, j] = np.inf
    return perm
