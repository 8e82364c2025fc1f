"""The streaming writer and the permutation gather: exact bytes, any order, any dtype."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mergeshield import shards as shards_module
from mergeshield.arrays import Gathered, code_of, to_numpy
from mergeshield.errors import MergeShieldError
from mergeshield.shards import ShardWriter, WriteBehind
from mergeshield.symmetries.transform import take


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(5, generator=g),
        "c.weight": torch.randn(3, 4, generator=g).to(torch.float16),
        "d.ids": torch.arange(6, dtype=torch.int64),
        "e.empty": torch.zeros(0, 4),
        "z.last_empty": torch.zeros(2, 0, dtype=torch.bfloat16),
    }


@pytest.mark.parametrize("order", ["file", "reversed", "shuffled"])
def test_shard_writer_bytes_equal_save_file_in_any_write_order(tmp_path, order):
    tensors = _tensors()
    meta = {"format": "pt"}  # one key: save_file orders several from a hash map
    save_file(tensors, tmp_path / "ref.safetensors", metadata=meta)
    layout = {n: (code_of(t), tuple(t.shape)) for n, t in tensors.items()}
    writer = ShardWriter(tmp_path / "out.safetensors", layout, meta)
    names = list(writer.order)
    if order == "reversed":
        names.reverse()
    elif order == "shuffled":
        names = [names[i] for i in np.random.default_rng(1).permutation(len(names))]
    with WriteBehind(max_bytes=64) as writes:  # tiny queue: writes wait for each other
        for name in names:
            job = functools.partial(writer.write, name, tensors[name])
            writes.submit(job, tensors[name].nbytes)
        writes.wait()
    writer.close()
    writer.check_complete()
    written, expected = (tmp_path / f"{n}.safetensors" for n in ("out", "ref"))
    assert written.read_bytes() == expected.read_bytes()


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8]
)
@pytest.mark.parametrize("transposed", [False, True])
def test_take_is_index_select(dtype, transposed):
    x = (torch.randn(12, 10, generator=torch.Generator().manual_seed(2)) * 50).to(dtype)
    if transposed:
        x = x.T  # a strided view, as for GPT-2's Conv1D weights
    for dim in (0, 1):
        index = np.random.default_rng(dim).permutation(x.shape[dim])
        got = take(x, index, dim)
        want = x.index_select(dim, torch.from_numpy(index))
        assert got.dtype == dtype and got.is_contiguous()
        assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8))


@pytest.mark.parametrize("copy_file_range", ["kernel", "refused"])
def test_shard_writer_copies_unchanged_tensors_byte_for_byte(
    tmp_path, monkeypatch, copy_file_range
):
    """Tensors outside the blocks are copied file to file (``copy_file_range``), or written
    from the map where the kernel refuses: the same bytes either way."""
    import errno
    import os

    from mergeshield.shards import ShardFile

    tensors = _tensors()
    meta = {"format": "pt"}
    save_file(tensors, tmp_path / "ref.safetensors", metadata=meta)
    if copy_file_range == "refused":

        def refuse(*args, **kwargs):
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    source = ShardFile(tmp_path / "ref.safetensors")
    layout = {n: (code_of(t), tuple(t.shape)) for n, t in tensors.items()}
    writer = ShardWriter(tmp_path / "out.safetensors", layout, meta)
    for name in writer.order:
        writer.copy(name, source)
    writer.close()
    source.close()
    writer.check_complete()
    assert (tmp_path / "out.safetensors").read_bytes() == (
        tmp_path / "ref.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("strided", [False, True])
def test_gathered_is_take_with_sign_flips_in_any_chunks(dtype, axis, strided):
    """``Gathered`` filled a few rows at a time gives the bytes of ``take`` then negating,
    for a permutation, the identity (no index) and a repeated index, on a contiguous or a
    transposed (GPT-2 ``Conv1D``) source."""
    x = to_numpy(torch.randn(9, 7, generator=torch.Generator().manual_seed(5)).to(dtype))
    x = x.T.copy().T if strided else x
    n, rng = x.shape[axis], np.random.default_rng(6)
    flips = rng.random(n) < 0.5
    for index in (rng.permutation(n), None, rng.integers(0, n, n)):
        g = Gathered(x, axis, index, flips)
        expected = np.take(x, np.arange(n) if index is None else index, axis=axis).astype(
            np.float64
        )
        expected *= np.expand_dims(np.where(flips, -1.0, 1.0), 1 - axis)
        whole = g.materialize()
        assert np.array_equal(whole.astype(np.float64), expected)
        for step in (1, 2, 4):
            parts = np.empty_like(whole)
            for start in range(0, len(parts), step):
                g.fill(start, min(len(parts), start + step), parts[start : start + step])
            assert np.array_equal(parts.view(np.uint8), whole.view(np.uint8))
    with pytest.raises(ValueError, match="index"):
        Gathered(x, axis, np.arange(n) + 1)
    with pytest.raises(ValueError, match="flips"):
        Gathered(x, axis, None, flips[:-1])


@pytest.mark.parametrize("chunk_bytes", [1, 40, 1 << 19])
def test_gathered_tensors_are_written_chunk_by_chunk_exactly(tmp_path, monkeypatch, chunk_bytes):
    """A :class:`Gathered` tensor written in chunks (one row, a few rows, whole) gives the bytes
    of writing it made whole, next to plain tensors; a NaN reaching the output raises, after
    ``bad_input`` had its say."""
    monkeypatch.setattr(shards_module, "GATHER_CHUNK_BYTES", chunk_bytes)
    tensors = {k: to_numpy(v) for k, v in _tensors().items()}
    rng = np.random.default_rng(7)
    lazy = {
        "a.weight": Gathered(tensors["a.weight"], 0, rng.permutation(7), rng.random(7) < 0.5),
        "c.weight": Gathered(tensors["c.weight"], 1, rng.permutation(4), rng.random(4) < 0.5),
    }
    layout = {n: (code_of(t), tuple(t.shape)) for n, t in tensors.items()}
    for kind in ("lazy", "whole"):
        writer = ShardWriter(tmp_path / f"{kind}.safetensors", layout, {"format": "pt"})
        for name in writer.order:
            if name in lazy and kind == "lazy":
                writer.write_gathered(name, lazy[name], lambda: None)
            else:
                writer.write(name, lazy[name].materialize() if name in lazy else tensors[name])
        writer.close()
        writer.check_complete()
    assert (tmp_path / "lazy.safetensors").read_bytes() == (
        tmp_path / "whole.safetensors"
    ).read_bytes()
    bad = tensors["a.weight"].copy()
    bad[5, 3] = np.nan
    called = []
    writer = ShardWriter(tmp_path / "bad.safetensors", layout, None)
    with pytest.raises(MergeShieldError, match="NaN or Inf"):
        writer.write_gathered("a.weight", Gathered(bad, 0, np.arange(7)), lambda: called.append(1))
    writer.close()
    assert called == [1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_all_finite_finds_every_nan_and_inf(dtype):
    """The integer-bit test agrees with ``torch.isfinite`` for each float format, wherever
    the bad value sits (first element, across a chunk boundary, last element)."""
    from mergeshield.arrays import all_finite, to_numpy

    x = torch.randn(3, 50_000, generator=torch.Generator().manual_seed(3)).to(dtype)
    x[0, 0] = torch.finfo(dtype).max  # the largest finite value is finite
    x[1, 1] = -torch.finfo(dtype).tiny / 4  # so is a subnormal
    assert all_finite(to_numpy(x)) and all_finite(x)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for index in (0, 65_536, x.numel() - 1):
            y = x.clone().reshape(-1)
            y[index] = bad
            assert not all_finite(to_numpy(y), chunk=4096)
            assert not all_finite(to_numpy(y))


def test_bf16_rounding_matches_torch():
    """float64 -> bf16 in numpy (through float32, as torch does) gives torch's bytes."""
    from mergeshield.arrays import bfloat16, stored, to_numpy, to_torch

    g = torch.Generator().manual_seed(4)
    x = torch.randn(100_000, generator=g, dtype=torch.float64) * torch.logspace(
        -30, 30, 100_000, dtype=torch.float64
    )
    ours = stored(x.numpy(), "BF16")
    assert ours.dtype == bfloat16
    assert torch.equal(to_torch(ours).view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    assert torch.equal(to_torch(to_numpy(x.to(torch.bfloat16))), x.to(torch.bfloat16))
