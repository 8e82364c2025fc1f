"""Detection: does a suspect checkpoint contain the owner's release?  (issue 18)

Notation, per weight matrix ``t`` (every 2-D tensor of the blocks, and the 2-D tensors outside
them such as the embeddings), all in float32: ``b`` the public base, ``o = theta_original - b``
the owner's task vector, ``x`` the suspect in the base's layout (blocks matched by index and
role, other tensors by name up to a prefix such as ``bert.``).

**Views** (frames in which the suspect may carry the release):

- ``raw``: ``s = x - b`` (a merge of the unprotected release, or of an aligned protected one);
- ``aligned``: ``s = A(x) - b`` with ``A`` an alignment attack of :mod:`mergeshield.attacks`
  (default ``aga``): undoes a free-rider's permutation or re-basing of the suspect.  Only the
  blocks with a matrix farther than ``ALIGN_FROM = 0.2`` times its base norm from the base
  are aligned; the others are already in the base's frame and keep ``s = x - b`` (measured:
  aligning them changed ``Z`` by under 1% on the text and ViT families, and it was 40% of the
  run time);
- ``key`` (with ``--key``): a merge of the *protected* release as published, ``x - b = c (T(b)
  - b) + c T(o) + ...`` with ``T`` the owner's own transform: ``s`` is ``x - b`` without its
  least-squares multiple of the frame change ``T(b) - b`` (per matrix), the reference is the
  release's own task vector in that frame, ``T(o) = T(theta_original) - T(b)``.  (The frame
  change itself is not compared: it is a base-sized matrix, and every model's weight decay
  and its correlation with the base reach it.)  Per block (:func:`key_task`): a block that
  the frame change does not weigh (``<x - b, f> / |f|^2 < KEY_FROM`` on average over its
  matrices: every fine-tune and merge of fine-tunes, and a release aligned back onto the
  base) takes the ``aligned`` view's ``s`` and references, so that for a model without the
  release the key view is the same test as the aligned one and counts once; where, without
  the frame change, a block is still far from the base, the release was merged in a frame of its
  own or entry by entry (a free-rider's re-basin permuted its heads and units and left the
  key's head maps and unit signs; TIES kept some of its entries whole and averaged others):
  the owner's frame is also permuted onto the suspect's (:func:`onto_suspect`) and the frame
  change is also removed entry by entry (:func:`per_entry_off`), and what explains the
  suspect best is compared.  With the key, a block in a frame of the key's is compared there
  and not also aligned onto the base.  Measured on SmolLM2 (the study's ``all``-protected
  release, session 17): re-basin-aligned then merged by task arithmetic at 0.6, key ``Z`` 198
  -> 226 000; by all-task TIES -1 -> 25 400; all-task TIES of the release as published 32 ->
  55 800.

**Statistic.**  A same-task fine-tune (other seed, other data) shares the task's direction
with ``o`` but not the release's own noise.  The shared direction is concentrated in a few
singular directions of each matrix (task vectors are nearly low-rank), the release-specific
part is spread over all of them.  Weight decay moves every fine-tune along ``-b``.  So the
reference is the *residual* ``r = P_b (o - [o]_k)``, where ``[o]_k`` is the best rank-``k``
approximation of ``o`` (``k = min(RANK, min(shape) // 2)``) and ``P_b`` removes the component
along ``b`` (the key view uses ``T(o)`` for ``o`` and removes ``T(b)`` and ``b``).
Measured on the text family (rank 0 / 8 / 32, signed sums ``sum z_t / sqrt(T)``): same-task
fine-tunes 650 / 104 / 39-45, merges of the release 1280-1810 / 820-1200 / 630-910; on the
small ViT (width 64) a cap of ``min(shape) // 8`` left same-task fine-tunes at 9-13 against
all-task merges at 18-27, ``// 2`` at 0.2-1.7 against 4.8-10.7.  Per matrix,

    z_t = <s, r> / sqrt(sum_i (s_i r_i)^2)

a self-normalised sum of the products ``s_i r_i``: under a null whose products are symmetric
about zero and independent (``s`` unrelated to the release's residual), ``z_t`` is
approximately N(0, 1) whatever the scale and the tails of ``s``.  It is invariant to scaling
``s`` (task-arithmetic and SLERP coefficients), weights each coordinate by ``|r|`` (where
``o`` is large: what TIES, breadcrumbs and DELLA keep), and random dropping (DARE), sign
election and foreign task vectors only add symmetric noise to it.  The per-view score is

    Z_v = (sum_t z_t^2 - T) / sqrt(2 T)

(``sum z_t^2`` is chi-square with ``T`` degrees of freedom under that null, so ``Z_v`` has mean
0 and variance 1), and the suspect's statistic is ``Z = max_v Z_v``.  The squares make it
sign-agnostic: a merge may carry the release with a negative weight on some matrices
(model_stock's per-tensor ratio between nearly orthogonal task vectors does: weights -0.43
to 0.13 on the small ViT, ``z_t`` of -9 to +7 following their signs), and a signed sum
``sum z_t / sqrt(T)`` then cancels (0.33 for that merge, missed in session 7) where the
squares do not (54).  The signed sum is kept in the report (``Scores.signed``).

**Calibration** (the false-positive probability ``p``):

- with null models (``--null``: models known not to contain the release, same-task
  fine-tunes included), each gets the same ``Z``; with their mean ``m`` and standard deviation
  ``d`` over ``n >= 2`` models, ``p`` is the one-sided prediction p-value of a new null model,
  ``p_null = P(t_{n-1} > (Z - m) / (d sqrt(1 + 1/n)))`` (Gaussian nulls, unknown mean and
  variance), and ``p = max(p_null, p_flip)``: the suspect must also beat the sign-flip null
  below, which holds for any model unrelated to the release (on a small ViT the calibration
  fine-tunes' statistics clustered tightly at -2.8 to -1.8, so that DARE merges without the
  release, at -0.53 and -0.08, fell above the t threshold alone, -0.55);
- without them, the sign-flip null above, ``p = min(1, V P(chi2_T > sum z_t^2))``
  (Bonferroni over the ``V`` distinct views: a view equal to another on every tensor, as the
  ``aligned`` view of a model in the base's frame is to ``raw``, is the same test and
  counts once, :func:`distinct_views`).  Real fine-tunes of *other* tasks and same-task
  fine-tunes still correlate with the residual (measured on the text family: signed sums of
  10-45 where a merge of the release gets hundreds), so this null alone would call them
  positives.  Without null models the verdict
  therefore also needs the effect size ``E = sqrt(max(Z, 0) / Z_self) >= E_MIN``, where
  ``Z_self`` is the original's own ``raw`` score (the square root keeps ``E`` on the scale of
  ``z``, like the signed sum's ratio) (``E`` is 1 for the release itself and near 0 for models that
  share only the task; see BENCHMARKS.md, "Detection").  A same-task fine-tune with the
  release's own recipe can still reach ``E`` of 0.12-0.14 (SmolLM2), so the verdict also
  needs the **shape** ``E / E_shared >= SHAPE_MIN``: ``E_shared`` is the same effect size
  against the release's shared part ``P_b [o]_k`` (``Z_shared`` of the suspect's best view
  over the original's).  A merge of the release carries its shared part and its residual in
  the original's proportion, diluted by foreign task vectors (shape near 1, lower where TIES
  trims the small residual entries); a same-task fine-tune carries the shared part and little
  of the residual.  Measured (BENCHMARKS.md, "Detection, session 14"): same-task fine-tunes
  0.10-0.12 (MiniLM seeds 1-5), 0.18-0.24 (SmolLM2 seeds 1-7), 0.23-0.27 (the tests'
  high-rank task); merges of the release 0.74-1 (MiniLM), 0.81-0.99 (SmolLM2), 0.46 and up
  on the small ViT (all-task TIES the lowest).  ``SHAPE_MIN = 0.35`` lies between, set on
  these models (SmolLM2 seeds 5-7 checked after it was set).  Its blind spot: a soup of the
  release at a small weight with a same-task fine-tune also has a low shape; same-task
  ``--null`` models find it.

The release is reported found when ``p <= alpha`` (and, without null models, ``E >= E_MIN``
and ``E / E_shared >= SHAPE_MIN``: :func:`flip_verdict`).
Bad input is refused with one line: another architecture or size than the base, or a model
not derived from it (its MLP weights, which every alignment maps exactly, at least
``DERIVED = 1.2`` times the base's norm away from the base's in every view: an independent
model of the same scale is about ``sqrt 2 = 1.41`` away, a fine-tune about 0.01-0.1, and a TIES
merge of the protected release as published, half base and half ``T(base)``, measured 1.01).

Everything is read one block (and one outside tensor) at a time from memory-mapped
safetensors, suspect and null models in the same pass, so memory holds one block of each
model.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mergeshield.checkpoint import Checkpoint, check_same_architecture, open_checkpoint
from mergeshield.errors import MergeShieldError
from mergeshield.protect import load_key_for
from mergeshield.shards import reader

if TYPE_CHECKING:
    import torch

    from mergeshield.architectures.spec import BlockSpec
    from mergeshield.symmetries.transform import BlockTransform

    Tensors = dict[str, torch.Tensor]

POWER_STEPS = 1
RANK_FRACTION = 2  # and k <= min(shape) / RANK_FRACTION (small matrices; measured on ViT)
RANK = 32  # singular directions of the owner's task vector treated as the shared task direction
ALPHA = 0.01
E_MIN = 0.1  # effect size a suspect needs without null models (see the module docstring)
SHAPE_MIN = 0.35  # shape a suspect needs without null models (see the module docstring)
ALIGN_FROM = 0.2  # relative distance of a block matrix from the base above which it is aligned
DERIVED = 1.2  # relative MLP distance from the base above which a model is not derived from it


# --- the statistic ---------------------------------------------------------------------------


def residual(o: torch.Tensor, b: torch.Tensor, rank: int = RANK, seed: int = 0) -> torch.Tensor:
    """``P_b (o - [o]_k)``: the task vector without its top-``k`` singular directions and
    without its component along the base tensor ``b`` (``P_b x = x - <x, b> b / <b, b>``).

    Weight decay moves every fine-tune along ``-b``, the same direction for all of them, so
    that component says nothing about the release.  ``k = min(rank, min(shape) // RANK_FRACTION)``;
    ``[o]_k`` by :func:`_low_rank` (seeded: deterministic).
    """
    return references(o, b, rank, seed)[0]


def references(
    o: torch.Tensor,
    b: torch.Tensor,
    rank: int = RANK,
    seed: int = 0,
    also: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P_b (o - [o]_k), P_b [o]_k)``: the release's residual (:func:`residual`) and its
    shared part, the top-``k`` directions that a same-task fine-tune shares (zero when
    ``k = 0``).  ``also``: ``P`` removes the span of ``b`` and ``also`` (the key view: ``b``
    is ``T(b)``, ``also`` the base itself, the direction of every fine-tune's weight decay).
    A tensor the fine-tune left at the base's (``o = 0``: frozen layers, such as the lower
    half of the LLM family's experts) returns both zero without the work."""
    if not bool(o.any()):
        return o, o
    k = min(rank, min(o.shape) // RANK_FRACTION) if o.dim() == 2 else 0
    top = _low_rank(o, k, seed) if k > 0 else 0 * o
    basis = unit_basis(b) if also is None else unit_basis(b, also)
    return off_span(o - top, basis), off_span(top, basis)


def unit_basis(*directions: torch.Tensor) -> list[torch.Tensor]:
    """An orthonormal basis of the span of ``directions`` (Gram-Schmidt, in order); a
    direction within ``1e-6`` of its own norm of the span before it, or zero, adds nothing."""
    basis: list[torch.Tensor] = []
    for d in directions:
        size = float(d.norm())
        d = off_span(d, basis)
        norm = float(d.norm())
        if norm > 1e-6 * size and norm > 0:
            basis.append(d / norm)
    return basis


def off_span(x: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    """``x`` without its components along the orthonormal ``basis``: ``x - sum <x, u> u``."""
    for u in basis:
        x = x - float((x * u).sum()) * u
    return x


def _low_rank(o: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of ``o`` (randomized subspace iteration in float32
    with ``2 rank`` columns and ``POWER_STEPS`` power steps: the split between shared and
    release-specific directions needs no more precision; on the text family one power step
    instead of two moved the statistics by under 3%, keeping their order)."""
    import torch

    a = o.float()
    gen = torch.Generator().manual_seed(seed)
    y = a @ torch.randn(a.shape[1], 2 * rank, generator=gen)
    for _ in range(POWER_STEPS):
        y = a @ (a.T @ torch.linalg.qr(y)[0])
    q = torch.linalg.qr(y)[0]
    u, s, vt = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (((q @ u[:, :rank]) * s[:rank]) @ vt[:rank]).to(o.dtype)


# --- the key view ----------------------------------------------------------------------------

LEVELS = tuple(1 / k for k in range(1, 9))  # TIES's disjoint mean over k agreeing models
KEY_FROM = 0.05  # least-squares weight of the frame change from which a block is in the key's frame
SWITCH = 4  # key_task's per-entry fit replaces the least-squares one only if 4x closer
KAPPA = 8  # a frame change entry is fitted on its own where it is KAPPA times the release's rms


class KeyFrame:
    """The owner's frame in one block, float32: ``tb32 = T(b)``, ``own = T(o) = T(theta_original)
    - T(b)`` (every tensor of the block, subtracted in float64 as transformed), the frame
    change ``f = T(b) - b``, its squared norm and unit direction per matrix (``change``,
    ``change_sq``, ``shift``), ``floor`` (where :func:`per_entry_off` fits ``f`` entry by
    entry), and the key view's references (:func:`references` of ``T(o)`` off ``T(b)`` and
    ``b``), computed on first use."""

    def __init__(
        self,
        tb32: Tensors,
        own: Tensors,
        b: Tensors,
        names: list[str],
        rank: int,
        floor: dict[str, float],
    ):
        self.tb32, self.own, self.b, self.names, self.rank = tb32, own, b, names, rank
        self.floor = floor
        self.change = {n: tb32[n] - b[n] for n in names}
        self.change_sq = {n: float(self.change[n].square().sum()) for n in names}
        self.shift = {n: unit_basis(self.change[n]) for n in names}
        self._refs: dict | None = None

    @classmethod
    def of_key(
        cls,
        o: Tensors,
        b: Tensors,
        names: list[str],
        rank: int,
        t: BlockTransform,
        block: BlockSpec,
    ) -> KeyFrame:
        """The frame of the key's block transform ``t``: ``T`` applied in float64 to the
        release's block ``o`` and the base's ``b``."""
        from mergeshield.symmetries.transform import apply_transform

        p = {n: v.double() for n, v in o.items()}
        tb = {n: v.double() for n, v in b.items()}
        apply_transform(p, block, t)
        apply_transform(tb, block, t)
        own = {n: p[n] - tb[n] for n in p}  # T(o), exact zeros kept
        floor = {n: KAPPA * float(own[n].norm()) / own[n].numel() ** 0.5 for n in names}
        own32 = {n: v.float() for n, v in own.items()}
        return cls({n: v.float() for n, v in tb.items()}, own32, b, names, rank, floor)

    @property
    def refs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self._refs is None:
            self._refs = {
                n: references(self.own[n], self.tb32[n], self.rank, also=self.b[n])
                for n in self.names
            }
        return self._refs

    def permuted(self, transform: BlockTransform, block: BlockSpec) -> KeyFrame:
        """The frame with heads and units permuted by ``transform`` (a permutation commutes
        with the subtraction, so ``own`` and ``tb32`` are permuted as they are; ``floor``, a
        norm, stays)."""
        from mergeshield.symmetries.transform import apply_transform

        tb32 = {n: v.clone() for n, v in self.tb32.items()}
        own = {n: v.clone() for n, v in self.own.items()}
        apply_transform(tb32, block, transform)
        apply_transform(own, block, transform)
        return KeyFrame(tb32, own, self.b, self.names, self.rank, self.floor)


def per_entry_off(s: torch.Tensor, f: torch.Tensor, floor: float) -> torch.Tensor:
    """``s = x - b`` without the frame change ``f`` entry by entry: ``s - w * f`` with ``w_i``
    the value of ``{0} u LEVELS`` nearest ``s_i / f_i`` (TIES keeps an entry of the release
    whole, drops it, or averages it with ``k - 1`` agreeing models: ``w = 1 / k``).  Only
    where ``|f_i| >= floor``: there the release's own entry (or a partner's) moves the ratio
    by under ``1 / KAPPA`` of ``w``, too little to pick another level; elsewhere the nearest
    level could be the one that cancels the release, so ``s_i`` is kept whole.  An entry
    whose nearest level is 0 (TIES dropped the release's value there) holds only the other
    models' entries and is left out (set to 0: no term of ``z``)."""
    import torch

    big = f.abs() >= floor
    levels = torch.tensor(sorted((0.0, *LEVELS)), dtype=s.dtype)
    nearest = torch.bucketize(s / torch.where(big, f, 1.0), (levels[1:] + levels[:-1]) / 2)
    w = torch.where(big, levels[nearest], -1.0)
    return torch.where(w == 0, 0.0, s - w.clamp_min(0.0) * f)


def onto_suspect(block: BlockSpec, x: Tensors, b: Tensors, frame: KeyFrame) -> KeyFrame:
    """The owner's frame permuted onto the suspect's: a free-rider's re-basin of the release
    permutes its heads and MLP units but leaves the key's head maps, unit scales and signs.
    Heads by the assignment maximizing ``sum_i <x_i - b_i, T(b)_perm(i)>`` (the frame change
    each head brings; a T5 stack's shared head order is left), and MLP units by the
    Hungarian algorithm on the cosine of ``T(b)``'s units with the suspect's (all of a gated
    unit's rows: on SmolLM2's re-basin TIES merge the gate rows alone matched 106 of 23 040
    units otherwise and left key ``Z`` at 15 102 instead of 25 431)."""
    from mergeshield.attacks.matching import (
        inner_cost,
        match_heads,
        match_units_cosine,
        read_heads,
    )
    from mergeshield.symmetries.transform import BlockTransform

    # float32: the assignment needs no more; heads and units are matched apart (a head
    # permutation leaves the MLP) and permuted together
    perms = [match_units_cosine(mlp, frame.tb32, x) for mlp in block.mlps()]
    t = BlockTransform.of_units(perms=perms)
    att = block.attention
    if att.shared_heads is None:
        moved = read_heads({n: v - b[n] for n, v in x.items()}, att)
        t.kv_perm, t.q_perm = match_heads(att, moved, read_heads(frame.tb32, att), inner_cost)
    return frame.permuted(t, block)


def key_task(
    block: BlockSpec, x: Tensors, b: Tensors, owner: KeyFrame, base_norm: dict[str, float]
) -> tuple[Tensors, KeyFrame] | None:
    """The key view's ``s`` of one block and the frame it is compared in, or None where the
    suspect is in no frame of the key's (the key view then takes the ``aligned`` view's block,
    so that for a model without the release both views are one test).

    A frame holds the suspect when ``x - b`` weighs its frame change ``f`` by ``lam = <x - b,
    f> / |f|^2``, averaged over the block's matrices that ``f`` moves, ``>= KEY_FROM`` (a
    merge of the release carries ``c f``, ``c`` its weight or the share of entries TIES
    kept; a fine-tune's weight decay and a foreign task vector give about 0; another owner's
    release about ``c / 2``, as every frame change holds ``-b``, but its residual is not
    ``T(o)``'s).  The frames: the owner's, and where that leaves some matrix of ``x - b``
    ``ALIGN_FROM`` times its base norm away after its least-squares multiple of ``f`` is
    removed (the release merged in a frame of its own: re-basin permuted it), the owner's
    permuted onto the suspect's (:func:`onto_suspect`).  Of the frames that hold the suspect,
    the one whose least-squares fit leaves the smaller residual is kept, and its frame change
    is removed entry by entry instead (:func:`per_entry_off`: TIES) where that leaves under
    ``1 / SWITCH`` of the least-squares residual's squared norm (choices made on norms that
    the frame change dominates, not on the release's residual; measured on the small ViT,
    whose task vectors are large against the frame change, a per-entry fit chosen whenever
    smaller lost the TIES merge as published)."""
    names = owner.names
    moved = {n: x[n] - b[n] for n in names}

    def holds(frame: KeyFrame) -> bool:
        changed = [n for n in names if frame.change_sq[n] > 0]
        weights = [float((moved[n] * frame.change[n]).sum()) / frame.change_sq[n] for n in changed]
        return bool(changed) and sum(weights) >= KEY_FROM * len(changed)

    def size(t: Tensors) -> float:
        return sum(float(v.square().sum()) for v in t.values())

    s = {n: off_span(moved[n], owner.shift[n]) for n in names}
    if not _off_frame(s, base_norm):
        return (s, owner) if holds(owner) else None
    frames = [f for f in (owner, onto_suspect(block, x, b, owner)) if holds(f)]
    if not frames:
        return None
    fits = [({n: off_span(moved[n], f.shift[n]) for n in names}, f) for f in frames]
    s, frame = min(fits, key=lambda fit: size(fit[0]))  # the frame: least squares decides
    entry = {n: per_entry_off(moved[n], frame.change[n], frame.floor[n]) for n in names}
    return (entry, frame) if size(entry) * SWITCH < size(s) else (s, frame)


def tensor_z(s: torch.Tensor, r: torch.Tensor) -> float:
    """``z = <s, r> / sqrt(sum (s_i r_i)^2)`` (0 when every product is 0)."""
    import torch

    prod = (s * r).reshape(-1)
    den = math.sqrt(float(torch.dot(prod, prod)))
    return float(prod.sum()) / den if den > 0 else 0.0


def view_score(zs: list[float]) -> float:
    """``Z_v = (sum z_t^2 - T) / sqrt(2 T)``: standardized chi-square with ``T`` degrees of
    freedom under the sign-flip null."""
    t = len(zs)
    return (sum(z * z for z in zs) - t) / math.sqrt(2 * t)


def flip_p(z: float, tensors: int, views: int) -> float:
    """Sign-flip null: ``min(1, views P(chi2_T > T + z sqrt(2 T)))``, ``T = tensors``."""
    from scipy.stats import chi2

    return min(1.0, views * float(chi2.sf(tensors + z * math.sqrt(2 * tensors), tensors)))


def distinct_views(score: Scores) -> int:
    """How many of the score's views differ on some tensor's ``z`` (the Bonferroni count: the
    maximum of identical statistics is one statistic)."""
    return len({tuple(score.z[v].values()) for v in score.Z})


def _prediction(nulls: list[float]) -> tuple[float, float, int]:
    """``(m, d sqrt(1 + 1/n), n - 1)``: location, scale and degrees of freedom of the t
    prediction distribution of a new null model's statistic."""
    n = len(nulls)
    mean, sd = float(np.mean(nulls)), float(np.std(nulls, ddof=1))
    return mean, max(sd, 1e-12) * math.sqrt(1 + 1 / n), n - 1


def null_p(z: float, nulls: list[float]) -> float | None:
    """One-sided t prediction p-value of ``z`` against the null models' statistics (n >= 2)."""
    if len(nulls) < 2:
        return None
    from scipy.stats import t as student_t

    mean, scale, df = _prediction(nulls)
    return float(student_t.sf((z - mean) / scale, df=df))


def threshold(
    nulls: list[float], tensors: int, views: int, self_statistic: float, alpha: float
) -> float:
    """The statistic a suspect needs to be reported found (the dashed line of the plot)."""
    from scipy.stats import chi2
    from scipy.stats import t as student_t

    flip = (float(chi2.isf(alpha / views, tensors)) - tensors) / math.sqrt(2 * tensors)
    if len(nulls) >= 2:
        mean, scale, df = _prediction(nulls)
        return max(flip, mean + scale * float(student_t.isf(alpha, df)))
    return max(flip, E_MIN**2 * self_statistic)


def flip_verdict(p_flip: float, effect: float, shape: float, alpha: float) -> bool:
    """The verdict without null models: ``p_flip <= alpha``, ``effect >= E_MIN`` and
    ``shape >= SHAPE_MIN`` (the module docstring says why each)."""
    return p_flip <= alpha and effect >= E_MIN and shape >= SHAPE_MIN


# --- results ---------------------------------------------------------------------------------


@dataclass
class Scores:
    """One model's per-view statistics: ``z[view][tensor]``, ``distance[view]`` (relative
    distance of its MLP weights to the view's base frame: the one part every alignment maps
    exactly, so an unrelated model cannot be aligned close to the base), ``Z[view]``,
    ``statistic = max Z`` and, for the report, the signed sums ``signed[view]``;
    ``z_shared`` and ``Z_shared``: the same against the release's shared part (the shape)."""

    path: str
    z: dict[str, dict[str, float]] = field(default_factory=dict)
    z_shared: dict[str, dict[str, float]] = field(default_factory=dict)
    Z_shared: dict[str, float] = field(default_factory=dict)
    distance: dict[str, float] = field(default_factory=dict)
    Z: dict[str, float] = field(default_factory=dict)
    statistic: float = float("nan")
    signed: dict[str, float] = field(default_factory=dict)


@dataclass
class Detection:
    """The verdict: ``found`` when ``p_value <= alpha``, i.e. when ``statistic >=
    threshold``, and without null models also ``effect >= E_MIN`` and ``shape >= SHAPE_MIN``."""

    suspect: str
    original: str
    base: str
    found: bool
    statistic: float
    p_value: float
    p_flip: float
    p_null: float | None
    effect: float
    shape: float
    threshold: float
    alpha: float
    views: dict[str, float]
    null_statistics: list[float]
    rank: int
    attack: str | None
    seconds: float
    scores: Scores = field(repr=False)
    null_scores: list[Scores] = field(default_factory=list, repr=False)

    @property
    def found_without_nulls(self) -> bool:
        """The verdict the sign-flip null gives (:func:`flip_verdict`), null models or not."""
        return flip_verdict(self.p_flip, self.effect, self.shape, self.alpha)

    def line(self) -> str:
        """The one-line verdict."""
        verdict = "FOUND" if self.found else "not found"
        n = len(self.null_statistics)
        if self.p_null is not None:
            null = f"{n} null models"
        else:
            null = f"sign-flip null, effect >= {E_MIN:g} and shape >= {SHAPE_MIN:g} required"
        best = max(self.views, key=lambda v: self.views[v])
        return (
            f"release {verdict} in {self.suspect}: statistic {self.statistic:.1f} ({best} view, "
            f"effect {self.effect:.2f}, shape {self.shape:.2f}), false-positive probability "
            f"{self.p_value:.2e} "
            f"({null}; alpha {self.alpha:g})"
        )

    def to_json(self) -> dict:
        data = asdict(self)
        data["line"] = self.line()
        return data


# --- reading the models ----------------------------------------------------------------------


def _open(path: str | os.PathLike, role: str) -> Checkpoint:
    try:
        return open_checkpoint(path)
    except MergeShieldError as err:
        raise MergeShieldError(f"{role}: {err}") from None


def _check_architecture(base: Checkpoint, model: Checkpoint, role: str) -> None:
    """Same blocks and block shapes as the base (a model of another size is refused)."""
    if model.spec.model_type != base.spec.model_type:
        raise MergeShieldError(
            f"{role} {model.path} is a {model.spec.model_type} model, base {base.path} is a "
            f"{base.spec.model_type} model: not the same architecture"
        )
    try:
        check_same_architecture(base, model)
    except MergeShieldError as err:
        raise MergeShieldError(f"{role}: {err}") from None


def _outside_names(base: Checkpoint, model: Checkpoint) -> dict[str, str]:
    """Base name -> the model's name for the 2-D float tensors outside the blocks."""
    from mergeshield.arrays import FLOAT_CODES
    from mergeshield.merging.backbone import backbone_prefix

    prefix = backbone_prefix(list(model.shapes), list(base.shapes))
    names = {}
    for name in base.spec.residual:
        other = prefix + name
        if (
            len(base.shapes[name]) == 2
            and base.codes[name] in FLOAT_CODES
            and model.shapes.get(other) == base.shapes[name]
            and model.codes[other] in FLOAT_CODES
        ):
            names[name] = other
    return names


def _block32(rd, block, like=None) -> dict[str, torch.Tensor]:
    """A block's tensors as float32: the statistic and the alignment need no more precision
    (measured on the text family: the same ``Z`` to 0.01 as in float64, at half the time)."""
    return {n: v.float() for n, v in rd.block(block, like=like, wide=False).items()}


def _off_frame(task: dict[str, torch.Tensor], base_norm: dict[str, float]) -> bool:
    """Does the block need aligning: is some matrix ``||x - b|| > ALIGN_FROM ||b||`` away
    from the base's?  (A fine-tune or a merge of fine-tunes stays at 0.01-0.1; a change of
    frame, permuted units or transformed heads, moves a whole matrix by about 1-1.4, or c
    times that in a merge with coefficient c.)"""
    return any(float(t.norm()) > ALIGN_FROM * base_norm[n] for n, t in task.items())


def _matrices(block_names: tuple[str, ...], tensors: dict) -> list[str]:
    return [n for n in block_names if tensors[n].dim() == 2]


def _score_models(
    base: Checkpoint,
    original: Checkpoint,
    models: list[Checkpoint],
    *,
    transforms: dict | None,
    attack: str | None,
    rank: int,
    raw_only: tuple[int, ...] = (),
) -> list[Scores]:
    """Stream every block and outside matrix once; ``z`` of each model in each view (only the
    ``raw`` view for the models whose index is in ``raw_only``)."""
    from mergeshield.attacks import get_attack
    from mergeshield.symmetries.transform import BlockTransform

    align = get_attack(attack) if attack else None
    views = ["raw"] + (["aligned"] if align else []) + (["key"] if transforms is not None else [])
    model_views = [["raw"] if m in raw_only else views for m in range(len(models))]
    scores = [
        Scores(path=str(c.path), z={v: {} for v in vs}, z_shared={v: {} for v in vs})
        for c, vs in zip(models, model_views, strict=True)
    ]
    sq = [{v: 0.0 for v in vs} for vs in model_views]  # sum ||s||^2 per view
    base_sq = 0.0
    outside = [_outside_names(base, m) for m in models]
    orig_outside = _outside_names(base, original)

    with ExitStack() as stack:
        base_r = stack.enter_context(reader(base))
        orig_r = stack.enter_context(reader(original))
        readers = [stack.enter_context(reader(m)) for m in models]
        for i, bspec in enumerate(base.spec.blocks):
            b = _block32(base_r, bspec)
            o = _block32(orig_r, original.spec.blocks[i], like=bspec)
            names = _matrices(bspec.tensor_names(), b)
            if all(bool((o[n] == b[n]).all()) for n in names):
                # the release left the block at the base's: every z is 0 in every view, so
                # nothing to align or match, and its MLP is no evidence for _check_derived
                for score, vs in zip(scores, model_views, strict=True):
                    for v in vs:
                        score.z[v].update(dict.fromkeys(names, 0.0))
                        score.z_shared[v].update(dict.fromkeys(names, 0.0))
                continue
            # every MLP of the block (MoE experts included; none in a T5 cross-attention block)
            mlp = list(dict.fromkeys(s.weight for m in bspec.mlps() for s in m.slots().values()))
            # (residual, shared part) of the release, per matrix and view
            refs = {"raw": {n: references(o[n] - b[n], b[n], rank) for n in names}}
            refs["aligned"] = refs["raw"]
            if transforms is not None:
                t = transforms.get(i, BlockTransform())
                owner = KeyFrame.of_key(o, b, names, rank, t, bspec)
            base_sq += sum(float(b[n].square().sum()) for n in mlp)
            base_norm = {n: float(b[n].norm()) for n in names}
            for m, (model, rd) in enumerate(zip(models, readers, strict=True)):
                x = _block32(rd, model.spec.blocks[i], like=bspec)
                task = {"raw": {n: x[n] - b[n] for n in names}}
                keyed = key_task(bspec, x, b, owner, base_norm) if "key" in model_views[m] else None
                # a block in a frame of the key's is compared there, not also aligned onto the base
                off_base = keyed is None and _off_frame(task["raw"], base_norm)
                if "aligned" in model_views[m] and off_base:
                    a = align.align_block(bspec, {n: v.clone() for n, v in x.items()}, b)
                    task["aligned"] = {n: a[n] - b[n] for n in names}
                elif "aligned" in model_views[m]:
                    task["aligned"] = task["raw"]  # in the base's frame: nothing to align
                # a view that reuses another's block: same tensors, same references, same z
                same = (
                    {"aligned": "raw"}
                    if "aligned" in task and task["aligned"] is task["raw"]
                    else {}
                )
                if "key" in model_views[m]:
                    if keyed is None:  # not in the owner's frame
                        same["key"] = "aligned" if "aligned" in task else "raw"
                        task["key"] = task[same["key"]]
                    else:
                        task["key"], key_frame = keyed
                        refs["key"] = key_frame.refs
                z, z_shared = scores[m].z, scores[m].z_shared
                for v in model_views[m]:
                    if v in same:
                        z[v].update({n: z[same[v]][n] for n in names})
                        z_shared[v].update({n: z_shared[same[v]][n] for n in names})
                    else:
                        for n in names:
                            z[v][n] = tensor_z(task[v][n], refs[v][n][0])
                            z_shared[v][n] = tensor_z(task[v][n], refs[v][n][1])
                    for n in mlp:  # the key view: distance to the frame it compares in
                        keyed_here = v == "key" and v not in same
                        d = x[n] - key_frame.tb32[n] if keyed_here else task[v][n]
                        sq[m][v] += float(d.square().sum())
        for name, oname in orig_outside.items():
            b = base_r.get(name).float()
            r, shared = references(orig_r.get(oname).float() - b, b, rank)
            for m, rd in enumerate(readers):
                if name not in outside[m]:
                    continue
                s = rd.get(outside[m][name]).float() - b
                z, z_shared = tensor_z(s, r), tensor_z(s, shared)
                for v in model_views[m]:
                    scores[m].z[v][name] = z
                    scores[m].z_shared[v][name] = z_shared
    for m, score in enumerate(scores):
        for v in model_views[m]:
            zs = list(score.z[v].values())
            score.Z[v] = view_score(zs)
            score.Z_shared[v] = view_score(list(score.z_shared[v].values()))
            score.signed[v] = sum(zs) / math.sqrt(len(zs))
            score.distance[v] = math.sqrt(sq[m][v] / max(base_sq, 1e-300))
        score.statistic = max(score.Z.values())
    return scores


def _check_derived(score: Scores, role: str, base: Path) -> None:
    nearest = min(score.distance.values())
    if nearest >= DERIVED:
        raise MergeShieldError(
            f"{role} {score.path} is not derived from base {base}: its MLP weights are "
            f"{nearest:.2f}x the base's norm away from it, even aligned (a fine-tune or merge of "
            f"the base stays well below {DERIVED:g}x)"
        )


def detect(
    suspect: str | os.PathLike,
    original: str | os.PathLike,
    base: str | os.PathLike,
    *,
    key: str | os.PathLike | None = None,
    null: list[str | os.PathLike] | tuple = (),
    alpha: float = ALPHA,
    rank: int = RANK,
    attack: str | None = "aga",
    out: str | os.PathLike | None = None,
) -> Detection:
    """Is the owner's release (``original``, fine-tuned from ``base``) inside ``suspect``?

    ``key``: the owner's key file (adds the ``key`` view); ``null``: models that do not contain
    the release (calibration, see the module docstring); ``attack``: the alignment of the
    ``aligned`` view (None: no alignment); ``out``: a folder for ``report.json`` and
    ``detect.png``.  Raises :class:`MergeShieldError` with a one-line message on bad input.
    """
    (result,) = detect_all(
        [suspect], original, base, key=key, null=null, alpha=alpha, rank=rank, attack=attack
    )
    if out is not None:
        write_report(result, Path(out))
    return result


def detect_all(
    suspects: list[str | os.PathLike],
    original: str | os.PathLike,
    base: str | os.PathLike,
    *,
    key: str | os.PathLike | None = None,
    null: list[str | os.PathLike] | tuple = (),
    alpha: float = ALPHA,
    rank: int = RANK,
    attack: str | None = "aga",
) -> list[Detection]:
    """:func:`detect` for several suspects in one streaming pass (the references and the null
    models are computed once); ``seconds`` of each result is the whole pass."""
    start = time.perf_counter()
    if not 0 < alpha < 1:
        raise MergeShieldError(f"alpha must be in (0, 1), not {alpha}")
    base_ck = _open(base, "base")
    orig_ck = _open(original, "original")
    suspect_cks = [_open(s, "suspect") for s in suspects]
    null_cks = [_open(n, f"null model {n}") for n in null]
    _check_architecture(base_ck, orig_ck, "original")
    for ck in suspect_cks:
        _check_architecture(base_ck, ck, "suspect")
    for ck in null_cks:
        _check_architecture(base_ck, ck, f"null model {ck.path}")
    transforms = load_key_for(key, orig_ck) if key is not None else None

    orig_score, *scores = _score_models(
        base_ck,
        orig_ck,
        [orig_ck, *suspect_cks, *null_cks],
        transforms=transforms,
        attack=attack,
        rank=rank,
        raw_only=(0,),
    )
    _check_derived(orig_score, "original", base_ck.path)
    suspect_scores, null_scores = scores[: len(suspect_cks)], scores[len(suspect_cks) :]
    for score in suspect_scores:
        _check_derived(score, "suspect", base_ck.path)
    for score in null_scores:
        _check_derived(score, "null model", base_ck.path)
    nulls = [score.statistic for score in null_scores]
    seconds = time.perf_counter() - start

    results = []
    for score in suspect_scores:
        z = score.statistic
        best = max(score.Z, key=score.Z.get)
        tensors = len(score.z[best])
        views = distinct_views(score)
        p_flip = flip_p(z, tensors, views)
        p_null = null_p(z, nulls)
        effect = math.sqrt(max(z, 0.0) / max(orig_score.Z["raw"], 1e-300))
        shared = math.sqrt(max(score.Z_shared[best], 0.0) / max(orig_score.Z_shared["raw"], 1e-300))
        shape = effect / shared if shared > 0 else 0.0
        p = p_flip if p_null is None else max(p_null, p_flip)
        found = p <= alpha if p_null is not None else flip_verdict(p_flip, effect, shape, alpha)
        needed = threshold(nulls, tensors, views, orig_score.Z["raw"], alpha)
        results.append(
            Detection(
                suspect=score.path,
                original=str(orig_ck.path),
                base=str(base_ck.path),
                found=found,
                statistic=z,
                p_value=p,
                p_flip=p_flip,
                p_null=p_null,
                effect=effect,
                shape=shape,
                threshold=needed,
                alpha=alpha,
                views=dict(score.Z),
                null_statistics=nulls,
                rank=rank,
                attack=attack,
                seconds=seconds,
                scores=score,
                null_scores=null_scores,
            )
        )
    return results


# --- report ----------------------------------------------------------------------------------


def write_report(result: Detection, out: Path) -> None:
    """``out/report.json`` and ``out/detect.png`` (the suspect's statistic against the null)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    plot(result, out / "detect.png")


def plot(result: Detection, path: Path) -> None:
    """The null distribution (null models as ticks, or the sign-flip null's standardized
    density, about N(0, 1))
    and the suspect's statistic, on a symmetric-log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    grid = np.linspace(-4, 4, 201)
    ax.plot(grid, np.exp(-(grid**2) / 2) / math.sqrt(2 * math.pi), color="grey",
            label="sign-flip null, about N(0, 1)")  # fmt: skip
    for i, z in enumerate(result.null_statistics):
        ax.axvline(z, color="tab:blue", alpha=0.6, lw=1.5, label="null models" if i == 0 else None)
    colour = "tab:red" if result.found else "tab:green"
    ax.axvline(
        result.threshold,
        color="black",
        ls="--",
        lw=1,
        label=f"found above (alpha {result.alpha:g})",
    )
    ax.axvline(result.statistic, color=colour, lw=2.5, label="suspect")
    ax.set_xscale("symlog", linthresh=4)
    ax.set_xlabel("statistic Z (max over views; symlog axis)")
    ax.set_yticks([])
    verdict = "FOUND" if result.found else "not found"
    ax.set_title(
        f"release {verdict}: Z = {result.statistic:.1f} (found above {result.threshold:.1f}), "
        f"p = {result.p_value:.1e}"
    )
    top = max([result.statistic, result.threshold, 4.0, *result.null_statistics])
    ax.set_xlim(-5, 2 * top)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["Detection", "Scores", "detect", "detect_all", "residual", "tensor_z"]
