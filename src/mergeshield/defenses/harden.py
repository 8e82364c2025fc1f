"""Training-time hardening: a short fine-tune from the released model that makes it unmergeable.

The exact symmetry defenses (:mod:`mergeshield.defenses.published`) keep the fine-tuned weights
``theta_1 = theta_0 + tau`` inside the symmetry orbit, and the anchor attack (AGA) maps them back
next to ``theta_1`` because ``||tau|| << ||theta_0||``.  Whatever resists must change the
*function* of the model away from the merged points, not only its coordinates.  :func:`harden`
continues training the released classifier (backbone only, the head is frozen by default) on the
owner's task data with

``J(tau) = L_keep(theta_0 + tau) + lam * sum_k w_k * D(theta_0 + Delta_k(tau))``

where ``L_keep = (CE(y, p) + KL(p_orig || p)) / 2`` keeps the standalone function (``p_orig``:
the released model's own predictions on the training data), and every term ``D`` pushes the
predictions of a *simulated merge* ``theta_0 + Delta_k(tau)`` to the uniform distribution:

``D(theta) = KL(U || p_theta) = -log C - (1/C) sum_c log p_theta(c)`` >= 0.

``D`` is bounded below (0 at uniform predictions), so unlike TRAP2's ``-lam L(theta_0 + s tau)``
(an unbounded *maximised* loss that diverges) minimising ``J`` stays finite; the merged model is
pushed to "no information" rather than to confidently wrong answers.

Components (``method`` joins them with ``+``; one Monte-Carlo sample of each per step):

* ``trap2`` (TRAP2, Jang et al. ICML 2026): ``Delta = s tau`` with ``s ~ U(s_min, 1 - delta) U
  U(1 + delta, s_max)`` (default ``U(0.05, 2)`` minus ``(0.95, 1.05)``), weight ``w(s) = 1/s``
  (compensates the ``s``-times smaller gradient for small ``s``).  Every merge operator rescales
  the task vector (task arithmetic: lambda; averaging: 1/n), so the release works only at s = 1.
* ``merge`` (merge-aware; ours): ``Delta = s tau + c tau_p`` with ``tau_p`` the task vector of a
  *proxy* fine-tune of the same base (the owner's own other fine-tunes, or public ones; in the
  study never the evaluated free-riders).  Only merges that would serve *both* tasks are
  simulated, since those are what a free-rider wants (:mod:`mergeshield.objective`): with
  probability 1/2 the coefficient-1 insertion ``theta_0 + tau + c tau_p`` with
  ``c ~ U(c_min, c_max)`` (default ``U(0.5, 1)``: below about 0.5 the proxy's task is mostly
  lost and the merge is the release itself, which must keep working), else a symmetric merge
  ``s = c ~ U(c_min, c_max)`` (task arithmetic / TIES at the coefficients where both task
  vectors count); with probability 1/2 both task vectors are first cut to their top
  ``ties_density`` magnitudes per tensor (what TIES keeps).  Without proxies, ``tau_p`` is a
  random Gaussian direction with the per-tensor norm of ``tau``.
* ``arf`` (anchor-repulsive; AGA paper's proposed fix, our differentiable version):
  ``Delta = s (rec(theta_1) - theta_0)``, ``s`` from {1} U the TRAP2 set, where ``rec`` is the AGA
  recovery simulated in closed form.  For one head, with ``X = [W_h | b_h]`` the ``d_h x (d+1)``
  rows of Q, K or V (for O: ``W_O[:, h]^T``), AGA's ridge fit onto the base returns
  ``X_0 Pi`` with ``Pi = X^T (X X^T)^-1 X``, i.e. ``X - tau_h Pi`` (papers.md 4.2): the part of
  ``tau_h`` inside the head's row space is discarded, the rest (and the MLP, which Hungarian
  matching restores exactly) survives.  Pushing ``rec`` to uniform moves the useful part of
  ``tau`` into ``Pi`` (and out of the MLP).  Useful only together with a symmetry defense
  (otherwise nobody needs to align).
* ``mergeguard`` (MergeGuard, Chen et al. CVPR 2026): a per-layer L2 penalty
  ``alpha sum_l ||tau_l||^2 / ||theta_0,l||^2`` during the fine-tune (spreads the task over
  layers), then ``theta <- theta - beta M . tau`` on a mask ``M`` that excludes the
  ``guard_keep_layers`` most-changed layers and the least-important entries (partial negation).

* ``prune`` (PaRaMS' hardening against adaptive attacks: "dropout applied to a subset of
  parameters before rearrangement, so that even if an attacker recovers the permutation,
  parameters cannot be fully restored"; their ``--sparsity-ratio`` default 0.2): after any
  training, the ``prune_fraction`` smallest ``|tau|`` entries of every backbone tensor are
  reset to ``theta_0``.  Alone (``method="prune"``) it trains nothing; it is meant to be
  followed by a symmetry defense (``--then-protect``).

The result is saved with stock ``save_pretrained`` (loads with ``AutoModelFor...``) plus a
``mergeshield_harden.json`` record (configuration and loss history).
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.func import functional_call

from mergeshield.architectures import AttentionSpec, describe
from mergeshield.attacks.matching import head_rows, out_heads
from mergeshield.defenses.harden_config import COMPONENTS, HardenConfig
from mergeshield.defenses.training_data import (
    encode_examples,
    read_examples,
)
from mergeshield.errors import MergeShieldError
from mergeshield.evaluation.tasks import TaskData
from mergeshield.evaluation.zoo import TOKENIZER_FILES
from mergeshield.folders import atomic_dir

Tensors = dict[str, torch.Tensor]
# ----------------------------------------------------------------------------- weights


def load_folder_tensors(folder: Path) -> Tensors:
    """Every tensor of the ``*.safetensors`` files of a checkpoint folder."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise MergeShieldError(f"{folder}: no .safetensors weights")
    out: Tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}
    return out


def stored_to_module_names(module: torch.nn.Module, base: Path) -> dict[str, str]:
    """``stored tensor name -> state_dict name`` for the base-model class of ``module``.

    transformers 5 renames some checkpoints on load (ViT's ``encoder.layer.0.attention.
    attention.query`` is ``layers.0.attention.q_proj`` in memory), and in-memory merges load
    stored names with ``load_state_dict``.  The map is read off the stock loader: a copy of
    ``base`` whose ``i``-th tensor is filled with the marker ``i + 1`` is loaded with
    ``from_pretrained``, and each module tensor's marker names its source.  Empty (identity)
    where the names already agree; only the safetensors headers are read for that check, and
    the marker load is done once per class and folder."""
    if set(_stored_layout(Path(base))) <= set(module.state_dict()):
        return {}
    return dict(_marker_names(type(module), str(Path(base).resolve())))


def _stored_layout(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every floating tensor of a checkpoint folder (headers only)."""
    from mergeshield.arrays import FLOAT_CODES, torch_dtype
    from mergeshield.checkpoint import open_checkpoint

    ckpt = open_checkpoint(folder)
    return {
        n: (tuple(ckpt.shapes[n]), torch_dtype(code))
        for n, code in ckpt.codes.items()
        if code in FLOAT_CODES
    }


@functools.lru_cache(maxsize=16)
def _marker_names(module_class: type, base: str) -> tuple[tuple[str, str], ...]:
    from safetensors.torch import save_file

    layout = _stored_layout(Path(base))
    order = sorted(layout)
    with tempfile.TemporaryDirectory(prefix="mergeshield-names-") as tmp:
        marked = {
            k: torch.full(layout[k][0], i + 1.0, dtype=layout[k][1]) for i, k in enumerate(order)
        }
        save_file(marked, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy2(Path(base) / "config.json", Path(tmp) / "config.json")
        loaded = module_class.from_pretrained(tmp, local_files_only=True, dtype=torch.float32)
    names: dict[str, str] = {}
    for target, tensor in loaded.state_dict().items():
        values = tensor.unique() if tensor.numel() else tensor
        if len(values) == 1 and 1 <= values.item() <= len(order) and values.item() % 1 == 0:
            names[order[int(values.item()) - 1]] = target
    missing = sorted(set(order) - set(names))
    if missing:
        raise MergeShieldError(
            f"cannot tell which {module_class.__name__} tensor {missing[0]} of {base} loads into"
        )
    return tuple(names.items())


def backbone_map(model: torch.nn.Module, base: Tensors) -> dict[str, str]:
    """``model parameter name -> base tensor name`` for every backbone parameter of ``model``
    (``bert.encoder...`` -> ``encoder...``) whose shape matches the base tensor."""
    prefix = getattr(model, "base_model_prefix", "")
    mapping = {}
    for name, p in model.named_parameters():
        short = name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name
        if short in base and base[short].shape == p.shape:
            mapping[name] = short
    if not mapping:
        raise MergeShieldError("no parameter of the task model matches a base tensor")
    return mapping


def proxy_vectors(
    folders: Sequence[str | Path],
    names: dict[str, str],
    base: Tensors,
    rename: dict[str, str] | None = None,
    prefix: str = "",
) -> list[Tensors]:
    """Task vectors ``theta_p - theta_0`` of proxy fine-tunes, keyed by model parameter name.

    A proxy's stored names lose the base-model ``prefix`` and go through ``rename`` (see
    :func:`stored_to_module_names`) to meet ``base``'s keys."""
    vectors = []
    for folder in folders:
        tensors = {}
        for key, value in load_folder_tensors(Path(folder)).items():
            short = key[len(prefix) + 1 :] if prefix and key.startswith(prefix + ".") else key
            tensors[(rename or {}).get(short, short)] = value
        vec = {}
        for name, short in names.items():
            src = tensors.get(short)
            if src is None:
                raise MergeShieldError(f"proxy {folder} lacks {name}")
            vec[name] = src.float() - base[short].float()
        vectors.append(vec)
    return vectors


def topk_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of largest-magnitude entries of ``t`` (TIES' trim), zero the
    rest; the mask itself is not differentiated."""
    if density >= 1.0:
        return t
    k = max(1, int(density * t.numel()))
    threshold = t.detach().abs().flatten().kthvalue(t.numel() - k + 1).values
    return t * (t.detach().abs() >= threshold)


# ----------------------------------------------------------------------------- losses


def uniform_divergence(logits: torch.Tensor) -> torch.Tensor:
    """``KL(U || softmax(logits))`` averaged over the batch: ``-log C - mean_c log p_c`` >= 0."""
    log_p = torch.log_softmax(logits, dim=-1)
    return (-math.log(logits.shape[-1]) - log_p.mean(-1)).mean()


def scale_weight(s: float, weighting: str) -> float:
    """TRAP2's ``w(s)``: ``1/s`` ("inv"), ``1/sqrt(s)`` ("inv_sqrt") or 1 ("none")."""
    if weighting == "inv":
        return 1.0 / s
    if weighting == "inv_sqrt":
        return 1.0 / math.sqrt(s)
    if weighting == "none":
        return 1.0
    raise MergeShieldError(f"unknown weighting {weighting!r}: inv, inv_sqrt or none")


def sample_scale(gen: torch.Generator, cfg: HardenConfig) -> float:
    """``s ~ U(s_min, 1 - delta) U U(1 + delta, s_max)`` (uniform over the union)."""
    low = (1.0 - cfg.delta) - cfg.s_min
    high = cfg.s_max - (1.0 + cfg.delta)
    u = float(torch.rand((), generator=gen)) * (low + high)
    return cfg.s_min + u if u < low else 1.0 + cfg.delta + (u - low)


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
    params: Tensors,
    base: Tensors,
    names: dict[str, str],
    attentions: Sequence[AttentionSpec],
    ridge: float = 1e-6,
) -> Tensors:
    """Differentiable simulation of AGA's recovery of ``params`` (no symmetry applied):
    per head ``X - tau_h Pi`` with ``Pi = X^T (X X^T + ridge I)^-1 X`` (Q/K/V rows with their
    bias as a last column, O as ``W_O[:, h]^T``; the row form of :mod:`mergeshield.attacks.
    matching`); every other tensor unchanged (AGA restores the MLP permutation exactly).
    ``names``: model parameter name -> base name; ``attentions``: :func:`attention_specs`."""
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
            x0 = read(base, slot, n, att.head_dim).to(x.dtype)
            gram = x @ x.transpose(1, 2) + ridge * torch.eye(x.shape[1], dtype=x.dtype)
            coef = torch.linalg.solve(gram, x @ x0.transpose(1, 2)).transpose(1, 2)  # T
            rec = coef @ x  # = X0 Pi
            w = cur[slot.weight]
            if slot is att.o:
                out[model_name[slot.weight]] = rec.reshape(-1, w.shape[0]).T
                continue
            out[model_name[slot.weight]] = rec[..., : w.shape[1]].reshape(w.shape)
            if slot.bias is not None:
                out[model_name[slot.bias]] = rec[..., w.shape[1]].reshape(-1)
    return out


# ----------------------------------------------------------------------------- main


def parse_method(method: str) -> list[str]:
    """``"trap2+merge"`` -> ``["trap2", "merge"]``, validated against :data:`COMPONENTS`."""
    parts = [p.strip() for p in method.split("+") if p.strip()]
    unknown = [p for p in parts if p not in COMPONENTS]
    if not parts or unknown:
        raise MergeShieldError(f"unknown harden method {method!r}; combine {COMPONENTS} with '+'")
    return parts


def harden(
    task_model: Path,
    base: Path,
    data: TaskData | str | Path | Sequence[tuple[Any, Any]],
    out: Path,
    *,
    method: str,
    config: HardenConfig | None = None,
    progress: bool = False,
    **overrides: Any,
) -> Path:
    """Fine-tune the released classifier ``task_model`` with the components of ``method`` (see
    the module docstring) on ``data`` for ``config.steps`` steps; save it to ``out``; return it.

    ``base``: the public base model folder (``theta_0``).  ``data``: any source that
    :func:`mergeshield.defenses.training_data.read_examples` accepts.  ``overrides`` replace
    fields of ``config``.  Text (``AutoModelForSequenceClassification``) and image
    (``AutoModelForImageClassification``) classifiers.  ``out`` is written to a temporary
    folder and renamed into place when complete (an existing ``out`` is replaced).
    """
    from transformers import (
        AutoConfig,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
    )

    cfg = replace(config or HardenConfig(), **overrides)
    parts = parse_method(method)
    task_model, base, out = Path(task_model), Path(base), Path(out)
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    examples = read_examples(data)
    model_config = AutoConfig.from_pretrained(task_model, local_files_only=True)
    is_image = any(a.endswith("ForImageClassification") for a in model_config.architectures or [])
    if examples.kind != ("image" if is_image else "text"):
        raise MergeShieldError(
            f"{task_model} is an {'image' if is_image else 'text'} classifier but the training "
            f"data holds {examples.kind}"
        )
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    auto = AutoModelForImageClassification if is_image else AutoModelForSequenceClassification
    try:
        model = auto.from_pretrained(task_model, local_files_only=True, dtype=torch.float32)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    tok_dir = task_model if (task_model / "tokenizer_config.json").is_file() else base
    train = encode_examples(
        examples, task_model, model.config, tokenizer_dir=tok_dir, max_len=cfg.max_len
    )

    # the base keyed like the model's base_model (transformers 5 renames e.g. ViT on load)
    rename = stored_to_module_names(model.base_model, base)
    base_t = {rename.get(k, k): v.float() for k, v in load_folder_tensors(base).items()}
    names = backbone_map(model, base_t)
    theta0 = {n: base_t[s] for n, s in names.items()}
    attentions = attention_specs(model.config, list(base_t)) if "arf" in parts else []
    prefix = getattr(model, "base_model_prefix", "")
    proxies = proxy_vectors(cfg.proxies, names, base_t, rename, prefix) if "merge" in parts else []

    for name, p in model.named_parameters():
        backbone = name in names and (cfg.train_embeddings or ".embeddings." not in f".{name}")
        p.requires_grad_(backbone or (cfg.train_head and name not in names))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(trainable.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    with torch.no_grad():
        orig_logits = torch.cat(
            [
                model(**_inputs(train.tensors, torch.arange(i, min(i + 64, len(train))))).logits
                for i in range(0, len(train), 64)
            ]
        )
    layer_norm0 = _layer_norms(theta0)
    fixed_tau = {
        n: (p.detach() - theta0[n])
        for n, p in model.named_parameters()
        if n in names
        if not p.requires_grad
    }
    fixed_trim = {n: topk_mask(t, cfg.ties_density) for n, t in fixed_tau.items()}
    proxies_trim = [{n: topk_mask(t, cfg.ties_density) for n, t in v.items()} for v in proxies]
    history: list[dict[str, float]] = []

    def forward(params: Tensors, batch: Tensors) -> torch.Tensor:
        return functional_call(model, params, args=(), kwargs=batch).logits

    steps = cfg.steps if set(parts) - {"prune"} else 0  # "prune" alone trains nothing
    for step in range(steps):
        idx = torch.randint(0, len(train), (cfg.batch_size,), generator=gen)
        batch = _inputs(train.tensors, idx)
        labels = train.tensors["labels"][idx]
        params = {n: p for n, p in model.named_parameters()}
        tau = {n: fixed_tau[n] if n in fixed_tau else params[n] - theta0[n] for n in names}
        logits = forward(params, batch)
        log_p = torch.log_softmax(logits, -1)
        p_orig = torch.softmax(orig_logits[idx], -1)
        keep = (
            0.5 * torch.nn.functional.nll_loss(log_p, labels)
            + 0.5 * (p_orig * (torch.log(p_orig + 1e-12) - log_p)).sum(-1).mean()
        )
        loss = keep
        record = {"step": float(step), "keep": float(keep.detach())}

        if "trap2" in parts:
            s = sample_scale(gen, cfg)
            moved = params | {n: theta0[n] + s * tau[n] for n in names}
            d = uniform_divergence(forward(moved, batch))
            loss = loss + cfg.lam * scale_weight(s, cfg.weighting) * d
            record["trap2"] = float(d.detach())

        if "merge" in parts:
            insertion = float(torch.rand((), generator=gen)) < 0.5
            c = cfg.c_min + (cfg.c_max - cfg.c_min) * float(torch.rand((), generator=gen))
            s = 1.0 if insertion else c  # both tasks kept: insertion or a symmetric merge
            trim = float(torch.rand((), generator=gen)) < 0.5
            if proxies:
                j = int(torch.randint(0, len(proxies), (), generator=gen))
                other = proxies_trim[j] if trim else proxies[j]
            else:
                other = {
                    n: torch.randn(t.shape, generator=gen) * (t.detach().norm() / t.numel() ** 0.5)
                    for n, t in tau.items()
                }
                other = (
                    {n: topk_mask(t, cfg.ties_density) for n, t in other.items()} if trim else other
                )
            mine = {
                n: (fixed_trim[n] if n in fixed_trim else topk_mask(tau[n], cfg.ties_density))
                if trim
                else tau[n]
                for n in names
            }
            moved = params | {n: theta0[n] + s * mine[n] + c * other[n] for n in names}
            d = uniform_divergence(forward(moved, batch))
            loss = loss + cfg.lam * d
            record["merge"] = float(d.detach())

        if "arf" in parts:
            rec = aga_recovery({n: params[n] for n in names}, base_t, names, attentions)
            s = 1.0 if float(torch.rand((), generator=gen)) < 0.5 else sample_scale(gen, cfg)
            moved = params | {n: theta0[n] + s * (rec[n] - theta0[n]) for n in names}
            d = uniform_divergence(forward(moved, batch))
            loss = loss + cfg.lam * scale_weight(s, cfg.weighting) * d
            record["arf"] = float(d.detach())

        if "mergeguard" in parts:
            penalty = sum(tau[n].square().sum() / layer_norm0[_layer_of(n)] for n in names)
            loss = loss + cfg.guard_alpha * penalty
            record["l2"] = float(penalty.detach())

        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable.values(), 1.0)
        opt.step()
        record["loss"] = float(loss.detach())
        history.append(record)
        if progress and (step % 10 == 0 or step == steps - 1):
            print(json.dumps({k: round(v, 4) for k, v in record.items()}), flush=True)

    if "mergeguard" in parts:
        with torch.no_grad():
            _partial_negation(model, theta0, names, cfg)
    if "prune" in parts:
        with torch.no_grad():
            _prune_update(model, theta0, names, cfg.prune_fraction)

    for p in model.parameters():
        p.requires_grad_(False)
    # published with the model: no seed (a secret when the release is then protected), no
    # local paths
    public = asdict(cfg) | {"seed": None, "proxies": len(cfg.proxies)}
    record_out = {
        "method": method,
        "config": public,
        "n_examples": len(train),
        "seconds": round(time.perf_counter() - start, 1),
        "history": history,
    }
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        for fname in (*TOKENIZER_FILES, "preprocessor_config.json"):
            if (tok_dir / fname).is_file():
                shutil.copy2(tok_dir / fname, tmp / fname)
        (tmp / "mergeshield_harden.json").write_text(json.dumps(record_out, indent=1) + "\n")
    return out


def _inputs(tensors: Tensors, idx: torch.Tensor) -> Tensors:
    """Model inputs of rows ``idx`` (no labels), token tensors cut to the longest row."""
    batch = {k: v[idx] for k, v in tensors.items() if k != "labels"}
    if "attention_mask" in batch:
        length = max(int(batch["attention_mask"].sum(1).max()), 1)
        batch["input_ids"] = batch["input_ids"][:, :length]
        batch["attention_mask"] = batch["attention_mask"][:, :length]
    return batch


def _layer_of(name: str) -> str:
    """The layer a parameter belongs to: ``...layer.<i>`` for encoder blocks, else its module."""
    parts = name.split(".")
    for key in ("layer", "layers"):  # BERT/ViT stored names, transformers-5 module names
        if key in parts:
            i = parts.index(key)
            return ".".join(parts[: i + 2])
    return ".".join(parts[:-1])


def _layer_norms(theta0: Tensors) -> dict[str, torch.Tensor]:
    """``||theta_0,l||^2`` per layer (the MergeGuard penalty is relative to it)."""
    norms: dict[str, torch.Tensor] = {}
    for n, t in theta0.items():
        norms[_layer_of(n)] = norms.get(_layer_of(n), torch.zeros(())) + t.square().sum()
    return {k: v.clamp_min(1e-12) for k, v in norms.items()}


def _partial_negation(
    model: torch.nn.Module, theta0: Tensors, names: dict[str, str], cfg: HardenConfig
) -> None:
    """MergeGuard stage 2: ``theta <- theta - beta M . tau``; ``M`` covers every entry outside
    the ``guard_keep_layers`` most-changed layers (relative ``||tau_l|| / ||theta_0,l||``)
    except the ``guard_fraction`` least important ones (smallest ``|tau|``)."""
    params = dict(model.named_parameters())
    rel: dict[str, float] = {}
    for n in names:
        layer = _layer_of(n)
        rel[layer] = rel.get(layer, 0.0) + float((params[n] - theta0[n]).square().sum())
    norms = _layer_norms(theta0)
    order = sorted(rel, key=lambda k: rel[k] / float(norms[k]), reverse=True)
    protected_layers = set(order[: max(1, round(cfg.guard_keep_layers * len(order)))])
    candidates = [n for n in names if _layer_of(n) not in protected_layers]
    flat = torch.cat([(params[n] - theta0[n]).abs().flatten() for n in candidates])
    k = max(1, int(cfg.guard_fraction * flat.numel()))
    threshold = flat.kthvalue(k).values
    for n in candidates:
        tau = params[n] - theta0[n]
        mask = tau.abs() > threshold
        params[n].sub_(cfg.guard_beta * mask * tau)


def _prune_update(
    model: torch.nn.Module, theta0: Tensors, names: dict[str, str], fraction: float
) -> None:
    """PaRaMS' pruning: in every backbone tensor, the ``fraction`` smallest ``|tau|`` entries
    (ties at the threshold included) are reset to ``theta_0`` (the attack side's
    :func:`mergeshield.attacks.adaptive.perturb_update`, applied by the owner)."""
    from mergeshield.attacks.adaptive import perturb_update

    params = dict(model.named_parameters())
    pruned = perturb_update({n: params[n].detach() for n in names}, theta0, prune=fraction)
    for n in names:
        params[n].copy_(pruned[n])
