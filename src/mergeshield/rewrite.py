"""The streaming rewrite of a checkpoint, one block at a time, into an atomic output.

:func:`rewrite` writes the output shard by shard with the same tensor-to-shard layout and
dtypes, transforming one block at a time, into a temporary folder that is renamed into place
only when everything was written; side files (tokenizer, configs) are copied, other weight
files never are.  torch is imported only by callers that ask for tensors.
"""

from __future__ import annotations

import functools
import gc
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from mergeshield.architectures import BlockSpec
from mergeshield.arrays import (
    CODE_OF,
    Array,
    Gathered,
    all_finite,
    stored,
)
from mergeshield.checkpoint import INDEX, Checkpoint, _fail, _shard_files, check_output_path
from mergeshield.folders import WEIGHT_SUFFIXES, atomic_dir
from mergeshield.shards import (
    GATHER_CHUNK_BYTES,
    WRITE_BEHIND_BYTES,
    WRITE_THREADS,
    ShardWriter,
    TensorReader,
    WriteBehind,
    file_order,
    reader,
)


@contextmanager
def atomic_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """:func:`mergeshield.folders.atomic_dir`, refusing to replace an existing ``out`` (one
    that appeared while writing) unless ``overwrite``."""
    with atomic_dir(out) as tmp:
        yield tmp
        if out.exists() and not overwrite:
            _fail(f"{out}: already exists; pass --overwrite to replace it")


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
    with (
        no_cyclic_gc(),
        reader(checkpoint) as src,
        atomic_folder(out, overwrite) as tmp,
        WriteBehind(WRITE_BEHIND_BYTES, WRITE_THREADS) as writes,
        BlockStream(src, transform_block, wide, arrays, on_block) as stream,
    ):
        left_out = copy_side_files(checkpoint.path, tmp)
        for shard in checkpoint.shards:
            layout = checkpoint.layout(shard)
            kept = {
                k: v
                for k, v in src.shard(shard).metadata.items()
                if not k.startswith("mergeshield_")
            }
            _write_shard(src, stream, writes, ShardWriter(tmp / shard, layout, kept | metadata))
            src.release(shard)  # its pages leave this process's RSS
        if before_publish is not None:
            before_publish()
    return left_out


Finished = dict[str, np.ndarray | Gathered]


class BlockStream:
    """The blocks of ``src``'s checkpoint transformed, cast back to their stored dtypes and
    checked, handed out tensor by tensor in the order the output shards ask for them; with
    ``BLOCK_WORKERS`` (numpy, stored dtype) the next blocks are computed ahead on a pool."""

    def __init__(
        self,
        src: TensorReader,
        transform_block: BlockFn,
        wide: bool,
        arrays: bool,
        on_block: Callable[[], None] | None,
    ) -> None:
        checkpoint = src.checkpoint
        self.src, self.transform_block, self.on_block = src, transform_block, on_block
        self.wide, self.arrays = wide, arrays
        self.blocks = checkpoint.spec.blocks
        self.block_of = {n: i for i, b in enumerate(self.blocks) for n in b.tensor_names()}
        # blocks in the order the output first needs them
        order = [
            self.block_of[n]
            for shard in checkpoint.shards
            for n in file_order(checkpoint.layout(shard))
            if n in self.block_of
        ]
        self.needed = list(dict.fromkeys(order))
        self.workers = BLOCK_WORKERS if arrays and not wide else 1
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="mergeshield-block")
        self.in_flight: dict[int, Future[Finished]] = {}
        self.pending: Finished = {}  # finished tensors not yet written (blocks across shards)

    def __enter__(self) -> BlockStream:
        return self

    def __exit__(self, *exc: object) -> None:
        for future in self.in_flight.values():
            future.cancel()
        self.pool.shutdown(wait=True)

    def holds(self, name: str) -> bool:
        """Whether ``name`` belongs to a block (else it is copied as it is)."""
        return name in self.block_of

    def block_for(self, name: str) -> BlockSpec:
        return self.blocks[self.block_of[name]]

    def pop(self, name: str) -> np.ndarray | Gathered:
        """The finished tensor ``name``, its block computed (or awaited) when first asked."""
        if name not in self.pending:
            self.pending |= self._take(self.block_of[name])
            if self.on_block is not None:
                self.on_block()
        return self.pending.pop(name)

    def _take(self, index: int) -> Finished:
        """Wait for block ``index``, with the next ``workers - 1`` blocks started."""
        position = self.needed.index(index)
        for ahead in self.needed[position : position + self.workers]:
            if ahead not in self.in_flight:
                self.in_flight[ahead] = self.pool.submit(self._finished, ahead)
        return self.in_flight.pop(index).result()

    @np.errstate(over="ignore", invalid="ignore")  # overflow is checked and named below
    def _finished(self, index: int) -> Finished:
        """Block ``index`` transformed and cast back to the stored dtypes, checked."""
        src, block, codes = self.src, self.blocks[index], self.src.checkpoint.codes
        # The outputs are checked for NaN and Inf, and the inputs only when an output fails
        # (every input tensor is an output too): half the checks.
        tensors = src.block(block, wide=self.wide, arrays=self.arrays, check=False)
        try:
            new = self.transform_block(index, block, tensors)
        except Exception:
            src.check_block(block)  # bad input, not a bug: say so
            raise
        del tensors
        done: Finished = {}
        for key in list(new):
            value = new.pop(key)
            if isinstance(value, Gathered):
                if CODE_OF.get(value.dtype) == codes[key]:
                    done[key] = value  # made, checked and written in chunks by the writer
                    continue
                value = value.materialize()
            if not all_finite(value):
                src.check_block(block)
                _fail(f"{key}: transform produced NaN or Inf (ill-conditioned?)")
            done[key] = stored(value, codes[key])
        return done


def _write_shard(
    src: TensorReader, stream: BlockStream, writes: WriteBehind, writer: ShardWriter
) -> None:
    """Write every tensor of ``writer``'s shard: block tensors from ``stream``, the others
    (embeddings, norms outside blocks) copied from the input, all through ``writes``."""

    def checked_copy(name: str) -> None:
        src.get_array(name)  # refuses NaN and Inf
        writer.copy(name, src.file(name))

    try:
        for name in writer.order:
            if not stream.holds(name):
                # checked for NaN and Inf through the map, then copied, by a writer thread
                # while the first blocks are transformed (an 8B model's embeddings: 0.5 s of
                # page faults)
                writes.submit(functools.partial(checked_copy, name), 0)
                continue
            array = stream.pop(name)
            if isinstance(array, Gathered):
                bad_input = functools.partial(src.check_block, stream.block_for(name))
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
