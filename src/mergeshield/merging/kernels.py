"""The task-vector room: mergekit 0.1.5's merge formulas on tensors in memory.

Each kernel computes, per tensor, what :func:`mergeshield.merging.methods.merge` makes mergekit
compute (the formulas are in :mod:`mergeshield.merging.methods`), from dicts of tensors in the
base's layout, without writing a folder.  It exists for speed only: ``tests/test_kernels.py``
ties every method to mergekit (relative error at most 1e-6, the random ones included), and
reported merges are recomputed by mergekit (:mod:`mergeshield.evaluation.audit`).

Why it is fast: mergekit's time goes into the per-tensor work, not I/O (about 1 % is reading
and writing safetensors); for TIES most of it is ``torch.argsort`` of every |δ| in
``sparsify.magnitude``.  Here a sweep over the coefficient c sparsifies and elects signs once:
for every task-vector method merge(c) = θ₀ + c·Δ with Δ independent of c, slerp's angles do not
depend on t, and linear is one weighted sum per c.  The top-k masks take a k-th value threshold
instead of a full sort, but where entries tie at the threshold (most large tensors of a real
MiniLM fine-tune: equal float32 magnitudes) mergekit's own sort decides which are kept, so the
first TIES or breadcrumbs merge costs about what mergekit's does.

Sparsification, per task vector δ (n entries), as mergekit's ``sparsify``:

* ``magnitude`` (TIES): keep the k = max(1, ⌊density·n⌋) largest |δ|;
* ``random`` (DARE): keep each entry with probability density (``torch.bernoulli``);
* ``magnitude_outliers`` (breadcrumbs): in ascending |δ| order drop the first
  max(0, n − ⌊density·n⌋ − ⌊gamma·n⌋) entries, keep the next ⌊density·n⌋;
* ``della_magprune`` (DELLA): per row (dim 1 ranks), keep-probability
  p = density − ε + 2ε·(rank − min rank)/(max rank − min rank);

and with ``rescale`` the kept part is scaled to the L1 norm of δ.  Then, with weights wᵢ,
dᵢ = wᵢ·sparsify(δᵢ); with sign election (``consensus``) s = sign(Σ dᵢ) (0 counts as +) and
mᵢ = [sign(dᵢ) = s], else mᵢ = 1; Δ = Σ mᵢdᵢ, divided by Σ wᵢmᵢ (1 where 0) when
``normalize``; merge = θ₀ + λ·Δ.

Random draws: mergekit seeds torch with ``seed`` once and draws tensor by tensor, model by
model; the kernels draw in that same order (the base's tensor order) from the same seed, so
DARE and DELLA masks are mergekit's own.

A :class:`SparseCache` keeps the deterministic part of sparsifying the models that come back in
every merge of a study (an audit's free-riders): their top-k / outlier masks and DELLA's
keep-probabilities are computed once instead of once per variant and method.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from mergeshield.errors import MergeShieldError
from mergeshield.merging.methods import get_method

Tensors = dict[str, torch.Tensor]
Merged = Callable[[float], Tensors]


@dataclass(frozen=True)
class TaskVectorRule:
    """How mergekit's generalized task arithmetic combines task vectors for one method.

    ``sparsify``: None, "magnitude", "random", "magnitude_outliers" or "della_magprune";
    ``consensus``: TIES sign election; ``normalize``/``rescale``: mergekit's defaults.
    """

    sparsify: str | None
    consensus: bool
    normalize: bool
    rescale: bool


# mergekit 0.1.5 merge_methods/registry.py, by mergekit method name.
TASK_VECTOR_RULES: dict[str, TaskVectorRule] = {
    "task_arithmetic": TaskVectorRule(None, consensus=False, normalize=False, rescale=False),
    "ties": TaskVectorRule("magnitude", consensus=True, normalize=True, rescale=False),
    "dare_ties": TaskVectorRule("random", consensus=True, normalize=False, rescale=True),
    "dare_linear": TaskVectorRule("random", consensus=False, normalize=False, rescale=True),
    "breadcrumbs": TaskVectorRule(
        "magnitude_outliers", consensus=False, normalize=False, rescale=False
    ),
    "della": TaskVectorRule("della_magprune", consensus=True, normalize=True, rescale=True),
}


# glibc mallopt parameters and their defaults (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


@contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Keep freed memory in the process's heap for the block, then give it back.

    glibc serves every block over 32 MB (a MiniLM's 47 MB word embeddings: every task vector,
    mask and merge of it) with fresh ``mmap`` pages that the kernel faults in and zeroes at
    each allocation: about 70 million page faults and 6% of the CPU time of the full text
    audit.  With ``mmap`` off and no trimming, freed blocks are reused instead (peak memory a
    few hundred MB higher).  No-op where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**30)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


# ----------------------------------------------------------------------------- sparsify


def rescale_l1(delta: torch.Tensor, mask: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """δ·mask scaled by ‖δ‖₁ / ‖δ·mask‖₁ (unscaled when either norm is below ``eps``)."""
    masked = delta * mask
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def _kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry (1-based) of a flat tensor."""
    return values.kthvalue(k).values


def magnitude_mask(delta: torch.Tensor, density: float, exact_ties: bool = True) -> torch.Tensor:
    """1 on the k = max(1, ⌊density·n⌋) entries of largest |δ|, else 0.

    A k-th value threshold instead of mergekit's full sort; where entries tie at the threshold
    (real fine-tunes have equal float32 magnitudes) the tied ones are chosen as mergekit
    does, by its own ``torch.argsort(|δ|, descending=True)[:k]`` (``exact_ties``), or all kept
    (``exact_ties=False``: a cheap simulation, e.g. in every step of ``harden``, where a full
    sort per tensor and step would dominate)."""
    n = delta.numel()
    k = max(1, int(density * n))
    w = delta.abs().reshape(-1).float()
    keep = w >= _kth_smallest(w, n - k + 1)
    if exact_ties and int(keep.sum()) != k:
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.argsort(w, descending=True)[:k]] = True
    return keep.reshape(delta.shape).to(delta.dtype)


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: in ascending |δ| order drop n_bot = max(0, n − ⌊density·n⌋ − ⌊gamma·n⌋)
    entries, keep the next ⌊density·n⌋ (the ⌊gamma·n⌋ largest and the smallest dropped).
    Ties at either edge are resolved by mergekit's own ``torch.sort``, as in
    :func:`magnitude_mask`."""
    n = delta.numel()
    target = int(density * n)
    n_bot = max(0, n - target - int(gamma * n))
    if target == 0:
        return torch.zeros_like(delta)
    w = delta.abs().reshape(-1).float()
    low, high = _kth_smallest(w, n_bot + 1), _kth_smallest(w, n_bot + target)
    keep = (w >= low) & (w <= high)
    if int(keep.sum()) != target:
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.sort(w, descending=False).indices[n_bot : n_bot + target]] = True
    return keep.reshape(delta.shape).to(delta.dtype)


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep-probabilities: density − ε + 2ε·(rank − min)/(max − min) along dim 1
    (ranks of |δ| from 1; a 1-D δ is one row; size-1 dims at position 1 squeezed out first,
    as mergeshield's mergekit workaround does)."""
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise MergeShieldError("DELLA needs density ± epsilon inside (0, 1)")
    squeezed = delta
    while squeezed.dim() >= 2 and squeezed.shape[1] == 1:
        squeezed = squeezed.squeeze(1)
    rows = squeezed.unsqueeze(0) if squeezed.dim() < 2 else squeezed
    order = torch.argsort(rows.abs(), dim=1, descending=False)
    position = torch.arange(1, rows.shape[1] + 1, dtype=torch.float32)
    position = position.reshape(1, -1, *[1] * (rows.dim() - 2)).expand_as(order)
    ranks = torch.empty(order.shape, dtype=torch.float32).scatter_(1, order, position)
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(delta.shape)


def _deterministic_part(
    delta: torch.Tensor, method: str, density: float, gamma: float, epsilon: float
) -> torch.Tensor | None:
    """What sparsifying ``delta`` computes without random draws: the mask of "magnitude" and
    "magnitude_outliers", the keep-probabilities of "della_magprune"; None for "random"."""
    if method == "magnitude":
        return magnitude_mask(delta, density)
    if method == "magnitude_outliers":
        return outlier_mask(delta, density, gamma)
    if method == "della_magprune":
        return della_probabilities(delta, density, epsilon)
    if method == "random":
        return None
    raise MergeShieldError(f"unknown sparsification {method!r}")


def sparsify(
    delta: torch.Tensor,
    method: str | None,
    *,
    density: float = 1.0,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    rescale: bool = False,
    part: Callable[[], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """mergekit's ``sparsify(δ, density, method)``; "random"/"della_magprune" draw from the
    global torch generator exactly as mergekit does (one ``torch.bernoulli`` per tensor).
    ``part``: gives :func:`_deterministic_part` of ``delta`` (e.g. from a cache)."""
    if method is None or density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    fixed = part() if part else _deterministic_part(delta, method, density, gamma, epsilon)
    if method == "random":
        mask = torch.bernoulli(torch.full_like(delta, density, dtype=torch.float32))
    elif method == "della_magprune":
        mask = torch.bernoulli(fixed)
    else:
        mask = fixed
    return rescale_l1(delta, mask) if rescale else delta * mask


class SparseCache:
    """The deterministic part of sparsifying the task vectors of ``models`` (the models that
    come back in every merge, e.g. an audit's free-riders), computed on first use and reused:
    for a 22M-parameter MiniLM the top-k sort of TIES and breadcrumbs is about 1.5 s per model.

    It holds ``models`` (so their identity is a safe key) and records each tensor's version
    counter with the entry: a tensor changed in place is sparsified again."""

    def __init__(self, models: Sequence[Mapping[str, torch.Tensor]]) -> None:
        self.models = list(models)
        self._ids = {id(m) for m in self.models}
        self._store: dict[tuple, tuple[int, int, torch.Tensor | None]] = {}

    def part(
        self,
        model: Mapping[str, torch.Tensor],
        base: torch.Tensor,
        name: str,
        delta: torch.Tensor,
        method: str,
        options: Mapping[str, float],
    ) -> Callable[[], torch.Tensor | None] | None:
        """For ``sparsify(part=...)``: the cached part for ``model``'s tensor ``name`` (or
        None when ``model`` is not one of the cached models)."""
        if id(model) not in self._ids:
            return None
        tensor = model[name]
        key = (id(model), name, id(base), method, tuple(sorted(options.items())))

        def cached() -> torch.Tensor | None:
            versions = (tensor._version, base._version)
            hit = self._store.get(key)
            if hit is None or hit[:2] != versions:
                density, gamma, epsilon = (
                    options.get(k, d)
                    for k, d in (("density", 1.0), ("gamma", 0.01), ("epsilon", 0.15))
                )
                value = _deterministic_part(delta, method, density, gamma, epsilon)
                hit = (*versions, value)
                self._store[key] = hit
            return hit[2]

        return cached


# ----------------------------------------------------------------------------- combine


def combine(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
) -> torch.Tensor:
    """Δ = Σ mᵢwᵢδᵢ (/ Σ wᵢmᵢ with ``normalize``), mᵢ the TIES sign-election mask when
    ``consensus`` (s = sign(Σ wᵢδᵢ), 0 counts as +), else 1; see the module docstring."""
    stack = torch.stack(list(deltas))
    w = torch.tensor(list(weights), dtype=stack.dtype).reshape(-1, *[1] * (stack.dim() - 1))
    stack = stack * w
    if consensus:
        majority = (stack.sum(dim=0) >= 0).to(stack.dtype) * 2 - 1
        mask = (stack.sign() == majority).to(stack.dtype)
        mixed = (stack * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stack.sum(dim=0)
        divisor = w.sum(dim=0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1
    return mixed / divisor if normalize else mixed


# ----------------------------------------------------------------------------- merges


def _floating(base: Mapping[str, torch.Tensor]) -> list[str]:
    return [name for name, t in base.items() if t.is_floating_point()]


def _check_inputs(base: Mapping[str, torch.Tensor], models: Sequence[Mapping]) -> None:
    for index, model in enumerate(models):
        missing = sorted(set(base) - set(model))
        if missing:
            raise MergeShieldError(
                f"model {index} lacks {len(missing)} base tensors: {missing[:3]}"
            )
        for name, tensor in base.items():
            if model[name].shape != tensor.shape:
                raise MergeShieldError(
                    f"tensor {name}: shape differs between base and model {index}"
                )


def task_vector_delta(
    rule: TaskVectorRule,
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    params: Mapping[str, Any],
    seed: int,
    cache: SparseCache | None = None,
) -> Tensors:
    """Δ per floating tensor (merge = θ₀ + λ·Δ), drawing DARE/DELLA masks as mergekit does:
    ``torch.manual_seed(seed)``, then tensor by tensor in base order, model by model.  The
    caller's torch random state is kept."""
    weights = [float(w) for w in params.get("weights", [1.0] * len(models))]
    options = {k: float(params[k]) for k in ("density", "gamma", "epsilon") if k in params}
    rescale = bool(params.get("rescale", rule.rescale))
    normalize = bool(params.get("normalize", rule.normalize))
    out: Tensors = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in _floating(base):
            b = base[name].float()
            deltas = []
            for m in models:
                delta = m[name].float() - b
                part = None
                if cache is not None and rule.sparsify is not None:
                    part = cache.part(m, base[name], name, delta, rule.sparsify, options)
                deltas.append(sparsify(delta, rule.sparsify, rescale=rescale, part=part, **options))
            out[name] = combine(deltas, weights, consensus=rule.consensus, normalize=normalize)
    return out


def _add_scaled(base: Mapping[str, torch.Tensor], delta: Tensors, c: float) -> Tensors:
    """θ₀ + c·Δ for the tensors of Δ (mergekit skips the product at c = 1), base elsewhere."""
    return {
        name: (t.float() + (delta[name] if c == 1 else c * delta[name])).to(t.dtype)
        if name in delta
        else t
        for name, t in base.items()
    }


def linear_at(
    base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]], c: float
) -> Tensors:
    """Σ wⱼθⱼ / Σ wⱼ with w = (1 − c, c/n, …, c/n) over (θ₀, θ₁ … θₙ), accumulated in that
    order with fused multiply-adds, as mergekit does (so the result is bit for bit its own)."""
    n = len(models)
    weights = torch.tensor([1.0 - c] + [c / n] * n, dtype=torch.float32)
    total = weights.sum()
    out: Tensors = {}
    for name, t in base.items():
        if not t.is_floating_point():
            out[name] = t
            continue
        acc = torch.zeros_like(t, dtype=torch.float32)
        for source, w in zip((base, *models), weights, strict=True):
            acc.addcmul_(source[name].float(), w)
        out[name] = acc.div_(total).to(t.dtype)
    return out


def slerp_angles(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.9995) -> torch.Tensor:
    """θ = acos(⟨a/‖a‖, b/‖b‖⟩) over the whole tensor (norms below 1e-8 taken as 1); NaN
    marks |cos| > ``threshold``, where slerp falls back to linear interpolation."""
    x, y = a.reshape(-1).float(), b.reshape(-1).float()
    na, nb = torch.linalg.vector_norm(x), torch.linalg.vector_norm(y)
    na = torch.where(na > 1e-8, na, 1)
    nb = torch.where(nb > 1e-8, nb, 1)
    dot = ((x / na) * (y / nb)).sum().clamp(-1, 1)
    return torch.acos(dot) if dot.abs() <= threshold else torch.tensor(float("nan"))


def slerp_at(
    start: Mapping[str, torch.Tensor],
    end: Mapping[str, torch.Tensor],
    angles: Mapping[str, torch.Tensor],
    t: float,
) -> Tensors:
    """sin((1−t)θ)/sin θ·a + sin(tθ)/sin θ·b per tensor ((1−t)a + tb where θ is NaN)."""
    out: Tensors = {}
    for name, a in start.items():
        if name not in angles:
            out[name] = a
            continue
        theta = angles[name]
        if torch.isnan(theta):
            ca, cb = torch.tensor(1 - t), torch.tensor(t)
        else:
            ca = torch.sin((1 - t) * theta) / torch.sin(theta)
            cb = torch.sin(t * theta) / torch.sin(theta)
        out[name] = (ca * a.float() + cb * end[name].float()).to(a.dtype)
    return out


def model_stock(
    base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]]
) -> Tensors:
    """t·mean(θᵢ) + (1 − t)·θ₀ per tensor, t = n·cos / (1 + (n − 1)·cos), cos the mean
    pairwise cosine of the δᵢ (norm products clamped at 1e-6; t = 0 where |1 + (n − 1)cos|
    < 1e-6)."""
    n = len(models)
    out: Tensors = {}
    for name, t0 in base.items():
        if not t0.is_floating_point():
            out[name] = t0
            continue
        w0 = t0.reshape(-1).float()
        ws = [m[name].reshape(-1).float() for m in models]
        offsets = [w - w0 for w in ws]
        cosines = []
        for i, da in enumerate(offsets):
            for db in offsets[i + 1 :]:
                norm = torch.norm(da) * torch.norm(db)
                cosines.append(((da * db).sum() / norm.clamp(min=1e-6)).clamp(-1, 1))
        cos = torch.stack(cosines).mean()
        denominator = 1 + (n - 1) * cos
        ratio = torch.zeros(()) if denominator.abs() < 1e-6 else n * cos / denominator
        average = sum(ws) / n
        out[name] = (ratio * average + (1 - ratio) * w0).reshape(t0.shape).to(t0.dtype)
    return out


def prepare(
    method: str,
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    *,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    cache: SparseCache | None = None,
) -> Merged:
    """``c -> merged tensors``: ``method`` (a :data:`~mergeshield.merging.methods.METHODS`
    name) at coefficient c, with the work that does not depend on c done once here.

    ``params`` overrides the method's default parameters as in ``merge`` (plus ``weights``,
    the task models' mergekit weights, default 1); ``cache`` reuses the sparsification of the
    models it holds (:class:`SparseCache`).  Two-model slerp interpolates models[0] to
    models[1] and one-model slerp base to models[0], as the mergekit config does.
    """
    spec = get_method(method)
    if len(models) < spec.min_models or (
        spec.max_models is not None and len(models) > spec.max_models
    ):
        raise MergeShieldError(f"{method} cannot merge {len(models)} models")
    _check_inputs(base, models)
    user = dict(params or {})
    unknown = sorted(set(user) - set(spec.params) - set(spec.options) - {"weights"})
    if unknown:
        raise MergeShieldError(f"{method} takes parameters {sorted(spec.params)}, not {unknown}")
    merged_params = {**spec.params, **user}
    if method in TASK_VECTOR_RULES:
        rule = TASK_VECTOR_RULES[method]
        delta = task_vector_delta(rule, base, models, merged_params, seed, cache)
        return lambda c: _add_scaled(base, delta, c)
    if method == "linear":
        return lambda c: linear_at(base, models, c)
    if method == "slerp":
        start, end = (base, models[0]) if len(models) == 1 else (models[0], models[1])
        angles = {n: slerp_angles(start[n], end[n]) for n in _floating(base)}
        return lambda t: slerp_at(start, end, angles, t)
    if method == "model_stock":
        merged = model_stock(base, models)

        def fixed(c: float) -> Tensors:
            if c != 1.0:
                raise MergeShieldError("model_stock has no coefficient; pass 1.0")
            return merged

        return fixed
    raise MergeShieldError(f"no in-memory kernel for merge method {method!r}")


def merge_tensors(
    method: str,
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    *,
    coefficient: float,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> Tensors:
    """One in-memory merge: what ``methods.merge`` writes, as a dict of tensors."""
    return prepare(method, base, models, params=params, seed=seed)(coefficient)
