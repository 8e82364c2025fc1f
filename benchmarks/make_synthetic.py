"""Write a synthetic Llama-shaped checkpoint with random bf16 weights (for timing only).

The folder has the standard sharded layout of the Hugging Face hub:
``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json`` + ``config.json``
(a ``LlamaConfig``), tensors in ``LlamaForCausalLM`` order, shards cut at ``--shard-gb``.
Weights are ``N(0, 0.02^2)`` (norms 1): the values do not matter for timing, only the shapes.

Shapes:

- ``1b``: Llama-3.2-1B (hidden 2048, 16 layers, 32 heads / 8 key-value heads, head_dim 64,
  FFN 8192, vocab 128256, tied embeddings): 1.236 B parameters, 2.47 GB in bf16;
- ``8b-slice``: Llama-3.1-8B layer shapes (hidden 4096, 32/8 heads, head_dim 128, FFN 14336,
  vocab 128256, untied) with ``--layers`` layers (default 4): 0.218 B per layer;
- ``qwen3-8b-slice``: Qwen3-8B (``qwen3``: hidden 4096, 32/8 heads, head_dim 128, FFN 12288,
  vocab 151936, untied, per-head ``q_norm``/``k_norm``): 0.193 B per layer;
- ``gemma3-12b-slice``: Gemma-3-12B's text model (``gemma3_text``: hidden 3840, 16/8 heads,
  head_dim 256, FFN 15360, vocab 262208, tied, sandwich and q/k norms): 0.227 B per layer.

Llama's norm weights are ones; the other shapes' are ``N(1, 0.05^2)`` (Gemma's, stored as
``w`` in ``1 + w``, ``N(0, 0.05^2)``): all-equal q/k norm weights would be a special case.

    python benchmarks/make_synthetic.py 1b /work/bench/llama-1b
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    "8b-slice": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=4,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
    "qwen3-8b-slice": dict(
        model_type="qwen3",
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=4,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=False,
    ),
    "gemma3-12b-slice": dict(
        model_type="gemma3_text",
        hidden_size=3840,
        intermediate_size=15360,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        vocab_size=262208,
        tie_word_embeddings=True,
    ),
}
# extra per-layer 1-D tensors (after the attention and MLP norms of Llama) by model type
LAYER_NORMS = {
    "qwen3": ["self_attn.q_norm", "self_attn.k_norm"],
    "gemma3_text": [
        "self_attn.q_norm",
        "self_attn.k_norm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ],
}


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every ``...ForCausalLM`` tensor (Llama's, plus the norms of
    ``LAYER_NORMS``), in the order HF saves them (the file is sorted by name anyway)."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for norm in LAYER_NORMS.get(cfg.get("model_type", "llama"), []):
            out.append((p + norm + ".weight", (d if "_norm" in norm.split(".")[-1] else h,)))
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (f, h)),
            (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, h)))
    return out


def write_checkpoint(
    out: Path, shape: str, layers: int | None = None, shard_gb: float = 1.0, seed: int = 0
) -> Path:
    """Write the checkpoint atomically (temporary folder renamed to ``out``); returns ``out``."""
    from transformers import AutoConfig

    cfg = dict(SHAPES[shape])
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    fields = {k: v for k, v in cfg.items() if k != "model_type"}
    model_type = cfg.get("model_type", "llama")
    config = AutoConfig.for_model(
        model_type, **fields, max_position_embeddings=131072, rms_norm_eps=1e-5
    )
    causal = {"llama": "Llama", "qwen3": "Qwen3", "gemma3_text": "Gemma3"}[model_type]
    config.architectures = [f"{causal}ForCausalLM"]
    config.dtype = torch.bfloat16
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    g = torch.Generator().manual_seed(seed)
    limit = int(shard_gb * 1e9)
    shards: list[list[str]] = [[]]
    sizes = [0]
    names = tensor_shapes(cfg)
    for name, shp in names:  # plan the shards first (numbering needs the total)
        nbytes = 2 * int(torch.tensor(shp).prod())
        if sizes[-1] and sizes[-1] + nbytes > limit:
            shards.append([])
            sizes.append(0)
        shards[-1].append(name)
        sizes[-1] += nbytes
    shape_of = dict(names)
    weight_map = {}
    try:
        for k, group in enumerate(shards, start=1):
            file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name in group:
                if name.endswith("norm.weight") and model_type == "llama":
                    tensors[name] = torch.ones(shape_of[name], dtype=torch.bfloat16)
                elif name.endswith("norm.weight"):
                    t = torch.empty(shape_of[name], dtype=torch.bfloat16)
                    offset = 0.0 if model_type == "gemma3_text" else 1.0
                    tensors[name] = t.normal_(offset, 0.05, generator=g)
                else:
                    t = torch.empty(shape_of[name], dtype=torch.bfloat16)
                    tensors[name] = t.normal_(0.0, 0.02, generator=g)
                weight_map[name] = file
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            del tensors
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.chmod(0o755)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path, help="output folder (replaced if present)")
    parser.add_argument("--layers", type=int, help="number of layers (default: the shape's)")
    parser.add_argument("--shard-gb", type=float, default=1.0, help="max shard size (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_checkpoint(args.out, args.shape, args.layers, args.shard_gb, args.seed)
    files = sorted(args.out.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    print(f"{args.out}: {len(files)} shards, {total / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
