"""``protect`` and ``unprotect``: rewrite a checkpoint with a defense's exact transforms.

Randomness: without a seed, the entropy comes from the OS (``secrets``) and is never stored;
block ``i`` draws from ``numpy.random.default_rng([entropy, i])``, so a seed reproduces the
protection exactly, which also means that **a seed is a key**.  The key file
(``--key-out``) holds the sampled transforms, enough to undo them; it is refused inside the
published folder.

A key is written (atomically, mode 0600) before its output is published, and is bound to it:
a random ``key_id`` is stored in the key and in the output's safetensors metadata
(``mergeshield_key_id``; the key itself never is), and a content hash in the key, so
``unprotect`` refuses a key of another run or model, or an edited one, with one error line.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import zlib
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from mergeshield.architectures.spec import BlockSpec, ModelSpec
from mergeshield.arrays import LOW_PRECISION_CODES
from mergeshield.checkpoint import (
    Checkpoint,
    check_output_path,
    check_same_architecture,
    open_checkpoint,
)
from mergeshield.defenses import BlockContext, DefenseOptions, get_defense
from mergeshield.errors import MergeShieldError
from mergeshield.folders import atomic_file, exclusive, output_path
from mergeshield.progress import progress_bar
from mergeshield.rewrite import rewrite
from mergeshield.shards import reader
from mergeshield.symmetries.transform import (
    BlockTransform,
    Float64View,
    apply_transform,
)
from mergeshield.version import __version__

KEY_FORMAT = "mergeshield-key/2"  # /1 (before key ids and content hashes) is refused
KEY_ID = "mergeshield_key_id"  # the published metadata field binding an output to its key


@dataclass
class ProtectResult:
    output: Path
    defense: str
    n_blocks: int
    key: Path | None
    left_out: list[Path]  # weight files of the input not published (copy_side_files)


def _check_key_path(key_out: Path, folders: list[Path], overwrite: bool) -> None:
    """The key goes to a new file (or, with ``overwrite``, replaces one) outside every
    input and output folder in ``folders``, in an existing folder."""
    key_r = key_out.resolve()
    for folder in folders:
        if folder.resolve() == key_r or folder.resolve() in key_r.parents:
            raise MergeShieldError(
                f"{key_out}: the key must not be written inside {folder}; it is a secret"
            )
    if key_out.exists() and not key_out.is_file():
        raise MergeShieldError(f"{key_out}: exists and is not a file")
    if key_out.exists() and not overwrite:
        raise MergeShieldError(f"{key_out}: already exists; pass --overwrite to replace it")
    if not key_out.parent.is_dir():
        raise MergeShieldError(f"{key_out}: folder {key_out.parent} does not exist")


def check_seed(seed: int | None) -> None:
    """A seed is a non-negative integer (numpy's seed sequences refuse others)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise MergeShieldError(f"--seed must be a non-negative integer, got {seed!r}")


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
    check_seed(seed)
    options = options or DefenseOptions()
    src, out = open_checkpoint(model), Path(out)
    inputs = [Path(base)] if base is not None else []
    check_output_path(src.path, out, overwrite, inputs)
    if options.low_precision is None:
        options = replace(options, low_precision=is_low_precision(src))
    base_ckpt = None
    if base is not None and spec_defense.uses_base:
        base_ckpt = open_checkpoint(base)
        check_same_architecture(src, base_ckpt)
    if key_out is not None:
        key_out = output_path(Path(key_out))
        _check_key_path(key_out, [src.path, out, *inputs], overwrite)
    entropy = seed if seed is not None else secrets.randbits(128)
    transforms: dict[int, BlockTransform] = {}
    key_id = secrets.token_hex(16)  # random: tells nothing about the key or the seed

    with ExitStack() as stack:
        if key_out is not None:
            stack.enter_context(exclusive(key_out))
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
                stack_rng=stack_generator(entropy, block),
            )
            t = spec_defense.sample(ctx)
            del ctx
            apply_transform(tensors, block, t, stream_mlp=True)  # in the stored dtype
            if key_out is not None:
                transforms[index] = t
            return tensors

        metadata = {"mergeshield_version": __version__, "mergeshield_defense": defense}
        if key_out is not None:
            metadata[KEY_ID] = key_id

        # The key is published before the output; an existing key (--overwrite) is moved
        # aside meanwhile and put back if the output is not published (error, Ctrl-C,
        # SIGTERM).  Only SIGKILL between the two renames leaves the new key beside the old
        # output, and unprotect refuses that pair (key ids differ).
        old_key = key_out.parent / f".{key_out.name}.old-{key_id[:8]}" if key_out else None
        key_started = []

        def write_key() -> None:
            key_started.append(True)
            if key_out.exists():
                os.replace(key_out, old_key)
            save_key(key_out, transforms, defense, src, key_id)

        try:
            left_out = rewrite(
                src,
                out,
                transform_block,
                metadata,
                overwrite,
                on_block=bar,
                wide=False,
                arrays=True,
                also=inputs,
                before_publish=write_key if key_out is not None else None,
            )
        except BaseException:
            if key_started and not _holds_key_id(out, key_id):  # output not published
                key_out.unlink(missing_ok=True)
                if old_key.exists():
                    os.replace(old_key, key_out)
            raise
        if old_key is not None:
            old_key.unlink(missing_ok=True)
    return ProtectResult(
        output=out, defense=defense, n_blocks=len(src.spec.blocks), key=key_out, left_out=left_out
    )


def stack_generator(entropy: int, block: BlockSpec) -> np.random.Generator | None:
    """The generator of a block whose heads every layer of its stack permutes alike
    (:attr:`AttentionSpec.shared_heads`), seeded by the stack's name, so each block of the
    stack draws the same permutation; None for any other block."""
    stack = block.attention.shared_heads
    if stack is None:
        return None
    return np.random.default_rng([entropy, zlib.crc32(stack.encode()), 1])


def _holds_key_id(folder: Path, key_id: str) -> bool:
    """Whether ``folder`` is the output published with key ``key_id`` (an interrupt may come
    just after the output was renamed into place)."""
    try:
        with safe_open(str(min(folder.glob("*.safetensors"))), framework="numpy") as f:
            return (f.metadata() or {}).get(KEY_ID) == key_id
    except Exception:  # no folder, no shard, unreadable: not that output
        return False


def _key_tensors(transforms: dict[int, BlockTransform]) -> dict[str, np.ndarray]:
    return {
        f"block.{i}.{name}": np.ascontiguousarray(array)
        for i, t in transforms.items()
        for name, array in t.arrays().items()
    }


def _content_hash(arrays: dict[str, np.ndarray]) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_key(
    path: Path,
    transforms: dict[int, BlockTransform],
    defense: str,
    src: Checkpoint,
    key_id: str,
) -> None:
    """Write the sampled transforms (a secret) to a safetensors file of mode 0600, atomically
    and durably (synced before it is renamed into place), with ``key_id`` and a content hash."""
    tensors = _key_tensors(transforms)
    metadata = {
        "format": KEY_FORMAT,
        "defense": defense,
        "model_type": src.spec.model_type,
        "n_blocks": str(len(src.spec.blocks)),
        "key_id": key_id,
        "content_sha256": _content_hash(tensors),
        "mergeshield_version": __version__,
    }
    with atomic_file(path, mode=0o600) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


_FIELDS = tuple(f.name for f in fields(BlockTransform))  # every transform parameter


def load_key(path: str | os.PathLike) -> tuple[dict[str, str], dict[int, BlockTransform]]:
    """The key file's metadata and transforms by block index; a one-line error when it is not
    a current mergeshield key or its contents do not match its content hash (edited)."""
    path = Path(path)
    if not path.is_file():
        raise MergeShieldError(f"{path}: no such key file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            arrays = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MergeShieldError(f"{path}: not a mergeshield key file ({message})") from None
    if meta.get("format") != KEY_FORMAT:
        raise MergeShieldError(
            f"{path}: not a current mergeshield key file (format {meta.get('format')!r}, "
            f"expected {KEY_FORMAT!r}; keys of mergeshield 0.x before key binding need that "
            "version to unprotect)"
        )
    if meta.get("content_sha256") != _content_hash(arrays):
        raise MergeShieldError(f"{path}: key file is damaged or edited (content hash differs)")
    transforms: dict[int, BlockTransform] = {}
    for name, array in arrays.items():
        parts = name.split(".")
        if (
            len(parts) != 3
            or parts[0] != "block"
            or not parts[1].isdigit()
            or (parts[2] not in _FIELDS)
        ):
            raise MergeShieldError(f"{path}: unexpected tensor {name!r} in the key file")
        setattr(transforms.setdefault(int(parts[1]), BlockTransform()), parts[2], array)
    return meta, transforms


def check_key(
    path: Path,
    meta: dict[str, str],
    transforms: dict[int, BlockTransform],
    spec: ModelSpec,
    key_ids: set[str | None] | None = None,
) -> None:
    """The key belongs to this protected checkpoint (``key_ids``: the ``mergeshield_key_id``
    of its shards; None when checking it against the unprotected original) and fits its
    blocks: shapes, permutations that are permutations, finite and invertible matrices,
    finite non-zero scales.  One error line otherwise."""
    if meta.get("model_type") != spec.model_type or meta.get("n_blocks") != str(len(spec.blocks)):
        raise MergeShieldError(
            f"{path}: key is for a {meta.get('n_blocks')}-block {meta.get('model_type')} model, "
            f"not this {len(spec.blocks)}-block {spec.model_type} model"
        )
    if key_ids is not None and key_ids != {meta.get("key_id")}:
        raise MergeShieldError(
            f"{path}: key belongs to another protected checkpoint (its key id is not this "
            "one's): use the key written together with this output"
        )
    for index, t in transforms.items():
        if index >= len(spec.blocks):
            raise MergeShieldError(f"{path}: key has block {index}, the model {len(spec.blocks)}")
        block = spec.blocks[index]
        att, mlp = block.attention, block.mlp
        d = att.head_dim
        units = mlp.n_units if mlp is not None else 0
        extra = [m.n_units for m in block.extra_mlps]
        expected = {
            "kv_perm": (att.n_kv_heads,),
            "q_perm": (att.n_heads,),
            "qk": (att.n_kv_heads, d, d),
            "vo": (att.n_kv_heads, d, d),
            "unit_perm": (units,),
            "unit_scale": (units,),
            "norm_perm": (d,),
            "norm_scale": (d,),
            "extra_unit_perm": (sum(extra),),
            "extra_unit_scale": (sum(extra),),
        }
        for field, array in t.arrays().items():
            where = f"{path}: block {index} {field}"
            if array.shape != expected[field]:
                raise MergeShieldError(f"{where} has shape {array.shape}, not {expected[field]}")
            if field.endswith("perm"):
                # the extra MLPs' permutations are concatenated, one per MLP
                pieces = (
                    np.split(array, np.cumsum(extra)[:-1]) if field.startswith("extra") else [array]
                )
                if array.dtype.kind not in "iu" or not all(
                    np.array_equal(np.sort(piece), np.arange(len(piece))) for piece in pieces
                ):
                    raise MergeShieldError(f"{where} is not a permutation")
                continue
            if array.dtype.kind != "f" or not np.isfinite(array).all():
                raise MergeShieldError(f"{where} is not finite floating point")
            if field.endswith("scale") and not array.all():
                raise MergeShieldError(f"{where} has zero scales")
            if (
                field in ("qk", "vo")
                and len(array)
                and not (np.linalg.cond(array) < 1 / np.finfo(np.float64).eps).all()
            ):
                raise MergeShieldError(f"{where} holds singular matrices")
    _check_stack_heads(path, transforms, spec)


def _check_stack_heads(path: Path, transforms: dict[int, BlockTransform], spec: ModelSpec) -> None:
    """Every block of a stack that shares its head order (T5) permutes its heads alike."""
    seen: dict[str, tuple[int, list[int]]] = {}
    for index, block in enumerate(spec.blocks):
        att = block.attention
        if att.shared_heads is None:
            continue
        t = transforms.get(index, BlockTransform())
        heads = list(t.q_perm) if t.q_perm is not None else list(range(att.n_heads))
        first, expected = seen.setdefault(att.shared_heads, (index, heads))
        if heads != expected:
            raise MergeShieldError(
                f"{path}: block {index} permutes its heads unlike block {first} of the same "
                "stack (their layers share one position bias): not a key of this model"
            )


def load_key_for(key: str | os.PathLike, src: Checkpoint) -> dict[int, BlockTransform]:
    """The transforms of ``key``, refused unless they fit a model like ``src`` (:func:`check_key`
    without the key id: ``src`` may be the unprotected original, as in ``detect``)."""
    meta, transforms = load_key(key)
    check_key(Path(key), meta, transforms, src.spec)
    return transforms


def unprotect(
    protected: str | os.PathLike,
    key: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Undo a protection with its key file: writes the original weights (to float precision).

    The key must be the one written with ``protected`` (:func:`check_key`); ``out`` must not
    replace or contain the protected folder or the key."""
    src, out, key = open_checkpoint(protected), Path(out), Path(key)
    check_output_path(src.path, out, overwrite, [key])
    meta, transforms = load_key(key)
    with reader(src) as r:
        key_ids = {r.shard(shard).metadata.get(KEY_ID) for shard in src.shards}
    check_key(key, meta, transforms, src.spec, key_ids)

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
            src,
            out,
            transform_block,
            metadata,
            overwrite,
            on_block=bar,
            wide=False,
            arrays=True,
            also=[key],
        )
    return out
