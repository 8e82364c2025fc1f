"""Stored tensors as numpy arrays: the checkpoint streaming core runs on numpy alone.

``protect`` and ``unprotect`` never import torch (0.2-0.3 s of imports instead of 2 s; see
BENCHMARKS.md, "Scale"): tensors are numpy arrays in their safetensors dtype, bf16 through
``ml_dtypes.bfloat16``.  Every function here also takes torch tensors (and then imports torch),
so the transforms in :mod:`mergeshield.symmetries.transform` are written once for both.

Widening to float64 is exact; :func:`cast` rounds once (bf16 and fp16 through float32, as torch
does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

if TYPE_CHECKING:
    import torch

    Array = np.ndarray | torch.Tensor
else:
    Array = Any

bfloat16 = np.dtype(ml_dtypes.bfloat16)

# safetensors dtype codes
DTYPES: dict[str, np.dtype] = {
    "F16": np.dtype(np.float16),
    "BF16": bfloat16,
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
}
FLOAT_CODES = ("F16", "BF16", "F32", "F64")
LOW_PRECISION_CODES = ("F16", "BF16")
CODE_OF = {dtype: code for code, dtype in DTYPES.items()}
_SAME_WIDTH_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
# (exponent bits, mantissa bits) of each float format: +-Inf and NaN have every exponent bit set
_FLOAT_BITS = {"F16": (5, 10), "BF16": (8, 7), "F32": (8, 23), "F64": (11, 52)}


def is_torch(x: object) -> bool:
    return not isinstance(x, np.ndarray) and type(x).__module__.startswith("torch")


def code_of(x: Array) -> str:
    """The safetensors dtype code of an array or tensor."""
    if is_torch(x):
        return _torch_codes()[x.dtype]
    return CODE_OF[x.dtype]


def _torch_codes() -> dict:
    import torch

    return {
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.float32: "F32",
        torch.float64: "F64",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.int16: "I16",
        torch.int32: "I32",
        torch.int64: "I64",
        torch.bool: "BOOL",
    }


def torch_dtype(code: str):
    """The torch dtype of a safetensors code (imports torch)."""
    return {code: dtype for dtype, code in _torch_codes().items()}[code]


def to_torch(a: np.ndarray):
    """A torch tensor sharing ``a``'s memory (bf16 through a same-width integer view)."""
    import torch

    if a.dtype == bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def to_numpy(x: Array) -> np.ndarray:
    """A numpy array sharing ``x``'s memory (a CPU tensor; bf16 becomes ``ml_dtypes``')."""
    if not is_torch(x):
        return x
    import torch

    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(bfloat16)
    return x.numpy()


def uint_view(x: np.ndarray) -> np.ndarray:
    """``x``'s bits as unsigned integers of the same width (a view)."""
    return x.view(_SAME_WIDTH_UINT[x.dtype.itemsize])


def float64(x: Array) -> Array:
    """An exact float64 copy (of the same kind: array or tensor)."""
    if is_torch(x):
        import torch

        return x.to(torch.float64)
    return x.astype(np.float64)


def empty(shape: tuple[int, ...], like: Array) -> Array:
    """An uninitialized C-contiguous array (or tensor) of ``like``'s dtype and kind."""
    if is_torch(like):
        import torch

        return torch.empty(tuple(shape), dtype=like.dtype)
    return np.empty(shape, dtype=like.dtype)


def float32(x: Array) -> Array:
    if is_torch(x):
        return x.float()
    return x.astype(np.float32)


def _round(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``x`` rounded once to ``dtype``, C-contiguous (what gets written) in the same pass."""
    if x.dtype == dtype:
        return x
    if dtype.itemsize == 2 and x.dtype == np.float64:
        x = x.astype(np.float32, order="C")  # as torch rounds float64 to bf16/fp16: via float32
    return x.astype(dtype, order="C")


def cast(x: Array, like: Array) -> Array:
    """``x`` rounded once to ``like``'s dtype (float64 to bf16 or fp16 goes through float32, as
    in torch, so both give the same bytes)."""
    if is_torch(x):
        return x.to(like.dtype)
    return _round(x, like.dtype)


def stored(x: Array, code: str) -> np.ndarray:
    """``x`` rounded once to the dtype of safetensors ``code``, as a contiguous array."""
    if is_torch(x):
        return to_numpy(x.to(torch_dtype(code)).contiguous())
    return np.ascontiguousarray(_round(x, DTYPES[code]))


def as_matrices(mats: np.ndarray, like: Array) -> Array:
    """float64 ``mats`` as the kind of ``like`` (array or tensor), for products with it."""
    if is_torch(like):
        import torch

        return torch.as_tensor(mats, dtype=torch.float64)
    return np.asarray(mats, dtype=np.float64)


def concat(parts: list[Array], axis: int) -> Array:
    if parts and is_torch(parts[0]):
        import torch

        return torch.cat(parts, dim=axis)
    return np.concatenate(parts, axis=axis)


def einsum(spec: str, *operands: Array) -> Array:
    if is_torch(operands[0]):
        import torch

        return torch.einsum(spec, *operands)
    return np.einsum(spec, *operands, optimize=True)  # optimize: BLAS for batched products


def all_finite(x: Array, chunk: int = 1 << 16) -> bool:
    """Whether no element is NaN or +-Inf: for IEEE floats, whether every magnitude bit pattern
    is below that of +Inf (integer bits only, in cache-sized chunks: no float arithmetic and
    no temporary the size of ``x``)."""
    x = to_numpy(x)
    code = CODE_OF.get(x.dtype)
    if code not in _FLOAT_BITS or x.size == 0:
        return True
    exponent, mantissa = _FLOAT_BITS[code]
    bits = uint_view(np.ascontiguousarray(x)).reshape(-1)
    mask = bits.dtype.type((1 << (exponent + mantissa)) - 1)
    inf = ((1 << exponent) - 1) << mantissa
    buf = np.empty(min(chunk, bits.size), dtype=bits.dtype)
    for start in range(0, bits.size, chunk):
        part = bits[start : start + chunk]
        magnitude = np.bitwise_and(part, mask, out=buf[: part.size])
        if magnitude.max() >= inf:
            return False
    return True


def sign_masks(negate: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Per entry of ``negate``, the unsigned integer that XORed with a ``dtype`` float's bits
    negates it (its sign bit) or leaves it (zero)."""
    uint = _SAME_WIDTH_UINT[np.dtype(dtype).itemsize]
    sign = uint(1 << (8 * np.dtype(dtype).itemsize - 1))
    return np.where(np.asarray(negate, dtype=bool), sign, uint(0))


def scale_exactly(x: np.ndarray, scale: np.ndarray) -> None:
    """``x *= scale`` (broadcast) in place, in ``x``'s dtype, for a scale of powers of two.

    Signs only: the sign bit flipped, one pass, any format.  Otherwise bf16 and fp16 go through
    float32, where both the widening and the product are exact (short of overflow and fp16
    subnormals, which float32 then rounds once, as float64 would); the result is exactly
    representable again, so narrowing adds nothing.
    """
    if np.all(np.abs(scale) == 1):
        bits = uint_view(x)
        np.bitwise_xor(bits, sign_masks(scale < 0, x.dtype), out=bits)
    elif x.dtype in (np.float32, np.float64):
        np.multiply(x, scale.astype(x.dtype), out=x)
    else:
        x[...] = (x.astype(np.float32) * scale.astype(np.float32)).astype(x.dtype)


class Gathered:
    """A 2-D array defined as ``out = flips * take(source, index, axis)``, computed a few rows
    at a time when it is written (:meth:`fill`) instead of made whole in memory.

    ``index`` (or None: no gather) picks, for every output row (``axis=0``) or column
    (``axis=1``), a row or column of ``source``; ``flips`` (bool, along the same axis, or None)
    negates it.  Pure data movement and sign bits, so exact in any float format.  An MLP's
    permutation and sign flips are such maps: streamed from the memory-mapped input straight to
    the output file they cost one pass over cached chunks instead of three over whole tensors
    (BENCHMARKS.md, "Scale").
    """

    def __init__(
        self,
        source: np.ndarray,
        axis: int,
        index: np.ndarray | None = None,
        flips: np.ndarray | None = None,
    ) -> None:
        if source.ndim != 2 or axis not in (0, 1):
            raise ValueError("Gathered: a 2-D source and axis 0 or 1")
        n = source.shape[axis]
        self.source, self.axis = source, axis
        self.index = None if index is None else np.asarray(index, dtype=np.int64)
        if self.index is not None and (
            self.index.shape != (n,) or np.any((self.index < 0) | (self.index >= n))
        ):
            raise ValueError(f"Gathered: index must hold {n} positions in [0, {n})")
        self.signs = None if flips is None else sign_masks(flips, source.dtype)
        if self.signs is not None and self.signs.shape != (n,):
            raise ValueError(f"Gathered: flips must hold {n} entries")

    @property
    def shape(self) -> tuple[int, int]:
        return self.source.shape

    @property
    def dtype(self) -> np.dtype:
        return self.source.dtype

    def fill(self, start: int, stop: int, out: np.ndarray) -> None:
        """``out[...] = self[start:stop]``: whole rows, into a C-contiguous ``out`` of its dtype.

        ``take`` with ``mode="clip"`` (the index was checked once): with the default "raise"
        and an ``out``, numpy gathers into a temporary and copies it over (measured: 1.5x the
        time for row gathers, 1.7x for column gathers)."""
        src, bits = uint_view(self.source), uint_view(out)
        if self.index is None:
            np.copyto(bits, src[start:stop])
        elif self.axis == 0:
            np.take(src, self.index[start:stop], axis=0, out=bits, mode="clip")
        else:
            np.take(src[start:stop], self.index, axis=1, out=bits, mode="clip")
        if self.signs is not None:
            signs = self.signs[start:stop, None] if self.axis == 0 else self.signs[None, :]
            np.bitwise_xor(bits, signs, out=bits)

    def materialize(self) -> np.ndarray:
        """The whole array."""
        out = np.empty(self.shape, dtype=self.dtype)
        self.fill(0, self.shape[0], out)
        return out
