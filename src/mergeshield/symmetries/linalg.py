"""Random matrices for the exact symmetries, all in float64.

Conditioning and float error: a QK transform ``q <- A q, k <- A^-T k`` is exact in real
arithmetic, but the stored weights are rounded after the transform, and the rounding error
of ``A W`` reaches the attention logits multiplied by ``||A^-1||``: the relative error grows
like ``cond(A) * eps(dtype)``.  With fp32 (eps 6e-8) a condition number of 1e3 costs about
6e-5 relative error in the logits; in bf16 (eps 4e-3) anything but ``cond(A) ~ 1`` (orthogonal
or diagonal maps) is visible.  :func:`bound_condition` clips singular values so that
``cond(A) <= max_cond``; larger values move the weights further at the price of that error.
:func:`diagonal_orthogonal` gives maps ``D Q`` whose error stays that of one rounding for any
``D`` (the defenses' ``low_precision`` mode, the default for bf16/fp16 checkpoints).
"""

from __future__ import annotations

import numpy as np


def log_uniform(rng: np.random.Generator, low: float, high: float, size: int) -> np.ndarray:
    """Samples ``exp(U(log low, log high))``."""
    return np.exp(rng.uniform(np.log(low), np.log(high), size))


def random_orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    """Haar-distributed orthogonal ``n x n`` matrix (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def random_permutation_matrix(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.eye(n)[rng.permutation(n)]


def bound_condition(a: np.ndarray, max_cond: float | None) -> np.ndarray:
    """``a`` with singular values clipped to ``[s_max / max_cond, s_max]``."""
    if max_cond is None or not np.isfinite(max_cond):
        return a
    u, s, vt = np.linalg.svd(a)
    s = np.maximum(s, s[0] / max_cond)
    return (u * s) @ vt


def random_invertible(
    rng: np.random.Generator, n: int, scale: tuple[float, float], max_cond: float | None
) -> np.ndarray:
    """``U diag(s) V^T`` with Haar ``U, V`` and ``s`` log-uniform in ``scale``."""
    s = log_uniform(rng, *scale, n)
    a = (random_orthogonal(rng, n) * s) @ random_orthogonal(rng, n).T
    return bound_condition(a, max_cond)


def diagonal_orthogonal(rng: np.random.Generator, n: int, scale: tuple[float, float]) -> np.ndarray:
    """``D Q``: ``D = diag(s)``, ``s`` log-uniform in ``scale``; ``Q`` Haar orthogonal.

    Why this is safe in bf16 although ``cond(D Q) = max s / min s`` can be large: with
    ``W_V <- D Q W_V`` and ``W_O <- W_O Q^T D^-1``, row ``i`` of the stored ``W_V`` is
    ``s_i (Q W_V)_i`` rounded, i.e. ``s_i ((Q W_V)_i + e_i)`` with ``|e_i| <= eps |(Q W_V)_i|``,
    and column ``i`` of the stored ``W_O`` is ``((W_O Q^T)_i + f_i) / s_i``: the scales cancel
    term by term in ``W_O W_V = sum_i (W_O Q^T)_i (Q W_V)_i`` and every term keeps the relative
    error of one rounding, as the untransformed weights do.  The same holds for
    ``W_Q <- D Q W_Q, W_K <- D^-1 Q W_K`` (``(D Q)^-T = D^-1 Q``).  A dense ``A`` that is not of
    this form mixes rounded rows of different scales and amplifies the error up to
    ``cond(A)``.
    """
    return log_uniform(rng, *scale, n)[:, None] * random_orthogonal(rng, n)


# Head dimensions per block of a V/O map for heads wider than this (Gemma 2/3: head_dim 256):
# a dense d x d map costs 2d flops per weight, a block-diagonal one 2 * VO_BLOCK.
VO_BLOCK = 128


def block_permuted(blocks: list[np.ndarray], perm: np.ndarray) -> np.ndarray:
    """``B = blockdiag(blocks) P`` with ``(P x)_k = x_{perm[k]}``: column ``perm[k]`` of ``B``
    is column ``k`` of the block diagonal, so ``B x = blockdiag(blocks) x[perm]``: the blocks
    act on randomly chosen dimensions of the head, and every output dimension still reads
    ``c`` of them."""
    d = sum(len(b) for b in blocks)
    diag = np.zeros((d, d))
    start = 0
    for b in blocks:
        diag[start : start + len(b), start : start + len(b)] = b
        start += len(b)
    out = np.zeros((d, d))
    out[:, perm] = diag
    return out


def bound_blocks(blocks: list[np.ndarray], max_cond: float | None) -> list[np.ndarray]:
    """Every block's singular values clipped to ``[s_max / max_cond, s_max]``, ``s_max`` the
    largest over all blocks: the block diagonal's condition number is then at most
    ``max_cond`` (:func:`bound_condition` of the whole)."""
    if max_cond is None or not np.isfinite(max_cond):
        return blocks
    svds = [np.linalg.svd(b) for b in blocks]
    top = max(s[0] for _, s, _ in svds)
    return [(u * np.clip(s, top / max_cond, top)) @ vt for u, s, vt in svds]


def rope_pairs(head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, i + head_dim/2)`` that Hugging Face's ``rotate_half`` rotates together."""
    half = head_dim // 2
    first = np.arange(half)
    return first, first + half


def rotary_index(head_dim: int, rotary_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Partial rotary embeddings (``rotary_dim < head_dim``, Phi-4-mini) rotate the pairs
    ``(j, j + rotary_dim / 2)`` and leave the last ``head_dim - rotary_dim`` dimensions alone;
    any invertible map acts on those, so they are paired among themselves too:
    ``(rotary_dim + i, rotary_dim + free / 2 + i)``.  Returns the ``(first, second)`` stored
    index of every pair, rotary pairs first: :func:`rope_pairs` when ``rotary_dim ==
    head_dim``.  A map built on :func:`rope_pairs` ``(head_dim)`` (pair ``k`` on ``(k, k +
    head_dim / 2)``) becomes valid here once its rows and columns ``concat(first, second)`` are
    moved to those positions (:func:`to_rotary_layout`)."""
    if rotary_dim == head_dim:
        return rope_pairs(head_dim)
    rot, free = rope_pairs(rotary_dim), rope_pairs(head_dim - rotary_dim)
    return np.concatenate([rot[0], rotary_dim + free[0]]), np.concatenate(
        [rot[1], rotary_dim + free[1]]
    )


def to_rotary_layout(mats: np.ndarray, head_dim: int, rotary_dim: int) -> np.ndarray:
    """``(n, d, d)`` maps built on :func:`rope_pairs` moved to the pairs of
    :func:`rotary_index` (unchanged for full rotary)."""
    if rotary_dim == head_dim:
        return mats
    order = np.concatenate(rotary_index(head_dim, rotary_dim))
    out = np.zeros_like(mats)
    out[:, order[:, None], order[None, :]] = mats
    return out


def rope_commuting(scale: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """The matrix acting on each rotary pair ``j`` as ``scale_j * R(angle_j)``.

    These are exactly the real matrices that commute with every rotary position embedding
    (per pair, a rotation by the position's angle), so ``q <- A q`` before RoPE equals
    ``A`` applied after it, and ``A^-T = (1/scale_j) R(angle_j)`` on each pair.
    """
    half = scale.shape[0]
    a = np.zeros((2 * half, 2 * half))
    i, j = rope_pairs(2 * half)
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    a[i, i], a[i, j], a[j, i], a[j, j] = c, -s, s, c
    return a


def commutes_with_rope(a: np.ndarray, atol: float = 1e-9) -> bool:
    """Whether ``a`` commutes with a generic rotary rotation (distinct angle per pair)."""
    half = a.shape[0] // 2
    angles = np.linspace(0.3, 2.9, half)
    r = rope_commuting(np.ones(half), angles)
    return bool(np.allclose(a @ r, r @ a, atol=atol * max(1.0, np.abs(a).max())))
