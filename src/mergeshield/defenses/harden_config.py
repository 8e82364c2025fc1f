"""The hyper-parameters of :func:`mergeshield.defenses.harden.harden` (no torch: the CLI builds
its ``harden`` options from them without importing the training code)."""

from __future__ import annotations

from dataclasses import dataclass

COMPONENTS = ("trap2", "merge", "arf", "mergeguard", "prune")


@dataclass(frozen=True)
class HardenConfig:
    """Hyper-parameters of :func:`harden` (all recorded in ``mergeshield_harden.json``)."""

    steps: int = 120
    batch_size: int = 16
    lr: float = 3e-5
    weight_decay: float = 0.0
    lam: float = 1.0  # weight of every simulated-merge term D
    s_min: float = 0.05
    s_max: float = 2.0
    delta: float = 0.05
    weighting: str = "inv"  # w(s): "inv" (1/s), "inv_sqrt", "none"
    proxies: tuple[str, ...] = ()  # folders of proxy fine-tunes of the same base
    c_min: float = 0.5  # merge-aware: the proxy's smallest coefficient (its task kept)
    c_max: float = 1.0
    ties_density: float = 0.2
    arf_heads: bool = True
    guard_alpha: float = 0.01
    guard_beta: float = 1.0
    guard_fraction: float = 0.1  # share of least-important entries negated
    guard_keep_layers: float = 0.1  # share of most-changed layers never negated
    prune_fraction: float = 0.2  # share of each tensor's smallest |tau| entries reset
    train_head: bool = False
    train_embeddings: bool = False  # the embeddings are half of MiniLM; frozen by default
    max_len: int = 32
    seed: int = 0
