"""Generated hostile inputs for the parsers a checkpoint folder goes through (the safetensors
header, the shard index, config.json) and for a key file's contents.  Whatever the bytes,
:func:`open_checkpoint` either describes the folder or raises :class:`MergeShieldError` (one
line), never anything else, never runs away, never touches a file outside the folder; an edited
key is refused in one line or restores a checkpoint."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from mergeshield.checkpoint import open_checkpoint
from mergeshield.errors import MergeShieldError
from mergeshield.protect import _content_hash, protect, unprotect
from tests.tiny_models import build

FUZZ = settings(
    max_examples=int(os.environ.get("MERGESHIELD_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
INDEX = "model.safetensors.index.json"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
dtypes = st.sampled_from(["F32", "F16", "BF16", "I8", "F64", "U8", "BOOL", "F8_E4M3", "Q4", ""])
naturals = st.integers(0, 64)


@st.composite
def headers(draw) -> tuple[bytes, int]:
    """A safetensors header (JSON bytes) and the number of data bytes to follow it: near-valid
    entries (consistent offsets, then perhaps one field spoiled) or any JSON at all."""
    if draw(st.booleans()):
        return json.dumps(draw(json_values)).encode(), draw(st.integers(0, 64))
    header: dict = {}
    offset = 0
    for i in range(draw(st.integers(0, 4))):
        code = draw(dtypes)
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        size = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}.get(code, 1) * math.prod(shape)
        entry = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
        if draw(st.integers(0, 4)) == 0:  # spoil one field
            entry[draw(st.sampled_from(sorted(entry)))] = draw(json_values)
        header[f"t{i}"] = entry
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), json_values, max_size=2))
    return json.dumps(header).encode(), offset + draw(st.sampled_from([0, 0, 1, -1]))


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz") / "bert"
    build("bert-seqcls", folder)
    return folder


def opens_or_refuses(folder: Path) -> None:
    try:
        open_checkpoint(folder)
    except MergeShieldError as err:
        assert "\n" not in str(err), str(err)


def fresh_copy(bert: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "case"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(bert, folder)
    return folder


@FUZZ
@given(case=headers(), raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_safetensors_header_fuzz(bert, tmp_path, case, raw):
    folder = fresh_copy(bert, tmp_path)
    header, data = case if raw is None else (raw, 0)
    length = len(header) if raw is None else int.from_bytes((raw + bytes(8))[:8], "little")
    body = header if raw is None else raw[8:]
    (folder / "model.safetensors").write_bytes(
        length.to_bytes(8, "little") + body + bytes(max(data, 0))
    )
    opens_or_refuses(folder)


@FUZZ
@given(weight_map=json_values, whole=st.booleans())
def test_index_fuzz(bert, tmp_path, weight_map, whole):
    folder = fresh_copy(bert, tmp_path)
    index = weight_map if whole else {"metadata": {}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index))
    before = sorted(p.name for p in tmp_path.iterdir())
    opens_or_refuses(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@FUZZ
@given(
    changes=st.dictionaries(
        st.sampled_from(
            [
                "model_type",
                "num_hidden_layers",
                "hidden_size",
                "num_attention_heads",
                "intermediate_size",
                "hidden_act",
                "quantization_config",
                "num_key_value_heads",
            ]
        ),  # fmt: skip
        json_values | st.integers(-3, 10**20),
        max_size=3,
    ),
    whole=st.one_of(st.none(), json_values),
)
def test_config_fuzz(bert, tmp_path, changes, whole):
    folder = fresh_copy(bert, tmp_path)
    config = json.loads((folder / "config.json").read_text()) | changes
    (folder / "config.json").write_text(json.dumps(config if whole is None else whole))
    opens_or_refuses(folder)


@pytest.fixture(scope="module")
def protected(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fuzz-key")
    build("llama-gqa2", root / "llama")
    protect(root / "llama", root / "p", "all", seed=2, key_out=root / "k")
    return root / "p", root / "k"


@FUZZ
@given(
    field=st.sampled_from(["kv_perm", "q_perm", "qk", "vo", "unit_perm", "unit_scale", "zz"]),
    block=st.integers(0, 3),
    shape=st.lists(st.integers(0, 5), max_size=3),
    dtype=st.sampled_from(["float64", "float32", "int64", "int8"]),
    values=st.lists(st.floats() | st.integers(-3, 3), min_size=1, max_size=4),
)
def test_key_fuzz(protected, tmp_path, field, block, shape, dtype, values):
    """Any one tensor of a key replaced (content hash updated, as a deliberate edit would):
    the key is refused in one line, or it restores a checkpoint."""
    out, key = protected
    with safe_open(str(key), framework="numpy") as f:
        meta = dict(f.metadata())
    arrays = load_numpy(key)
    with np.errstate(all="ignore"):
        filled = np.resize(np.array(values, dtype=np.float64), shape).astype(dtype)
    arrays[f"block.{block}.{field}"] = filled
    meta["content_sha256"] = _content_hash(arrays)
    edited = tmp_path / "edited.key"
    save_numpy(arrays, edited, metadata=meta)
    restored = tmp_path / "restored"
    shutil.rmtree(restored, ignore_errors=True)
    try:
        unprotect(out, edited, restored)
    except MergeShieldError as err:
        assert "\n" not in str(err), str(err)
        assert not restored.exists()
    else:
        assert open_checkpoint(restored).spec.blocks
