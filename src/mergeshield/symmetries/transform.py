"""The exact symmetries of one transformer block, written once against the spec.

A :class:`BlockTransform` is applied in this order (indices are "new -> old"):

1. heads: key/value head ``g`` takes old head ``kv_perm[g]``; query head ``h`` takes old head
   ``q_perm[h]`` (``q_perm`` keeps every query head inside the group of its key/value head),
   and so does column ``h`` of a position bias table stored in the block (T5);
2. QK: for key/value head ``g`` and each query head ``h`` of its group,
   ``W_Q^h <- A_g W_Q^h, b_Q^h <- A_g b_Q^h`` and ``W_K^g <- A_g^-T W_K^g, b_K^g <- A_g^-T b_K^g``,
   so every score ``q^T k`` is unchanged;
3. VO: ``W_V^g <- B_g W_V^g, b_V^g <- B_g b_V^g`` and ``W_O[:, h] <- W_O[:, h] B_g^-1``, so every
   head output ``W_O[:, h] sum_t p_t v_t`` is unchanged (attention weights sum to one); a
   ``B_g`` that is block-diagonal times a permutation (heads wider than ``VO_BLOCK``) is applied
   as a gather and the blocks (:func:`split_blocks`);
4. MLP: unit ``i`` takes old unit ``unit_perm[i]`` (rows of up/gate, columns of down), then
   ``up`` row ``i`` is multiplied by ``unit_scale[i]`` and ``down`` column ``i`` divided by it
   (exact only for gated MLPs, where ``up`` enters linearly; none in an attention-only
   block); the further MLPs of a
   mixture-of-experts layer (``BlockSpec.extra_mlps``) the same way, each by its own piece of
   ``extra_unit_perm``/``extra_unit_scale`` (their permutations and scales, concatenated).

Per-head query/key norms (Qwen3, Gemma 3; :mod:`mergeshield.symmetries.qk_norm`) add, after
step 2, the map of their shared weights: with ``u = norm_offset + w``,
``u_Q <- norm_scale * u_Q[norm_perm]`` and ``u_K <- u_K[norm_perm] / norm_scale``.

:func:`apply_transform` runs on tensors of any float dtype and rounds every element at most once:
the permutations (steps 1 and 4) only move data and a unit scale of powers of two (``all``'s
sign flips) is exact in every format, so both run on the tensors as they are; the QK and VO
products widen a cache-sized chunk (one head, or 64 rows) to float64, multiply, and round it
straight into the output (:func:`map_row_blocks`, :func:`map_column_blocks`), and any other unit
scale is computed in float64 and rounded once.  On float64 tensors that is the reference
computation; on stored bf16/fp16/fp32 tensors it gives exactly the bytes of widening the whole
block, transforming and casting back (tested), without a float64 copy of any tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import partial

import numpy as np

from mergeshield.architectures.spec import BlockSpec, Slot
from mergeshield.arrays import (
    Array,
    Gathered,
    as_matrices,
    cast,
    einsum,
    empty,
    float64,
    is_torch,
    scale_exactly,
    to_numpy,
    to_torch,
    uint_view,
)
from mergeshield.symmetries.linalg import VO_BLOCK

Tensors = dict[str, Array]  # numpy arrays or torch tensors (all of one kind)


@dataclass
class BlockTransform:
    """Parameters of the symmetry applied to one block; ``None`` means identity."""

    kv_perm: np.ndarray | None = None  # (n_kv,)
    q_perm: np.ndarray | None = None  # (n_heads,)
    qk: np.ndarray | None = None  # (n_kv, d, d): A_g
    vo: np.ndarray | None = None  # (n_kv, d, d): B_g
    unit_perm: np.ndarray | None = None  # (n_units,)
    unit_scale: np.ndarray | None = None  # (n_units,)
    norm_perm: np.ndarray | None = None  # (d,): per-head q/k norm weights
    norm_scale: np.ndarray | None = None  # (d,)
    extra_unit_perm: np.ndarray | None = None  # (sum of the extra MLPs' n_units,)
    extra_unit_scale: np.ndarray | None = None  # (sum of the extra MLPs' n_units,)

    @classmethod
    def of_units(
        cls, perms: list[np.ndarray] | None = None, scales: list[np.ndarray] | None = None
    ) -> BlockTransform:
        """The unit permutations and/or scales of every MLP of a block, in
        :meth:`BlockSpec.mlps` order: the first as ``unit_*``, the others concatenated as
        ``extra_unit_*``."""

        def split(parts: list[np.ndarray] | None) -> tuple[np.ndarray | None, np.ndarray | None]:
            if not parts:
                return None, None
            return parts[0], np.concatenate(parts[1:]) if len(parts) > 1 else None

        (perm, extra_perm), (scale, extra_scale) = split(perms), split(scales)
        return cls(
            unit_perm=perm,
            unit_scale=scale,
            extra_unit_perm=extra_perm,
            extra_unit_scale=extra_scale,
        )

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }


def _set_weight(tensors: Tensors, slot: Slot, new: Array) -> None:
    """Store ``new`` (the slot's ``[out, in]`` weight) in place of the old one: a plain
    slot's tensor is replaced, a transposed or fused (chunk, rows) slot is written through its
    view."""
    if slot.transposed or slot.chunk is not None or slot.rows is not None:
        slot.view(tensors)[0][...] = new
    else:
        tensors[slot.weight] = new


def _rows(tensors: Tensors, slot: Slot, fn) -> None:
    """Replace ``W`` and ``b`` of a slot by ``fn(W)`` and ``fn(b[:, None])`` (row maps)."""
    w, b = slot.view(tensors)
    if b is not None:
        b[...] = fn(b[:, None])[:, 0]
    _set_weight(tensors, slot, fn(w))


# float64 elements per chunk of :func:`map_row_blocks` / :func:`map_column_blocks`: 1 MiB, so a
# chunk's widened copy, product and rounding stay in cache (at Llama-3.2-1B shapes a
# whole-tensor float64 copy, product and cast took 1.5x (W_Q) to 2.6x (W_O) the time, and the
# memory; BENCHMARKS.md, "Scale")
CHUNK_ELEMENTS = 1 << 17


def rotary_pairs(mats: np.ndarray) -> np.ndarray | None:
    """``mats`` (``n x d x d``) as ``(n, 2, 2, d/2)`` coefficients when every matrix acts on each
    ``rotate_half`` pair ``(j, j + d/2)`` alone (all other entries exactly zero: the QK maps of
    rotary models), else None."""
    n, d, _ = mats.shape
    if d % 2:
        return None
    half = d // 2
    same_pair = np.arange(d)[:, None] % half == np.arange(d)[None, :] % half
    if np.any(mats[:, ~same_pair]):
        return None
    # entry [g, a, b, j] = mats[g, a * half + j, b * half + j]: out side a, in side b
    pairs = mats.reshape(n, 2, half, 2, half)
    return np.ascontiguousarray(np.diagonal(pairs, axis1=2, axis2=4))


def signed_permutation(mats: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(columns, signs)`` when every matrix of ``mats`` (``n x d x d``) is a signed
    permutation, row ``i`` of matrix ``h`` being ``signs[h, i] * e_{columns[h, i]}`` (the QK
    maps of heads with per-head q/k norms: signs and quarter turns); else None."""
    a = np.abs(mats)
    if not (np.all((a == 0) | (a == 1)) and np.all(a.sum(axis=1) == 1)):
        return None
    if not np.all(a.sum(axis=2) == 1):
        return None
    columns = a.argmax(axis=2)
    return columns, np.take_along_axis(mats, columns[..., None], axis=2)[..., 0]


def negate_rows(x: Array, rows: np.ndarray) -> None:
    """``x[rows] = -x[rows]`` in place: the sign bit, exact in any format."""
    if is_torch(x):
        x[to_torch(np.flatnonzero(rows))] *= -1
    else:
        scale_exactly(x, np.where(rows, -1.0, 1.0)[:, None])


def map_row_blocks(x: Array, mats: np.ndarray, d: int) -> Array:
    """``out[h] = mats[h] @ x[h]`` for every row block ``h`` (``d`` rows) of ``x`` (``[out, in]``),
    as a new array of ``x``'s dtype: each chunk of whole blocks is widened to float64,
    multiplied and rounded once (float64 ``x``: no rounding).  Matrices that only mix rotary
    pairs (:func:`rotary_pairs`) are applied as ``y_j = c_00 x_j + c_01 x_{j+d/2}``,
    ``y_{j+d/2} = c_10 x_j + c_11 x_{j+d/2}``: 4 products per weight instead of ``d``.
    Signed permutations (:func:`signed_permutation`) only move rows and flip sign bits: no
    product, no widening (the same values; a zero weight may keep its sign where the product
    path would give ``+0``)."""
    n, cols = len(mats), x.shape[1]
    signed = signed_permutation(np.asarray(mats, dtype=np.float64))
    if signed is not None:
        columns, signs = signed
        out = take(x, (np.arange(n)[:, None] * d + columns).reshape(-1), 0)
        negate_rows(out, signs.reshape(-1) < 0)
        return out
    pairs = rotary_pairs(np.asarray(mats, dtype=np.float64))
    m = as_matrices(mats if pairs is None else pairs[..., None], x)
    out = empty(x.shape, like=x)
    step = max(1, CHUNK_ELEMENTS // max(1, d * cols))
    for start in range(0, n, step):
        stop = min(n, start + step)
        rows = slice(start * d, stop * d)
        if pairs is None:
            product = m[start:stop] @ float64(x[rows]).reshape(stop - start, d, cols)
        else:
            xs = float64(x[rows]).reshape(stop - start, 2, d // 2, cols)
            c = m[start:stop]  # (heads, out side, in side, d/2, 1)
            product = c[:, :, 0] * xs[:, None, 0]
            product += c[:, :, 1] * xs[:, None, 1]
        out[rows] = cast(product.reshape(-1, cols), x)
    return out


def map_column_blocks(x: Array, mats: np.ndarray, d: int) -> Array:
    """``out[:, h] = x[:, h] @ mats[h]^T`` for every column block ``h`` (``d`` columns) of ``x``,
    as a new array of ``x``'s dtype, computed in float64 a few rows at a time and rounded once.

    numpy arrays take one batched ``matmul`` per chunk (BLAS): ``einsum`` has no BLAS path for
    a batch index shared by both operands, and took twice the time (a 4096 x 4096 W_O at
    ``d = 128``: 270 ms against 136 ms; BENCHMARKS.md, "Scale")."""
    n, cols = len(mats), x.shape[1]
    m = as_matrices(mats, x)
    m_t = None if is_torch(x) else np.ascontiguousarray(np.swapaxes(m, 1, 2))
    out = empty(x.shape, like=x)
    step = max(1, CHUNK_ELEMENTS // max(1, cols))
    for start in range(0, x.shape[0], step):
        rows = slice(start, start + step)
        xs = float64(x[rows]).reshape(-1, n, d)
        if m_t is None:
            out[rows] = cast(einsum("ohd,hed->ohe", xs, m).reshape(-1, cols), x)
        else:  # (heads, rows, d) @ (heads, d, d), back to (rows, heads, d)
            product = np.matmul(xs.transpose(1, 0, 2), m_t).transpose(1, 0, 2)
            out[rows] = cast(product, x).reshape(-1, cols)
    return out


def _columns(tensors: Tensors, slot: Slot, mats: np.ndarray, d: int) -> None:
    """``W[:, h] <- W[:, h] mats[h]^T`` for every column block ``h`` (of size ``d``) of a slot's
    ``W``; the bias is untouched."""
    _set_weight(tensors, slot, map_column_blocks(slot.view(tensors)[0], mats, d))


def _block_index(perm: np.ndarray, d: int) -> np.ndarray:
    """Row index taking row block ``perm[i]`` (of size ``d``) to position ``i``:
    ``index[i * d + j] = perm[i] * d + j``."""
    return (np.asarray(perm, dtype=np.int64)[:, None] * d + np.arange(d)).reshape(-1)


def take(x: Array, index: np.ndarray, dim: int) -> Array:
    """``x.index_select(dim, index)`` as a new contiguous array (or tensor, for a tensor):
    numpy's ``take`` on a same-width integer view of ``x``.  A pure data movement, so
    bit-identical for any dtype; ~4x faster than torch's gather along columns."""
    if is_torch(x):
        return to_torch(take(to_numpy(x), index, dim))
    return np.take(uint_view(x), index, axis=dim).view(x.dtype)


def _permute_rows(tensors: Tensors, slot: Slot, perm: np.ndarray, d: int) -> None:
    """Row blocks of a slot's ``W`` and ``b`` permuted (row block ``perm[i]`` to ``i``).

    One gather of the ``[out, in]`` view (:func:`take`), whatever the storage layout (a pure
    data movement, so bit-identical to any other way of permuting).
    """
    w, b = slot.view(tensors)
    index = _block_index(perm, d)
    if b is not None:
        b[...] = take(b, index, 0)
    _set_weight(tensors, slot, take(w, index, 0))


def _permute_columns(tensors: Tensors, slot: Slot, perm: np.ndarray, d: int) -> None:
    """Column blocks of a slot's ``W`` permuted (column block ``perm[i]`` to ``i``)."""
    w, _ = slot.view(tensors)
    _set_weight(tensors, slot, take(w, _block_index(perm, d), 1))


def _per_head(mats: np.ndarray, d: int):
    """Row map multiplying row block ``h`` (of size ``d``) by ``mats[h]``."""
    return lambda x: map_row_blocks(x, mats, d)


def apply_transform(
    tensors: Tensors,
    block: BlockSpec,
    t: BlockTransform,
    inverse: bool = False,
    stream_mlp: bool = False,
) -> None:
    """Apply ``t`` (or its inverse) to the block ``tensors`` (any float dtype; see above).

    ``stream_mlp``: where the MLP step is a permutation, with or without sign flips, of numpy
    arrays (``all``'s and ``params``'s), its weights become :class:`Gathered` maps of the input,
    computed as they are written (:func:`mergeshield.rewrite.rewrite`)."""
    att, mlp = block.attention, block.mlp
    d, r = att.head_dim, att.group_size
    mlp_step = partial(_mlp_step, stream=stream_mlp, extras=block.extra_mlps)
    steps = [_head_step, _qk_step, _norm_step, _vo_step, mlp_step]
    for step in reversed(steps) if inverse else steps:
        step(tensors, att, mlp, d, r, t, inverse)


def _head_step(tensors, att, mlp, d, r, t, inverse) -> None:
    if t.kv_perm is None and t.q_perm is None:
        return
    kv = t.kv_perm if t.kv_perm is not None else np.arange(att.n_kv_heads)
    q = t.q_perm if t.q_perm is not None else np.arange(att.n_heads)
    if inverse:
        kv, q = np.argsort(kv), np.argsort(q)
    _permute_rows(tensors, att.q, q, d)
    _permute_rows(tensors, att.k, kv, d)
    _permute_rows(tensors, att.v, kv, d)
    _permute_columns(tensors, att.o, q, d)
    if att.position_bias is not None:  # T5: column h is head h's bias
        tensors[att.position_bias] = take(tensors[att.position_bias], q, 1)


def _qk_step(tensors, att, mlp, d, r, t, inverse) -> None:
    if t.qk is None:
        return
    a = np.linalg.inv(t.qk) if inverse else t.qk
    a_inv_t = np.swapaxes(np.linalg.inv(a), 1, 2)
    _rows(tensors, att.q, _per_head(np.repeat(a, r, axis=0), d))
    _rows(tensors, att.k, _per_head(a_inv_t, d))


def _norm_step(tensors, att, mlp, d, r, t, inverse) -> None:
    """The per-head norm weights' map (module docstring), computed in float64 and rounded once;
    a permutation alone only moves data."""
    if t.norm_perm is None and t.norm_scale is None:
        return
    perm = t.norm_perm if t.norm_perm is not None else np.arange(d)
    scale = t.norm_scale
    for name, power in ((att.q_norm, 1), (att.k_norm, -1)):
        w = tensors[name]
        if scale is None:
            tensors[name] = take(w, np.argsort(perm) if inverse else perm, 0)
            continue
        s = as_matrices(scale**power, w)
        u = float64(w) + att.norm_offset
        u = take(u / s, np.argsort(perm), 0) if inverse else take(u, perm, 0) * s
        tensors[name] = cast(u - att.norm_offset, w)


def split_blocks(mats: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(perm, blocks)`` when every matrix (``n x d x d``, ``d > c``) is
    ``blockdiag(c x c blocks) P`` (:func:`mergeshield.symmetries.linalg.block_permuted`): each
    column has its non-zeros in one row block, ``c`` columns per block.  ``perm`` (``n x d``)
    orders each head's columns by block, ``blocks`` (``n * d/c, c, c``) are the blocks; else
    None."""
    n, d, _ = mats.shape
    if d <= c or d % c:
        return None
    k = d // c
    touched = (mats.reshape(n, k, c, d) != 0).any(axis=2)  # (head, row block, column)
    if not np.all(touched.sum(axis=1) == 1) or not np.all(touched.sum(axis=2) == c):
        return None
    perm = np.argsort(touched.argmax(axis=1), axis=1, kind="stable")
    diag = np.take_along_axis(mats, perm[:, None, :], axis=2)
    blocks = [diag[:, i * c : (i + 1) * c, i * c : (i + 1) * c] for i in range(k)]
    return perm, np.stack(blocks, axis=1).reshape(n * k, c, c)


def _vo_step(tensors, att, mlp, d, r, t, inverse) -> None:
    if t.vo is None:
        return
    b = np.linalg.inv(t.vo) if inverse else t.vo
    split = split_blocks(b, VO_BLOCK)
    if split is not None:
        _vo_blocks(tensors, att, d, r, *split)
        return
    b_inv_t = np.swapaxes(np.linalg.inv(b), 1, 2)  # columns of W_O: W_O B^-1 = (B^-T W_O^T)^T
    _rows(tensors, att.v, _per_head(b, d))
    _columns(tensors, att.o, np.repeat(b_inv_t, r, axis=0), d)


def _vo_blocks(tensors, att, d: int, r: int, perm: np.ndarray, blocks: np.ndarray) -> None:
    """The VO step for ``B = blockdiag(blocks) P`` per key/value head (:func:`split_blocks`):
    ``W_V <- blockdiag(blocks) W_V[perm]`` (rows gathered, then ``c``-row blocks mapped) and
    ``W_O[:, h] <- W_O[:, h] P^T blockdiag(blocks)^-1`` (columns gathered, then ``c``-column
    blocks): ``2c`` flops per weight instead of ``2d``."""
    c = blocks.shape[-1]
    v_index = (np.arange(len(perm))[:, None] * d + perm).reshape(-1)
    _rows(tensors, att.v, lambda x: map_row_blocks(take(x, v_index, 0), blocks, c))
    o_index = (np.arange(att.n_heads)[:, None] * d + np.repeat(perm, r, axis=0)).reshape(-1)
    inv_t = np.swapaxes(np.linalg.inv(blocks), 1, 2).reshape(len(perm), -1, c, c)
    o_blocks = np.repeat(inv_t, r, axis=0).reshape(-1, c, c)
    w_o = take(att.o.view(tensors)[0], o_index, 1)
    _set_weight(tensors, att.o, map_column_blocks(w_o, o_blocks, c))


def _scale_units(tensors: Tensors, mlp, scale: np.ndarray, inverse: bool) -> None:
    """In place on the ``[out, in]`` views: ``up`` row ``i`` (and its bias) times ``s_i``,
    ``down`` column ``i`` divided by ``s_i``: in the tensors' dtype when that is exact (powers of
    two), else in float64, rounded once."""
    (w, b), down = mlp.up.view(tensors), mlp.down.view(tensors)[0]
    s = 1.0 / scale if inverse else scale
    if not is_power_of_two(scale):
        st = as_matrices(s, w)
        w[...] = cast(float64(w) * st[:, None], w)
        if b is not None:
            b[...] = cast(float64(b) * st, b)
        down[...] = cast(float64(down) / st[None, :], down)
    elif is_torch(w):
        st = as_matrices(s, w).to(w.dtype)
        w.mul_(st[:, None])
        if b is not None:
            b.mul_(st)
        down.div_(st[None, :])
    else:
        scale_exactly(w, s[:, None])
        if b is not None:
            scale_exactly(b, s)
        scale_exactly(down, 1.0 / s[None, :])


def is_power_of_two(scale: np.ndarray) -> bool:
    """Whether every entry is ``+-2^k``: multiplying by it is exact in any float dtype (short of
    overflow), so a unit scale of that form needs no float64 working copy."""
    mantissa, _ = np.frexp(np.asarray(scale, dtype=np.float64))
    return bool(np.all(np.abs(mantissa) == 0.5))


def _mlp_step(tensors, att, mlp, d, r, t, inverse, stream=False, extras=()) -> None:
    if mlp is None:  # an attention-only block (T5's cross-attention)
        return
    _units_step(tensors, mlp, t.unit_perm, t.unit_scale, inverse, stream)
    start = 0
    for extra in extras:
        piece = slice(start, start + extra.n_units)
        start += extra.n_units
        perm = t.extra_unit_perm[piece] if t.extra_unit_perm is not None else None
        scale = t.extra_unit_scale[piece] if t.extra_unit_scale is not None else None
        _units_step(tensors, extra, perm, scale, inverse, stream)


def _units_step(tensors, mlp, perm, scale, inverse, stream) -> None:
    """Step 4 for one MLP: its units permuted by ``perm`` and scaled by ``scale``."""
    ins = [mlp.up] + ([mlp.gate] if mlp.gate is not None else [])
    if stream and _streamable(tensors, mlp, scale):
        _gather_units(tensors, mlp, perm, scale, inverse)
        return
    if perm is not None and not inverse:
        for slot in ins:
            _permute_rows(tensors, slot, perm, 1)
        _permute_columns(tensors, mlp.down, perm, 1)
    if scale is not None:
        _scale_units(tensors, mlp, scale, inverse)
    if perm is not None and inverse:
        back = np.argsort(perm)
        for slot in ins:
            _permute_rows(tensors, slot, back, 1)
        _permute_columns(tensors, mlp.down, back, 1)


def _streamable(tensors: Tensors, mlp, scale: np.ndarray | None) -> bool:
    """Whether the MLP step is pure data movement on whole numpy tensors: a unit scale of signs
    only, and no fused (chunk) slot, whose tensor holds other maps too."""
    slots = mlp.slots().values()
    return all(
        slot.chunk is None and slot.rows is None and isinstance(tensors[slot.weight], np.ndarray)
        for slot in slots
    ) and (scale is None or bool(np.all(np.abs(scale) == 1)))


def _gather_units(
    tensors: Tensors, mlp, perm: np.ndarray | None, scale: np.ndarray | None, inverse: bool
) -> None:
    """The MLP step (see the module docstring) as :class:`Gathered` maps: unit ``i`` of the
    result is unit ``index[i]`` of the input, negated where ``flips[i]``.  Forward: ``index =
    unit_perm`` and ``flips = unit_scale < 0`` (the scale acts after the permutation); inverse:
    the scale acts first, so ``index = unit_perm^-1`` and ``flips = (unit_scale < 0)[index]``."""
    index, flips = perm, None if scale is None else np.asarray(scale) < 0
    if inverse and perm is not None:
        index = np.argsort(perm)
        flips = None if flips is None else flips[index]
    _gather_slot(tensors, mlp.up, index, flips, units_are_rows=True)
    if mlp.gate is not None:
        _gather_slot(tensors, mlp.gate, index, None, units_are_rows=True)
    _gather_slot(tensors, mlp.down, index, flips, units_are_rows=False)


def _gather_slot(
    tensors: Tensors,
    slot: Slot,
    index: np.ndarray | None,
    flips: np.ndarray | None,
    units_are_rows: bool,
) -> None:
    """A slot's weight as a :class:`Gathered` map whose units (rows of the ``[out, in]`` view
    for ``units_are_rows``, else columns) are picked by ``index`` and negated by ``flips``; a
    bias along the units is gathered here (it is small)."""
    if index is None and flips is None:
        return
    axis = 0 if units_are_rows != slot.transposed else 1
    tensors[slot.weight] = Gathered(tensors[slot.weight], axis, index, flips)
    if units_are_rows and slot.bias is not None:
        b = tensors[slot.bias]
        b = take(b, index, 0) if index is not None else b.copy()
        if flips is not None:
            scale_exactly(b, np.where(flips, -1.0, 1.0))
        tensors[slot.bias] = b


class Float64View(Mapping):
    """Read-only float64 copies of ``tensors``, made on first access (a defense sampling its
    transform reads only some of a block's tensors)."""

    def __init__(self, tensors: Tensors) -> None:
        self._tensors, self._wide = tensors, {}

    def __getitem__(self, name: str) -> Array:
        if name not in self._wide:
            self._wide[name] = float64(self._tensors[name])
        return self._wide[name]

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)
