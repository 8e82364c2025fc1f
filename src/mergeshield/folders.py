"""Checkpoint-folder helpers: read and write safetensors tensors, atomic folder writes.

Every output is written under an exclusive lock (:func:`exclusive`: ``.NAME.lock`` beside it,
an ``flock`` the kernel releases when its process dies, even by ``kill -9``) into a temporary
``.NAME.tmp-*`` beside it, renamed into place once complete.  Holding the lock, a run removes
the temporaries a killed run left on the same output, so none outlives the next run.
Working folders that are not outputs (an audit's merges) live in :func:`scratch` folders in the
system's temporary directory, swept the same way by the next run of any command.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from mergeshield.errors import MergeShieldError

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def parse_json(data: bytes | str, where: object) -> Any:
    """``data`` parsed as JSON; a one-line :class:`MergeShieldError` naming ``where`` when it is
    not valid JSON (bad bytes, bad syntax, nesting too deep for the parser)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MergeShieldError(f"{where}: not valid JSON ({message})") from None


def read_json(path: Path) -> Any:
    """The JSON file ``path``, parsed (:func:`parse_json`)."""
    return parse_json(Path(path).read_bytes(), path)


def index_weight_map(folder: Path) -> dict[str, str]:
    """The ``weight_map`` of ``folder``'s ``model.safetensors.index.json``: tensor name ->
    shard file name.  Every shard name is a plain ``*.safetensors`` file name (no folder, no
    ``..``, not absolute), so a shard always lies inside ``folder`` and an output shard inside
    the output."""
    index = Path(folder) / INDEX_FILE
    raw = read_json(index)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict):
        raise MergeShieldError(f"{index}: malformed index (no weight_map object)")
    for name, shard in weight_map.items():
        plain = isinstance(shard, str) and shard == Path(shard).name and shard not in ("", "..")
        if not plain or "\\" in shard or not shard.endswith(".safetensors"):
            raise MergeShieldError(
                f"{index}: tensor {name!r} names shard {shard!r}; shards must be plain "
                "*.safetensors file names inside the model folder"
            )
    return weight_map


def weight_files(folder: Path) -> dict[str, Path]:
    """Map each tensor name of a Hugging Face folder to the safetensors file holding it.

    Reads ``model.safetensors.index.json`` when present, else every ``*.safetensors`` file.
    """
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        return {name: folder / file for name, file in index_weight_map(folder).items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MergeShieldError(f"no *.safetensors weights in {folder}")
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open objects are not iterable)
                where[name] = file
    return where


def tensor_names(folder: Path) -> list[str]:
    """Names of all tensors stored in a checkpoint folder, sorted."""
    return sorted(weight_files(folder))


def load_tensors(folder: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Load the tensors ``names`` (default: all) of a checkpoint folder onto the CPU."""
    where = weight_files(folder)
    wanted = sorted(where) if names is None else names
    missing = [name for name in wanted if name not in where]
    if missing:
        raise MergeShieldError(f"{folder} lacks tensors {missing[:5]} ({len(missing)} in all)")
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(where[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for file, file_names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in file_names:
                out[name] = f.get_tensor(name)
    return {name: out[name] for name in wanted}


def save_tensors(tensors: dict[str, torch.Tensor], folder: Path) -> Path:
    """Write ``tensors`` as one ``model.safetensors`` (with the ``format: pt`` metadata)."""
    from safetensors.torch import save_file

    path = Path(folder) / SINGLE_FILE
    contiguous = {name: t.detach().contiguous() for name, t in tensors.items()}
    save_file(contiguous, str(path), metadata={"format": "pt"})
    return path


# Files that hold or point to weights: never copied beside weights that mergeshield writes
# (copied into a protected output, they would publish the original model).
WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".keras", ".msgpack", ".gguf",
    ".ggml", ".onnx", ".npz", ".npy", ".pkl", ".pickle", ".joblib", ".tflite", ".mlmodel",
    ".index.json", ".distcp",
)  # fmt: skip


def cast_checkpoint(src: Path, out: Path, dtype: torch.dtype) -> Path:
    """Copy the checkpoint ``src`` to ``out`` (atomically) with every floating tensor cast to
    ``dtype`` (round to nearest) and ``config.json``'s dtype set to it: the same
    model as a publisher would release it in, e.g., bf16.  The folder's other files
    (tokenizer, generation config) are copied, its weights written as one file; tensors that
    are not floating keep their dtype."""
    tensors = {
        name: t.to(dtype) if t.is_floating_point() else t for name, t in load_tensors(src).items()
    }
    config = read_config(src)
    for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]:
        config[key] = str(dtype).removeprefix("torch.")  # transformers 5 writes "dtype"
    with atomic_dir(Path(out)) as tmp:
        save_tensors(tensors, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for file in Path(src).iterdir():
            plain = file.is_file() and not file.name.startswith(".")
            weights = file.name.lower().endswith(WEIGHT_SUFFIXES)
            if plain and not weights and file.name != "config.json":
                shutil.copy2(file, tmp / file.name)
    return Path(out)


def read_config(folder: Path) -> dict:
    """The parsed ``config.json`` of a checkpoint folder."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise MergeShieldError(f"no config.json in {folder}")
    config = read_json(path)
    if not isinstance(config, dict):
        raise MergeShieldError(f"{path}: not a JSON object")
    return config


def output_path(out: Path) -> Path:
    """``out`` made absolute without following links (``.`` and ``..`` resolved), refused when
    it is a symbolic link (a dangling one included) or the file-system root."""
    out = Path(os.path.abspath(out))
    if out.is_symlink():
        raise MergeShieldError(f"{out}: is a symbolic link; give the folder it points to")
    if out == out.parent:
        raise MergeShieldError(f"{out}: cannot write over the file-system root")
    return out


def _remove(path: Path) -> None:
    """Delete a file, link or folder; gone already is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _clean_leftovers(path: Path) -> None:
    """Remove what killed runs left beside ``path`` (the caller holds its lock): ``.NAME.tmp-*``
    (unfinished) and ``.NAME.old-*`` (a replaced output; put back when ``path`` is missing,
    i.e. the run died between moving it aside and publishing its own)."""
    tmp_prefix, old_prefix = f".{path.name}.tmp-", f".{path.name}.old-"
    olds = []
    for item in path.parent.iterdir():
        if item.name.startswith(tmp_prefix):
            _remove(item)
        elif item.name.startswith(old_prefix):
            olds.append(item)
    for item in olds:
        if not path.exists() and not path.is_symlink():
            os.replace(item, path)
        else:
            _remove(item)


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold the lock ``.NAME.lock`` beside ``path`` (it holds the owner's pid) and clean up
    after killed runs on ``path``; refuse when another live process holds it.

    The lock is an ``flock``: released by the kernel when its process ends in any way.  The
    lock file is removed on exit; a run that finds it replaced while waiting retries.
    """
    lock = path.parent / f".{path.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise MergeShieldError(
                f"{path}: another mergeshield run (pid {owner}) is writing it; "
                "wait for it to finish"
            ) from None
        held = os.fstat(fd)
        try:
            now = os.stat(lock)
        except FileNotFoundError:
            now = None
        if now is not None and (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
            break
        os.close(fd)  # removed by its last owner after we opened it: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _clean_leftovers(path)
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


SCRATCH_PREFIX = "mergeshield-"
SCRATCH_OWNER = ".owner"  # an flock held by the process that uses the folder


def _sweep_scratch(parent: Path) -> None:
    """Remove the scratch folders in ``parent`` whose owner is dead: their ``.owner`` lock is
    free (the kernel released it when the process ended, ``kill -9`` included)."""
    for item in parent.glob(f"{SCRATCH_PREFIX}*"):
        owner = item / SCRATCH_OWNER
        try:
            fd = os.open(owner, os.O_RDONLY)
        except OSError:  # not one of ours, or not a folder, or being created right now
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # alive
        finally:
            os.close(fd)
        _remove(item)


@contextmanager
def scratch(job: str) -> Iterator[Path]:
    """Yield a fresh working folder ``mergeshield-JOB-*`` in the system's temporary directory,
    removed when the block ends in any way.  The folder holds an ``flock`` for its whole life,
    so the next call (of any process) removes the folders of processes that were killed."""
    parent = Path(tempfile.gettempdir())
    _sweep_scratch(parent)
    work = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{job}-", dir=parent))
    fd = os.open(work / SCRATCH_OWNER, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield work
    finally:
        _remove(work)
        os.close(fd)


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``out``; on success it replaces ``out``.

    Holds :func:`exclusive` on ``out`` throughout.  The temporary folder is deleted on any
    error (or interrupt), so ``out`` never holds a half-written checkpoint.  An existing
    ``out`` is replaced (moved aside, then deleted) only after the write succeeded; it is put
    back when the final rename fails.  ``out`` may not be a symbolic link.
    """
    out = output_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(out):
        tag = uuid.uuid4().hex[:8]
        tmp = out.parent / f".{out.name}.tmp-{tag}"
        tmp.mkdir()
        try:
            yield tmp
            old = out.parent / f".{out.name}.old-{tag}"
            try:
                if out.exists():
                    os.replace(out, old)
                os.replace(tmp, out)
            except BaseException:
                if old.exists() and not out.exists():  # put the previous output back
                    os.replace(old, out)
                raise
            _remove(old)
        finally:
            _remove(tmp)


@contextmanager
def atomic_file(path: Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block has written it, it is synced to
    disk (with permissions ``mode``, e.g. ``0o600`` for a key; default: what the umask
    gives a new file) and renamed onto ``path``.
    Deleted on any error, so ``path`` is either the old file or the complete new one."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# The files that hold a tokenizer's vocabulary (one of them is enough to load one).
VOCABULARY_FILES = (
    "tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
    "spiece.model", "sentencepiece.bpe.model",
)  # fmt: skip
# What a model folder needs besides weights and config to be used: tokenizer and image
# preprocessing.  Copied from the base or the release into every model mergeshield trains.
PREPROCESSING_FILES = VOCABULARY_FILES + (
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "preprocessor_config.json",
)  # fmt: skip


def copy_preprocessing_files(src: Path, dst: Path) -> None:
    """Copy the :data:`PREPROCESSING_FILES` that ``src`` has into ``dst``."""
    for name in PREPROCESSING_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
