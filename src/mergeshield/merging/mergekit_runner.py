"""Run one mergekit 0.1.5 merge through its Python API, offline, on CPU, quietly.

Everything that depends on mergekit's internals lives here:

* :func:`mergekit_workarounds` is the ONE place where known mergekit 0.1.5 bugs are patched
  (in memory only, for the duration of a merge; site-packages is never edited).
* :func:`run_mergekit` validates a config dict, runs ``mergekit.merge.run_merge`` into a
  temporary folder with fast options, checks the output, and renames it into place.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import json
import logging
import random
import textwrap
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergeshield.checkpoint import check_output_path
from mergeshield.errors import MergeShieldError
from mergeshield.folders import atomic_dir, read_config, tensor_names

LOG = logging.getLogger(__name__)

# mergekit/plan.py MergePlanner.plan_tensor, 0.1.5: ``WeightInfo.aliases`` is a tuple, so this
# list + tuple raises "TypeError: can only concatenate list (not "tuple") to list" for every
# architecture whose JSON definition has an *optional* weight with aliases (BERT:
# ``embeddings.position_ids``), i.e. every BERT/MiniLM merge fails before any tensor is read.
ALIASES_BUG = "[w_in.name] + (w_in.aliases or [])"
ALIASES_FIX = "[w_in.name, *(w_in.aliases or ())]"
_PATCHED_ATTR = "__mergeshield_workaround__"


def aliases_bug_present() -> bool:
    """True when the installed mergekit still has the BERT ``aliases`` bug in ``plan_tensor``."""
    from mergekit.plan import MergePlanner

    return ALIASES_BUG in inspect.getsource(MergePlanner.plan_tensor)


@functools.cache
def _fixed_plan_tensor() -> Any:
    """``MergePlanner.plan_tensor`` recompiled from its own source with :data:`ALIASES_FIX`.

    Compiled in ``mergekit.plan``'s namespace, with its file name and line numbers, so
    tracebacks still point into mergekit.  Returns None when the bug is absent (nothing to fix).
    """
    import mergekit.plan as plan

    original = plan.MergePlanner.plan_tensor
    if getattr(original, _PATCHED_ATTR, False):
        return original
    source = inspect.getsource(original)
    if ALIASES_BUG not in source:
        return None
    first_line = inspect.getsourcelines(original)[1]
    fixed = "\n" * (first_line - 1) + textwrap.dedent(source).replace(ALIASES_BUG, ALIASES_FIX)
    namespace: dict[str, Any] = {}
    exec(compile(fixed, plan.__file__, "exec"), plan.__dict__, namespace)
    function = namespace["plan_tensor"]
    setattr(function, _PATCHED_ATTR, True)
    return function


def _on_disk_names(original: Callable[..., tuple]) -> Callable[..., tuple]:
    """Wrap ``mergekit.architecture.auto.get_transformers_info`` (see :data:`WORKAROUNDS`).

    Keeps its answer, except that the tensor names of the in-memory transformers model are
    dropped (so mergekit plans with the checkpoint's own names) when they do not cover the
    names stored on disk.
    """
    if getattr(original, _PATCHED_ATTR, False):
        return original
    from mergekit.architecture.auto import get_model_tensor_names

    def get_transformers_info(model: Any, options: Any) -> tuple:
        ignore_on_save, tied_keys, vocabulary_axes, names = original(model, options)
        on_disk = set(get_model_tensor_names(model, options))
        if names is not None and not on_disk <= set(names):
            names = None
        return ignore_on_save, tied_keys, vocabulary_axes, names

    setattr(get_transformers_info, _PATCHED_ATTR, True)
    return get_transformers_info


def _della_without_size1_dim(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap ``mergekit.sparsify.della_magprune`` (see :data:`WORKAROUNDS`).

    DELLA ranks |δ| along dim 1.  Where dim 1 has size 1 (ViT's ``cls_token``, shape
    ``[1, 1, d]``) every rank is both min and max, the normalised rank is 0/0 = NaN and
    ``torch.bernoulli`` raises.  Only in that case the size-1 dims at position 1 are squeezed
    out first (``[1, 1, d]`` is ranked like the vector ``[1, d]``), then the shape restored.
    """
    if getattr(original, _PATCHED_ATTR, False):
        return original

    def della_magprune(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        squeezed = tensor
        while squeezed.dim() >= 2 and squeezed.shape[1] == 1:
            squeezed = squeezed.squeeze(1)
        return original(squeezed, *args, **kwargs).reshape(tensor.shape)

    setattr(della_magprune, _PATCHED_ATTR, True)
    return della_magprune


def _clear_mergekit_caches() -> None:
    """Forget mergekit's process-wide caches of model files and inferred architectures."""
    from mergekit.architecture.auto import infer_architecture_info
    from mergekit.io.tasks import LoaderCache

    cache = LoaderCache()
    cache.flush_all()
    cache.loaders.clear()
    infer_architecture_info.cache_clear()


WORKAROUNDS = ("bert_aliases", "auto_arch_names", "della_size1_dim", "stale_caches")


@contextlib.contextmanager
def mergekit_workarounds(disable: Collection[str] = ()) -> Iterator[None]:
    """Work around the known mergekit 0.1.5 bugs for the duration of the block, then restore.

    All four are fixed in memory only (site-packages is never edited), idempotently, and each
    can be turned off by name in ``disable`` (the tests do, to show that each is still needed):

    * ``bert_aliases``: ``MergePlanner.plan_tensor`` does list + tuple (:data:`ALIASES_BUG`),
      so every BERT/MiniLM merge raises ``TypeError: can only concatenate list (not "tuple")
      to list``.  The method is swapped for a copy of its own source whose only change is
      :data:`ALIASES_FIX`; a no-op once mergekit fixes the line (:func:`aliases_bug_present`).
    * ``auto_arch_names``: for architectures without a JSON definition (``ViTModel``),
      mergekit plans with the tensor names of the *in-memory* transformers 5 model
      (``layers.0.attention.q_proj``), which differ from the checkpoint's
      (``encoder.layer.0.attention.attention.query``) because transformers 5.23 keys ViT's
      conversion mapping by class name while mergekit looks it up by ``model_type``.  Every
      layer tensor is then "optional and missing" and silently left out of the output.
      ``get_transformers_info`` is wrapped to fall back to the on-disk names in that case.
    * ``della_size1_dim``: DELLA's rank normalisation divides 0 by 0 on tensors whose dim 1
      has size 1 (ViT's ``cls_token``) and the merge dies in ``torch.bernoulli``; such tensors
      are ranked with that dim squeezed out (:func:`_della_without_size1_dim`).
    * ``stale_caches``: mergekit keeps a process-wide ``LoaderCache`` of open checkpoint files
      and an ``lru_cache`` of inferred architectures, keyed by path; a folder rewritten between
      two merges (a re-extracted backbone) is then read from the old, deleted file.  Both
      caches are cleared on entry and on exit.
    """
    import mergekit.architecture.auto as auto
    import mergekit.sparsify as sparsify
    from mergekit.plan import MergePlanner

    unknown = set(disable) - set(WORKAROUNDS)
    if unknown:
        raise MergeShieldError(f"unknown workarounds {sorted(unknown)}; known: {WORKAROUNDS}")
    original_plan_tensor = MergePlanner.__dict__["plan_tensor"]
    original_info = auto.get_transformers_info
    original_della = sparsify.della_magprune
    if "bert_aliases" not in disable:
        fixed = _fixed_plan_tensor()
        if fixed is not None:
            MergePlanner.plan_tensor = fixed
    if "auto_arch_names" not in disable:
        auto.get_transformers_info = _on_disk_names(original_info)
    if "della_size1_dim" not in disable:
        sparsify.della_magprune = _della_without_size1_dim(original_della)
    if "stale_caches" not in disable:
        _clear_mergekit_caches()
    try:
        yield
    finally:
        MergePlanner.plan_tensor = original_plan_tensor
        auto.get_transformers_info = original_info
        sparsify.della_magprune = original_della
        if "stale_caches" not in disable:
            _clear_mergekit_caches()


@contextlib.contextmanager
def _quiet_and_seeded(seed: int) -> Iterator[io.StringIO]:
    """Capture stdout/stderr and mergekit's and transformers' logs; keep the caller's RNGs.

    ``MergeOptions(random_seed=...)`` calls ``transformers.set_seed``, which reseeds the global
    ``random``/NumPy/torch generators of the whole process; the caller's states come back here.
    """
    from transformers.utils import logging as hf_logging

    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    mk_logger = logging.getLogger("mergekit")
    old_level, old_propagate = mk_logger.level, mk_logger.propagate
    mk_logger.addHandler(handler)
    mk_logger.setLevel(logging.INFO)
    mk_logger.propagate = False
    hf_verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with (
            torch.random.fork_rng(devices=[]),
            contextlib.redirect_stdout(buffer),
            contextlib.redirect_stderr(buffer),
        ):
            torch.manual_seed(seed)
            yield buffer
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        hf_logging.set_verbosity(hf_verbosity)
        mk_logger.removeHandler(handler)
        mk_logger.setLevel(old_level)
        mk_logger.propagate = old_propagate


def _has_tokenizer_files(folder: Path) -> bool:
    """True when mergekit can copy the tokenizer as plain files (its fast path)."""
    return (folder / "tokenizer_config.json").is_file() and (
        (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()
    )


def _fix_tied_head(out: Path, donor_names: set[str]) -> None:
    """Pitfall: the merge has its own ``lm_head.weight`` but a config that says "tied".

    mergekit copies ``config.json`` from the base (or first) model.  When that model ties its
    output embedding (no ``lm_head.weight`` stored) and an input model does not, mergekit
    still writes the merged ``lm_head.weight`` (tied inputs contribute their embedding), so
    the output says ``tie_word_embeddings: true`` next to a separate head.  transformers 5.23
    keeps the head with a warning, other loaders (or a later ``tie_weights()``) replace it by
    the embedding.  The head is what the merge computed, so the config is made untied.
    """
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    new_names = set(tensor_names(out)) - donor_names
    if config.get("tie_word_embeddings") and any(n.endswith("lm_head.weight") for n in new_names):
        LOG.info("merged %s has its own lm_head.weight: setting tie_word_embeddings=false", out)
        config["tie_word_embeddings"] = False
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def run_mergekit(
    config: dict[str, Any],
    out: Path,
    *,
    seed: int = 0,
    workarounds_off: Collection[str] = (),
) -> Path:
    """Run mergekit on a config dict (mergekit YAML schema) into ``out``; return ``out``.

    Model paths should be absolute: mergekit's model card asks the Hugging Face hub about
    relative ones (the card is not written here anyway).  Options: CPU, ``random_seed=seed``
    (DARE/DELLA are reproducible; the caller's RNG states are kept), no model card, one output
    shard, the tokenizer copied only when it is plain files.  The output must hold every tensor
    of the donor model (the base, else the first model): mergekit silently skips tensors it
    believes optional.  ``out`` must not be, contain or lie inside an input model.
    ``workarounds_off`` names workarounds to skip (tests only).
    """
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    out = Path(out)
    merge_config = MergeConfiguration.model_validate(config)
    donor = Path(config.get("base_model") or config["models"][0]["model"])
    inputs = [m["model"] for m in config["models"] if isinstance(m.get("model"), str)]
    check_output_path(donor, out, True, inputs)  # out is replaced, but never an input
    options = MergeOptions(
        device="cpu",
        random_seed=seed,
        copy_tokenizer=_has_tokenizer_files(donor),
        write_model_card=False,
        out_shard_size=1 << 62,
        quiet=True,
    )
    with atomic_dir(out) as tmp:
        with _quiet_and_seeded(seed) as log, mergekit_workarounds(workarounds_off):
            try:
                run_merge(merge_config, str(tmp), options=options)
            except Exception as err:
                err.add_note("mergekit output (tail):\n" + log.getvalue()[-3000:])
                raise
        donor_names = set(tensor_names(donor))
        missing = sorted(donor_names - set(tensor_names(tmp)))
        if missing:
            raise MergeShieldError(
                f"mergekit dropped {len(missing)} tensors of {donor}: {missing[:5]}"
            )
        _fix_tied_head(tmp, donor_names)
        if read_config(tmp).get("architectures") != read_config(donor).get("architectures"):
            raise MergeShieldError(f"merged config of {out} has another architecture than {donor}")
    return out
