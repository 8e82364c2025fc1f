"""The loss components of ``harden``, one registered object each (:data:`REGISTRY`).

Every step, each component of the method draws one simulated merge ``theta_0 + Delta(tau)`` of
the release ``theta_0 + tau`` and returns ``D`` of it (recorded) and its weighted term of the
loss (added); a component may also change the weights once training ends (:meth:`finish`).
The maths of each is in :mod:`mergeshield.hardening.harden`'s docstring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from mergeshield.architectures import AttentionSpec, describe
from mergeshield.attacks.adaptive import perturb_update
from mergeshield.attacks.align import ridge_fit
from mergeshield.attacks.matching import head_rows, out_heads
from mergeshield.errors import MergeShieldError
from mergeshield.folders import load_tensors
from mergeshield.hardening.config import COMPONENTS, HardenConfig
from mergeshield.hardening.data import IGNORE
from mergeshield.merging.kernels import magnitude_mask
from mergeshield.registry import Registry

Tensors = dict[str, torch.Tensor]


@dataclass
class Run:
    """What the components share, set up once before training.

    ``names``: model parameter name -> base tensor name (the backbone); ``theta0``: the base
    tensor of every such parameter; ``base``: every base tensor, keyed like ``names``' values
    (:func:`mergeshield.modeling.base_in_module_names`); ``base_folder``: where it was read;
    ``fixed_tau``: the
    update of backbone parameters that are not trained; ``forward(params, batch)``: the
    predictions the losses look at (:func:`mergeshield.hardening.harden.scored`: a
    classifier's logits, a causal LM's next-token logits at the answer positions) of the
    model with ``params`` in place of its own."""

    model: torch.nn.Module
    cfg: HardenConfig
    gen: torch.Generator
    names: dict[str, str]
    theta0: Tensors
    base: Tensors
    base_folder: Path
    fixed_tau: Tensors
    forward: Callable[[Tensors, Tensors], torch.Tensor]
    cache: dict[str, Any] = field(default_factory=dict)  # what a component prepares


class Component:
    """One term of the hardening loss.  ``trains``: False for a component that only changes the
    weights after training (``prune``: alone, it trains nothing)."""

    name: ClassVar[str]
    record: ClassVar[str]  # its key in the loss history
    trains: ClassVar[bool] = True

    def prepare(self, run: Run) -> None:
        """Set up once before the first step (default: nothing)."""

    def loss(
        self, run: Run, params: Tensors, tau: Tensors, batch: Tensors
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(recorded value, weighted loss term)`` for one step; None adds nothing."""
        return None

    def finish(self, run: Run) -> None:
        """Change the trained weights once, after the last step (default: nothing)."""


REGISTRY: Registry[Component] = Registry("harden component")


def register(component: type[Component]) -> type[Component]:
    """Register one instance of ``component`` (a class decorator); its name must be one of
    :data:`mergeshield.hardening.config.COMPONENTS`, in that order."""
    if component.name != COMPONENTS[len(REGISTRY)]:
        raise AssertionError(f"{component.name} is not the next of hardening.config.COMPONENTS")
    REGISTRY.register(component())
    return component


# ----------------------------------------------------------------------------- shared maths


def scored(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The predictions the losses look at: a classifier's logits ``[B, C]`` (``labels [B]``);
    a causal LM's next-token logits at the answer positions ``[M, V]`` (``labels [B, T]``,
    :data:`IGNORE` off the answer), in the order of :func:`targets`."""
    return logits if labels.dim() == 1 else logits[:, :-1][labels[:, 1:] != IGNORE]


def targets(labels: torch.Tensor) -> torch.Tensor:
    """What :func:`scored`'s rows should predict: the labels, or the answer and eos tokens."""
    if labels.dim() == 1:
        return labels
    target = labels[:, 1:]
    return target[target != IGNORE]


def uniform_divergence(logits: torch.Tensor) -> torch.Tensor:
    """``KL(U || softmax(logits))`` averaged over the batch: ``-log C - mean_c log p_c`` >= 0."""
    log_p = torch.log_softmax(logits, dim=-1)
    return (-math.log(logits.shape[-1]) - log_p.mean(-1)).mean()


def scale_weight(s: float, weighting: str) -> float:
    """TRAP2's ``w(s)``: ``1/s`` ("inv"), ``1/sqrt(s)`` ("inv_sqrt") or 1 ("none")."""
    return {"inv": 1.0 / s, "inv_sqrt": 1.0 / math.sqrt(s), "none": 1.0}[weighting]


def sample_scale(gen: torch.Generator, cfg: HardenConfig) -> float:
    """``s ~ U(s_min, 1 - delta) U U(1 + delta, s_max)`` (uniform over the union)."""
    low = (1.0 - cfg.delta) - cfg.s_min
    high = cfg.s_max - (1.0 + cfg.delta)
    u = float(torch.rand((), generator=gen)) * (low + high)
    return cfg.s_min + u if u < low else 1.0 + cfg.delta + (u - low)


def topk_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim of ``t`` (:func:`mergeshield.merging.kernels.magnitude_mask`; entries tied
    at the threshold all kept: Adam's first steps leave many equal magnitudes, and mergekit's
    full sort in every step would dominate the training), the mask not differentiated."""
    if density >= 1.0:
        return t
    return t * magnitude_mask(t.detach(), density, exact_ties=False)


def rank_margin(
    logits: torch.Tensor, target: torch.Tensor, margin: float, trail: bool = True
) -> torch.Tensor:
    """``softplus(m + margin)`` averaged over the rows (``trail=False``: ``softplus(margin -
    m)``), with ``m = (z_y - max_{c != y} z_c) / S`` the true class's lead over the best other
    class in units of the batch's logit spread ``S = rms(z - mean_c z)`` (over every row and
    class: a row's own spread would leave two classes only the sign of the lead).  Scale-free:
    multiplying the logits by any ``t > 0`` leaves it unchanged, so unlike ``D`` it cannot be
    met by a merge that keeps the ranking and only lowers its confidence (accuracy reads the
    ranking).  Bounded below by 0: a row whose true class trails (leads) by ``margin``
    spreads or more contributes little."""
    centred = logits - logits.mean(-1, keepdim=True)
    spread = centred.square().mean().sqrt().clamp_min(1e-6)
    true = logits.gather(-1, target[:, None])
    others = logits.scatter(-1, target[:, None], float("-inf")).max(-1, keepdim=True).values
    lead = (true - others) / spread
    return torch.nn.functional.softplus((lead if trail else -lead) + margin).mean()


def merged_divergence(run: Run, params: Tensors, delta: Tensors, batch: Tensors) -> torch.Tensor:
    """The term of the simulated merge ``theta_0 + Delta`` on ``batch``: ``D`` (the uniform
    divergence) for ``target="uniform"``, the scale-free :func:`rank_margin` of the true
    labels (a causal LM's answer tokens) for ``target="margin"``."""
    merged = params | {n: run.theta0[n] + delta[n] for n in run.names}
    logits = run.forward(merged, batch)
    if run.cfg.target == "margin":
        return rank_margin(logits, targets(batch["labels"]), run.cfg.margin)
    return uniform_divergence(logits)


# ----------------------------------------------------------------------------- components


@register
class Trap2(Component):
    """``Delta = s tau``, ``s`` from :func:`sample_scale`, weight ``w(s)``."""

    name, record = "trap2", "trap2"

    def loss(self, run, params, tau, batch):
        s = sample_scale(run.gen, run.cfg)
        d = merged_divergence(run, params, {n: s * tau[n] for n in run.names}, batch)
        return d, run.cfg.lam * scale_weight(s, run.cfg.weighting) * d


def proxy_vectors(
    folders: Sequence[str | Path], names: dict[str, str], base: Tensors, prefix: str, rename
) -> list[Tensors]:
    """Task vectors ``theta_p - theta_0`` of proxy fine-tunes, keyed by model parameter name:
    a proxy's stored names lose the base-model ``prefix`` and go through ``rename``
    (:func:`mergeshield.modeling.stored_to_module_names`) to meet ``base``'s keys."""
    vectors = []
    for folder in folders:
        tensors = {}
        for key, value in load_tensors(Path(folder)).items():
            short = key[len(prefix) + 1 :] if prefix and key.startswith(prefix + ".") else key
            tensors[rename.get(short, short)] = value
        vec = {}
        for name, short in names.items():
            if short not in tensors:
                raise MergeShieldError(f"proxy {folder} lacks {name}")
            vec[name] = tensors[short].float() - base[short].float()
        vectors.append(vec)
    return vectors


@register
class Merge(Component):
    """The merge-aware term: ``Delta = s tau + c tau_p`` for merges that serve both tasks."""

    name, record = "merge", "merge"

    def prepare(self, run):
        from mergeshield.modeling import merged_part, merged_prefix, stored_to_module_names

        model = run.model
        rename = stored_to_module_names(merged_part(model), run.base_folder)
        prefix = merged_prefix(model)
        proxies = proxy_vectors(run.cfg.proxies, run.names, run.base, prefix, rename)
        density = run.cfg.ties_density
        run.cache["proxies"] = proxies
        run.cache["proxies_trim"] = [
            {n: topk_mask(t, density) for n, t in v.items()} for v in proxies
        ]
        run.cache["fixed_trim"] = {n: topk_mask(t, density) for n, t in run.fixed_tau.items()}
        try:
            slots = {
                name
                for att in attention_specs(run.model.config, list(run.base))
                for slot in (att.q, att.k, att.v, att.o)
                for name in (slot.weight, slot.bias)
                if name is not None
            }
        except MergeShieldError:  # fused attention: no frame-mismatched merges simulated
            slots = set()
        run.cache["attention"] = {n for n, short in run.names.items() if short in slots}

    def loss(self, run, params, tau, batch):
        return self.merged_term(run, params, tau, batch)

    def merged_term(self, run, params, release, batch):
        """One simulated merge ``theta_0 + s release + c tau_p`` (trimmed with probability
        1/2; ``tau_p`` outside attention only with probability 1/3) of the release's task
        vector ``release``: its term (:func:`merged_divergence`) and the weighted term."""
        cfg, gen = run.cfg, run.gen
        proxies = run.cache["proxies"]
        insertion = float(torch.rand((), generator=gen)) < 0.5
        c = cfg.c_min + (cfg.c_max - cfg.c_min) * float(torch.rand((), generator=gen))
        s = 1.0 if insertion else c  # both tasks kept: insertion or a symmetric merge
        trim = float(torch.rand((), generator=gen)) < 0.5
        if proxies:
            j = int(torch.randint(0, len(proxies), (), generator=gen))
            other = run.cache["proxies_trim"][j] if trim else proxies[j]
        else:
            other = {
                n: torch.randn(t.shape, generator=gen) * (t.detach().norm() / t.numel() ** 0.5)
                for n, t in release.items()
            }
            other = {n: topk_mask(t, cfg.ties_density) for n, t in other.items()} if trim else other
        if float(torch.rand((), generator=gen)) < 1 / 3:
            # the partner in another frame than the release's attention: a free-rider who
            # re-based or rotated a protected release onto the base (exact on MLP units,
            # not on the heads' maps) adds a task vector that acts only outside attention
            attention = run.cache["attention"]
            other = {n: torch.zeros_like(t) if n in attention else t for n, t in other.items()}
        fixed_trim = run.cache["fixed_trim"]
        mine = {
            n: (fixed_trim[n] if n in fixed_trim else topk_mask(release[n], cfg.ties_density))
            if trim
            else release[n]
            for n in run.names
        }
        d = merged_divergence(
            run, params, {n: s * mine[n] + c * other[n] for n in run.names}, batch
        )
        return d, cfg.lam * d


def attention_specs(config: Any, base_names: Sequence[str]) -> list[AttentionSpec]:
    """The attention of every block (base tensor names), from the architecture spec; fused or
    transposed projections (GPT-2's ``c_attn``) are refused: ARF writes head rows back."""
    specs = [block.attention for block in describe(config, base_names).blocks]
    for att in specs:
        for slot in (att.q, att.k, att.v, att.o):
            if slot.chunk is not None or slot.rows is not None or slot.transposed:
                raise MergeShieldError(
                    f"arf needs separate, untransposed attention projections; {slot.weight} is "
                    "fused or transposed (use trap2, merge or mergeguard for this model)"
                )
    return specs


def aga_recovery(
    params: Tensors, base: Tensors, names: dict[str, str], attentions: Sequence[AttentionSpec]
) -> Tensors:
    """Differentiable AGA recovery of ``params`` (no symmetry applied): per head the attack's
    own ridge fit ``T X`` (:func:`mergeshield.attacks.align.ridge_fit`, float64), i.e.
    ``X - tau_h Pi`` with ``Pi`` the projector onto the head's row space (Q/K/V rows with
    their bias as a last column, O as ``W_O[:, h]^T``); every other tensor unchanged (AGA
    restores the MLP permutation exactly).  ``names``: model parameter name -> base name."""
    model_name = {names[n]: n for n in params if n in names}
    cur = {short: params[n] for short, n in model_name.items()}
    out = dict(params)
    for att in attentions:
        for slot, n in (
            (att.q, att.n_heads),
            (att.k, att.n_kv_heads),
            (att.v, att.n_kv_heads),
            (att.o, att.n_heads),
        ):
            if slot.weight not in cur:
                continue
            read = out_heads if slot is att.o else head_rows
            x = read(cur, slot, n, att.head_dim)
            x0 = read(base, slot, n, att.head_dim)
            rec = ridge_fit(x.double(), x0.double()).to(x.dtype)
            w = cur[slot.weight]
            if slot is att.o:
                out[model_name[slot.weight]] = rec.reshape(-1, w.shape[0]).T
                continue
            out[model_name[slot.weight]] = rec[..., : w.shape[1]].reshape(w.shape)
            if slot.bias is not None:
                out[model_name[slot.bias]] = rec[..., w.shape[1]].reshape(-1)
    return out


@register
class AnchorRepulsive(Component):
    """ARF: ``Delta = s (rec(theta_1) - theta_0)``, ``s`` from {1} U the TRAP2 set."""

    name, record = "arf", "arf"

    def prepare(self, run):
        run.cache["attentions"] = attention_specs(run.model.config, list(run.base))

    def loss(self, run, params, tau, batch):
        backbone = {n: params[n] for n in run.names}
        rec = aga_recovery(backbone, run.base, run.names, run.cache["attentions"])
        s = (
            1.0
            if float(torch.rand((), generator=run.gen)) < 0.5
            else sample_scale(run.gen, run.cfg)
        )
        d = merged_divergence(
            run, params, {n: s * (rec[n] - run.theta0[n]) for n in run.names}, batch
        )
        return d, run.cfg.lam * scale_weight(s, run.cfg.weighting) * d


@register
class AlignedMerge(Merge):
    """The merge-aware term after the alignment attack: ``Delta = s (rec(theta_1) - theta_0)
    + c tau_p``, the merges of :class:`Merge` with the release's task vector replaced by that
    of its AGA recovery (what a free-rider who aligns first merges)."""

    name, record = "amerge", "amerge"

    def prepare(self, run):
        super().prepare(run)
        run.cache["attentions"] = attention_specs(run.model.config, list(run.base))

    def loss(self, run, params, tau, batch):
        backbone = {n: params[n] for n in run.names}
        rec = aga_recovery(backbone, run.base, run.names, run.cache["attentions"])
        release = {n: rec[n] - run.theta0[n] for n in run.names}
        return self.merged_term(run, params, release, batch)


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: ``...layer.<i>`` for encoder blocks, else its module."""
    parts = name.split(".")
    for key in ("layer", "layers"):  # BERT/ViT stored names, transformers-5 module names
        if key in parts:
            i = parts.index(key)
            return ".".join(parts[: i + 2])
    return ".".join(parts[:-1])


def layer_norms(theta0: Tensors) -> dict[str, torch.Tensor]:
    """``||theta_0,l||^2`` per layer (the MergeGuard penalty is relative to it)."""
    norms: dict[str, torch.Tensor] = {}
    for n, t in theta0.items():
        norms[layer_of(n)] = norms.get(layer_of(n), torch.zeros(())) + t.square().sum()
    return {k: v.clamp_min(1e-12) for k, v in norms.items()}


@register
class MergeGuard(Component):
    """MergeGuard: a relative per-layer L2 penalty while training, partial negation after."""

    name, record = "mergeguard", "l2"

    def prepare(self, run):
        run.cache["layer_norms"] = layer_norms(run.theta0)

    def loss(self, run, params, tau, batch):
        norms = run.cache["layer_norms"]
        penalty = sum(tau[n].square().sum() / norms[layer_of(n)] for n in run.names)
        return penalty, run.cfg.guard_alpha * penalty

    def finish(self, run):
        """``theta <- theta - beta M . tau``; ``M`` covers every entry outside the
        ``guard_keep_layers`` most-changed layers (relative ``||tau_l|| / ||theta_0,l||``)
        except the ``guard_fraction`` least important ones (smallest ``|tau|``)."""
        cfg = run.cfg
        params = dict(run.model.named_parameters())
        rel: dict[str, float] = {}
        for n in run.names:
            layer = layer_of(n)
            rel[layer] = rel.get(layer, 0.0) + float((params[n] - run.theta0[n]).square().sum())
        norms = layer_norms(run.theta0)
        order = sorted(rel, key=lambda k: rel[k] / float(norms[k]), reverse=True)
        protected_layers = set(order[: max(1, round(cfg.guard_keep_layers * len(order)))])
        candidates = [n for n in run.names if layer_of(n) not in protected_layers]
        flat = torch.cat([(params[n] - run.theta0[n]).abs().flatten() for n in candidates])
        k = max(1, int(cfg.guard_fraction * flat.numel()))
        threshold = flat.kthvalue(k).values
        for n in candidates:
            tau = params[n] - run.theta0[n]
            params[n].sub_(cfg.guard_beta * (tau.abs() > threshold) * tau)


@register
class Prune(Component):
    """PaRaMS' pruning: after training, the ``prune_fraction`` smallest ``|tau|`` entries of
    every backbone tensor (ties at the threshold included) go back to ``theta_0`` (the attack
    side's :func:`mergeshield.attacks.adaptive.perturb_update`, applied by the owner)."""

    name, record, trains = "prune", "prune", False

    def finish(self, run):
        params = dict(run.model.named_parameters())
        backbone = {n: params[n].detach() for n in run.names}
        pruned = perturb_update(backbone, run.theta0, prune=run.cfg.prune_fraction)
        for n in run.names:
            params[n].copy_(pruned[n])
