"""The streaming writer and the permutation gather: exact bytes, any order, any dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mergeshield.checkpoint import ShardWriter, WriteBehind
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
    layout = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    writer = ShardWriter(tmp_path / "out.safetensors", layout, meta)
    names = list(writer.order)
    if order == "reversed":
        names.reverse()
    elif order == "shuffled":
        names = [names[i] for i in np.random.default_rng(1).permutation(len(names))]
    with WriteBehind(max_bytes=64) as writes:  # tiny queue: writes wait for each other
        for name in names:
            writes.submit(writer.write, name, tensors[name])
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
