"""Refactoring guard: the bytes that ``protect`` writes for a fixed seed never change.

Every tiny family is saved with weights drawn from a seeded numpy generator (so the input
does not depend on how ``transformers`` initializes), protected with ``all`` (no base) and
with ``params`` (a base given), and the tensors of the output (names, dtypes, shapes, offsets
and data bytes; the ``mergeshield_version`` metadata aside) are hashed against the hashes
recorded in ``tests/data/protect_hashes.json``.  An intended change to the output is
recorded with ``MERGESHIELD_UPDATE_HASHES=1 pytest tests/test_output_hashes.py``, and says
so in its commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mergeshield import protect
from tests.tiny_models import DECODER_MODELS, ENCODER_MODELS, MODELS, build

HASHES = Path(__file__).parent / "data" / "protect_hashes.json"
UPDATE = os.environ.get("MERGESHIELD_UPDATE_HASHES") == "1"
NAMES = sorted(MODELS | ENCODER_MODELS | DECODER_MODELS)


def _seeded_checkpoint(name: str, folder: Path, seed: int) -> None:
    """Tiny ``name`` with every tensor redrawn from numpy's generator ``seed`` (scale 0.2)."""
    build(name, folder)
    rng = np.random.default_rng(seed)
    for file in sorted(folder.glob("*.safetensors")):
        tensors = load_file(file)
        redrawn = {
            n: np.asarray(0.2 * rng.standard_normal(t.shape), dtype=t.dtype)
            if t.dtype.kind == "f"
            else t
            for n, t in sorted(tensors.items())
        }
        save_file(redrawn, file, metadata={"format": "pt"})


def output_hash(folder: Path) -> str:
    """sha256 over every safetensors file's header (without ``mergeshield_version``) and data."""
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        raw = file.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        header.get("__metadata__", {}).pop("mergeshield_version", None)
        digest.update(file.name.encode())
        digest.update(json.dumps(header, sort_keys=True).encode())
        digest.update(raw[8 + n :])
    return digest.hexdigest()


@pytest.fixture(scope="module")
def recorded() -> dict[str, str]:
    hashes = json.loads(HASHES.read_text()) if HASHES.exists() else {}
    yield hashes
    if UPDATE:
        HASHES.parent.mkdir(exist_ok=True)
        HASHES.write_text(json.dumps(dict(sorted(hashes.items())), indent=1) + "\n")


@pytest.mark.parametrize("name", NAMES)
def test_protect_output_bytes_are_unchanged(name, tmp_path, recorded):
    original, base = tmp_path / "original", tmp_path / "base"
    _seeded_checkpoint(name, original, seed=0)
    _seeded_checkpoint(name, base, seed=1)
    protect(original, tmp_path / "all", "all", seed=0)
    protect(original, tmp_path / "params", "params", base=base, seed=0)
    got = {f"{name}/all": output_hash(tmp_path / "all")}
    got[f"{name}/params"] = output_hash(tmp_path / "params")
    if UPDATE:
        recorded.update(got)
        return
    assert got == {k: recorded.get(k) for k in got}, "protect's output bytes changed"
