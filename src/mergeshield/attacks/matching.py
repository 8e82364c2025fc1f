"""Pieces the attacks share: per-head views of a block, head matching, MLP unit matching.

Row form.  Every head-sized piece of attention is handled as a ``d x m`` matrix ``X`` that the
exact symmetries multiply *from the left* (``d`` = head_dim):

- query head ``h``: ``[W_Q^h | b_Q^h]``, moved by ``A_g`` (``g`` its key/value head);
- key head ``g``: ``[W_K^g | b_K^g]``, moved by ``A_g^-T``;
- value head ``g``: ``[W_V^g | b_V^g]``, moved by ``B_g``;
- output block ``h``: ``W_O[:, h]^T``, moved by ``B_g^-T`` (``W_O[:, h] <- W_O[:, h] B_g^-1``).

The bias is the last column when the layer has one, so a row map moves ``b`` with ``W``.

Head matching.  Heads may also be permuted (key/value heads freely, query heads within the
group of their key/value head).  Given a cost ``C_s[i, j]`` per slot ``s`` between base head
``i`` and protected head ``j``, key/value heads are matched by one linear assignment over
``C_K + C_V + (best within-group assignment of C_Q + C_O)`` (two-level matching, as in
Verma & Elbayad's ``match_tensors_permute_MHA``), and each group's query heads by the inner
assignment of the chosen pair.  The result is a :class:`BlockTransform` head permutation
("new -> old"), so :func:`apply_transform` undoes it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from mergeshield.architectures.spec import AttentionSpec, MLPSpec, Slot
from mergeshield.defenses.base import unit_vectors

Tensors = dict[str, torch.Tensor]
FLUSH = 1e-10  # relative residuals below this are float64 rounding of a zero residual
PREFER_IDENTITY = 1e-12  # added to off-diagonal costs: exact ties keep heads in place


# --- per-head views ------------------------------------------------------------------------


def head_rows(tensors: Tensors, slot: Slot, n: int, d: int) -> torch.Tensor:
    """``(n, d, m)``: head ``i`` is ``[W^i | b^i]`` (rows ``i*d .. (i+1)*d`` of the slot)."""
    w, b = slot.view(tensors)
    x = w.reshape(n, d, -1)
    if b is not None:
        x = torch.cat([x, b.reshape(n, d, 1)], dim=2)
    return x


def set_head_rows(tensors: Tensors, slot: Slot, x: torch.Tensor) -> None:
    """Inverse of :func:`head_rows`: write ``(n, d, m)`` back into the slot (in place)."""
    w, b = slot.view(tensors)
    m = w.shape[1]
    w.copy_(x[..., :m].reshape(w.shape))
    if b is not None:
        b.copy_(x[..., m].reshape(-1))


def out_heads(tensors: Tensors, slot: Slot, n: int, d: int) -> torch.Tensor:
    """``(n, d, hidden)``: block ``h`` is ``W_O[:, h]^T`` (the output bias is not per head)."""
    w, _ = slot.view(tensors)
    return w.T.reshape(n, d, -1)


def set_out_heads(tensors: Tensors, slot: Slot, x: torch.Tensor) -> None:
    """Inverse of :func:`out_heads`."""
    w, _ = slot.view(tensors)
    w.copy_(x.reshape(w.shape[1], w.shape[0]).T)


@dataclass
class Heads:
    """One block's attention in row form: ``q``/``o`` per query head, ``k``/``v`` per kv head."""

    q: torch.Tensor  # (n_heads, d, in + bias)
    k: torch.Tensor  # (n_kv, d, in + bias)
    v: torch.Tensor  # (n_kv, d, in + bias)
    o: torch.Tensor  # (n_heads, d, hidden)


def read_heads(tensors: Tensors, att: AttentionSpec) -> Heads:
    n, g, d = att.n_heads, att.n_kv_heads, att.head_dim
    return Heads(
        q=head_rows(tensors, att.q, n, d),
        k=head_rows(tensors, att.k, g, d),
        v=head_rows(tensors, att.v, g, d),
        o=out_heads(tensors, att.o, n, d),
    )


def write_heads(tensors: Tensors, att: AttentionSpec, heads: Heads) -> None:
    set_head_rows(tensors, att.q, heads.q)
    set_head_rows(tensors, att.k, heads.k)
    set_head_rows(tensors, att.v, heads.v)
    set_out_heads(tensors, att.o, heads.o)


# --- head matching -------------------------------------------------------------------------


def subspace_cost(base: torch.Tensor, prot: torch.Tensor) -> np.ndarray:
    """``C[i, j] = min_T ||T X_j - Y_i||^2 / ||Y_i||^2 = 1 - ||Y_i U_j||^2 / ||Y_i||^2``.

    ``Y = base`` and ``X = prot`` are ``(n, d, m)``; ``U_j`` is an orthonormal basis (``m x d``)
    of the row space of ``X_j``.  The cost is invariant to any invertible ``T``, so it sees
    through every per-head transform; it is informative only when ``d < m`` (for ``d >= m``
    every head spans the whole space and the cost is zero up to rounding, which is flushed to
    exactly zero so that :func:`match_heads` keeps the heads where they are).
    """
    u, _ = torch.linalg.qr(prot.transpose(1, 2))  # (n, m, d)
    n_b, d, m = base.shape
    n_p, k = u.shape[0], u.shape[2]
    # one matmul: (n_b d, m) @ (m, n_p k) holds every Y_i U_j
    prod = base.reshape(n_b * d, m) @ u.transpose(0, 1).reshape(m, n_p * k)
    captured = prod.reshape(n_b, d, n_p, k).square().sum(dim=(1, 3))
    total = base.square().sum(dim=(1, 2))[:, None]
    cost = (1.0 - captured / total.clamp_min(1e-300)).numpy()
    return np.where(np.abs(cost) < FLUSH, 0.0, cost)


def inner_cost(base: torch.Tensor, prot: torch.Tensor) -> np.ndarray:
    """``C[i, j] = -<Y_i, X_j>_F``: the Git Re-Basin weight-matching objective, negated."""
    return -torch.einsum("idm,jdm->ij", base, prot).numpy()


def head_costs(base: Heads, prot: Heads, cost) -> tuple[np.ndarray, np.ndarray]:
    """``(C_Q + C_O, C_K + C_V)``: ``cost(base, prot) -> (n_base, n_prot)`` per slot, summed
    over the query-indexed and the key/value-indexed slots."""
    return cost(base.q, prot.q) + cost(base.o, prot.o), cost(base.k, prot.k) + cost(base.v, prot.v)


def match_heads(
    att: AttentionSpec, base: Heads, prot: Heads, cost
) -> tuple[np.ndarray, np.ndarray]:
    """``(kv_perm, q_perm)``: base head ``i`` is protected head ``perm[i]`` (two-level LAP on
    :func:`head_costs`)."""
    return assign_heads(att, *head_costs(base, prot, cost))


def assign_heads(
    att: AttentionSpec, c_q: np.ndarray, c_kv: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The two-level assignment of query-head costs ``c_q`` (``n_heads x n_heads``) and
    key/value-head costs ``c_kv``; a ``1e-12`` off-diagonal penalty breaks exact ties in
    favour of no permutation."""
    r, n_kv = att.group_size, att.n_kv_heads
    c_q = c_q + PREFER_IDENTITY * (1 - np.eye(len(c_q)))
    c_kv = c_kv + PREFER_IDENTITY * (1 - np.eye(len(c_kv)))
    total = np.empty((n_kv, n_kv))
    inner: dict[tuple[int, int], np.ndarray] = {}
    for gb in range(n_kv):
        for gp in range(n_kv):
            sub = c_q[gb * r : (gb + 1) * r, gp * r : (gp + 1) * r]
            rows, cols = linear_sum_assignment(sub)
            total[gb, gp] = c_kv[gb, gp] + sub[rows, cols].sum()
            inner[gb, gp] = cols
    _, kv_perm = linear_sum_assignment(total)
    q_perm = np.concatenate([kv_perm[g] * r + inner[g, kv_perm[g]] for g in range(n_kv)])
    return kv_perm, q_perm


# --- MLP unit matching ---------------------------------------------------------------------


def _unit_parts(mlp: MLPSpec, weights: Tensors) -> dict[str, torch.Tensor]:
    """Per unit: ``[up row | up bias]``, ``[gate row | gate bias]``, down column."""
    parts = {}
    for role, slot in (("up", mlp.up), ("gate", mlp.gate)):
        if slot is None:
            continue
        w, b = slot.view(weights)
        parts[role] = torch.cat([w, b[:, None]], dim=1) if b is not None else w
    parts["down"] = mlp.down.view(weights)[0].T
    return parts


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-300)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return a @ b.T


def match_units_cosine(mlp: MLPSpec, prot: Tensors, base: Tensors) -> np.ndarray:
    """Unit permutation (base unit ``i`` is protected unit ``perm[i]``) maximizing cosine.

    Ungated MLP: ``S[i, j] = cos(u_i^base, u_j^prot)`` on :func:`unit_vectors`.  Gated MLP,
    where a unit may also be scaled by any ``s != 0`` (up row by ``s``, down column by
    ``1/s``): ``S = cos(gate) + |cos(up)| + |cos(down)|``, invariant to that scaling.
    """
    if mlp.gate is None:
        sim = _cosine(unit_vectors(mlp, base), unit_vectors(mlp, prot))
    else:
        pb, pp = _unit_parts(mlp, base), _unit_parts(mlp, prot)
        sim = _cosine(pb["gate"], pp["gate"])
        sim = sim + _cosine(pb["up"], pp["up"]).abs() + _cosine(pb["down"], pp["down"]).abs()
    _, perm = linear_sum_assignment(sim.numpy(), maximize=True)
    return perm


def match_units_inner(mlp: MLPSpec, prot: Tensors, base: Tensors) -> np.ndarray:
    """Git Re-Basin weight matching: ``perm`` maximizing ``sum_i <u_i^base, u_perm[i]^prot>``."""
    sim = unit_vectors(mlp, base) @ unit_vectors(mlp, prot).T
    _, perm = linear_sum_assignment(sim.numpy(), maximize=True)
    return perm


def unit_scales(mlp: MLPSpec, prot: Tensors, base: Tensors, ridge: float) -> np.ndarray:
    """Per unit ``t_i = argmin_t ||t u_i^prot - u_i^base||^2 + lam_i t^2`` on the up rows.

    ``u = [up row | up bias]``, ``lam_i = ridge ||u_i^prot||^2``; units must already be
    matched.  Multiplying up row ``i`` by ``t_i`` and dividing down column ``i`` by it is
    exact for a gated MLP.
    """
    up_p, up_b = _unit_parts(mlp, prot)["up"], _unit_parts(mlp, base)["up"]
    t = (up_p * up_b).sum(dim=1) / (up_p.square().sum(dim=1) * (1 + ridge))
    t = torch.where(t == 0, torch.ones_like(t), t)
    return t.numpy()
