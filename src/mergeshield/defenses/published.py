"""The three published defenses, and all of their transforms together.

- ``params`` (PaRaMS, ICCV 2025): MLP units permuted as far as possible from the base model
  (random without ``--base``); attention scaled per head: ``diagonal`` (per channel
  ``alpha ~ U(0.05, 20)`` on Q/K, an independent ``gamma`` on V/O), ``symmetric``
  (``A = U diag(s) U^T``, ``s`` log-uniform in [0.05, 20]) or ``nonsymmetric``
  (``A = (G + 1e-3 I) diag(s)``, ``G`` Gaussian, ``s`` log-uniform in [0.1, 15]); Q by ``A``,
  K by ``A^-T``, V by ``A``, O by ``A^-1``.
- ``mergelock`` (Model Unmerging, 2025): per head two independent random invertible matrices
  ``A = G P S`` (Gaussian, permutation, log-uniform scaling) for QK and for VO; no MLP step.
- ``mergebarrier`` (Do Not Merge My Model!, AAAI 2026): per head the orthogonal flip
  ``P = I - 2 U_k U_k^T`` of the top-``k`` eigen-directions of ``W_Q W_Q^T + W_K W_K^T``
  (``k = flip_fraction * head_dim``), applied to both Q and K (``P^-T = P``).  The Taylor
  reparameterization of the MLP is left out: it replaces the MLP by polynomial coefficient
  tensors, which stock transformers cannot load.
- ``all``: heads permuted, MLP units permuted (far from the base when given) and, for gated
  MLPs, half of them sign-flipped (``up`` row and ``down`` column negated: exact in every
  dtype, one bit per weight; a flip moves a unit by ``2|w|``; magnitudes ``2^k`` would cost a
  float pass per weight, 1.5 s on a 1B checkpoint, and AGA's per-unit fit undoes scales of
  either kind); QK by MergeLock's ``A`` times MergeBarrier's flip; VO by an independent
  MergeLock ``B``.

Rotary models (Llama family): only matrices that commute with every rotary position may act
on Q and K, i.e. ``c_j R(phi_j)`` on each rotary pair ``j``.  There the QK part becomes:
``diagonal`` one ``alpha`` per pair; ``symmetric`` ``+-c`` per pair (the symmetric matrices of
that set); ``nonsymmetric`` and ``mergelock`` a random ``c_j R(phi_j)``; ``mergebarrier`` the
rotation by pi (a flip of both directions) of the ``k/2`` pairs with the most energy in
``W_Q W_Q^T + W_K W_K^T``, which maximizes ``||(P - I) W||`` over such orthogonal maps.  VO and
the MLP are unrestricted.  Under grouped-query attention one QK and one VO matrix per
key/value head is shared by its query heads.

T5: a decoder layer is two blocks, its self-attention with its MLP and its cross-attention
alone (queries from the decoder stream, keys and values from the encoder output; the QK map acts
on head dimensions, Q and K get matching maps, and a block without MLP has no MLP step).  Each
self-attention head adds its column of a relative position bias stored in layer 0 and shared by
every layer of the stack, so a per-layer head permutation is not exact: ``all`` (the only
defense that permutes heads) draws one permutation per stack (from a generator seeded by the
stack, ``BlockContext.stack_rng``), applies it to the self-attention of every layer of the
stack and to the bias table's columns, and keeps a permutation per layer for the
cross-attention heads.  The per-head QK/VO maps keep every score ``q_h^T k_h`` and head
output, so the bias, the missing ``1/sqrt(d)``, RMSNorm and the ``d_model^-0.5``-scaled tied
head are untouched.  Measured on tiny models (change of a 50/50 average with the base,
relative to the outputs' spread; :data:`FAMILY_NOTES`): ``all``, ``params`` and
``mergelock`` 1.1-1.5 as on BERT-like models (``all`` with the stack permutation 1.09-1.34,
without it 1.11-1.36: the per-head maps dominate), ``mergebarrier`` (QK only) 0.27-0.48
against 0.74-0.88 there; unprotected 0.11-0.17.

Partial rotary embeddings (Phi-4-mini) rotate only the pairs ``(j, j + rotary_dim / 2)``:
the same maps are built on those pairs and on the free dimensions paired among themselves
(``linalg.rotary_index``), never mixing the two.

Per-head query/key norms before RoPE (Qwen3, Qwen3-MoE, Gemma 3): the QK group shrinks to a
sign per head and rotary pair, and per layer a swap of each pair's two dimensions and a scale
``c_j`` of the norm weights (``q_norm`` times ``c_j``, ``k_norm`` divided by it), derived in
:mod:`mergeshield.symmetries.qk_norm`; ``W_Q``/``W_K`` rows only move or change sign, and no
scale can reach them.  There ``params`` puts its per-pair ``alpha`` (``diagonal``) or
log-uniform scale (``symmetric``: with random signs per head; ``nonsymmetric``: signs and
random swaps) on the norm weights; ``mergelock`` takes random signs per head and pair, random
swaps and log-uniform scales in its range; ``mergebarrier`` is unchanged (its pair flips are
signs); ``all`` combines them as elsewhere.  VO, the head permutations and the MLP are as
for any rotary model.

Wide heads (head_dim above ``VO_BLOCK = 128``: Gemma 2 and 3, 256): a dense per-head V/O map
costs ``2 head_dim`` flops per weight, which made Gemma-3-12B's layers 1.6x as slow to protect
as Llama-3.1-8B's.  There every V/O map (``params``, ``mergelock``, ``all``) is
``B = blockdiag(B_1, ..., B_k) P``: ``k = head_dim / 128`` blocks sampled as the defense samples
a whole map (``D Q`` in low precision, ``G P S`` or PaRaMS's forms in fp32, bounded jointly
by ``max_cond``), and ``P`` a random permutation of the head's dimensions, so that each block
reads dimensions from all over the head.  It is applied as a gather and ``k`` dense
128-dimensional maps (``symmetries.transform.split_blocks``): the cost per weight of a
128-dimensional head.  (PaRaMS's ``symmetric`` VO map is then symmetric per block, not as a
whole.)  Measured on tiny Gemma 3 models with head_dim 256 (3 seeds, 50/50 merge with the
base, logits' change in units of their spread): through the protected V/O tensors alone
0.87-1.02 (mergelock), 0.87-0.94 (params), 0.86-1.04 (all) against the dense maps' 0.80-0.93,
0.82-0.95, 0.81-1.01; unprotected 0.11-0.13.  The QK maps of norm-pinned heads (signs and
quarter turns, below) are applied as row gathers and sign flips, without products.

Mixture-of-experts layers (Mixtral, Qwen2-MoE, Qwen3-MoE): every expert's units, and the
shared expert's, are permuted (and sign-flipped by ``all``) on their own, as the single MLP of
a dense layer is (``params``: each as far as possible from the same expert of the base).  The
router and the shared expert's gate read the residual stream and are left unchanged.
"""

from __future__ import annotations

import numpy as np

from mergeshield.arrays import einsum, to_numpy
from mergeshield.defenses.base import (
    BlockContext,
    Defense,
    blocked,
    mismatch_permutation,
    random_head_permutation,
    random_rope_matrix,
    register,
    rope_safe_qk,
)
from mergeshield.errors import MergeShieldError
from mergeshield.symmetries.linalg import (
    bound_condition,
    diagonal_orthogonal,
    log_uniform,
    random_orthogonal,
    random_permutation_matrix,
    rope_commuting,
    rotary_index,
    to_rotary_layout,
)
from mergeshield.symmetries.qk_norm import norm_map, pair_maps
from mergeshield.symmetries.transform import BlockTransform

PAPER_SCALES = {"diagonal": (0.05, 20.0), "symmetric": (0.05, 20.0), "nonsymmetric": (0.1, 15.0)}
MERGELOCK_SCALE = (0.1, 10.0)


def _mlp_permutation(ctx: BlockContext) -> np.ndarray | None:
    if ctx.block.mlp is None:  # an attention-only block (T5's cross-attention)
        return None
    if ctx.base is not None:
        return mismatch_permutation(
            ctx.block.mlp, ctx.weights, ctx.base, ctx.options.exact_assignment_max
        )
    return ctx.rng.permutation(ctx.block.mlp.n_units)


def _extra_units(ctx: BlockContext, signs: bool) -> dict[str, np.ndarray]:
    """Permutations (and, with ``signs``, sign flips of gated units) of the further MLPs of a
    mixture-of-experts layer, each its own (PaRaMS: far from the base's same expert),
    concatenated as ``BlockTransform.extra_unit_perm``/``extra_unit_scale``; none for a
    dense layer."""
    extras = ctx.block.extra_mlps
    if not extras:
        return {}
    perms, scales = [], []
    for mlp in extras:
        if ctx.base is not None:
            exact_max = ctx.options.exact_assignment_max
            perms.append(mismatch_permutation(mlp, ctx.weights, ctx.base, exact_max))
        else:
            perms.append(ctx.rng.permutation(mlp.n_units))
        if signs:
            gated = mlp.gate is not None
            scales.append(
                ctx.rng.choice([-1.0, 1.0], mlp.n_units) if gated else np.ones(mlp.n_units)
            )
    out = {"extra_unit_perm": np.concatenate(perms)}
    if signs:
        out["extra_unit_scale"] = np.concatenate(scales)
    return out


def _normed_qk(
    ctx: BlockContext, scale: tuple[float, float] | None, uniform: bool, signs: bool, swap: bool
) -> dict[str, np.ndarray | None]:
    """QK maps of heads with a per-head norm (:mod:`mergeshield.symmetries.qk_norm`): random
    signs per key/value head and rotary pair (``signs``), per layer random swaps of each pair's
    dimensions (``swap``) and a scale per pair of the norm weights drawn from ``scale``
    (``uniform``, else log-uniform; None: no scale)."""
    att, rng = ctx.block.attention, ctx.rng
    if att.rotary != att.head_dim:
        raise MergeShieldError("per-head q/k norms with partial rotary embeddings: unsupported")
    half = att.head_dim // 2
    shape = (att.n_kv_heads, half)
    sign = rng.choice([-1.0, 1.0], shape) if signs else np.ones(shape)
    turn = rng.random(half) < 0.5 if swap else np.zeros(half, dtype=bool)
    c = None
    if scale is not None:
        c = rng.uniform(*scale, half) if uniform else log_uniform(rng, *scale, half)
    perm, norm_scale = norm_map(turn, c)
    return {"qk": pair_maps(sign, turn), "norm_perm": perm, "norm_scale": norm_scale}


def _symmetric(
    rng: np.random.Generator, d: int, scale: tuple[float, float], max_cond: float | None
) -> np.ndarray:
    """PaRaMS ``symmetric``: ``U diag(s) U^T``, ``s`` log-uniform in ``scale``."""
    u = random_orthogonal(rng, d)
    return bound_condition((u * log_uniform(rng, *scale, d)) @ u.T, max_cond)


def _gaussian(
    rng: np.random.Generator, d: int, scale: tuple[float, float], max_cond: float | None
) -> np.ndarray:
    """PaRaMS ``nonsymmetric``: ``(G + 1e-3 I) diag(s)``, ``s`` log-uniform in ``scale``."""
    g = rng.standard_normal((d, d)) + 1e-3 * np.eye(d)
    return bound_condition(g * log_uniform(rng, *scale, d), max_cond)


def _params_attention(ctx: BlockContext) -> tuple[np.ndarray, np.ndarray]:
    """PaRaMS attention matrices ``(A per kv head for QK, B per kv head for VO)``."""
    att, rng, opt = ctx.block.attention, ctx.rng, ctx.options
    lo, hi = opt.scale or PAPER_SCALES[opt.scaling]
    d, n, half = att.head_dim, att.n_kv_heads, att.head_dim // 2
    qk, vo = [], []
    for _ in range(n):
        if opt.low_precision and opt.scaling != "diagonal":
            b = blocked(rng, d, lambda m: diagonal_orthogonal(rng, m, (lo, hi)))
            a = (
                random_rope_matrix(rng, d, (lo, hi))
                if att.rope
                else diagonal_orthogonal(rng, d, (lo, hi))
            )
        elif opt.scaling == "diagonal":
            alpha = rng.uniform(lo, hi, half if att.rope else d)
            a = np.diag(np.tile(alpha, 2) if att.rope else alpha)
            b = np.diag(rng.uniform(lo, hi, d))
        elif opt.scaling == "symmetric":
            b = blocked(rng, d, lambda m: _symmetric(rng, m, (lo, hi), opt.max_cond), opt.max_cond)
            sign = rng.choice([-1.0, 1.0], half)
            a = (
                rope_commuting(sign * log_uniform(rng, lo, hi, half), np.zeros(half))
                if att.rope
                else b
            )
        else:
            b = blocked(rng, d, lambda m: _gaussian(rng, m, (lo, hi), opt.max_cond), opt.max_cond)
            a = random_rope_matrix(rng, d, (lo, hi)) if att.rope else b
        qk.append(a)
        vo.append(b)
    return np.stack(qk), np.stack(vo)


def params(ctx: BlockContext) -> BlockTransform:
    qk, vo = _params_attention(ctx)
    att = ctx.block.attention
    if att.rope:  # partial rotary: the pair maps moved to the rotated pairs
        qk = to_rotary_layout(qk, att.head_dim, att.rotary)
    normed = {}
    if ctx.block.attention.q_norm is not None:  # the QK maps above are replaced, see top
        opt = ctx.options
        scale = opt.scale or PAPER_SCALES.get(opt.scaling)
        diagonal = opt.scaling == "diagonal"
        swap = opt.scaling == "nonsymmetric"
        normed = _normed_qk(ctx, scale, uniform=diagonal, signs=not diagonal, swap=swap)
    return BlockTransform(
        **({"qk": qk} | normed),
        vo=vo,
        unit_perm=_mlp_permutation(ctx),
        **_extra_units(ctx, signs=False),
    )


def _mergelock_matrix(ctx: BlockContext, d: int) -> np.ndarray:
    rng = ctx.rng
    if ctx.options.low_precision:
        return diagonal_orthogonal(rng, d, ctx.options.scale or MERGELOCK_SCALE)
    g = rng.standard_normal((d, d))
    a = (
        g
        @ random_permutation_matrix(rng, d)
        * log_uniform(rng, *(ctx.options.scale or MERGELOCK_SCALE), d)
    )
    return bound_condition(a, ctx.options.max_cond)


def _mergelock_matrices(ctx: BlockContext) -> dict[str, np.ndarray | None]:
    """MergeLock's ``qk`` and ``vo`` (and, for heads with a per-head norm, the norm map)."""
    att, d = ctx.block.attention, ctx.block.attention.head_dim
    scale = ctx.options.scale or MERGELOCK_SCALE
    qk: dict[str, np.ndarray | None]
    if att.q_norm is not None:
        qk = _normed_qk(ctx, scale, uniform=False, signs=True, swap=True)
    elif att.rope:
        qk = {"qk": to_rotary_layout(rope_safe_qk(att, ctx.rng, scale), att.head_dim, att.rotary)}
    else:
        qk = {"qk": np.stack([_mergelock_matrix(ctx, d) for _ in range(att.n_kv_heads)])}
    max_cond = None if ctx.options.low_precision else ctx.options.max_cond
    vo = np.stack(
        [
            blocked(ctx.rng, d, lambda m: _mergelock_matrix(ctx, m), max_cond)
            for _ in range(att.n_kv_heads)
        ]
    )
    return qk | {"vo": vo}


def mergelock(ctx: BlockContext) -> BlockTransform:
    return BlockTransform(**_mergelock_matrices(ctx))


def barrier_flips(ctx: BlockContext) -> np.ndarray:
    """MergeBarrier's ``P_g`` per key/value head (the top-k eigen-directions flipped).

    The QK energy of kv head ``g`` is ``G_g = W_K^g W_K^gT + sum_{h in group g} W_Q^h W_Q^hT``
    (``d x d``).  Without RoPE, ``P_g = I - 2 U U^T`` for the top ``flip_fraction * d``
    eigenvectors ``U`` of ``G_g``; with RoPE only whole ``rotate_half`` pairs may be flipped,
    ranked by the pair's energy ``G_ii + G_jj`` (the diagonal: row norms squared).
    """
    att, opt = ctx.block.attention, ctx.options
    d, r, g = att.head_dim, att.group_size, att.n_kv_heads
    wq = att.q.view(ctx.weights)[0].reshape(att.n_heads, d, -1)
    wk = att.k.view(ctx.weights)[0].reshape(g, d, -1)
    flips = np.repeat(np.eye(d)[None], g, axis=0)
    if att.rope:
        diag = to_numpy(
            einsum("hij,hij->hi", wq, wq).reshape(g, r, d).sum(1) + einsum("hij,hij->hi", wk, wk)
        )
        first, second = rotary_index(d, att.rotary)
        n_top = max(1, round(opt.flip_fraction * d / 2))
        for i, energy in enumerate(diag[:, first] + diag[:, second]):
            top = np.argsort(energy)[::-1][:n_top]
            flips[i, first[top], first[top]] = flips[i, second[top], second[top]] = -1.0
        return flips
    gram = (wq @ wq.swapaxes(1, 2)).reshape(g, r, d, d).sum(1) + wk @ wk.swapaxes(1, 2)
    _, vecs = np.linalg.eigh(to_numpy(gram))
    u = vecs[:, :, ::-1][:, :, : max(1, round(opt.flip_fraction * d))]
    return flips - 2 * u @ np.swapaxes(u, 1, 2)


def mergebarrier(ctx: BlockContext) -> BlockTransform:
    return BlockTransform(qk=barrier_flips(ctx))


def all_transforms(ctx: BlockContext) -> BlockTransform:
    """Every exact transform together (head permutation applied first, see transform.py)."""
    att, mlp = ctx.block.attention, ctx.block.mlp
    kv_perm, q_perm = random_head_permutation(att, ctx.rng, ctx.stack_rng)
    lock = _mergelock_matrices(ctx)
    # The flip is applied after the head permutation.  New kv head j is old kv head
    # kv_perm[j] and its query group is old group kv_perm[j] (reordered within), so its QK
    # energy, and hence its flip, is the old head's: no permuted copy of the weights needed.
    flips = barrier_flips(ctx)[kv_perm]
    scale = None
    if mlp is not None and mlp.gate is not None:
        scale = ctx.rng.choice([-1.0, 1.0], mlp.n_units)  # sign flips: exact, one bit
    return BlockTransform(
        kv_perm=kv_perm,
        q_perm=q_perm,
        **(lock | {"qk": lock["qk"] @ flips}),
        unit_perm=_mlp_permutation(ctx),
        unit_scale=scale,
        **_extra_units(ctx, signs=True),
    )


_NORMED_QK = (
    "per-head q/k norms pin the QK basis (mergeshield.symmetries.qk_norm): Q/K maps are only\n"
    "  signs per head and rotary pair, plus per layer a swap of each pair's two dimensions and\n"
    "  a scale per pair moved onto q_norm/k_norm. params: its scales on the norms (symmetric:\n"
    "  + signs; nonsymmetric: + signs and swaps); mergelock: signs, swaps, log-uniform scales;\n"
    "  mergebarrier: unchanged (pair flips are signs); all: both. VO, heads, MLP as Llama.\n"
    "  Measured: a 50/50 merge with the base through the protected Q/K and norm tensors alone\n"
    "  (all else original) moves the logits by, in units of their spread (3 seeds), "
)
_MEASURED_QWEN3 = (
    "tiny Qwen3:\n"
    "  0.65-0.82 (mergelock), 0.74-0.85 (mergebarrier), 0.77-0.86 (params); the same shapes\n"
    "  without norms (Llama): 1.05-1.09, 0.81-1.06, 0.97-1.17; unprotected: 0.22-0.28; with VO\n"
    "  and MLP (all): 1.4."
)
_MEASURED_GEMMA3 = (
    "tiny Gemma 3:\n"
    "  0.37-0.44 (mergelock), 0.37-0.43 (mergebarrier), 0.40-0.43 (params); unprotected:\n"
    "  0.12-0.13; with VO and MLP (all): 0.95."
)
_WIDE_HEADS = (
    "head_dim > 128 (256 in Gemma 2/3): every V/O map is block-diagonal with 128 x 128 blocks\n"
    "  times a random permutation of the head's dimensions (each block reads dimensions from\n"
    "  all over the head), at the cost per weight of a 128-dimensional head. Measured: a 50/50\n"
    "  merge with the base through the protected V/O tensors alone moves tiny head_dim-256\n"
    "  Gemma 3 logits by 0.86-1.04 (all), 0.87-1.02 (mergelock), 0.87-0.94 (params) in units\n"
    "  of their spread (3 seeds), dense maps: 0.80-1.01; unprotected: 0.11-0.13."
)
_MOE = (
    "every expert's (and a shared expert's) units permuted (all: and sign-flipped) each on\n"
    "  its own (params: far from the same expert of the base); routers and the shared expert's\n"
    "  gate read the residual stream and are kept bit for bit."
)
# What differs per model type, printed by ``mergeshield defenses`` (issue 16).
FAMILY_NOTES: dict[str, str] = {
    "t5": (
        "all permutes self-attention heads with one permutation per stack (each head adds its\n"
        "  column of a relative position bias stored in layer 0 and shared by every layer of\n"
        "  the stack; the table's columns move with the heads), cross-attention heads per\n"
        "  layer; QK/VO maps and MLP units as elsewhere. Measured: a 50/50 merge with the base\n"
        "  moves tiny T5 fine-tunes' logits by, in units of their spread (3 seeds), 1.1-1.3\n"
        "  (all), 1.1-1.4 (mergelock), 1.2-1.5 (params), 0.27-0.48 (mergebarrier, QK only);\n"
        "  unprotected: 0.095-0.17."
    ),
    "qwen3": _NORMED_QK + _MEASURED_QWEN3,
    "gemma3_text": _NORMED_QK + _MEASURED_GEMMA3 + "\n  " + _WIDE_HEADS,
    "gemma2": (
        "as Llama: sandwich norms, scaled embeddings and final soft-capping act on the residual\n"
        "  stream, attention soft-capping on scores that every QK map keeps.\n  " + _WIDE_HEADS
    ),
    "phi3": (
        "as Llama, through row views of the fused qkv_proj (q | k | v by head counts) and\n"
        "  gate_up_proj; the MLP is not streamed. Partial rotary (Phi-4-mini): the rotary maps\n"
        "  act on the rotated pairs (j, j + rotary_dim/2), the free dimensions take maps of\n"
        "  their own (paired among themselves), never mixed with the rotated ones."
    ),
    "mixtral": _MOE,
    "qwen2_moe": _MOE,
    "qwen3_moe": _MOE + "\n  Attention: as qwen3.",
}


register(
    Defense(
        "params",
        "PaRaMS: MLP permutation far from the base + per-head attention scaling",
        params,
        uses_base=True,
    )
)
register(
    Defense(
        "mergelock",
        "MergeLock: independent random invertible QK and VO matrices per head",
        mergelock,
    )
)
register(
    Defense(
        "mergebarrier",
        "MergeBarrier: orthogonal flip of each head's top QK eigen-directions",
        mergebarrier,
    )
)
register(
    Defense(
        "all",
        "all exact transforms: heads, MLP units, QK, VO",
        all_transforms,
        uses_base=True,
    )
)
