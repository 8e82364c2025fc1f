"""The exact symmetries of one transformer block, written once against the spec.

A :class:`BlockTransform` is applied in this order (indices are "new -> old"):

1. heads: key/value head ``g`` takes old head ``kv_perm[g]``; query head ``h`` takes old head
   ``q_perm[h]`` (``q_perm`` keeps every query head inside the group of its key/value head);
2. QK: for key/value head ``g`` and each query head ``h`` of its group,
   ``W_Q^h <- A_g W_Q^h, b_Q^h <- A_g b_Q^h`` and ``W_K^g <- A_g^-T W_K^g, b_K^g <- A_g^-T b_K^g``,
   so every score ``q^T k`` is unchanged;
3. VO: ``W_V^g <- B_g W_V^g, b_V^g <- B_g b_V^g`` and ``W_O[:, h] <- W_O[:, h] B_g^-1``, so every
   head output ``W_O[:, h] sum_t p_t v_t`` is unchanged (attention weights sum to one);
4. MLP: unit ``i`` takes old unit ``unit_perm[i]`` (rows of up/gate, columns of down), then
   ``up`` row ``i`` is multiplied by ``unit_scale[i]`` and ``down`` column ``i`` divided by it
   (exact only for gated MLPs, where ``up`` enters linearly).

:func:`apply_transform` runs on float64 working copies; the caller casts back to the stored
dtype once.  :func:`apply_in_stored_dtype` gives the same bytes for less work: steps 1 and 4's
permutation only move data, which is exact in any dtype (and commutes with exact widening), so
they run on the stored tensors, and so does a unit scale made of powers of two (``x * 2^k`` is
exact in every float format short of overflow and subnormals, where the stored dtype's one
rounding is the float64 path's); only the tensors that the other products touch are widened to
float64, and cast back once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

import numpy as np

from mergeshield.architectures.spec import BlockSpec, Slot
from mergeshield.arrays import (
    Array,
    as_matrices,
    cast,
    einsum,
    float64,
    is_torch,
    scale_exactly,
    to_numpy,
    to_torch,
    uint_view,
)

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

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }


def view(tensors: Tensors, slot: Slot) -> tuple[Array, Array | None]:
    """``(W, b)`` of a slot as ``[out, in]`` / ``[out]`` views into ``tensors``."""
    w = tensors[slot.weight]
    if slot.transposed:
        w = w.T
    b = tensors[slot.bias] if slot.bias is not None else None
    if slot.chunk is not None:
        index, count = slot.chunk
        size = w.shape[0] // count
        w = w[index * size : (index + 1) * size]
        b = b[index * size : (index + 1) * size] if b is not None else None
    return w, b


def _set_weight(tensors: Tensors, slot: Slot, new: Array) -> None:
    """Store ``new`` (the slot's ``[out, in]`` weight) in place of the old one: a plain
    slot's tensor is replaced, a transposed or fused (chunk) slot is written through its
    view."""
    if slot.transposed or slot.chunk is not None:
        view(tensors, slot)[0][...] = new
    else:
        tensors[slot.weight] = new


def _rows(tensors: Tensors, slot: Slot, fn) -> None:
    """Replace ``W`` and ``b`` of a slot by ``fn(W)`` and ``fn(b[:, None])`` (row maps)."""
    w, b = view(tensors, slot)
    if b is not None:
        b[...] = fn(b[:, None])[:, 0]
    _set_weight(tensors, slot, fn(w))


def _columns(tensors: Tensors, slot: Slot, mats: np.ndarray, d: int) -> None:
    """``W[:, h] <- W[:, h] mats[h]^T`` for every column block ``h`` (of size ``d``) of a slot's
    ``W``; the bias is untouched.  One batched product, no transposed copies."""
    w, _ = view(tensors, slot)
    blocks = w.reshape(w.shape[0], len(mats), d)
    new = einsum("ohd,hed->ohe", blocks, as_matrices(mats, w))
    _set_weight(tensors, slot, new.reshape(w.shape))


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
    w, b = view(tensors, slot)
    index = _block_index(perm, d)
    if b is not None:
        b[...] = take(b, index, 0)
    _set_weight(tensors, slot, take(w, index, 0))


def _permute_columns(tensors: Tensors, slot: Slot, perm: np.ndarray, d: int) -> None:
    """Column blocks of a slot's ``W`` permuted (column block ``perm[i]`` to ``i``)."""
    w, _ = view(tensors, slot)
    _set_weight(tensors, slot, take(w, _block_index(perm, d), 1))


def _per_head(mats: np.ndarray, d: int):
    """Row map multiplying row block ``h`` (of size ``d``) by ``mats[h]``."""

    def fn(x: Array) -> Array:
        return (as_matrices(mats, x) @ x.reshape(len(mats), d, -1)).reshape(x.shape)

    return fn


def apply_transform(
    tensors: Tensors, block: BlockSpec, t: BlockTransform, inverse: bool = False
) -> None:
    """Apply ``t`` (or its inverse) in place to the float64 block ``tensors``."""
    att, mlp = block.attention, block.mlp
    d, r = att.head_dim, att.group_size
    steps = [_head_step, _qk_step, _vo_step, _mlp_step]
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


def _qk_step(tensors, att, mlp, d, r, t, inverse) -> None:
    if t.qk is None:
        return
    a = np.linalg.inv(t.qk) if inverse else t.qk
    a_inv_t = np.swapaxes(np.linalg.inv(a), 1, 2)
    _rows(tensors, att.q, _per_head(np.repeat(a, r, axis=0), d))
    _rows(tensors, att.k, _per_head(a_inv_t, d))


def _vo_step(tensors, att, mlp, d, r, t, inverse) -> None:
    if t.vo is None:
        return
    b = np.linalg.inv(t.vo) if inverse else t.vo
    b_inv_t = np.swapaxes(np.linalg.inv(b), 1, 2)  # columns of W_O: W_O B^-1 = (B^-T W_O^T)^T
    _rows(tensors, att.v, _per_head(b, d))
    _columns(tensors, att.o, np.repeat(b_inv_t, r, axis=0), d)


def _scale_units(tensors: Tensors, mlp, scale: np.ndarray, inverse: bool) -> None:
    """In place on the ``[out, in]`` views: ``up`` row ``i`` (and its bias) times ``s_i``,
    ``down`` column ``i`` divided by ``s_i`` (in the tensors' dtype when that is exact)."""
    (w, b), down = view(tensors, mlp.up), view(tensors, mlp.down)[0]
    s = 1.0 / scale if inverse else scale
    exact = is_power_of_two(scale)
    if is_torch(w):
        st = as_matrices(s, w)
        st = st.to(w.dtype) if exact else st
        w.mul_(st[:, None])
        if b is not None:
            b.mul_(st)
        down.div_(st[None, :])
    elif exact:
        w[...] = scale_exactly(w, s[:, None])
        if b is not None:
            b[...] = scale_exactly(b, s)
        down[...] = scale_exactly(down, 1.0 / s[None, :])
    else:
        w *= s[:, None]
        if b is not None:
            b *= s
        down /= s[None, :]


def is_power_of_two(scale: np.ndarray) -> bool:
    """Whether every entry is ``+-2^k``: multiplying by it is exact in any float dtype (short of
    overflow), so a unit scale of that form needs no float64 working copy."""
    mantissa, _ = np.frexp(np.asarray(scale, dtype=np.float64))
    return bool(np.all(np.abs(mantissa) == 0.5))


def _mlp_step(tensors, att, mlp, d, r, t, inverse) -> None:
    ins = [mlp.up] + ([mlp.gate] if mlp.gate is not None else [])
    perm, scale = t.unit_perm, t.unit_scale
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


# --- the same transform with permutations in the stored dtype ------------------------------


def split_transform(t: BlockTransform) -> tuple[BlockTransform, BlockTransform]:
    """``(exact, products)``: the head and unit permutations and a power-of-two unit scale
    (exact in the stored dtype), and the QK/VO maps and any other unit scale."""
    exact_scale = t.unit_scale is not None and is_power_of_two(t.unit_scale)
    moves = BlockTransform(
        kv_perm=t.kv_perm,
        q_perm=t.q_perm,
        unit_perm=t.unit_perm,
        unit_scale=t.unit_scale if exact_scale else None,
    )
    products = replace(
        t,
        kv_perm=None,
        q_perm=None,
        unit_perm=None,
        unit_scale=None if exact_scale else t.unit_scale,
    )
    return moves, products


def product_tensors(block: BlockSpec, t: BlockTransform) -> list[str]:
    """Names of the tensors that ``t``'s QK, VO and unit-scale steps change."""
    att, mlp = block.attention, block.mlp
    slots = ([att.q, att.k] if t.qk is not None else []) + (
        [att.v, att.o] if t.vo is not None else []
    )
    if t.unit_scale is not None:
        slots += [mlp.up, mlp.down]
    return list(dict.fromkeys(n for slot in slots for n in slot.names()))


def apply_in_stored_dtype(
    tensors: Tensors, block: BlockSpec, t: BlockTransform, inverse: bool = False
) -> None:
    """:func:`apply_transform` on tensors in their stored dtype, in place, with the same result
    as widening every tensor to float64, transforming and casting back: the exact steps
    (permutations, a power-of-two unit scale) run on the stored data (forward: first; inverse:
    last), the products on float64 copies of only the tensors they change, each cast back
    once."""
    moves, products = split_transform(t)
    if not inverse:
        apply_transform(tensors, block, moves)
    names = product_tensors(block, products)
    if names:
        wide = {n: float64(tensors[n]) for n in names}
        apply_transform(wide, block, products, inverse=inverse)
        for n in names:
            tensors[n] = cast(wide.pop(n), tensors[n])
    if inverse:
        apply_transform(tensors, block, moves, inverse=True)


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
