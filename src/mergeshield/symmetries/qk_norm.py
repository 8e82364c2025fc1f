"""The maps on queries and keys that commute with a per-head RMSNorm before RoPE.

Qwen3 and Gemma 3 compute each head's query as ``q = RoPE(u * n(W_Q x))`` with
``n(y) = y / sqrt(mean(y^2) + eps)`` and one weight ``u = norm_offset + w`` (``[head_dim]``)
shared by all query heads of a layer; keys alike, with their own ``u_K``.  Which maps ``A`` on a
head's rows of ``W_Q`` (and ``A_K`` on ``W_K``), together with new stored weights ``u'``, keep
every score ``q^T k`` at every pair of positions?

1. ``u' * n(A y)`` must be a fixed linear map ``M`` of ``u * n(y)`` for every ``y``.  Because of
   ``eps``, ``n`` is not scale-invariant: ``A`` must keep ``mean(y^2)`` exactly, so ``A`` is
   orthogonal, and then ``M = D_u' A D_u^-1`` (``D_u = diag(u)``).
2. ``M`` acts before RoPE, so it must commute with every rotary rotation: on each
   ``rotate_half`` pair ``j`` it is ``c_j R(phi_j)`` (:func:`.linalg.rope_commuting`), and the
   scores are kept iff ``M_K = M_Q^-T`` (``(1 / c_j) R(phi_j)`` on pair ``j``).
3. On pair ``j`` with weights ``(u_a, u_b)``, ``A = D_u'^-1 c R(phi) D_u`` is orthogonal iff
   ``R(phi)^T D_u'^-2 R(phi) = D_u^-2 / c^2``.  For ``u_a != u_b`` (trained weights) a rotation
   that takes a diagonal matrix to a diagonal one is a multiple of ``pi / 2``: either
   ``phi in {0, pi}``, ``u' = c u`` and ``A = +-I``, or ``phi = +-pi / 2``,
   ``u' = c (u_b, u_a)`` (the pair's weights swapped) and ``A = +-R(pi / 2)``.  (Only where
   ``u_a = u_b`` would any rotation do.)

So the group, per layer, is: a scale ``c_j > 0`` and a swap bit per pair, shared by every head
(``u_Q`` and ``u_K`` are), and a sign per head and pair.  On the stored weights: rows
``(a, b)`` of every query and key head are kept, negated, or turned by ``+-R(pi / 2)``
(``(-row_b, row_a)``): the same for a query head and its key/value head; ``u_Q <- c swap(u_Q)``,
``u_K <- swap(u_K) / c``.  All of it is data movement and sign bits except the ``d``-element
norm weights.  A per-head scale, a per-head rotation by another angle, and any map mixing
pairs are impossible; without changing ``u`` only the signs remain.  The head permutations,
``W_V``/``W_O`` and the MLP are not affected by the norm.
"""

from __future__ import annotations

import numpy as np

from mergeshield.symmetries.linalg import rope_pairs


def pair_maps(signs: np.ndarray, swap: np.ndarray) -> np.ndarray:
    """``(n, d, d)`` matrices acting on every rotary pair ``j`` as ``signs[g, j] * R(pi / 2)``
    where ``swap[j]``, else as ``signs[g, j] * I``; entries exactly 0 and +-1 (orthogonal:
    ``A^-T = A``, so keys take the same map as queries).

    ``signs``: ``(n, d/2)`` of +-1, one row per key/value head; ``swap``: ``(d/2,)`` bool."""
    n, half = signs.shape
    first, second = rope_pairs(2 * half)
    keep, turn = np.where(swap, 0.0, signs), np.where(swap, signs, 0.0)
    a = np.zeros((n, 2 * half, 2 * half))
    a[:, first, first] = a[:, second, second] = keep
    a[:, first, second], a[:, second, first] = -turn, turn
    return a


def norm_map(
    swap: np.ndarray, pair_scale: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(norm_perm, norm_scale)`` of a :class:`BlockTransform` for these swaps and per-pair
    scales ``c_j`` (None: no scale): new dimension ``i`` of ``u`` takes old ``norm_perm[i]``."""
    half = swap.shape[0]
    first, second = rope_pairs(2 * half)
    perm = np.arange(2 * half)
    perm[first[swap]], perm[second[swap]] = second[swap], first[swap]
    scale = None if pair_scale is None else np.tile(pair_scale, 2)
    return perm, scale
