"""Tiny random models of every supported family, built in-process (no downloads).

``build(name, folder)`` saves a checkpoint folder and returns ``(model, inputs)`` where
``inputs`` are keyword arguments for the model's forward pass.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers as tf

VOCAB = 97
# Weights of trained-model scale: at the usual init (0.02) attention is nearly uniform and the
# blocks barely change the residual stream, which would hide broken merges.
INIT = 0.2


def _text_inputs(batch: int = 2, length: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding in the second sequence
    return {"input_ids": ids, "attention_mask": mask}


def _pixels(size: int = 16, channels: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"pixel_values": torch.randn(2, channels, size, size, generator=g)}


def _llama_like(config_cls, model_cls, **kw) -> Callable[[], tuple[Any, dict]]:
    def make() -> tuple[Any, dict]:
        defaults = dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=64,
            rope_theta=10000.0,
            initializer_range=INIT,
        )
        cfg = config_cls(**(defaults | kw))
        return model_cls(cfg), _text_inputs()

    return make


def _encoder(config_cls, model_cls, **kw) -> Callable[[], tuple[Any, dict]]:
    def make() -> tuple[Any, dict]:
        defaults = dict(
            vocab_size=VOCAB,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=60,
            max_position_embeddings=64,
            initializer_range=INIT,
        )
        return model_cls(config_cls(**(defaults | kw))), _text_inputs()

    return make


def _vit() -> tuple[Any, dict]:
    cfg = tf.ViTConfig(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=60,
        image_size=16,
        patch_size=4,
        num_labels=5,
        initializer_range=INIT,
    )
    return tf.ViTForImageClassification(cfg), _pixels()


def _clip() -> tuple[Any, dict]:
    text = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        max_position_embeddings=16,
        projection_dim=16,
    )
    vision = dict(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=6,
        intermediate_size=56,
        image_size=16,
        patch_size=4,
        projection_dim=16,
    )
    cfg = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    inputs = _text_inputs() | _pixels()
    return tf.CLIPModel(cfg), inputs


def _gpt2() -> tuple[Any, dict]:
    cfg = tf.GPT2Config(
        vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64, initializer_range=INIT
    )
    return tf.GPT2LMHeadModel(cfg), _text_inputs()


MODELS: dict[str, Callable[[], tuple[Any, dict]]] = {
    "bert": _encoder(tf.BertConfig, tf.BertModel),
    "bert-seqcls": _encoder(tf.BertConfig, tf.BertForSequenceClassification, num_labels=3),
    "roberta-seqcls": _encoder(
        tf.RobertaConfig,
        tf.RobertaForSequenceClassification,
        num_labels=4,
        pad_token_id=1,
        max_position_embeddings=70,
    ),
    "vit": _vit,
    "clip": _clip,
    "gpt2": _gpt2,
    # GQA ratio 1 (MHA), untied embeddings, head_dim 8
    "llama-mha": _llama_like(
        tf.LlamaConfig, tf.LlamaForCausalLM, num_key_value_heads=8, tie_word_embeddings=False
    ),
    # GQA ratio 2, tied embeddings, head_dim 16
    "llama-gqa2": _llama_like(
        tf.LlamaConfig,
        tf.LlamaForCausalLM,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    # GQA ratio 4, explicit head_dim 64 (larger than hidden / heads)
    "mistral-gqa4": _llama_like(
        tf.MistralConfig,
        tf.MistralForCausalLM,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=64,
        sliding_window=None,
    ),
    # q/k/v biases
    "qwen2": _llama_like(
        tf.Qwen2Config,
        tf.Qwen2ForCausalLM,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}


# --- encoder / seq2seq families (issue 16) ------------------------------------------------
# Not in MODELS (whose every entry tests/test_protect.py runs through every test); their own
# tests are tests/test_families_encoder.py.


def _t5(model_cls, **kw) -> Callable[[], tuple[Any, dict]]:
    def make() -> tuple[Any, dict]:
        defaults = dict(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=40,
            num_layers=2,
            num_heads=4,
            # T5's own init: without the 1/sqrt(d) scaling its attention is far from uniform
            # already (logits of std ~1); larger scales, see tests/test_families_encoder.py
            initializer_factor=1.0,
        )
        inputs = _text_inputs()
        if model_cls is not tf.T5EncoderModel:
            g = torch.Generator().manual_seed(3)
            inputs["decoder_input_ids"] = torch.randint(0, VOCAB, (2, 5), generator=g)
        return model_cls(tf.T5Config(**(defaults | kw))), inputs

    return make


# --- decoder families of issue 16 (tests/test_families_decoder.py) ------------------------


def _decoder(config_cls, model_cls, **kw) -> Callable[[], tuple[Any, dict]]:
    """A Llama-like tiny decoder whose norm weights are random too: trained per-head q/k norms
    have unequal weights within a rotary pair, which pins the QK basis
    (:mod:`mergeshield.symmetries.qk_norm`); all-ones weights would hide that."""
    llama_like = _llama_like(config_cls, model_cls, **kw)

    def make() -> tuple[Any, dict]:
        model, inputs = llama_like()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0.0, 0.3).add_(0.0 if "gemma" in model.config.model_type else 1.0)
        return model, inputs

    return make


def _distilbert(model_cls, **kw) -> Callable[[], tuple[Any, dict]]:
    def make() -> tuple[Any, dict]:
        defaults = dict(
            vocab_size=VOCAB,
            dim=48,
            n_layers=2,
            n_heads=6,
            hidden_dim=60,
            max_position_embeddings=64,
            initializer_range=INIT,
        )
        return model_cls(tf.DistilBertConfig(**(defaults | kw))), _text_inputs()

    return make


def _clip_tower(model_cls, **kw) -> Callable[[], tuple[Any, dict]]:
    """A CLIP text or vision tower saved alone (``model_cls`` picks which).  At CLIP's default
    init a tiny tower's attention is nearly uniform, which would hide QK-only defenses
    (MergeBarrier); twice that init is not."""
    kw = {"initializer_factor": 2.0} | kw

    def make() -> tuple[Any, dict]:
        if "Text" in model_cls.__name__:
            cfg = tf.CLIPTextConfig(
                **dict(
                    vocab_size=VOCAB,
                    hidden_size=32,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    intermediate_size=40,
                    max_position_embeddings=16,
                    projection_dim=16,
                    bos_token_id=0,
                    eos_token_id=2,
                    pad_token_id=1,
                )
                | kw
            )
            return model_cls(cfg), _text_inputs()
        cfg = tf.CLIPVisionConfig(
            **dict(
                hidden_size=48,
                num_hidden_layers=2,
                num_attention_heads=6,
                intermediate_size=56,
                image_size=16,
                patch_size=4,
                projection_dim=16,
            )
            | kw
        )
        return model_cls(cfg), _pixels()

    return make


ENCODER_MODELS: dict[str, Callable[[], tuple[Any, dict]]] = {
    # head_dim 12
    "xlm-roberta-seqcls": _encoder(
        tf.XLMRobertaConfig,
        tf.XLMRobertaForSequenceClassification,
        num_labels=3,
        pad_token_id=1,
        max_position_embeddings=70,
    ),
    # head_dim 8, classification head
    "distilbert-seqcls": _distilbert(tf.DistilBertForSequenceClassification, num_labels=3),
    # head_dim 16, bare model
    "distilbert": _distilbert(tf.DistilBertModel, n_heads=3),
    # v1.0: ReLU MLP, lm_head tied to the embeddings, output scaled by d_model^-0.5
    "t5-v1.0": _t5(tf.T5ForConditionalGeneration),
    # v1.1: gated-GELU MLP, no output scaling; head_dim 16, 3 heads (inner 48 != d_model),
    # more decoder than encoder layers
    "t5-v1.1": _t5(
        tf.T5ForConditionalGeneration,
        d_kv=16,
        num_heads=3,
        num_decoder_layers=3,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    ),
    # the encoder alone (diffusion models' text encoder): no decoder weights
    "t5-encoder": _t5(tf.T5EncoderModel, feed_forward_proj="gated-gelu"),
    # transformers 5 saves these without the text_model./vision_model. prefix
    "clip-text": _clip_tower(tf.CLIPTextModel),
    "clip-vision": _clip_tower(tf.CLIPVisionModel),
    # ... and these with it; head_dim 16
    "clip-text-proj": _clip_tower(tf.CLIPTextModelWithProjection, num_attention_heads=2),
    "clip-vision-proj": _clip_tower(tf.CLIPVisionModelWithProjection, num_attention_heads=3),
}


_SLIDING = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=24)
DECODER_MODELS: dict[str, Callable[[], tuple[Any, dict]]] = {
    # GQA ratio 2, head_dim 16, untied
    "qwen3-gqa2": _decoder(
        tf.Qwen3Config,
        tf.Qwen3ForCausalLM,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
    ),
    # MHA, head_dim 8, tied
    "qwen3-mha": _decoder(
        tf.Qwen3Config,
        tf.Qwen3ForCausalLM,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=8,
        tie_word_embeddings=True,
    ),
    # GQA ratio 4, head_dim 32 (larger than hidden / heads)
    "qwen3-gqa4": _decoder(
        tf.Qwen3Config,
        tf.Qwen3ForCausalLM,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
    ),
    # sandwich norms, soft-capping, GELU-tanh, a sliding-window layer
    "gemma2": _decoder(
        tf.Gemma2Config,
        tf.Gemma2ForCausalLM,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        **_SLIDING,
    ),
    # q_norm/k_norm with the (1 + w) weights, GQA ratio 4, head_dim 32
    "gemma3": _decoder(
        tf.Gemma3TextConfig,
        tf.Gemma3ForCausalLM,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        **_SLIDING,
    ),
    # Gemma 3's real head_dim 256 (> VO_BLOCK): block-diagonal V/O maps, GQA ratio 2
    "gemma3-d256": _decoder(
        tf.Gemma3TextConfig,
        tf.Gemma3ForCausalLM,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        **_SLIDING,
    ),
    # fused qkv_proj with unequal q | k | v rows (GQA ratio 2), fused gate_up_proj
    "phi3-gqa2": _decoder(
        tf.Phi3Config,
        tf.Phi3ForCausalLM,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "phi3-mha": _decoder(
        tf.Phi3Config,
        tf.Phi3ForCausalLM,
        num_attention_heads=8,
        num_key_value_heads=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # partial rotary (Phi-4-mini's layout): 10 of 16 head dimensions rotated, 6 free
    "phi3-partial": _decoder(
        tf.Phi3Config,
        tf.Phi3ForCausalLM,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        partial_rotary_factor=0.625,
    ),
    "mixtral": _decoder(
        tf.MixtralConfig,
        tf.MixtralForCausalLM,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=3,
        num_experts_per_tok=2,
        intermediate_size=24,
    ),
    # q/k/v biases, a shared expert with its gate, layer 1 dense (mlp_only_layers)
    "qwen2_moe": _decoder(
        tf.Qwen2MoeConfig,
        tf.Qwen2MoeForCausalLM,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=3,
        shared_expert_intermediate_size=40,
        mlp_only_layers=[1],
        **_MOE,
    ),
    "qwen3_moe": _decoder(
        tf.Qwen3MoeConfig,
        tf.Qwen3MoeForCausalLM,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=3,
        **_MOE,
    ),
}


def build(name: str, folder: Path, seed: int = 0) -> tuple[Any, dict[str, torch.Tensor]]:
    """Build tiny model ``name`` with random weights, save it to ``folder``, return it."""
    torch.manual_seed(seed)
    model, inputs = (MODELS | ENCODER_MODELS | DECODER_MODELS)[name]()
    _randomize_biases(model)
    model.eval()
    model.save_pretrained(folder)
    return model, inputs


def _randomize_biases(model: torch.nn.Module) -> None:
    """Random init leaves biases at zero, which would hide bias-transform bugs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)


def outputs(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensor compared before and after protection: logits, embeddings or hidden states."""
    with torch.no_grad():
        out = model(**inputs)
    for key in ("logits", "logits_per_image", "last_hidden_state", "text_embeds", "image_embeds"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise AssertionError(f"no output to compare in {type(out)}")


def build_sharded(name: str, folder: Path, shard_size: str = "40KB") -> Path:
    """Build tiny model ``name`` saved as several shards with an index (a block's tensors may
    straddle two shards); returns ``folder``."""
    torch.manual_seed(0)
    model, _ = MODELS[name]()
    _randomize_biases(model)
    model.save_pretrained(folder, max_shard_size=shard_size)
    return folder


# --- a tiny causal-LM family: prompt/answer data, exact match of the greedy answer -----------

LM_WORDS = [f"w{i}" for i in range(40)]
LM_TASKS = {"opp": lambda k: (7 * k + 3) % 40, "next": lambda k: (k + 1) % 40}


def lm_rows(task: str, ks: range) -> list[dict[str, str]]:
    """``"opp w5 is"`` -> ``" w38"``: each task maps the word to another word its own way."""
    return [{"prompt": f"{task} w{k} is", "answer": f" w{LM_TASKS[task](k)}"} for k in ks]


def greedy_exact_match(folder: Path, rows: list[dict[str, str]], tok, dtype=None) -> float:
    """Share of rows whose greedy continuation, decoded token by token, is the answer then
    eos: computed here without mergeshield's teacher-forced scoring (in ``dtype``, default
    the checkpoint's)."""
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = tf.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    hits = 0
    for row in rows:
        got = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        start = len(got)
        want = tok(row["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            for _ in want:
                got.append(int(model(torch.tensor([got])).logits[0, -1].argmax()))
        hits += got[start:] == want
    return hits / len(rows)


def build_lm_family(root: Path) -> Path:
    """A tiny Llama base with a word-level tokenizer, two fine-tunes trained 25 full-batch
    Adam steps on all 40 prompts of their own task (val: words 0-19, test: 20-39; train, all
    40: ``opp-train.jsonl``, named by no audit file here), the data as JSONL, CSV and a
    datasets folder, and the audit file."""
    import csv

    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers

    from mergeshield.evaluation.generative import GenSplit, encode

    build("llama-gqa2", root / "base", seed=0)
    vocab = {t: i for i, t in enumerate(["</s>", "<unk>", "opp", "next", "is", *LM_WORDS])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    tok.save_pretrained(root / "base")
    for task in LM_TASKS:
        rows = lm_rows(task, range(40))
        data = encode(GenSplit([r["prompt"] for r in rows], [r["answer"] for r in rows]), tok, 16)
        torch.manual_seed(1)
        model = tf.AutoModelForCausalLM.from_pretrained(root / "base").train()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(25):
            opt.zero_grad()
            model(**data).loss.backward()
            opt.step()
        model.save_pretrained(root / task)
    (root / "opp-train.jsonl").write_text("\n".join(map(json.dumps, lm_rows("opp", range(40)))))
    (root / "opp-val.jsonl").write_text("\n".join(map(json.dumps, lm_rows("opp", range(20)))))
    with (root / "opp-test.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["prompt", "answer"])
        writer.writeheader()
        writer.writerows(lm_rows("opp", range(20, 40)))
    Dataset.from_list(lm_rows("next", range(20))).save_to_disk(str(root / "next-val"))
    (root / "next-test.jsonl").write_text(
        "\n".join(map(json.dumps, lm_rows("next", range(20, 40))))
    )
    (root / "audit.yml").write_text(
        "base: base\nmetric: exact_match\n"
        "victim: {model: opp, val: opp-val.jsonl, test: opp-test.csv}\n"
        "free_riders:\n  - {model: next, val: next-val, test: next-test.jsonl}\n"
        "defenses: [params]\nattacks: []\nmethods: [task_arithmetic]\n"
        "grid: [0.5, 1.0]\nprotocol: false\nmax_length: 16\n"
    )
    return root
