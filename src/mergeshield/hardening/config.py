"""The hyper-parameters of :func:`mergeshield.hardening.harden.harden` (no torch: the CLI builds
its ``harden`` options from them without importing the training code)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mergeshield.errors import MergeShieldError

# The loss components, in the order they are applied (each registered in
# :mod:`mergeshield.hardening.components` under this name).
COMPONENTS = ("trap2", "merge", "arf", "amerge", "mergeguard", "prune")
WEIGHTINGS = ("inv", "inv_sqrt", "none")
TARGETS = ("uniform", "margin")  # what every simulated-merge term pushes its merges to

# `mergeshield harden`'s default release, with the steps, lr and target of HardenConfig: the
# candidate that measured strongest on the full ViT and SmolLM2 families (on the full MiniLM
# merge+arf then all held task arithmetic better); none meets the target of 10% kept at 0.5
# points of cost (BENCHMARKS.md, "Session 19").
DEFAULT_METHOD = "trap2+merge+arf"
DEFAULT_DEFENSE = "all"  # the exact symmetry applied after hardening ("none": skip)


def parse_method(method: str) -> list[str]:
    """``"trap2+merge"`` -> ``["trap2", "merge"]``, validated against :data:`COMPONENTS`."""
    parts = [p.strip() for p in method.split("+") if p.strip()]
    unknown = [p for p in parts if p not in COMPONENTS]
    if not parts or unknown:
        raise MergeShieldError(f"unknown harden method {method!r}; combine {COMPONENTS} with '+'")
    return parts


@dataclass(frozen=True)
class HardenConfig:
    """Hyper-parameters of ``harden`` (all recorded in ``mergeshield_harden.json``); checked
    when made, with one-line errors."""

    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.0
    lam: float = 1.0  # weight of every simulated-merge term D
    target: str = "margin"  # merges pushed to the true class ranked low, or uniform predictions
    margin: float = 1.0  # target="margin": the lead (in logit spreads) pushed below -margin
    s_min: float = 0.05
    s_max: float = 2.0
    delta: float = 0.05
    weighting: str = "inv"  # w(s): "inv" (1/s), "inv_sqrt", "none"
    proxies: tuple[str, ...] = ()  # folders of proxy fine-tunes of the same base
    c_min: float = 0.5  # merge-aware: the proxy's smallest coefficient (its task kept)
    c_max: float = 1.0
    ties_density: float = 0.2
    guard_alpha: float = 0.01
    guard_beta: float = 1.0
    guard_fraction: float = 0.1  # share of least-important entries negated
    guard_keep_layers: float = 0.1  # share of most-changed layers never negated
    prune_fraction: float = 0.2  # share of each tensor's smallest |tau| entries reset
    train_head: bool = False
    train_embeddings: bool = False  # the embeddings are half of MiniLM; frozen by default
    max_len: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise MergeShieldError(f"harden: {message}")

        for name in ("steps", "batch_size", "max_len", "seed"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an int")
        need(self.steps >= 1, "steps must be at least 1")
        need(self.batch_size >= 1 and self.max_len >= 1, "batch_size and max_len must be >= 1")
        need(self.seed >= 0, "seed must be non-negative")
        floats = ("lr", "weight_decay", "lam", "margin", "s_min", "s_max", "delta")
        floats += ("c_min", "c_max", "ties_density", "guard_alpha", "guard_beta", "guard_fraction")
        floats += ("guard_keep_layers", "prune_fraction")
        for name in floats:
            need(math.isfinite(getattr(self, name)), f"{name} must be a finite number")
        need(self.lr > 0, "lr must be positive")
        need(min(self.weight_decay, self.lam, self.guard_alpha, self.guard_beta) >= 0,
             "weight_decay, lam, guard_alpha and guard_beta must be non-negative")  # fmt: skip
        need(0 <= self.delta < 1, "delta must lie in [0, 1)")
        need(0 < self.s_min < 1 - self.delta, "s_min must lie in (0, 1 - delta)")
        need(self.s_max > 1 + self.delta, "s_max must exceed 1 + delta")
        need(0 < self.c_min <= self.c_max, "need 0 < c_min <= c_max")
        need(0 < self.ties_density <= 1, "ties_density must lie in (0, 1]")
        for name in ("guard_fraction", "guard_keep_layers"):
            need(0 <= getattr(self, name) <= 1, f"{name} must lie in [0, 1]")
        need(0 <= self.prune_fraction < 1, "prune_fraction must lie in [0, 1)")
        need(self.target in TARGETS, f"target must be one of {', '.join(TARGETS)}")
        need(self.weighting in WEIGHTINGS, f"weighting must be one of {', '.join(WEIGHTINGS)}")
        need(isinstance(self.proxies, tuple), "proxies must be a tuple of folders")
