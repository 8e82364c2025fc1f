"""The merge methods free-riders run, as mergekit configs, and :func:`merge`.

Notation: θ₀ base, θᵢ the n task models (backbones in the base's layout), δᵢ = θᵢ − θ₀, and c
the ``coefficient`` (the attacker's knob).  mergekit applies every formula per tensor.

=================  ======  ============================================================
method             c is    what mergekit computes
=================  ======  ============================================================
linear             weight  (1 − c)·θ₀ + c·(1/n)·Σ θᵢ   (c = 1: the plain model soup)
task_arithmetic    λ       θ₀ + λ·Σ δᵢ
ties               λ       θ₀ + λ·Σ mᵢ·topk(δᵢ) / Σ mᵢ  (mᵢ = sign agreement, see below)
dare_ties          λ       θ₀ + λ·Σ mᵢ·dare(δᵢ)
dare_linear        λ       θ₀ + λ·Σ dare(δᵢ)
breadcrumbs        λ       θ₀ + λ·Σ crumbs(δᵢ)
della              λ       θ₀ + λ·Σ mᵢ·della(δᵢ) / Σ mᵢ
slerp              t       slerp(θ₀, θ₁; t) with one model, slerp(θ₁, θ₂; t) with two
model_stock        —       t·mean(θᵢ) + (1 − t)·θ₀,  t = n·cos / (1 + (n − 1)·cos)
=================  ======  ============================================================

* ``topk(δ)``: the ``density`` fraction of entries of largest |δ| kept, the rest zeroed.
* TIES sign election: s = sign(Σᵢ topk(δᵢ)) (0 counts as +), mᵢ = [sign(topk(δᵢ)) = s]
  elementwise; the division is by the number of agreeing models (1 where none agree).
* ``dare(δ)``: each entry kept with probability ``density`` (Bernoulli), then rescaled so that
  ‖dare(δ)‖₁ = ‖δ‖₁ (mergekit's L1 rescale, ≈ 1/density).  Random: seeded by ``seed``.
* ``crumbs(δ)``: drops the ``gamma`` fraction of largest |δ| and the smallest entries, so that
  a ``density`` fraction is kept.
* ``della(δ)``: per row, keep-probability density − ε + 2ε·rank(|δ|)/max rank; L1 rescale.
* model_stock: cos is the mean pairwise cosine between the δᵢ (whole tensor).

Task models enter with mergekit ``weight`` 1.  For the task-vector methods (``task_arithmetic``
to ``della``) c = 0 returns the base exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeshield.errors import MergeShieldError
from mergeshield.merging.mergekit_runner import run_mergekit
from mergeshield.registry import Registry

ConfigBuilder = Callable[[Path, list[Path], float, dict[str, Any]], dict[str, Any]]

_TASK_VECTOR_OPTIONS = ("normalize", "rescale", "int8_mask")


def _task_vector_config(
    base: Path, models: list[Path], coefficient: float, params: dict[str, Any], name: str
) -> dict[str, Any]:
    """mergekit's generalized task arithmetic: base + λ·(combined task vectors), weight 1."""
    return {
        "merge_method": name,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
        "parameters": {**params, "lambda": coefficient},
        "dtype": "float32",
    }


def _linear_config(
    base: Path, models: list[Path], coefficient: float, params: dict[str, Any]
) -> dict[str, Any]:
    """Weighted mean Σ wⱼθⱼ / Σ wⱼ over the base (w = 1 − c) and the models (w = c/n each).

    mergekit 0.1.5 pitfall: ``linear`` with ``base_model`` set fails ("Missing required
    parameter weight"), because the base becomes an input that needs a weight.  So the base is
    listed as an ordinary weighted input, first, which also makes it the donor of config.json.
    """
    n = len(models)
    inputs = [{"model": str(base), "parameters": {"weight": 1.0 - coefficient}}]
    inputs += [{"model": str(m), "parameters": {"weight": coefficient / n}} for m in models]
    return {
        "merge_method": "linear",
        "models": inputs,
        "parameters": {**params},
        "dtype": "float32",
    }


def _slerp_config(
    base: Path, models: list[Path], coefficient: float, params: dict[str, Any]
) -> dict[str, Any]:
    """slerp from ``start`` (t = 0) to ``end`` (t = 1); mergekit's "base" is the start point.

    One model: start = base, end = the task model (partial fine-tune, like WiSE-FT but on the
    sphere).  Two models: start = models[0], end = models[1], the shared base unused: the usual
    free-rider slerp of two fine-tunes (``base_model: A; models: [A, B]``).
    """
    start, end = (base, models[0]) if len(models) == 1 else (models[0], models[1])
    return {
        "merge_method": "slerp",
        "base_model": str(start),
        "models": [{"model": str(start)}, {"model": str(end)}],
        "parameters": {**params, "t": coefficient},
        "dtype": "float32",
    }


def _model_stock_config(
    base: Path, models: list[Path], coefficient: float, params: dict[str, Any]
) -> dict[str, Any]:
    """Model Stock: the interpolation ratio t is computed from the task vectors (no knob)."""
    return {
        "merge_method": "model_stock",
        "base_model": str(base),
        "models": [{"model": str(m)} for m in models],
        "parameters": {**params},
        "dtype": "float32",
    }


def _task_vector(name: str) -> ConfigBuilder:
    def build(base: Path, models: list[Path], c: float, params: dict[str, Any]) -> dict[str, Any]:
        return _task_vector_config(base, models, c, params, name)

    return build


@dataclass(frozen=True)
class MergeMethod:
    """One merge method as a free-rider runs it with mergekit.

    ``knob``: the mergekit parameter that ``coefficient`` sets (None: the method has none and
    ``coefficient`` must be 1).  ``grid``: the coefficients the attacker's sweep tries by
    default.  ``params``: default mergekit parameters; ``options``: other parameters a caller
    may set.  ``randomized``: the result depends on the seed.
    """

    name: str
    mergekit_name: str
    knob: str | None
    grid: tuple[float, ...]
    build: ConfigBuilder
    formula: str
    params: Mapping[str, Any] = field(default_factory=dict)
    options: tuple[str, ...] = ()
    min_models: int = 1
    max_models: int | None = None
    randomized: bool = False

    def takes(self, n_models: int) -> bool:
        """Whether the method merges ``n_models`` models (slerp takes two, model_stock two or
        more)."""
        return n_models >= self.min_models and (
            self.max_models is None or n_models <= self.max_models
        )

    def thinned(self, stride: int = 1) -> tuple[float, ...]:
        """Every ``stride``-th coefficient of ``grid`` counted from the largest, which is always
        kept (a method without a knob keeps its one coefficient)."""
        if stride < 1:
            raise MergeShieldError(f"grid stride must be at least 1, got {stride}")
        if self.knob is None:
            return self.grid
        return tuple(reversed(tuple(reversed(self.grid))[::stride]))


_LAMBDAS_SUM = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_LAMBDAS_MEAN = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)

METHODS: Registry[MergeMethod] = Registry("merge method")
for _method in (
    MergeMethod(
        name="linear",
        mergekit_name="linear",
        knob="weight",
        grid=(0.2, 0.4, 0.5, 0.6, 0.8, 1.0),
        build=_linear_config,
        formula="(1 - c) * base + c * mean(models)",
    ),
    MergeMethod(
        name="task_arithmetic",
        mergekit_name="task_arithmetic",
        knob="lambda",
        grid=_LAMBDAS_SUM,
        build=_task_vector("task_arithmetic"),
        formula="base + lambda * sum(task vectors)",
        options=_TASK_VECTOR_OPTIONS,
    ),
    MergeMethod(
        name="ties",
        mergekit_name="ties",
        knob="lambda",
        grid=_LAMBDAS_MEAN,
        build=_task_vector("ties"),
        formula="base + lambda * disjoint_mean(sign_elect(topk(task vectors, density)))",
        params={"density": 0.2},
        options=_TASK_VECTOR_OPTIONS,
    ),
    MergeMethod(
        name="dare_ties",
        mergekit_name="dare_ties",
        knob="lambda",
        grid=_LAMBDAS_SUM,
        build=_task_vector("dare_ties"),
        formula="base + lambda * sum(sign_elect(dare(task vectors, density)))",
        params={"density": 0.5},
        options=_TASK_VECTOR_OPTIONS,
        randomized=True,
    ),
    MergeMethod(
        name="dare_linear",
        mergekit_name="dare_linear",
        knob="lambda",
        grid=_LAMBDAS_SUM,
        build=_task_vector("dare_linear"),
        formula="base + lambda * sum(dare(task vectors, density))",
        params={"density": 0.5},
        options=_TASK_VECTOR_OPTIONS,
        randomized=True,
    ),
    MergeMethod(
        name="breadcrumbs",
        mergekit_name="breadcrumbs",
        knob="lambda",
        grid=_LAMBDAS_SUM,
        build=_task_vector("breadcrumbs"),
        formula="base + lambda * sum(drop_top_gamma_and_bottom(task vectors, density))",
        params={"density": 0.9, "gamma": 0.01},
        options=_TASK_VECTOR_OPTIONS,
    ),
    MergeMethod(
        name="della",
        mergekit_name="della",
        knob="lambda",
        grid=_LAMBDAS_MEAN,
        build=_task_vector("della"),
        formula="base + lambda * disjoint_mean(sign_elect(magprune(task vectors)))",
        params={"density": 0.5, "epsilon": 0.15},
        options=_TASK_VECTOR_OPTIONS,
        randomized=True,
    ),
    MergeMethod(
        name="slerp",
        mergekit_name="slerp",
        knob="t",
        grid=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        build=_slerp_config,
        formula="slerp(base, model; t) or slerp(model_1, model_2; t)",
        max_models=2,
    ),
    MergeMethod(
        name="model_stock",
        mergekit_name="model_stock",
        knob=None,
        grid=(1.0,),
        build=_model_stock_config,
        formula="t * mean(models) + (1 - t) * base, t from the task vectors' cosines",
        options=("filter_wise",),
        min_models=2,
    ),
):
    METHODS.register(_method)
get_method = METHODS.lookup


def merge_config(
    method: str,
    base: Path,
    models: list[Path],
    *,
    coefficient: float,
    params: dict[str, Any] | None = None,
    out_dtype: str | None = None,
) -> dict[str, Any]:
    """The mergekit config dict (YAML schema) that :func:`merge` runs; validates the inputs.
    Every merge is computed in float32; ``out_dtype`` (e.g. ``"bfloat16"``) is the dtype
    written (default float32)."""
    spec = get_method(method)
    base, models = Path(base).resolve(), [Path(m).resolve() for m in models]
    if len(models) < spec.min_models:
        raise MergeShieldError(f"{method} needs at least {spec.min_models} models")
    if spec.max_models is not None and len(models) > spec.max_models:
        raise MergeShieldError(f"{method} takes at most {spec.max_models} models")
    if len({base, *models}) != 1 + len(models):
        raise MergeShieldError(
            "base and models must be distinct folders (mergekit rejects duplicate inputs)"
        )
    for folder in (base, *models):
        if not (folder / "config.json").is_file():
            raise MergeShieldError(f"{folder} is not a checkpoint folder (no config.json)")
    if spec.knob is None and coefficient != 1.0:
        raise MergeShieldError(f"{method} has no coefficient; pass coefficient=1.0")
    user = dict(params or {})
    unknown = sorted(set(user) - set(spec.params) - set(spec.options))
    if unknown:
        raise MergeShieldError(
            f"{method} takes parameters {sorted({*spec.params, *spec.options})}, not {unknown}"
        )
    config = spec.build(base, models, float(coefficient), {**spec.params, **user})
    if out_dtype is not None:
        config["out_dtype"] = out_dtype
    return config


def merge(
    method: str,
    base: Path,
    models: list[Path],
    out: Path,
    *,
    coefficient: float,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    out_dtype: str | None = None,
) -> Path:
    """Merge ``models`` (backbones in ``base``'s layout) with mergekit into ``out``; return it.

    ``coefficient`` is the attacker's knob (see the module docstring): λ for the task-vector
    methods, t for slerp, the task models' total weight for linear, 1.0 for model_stock.
    ``params`` overrides the method's default mergekit parameters (e.g. ``density``).  ``seed``
    fixes mergekit's ``random_seed`` (DARE, DELLA).  ``out_dtype``: the dtype written (default
    float32; the merge is computed in float32 either way).  ``out`` is replaced atomically.
    """
    config = merge_config(
        method, base, models, coefficient=coefficient, params=params, out_dtype=out_dtype
    )
    return run_mergekit(config, Path(out), seed=seed)
