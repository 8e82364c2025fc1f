"""Checkpoint-folder helpers: read and write safetensors tensors, atomic folder writes."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from mergeshield.errors import MergeShieldError

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def weight_files(folder: Path) -> dict[str, Path]:
    """Map each tensor name of a Hugging Face folder to the safetensors file holding it.

    Reads ``model.safetensors.index.json`` when present, else every ``*.safetensors`` file.
    """
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
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


def read_config(folder: Path) -> dict:
    """The parsed ``config.json`` of a checkpoint folder."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise MergeShieldError(f"no config.json in {folder}")
    return json.loads(path.read_text())


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``out``; on success it replaces ``out``.

    The temporary folder is deleted on error, so ``out`` never holds a half-written checkpoint.
    An existing ``out`` is replaced (moved aside, then deleted) only after the write succeeded.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{tag}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
