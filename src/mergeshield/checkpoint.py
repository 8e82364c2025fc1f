"""Hugging Face checkpoint folders: opening and validating them.

A checkpoint is a folder with ``config.json`` and ``model.safetensors`` or sharded
``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
:func:`open_checkpoint` reads only headers: every safetensors header is checked before the
safetensors library reads it, the config against the family adapters, every block tensor
against the shapes the config implies.  Reading and writing shards is :mod:`mergeshield.shards`;
the streaming rewrite is :mod:`mergeshield.rewrite`.  The input is only ever read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from mergeshield.architectures import SUPPORTED_MODEL_TYPES, ModelSpec, describe
from mergeshield.architectures.config import check_layer_counts, read_config
from mergeshield.arrays import (
    DTYPES,
    FLOAT_CODES,
)
from mergeshield.errors import MergeShieldError
from mergeshield.folders import index_weight_map, output_path, parse_json, read_json

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass
class Checkpoint:
    """A validated checkpoint folder (nothing is loaded but headers)."""

    path: Path
    config: Any  # architectures.config.read_config: the fields the adapters read
    shards: dict[str, list[str]]  # shard file name -> tensor names, in file order
    spec: ModelSpec
    codes: dict[str, str]  # safetensors dtype codes ("BF16", "F32", ...)
    shapes: dict[str, tuple[int, ...]]

    @property
    def shard_of(self) -> dict[str, str]:
        return {name: shard for shard, names in self.shards.items() for name in names}

    def layout(self, shard: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Name -> (dtype code, shape) of the tensors of ``shard``, in file order."""
        return {n: (self.codes[n], self.shapes[n]) for n in self.shards[shard]}


def _fail(message: str) -> None:
    raise MergeShieldError(message)


def load_config(path: Path) -> Any:
    """``config.json`` as the family adapters read it (:func:`read_config`; no transformers)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        _fail(f"{path}: no config.json (is this a Hugging Face model folder?)")
    raw = read_json(config_file)
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        _fail(
            f"{path}: unsupported model_type {model_type!r}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if raw.get("quantization_config"):
        _fail(f"{path}: quantized checkpoints are not supported; dequantize to fp32/bf16 first")
    try:
        return read_config(raw)
    except MergeShieldError as err:
        raise MergeShieldError(f"{path}/{err}") from None


def _shard_files(path: Path) -> list[str]:
    """The weight files of the checkpoint: the shards its index names (plain file names inside
    ``path``: :func:`mergeshield.folders.index_weight_map`), else ``model.safetensors``."""
    if (path / INDEX).is_file():
        files = sorted(set(index_weight_map(path).values()))
        for name in files:
            if not (path / name).is_file():
                _fail(f"{path}: shard {name} named in {INDEX} is missing")
        return files
    if (path / SINGLE).is_file():
        return [SINGLE]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        _fail(
            f"{path}: only safetensors checkpoints are supported; re-save with "
            "model.save_pretrained(folder, safe_serialization=True)"
        )
    _fail(f"{path}: no {SINGLE} or {INDEX}")
    raise AssertionError  # unreachable


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Validate a checkpoint folder and describe it; raises :class:`MergeShieldError`."""
    path = Path(path)
    if not path.exists():
        _fail(f"{path}: no such folder")
    if not path.is_dir():
        _fail(f"{path}: not a folder (give the model folder, not a file)")
    config = load_config(path)
    shards: dict[str, list[str]] = {}
    codes: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in _shard_files(path):
        file = path / shard
        _check_size(file)
        try:
            with safe_open(str(file), framework="numpy") as f:
                names = list(f.keys())
                for name in names:
                    s = f.get_slice(name)
                    shapes[name] = tuple(s.get_shape())
                    codes[name] = _dtype_code(s.get_dtype(), file, name)
        except MergeShieldError:
            raise
        except Exception as err:
            raise MergeShieldError(f"{file}: corrupt safetensors file ({err})") from None
        shards[shard] = names
    check_layer_counts(config, len(shapes), path)  # before describe() makes a spec per layer
    spec = describe(config, shapes.keys())
    _check_block_tensors(path, spec, codes, shapes)
    return Checkpoint(
        path=path, config=config, shards=shards, spec=spec, codes=codes, shapes=shapes
    )


def _check_size(file: Path) -> None:
    """A safetensors file is 8 bytes of header length, the JSON header, then the data: the
    header must be an object of ``{dtype, shape, data_offsets}`` entries (plus an optional
    ``__metadata__`` of strings) whose byte ranges fit their shapes and tile the data exactly.
    Checked before the safetensors library reads anything, so a hostile header costs nothing."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        if size < 8 or 8 + header_len > size:
            _fail(f"{file}: corrupt safetensors file (header longer than the file)")
        header = parse_json(fh.read(header_len), f"{file}: corrupt safetensors file; header")
    if not isinstance(header, dict):
        _fail(f"{file}: corrupt safetensors file (header is {type(header).__name__}, not object)")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        _fail(f"{file}: corrupt safetensors file (__metadata__ is not an object of strings)")
    spans = []
    for name, info in header.items():
        if not (
            isinstance(info, dict)
            and isinstance(info.get("dtype"), str)
            and _naturals(info.get("shape"))
            and _naturals(info.get("data_offsets"))
            and len(info["data_offsets"]) == 2
        ):
            _fail(f"{file}: corrupt safetensors file (entry {name!r} is not dtype/shape/offsets)")
        start, end = info["data_offsets"]
        dtype = DTYPES[_dtype_code(info["dtype"], file, name)]
        if end - start != math.prod(info["shape"]) * dtype.itemsize:
            _fail(f"{file}: corrupt safetensors file ({name}: data_offsets do not fit its shape)")
        spans.append((start, end))
    end = 0
    for start, stop in sorted(spans):
        if start != end:
            _fail(f"{file}: corrupt safetensors file (tensor data overlap or leave gaps)")
        end = stop
    if 8 + header_len + end != size:
        _fail(
            f"{file}: truncated or padded safetensors file "
            f"({size} bytes, its header says {8 + header_len + end})"
        )


def _naturals(value: Any) -> bool:
    """A JSON list of non-negative integers that fit in int64 (numpy's sizes)."""
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63 for v in value
    )


def _dtype_code(code: str, file: Path, name: str) -> str:
    if code not in DTYPES:
        _fail(f"{file}: tensor {name} has unsupported dtype {code} (quantized?)")
    return code


def _shaped(shape: tuple[int, ...]) -> np.ndarray:
    """An array of ``shape`` that holds no memory (every stride 0), for checking views."""
    return np.broadcast_to(np.empty((), dtype=np.uint8), shape)


def _check_block_tensors(
    path: Path, spec: ModelSpec, codes: dict[str, str], shapes: dict[str, tuple[int, ...]]
) -> None:
    for block in spec.blocks:
        for name in block.tensor_names():
            if codes[name] not in FLOAT_CODES:
                _fail(
                    f"{path}: {name} is {DTYPES[codes[name]]}; "
                    "integer or quantized weights cannot be transformed exactly"
                )
        expected = block.expected_shapes()
        for role, slot in block.slots().items():
            w = _shaped(shapes[slot.weight])
            b = _shaped(shapes[slot.bias]) if slot.bias else None
            tensors = {slot.weight: w} | ({slot.bias: b} if b is not None else {})
            wv, bv = slot.view(tensors)
            ok = tuple(wv.shape) == expected[role] and (
                bv is None or tuple(bv.shape) == expected[role][:1]
            )
            if not ok or (slot.chunk and w.shape[1 if slot.transposed else 0] % slot.chunk[1]):
                _fail(
                    f"{path}: {slot.weight} has shape {tuple(shapes[slot.weight])}, "
                    "but config.json "
                    f"implies {role} of shape {expected[role]} ([out, in])"
                )
        # --- per-head q/k norm weights (Qwen3, Gemma 3; issue 16) ---
        for name, shape in block.expected_norm_shapes().items():
            if tuple(shapes[name]) != shape:
                _fail(
                    f"{path}: {name} has shape {tuple(shapes[name])}, but config.json implies "
                    f"{shape} (head_dim)"
                )
        bias, heads = block.attention.position_bias, block.attention.n_heads  # T5: per head
        if bias is not None and (len(shapes[bias]) != 2 or shapes[bias][1] != heads):
            _fail(
                f"{path}: {bias} has shape {tuple(shapes[bias])}, but config.json implies "
                f"[buckets, {heads}] (one column per head)"
            )


def check_same_architecture(model: Checkpoint, other: Checkpoint) -> None:
    """``other`` has the same blocks as ``model`` (tensor names may differ by a prefix)."""
    a, b = model.spec.blocks, other.spec.blocks
    if len(a) != len(b):
        _fail(f"{other.path}: has {len(b)} blocks, {model.path} has {len(a)}")
    for x, y in zip(a, b, strict=True):
        if len(x.tensor_names()) != len(y.tensor_names()):
            _fail(
                f"{other.path}: block {y.name} has other tensors than {model.path} "
                "(biases?): not the same architecture"
            )
        for nx, ny in zip(x.tensor_names(), y.tensor_names(), strict=True):
            if model.shapes[nx] != other.shapes[ny]:
                _fail(
                    f"{other.path}: {ny} has shape {other.shapes[ny]}, but {nx} of "
                    f"{model.path} has {model.shapes[nx]}: not the same architecture"
                )


def check_output_path(
    src: Path, out: Path, overwrite: bool, also: Sequence[str | os.PathLike] = ()
) -> None:
    """Refuse an output that exists (without ``overwrite``), is a link, is or contains the
    current folder (with ``overwrite``), or is, lies inside or contains an input: ``src`` or
    any of ``also`` (other input folders or files: a base model, merge inputs, a key file)."""
    out = output_path(out)
    out_r = out.resolve()
    for item in (src, *also):
        item_r = Path(item).resolve()
        if out_r == item_r or item_r in out_r.parents:
            _fail(f"{out}: output must not be the input {item} or lie inside it")
        if out_r in item_r.parents:
            _fail(f"{out}: output must not contain the input {item}")
    if out.exists() and not overwrite:
        _fail(f"{out}: already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        _fail(f"{out}: exists and is not a folder")
    cwd = Path.cwd().resolve()
    if out.exists() and (out_r == cwd or out_r in cwd.parents):
        _fail(f"{out}: is or contains the current folder; run from elsewhere to replace it")
