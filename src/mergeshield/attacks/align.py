"""Weight-only attacks on a protected checkpoint, by an adversary who holds the public base.

Setting.  The released model is ``P = T(F)`` with ``F = W0 + tau`` the fine-tune, ``W0`` the
public base and ``T`` an exact symmetry (head permutation, per-head QK matrix ``A``, VO matrix
``B``, MLP unit permutation and, for gated MLPs, unit scaling).  Fine-tuning moves weights
little (``||tau|| << ||W0||``), so ``W0`` is an anchor that ``T`` can be estimated against.
Each attack rewrites ``P`` block by block from ``P`` and ``W0`` only; it never sees the key.
Notation: per head, ``X`` is the protected ``d x m`` piece in row form and ``Y`` the base one
(see :mod:`mergeshield.attacks.matching`; Q/K/V rows with the bias as a last column, O as
``W_O[:, h]^T``); every symmetry multiplies ``X`` from the left.

``aga`` (anchor gradient-free alignment; Guo et al., ECCV 2026, ``utils_attack_B32.py``).

1. Heads are matched (two-level linear assignment) on the least-squares residual
   ``min_T ||T X_j - Y_i||^2 / ||Y_i||^2``, which no invertible per-head map can change.
2. Per matched head, separately for Q (per query head), K and V (per key/value head) and O
   (per query head's column block), the ridge fit
   ``T = argmin ||T X - Y||^2 + lam ||T||^2 = Y X^T (X X^T + lam I)^-1`` (float64), and
   the head is replaced by ``T X``.  ``lam = 1e-8 ||X||_F^2 / d`` (the AGA code's ``1e-8``,
   made relative to the head's scale so that shrinking a head cannot hide behind the ridge).
3. MLP units are matched by the Hungarian algorithm on cosine similarity (scale-invariant for
   gated MLPs) and put back in base order; for gated MLPs each unit's scale is undone with
   the least-squares scalar ``t_i`` on its up row (up ``* t_i``, down ``/ t_i``).  Every MLP
   of a block on its own: in a mixture-of-experts layer each expert, and the shared expert,
   against the same expert of the base (the router is never transformed).

Heads with per-head q/k norms (Qwen3, Gemma 3): before step 2 the exact QK group there (signs,
pair swaps, norm-weight scales; :mod:`mergeshield.symmetries.qk_norm`) is estimated from the
weights and undone, norms included (:func:`align_norms`); a Q/K fit that ignored the norm
weights would leave them in the protected frame and break the function.

Why it works whatever ``A`` is: with ``X = A X_F`` and ``X_F`` of full row rank, ``T X =
Y Pi`` where ``Pi = X^T (X X^T)^-1 X`` is the projector onto the row space of ``X``, which is
that of ``X_F``.  Since ``Y = X_F - tau`` and ``X_F Pi = X_F``: ``T X = X_F - tau Pi``.  The
error ``tau Pi`` is the part of the fine-tuning update inside the head's own row space
(about ``sqrt(d/m) ||tau||`` for a random update) and never exceeds ``||tau||``: the
recovered attention is at least as close to ``F`` as the base itself, for any ``A``, however
ill-conditioned.  The separate fits do not keep ``Q^T K`` or ``W_O V`` exactly, so the
function is recovered only up to ``O(||tau||)``; the MLP step is an exact symmetry.
Limit: where ``d >= m`` (head_dim at least the slot's input width, e.g. a single-kv-head model
with head_dim = hidden) the fit is square, ``T X = Y``: that slot comes back as the base
(``tau`` lost) and heads cannot be told apart there, so they are left in place.

``rebasin`` (Git Re-Basin weight matching; PaRaMS's own ``obj='matching'``).  Permutations
only: heads by two-level linear assignment on ``-<Y_i, X_j>`` summed over Q, K, V and O; MLP
units by the linear assignment maximizing ``sum_i <u_i^base, u_perm(i)^prot>``.  Each block
has one head group and one unit group and the residual stream is never permuted, so the
groups do not interact and one assignment each is the fixed point of Re-Basin's coordinate
descent.  Exact (bit for bit) against pure permutations, blind to any continuous transform.

``procrustes`` (orthogonal Procrustes / Kabsch; the restoration MergeLock reports).  Heads
matched as in ``aga``; then per key/value head ``g``, one orthogonal ``R`` maximizing
``<R, M>`` with ``M = sum_s Y_s X_s^T``, i.e. ``R = U V^T`` from ``M = U S V^T``:

- QK: ``M`` summed over the group's query heads and its key head, ``R`` applied to all of
  them.  For orthogonal ``R``, ``R^-T = R``, so ``(R q)^T (R k) = q^T k``: fitting one ``R``
  jointly keeps the function exactly, where separate fits for Q and K would not.  Rotary
  models: ``R`` must also commute with RoPE, so it is restricted to a rotation ``R(phi_j)``
  per rotary pair, ``phi_j = atan2(M_ba - M_ab, M_aa + M_bb)`` (pair ``(a, b)``).
  Heads with per-head q/k norms: only signs and pair swaps (with the norm weights) are exact,
  so :func:`align_norms` is used instead of a rotation.
- VO: ``M`` summed over ``V_g`` and the group's ``W_O[:, h]^T``; ``V <- R V``,
  ``W_O[:, h] <- W_O[:, h] R^T``, exact for the same reason.
- MLP: as in ``aga`` (exact).

So the output computes the protected model's function exactly and undoes any orthogonal
defense (MergeBarrier's flips: the optimal ``R`` is within ``2||tau||`` of the true inverse
on the data, by the triangle inequality).  Against a non-orthogonal ``A`` it cannot help:
``||(R A - I) X_F||_F >= sigma_min(X_F) (sum_i (sigma_i(A) - 1)^2)^(1/2)`` for every
orthogonal ``R``, the distance of ``A`` to the orthogonal group.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from mergeshield.architectures.spec import AttentionSpec, BlockSpec
from mergeshield.attacks.matching import (
    Heads,
    assign_heads,
    head_costs,
    inner_cost,
    match_heads,
    match_units_cosine,
    match_units_inner,
    read_heads,
    subspace_cost,
    unit_scales,
    write_heads,
)
from mergeshield.symmetries.linalg import rope_commuting, rope_pairs
from mergeshield.symmetries.qk_norm import norm_map, pair_maps
from mergeshield.symmetries.transform import BlockTransform, apply_transform

Tensors = dict[str, torch.Tensor]
RIDGE = 1e-8  # the AGA code's ridge, here relative to the mean eigenvalue of X X^T
CostFn = Callable[[torch.Tensor, torch.Tensor], np.ndarray]


# --- shared steps --------------------------------------------------------------------------


def unpermute_heads(block: BlockSpec, prot: Tensors, base: Tensors, cost: CostFn) -> None:
    """Match heads by ``cost`` and put the protected heads in base order (in place)."""
    att = block.attention
    if att.shared_heads is not None:  # T5: put in order for the whole stack (stack_head_order)
        return
    kv_perm, q_perm = match_heads(att, read_heads(base, att), read_heads(prot, att), cost)
    apply_transform(prot, block, BlockTransform(kv_perm=kv_perm, q_perm=q_perm))


def align_units(block: BlockSpec, prot: Tensors, base: Tensors) -> None:
    """Hungarian on cosine similarity, then (gated MLPs) the per-unit scale; in place, exact.
    Every MLP of the block on its own (a mixture-of-experts layer: each expert and the shared
    expert against the same MLP of the base)."""
    mlps = block.mlps()
    if not mlps:  # an attention-only block (T5's cross-attention)
        return
    perms = [match_units_cosine(mlp, prot, base) for mlp in mlps]
    apply_transform(prot, block, BlockTransform.of_units(perms=perms))
    if any(mlp.gate is not None for mlp in mlps):
        scales = [
            unit_scales(mlp, prot, base, RIDGE) if mlp.gate is not None else np.ones(mlp.n_units)
            for mlp in mlps
        ]
        apply_transform(prot, block, BlockTransform.of_units(scales=scales))


def align_norms(block: BlockSpec, prot: Tensors, base: Tensors) -> None:
    """Heads with per-head q/k norms (Qwen3, Gemma 3): undo the exact QK group of
    :mod:`mergeshield.symmetries.qk_norm` (in place, an exact symmetry).

    Per rotary pair ``j = (a, b)`` and key/value head ``g``, over the group's query heads and
    its key head: ``keep = <Y_a, X_a> + <Y_b, X_b>`` (``X_a = s Y_a``: kept with sign ``s``)
    and ``turn = <Y_a, X_b> - <Y_b, X_a>`` (``X_a = -s Y_b, X_b = s Y_a``: a quarter turn).
    The pair is turned in the layer where ``sum_g |turn| > sum_g |keep|`` (the swap is shared
    by every head, as the norm weights are); each head's sign is that of its score.  The
    per-pair norm scale ``c_j`` (``u_Q' = c u_Q[perm]``, ``u_K' = u_K[perm] / c``) is the
    geometric mean of the least-squares fits of the protected norms to the base's.  The
    inverse of that transform is applied to Q, K and both norms."""
    att = block.attention
    if att.q_norm is None:
        return
    p, b = read_heads(prot, att), read_heads(base, att)
    half, r = att.head_dim // 2, att.group_size

    def scores(x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        xa, xb, ya, yb = x[:, :half], x[:, half:], y[:, :half], y[:, half:]
        keep = (ya * xa).sum(-1) + (yb * xb).sum(-1)
        turn = (ya * xb).sum(-1) - (yb * xa).sum(-1)
        return keep.numpy(), turn.numpy()

    (keep_q, turn_q), (keep_k, turn_k) = scores(p.q, b.q), scores(p.k, b.k)
    keep = keep_q.reshape(att.n_kv_heads, r, half).sum(1) + keep_k
    turn = turn_q.reshape(att.n_kv_heads, r, half).sum(1) + turn_k
    swap = np.abs(turn).sum(0) > np.abs(keep).sum(0)
    signs = np.where(np.where(swap, turn, keep) < 0, -1.0, 1.0)
    perm, _ = norm_map(swap, None)

    def pair_sum(x: np.ndarray) -> np.ndarray:
        return x[:half] + x[half:]

    u = {
        side: (prot[name].numpy() + att.norm_offset, base[name].numpy()[perm] + att.norm_offset)
        for side, name in (("q", att.q_norm), ("k", att.k_norm))
    }
    (uq, bq), (uk, bk) = u["q"], u["k"]
    c_q = pair_sum(uq * bq) / pair_sum(bq * bq)
    c_k = pair_sum(bk * bk) / pair_sum(uk * bk)
    _, scale = norm_map(swap, np.sqrt(np.abs(c_q * c_k)))
    found = BlockTransform(qk=pair_maps(signs, swap), norm_perm=perm, norm_scale=scale)
    apply_transform(prot, block, found, inverse=True)


def ridge_fit(x: torch.Tensor, y: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """Per head ``T X`` with ``T = argmin ||T X - Y||^2 + lam ||T||^2``; ``x, y: (n, d, m)``.

    ``T^T = (X X^T + lam I)^-1 X Y^T`` (normal equations, solved in float64), with
    ``lam = ridge * ||X||_F^2 / d`` (``ridge`` times the mean eigenvalue of ``X X^T``).  The
    AGA code uses an absolute ``1e-8``; relative to ``X`` the fit does not depend on the
    head's scale, which a defense could otherwise shrink below the ridge.
    """
    d = x.shape[1]
    lam = ridge * x.square().sum(dim=(1, 2)) / d
    gram = x @ x.transpose(1, 2) + lam[:, None, None] * torch.eye(d, dtype=x.dtype)
    t_transposed = torch.linalg.solve(gram, x @ y.transpose(1, 2))
    return t_transposed.transpose(1, 2) @ x


def orthogonal_fit(m: np.ndarray, rope: bool) -> np.ndarray:
    """The orthogonal ``R`` maximizing ``<R, M>_F`` (= minimizing ``sum ||R X - Y||^2``).

    ``rope``: only rotations per rotary pair (the orthogonal maps that commute with RoPE).
    """
    if not rope:
        u, _, vt = np.linalg.svd(m)
        return u @ vt
    a, b = rope_pairs(m.shape[0])
    angle = np.arctan2(m[b, a] - m[a, b], m[a, a] + m[b, b])
    return rope_commuting(np.ones(len(a)), angle)


def stack_head_order(
    blocks: list[tuple[BlockSpec, Tensors, Tensors]], function: str
) -> BlockTransform:
    """The head permutation of a stack whose layers must all permute their heads alike (T5,
    :attr:`AttentionSpec.shared_heads`): the two-level assignment on the head costs of every
    ``(block, protected, base)`` of the stack, summed (the cost of attack ``function``); it
    goes to every block of the stack and to the position bias table's columns."""
    cost = inner_cost if function == "rebasin" else subspace_cost
    c_q = c_kv = 0.0
    for block, prot, base in blocks:
        att = block.attention
        q, kv = head_costs(read_heads(base, att), read_heads(prot, att), cost)
        c_q, c_kv = c_q + q, c_kv + kv
    kv_perm, q_perm = assign_heads(blocks[0][0].attention, c_q, c_kv)
    return BlockTransform(kv_perm=kv_perm, q_perm=q_perm)


# --- the three attacks ---------------------------------------------------------------------


def aga(block: BlockSpec, prot: Tensors, base: Tensors) -> Tensors:
    """Anchor gradient-free alignment of one block (see the module docstring)."""
    att = block.attention
    unpermute_heads(block, prot, base, subspace_cost)
    align_norms(block, prot, base)
    p, b = read_heads(prot, att), read_heads(base, att)
    aligned = Heads(
        q=ridge_fit(p.q, b.q), k=ridge_fit(p.k, b.k), v=ridge_fit(p.v, b.v), o=ridge_fit(p.o, b.o)
    )
    write_heads(prot, att, aligned)
    align_units(block, prot, base)
    return prot


def rebasin(block: BlockSpec, prot: Tensors, base: Tensors) -> Tensors:
    """Git Re-Basin weight matching of one block: head and unit permutations only."""
    unpermute_heads(block, prot, base, inner_cost)
    perms = [match_units_inner(mlp, prot, base) for mlp in block.mlps()]  # none: T5 cross
    if perms:
        apply_transform(prot, block, BlockTransform.of_units(perms=perms))
    return prot


def _group_fit(
    att: AttentionSpec,
    query: tuple[torch.Tensor, torch.Tensor],
    kv: tuple[torch.Tensor, torch.Tensor],
    g: int,
    rope: bool,
) -> torch.Tensor:
    """``R`` for key/value head ``g``: ``M = sum Y X^T`` over the group's query-indexed heads
    (``query = (prot, base)``, Q or O) and its key/value head (``kv = (prot, base)``, K or V).
    """
    r = att.group_size
    (xq, yq), (xk, yk) = query, kv
    m = torch.einsum("hdm,hem->de", yq[g * r : (g + 1) * r], xq[g * r : (g + 1) * r])
    m = m + yk[g] @ xk[g].T
    return torch.as_tensor(orthogonal_fit(m.numpy(), rope))


def procrustes(block: BlockSpec, prot: Tensors, base: Tensors) -> Tensors:
    """Orthogonal Procrustes of one block, fitted jointly so that it stays an exact symmetry."""
    att = block.attention
    unpermute_heads(block, prot, base, subspace_cost)
    align_norms(block, prot, base)  # normed heads: the only exact QK maps, no rotation
    p, b = read_heads(prot, att), read_heads(base, att)
    r = att.group_size
    q, k, v, o = p.q.clone(), p.k.clone(), p.v.clone(), p.o.clone()
    identity = torch.eye(att.head_dim, dtype=p.q.dtype)
    for g in range(att.n_kv_heads):
        group = slice(g * r, (g + 1) * r)
        r_qk = (
            identity
            if att.q_norm is not None
            else _group_fit(att, (p.q, b.q), (p.k, b.k), g, att.rope)
        )
        r_vo = _group_fit(att, (p.o, b.o), (p.v, b.v), g, False)
        q[group], k[g] = r_qk @ p.q[group], r_qk @ p.k[g]
        v[g], o[group] = r_vo @ p.v[g], r_vo @ p.o[group]
    write_heads(prot, att, Heads(q=q, k=k, v=v, o=o))
    align_units(block, prot, base)
    return prot
