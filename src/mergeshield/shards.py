"""Safetensors shards, streamed: memory-mapped reading, chunked writing behind the work.

:class:`ShardFile` maps one input file, :class:`TensorReader` reads a checkpoint's tensors and
blocks through those maps, :class:`ShardWriter` writes one output file tensor by tensor in the
input's layout, and :class:`WriteBehind` runs the writes on background threads with a bound on
the bytes waiting.  Tensors travel as numpy arrays (:mod:`mergeshield.arrays`).
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from mergeshield.architectures import BlockSpec
from mergeshield.arrays import (
    CODE_OF,
    DTYPES,
    Array,
    Gathered,
    all_finite,
    code_of,
    float64,
    to_numpy,
    to_torch,
)
from mergeshield.checkpoint import Checkpoint, _fail
from mergeshield.errors import MergeShieldError


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
