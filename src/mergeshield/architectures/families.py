"""One adapter per model family: where its heads and MLP units are stored.

A family is a :class:`Layout` (tensor-name templates, relative to one layer) plus a function
that reads the dimensions of each tower from the config.  Everything else (tensor names,
shapes, prefixes such as ``bert.`` or ``model.``) is derived from these two pieces, so adding
a family is a few declarative lines and no transform ever branches on the model type.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from mergeshield.architectures.spec import AttentionSpec, BlockSpec, MLPSpec, ModelSpec, Slot
from mergeshield.errors import MergeShieldError


@dataclass(frozen=True)
class Layout:
    """Tensor-name stems of one layer; ``{i}`` is the layer index.

    ``q``/``k``/``v``/``o``/``up``/``down``/``gate`` are linear-layer stems (``.weight`` and
    ``.bias`` are appended).  ``fused_qkv``: q, k and v are the three chunks of the ``q`` stem's
    output dimension.  ``conv1d``: weights are stored ``[in, out]``.
    """

    layer: str
    q: str
    k: str
    v: str
    o: str
    up: str
    down: str
    gate: str | None = None
    fused_qkv: bool = False
    conv1d: bool = False


@dataclass(frozen=True)
class Tower:
    """Dimensions of one stack of identical layers (CLIP has two: text and vision)."""

    prefix: str  # e.g. "text_model." inside a CLIPModel checkpoint, "" otherwise
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_units: int
    activation: str
    rope: bool = False


@dataclass(frozen=True)
class Family:
    name: str
    layouts: tuple[Layout, ...]  # alternatives; the one found in the checkpoint is used
    towers: Callable[[Any], list[Tower]]


def _encoder_tower(cfg: Any, prefix: str = "") -> Tower:
    heads = cfg.num_attention_heads
    return Tower(
        prefix=prefix,
        n_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=cfg.hidden_size // heads,
        n_units=cfg.intermediate_size,
        activation=str(cfg.hidden_act),
    )


def _llama_tower(cfg: Any) -> Tower:
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return Tower(
        prefix="",
        n_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        n_heads=heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        n_units=cfg.intermediate_size,
        activation=str(cfg.hidden_act),
        rope=True,
    )


def _gpt2_tower(cfg: Any) -> Tower:
    return Tower(
        prefix="",
        n_layers=cfg.n_layer,
        hidden_size=cfg.n_embd,
        n_heads=cfg.n_head,
        n_kv_heads=cfg.n_head,
        head_dim=cfg.n_embd // cfg.n_head,
        n_units=cfg.n_inner or 4 * cfg.n_embd,
        activation=str(cfg.activation_function),
    )


def _clip_towers(cfg: Any) -> list[Tower]:
    return [
        _encoder_tower(cfg.text_config, "text_model."),
        _encoder_tower(cfg.vision_config, "vision_model."),
    ]


BERT = Layout(
    layer="encoder.layer.{i}.",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    o="attention.output.dense",
    up="intermediate.dense",
    down="output.dense",
)
VIT = Layout(
    layer="encoder.layer.{i}.",
    q="attention.attention.query",
    k="attention.attention.key",
    v="attention.attention.value",
    o="attention.output.dense",
    up="intermediate.dense",
    down="output.dense",
)
VIT_V5 = Layout(  # the in-memory names of transformers 5 (written by some converters)
    layer="layers.{i}.",
    q="attention.q_proj",
    k="attention.k_proj",
    v="attention.v_proj",
    o="attention.o_proj",
    up="mlp.fc1",
    down="mlp.fc2",
)
CLIP = Layout(
    layer="encoder.layers.{i}.",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.out_proj",
    up="mlp.fc1",
    down="mlp.fc2",
)
GPT2 = Layout(
    layer="h.{i}.",
    q="attn.c_attn",
    k="attn.c_attn",
    v="attn.c_attn",
    o="attn.c_proj",
    up="mlp.c_fc",
    down="mlp.c_proj",
    fused_qkv=True,
    conv1d=True,
)
LLAMA = Layout(
    layer="layers.{i}.",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    up="mlp.up_proj",
    down="mlp.down_proj",
    gate="mlp.gate_proj",
)

FAMILIES: dict[str, Family] = {
    "bert": Family("bert", (BERT,), lambda c: [_encoder_tower(c)]),
    "roberta": Family("roberta", (BERT,), lambda c: [_encoder_tower(c)]),
    "vit": Family("vit", (VIT, VIT_V5), lambda c: [_encoder_tower(c)]),
    "clip": Family("clip", (CLIP,), _clip_towers),
    "clip_text_model": Family("clip", (CLIP,), lambda c: [_encoder_tower(c, "text_model.")]),
    "clip_vision_model": Family("clip", (CLIP,), lambda c: [_encoder_tower(c, "vision_model.")]),
    "gpt2": Family("gpt2", (GPT2,), lambda c: [_gpt2_tower(c)]),
    "llama": Family("llama", (LLAMA,), lambda c: [_llama_tower(c)]),
    "mistral": Family("llama", (LLAMA,), lambda c: [_llama_tower(c)]),
    "qwen2": Family("llama", (LLAMA,), lambda c: [_llama_tower(c)]),
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(FAMILIES))


def _find_prefix(keys: set[str], tower_prefix: str, layout: Layout) -> str | None:
    """The prefix (``""``, ``"bert."``, ``"model."``...) before the tower's first layer."""
    probe = tower_prefix + layout.layer.format(i=0) + layout.q + ".weight"
    hits = sorted((k[: -len(probe)] for k in keys if k.endswith(probe)), key=len)
    return hits[0] if hits else None


def _slot(keys: set[str], stem: str, layout: Layout, chunk: tuple[int, int] | None) -> Slot:
    bias = stem + ".bias"
    return Slot(
        weight=stem + ".weight",
        bias=bias if bias in keys else None,
        transposed=layout.conv1d,
        chunk=chunk,
    )


def _blocks(keys: set[str], tower: Tower, layout: Layout, prefix: str) -> Iterable[BlockSpec]:
    for i in range(tower.n_layers):
        base = prefix + tower.prefix + layout.layer.format(i=i)

        def slot(stem: str, chunk: tuple[int, int] | None = None, base: str = base) -> Slot:
            return _slot(keys, base + stem, layout, chunk)

        fused = layout.fused_qkv
        attention = AttentionSpec(
            q=slot(layout.q, (0, 3) if fused else None),
            k=slot(layout.k, (1, 3) if fused else None),
            v=slot(layout.v, (2, 3) if fused else None),
            o=slot(layout.o),
            n_heads=tower.n_heads,
            n_kv_heads=tower.n_kv_heads,
            head_dim=tower.head_dim,
            rope=tower.rope,
        )
        mlp = MLPSpec(
            up=slot(layout.up),
            down=slot(layout.down),
            gate=slot(layout.gate) if layout.gate else None,
            n_units=tower.n_units,
            activation=tower.activation,
        )
        name = f"{tower.prefix.rstrip('.') or 'layer'} {i}".replace("_model", "")
        yield BlockSpec(name=name, hidden_size=tower.hidden_size, attention=attention, mlp=mlp)


def describe(config: Any, keys: Iterable[str]) -> ModelSpec:
    """Build the :class:`ModelSpec` of a checkpoint from its config and tensor names."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise MergeShieldError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    keys = set(keys)
    blocks: list[BlockSpec] = []
    for tower in family.towers(config):
        _check_tower(tower, model_type)
        for layout in family.layouts:
            prefix = _find_prefix(keys, tower.prefix, layout)
            if prefix is not None:
                break
        else:
            raise MergeShieldError(
                f"no {tower.prefix or ''}layer-0 attention weights of a {model_type} model "
                "found in the checkpoint; is config.json from a different model?"
            )
        blocks.extend(_blocks(keys, tower, layout, prefix))
    in_blocks = {name for block in blocks for name in block.tensor_names()}
    missing = sorted(in_blocks - keys)
    if missing:
        raise MergeShieldError(
            f"checkpoint lacks {len(missing)} tensor(s) that config.json implies, "
            f"e.g. {missing[0]!r}: does num_hidden_layers match the weights?"
        )
    return ModelSpec(
        family=family.name,
        model_type=model_type,
        blocks=tuple(blocks),
        residual=tuple(sorted(keys - in_blocks)),
    )


def _check_tower(tower: Tower, model_type: str) -> None:
    if tower.n_heads % tower.n_kv_heads:
        raise MergeShieldError(
            f"{model_type}: num_attention_heads={tower.n_heads} is not a multiple of "
            f"num_key_value_heads={tower.n_kv_heads}"
        )
    if tower.rope and tower.head_dim % 2:
        raise MergeShieldError(f"{model_type}: rotary head_dim must be even, got {tower.head_dim}")
