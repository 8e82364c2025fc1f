"""How far the QK maps alone disrupt a merge when per-head q/k norms pin the QK basis.

Per-head RMSNorms before RoPE (Qwen3, Gemma 3) leave only signs, pair swaps and norm-weight
scales for Q and K (``mergeshield.symmetries.qk_norm``), where a Llama of the same shapes takes
any ``c_j R(phi_j)`` per rotary pair.  For tiny random "fine-tunes" (a random base plus a step of
0.1 standard deviations per tensor, as in ``tests/test_families_decoder.py``), each defense's
protected Q/K projections and q/k norms are put into the fine-tune (every other tensor original),
averaged 50/50 with the base, and the logits' change is printed in units of their spread, next
to the unprotected average's.  Numbers quoted in README.md and ``mergeshield defenses``.

    PYTHONPATH=src:. python benchmarks/qk_norm_merge.py --seeds 3

``--tensors`` picks other protected tensors by name (``all``: the whole protected model, the
merge a free-rider makes; ``v_proj o_proj``: the V/O maps alone), ``--defenses`` the defenses,
``--models`` any tiny model of ``tests/tiny_models.py`` (T5 included):

    PYTHONPATH=src:. python benchmarks/qk_norm_merge.py --models t5-v1.0 t5-v1.1 t5-encoder \
        --defenses all --tensors all
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
import transformers as tf

from mergeshield.folders import load_tensors
from mergeshield.protect import protect
from tests.test_families_decoder import FINE_TUNE_STEP, averaged, change
from tests.tiny_models import DECODER_MODELS, _decoder, build, outputs

QK_TENSORS = ("q_proj", "k_proj", "q_norm", "k_norm")
# Qwen3's tiny shapes without the norms: what the QK maps reach when the basis is free
DECODER_MODELS["llama-as-qwen3-gqa2"] = _decoder(
    tf.LlamaConfig,
    tf.LlamaForCausalLM,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=False,
)


def measure(
    name: str, seed: int, root: Path, defenses: list[str], tensors: tuple[str, ...]
) -> dict[str, float]:
    base, inputs = build(name, root / f"{name}-base", seed=1 + 10 * seed)
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(FINE_TUNE_STEP * p.std() * torch.randn(p.shape, generator=g))
    tuned.save_pretrained(root / name)
    tuned.eval()
    reference = outputs(tuned, inputs)
    orig, base_t = load_tensors(root / name), load_tensors(root / f"{name}-base")
    row = {"unprotected": change(outputs(averaged(tuned, base_t, orig), inputs), reference)}
    for defense in defenses:
        out = root / f"{name}-{defense}"
        protect(root / name, out, defense, seed=seed, overwrite=True)
        prot = load_tensors(out)
        every = tensors == ("all",)
        qk = {k: prot[k] if every or any(s in k for s in tensors) else v for k, v in orig.items()}
        row[defense] = change(outputs(averaged(tuned, base_t, qk), inputs), reference)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--models", nargs="+", default=["qwen3-gqa2", "llama-as-qwen3-gqa2", "gemma3"]
    )
    parser.add_argument("--defenses", nargs="+", default=["mergelock", "mergebarrier", "params"])
    parser.add_argument("--tensors", nargs="+", default=list(QK_TENSORS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for seed in range(args.seeds):
                row = measure(name, seed, Path(tmp), args.defenses, tuple(args.tensors))
                print(name, seed, " ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
