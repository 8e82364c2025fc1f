"""Hugging Face checkpoint folders: validation, streaming per block, atomic output.

A checkpoint is a folder with ``config.json`` and ``model.safetensors`` or sharded
``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``.  The input is only
ever read (memory-mapped).  :func:`rewrite` writes the output shard by shard with the same
tensor-to-shard layout and dtypes, transforming one block at a time, into a temporary folder
that is renamed into place only when everything was written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mergeshield.architectures import SUPPORTED_MODEL_TYPES, BlockSpec, ModelSpec, describe
from mergeshield.architectures.config import read_config
from mergeshield.errors import MergeShieldError
from mergeshield.folders import atomic_dir
from mergeshield.symmetries.transform import view

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Checkpoint:
    """A validated checkpoint folder (nothing is loaded but headers)."""

    path: Path
    config: Any  # architectures.config.read_config: the fields the adapters read
    shards: dict[str, list[str]]  # shard file name -> tensor names, in file order
    spec: ModelSpec
    dtypes: dict[str, torch.dtype]
    shapes: dict[str, tuple[int, ...]]

    @property
    def shard_of(self) -> dict[str, str]:
        return {name: shard for shard, names in self.shards.items() for name in names}


def _fail(message: str) -> None:
    raise MergeShieldError(message)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no element is NaN or +-Inf.

    Fast path: NaN and Inf propagate through a sum (``x + NaN = NaN``, ``x + Inf = Inf``,
    ``Inf - Inf = NaN``), so a finite sum proves every term finite; it costs one reduction
    instead of a boolean tensor the size of ``tensor`` (~20x faster on CPU).  A non-finite sum
    may also be an overflow of finite terms, so only then is every element tested.
    """
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def load_config(path: Path) -> Any:
    """``config.json`` as the family adapters read it (:func:`read_config`; no transformers)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        _fail(f"{path}: no config.json (is this a Hugging Face model folder?)")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MergeShieldError(f"{config_file}: not valid JSON ({err})") from None
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
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise MergeShieldError(f"{index}: malformed index ({err})") from None
        files = sorted(set(weight_map.values()))
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
    dtypes: dict[str, torch.dtype] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in _shard_files(path):
        file = path / shard
        _check_size(file)
        try:
            with safe_open(str(file), framework="pt") as f:
                names = list(f.keys())
                for name in names:
                    s = f.get_slice(name)
                    shapes[name] = tuple(s.get_shape())
                    dtypes[name] = _torch_dtype(s.get_dtype(), file, name)
        except MergeShieldError:
            raise
        except Exception as err:
            raise MergeShieldError(f"{file}: corrupt safetensors file ({err})") from None
        shards[shard] = names
    spec = describe(config, shapes.keys())
    _check_block_tensors(path, spec, dtypes, shapes)
    return Checkpoint(
        path=path, config=config, shards=shards, spec=spec, dtypes=dtypes, shapes=shapes
    )


def _check_size(file: Path) -> None:
    """A safetensors file is 8 bytes of header length, the JSON header, then the data."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if size < 8 or 8 + header_len > size:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(header_len))
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
        )
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise MergeShieldError(f"{file}: corrupt safetensors file ({err})") from None
    if 8 + header_len + end != size:
        _fail(
            f"{file}: truncated or padded safetensors file "
            f"({size} bytes, its header says {8 + header_len + end})"
        )


_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


def _torch_dtype(code: str, file: Path, name: str) -> torch.dtype:
    if code not in _DTYPES:
        _fail(f"{file}: tensor {name} has unsupported dtype {code} (quantized?)")
    return _DTYPES[code]


def _check_block_tensors(
    path: Path, spec: ModelSpec, dtypes: dict[str, torch.dtype], shapes: dict[str, tuple[int, ...]]
) -> None:
    for block in spec.blocks:
        for name in block.tensor_names():
            if dtypes[name] not in FLOAT_DTYPES:
                _fail(
                    f"{path}: {name} is {str(dtypes[name]).removeprefix('torch.')}; "
                    "integer or quantized weights cannot be transformed exactly"
                )
        expected = block.expected_shapes()
        for role, slot in block.slots().items():
            w = torch.empty(shapes[slot.weight], device="meta")
            b = torch.empty(shapes[slot.bias], device="meta") if slot.bias else None
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


class ShardFile:
    """One safetensors file read with ``pread`` at the offsets of its header (no mmap).

    A memory map would leave every page read so far resident (and counted in the process's
    RSS) until the file is closed, i.e. the whole input checkpoint by the end of a rewrite;
    ``pread`` into a fresh tensor costs the same single copy and keeps nothing.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        try:
            header_len = int.from_bytes(os.pread(self._fd, 8, 0), "little")
            header = json.loads(os.pread(self._fd, header_len, 8))
        except Exception:
            os.close(self._fd)
            raise
        header.pop("__metadata__", None)
        self._entries: dict[str, dict[str, Any]] = header
        self._data_start = 8 + header_len

    def get_tensor(self, name: str) -> torch.Tensor:
        info = self._entries[name]
        start, end = info["data_offsets"]
        tensor = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
        if end - start != tensor.numel() * tensor.element_size():
            raise ValueError(f"data_offsets {start}..{end} do not match shape and dtype")
        buf = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], self._data_start + start + done)
            if n <= 0:
                raise ValueError("file ends early")
            done += n
        return tensor

    def close(self) -> None:
        os.close(self._fd)


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
        layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None,
    ) -> None:
        code_of = {dtype: code for code, dtype in _DTYPES.items()}
        order = sorted(layout, key=lambda n: (-_ST_DTYPE_ORDER.index(code_of[layout[n][0]]), n))
        header: dict[str, Any] = {"__metadata__": metadata} if metadata is not None else {}
        self.order = order  # offset order: writing in it appends to the file
        self._offsets: dict[str, tuple[int, int]] = {}
        self._layout = layout
        offset = 0
        for name in order:
            dtype, shape = layout[name]
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": code_of[dtype],
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
        view_ = memoryview(data)
        done = 0
        while done < len(view_):
            done += os.pwrite(self._fd, view_[done:], at + done)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape = self._layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise AssertionError(
                f"{name}: {tensor.dtype} {tuple(tensor.shape)}, not {dtype} {shape}"
            )
        offset, nbytes = self._offsets[name]
        if nbytes:
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
            self._pwrite(data.data, self._data_start + offset)
        self._pending.discard(name)

    def close(self) -> None:
        os.close(self._fd)

    def check_complete(self) -> None:
        if self._pending:
            raise AssertionError(f"{self.path}: tensors never written: {sorted(self._pending)}")


# safetensors' ``Dtype`` enum order; ``save_file`` lays tensors out by it, largest first.
_ST_DTYPE_ORDER = [
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
]  # fmt: skip


class TensorReader:
    """Access to every tensor of a checkpoint (``pread``, no mmap), checked for NaN and Inf."""

    def __init__(self, checkpoint: Checkpoint, stack: ExitStack) -> None:
        self.checkpoint = checkpoint
        self._files: dict[str, ShardFile] = {}
        for shard in checkpoint.shards:
            file = ShardFile(checkpoint.path / shard)
            stack.callback(file.close)
            self._files[shard] = file
        self._shard_of = checkpoint.shard_of

    def get(self, name: str) -> torch.Tensor:
        try:
            tensor = self._files[self._shard_of[name]].get_tensor(name)
        except Exception as err:
            raise MergeShieldError(f"{self.checkpoint.path}: cannot read {name} ({err})") from None
        if tensor.is_floating_point() and not all_finite(tensor):
            _fail(f"{self.checkpoint.path}: {name} contains NaN or Inf values")
        return tensor

    def block(
        self,
        block: BlockSpec,
        like: BlockSpec | None = None,
        dtype: torch.dtype | None = torch.float64,
    ) -> dict[str, torch.Tensor]:
        """The block's tensors as ``dtype`` working copies (``None``: as stored).

        With ``like`` (the same block of another checkpoint of the same architecture, e.g. a
        ``BertForSequenceClassification`` whose names carry a ``bert.`` prefix), the tensors are
        keyed by ``like``'s names, matched by role (q, k, v, o, up, down, gate).
        """
        names = block.tensor_names()
        keys = like.tensor_names() if like is not None else names
        return {
            key: self.get(name) if dtype is None else self.get(name).to(dtype)
            for key, name in zip(keys, names, strict=True)
        }


WRITE_BEHIND_BYTES = 256 * 2**20


class WriteBehind:
    """Tensor writes run in order on one background thread, so that the next block is read
    and transformed while this one is written: ``pwrite`` and torch's kernels release the
    GIL, and the page-cache copy of a write costs as much CPU as a block's transform.  At most
    ``max_bytes`` of tensors wait (one larger tensor waits alone); :meth:`wait` blocks until
    all are written and re-raises the first error."""

    def __init__(self, max_bytes: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeshield-write")
        self._queued: deque[tuple[Future[None], int]] = deque()
        self._bytes, self._max = 0, max_bytes

    def submit(self, write: Callable[[str, torch.Tensor], None], name: str, tensor: torch.Tensor):
        nbytes = tensor.numel() * tensor.element_size()
        while self._queued and self._bytes + nbytes > self._max:
            self._pop(reraise=True)
        self._queued.append((self._pool.submit(write, name, tensor), nbytes))
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


def check_output_path(src: Path, out: Path, overwrite: bool) -> None:
    """Refuse an output that exists (without ``overwrite``), is the input, or lies inside it."""
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents:
        _fail(f"{out}: output must not be the input folder or lie inside it")
    if out_r in src_r.parents:
        _fail(f"{out}: output must not contain the input folder")
    if out.exists() and not overwrite:
        _fail(f"{out}: already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        _fail(f"{out}: exists and is not a folder")


@contextmanager
def atomic_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """:func:`mergeshield.folders.atomic_dir`, refusing to replace an existing ``out`` (one
    that appeared while writing) unless ``overwrite``."""
    with atomic_dir(out) as tmp:
        yield tmp
        if out.exists() and not overwrite:
            _fail(f"{out}: already exists; pass --overwrite to replace it")


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy everything but the weight shards (tokenizer, configs, README, sub-folders)."""
    shards = set(_shard_files(src))
    for item in src.iterdir():
        if item.name in shards:
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)


BlockFn = Callable[[int, BlockSpec, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def rewrite(
    checkpoint: Checkpoint,
    out: Path,
    transform_block: BlockFn,
    metadata: dict[str, str],
    overwrite: bool = False,
    on_block: Callable[[], None] | None = None,
    working_dtype: torch.dtype | None = torch.float64,
) -> None:
    """Write ``checkpoint`` to ``out`` with every block passed through ``transform_block``.

    ``transform_block(index, block, tensors)`` gets the block's tensors as ``working_dtype``
    copies (``None``: in their stored dtype) and returns the new tensors; they are cast back to
    the stored dtype here, once (a no-op for tensors already in it).  Each output shard is
    written tensor by tensor (:class:`ShardWriter`, on a background thread:
    :class:`WriteBehind`) and the input is read with ``pread`` (:class:`ShardFile`), so memory
    holds one block (working copies plus their cast) and at most ``WRITE_BEHIND_BYTES`` of
    finished tensors waiting to be written, never a whole shard; a block whose tensors
    straddle two shards is kept until its last tensor is written.
    """
    check_output_path(checkpoint.path, out, overwrite)
    block_of = {n: i for i, b in enumerate(checkpoint.spec.blocks) for n in b.tensor_names()}
    with (
        reader(checkpoint) as src,
        atomic_folder(out, overwrite) as tmp,
        WriteBehind(WRITE_BEHIND_BYTES) as writes,
    ):
        copy_side_files(checkpoint.path, tmp)
        pending: dict[str, torch.Tensor] = {}
        for shard, names in checkpoint.shards.items():
            with safe_open(str(checkpoint.path / shard), framework="pt") as f:
                shard_meta = {
                    k: v
                    for k, v in (f.metadata() or {}).items()
                    if not k.startswith("mergeshield_")
                }
            layout = {n: (checkpoint.dtypes[n], checkpoint.shapes[n]) for n in names}
            writer = ShardWriter(tmp / shard, layout, shard_meta | metadata)
            try:
                for name in writer.order:
                    if name not in block_of:
                        writes.submit(writer.write, name, src.get(name))
                        continue
                    if name not in pending:
                        index = block_of[name]
                        block = checkpoint.spec.blocks[index]
                        new = transform_block(index, block, src.block(block, dtype=working_dtype))
                        for key in list(new):
                            value = new.pop(key)
                            if not all_finite(value):
                                _fail(f"{key}: transform produced NaN or Inf (ill-conditioned?)")
                            pending[key] = value.to(checkpoint.dtypes[key]).contiguous()
                            del value
                        del new
                        if on_block is not None:
                            on_block()
                    writes.submit(writer.write, name, pending.pop(name))
                writes.wait()
            finally:
                writes.wait(reraise=False)  # nothing may write to a closed file
                writer.close()
            writer.check_complete()
