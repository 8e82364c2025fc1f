"""Declarative architecture specs: which stored tensors form each attention head, each MLP,
and which lie on the residual stream.

Convention (torch ``nn.Linear``): a linear map is ``y = W x + b`` with ``W`` of shape
``[out, in]``.  A :class:`Slot` says where such a ``W`` (and ``b``) lives inside the stored
tensors, so that GPT-2's transposed, fused ``Conv1D`` weights and the plain ``Linear`` weights
of BERT or Llama look the same to every transform.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Slot:
    """One logical linear map ``y = W x + b`` inside the stored tensors.

    ``weight``/``bias``: stored tensor names (``bias`` is None when the layer has none).
    ``transposed``: the weight is stored as ``[in, out]`` (GPT-2 ``Conv1D``).
    ``chunk``: ``(index, count)`` when the map is one of ``count`` equal pieces of the output
    dimension of a fused tensor (GPT-2 ``c_attn`` holds q | k | v).
    ``rows``: ``(start, stop)`` when the map is that row range of a fused tensor's ``[out, in]``
    view, for pieces of unequal size (Phi-3's ``qkv_proj`` under grouped-query attention).
    """

    weight: str
    bias: str | None = None
    transposed: bool = False
    chunk: tuple[int, int] | None = None
    rows: tuple[int, int] | None = None

    def names(self) -> tuple[str, ...]:
        return (self.weight,) if self.bias is None else (self.weight, self.bias)

    def view(self, tensors: Mapping[str, Any]) -> tuple[Any, Any]:
        """``(W, b)`` as ``[out, in]`` / ``[out]`` views into ``tensors`` (numpy arrays or
        torch tensors; ``b`` is None without a bias)."""
        w = tensors[self.weight]
        if self.transposed:
            w = w.T
        b = tensors[self.bias] if self.bias is not None else None
        if self.chunk is not None:
            index, count = self.chunk
            size = w.shape[0] // count
            w = w[index * size : (index + 1) * size]
            b = b[index * size : (index + 1) * size] if b is not None else None
        if self.rows is not None:
            start, stop = self.rows
            w = w[start:stop]
            b = b[start:stop] if b is not None else None
        return w, b


@dataclass(frozen=True)
class AttentionSpec:
    """Multi-head attention ``o = sum_h W_O[:, h] softmax(q_h^T k_h / sqrt(d)) v_h``.

    Query head ``h`` reads key/value head ``h // (n_heads // n_kv_heads)`` (grouped-query
    attention; ``n_kv_heads == n_heads`` is ordinary multi-head attention).
    ``rope``: rotary embeddings in the Hugging Face ``rotate_half`` layout, which rotates
    dimension ``i`` together with ``i + head_dim / 2``.
    ``shared_heads``: the name of a stack whose layers must all permute their heads alike
    (None: each layer on its own).  T5: head ``h`` adds column ``h`` of a relative position
    bias table stored in the stack's first layer and shared by every layer of the stack, so
    only one head permutation per stack, also applied to the table's columns, is exact
    (per-head QK/VO maps leave the scores ``q_h^T k_h`` and outputs unchanged, hence commute
    with the bias).  ``position_bias``: that table (``[buckets, n_heads]``), in the block that
    stores it.
    ``rotary_dim``: partial rotary embeddings rotate only the first ``rotary_dim`` dimensions,
    ``i`` with ``i + rotary_dim / 2`` (0: all of them).
    ``q_norm``/``k_norm``: stored weights ``w`` (``[head_dim]``, shared by all heads) of the
    RMSNorm applied to every query/key head before RoPE (Qwen3, Gemma 3), which scales
    dimension ``i`` by ``norm_offset + w_i`` (Gemma stores ``w`` with offset 1).
    """

    q: Slot
    k: Slot
    v: Slot
    o: Slot
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope: bool = False
    shared_heads: str | None = None
    position_bias: str | None = None
    q_norm: str | None = None
    k_norm: str | None = None
    norm_offset: float = 0.0
    rotary_dim: int = 0  # partial rotary (Phi-4-mini): the rotated dimensions; 0: all

    @property
    def rotary(self) -> int:
        """Dimensions of each head that RoPE rotates (``linalg.rotary_index``)."""
        return self.rotary_dim or self.head_dim

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def slots(self) -> dict[str, Slot]:
        return {"q": self.q, "k": self.k, "v": self.v, "o": self.o}

    def norms(self) -> tuple[str, ...]:
        """The per-head norm weights (none, or ``(q_norm, k_norm)``)."""
        return tuple(n for n in (self.q_norm, self.k_norm) if n is not None)

    def head_tables(self) -> tuple[str, ...]:
        """Stored tensors besides the slots that follow the heads: the per-head norm weights
        and the position bias table."""
        return self.norms() + ((self.position_bias,) if self.position_bias else ())


@dataclass(frozen=True)
class MLPSpec:
    """Feed-forward block ``down(act(gate x) * up x)`` (gated) or ``down(act(up x))``.

    Rows of ``up`` (and ``gate``) and columns of ``down`` are the ``n_units`` hidden units.
    ``label``: for the further MLPs of a block (:attr:`BlockSpec.extra_mlps`), the prefix of
    their roles (``expert3.up``).
    """

    up: Slot
    down: Slot
    n_units: int
    activation: str
    gate: Slot | None = None
    label: str = ""

    def slots(self) -> dict[str, Slot]:
        slots = {"up": self.up, "down": self.down}
        if self.gate is not None:
            slots["gate"] = self.gate
        return slots

    def shapes(self, hidden_size: int) -> dict[str, tuple[int, int]]:
        """Logical ``[out, in]`` shape of every slot."""
        shapes = {"up": (self.n_units, hidden_size), "down": (hidden_size, self.n_units)}
        if self.gate is not None:
            shapes["gate"] = (self.n_units, hidden_size)
        return shapes


@dataclass(frozen=True)
class BlockSpec:
    """One transformer layer: the unit that is read, transformed and written at a time.

    ``mlp`` is None for an attention-only block: a T5 decoder layer is two blocks, its
    self-attention with its MLP, and its cross-attention (queries from the decoder stream,
    keys and values from the encoder output) alone.
    ``extra_mlps``: the further MLPs of a mixture-of-experts layer (experts 1.., the shared
    expert), each with its own hidden units; ``mlp`` is the first (expert 0).  The router and
    the shared expert's gate read the residual stream, which no transform here changes, so
    they are copied unchanged.
    """

    name: str
    hidden_size: int
    attention: AttentionSpec
    mlp: MLPSpec | None
    extra_mlps: tuple[MLPSpec, ...] = ()

    def mlps(self) -> tuple[MLPSpec, ...]:
        """Every MLP of the block: ``mlp`` then ``extra_mlps`` (none in an attention-only
        block)."""
        return () if self.mlp is None else (self.mlp, *self.extra_mlps)

    def slots(self) -> dict[str, Slot]:
        slots = {**self.attention.slots(), **(self.mlp.slots() if self.mlp is not None else {})}
        for mlp in self.extra_mlps:
            slots |= {f"{mlp.label}.{role}": slot for role, slot in mlp.slots().items()}
        return slots

    def tensor_names(self) -> tuple[str, ...]:
        names: list[str] = []
        for slot in self.slots().values():
            for name in slot.names():
                if name not in names:  # fused tensors appear in several slots
                    names.append(name)
        return tuple(names) + self.attention.head_tables()

    def expected_shapes(self) -> dict[str, tuple[int, int]]:
        """Logical ``[out, in]`` shape of every slot, from the config."""
        a, m, d = self.attention, self.mlp, self.hidden_size
        shapes = {
            "q": (a.n_heads * a.head_dim, d),
            "k": (a.n_kv_heads * a.head_dim, d),
            "v": (a.n_kv_heads * a.head_dim, d),
            "o": (d, a.n_heads * a.head_dim),
        } | (m.shapes(d) if m is not None else {})
        for extra in self.extra_mlps:
            shapes |= {f"{extra.label}.{r}": s for r, s in extra.shapes(d).items()}
        return shapes

    def expected_norm_shapes(self) -> dict[str, tuple[int]]:
        """Shape of every per-head norm weight: ``[head_dim]``."""
        return {name: (self.attention.head_dim,) for name in self.attention.norms()}


@dataclass(frozen=True)
class ModelSpec:
    """A whole checkpoint: its transformer blocks, and every other tensor.

    ``residual`` lists the tensors outside the blocks' heads and MLP units: embeddings, norms,
    the attention output bias, the MLP output bias and task heads.  They read or write the
    residual stream, which the exact symmetries used here leave in its original basis, so
    they are copied unchanged.
    """

    family: str
    model_type: str
    blocks: tuple[BlockSpec, ...]
    residual: tuple[str, ...]
