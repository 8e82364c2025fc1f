"""``protect`` and ``unprotect``: rewrite a checkpoint with a defense's exact transforms.

Randomness: without a seed, the entropy comes from the OS (``secrets``) and is never stored;
block ``i`` draws from ``numpy.random.default_rng([entropy, i])``, so a seed reproduces the
protection exactly, which also means that **a seed is a key**.  The key file
(``--key-out``) holds the sampled transforms, enough to undo them; it is refused inside the
published folder.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from mergeshield import __version__
from mergeshield.architectures.spec import BlockSpec
from mergeshield.arrays import LOW_PRECISION_CODES
from mergeshield.checkpoint import (
    Checkpoint,
    check_output_path,
    check_same_architecture,
    open_checkpoint,
    reader,
    rewrite,
)
from mergeshield.defenses import BlockContext, DefenseOptions, get_defense
from mergeshield.errors import MergeShieldError
from mergeshield.progress import progress_bar
from mergeshield.symmetries.transform import (
    BlockTransform,
    Float64View,
    apply_transform,
)

KEY_FORMAT = "mergeshield-key/1"


@dataclass
class ProtectResult:
    output: Path
    defense: str
    n_blocks: int
    key: Path | None


def _check_key_path(key_out: Path, outputs: list[Path], overwrite: bool) -> None:
    key_r = key_out.resolve()
    for folder in outputs:
        if folder.resolve() in key_r.parents:
            raise MergeShieldError(
                f"{key_out}: the key must not be written inside {folder}; it is a secret"
            )
    if key_out.exists() and not overwrite:
        raise MergeShieldError(f"{key_out}: already exists; pass --overwrite to replace it")
    if not key_out.parent.is_dir():
        raise MergeShieldError(f"{key_out}: folder {key_out.parent} does not exist")


def is_low_precision(checkpoint: Checkpoint) -> bool:
    """Whether any transformed tensor is stored in bf16 or fp16 (eps 4e-3 / 5e-4)."""
    names = (n for b in checkpoint.spec.blocks for n in b.tensor_names())
    return any(checkpoint.codes[n] in LOW_PRECISION_CODES for n in names)


def single_threaded_numpy_blas() -> AbstractContextManager:
    """numpy/scipy's OpenBLAS on one thread (torch's own threads are untouched).

    The defenses factor many small ``head_dim x head_dim`` matrices (SVDs of 64 x 64 to
    128 x 128); on 2 cores a threaded OpenBLAS SVD of that size takes 3-50 ms against 0.45 ms
    single-threaded (thread start-up and spin-waiting, far worse when the cores are busy).
    The per-head products of a rewrite are small too, and the write-behind thread needs the
    other core: a second BLAS thread spin-waits on it (measured: 8% of all CPU time).
    A no-op without ``threadpoolctl``.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(1, user_api="blas")


def protect(
    model: str | os.PathLike,
    out: str | os.PathLike,
    defense: str = "all",
    *,
    base: str | os.PathLike | None = None,
    seed: int | None = None,
    key_out: str | os.PathLike | None = None,
    options: DefenseOptions | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> ProtectResult:
    """Write a protected copy of the checkpoint folder ``model`` to ``out``.

    The protected model computes the same function as ``model`` (up to float rounding) while
    its weights are moved far from the original, so merging it with models that share its base
    fails.  ``base`` (the public pretrained model) lets PaRaMS choose the MLP permutation
    farthest from it.  Returns where everything was written.
    """
    spec_defense = get_defense(defense)
    options = options or DefenseOptions()
    src, out = open_checkpoint(model), Path(out)
    check_output_path(src.path, out, overwrite)
    if options.low_precision is None:
        options = replace(options, low_precision=is_low_precision(src))
    base_ckpt = None
    if base is not None and spec_defense.uses_base:
        base_ckpt = open_checkpoint(base)
        check_same_architecture(src, base_ckpt)
    if key_out is not None:
        key_out = Path(key_out)
        _check_key_path(key_out, [src.path, out], overwrite)
    entropy = seed if seed is not None else secrets.randbits(128)
    transforms: dict[int, BlockTransform] = {}

    with ExitStack() as stack:
        stack.enter_context(single_threaded_numpy_blas())
        base_reader = stack.enter_context(reader(base_ckpt)) if base_ckpt else None
        bar = stack.enter_context(
            progress_bar(f"protect ({defense})", len(src.spec.blocks), progress)
        )

        def transform_block(index: int, block: BlockSpec, tensors: dict[str, np.ndarray]):
            ctx = BlockContext(
                block=block,
                weights=Float64View(tensors),  # widened on first use
                base=base_reader.block(base_ckpt.spec.blocks[index], like=block, arrays=True)
                if base_reader
                else None,
                rng=np.random.default_rng([entropy, index]),
                options=options,
            )
            t = spec_defense.sample(ctx)
            del ctx
            apply_transform(tensors, block, t, stream_mlp=True)  # in the stored dtype
            if key_out is not None:
                transforms[index] = t
            return tensors

        metadata = {"mergeshield_version": __version__, "mergeshield_defense": defense}
        rewrite(
            src, out, transform_block, metadata, overwrite, on_block=bar, wide=False, arrays=True
        )
    if key_out is not None:
        save_key(key_out, transforms, defense, src)
    return ProtectResult(output=out, defense=defense, n_blocks=len(src.spec.blocks), key=key_out)


def save_key(
    path: Path, transforms: dict[int, BlockTransform], defense: str, src: Checkpoint
) -> None:
    """Write the sampled transforms (a secret) to a safetensors file, atomically."""
    tensors = {
        f"block.{i}.{name}": np.ascontiguousarray(array)
        for i, t in transforms.items()
        for name, array in t.arrays().items()
    }
    metadata = {
        "format": KEY_FORMAT,
        "defense": defense,
        "model_type": src.spec.model_type,
        "n_blocks": str(len(src.spec.blocks)),
        "mergeshield_version": __version__,
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_key(path: str | os.PathLike) -> tuple[dict[str, str], dict[int, BlockTransform]]:
    path = Path(path)
    if not path.is_file():
        raise MergeShieldError(f"{path}: no such key file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            arrays = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:
        raise MergeShieldError(f"{path}: not a mergeshield key file ({err})") from None
    if meta.get("format") != KEY_FORMAT:
        raise MergeShieldError(
            f"{path}: not a mergeshield key file (format {meta.get('format')!r})"
        )
    transforms: dict[int, BlockTransform] = {}
    for name, array in arrays.items():
        _, index, field = name.split(".", 2)
        setattr(transforms.setdefault(int(index), BlockTransform()), field, array)
    return meta, transforms


def load_key_for(key: str | os.PathLike, src: Checkpoint) -> dict[int, BlockTransform]:
    """The transforms of ``key``, refused unless the key was made for a model like ``src``."""
    meta, transforms = load_key(key)
    if meta.get("model_type") != src.spec.model_type or int(meta["n_blocks"]) != len(
        src.spec.blocks
    ):
        raise MergeShieldError(
            f"{key}: key is for a {meta.get('n_blocks')}-block {meta.get('model_type')} model, "
            f"not this {len(src.spec.blocks)}-block {src.spec.model_type} model"
        )
    return transforms


def unprotect(
    protected: str | os.PathLike,
    key: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Undo a protection with its key file: writes the original weights (to float precision)."""
    src, out = open_checkpoint(protected), Path(out)
    transforms = load_key_for(key, src)

    with (
        single_threaded_numpy_blas(),
        progress_bar("unprotect", len(src.spec.blocks), progress) as bar,
    ):

        def transform_block(index: int, block: BlockSpec, tensors: dict[str, np.ndarray]):
            t = transforms.get(index, BlockTransform())
            apply_transform(tensors, block, t, inverse=True, stream_mlp=True)
            return tensors

        metadata = {"mergeshield_version": __version__, "mergeshield_restored": "true"}
        rewrite(
            src, out, transform_block, metadata, overwrite, on_block=bar, wide=False, arrays=True
        )
    return out
