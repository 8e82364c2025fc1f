"""One adapter per model family: where its heads and MLP units are stored.

A family is a :class:`Layout` (tensor-name templates, relative to one layer) plus a function
that reads the dimensions of each tower from the config.  Everything else (tensor names,
shapes, prefixes such as ``bert.`` or ``model.``) is derived from these two pieces, so adding
a family is a few declarative lines and no transform ever branches on the model type.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from mergeshield.architectures.spec import AttentionSpec, BlockSpec, MLPSpec, ModelSpec, Slot
from mergeshield.errors import MergeShieldError


@dataclass(frozen=True)
class Layout:
    """Tensor-name stems of one layer; ``{i}`` is the layer index.

    ``q``/``k``/``v``/``o``/``up``/``down``/``gate`` are linear-layer stems (``.weight`` and
    ``.bias`` are appended).  ``fused_qkv``: q, k and v are the three chunks of the ``q`` stem's
    output dimension.  ``conv1d``: weights are stored ``[in, out]``.
    ``cross``: q, k, v and o stems of a cross-attention after the self-attention (T5's
    decoder), which becomes a block of its own.  ``pinned_heads``: the self-attention heads
    share a position-bias table across layers (:class:`AttentionSpec`).
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
    cross: tuple[str, str, str, str] | None = None
    pinned_heads: bool = False


@dataclass(frozen=True)
class Tower:
    """Dimensions of one stack of identical layers (CLIP has two: text and vision).

    ``prefix_optional``: the tower may be stored without ``prefix`` (transformers 5 saves a
    ``CLIPTextModel`` alone as ``encoder.layers...``, a ``CLIPTextModelWithProjection`` as
    ``text_model.encoder.layers...``).  ``optional``: a checkpoint may lack the tower (T5's
    decoder, in a ``T5EncoderModel``).  ``layouts``: this tower's own, else the family's.
    """

    prefix: str  # e.g. "text_model." inside a CLIPModel checkpoint, "" otherwise
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_units: int
    activation: str
    rope: bool = False
    prefix_optional: bool = False
    optional: bool = False
    layouts: tuple[Layout, ...] = ()


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


def _clip_tower_alone(prefix: str) -> Callable[[Any], list[Tower]]:
    """A ``CLIPTextModel``/``CLIPVisionModel`` (and ``...WithProjection``) checkpoint: one
    tower, stored with or without its prefix."""
    return lambda cfg: [replace(_encoder_tower(cfg, prefix), prefix_optional=True)]


def _distilbert_tower(cfg: Any) -> Tower:
    return Tower(
        prefix="",
        n_layers=cfg.n_layers,
        hidden_size=cfg.dim,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_heads,
        head_dim=cfg.dim // cfg.n_heads,
        n_units=cfg.hidden_dim,
        activation=str(cfg.activation),
    )


def t5_activation(feed_forward_proj: str) -> tuple[bool, str]:
    """``(gated, activation)`` of T5's ``feed_forward_proj`` (``"relu"``: v1.0,
    ``"gated-gelu"``: v1.1, whose activation transformers names ``gelu_new``)."""
    parts = str(feed_forward_proj).split("-")
    gated = parts[0] == "gated"
    return gated, "gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]


def _t5_towers(cfg: Any) -> list[Tower]:
    """T5's encoder and decoder stacks (the decoder is absent from a ``T5EncoderModel``).

    No attention scaling (folded into the weights), RMSNorm without bias, no linear biases:
    none of it touches the per-head maps, which keep every score ``q_h^T k_h``, or the MLP
    units.  The relative position bias (one column per head, in layer 0, shared by every
    layer of a stack) pins the self-attention heads' order (:class:`AttentionSpec`).
    """
    gated, activation = t5_activation(cfg.feed_forward_proj)
    towers = []
    for prefix, n_layers in (
        ("encoder.", cfg.num_layers),
        ("decoder.", cfg.num_decoder_layers or cfg.num_layers),
    ):
        towers.append(
            Tower(
                prefix=prefix,
                n_layers=n_layers,
                hidden_size=cfg.d_model,
                n_heads=cfg.num_heads,
                n_kv_heads=cfg.num_heads,
                head_dim=cfg.d_kv,
                n_units=cfg.d_ff,
                activation=activation,
                optional=prefix == "decoder.",
                layouts=(_t5_layout(decoder=prefix == "decoder.", gated=gated),),
            )
        )
    return towers


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

DISTILBERT = Layout(
    layer="transformer.layer.{i}.",
    q="attention.q_lin",
    k="attention.k_lin",
    v="attention.v_lin",
    o="attention.out_lin",
    up="ffn.lin1",
    down="ffn.lin2",
)


def _t5_layout(decoder: bool, gated: bool) -> Layout:
    """A T5 block: ``layer.0`` self-attention, in the decoder ``layer.1`` cross-attention, then
    the feed-forward layer: ``wo(act(wi x))`` (v1.0) or ``wo(act(wi_0 x) * wi_1 x)`` (gated)."""
    att, ff = "layer.0.SelfAttention.", f"layer.{2 if decoder else 1}.DenseReluDense."
    cross = "layer.1.EncDecAttention."
    return Layout(
        layer="block.{i}.",
        q=att + "q",
        k=att + "k",
        v=att + "v",
        o=att + "o",
        up=ff + ("wi_1" if gated else "wi"),
        down=ff + "wo",
        gate=ff + "wi_0" if gated else None,
        cross=(cross + "q", cross + "k", cross + "v", cross + "o") if decoder else None,
        pinned_heads=True,
    )


FAMILIES: dict[str, Family] = {
    "bert": Family("bert", (BERT,), lambda c: [_encoder_tower(c)]),
    "roberta": Family("roberta", (BERT,), lambda c: [_encoder_tower(c)]),
    "vit": Family("vit", (VIT, VIT_V5), lambda c: [_encoder_tower(c)]),
    "clip": Family("clip", (CLIP,), _clip_towers),
    "clip_text_model": Family("clip", (CLIP,), _clip_tower_alone("text_model.")),
    "clip_vision_model": Family("clip", (CLIP,), _clip_tower_alone("vision_model.")),
    "gpt2": Family("gpt2", (GPT2,), lambda c: [_gpt2_tower(c)]),
    "llama": Family("llama", (LLAMA,), lambda c: [_llama_tower(c)]),
    "mistral": Family("llama", (LLAMA,), lambda c: [_llama_tower(c)]),
    "qwen2": Family("llama", (LLAMA,), lambda c: [_llama_tower(c)]),
    # encoder / seq2seq families (issue 16)
    "xlm-roberta": Family("roberta", (BERT,), lambda c: [_encoder_tower(c)]),
    "distilbert": Family("distilbert", (DISTILBERT,), lambda c: [_distilbert_tower(c)]),
    "t5": Family("t5", (), _t5_towers),
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


def _find_tower(
    keys: set[str], tower: Tower, layouts: tuple[Layout, ...]
) -> tuple[Layout, str] | None:
    """The layout of ``tower`` found in the checkpoint and the full prefix of its layers
    (``"bert.encoder."``-style; ``""`` for a CLIP tower saved alone), or None."""
    tower_prefixes = (tower.prefix, "") if tower.prefix_optional else (tower.prefix,)
    for layout in layouts:
        for tower_prefix in tower_prefixes:
            prefix = _find_prefix(keys, tower_prefix, layout)
            if prefix is not None:
                return layout, prefix + tower_prefix
    return None


def _blocks(keys: set[str], tower: Tower, layout: Layout, start: str) -> Iterable[BlockSpec]:
    for i in range(tower.n_layers):
        base = start + layout.layer.format(i=i)

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
            pinned_heads=layout.pinned_heads,
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
        if layout.cross is not None:
            q, k, v, o = (slot(stem) for stem in layout.cross)
            cross = replace(attention, q=q, k=k, v=v, o=o, pinned_heads=False)
            yield BlockSpec(f"{name} cross", tower.hidden_size, attention=cross, mlp=None)


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
        found = _find_tower(keys, tower, tower.layouts or family.layouts)
        if found is None and tower.optional:
            continue
        if found is None:
            raise MergeShieldError(
                f"no {tower.prefix or ''}layer-0 attention weights of a {model_type} model "
                "found in the checkpoint; is config.json from a different model?"
            )
        blocks.extend(_blocks(keys, tower, *found))
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
