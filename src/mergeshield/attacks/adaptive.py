"""Attacks by a free-rider who knows which defense was used.

* **Coefficient-1 insertion** (against scale-sensitive releases such as TRAP2): the protected
  task vector enters at weight 1 and only the others are scaled,
  ``theta = theta_0 + tau_victim + lam * sum_j tau_j``.  With mergekit's ``task_arithmetic``
  this is per-model ``weight`` 1 for the victim and ``lam`` for the others, global
  ``lambda = 1`` (:func:`insertion_config`); with ``ties`` the same weights (TIES then divides
  each entry by the summed weights of the models that agree in sign).
* **Short fine-tune** of a merged backbone (plus the released head) on a few labelled examples
  of the victim task (:func:`finetune_recovery`): how many examples and steps give the gain
  back, compared with the same fine-tune started from a merge that never saw the victim.
* **Alignment after pruning or noise** (:func:`perturb_then_align`): against a release that
  was pruned or noised before its symmetry was applied (PaRaMS' dropout hardening), the
  attacker first zeroes the smallest entries of the *released* update or adds noise, then runs
  an alignment attack of :mod:`mergeshield.attacks`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mergeshield.errors import MergeShieldError
from mergeshield.folders import load_tensors, save_tensors
from mergeshield.merging.backbone import backbone_prefix
from mergeshield.merging.kernels import TASK_VECTOR_RULES
from mergeshield.merging.mergekit_runner import run_mergekit
from mergeshield.merging.methods import get_method
from mergeshield.modeling import load_merged, train_steps

Tensors = dict[str, torch.Tensor]
INSERTION_METHODS = tuple(TASK_VECTOR_RULES)  # the task-vector methods


def insertion_config(
    base: Path,
    victim: Path,
    others: list[Path],
    coefficient: float,
    method: str = "task_arithmetic",
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """mergekit config of ``theta_0 + 1 * tau_victim + coefficient * sum_j tau_j``.

    ``victim`` and ``others`` are backbones in ``base``'s layout.  Per-model ``weight``: 1 for
    the victim, ``coefficient`` for each other model; ``lambda = 1``.  ``method`` is a
    task-vector method of :data:`INSERTION_METHODS`; its default parameters (TIES ``density``
    ...) apply, ``params`` overrides them.
    """
    if method not in INSERTION_METHODS:
        raise MergeShieldError(f"insertion needs a task-vector method {INSERTION_METHODS}")
    if not others:
        raise MergeShieldError("insertion needs at least one other model")
    spec = get_method(method)
    models = [{"model": str(Path(victim).resolve()), "parameters": {"weight": 1.0}}]
    models += [
        {"model": str(Path(m).resolve()), "parameters": {"weight": float(coefficient)}}
        for m in others
    ]
    return {
        "merge_method": spec.mergekit_name,
        "base_model": str(Path(base).resolve()),
        "models": models,
        "parameters": {**spec.params, **(params or {}), "lambda": 1.0},
        "dtype": "float32",
    }


def insert(
    base: Path,
    victim: Path,
    others: list[Path],
    out: Path,
    *,
    coefficient: float,
    method: str = "task_arithmetic",
    params: dict[str, Any] | None = None,
    seed: int = 0,
) -> Path:
    """Run the coefficient-1 insertion merge (:func:`insertion_config`) with mergekit."""
    config = insertion_config(base, victim, others, coefficient, method, params)
    return run_mergekit(config, Path(out), seed=seed)


def finetune_recovery(
    model: torch.nn.Module,
    backbone: Tensors,
    train: dict[str, torch.Tensor],
    *,
    n_examples: int,
    steps: int,
    evaluate: Callable[[torch.nn.Module], Any],
    lr: float = 5e-5,
    batch_size: int = 16,
    seed: int = 0,
) -> list[tuple[int, Any]]:
    """Fine-tune ``model`` (a classifier whose ``base_model`` gets ``backbone``, or a causal LM
    that gets it whole: :func:`mergeshield.modeling.merged_part`) on the first
    ``n_examples`` rows of ``train`` (model inputs and ``labels``: a causal LM's are the answer
    tokens) for ``steps`` AdamW steps; return ``[(step, evaluate(model))]`` at 0, steps/2 and
    steps.

    The whole model trains (backbone and head): the strongest cheap recovery.  ``model`` is
    modified in place.
    """
    load_merged(model, backbone)
    n = min(n_examples, len(train["labels"]))
    data = {k: v[:n] for k, v in train.items()}
    gen = torch.Generator().manual_seed(seed)
    order = [torch.randint(0, n, (min(batch_size, n),), generator=gen) for _ in range(steps)]
    checkpoints = {max(1, steps // 2), steps}
    model.eval()
    curve = [(0, evaluate(model))]

    def after_step(step: int, loss: float) -> None:
        if step in checkpoints:
            model.eval()
            curve.append((step, evaluate(model)))

    train_steps(model, data, order, lr=lr, after_step=after_step)
    return curve


def perturb_update(
    released: Tensors, base: Tensors, *, prune: float = 0.0, noise: float = 0.0, seed: int = 0
) -> Tensors:
    """``theta_0 + P(theta - theta_0)``: the ``prune`` fraction of smallest ``|theta - theta_0|``
    entries of each matching float tensor set to 0, then Gaussian noise of relative size
    ``noise`` (``noise * ||delta|| / sqrt(numel)`` per entry) added.  Only tensors whose name
    and shape are in ``base`` change (a symmetry-protected release has its own layout, so this
    is mostly useful on the *aligned* model).  Without noise the result is exact: each entry is
    either ``theta``'s or ``theta_0``'s."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(released)
    for name, t in released.items():
        b = base.get(name)
        if b is None or b.shape != t.shape or not t.is_floating_point():
            continue
        delta = t.float() - b.float()
        keep = None
        if prune > 0 and delta.numel() > 1:
            k = max(1, int(prune * delta.numel()))
            keep = delta.abs() > delta.abs().flatten().kthvalue(k).values
        if noise > 0:
            delta = delta if keep is None else delta * keep
            scale = noise * float(delta.norm()) / math.sqrt(delta.numel())
            delta = delta + scale * torch.randn(delta.shape, generator=gen)
            out[name] = (b.float() + delta).to(t.dtype)
        elif keep is not None:
            out[name] = torch.where(keep, t, b.to(t.dtype))
    return out


def perturb_then_align(
    protected: Path,
    base: Path,
    out: Path,
    *,
    attack: str = "aga",
    prune: float = 0.0,
    noise: float = 0.0,
    seed: int = 0,
) -> Path:
    """Align ``protected`` to ``base`` with ``attack``, then prune/noise the aligned update
    (:func:`perturb_update`) in place in ``out``: a denoising step after alignment, which
    removes what alignment left over of a pruned/noised symmetry.  Returns ``out``."""
    from mergeshield.attacks import attack as run_attack

    run_attack(protected, base, out, attack)
    tensors = load_tensors(Path(out))
    base_t = load_tensors(Path(base))
    prefix = backbone_prefix(list(tensors), list(base_t))
    shifted = {prefix + k: v for k, v in base_t.items()}
    new = perturb_update(tensors, shifted, prune=prune, noise=noise, seed=seed)
    for file in sorted(Path(out).glob("*.safetensors")):
        file.unlink()
    (Path(out) / "model.safetensors.index.json").unlink(missing_ok=True)
    save_tensors(new, Path(out))
    return Path(out)
