"""Hugging Face checkpoint folders: validation, streaming per block, atomic output.

A checkpoint is a folder with ``config.json`` and ``model.safetensors`` or sharded
``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``.  The input is only
ever read.  :func:`rewrite` writes the output shard by shard with the same tensor-to-shard
layout and dtypes, transforming one block at a time, into a temporary folder that is renamed
into place only when everything was written.  Tensors travel as numpy arrays
(:mod:`mergeshield.arrays`); torch is imported only by callers that ask for tensors.
"""

from __future__ import annotations

import errno
import functools
import gc
import json
import math
import mmap
import os
import shutil
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from mergeshield.architectures import SUPPORTED_MODEL_TYPES, BlockSpec, ModelSpec, describe
from mergeshield.architectures.config import check_layer_counts, read_config
from mergeshield.arrays import (
    CODE_OF,
    DTYPES,
    FLOAT_CODES,
    Array,
    Gathered,
    all_finite,
    code_of,
    float64,
    stored,
    to_numpy,
    to_torch,
)
from mergeshield.errors import MergeShieldError
from mergeshield.folders import atomic_dir, index_weight_map, output_path, parse_json, read_json
from mergeshield.symmetries.transform import view

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
            wv, bv = view(tensors, slot)
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


class ShardFile:
    """One safetensors file, its tensors read as views of a private memory map.

    The map is copy-on-write (``MAP_PRIVATE``): an array may be changed in place without ever
    touching the file.  Reading through the map costs no copy (a ``pread`` into fresh memory
    cost a third of a 1B protect's system time); the pages a map has touched count in the
    process's RSS until it is unmapped, so :func:`rewrite` releases each input shard once its
    output shard is written (:meth:`TensorReader.release`).  An array keeps its map alive.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            header_len = int.from_bytes(os.pread(self.fd, 8, 0), "little")
            header = json.loads(os.pread(self.fd, header_len, 8))
            self._map: mmap.mmap | None = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY)
        except Exception:
            os.close(self.fd)
            raise
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries: dict[str, dict[str, Any]] = header
        self.data_start = 8 + header_len

    def byte_range(self, name: str) -> tuple[int, int]:
        """``(offset in the file, length)`` of a tensor's bytes."""
        start, end = self._entries[name]["data_offsets"]
        return self.data_start + start, end - start

    def get_array(self, name: str) -> np.ndarray:
        info = self._entries[name]
        offset, nbytes = self.byte_range(name)
        dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
        if nbytes != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"data_offsets do not match shape {shape} and dtype {dtype}")
        if self._map is None or offset + nbytes > len(self._map):
            raise ValueError("file ends early" if self._map is not None else "file closed")
        if nbytes == 0:
            return np.empty(shape, dtype=dtype)
        return np.frombuffer(self._map, dtype=dtype, count=math.prod(shape), offset=offset).reshape(
            shape
        )

    def close(self) -> None:
        """Close the file; the map goes when the last array reading it does."""
        self._map = None
        os.close(self.fd)


# Largest single ``pwrite``.  Measured on this project's VM (BENCHMARKS.md, "Scale"): 1 GB
# written in 1 MiB pieces takes 0.23-0.29 s, in 8 MiB pieces 2.5-3.2 s (the page cache takes
# folios as large as each write, and large free blocks are the memory the VM's host has taken
# back, so every first touch of them faults in the host).  Small pieces cost syscalls: 16 KiB
# pieces took 0.5-0.7 s.
WRITE_CHUNK = 1 << 20

# Bytes of a :class:`Gathered` tensor made and written at a time: a cache-sized chunk (its
# gather, sign flips, NaN check and write-copy then read it from cache).
GATHER_CHUNK_BYTES = 1 << 19


class ShardWriter:
    """Write one safetensors file tensor by tensor, in any order, without holding the shard.

    The layout is exactly ``safetensors.torch.save_file``'s (so the bytes are identical):
    tensors sorted by dtype (safetensors' ``Dtype`` enum, descending) then by name, the JSON
    header compact with ``__metadata__`` first and padded with spaces to a multiple of 8
    bytes.  The header is written first (shapes and dtypes are known in advance); each tensor
    is then written with ``pwrite`` at its offset as soon as it is ready.
    """

    def __init__(
        self,
        path: Path,
        layout: dict[str, tuple[str, tuple[int, ...]]],
        metadata: dict[str, str] | None,
    ) -> None:
        """``layout``: tensor name -> (safetensors dtype code, shape)."""
        order = file_order(layout)
        header: dict[str, Any] = {"__metadata__": metadata} if metadata is not None else {}
        self.order = order  # offset order: writing in it appends to the file
        self._offsets: dict[str, tuple[int, int]] = {}
        self._layout = layout
        offset = 0
        for name in order:
            code, shape = layout[name]
            nbytes = math.prod(shape) * DTYPES[code].itemsize
            header[name] = {
                "dtype": code,
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._offsets[name] = (offset, nbytes)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % 8)
        self._data_start = 8 + len(raw)
        self._pending = set(layout)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._pwrite(len(raw).to_bytes(8, "little") + raw, 0)
        # No ftruncate to the final size: the file grows as tensors are written (in offset
        # order by ``rewrite``), and once every tensor is written it has that size.  Sizing it
        # up front made ext4 write every page into a hole, 3-8x slower than appending
        # (measured: 2.5 GB in 3.6-8.9 s vs 1.1 s).

    def _pwrite(self, data: bytes | memoryview, at: int) -> None:
        """``pwrite`` in chunks of at most ``WRITE_CHUNK`` bytes (see there)."""
        view_ = memoryview(data).cast("B")
        done = 0
        while done < len(view_):
            done += os.pwrite(self._fd, view_[done : done + WRITE_CHUNK], at + done)

    def write(self, name: str, tensor: Array) -> None:
        """Write one tensor (a numpy array, or a CPU torch tensor) at its offset."""
        code, shape = self._layout[name]
        if code_of(tensor) != code or tuple(tensor.shape) != tuple(shape):
            raise AssertionError(
                f"{name}: {code_of(tensor)} {tuple(tensor.shape)}, not {code} {shape}"
            )
        offset, nbytes = self._offsets[name]
        if nbytes:
            data = np.ascontiguousarray(to_numpy(tensor)).reshape(-1).view(np.uint8)
            self._pwrite(data.data, self._data_start + offset)
        self._pending.discard(name)

    @np.errstate(over="ignore", invalid="ignore")  # overflow is checked and named below
    def write_gathered(self, name: str, tensor: Gathered, bad_input: Callable[[], None]) -> None:
        """Write a :class:`Gathered` tensor ``GATHER_CHUNK_BYTES`` at a time: each chunk is
        computed, checked for NaN and Inf and written while it is in cache.  ``bad_input`` runs
        when a chunk is not finite, to raise the error that names a bad input tensor."""
        code, shape = self._layout[name]
        if CODE_OF.get(tensor.dtype) != code or tuple(tensor.shape) != tuple(shape):
            raise AssertionError(f"{name}: {tensor.dtype} {tensor.shape}, not {code} {shape}")
        offset, nbytes = self._offsets[name]
        row_bytes = nbytes // shape[0] if shape[0] else 0
        step = max(1, GATHER_CHUNK_BYTES // max(1, row_bytes))
        buf = np.empty((min(step, shape[0]), shape[1]), dtype=tensor.dtype)
        for start in range(0, shape[0], step):
            part = buf[: min(step, shape[0] - start)]
            tensor.fill(start, start + len(part), part)
            if not all_finite(part):
                bad_input()
                _fail(f"{name}: transform produced NaN or Inf")
            self._pwrite(
                part.reshape(-1).view(np.uint8).data, self._data_start + offset + start * row_bytes
            )
        self._pending.discard(name)

    def copy(self, name: str, source: ShardFile) -> None:
        """Copy tensor ``name`` unchanged from ``source`` inside the kernel (``copy_file_range``:
        no pass through user memory); a plain write of its bytes where that is refused."""
        offset, nbytes = self._offsets[name]
        at, source_nbytes = source.byte_range(name)
        if source_nbytes != nbytes:
            raise AssertionError(f"{name}: {source_nbytes} bytes in {source.path}, not {nbytes}")
        done = 0
        try:
            if not hasattr(os, "copy_file_range"):  # not Linux
                raise OSError(errno.ENOSYS, "no copy_file_range")
            while done < nbytes:
                n = os.copy_file_range(
                    source.fd, self._fd, nbytes - done, at + done, self._data_start + offset + done
                )
                if n <= 0:
                    raise OSError(errno.EIO, f"{source.path} ends early")
                done += n
        except OSError as err:
            if err.errno not in _NO_COPY_FILE_RANGE:
                raise
            self.write(name, source.get_array(name))
        self._pending.discard(name)

    def close(self) -> None:
        os.close(self._fd)

    def check_complete(self) -> None:
        if self._pending:
            raise AssertionError(f"{self.path}: tensors never written: {sorted(self._pending)}")


def file_order(layout: dict[str, tuple[str, tuple[int, ...]]]) -> list[str]:
    """The order in which ``save_file`` lays tensors out (dtype, largest first, then name)."""
    return sorted(layout, key=lambda n: (-_ST_DTYPE_ORDER.index(layout[n][0]), n))


# errors of ``copy_file_range`` that mean "not here" (old kernel, file systems that differ)
_NO_COPY_FILE_RANGE = (errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF)

# safetensors' ``Dtype`` enum order; ``save_file`` lays tensors out by it, largest first.
_ST_DTYPE_ORDER = [
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
]  # fmt: skip


class TensorReader:
    """Access to every tensor of a checkpoint (memory-mapped, :class:`ShardFile`), checked for
    NaN and Inf: :meth:`get_array` as numpy arrays in the stored dtype, :meth:`get` as torch
    tensors."""

    def __init__(self, checkpoint: Checkpoint, stack: ExitStack) -> None:
        self.checkpoint = checkpoint
        self._files: dict[str, ShardFile] = {}
        self._shard_of = checkpoint.shard_of
        self._lock = threading.Lock()  # blocks may be read from several threads
        stack.callback(self.close)

    def file(self, name: str) -> ShardFile:
        """The open shard file holding tensor ``name`` (opened on first use)."""
        return self.shard(self._shard_of[name])

    def shard(self, shard: str) -> ShardFile:
        """The open shard file ``shard`` (opened on first use)."""
        with self._lock:
            if shard not in self._files:
                self._files[shard] = ShardFile(self.checkpoint.path / shard)
            return self._files[shard]

    def release(self, shard: str) -> None:
        """Close one shard (reopened if read again); its map goes with its last array."""
        with self._lock:
            file = self._files.pop(shard, None)
        if file is not None:
            file.close()

    def close(self) -> None:
        for shard in list(self._files):
            self.release(shard)

    def get_array(self, name: str, check: bool = True) -> np.ndarray:
        """Tensor ``name`` as stored; ``check``: refuse NaN and Inf values."""
        try:
            array = self.file(name).get_array(name)
        except Exception as err:
            raise MergeShieldError(f"{self.checkpoint.path}: cannot read {name} ({err})") from None
        if check and not all_finite(array):
            _fail(f"{self.checkpoint.path}: {name} contains NaN or Inf values")
        return array

    def check_block(self, block: BlockSpec) -> None:
        """Refuse a block whose stored tensors hold NaN or Inf (one error line naming the
        tensor).  Read through a fresh map of each file: a transform may have changed the
        arrays of this reader in place (a private map), and its overflow is not the input's."""
        for name in block.tensor_names():
            file = ShardFile(self.checkpoint.path / self._shard_of[name])
            try:
                finite = all_finite(file.get_array(name))
            finally:
                file.close()
            if not finite:
                _fail(f"{self.checkpoint.path}: {name} contains NaN or Inf values")

    def get(self, name: str):
        """``name`` as a torch tensor (imports torch)."""
        return to_torch(self.get_array(name))

    def block(
        self,
        block: BlockSpec,
        like: BlockSpec | None = None,
        wide: bool = True,
        arrays: bool = False,
        check: bool = True,
    ) -> dict[str, Array]:
        """The block's tensors: float64 working copies (``wide``) or as stored, as numpy
        arrays (``arrays``) or torch tensors; ``check``: refuse NaN and Inf values.

        With ``like`` (the same block of another checkpoint of the same architecture, e.g. a
        ``BertForSequenceClassification`` whose names carry a ``bert.`` prefix), the tensors are
        keyed by ``like``'s names, matched by role (q, k, v, o, up, down, gate).
        """
        names = block.tensor_names()
        keys = like.tensor_names() if like is not None else names
        out = {}
        for key, name in zip(keys, names, strict=True):
            array = self.get_array(name, check)
            array = float64(array) if wide else array
            out[key] = array if arrays else to_torch(array)
        return out


WRITE_BEHIND_BYTES = 64 * 2**20
# Tensors written at once: a streamed (:class:`Gathered`) tensor is computed as it is written,
# so a second writer keeps both cores busy; tensors start in file order and each is written at
# its own offset.
WRITE_THREADS = 2


class WriteBehind:
    """Tensor writes run on ``threads`` background threads, started in order, so that the next
    block is read and transformed while this one is written: ``pwrite`` and numpy's loops
    release the GIL, and the page-cache copy of a write costs as much CPU as a block's
    transform.  At most ``max_bytes`` of tensors wait (one larger tensor waits alone);
    :meth:`wait` blocks until all are written and re-raises the first error."""

    def __init__(self, max_bytes: int, threads: int = 1) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="mergeshield-write")
        self._queued: deque[tuple[Future[None], int]] = deque()
        self._bytes, self._max = 0, max_bytes

    def submit(self, job: Callable[[], None], nbytes: int) -> None:
        """Run ``job`` (a write holding ``nbytes`` of memory) after those already queued."""
        while self._queued and self._bytes + nbytes > self._max:
            self._pop(reraise=True)
        self._queued.append((self._pool.submit(job), nbytes))
        self._bytes += nbytes

    def _pop(self, reraise: bool) -> None:
        future, nbytes = self._queued.popleft()
        self._bytes -= nbytes
        error = future.exception()
        if error is not None and reraise:
            raise error

    def wait(self, reraise: bool = True) -> None:
        while self._queued:
            self._pop(reraise)

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wait(reraise=False)
        self._pool.shutdown()


@contextmanager
def reader(checkpoint: Checkpoint) -> Iterator[TensorReader]:
    with ExitStack() as stack:
        yield TensorReader(checkpoint, stack)


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


@contextmanager
def atomic_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """:func:`mergeshield.folders.atomic_dir`, refusing to replace an existing ``out`` (one
    that appeared while writing) unless ``overwrite``."""
    with atomic_dir(out) as tmp:
        yield tmp
        if out.exists() and not overwrite:
            _fail(f"{out}: already exists; pass --overwrite to replace it")


# Files that hold or point to weights: never copied into an output, whose only weights are
# the ones written by :func:`rewrite` (copied, they would publish the original model).
WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".keras", ".msgpack", ".gguf",
    ".ggml", ".onnx", ".npz", ".npy", ".pkl", ".pickle", ".joblib", ".tflite", ".mlmodel",
    ".index.json", ".distcp",
)  # fmt: skip
# Folders that may hold copies of the weights (git and git-lfs objects, the hub's cache).
SKIPPED_FOLDERS = (".git", ".cache", ".huggingface")


def copy_side_files(src: Path, dst: Path) -> list[Path]:
    """Copy everything but weights (tokenizer, configs, README, sub-folders) from ``src`` to
    ``dst``; return the paths left out: the checkpoint's own shards are rewritten, and any
    other weight file (:data:`WEIGHT_SUFFIXES`, e.g. a stray ``pytorch_model.bin``, a
    ``model.safetensors`` beside an index, ``original/consolidated.00.pth``) or
    :data:`SKIPPED_FOLDERS` folder is not published."""
    shards = set(_shard_files(src))  # rewritten; the index, if any, is copied as is
    left_out: list[Path] = []

    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder) == src
        skip = {
            name
            for name in names
            if (name.lower().endswith(WEIGHT_SUFFIXES) and not (top and name == INDEX))
            or (name in SKIPPED_FOLDERS and os.path.isdir(os.path.join(folder, name)))
        }
        left_out.extend(Path(folder, n) for n in sorted(skip) if not (top and n in shards))
        return skip

    shutil.copytree(src, dst, ignore=ignore, dirs_exist_ok=True)
    return left_out


@contextmanager
def no_cyclic_gc() -> Iterator[None]:
    """Python's cycle collector paused: a rewrite makes no reference cycles, and the collector
    would otherwise run over every live object a few hundred times (measured: 4% of the CPU
    time of protecting a 1B checkpoint)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


BlockFn = Callable[[int, BlockSpec, dict[str, Array]], dict[str, Array]]


# Blocks transformed at once by a stored-dtype (numpy) rewrite: numpy's loops release the GIL,
# so block i + 1 is transformed on the second core while block i is finished and written.
BLOCK_WORKERS = 2


def rewrite(
    checkpoint: Checkpoint,
    out: Path,
    transform_block: BlockFn,
    metadata: dict[str, str],
    overwrite: bool = False,
    on_block: Callable[[], None] | None = None,
    wide: bool = True,
    arrays: bool = False,
    also: Sequence[str | os.PathLike] = (),
    before_publish: Callable[[], None] | None = None,
) -> list[Path]:
    """Write ``checkpoint`` to ``out`` with every block passed through ``transform_block``;
    return the weight files of the input left out of ``out`` (:func:`copy_side_files`).

    ``transform_block(index, block, tensors)`` gets the block's tensors as float64 working
    copies (``wide``; else in their stored dtype), as numpy arrays (``arrays``; else torch
    tensors), and returns the new tensors; they are cast back to the stored dtype here, once (a
    no-op for tensors already in it).  With ``arrays`` and not ``wide``, ``BLOCK_WORKERS``
    blocks are transformed at once (``transform_block`` must be thread-safe); else one.
    Each output shard is written tensor by tensor (:class:`ShardWriter`, on a background
    thread: :class:`WriteBehind`) and the input is memory-mapped (:class:`ShardFile`), so
    memory holds the blocks in flight (working copies plus their cast) and at most
    ``WRITE_BEHIND_BYTES`` of finished tensors waiting to be written, never a whole shard; a
    block whose tensors straddle two shards is kept until its last tensor is written.

    ``also``: other inputs ``out`` must not replace (:func:`check_output_path`).
    ``before_publish`` runs once every shard is complete, before ``out`` is renamed into place
    (``protect`` writes its key there); if it fails, nothing is published.
    """
    check_output_path(checkpoint.path, out, overwrite, also)
    blocks = checkpoint.spec.blocks
    block_of = {n: i for i, b in enumerate(blocks) for n in b.tensor_names()}
    layouts = {
        shard: {n: (checkpoint.codes[n], checkpoint.shapes[n]) for n in names}
        for shard, names in checkpoint.shards.items()
    }
    # blocks in the order the output first needs them
    needed = [block_of[n] for lay in layouts.values() for n in file_order(lay) if n in block_of]
    needed = list(dict.fromkeys(needed))
    workers = BLOCK_WORKERS if arrays and not wide else 1

    @np.errstate(over="ignore", invalid="ignore")  # overflow is checked and named below
    def finished_block(src: TensorReader, index: int) -> dict[str, np.ndarray | Gathered]:
        """Block ``index`` transformed and cast back to the stored dtypes, checked."""
        block = blocks[index]
        # The outputs are checked for NaN and Inf, and the inputs only when an output fails
        # (every input tensor is an output too): half the checks.
        tensors = src.block(block, wide=wide, arrays=arrays, check=False)
        try:
            new = transform_block(index, block, tensors)
        except Exception:
            src.check_block(block)  # bad input, not a bug: say so
            raise
        del tensors
        done: dict[str, np.ndarray | Gathered] = {}
        for key in list(new):
            value = new.pop(key)
            if isinstance(value, Gathered):
                if CODE_OF.get(value.dtype) == checkpoint.codes[key]:
                    done[key] = value  # made, checked and written in chunks by the writer
                    continue
                value = value.materialize()
            if not all_finite(value):
                src.check_block(block)
                _fail(f"{key}: transform produced NaN or Inf (ill-conditioned?)")
            done[key] = stored(value, checkpoint.codes[key])
        return done

    with (
        no_cyclic_gc(),
        reader(checkpoint) as src,
        atomic_folder(out, overwrite) as tmp,
        WriteBehind(WRITE_BEHIND_BYTES, WRITE_THREADS) as writes,
        ThreadPoolExecutor(workers, thread_name_prefix="mergeshield-block") as pool,
    ):
        left_out = copy_side_files(checkpoint.path, tmp)
        in_flight: dict[int, Future[dict[str, np.ndarray | Gathered]]] = {}

        def take_block(index: int) -> dict[str, np.ndarray | Gathered]:
            """Wait for block ``index``, with the next ``workers - 1`` blocks started."""
            position = needed.index(index)
            for ahead in needed[position : position + workers]:
                if ahead not in in_flight:
                    in_flight[ahead] = pool.submit(finished_block, src, ahead)
            return in_flight.pop(index).result()

        def checked_copy(writer: ShardWriter, name: str) -> None:
            src.get_array(name)  # refuses NaN and Inf
            writer.copy(name, src.file(name))

        pending: dict[str, np.ndarray | Gathered] = {}
        try:
            for shard, layout in layouts.items():
                shard_meta = {
                    k: v
                    for k, v in src.shard(shard).metadata.items()
                    if not k.startswith("mergeshield_")
                }
                writer = ShardWriter(tmp / shard, layout, shard_meta | metadata)
                try:
                    for name in writer.order:
                        if name not in block_of:
                            # checked for NaN and Inf through the map, then copied, by a writer
                            # thread while the first blocks are transformed (an 8B model's
                            # embeddings: 0.5 s of page faults)
                            job = functools.partial(checked_copy, writer, name)
                            writes.submit(job, 0)
                            continue
                        if name not in pending:
                            pending |= take_block(block_of[name])
                            if on_block is not None:
                                on_block()
                        array = pending.pop(name)
                        if isinstance(array, Gathered):
                            bad_input = functools.partial(src.check_block, blocks[block_of[name]])
                            job = functools.partial(writer.write_gathered, name, array, bad_input)
                            writes.submit(job, GATHER_CHUNK_BYTES)
                        else:
                            job = functools.partial(writer.write, name, array)
                            writes.submit(job, array.nbytes)
                        del array, job
                    writes.wait()
                finally:
                    writes.wait(reraise=False)  # nothing may write to a closed file
                    writer.close()
                writer.check_complete()
                src.release(shard)  # its pages leave this process's RSS
        finally:
            for future in in_flight.values():
                future.cancel()
        if before_publish is not None:
            before_publish()
    return left_out
