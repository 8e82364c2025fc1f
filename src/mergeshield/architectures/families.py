"""One adapter per model family: where its heads and MLP units are stored.

A family is a :class:`Layout` (tensor-name templates, relative to one layer) plus a function
that reads the dimensions of each tower from the config.  Everything else (tensor names,
shapes, prefixes such as ``bert.`` or ``model.``) is derived from these two pieces, so adding
a family is a few declarative lines and no transform ever branches on the model type.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
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
    decoder), which becomes a block of its own.  ``position_bias``: stem of a position-bias
    table stored in a stack's first layer and shared by all its layers, whose self-attention
    heads then take one permutation per stack (:class:`AttentionSpec`).
    ``qkv_rows``: q, k and v are consecutive row ranges of the ``q`` stem (``n_heads * d``,
    ``n_kv_heads * d``, ``n_kv_heads * d`` rows: Phi-3's ``qkv_proj``).  ``gate_up_rows``:
    gate and up are the first and second half of the ``up`` stem's rows (``gate_up_proj``).
    ``q_norm``/``k_norm``: stems of the per-head query/key norms.  ``moe``: where the experts
    of a mixture-of-experts layer are (``up``/``down``/``gate`` are then its dense MLP, if any).
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
    position_bias: str | None = None
    qkv_rows: bool = False
    gate_up_rows: bool = False
    q_norm: str | None = None
    k_norm: str | None = None
    moe: MoELayout | None = None


@dataclass(frozen=True)
class MoELayout:
    """Stems of a mixture-of-experts layer's MLPs, relative to the layer: expert ``e`` is
    ``experts.format(e=e)`` + ``up``/``down``/``gate``, the shared expert (if any) ``shared`` +
    the same."""

    experts: str
    up: str
    down: str
    gate: str
    shared: str | None = None


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
    norm_offset: float = 0.0  # per-head q/k norms scale by norm_offset + weight (Gemma: 1)
    rotary_dim: int = 0  # partial rotary: rotated dimensions per head (0: all)
    n_experts: int = 0  # mixture of experts: experts per MoE layer
    expert_units: int = 0
    shared_units: int = 0  # the shared expert's units (0: none)
    dense_layers: tuple[int, ...] = ()  # layers with a dense MLP (n_units) instead of experts


@dataclass(frozen=True)
class Architecture:
    """One adapter per model type: the stored layouts it may use, its towers from the config,
    and the ``config.json`` fields it reads with transformers' defaults for them
    (:mod:`mergeshield.architectures.config`; a composite type names its sub-configs' types)."""

    name: str
    layouts: tuple[Layout, ...]  # alternatives; the one found in the checkpoint is used
    towers: Callable[[Any], list[Tower]]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    sub_configs: Mapping[str, str] = field(default_factory=dict)


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
        activation=str(getattr(cfg, "hidden_act", None) or cfg.hidden_activation),  # Gemma's name
        rope=True,
    )


def _rotary_fraction(cfg: Any) -> float:
    """``partial_rotary_factor`` where the config keeps it (Phi-3: in ``rope_parameters``)."""
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(cfg, name, None)
        if isinstance(params, dict) and params.get("partial_rotary_factor") is not None:
            return float(params["partial_rotary_factor"])
    return float(getattr(cfg, "partial_rotary_factor", None) or 1.0)


def _decoder_tower(cfg: Any, norm_offset: float = 0.0) -> Tower:
    """Qwen3, Gemma 2/3, Phi-3 and the MoE models: the Llama tower.

    Partial rotary embeddings (Phi-4-mini: ``partial_rotary_factor`` 0.75) rotate the pairs
    ``(j, j + rotary_dim / 2)`` of the first ``rotary_dim = int(head_dim * factor)`` dimensions
    (as transformers computes it) and leave the others alone; both counts must be even
    (:func:`mergeshield.symmetries.linalg.rotary_index` pairs the free dimensions too)."""
    tower = replace(_llama_tower(cfg), norm_offset=norm_offset)
    fraction = _rotary_fraction(cfg)
    rotary = int(tower.head_dim * fraction)
    if fraction == 1.0:
        return tower
    if not 0 < rotary <= tower.head_dim or rotary % 2 or (tower.head_dim - rotary) % 2:
        raise MergeShieldError(
            f"{cfg.model_type}: partial_rotary_factor={fraction} rotates {rotary} of "
            f"{tower.head_dim} head dimensions; supported: even counts of rotated and free ones"
        )
    return replace(tower, rotary_dim=rotary)


def _n_experts(cfg: Any, default: int) -> int:
    """Experts per layer: Mixtral and Qwen3-MoE accept ``num_experts`` and ``num_local_experts``
    (an attribute map), and transformers 5 writes the latter."""
    return getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or default


def _mixtral_tower(cfg: Any) -> Tower:
    """Every layer sparse; each expert has ``intermediate_size`` units."""
    tower = _decoder_tower(cfg)
    return replace(tower, n_experts=_n_experts(cfg, 8), expert_units=tower.n_units)


def _qwen_moe_tower(cfg: Any, default_experts: int) -> Tower:
    """Layer ``i`` sparse unless listed in ``mlp_only_layers`` or ``(i + 1) %
    decoder_sparse_step``; experts of ``moe_intermediate_size`` units, Qwen2-MoE's shared expert
    of ``shared_expert_intermediate_size``."""
    tower = _decoder_tower(cfg)
    step, only = cfg.decoder_sparse_step, set(cfg.mlp_only_layers or ())
    return replace(
        tower,
        n_experts=_n_experts(cfg, default_experts),
        expert_units=cfg.moe_intermediate_size,
        shared_units=getattr(cfg, "shared_expert_intermediate_size", None) or 0,
        dense_layers=tuple(i for i in range(tower.n_layers) if i in only or (i + 1) % step),
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
    layer of a stack) allows one self-attention head permutation per stack
    (:class:`AttentionSpec`).
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
        position_bias=att + "relative_attention_bias",
    )


# --- decoder families of issue 16 -------------------------------------------------------
QWEN3 = replace(LLAMA, q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
PHI3 = replace(
    LLAMA,
    q="self_attn.qkv_proj",
    k="self_attn.qkv_proj",
    v="self_attn.qkv_proj",
    up="mlp.gate_up_proj",
    gate="mlp.gate_up_proj",
    qkv_rows=True,
    gate_up_rows=True,
)
QWEN_MOE = replace(
    LLAMA,
    moe=MoELayout(
        experts="mlp.experts.{e}.",
        up="up_proj",
        down="down_proj",
        gate="gate_proj",
        shared="mlp.shared_expert.",
    ),
)
QWEN3_MOE = replace(QWEN_MOE, q_norm=QWEN3.q_norm, k_norm=QWEN3.k_norm)
MIXTRAL = replace(
    LLAMA, moe=MoELayout(experts="block_sparse_moe.experts.{e}.", up="w3", down="w2", gate="w1")
)
_ENCODER = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
}
_DECODER = _ENCODER | {  # Llama's defaults; Mistral and Qwen2 differ in two fields
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "intermediate_size": 11008,
    "num_key_value_heads": None,
    "head_dim": None,
    "hidden_act": "silu",
}

# --- decoder families of issue 16 -------------------------------------------------------
_GEMMA = {
    "hidden_size": 2304,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "intermediate_size": 9216,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
}
_ROTARY = {"rope_parameters": None, "rope_scaling": None, "partial_rotary_factor": None}
_EXPERTS = {"num_experts": None, "num_local_experts": None}  # either name; the tower's default
_QWEN_MOE = _EXPERTS | {
    "decoder_sparse_step": 1,
    "mlp_only_layers": None,
    "moe_intermediate_size": 1408,
}
_DECODER_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3": _DECODER | {"intermediate_size": 22016, "num_key_value_heads": 32, "head_dim": 128},
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "phi3": _DECODER | {"hidden_size": 3072, "intermediate_size": 8192} | _ROTARY,
    "mixtral": _DECODER | _EXPERTS | {"intermediate_size": 14336, "num_key_value_heads": 8},
    "qwen2_moe": _DECODER
    | _QWEN_MOE
    | {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24}
    | {"num_attention_heads": 16, "num_key_value_heads": 16}
    | {"shared_expert_intermediate_size": 5632},
    "qwen3_moe": _DECODER
    | _QWEN_MOE
    | {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24}
    | {"num_attention_heads": 32, "num_key_value_heads": 4}
    | {"moe_intermediate_size": 768},
}
_CLIP_TEXT = (
    _ENCODER
    | {"hidden_size": 512, "num_attention_heads": 8}
    | {
        "intermediate_size": 2048,
        "hidden_act": "quick_gelu",
    }
)
_CLIP_VISION = _ENCODER | {"hidden_act": "quick_gelu"}
_GPT2 = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_inner": None}
_GPT2 |= {"activation_function": "gelu_new"}
_DISTILBERT = {"dim": 768, "n_layers": 6, "n_heads": 12, "hidden_dim": 3072}
_DISTILBERT |= {"activation": "gelu"}
_T5 = {"d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6}
_T5 |= {"num_decoder_layers": None, "num_heads": 8, "feed_forward_proj": "relu"}
_MISTRAL = _DECODER | {"intermediate_size": 14336, "num_key_value_heads": 8}
_QWEN2 = _DECODER | {"intermediate_size": 22016, "num_key_value_heads": 32}


def _decoder(name: str, layout: Layout, towers: Callable[[Any], list[Tower]], model_type: str):
    return Architecture(name, (layout,), towers, _DECODER_DEFAULTS[model_type])


DECODER_FAMILIES: dict[str, Architecture] = {
    "qwen3": _decoder("qwen3", QWEN3, lambda c: [_decoder_tower(c)], "qwen3"),
    "gemma2": _decoder("gemma", LLAMA, lambda c: [_decoder_tower(c, norm_offset=1.0)], "gemma2"),
    "gemma3_text": _decoder(
        "gemma", QWEN3, lambda c: [_decoder_tower(c, norm_offset=1.0)], "gemma3_text"
    ),
    "phi3": _decoder("phi3", PHI3, lambda c: [_decoder_tower(c)], "phi3"),
    "mixtral": _decoder("moe", MIXTRAL, lambda c: [_mixtral_tower(c)], "mixtral"),
    "qwen2_moe": _decoder("moe", QWEN_MOE, lambda c: [_qwen_moe_tower(c, 60)], "qwen2_moe"),
    "qwen3_moe": _decoder("moe", QWEN3_MOE, lambda c: [_qwen_moe_tower(c, 128)], "qwen3_moe"),
}
_CLIP_PARTS = {"text_config": "clip_text_model", "vision_config": "clip_vision_model"}

FAMILIES: dict[str, Architecture] = {
    "bert": Architecture("bert", (BERT,), lambda c: [_encoder_tower(c)], _ENCODER),
    "roberta": Architecture("roberta", (BERT,), lambda c: [_encoder_tower(c)], _ENCODER),
    "vit": Architecture("vit", (VIT, VIT_V5), lambda c: [_encoder_tower(c)], _ENCODER),
    "clip": Architecture("clip", (CLIP,), _clip_towers, sub_configs=_CLIP_PARTS),
    "clip_text_model": Architecture("clip", (CLIP,), _clip_tower_alone("text_model."), _CLIP_TEXT),
    "clip_vision_model": Architecture(
        "clip", (CLIP,), _clip_tower_alone("vision_model."), _CLIP_VISION
    ),
    "gpt2": Architecture("gpt2", (GPT2,), lambda c: [_gpt2_tower(c)], _GPT2),
    "llama": Architecture("llama", (LLAMA,), lambda c: [_llama_tower(c)], _DECODER),
    "mistral": Architecture("llama", (LLAMA,), lambda c: [_llama_tower(c)], _MISTRAL),
    "qwen2": Architecture("llama", (LLAMA,), lambda c: [_llama_tower(c)], _QWEN2),
    # encoder / seq2seq families (issue 16)
    "xlm-roberta": Architecture("roberta", (BERT,), lambda c: [_encoder_tower(c)], _ENCODER),
    "distilbert": Architecture(
        "distilbert", (DISTILBERT,), lambda c: [_distilbert_tower(c)], _DISTILBERT
    ),
    "t5": Architecture("t5", (), _t5_towers, _T5),
} | DECODER_FAMILIES

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(FAMILIES))


def _find_prefix(keys: set[str], tower_prefix: str, layout: Layout) -> str | None:
    """The prefix (``""``, ``"bert."``, ``"model."``...) before the tower's first layer."""
    probe = tower_prefix + layout.layer.format(i=0) + layout.q + ".weight"
    hits = sorted((k[: -len(probe)] for k in keys if k.endswith(probe)), key=len)
    return hits[0] if hits else None


def _slot(
    keys: set[str],
    stem: str,
    layout: Layout,
    chunk: tuple[int, int] | None,
    rows: tuple[int, int] | None = None,
) -> Slot:
    bias = stem + ".bias"
    return Slot(
        weight=stem + ".weight",
        bias=bias if bias in keys else None,
        transposed=layout.conv1d,
        chunk=chunk,
        rows=rows,
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


SlotMaker = Callable[..., Slot]


def _qkv_rows(slot: SlotMaker, layout: Layout, tower: Tower) -> tuple[Slot, Slot, Slot]:
    """q, k and v as the consecutive row ranges of one fused tensor (``Layout.qkv_rows``)."""
    nq, nkv = tower.n_heads * tower.head_dim, tower.n_kv_heads * tower.head_dim
    return (
        slot(layout.q, rows=(0, nq)),
        slot(layout.k, rows=(nq, nq + nkv)),
        slot(layout.v, rows=(nq + nkv, nq + 2 * nkv)),
    )


def _moe_mlps(slot: SlotMaker, tower: Tower, moe: MoELayout) -> list[MLPSpec]:
    """The experts of a mixture-of-experts layer, then its shared expert (if any)."""
    parts = [
        (f"expert{e}", moe.experts.format(e=e), tower.expert_units) for e in range(tower.n_experts)
    ]
    if moe.shared is not None and tower.shared_units:
        parts.append(("shared", moe.shared, tower.shared_units))
    return [
        MLPSpec(
            up=slot(stem + moe.up),
            down=slot(stem + moe.down),
            gate=slot(stem + moe.gate),
            n_units=units,
            activation=tower.activation,
            label=label,
        )
        for label, stem, units in parts
    ]


def _position_bias(keys: set[str], base: str, layout: Layout) -> str | None:
    """The layer's position-bias table, where it stores one (T5: the stack's first layer)."""
    if layout.position_bias is None:
        return None
    name = base + layout.position_bias + ".weight"
    return name if name in keys else None


def _blocks(keys: set[str], tower: Tower, layout: Layout, start: str) -> Iterable[BlockSpec]:
    for i in range(tower.n_layers):
        base = start + layout.layer.format(i=i)

        def slot(
            stem: str,
            chunk: tuple[int, int] | None = None,
            rows: tuple[int, int] | None = None,
            base: str = base,
        ) -> Slot:
            return _slot(keys, base + stem, layout, chunk, rows)

        fused = layout.fused_qkv
        q = slot(layout.q, (0, 3) if fused else None)
        k = slot(layout.k, (1, 3) if fused else None)
        v = slot(layout.v, (2, 3) if fused else None)
        if layout.qkv_rows:
            q, k, v = _qkv_rows(slot, layout, tower)
        attention = AttentionSpec(
            q=q,
            k=k,
            v=v,
            o=slot(layout.o),
            n_heads=tower.n_heads,
            n_kv_heads=tower.n_kv_heads,
            head_dim=tower.head_dim,
            rope=tower.rope,
            shared_heads=start if layout.position_bias else None,
            position_bias=_position_bias(keys, base, layout),
            q_norm=base + layout.q_norm + ".weight" if layout.q_norm else None,
            k_norm=base + layout.k_norm + ".weight" if layout.k_norm else None,
            norm_offset=tower.norm_offset,
            rotary_dim=tower.rotary_dim,
        )
        halves = layout.gate_up_rows
        mlp = MLPSpec(
            up=slot(layout.up, (1, 2) if halves else None),
            down=slot(layout.down),
            gate=slot(layout.gate, (0, 2) if halves else None) if layout.gate else None,
            n_units=tower.n_units,
            activation=tower.activation,
        )
        extras: tuple[MLPSpec, ...] = ()
        if layout.moe is not None and tower.n_experts and i not in tower.dense_layers:
            mlp, *rest = _moe_mlps(slot, tower, layout.moe)
            extras = tuple(rest)
        name = f"{tower.prefix.rstrip('.') or 'layer'} {i}".replace("_model", "")
        yield BlockSpec(
            name=name,
            hidden_size=tower.hidden_size,
            attention=attention,
            mlp=mlp,
            extra_mlps=extras,
        )
        if layout.cross is not None:
            q, k, v, o = (slot(stem) for stem in layout.cross)
            cross = replace(attention, q=q, k=k, v=v, o=o, shared_heads=None, position_bias=None)
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
