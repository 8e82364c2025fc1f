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

``D`` has a blind spot: accuracy reads the *ranking* of the classes, and a merge whose logits
are only scaled towards 0 has ``D`` near 0 while every prediction stays right.  Measured on the
small text family (session 15): after ``amerge+arf`` at lr 3e-5, the AGA recovery of the
release has ``D = 0.0013`` on the victim's validation data and accuracy 0.89 (the release
0.91, the base 0.23).  ``target="margin"`` (the default) replaces every merged-model term by
the scale-free rank margin of the true label ``y`` (a causal LM: the answer token),

``R(theta) = mean softplus(m + mu)``, ``m = (z_y - max_{c != y} z_c) / rms(z - mean_c z)``

(the spread taken over the batch), which falls only when the true class trails another by
``mu`` logit spreads (``margin``), and adds its mirror ``softplus(mu - m)`` on the release to
``L_keep`` (the release's own ranking is what its accuracy reads).

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
  ``ties_density`` magnitudes per tensor (what TIES keeps); with probability 1/3 ``tau_p`` is
  kept only outside attention (Q, K, V, O), as it acts in a merge with a protected release
  that re-basin or Procrustes brought back to the base's MLP frame while its heads keep their
  maps.  Without proxies, ``tau_p`` is a random Gaussian direction with the per-tensor norm
  of ``tau``.
* ``arf`` (anchor-repulsive; AGA paper's proposed fix, our differentiable version):
  ``Delta = s (rec(theta_1) - theta_0)``, ``s`` from {1} U the TRAP2 set, where ``rec`` is the AGA
  recovery simulated in closed form.  For one head, with ``X = [W_h | b_h]`` the ``d_h x (d+1)``
  rows of Q, K or V (for O: ``W_O[:, h]^T``), AGA's ridge fit onto the base returns
  ``X_0 Pi`` with ``Pi = X^T (X X^T)^-1 X``, i.e. ``X - tau_h Pi`` (papers.md 4.2): the part of
  ``tau_h`` inside the head's row space is discarded, the rest (and the MLP, which Hungarian
  matching restores exactly) survives.  Pushing ``rec`` to uniform moves the useful part of
  ``tau`` into ``Pi`` (and out of the MLP).  Useful only together with a symmetry defense
  (otherwise nobody needs to align).
* ``amerge`` (merge-aware after alignment; ours): the ``merge`` term's merges with the
  release's task vector ``tau`` replaced by that of its simulated AGA recovery,
  ``Delta = s (rec(theta_1) - theta_0) + c tau_p`` (``rec`` as in ``arf`` above, the same
  ``s``, ``c`` and trimming as ``merge``).  ``merge`` sees merges of the release as published;
  a free-rider facing a symmetry defense aligns first and merges the aligned release, which
  ``amerge`` simulates.  Like ``arf``, useful only together with a symmetry defense.
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

**Causal LMs** (``...ForCausalLM``; the owner's data are prompt/answer pairs, encoded as
``prompt + answer + eos``): a causal LM has no head, a merge replaces it whole, and its task is
solved when the greedy answer is exact, i.e. when at every answer position ``t`` (the
positions whose next token is an answer or eos token ``a_t``) ``argmax p_t = a_t``.  The
"prediction" of every formula above is therefore the next-token distribution ``p_t`` over the
vocabulary (size ``V``) at the answer positions, and every average runs over the answer
positions of the batch: ``L_keep = (CE(a_t, p_t) + KL(p_orig,t || p_t)) / 2`` (``p_orig,t``: the
release's own next-token distribution), and ``D = KL(U_V || p_t) = -log V - (1/V) sum_v log
p_t(v)``.  A uniform ``p_t`` holds no information about ``a_t`` (its argmax is a tie), so a
merge with ``D = 0`` answers nothing, and ``D`` stays bounded below as before.  Prompt
positions enter no term (the release's function there is free; only answers are scored).

Which tensors train: a classifier's backbone; a causal LM's tensors that the release changed
from the base (a tensor its fine-tune left at the base's, such as the lower layers of the
SmolLM2 experts, stays so: the hardening continues the owner's fine-tune, and a backward pass
through the frozen lower layers is saved); embeddings only with ``train_embeddings``.  The
loop is :func:`mergeshield.modeling.train_steps` without dropout (every term sees one
function).

The result is saved with stock ``save_pretrained`` (loads with ``AutoModelFor...``) plus a
``mergeshield_harden.json`` record (configuration and loss history).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call

from mergeshield.errors import MergeShieldError
from mergeshield.folders import atomic_dir, copy_preprocessing_files
from mergeshield.hardening.components import REGISTRY, Run, rank_margin, scored, targets
from mergeshield.hardening.config import HardenConfig, parse_method
from mergeshield.hardening.data import (
    TrainingSet,
    encode_examples,
    encode_prompt_answers,
    prompt_answers,
    read_examples,
)
from mergeshield.modeling import (
    backbone_map,
    base_in_module_names,
    load_model,
    model_kind,
    quiet_transformers,
    take_batch,
    train_steps,
)
from mergeshield.tasks import TaskData

Tensors = dict[str, torch.Tensor]


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
    """Fine-tune the release ``task_model`` with the components of ``method`` (see the module
    docstring) on ``data`` for ``config.steps`` steps; save it to ``out``; return it.

    ``base``: the public base model folder (``theta_0``).  ``data``: for a classifier any
    source that :func:`mergeshield.hardening.data.read_examples` accepts, for a causal LM
    prompt/answer pairs (:func:`mergeshield.hardening.data.prompt_answers`).  ``overrides``
    replace fields of ``config``.  Text (``AutoModelForSequenceClassification``) and image
    (``AutoModelForImageClassification``) classifiers, causal LMs (``AutoModelForCausalLM``).
    ``out`` is written to a temporary folder and renamed into place when complete (an
    existing ``out`` is replaced).
    """
    cfg = replace(config or HardenConfig(), **overrides)
    parts = parse_method(method)
    components = [c for name, c in REGISTRY.items() if name in parts]
    task_model, base, out = Path(task_model), Path(base), Path(out)
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    kind = model_kind(task_model)
    model = load_model(task_model, kind)
    tok_dir = task_model if (task_model / "tokenizer_config.json").is_file() else base
    train = training_set(data, kind, task_model, model, tok_dir, cfg.max_len)

    base_t = base_in_module_names(model, base)  # transformers 5 renames e.g. ViT on load
    names = backbone_map(model, base_t)
    theta0 = {n: base_t[s] for n, s in names.items()}
    # the token embedding and output matrices (a causal LM's are not under ".embeddings.")
    ends = [model.get_input_embeddings(), model.get_output_embeddings()]
    embeddings = {
        id(m.weight) for m in ends if isinstance(getattr(m, "weight", None), torch.Tensor)
    }
    for name, p in model.named_parameters():
        embedding = ".embeddings." in f".{name}" or id(p) in embeddings
        changed = name in names and (kind != "llm" or not torch.equal(p.detach(), theta0[name]))
        backbone = changed and (cfg.train_embeddings or not embedding)
        p.requires_grad_(backbone or (cfg.train_head and name not in names))
    if not any(p.requires_grad for p in model.parameters()):
        raise MergeShieldError(f"{task_model}: no tensor to train (none differs from {base})")

    def forward(params: Tensors, batch: Tensors) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "row")}
        logits = functional_call(model, params, args=(), kwargs=inputs).logits
        return scored(logits, batch["labels"])

    data_t = train.tensors | {"row": torch.arange(len(train))}
    with torch.no_grad():
        orig = [
            forward(dict(model.named_parameters()), take_batch(data_t, slice(i, i + 64)))
            for i in range(0, len(train), 64)
        ]
    orig_logits = torch.cat(orig)
    # per example: how many rows of orig_logits are its own (1, or its answer's length)
    counts = torch.tensor([len(targets(y[None])) for y in train.tensors["labels"]])
    offsets = torch.cumsum(counts, 0) - counts
    fixed_tau = {
        n: (p.detach() - theta0[n])
        for n, p in model.named_parameters()
        if n in names and not p.requires_grad
    }
    run = Run(model, cfg, gen, names, theta0, base_t, base, fixed_tau, forward)
    for component in components:
        component.prepare(run)
    history: list[dict[str, float]] = []

    def loss(batch: Tensors) -> torch.Tensor:
        params = dict(model.named_parameters())
        tau = {n: fixed_tau[n] if n in fixed_tau else params[n] - theta0[n] for n in names}
        logits = forward(params, batch)
        log_p = torch.log_softmax(logits, -1)
        rows = torch.cat(
            [torch.arange(int(offsets[i]), int(offsets[i] + counts[i])) for i in batch["row"]]
        )
        p_orig = torch.softmax(orig_logits[rows], -1)
        target = targets(batch["labels"])
        keep = (
            0.5 * torch.nn.functional.nll_loss(log_p, target)
            + 0.5 * (p_orig * (torch.log(p_orig + 1e-12) - log_p)).sum(-1).mean()
        )
        if cfg.target == "margin":  # the release's ranking kept as the merges' is pushed
            keep = keep + rank_margin(logits, target, cfg.margin, trail=False)
        total = keep
        record = {"step": float(len(history)), "keep": float(keep.detach())}
        for component in components:
            term = component.loss(run, params, tau, batch)
            if term is not None:
                record[component.record] = float(term[0].detach())
                total = total + term[1]
        record["loss"] = float(total.detach())
        history.append(record)
        return total

    def after_step(step: int, value: float) -> None:
        if progress and (step % 10 == 1 or step == steps):
            print(json.dumps({k: round(v, 4) for k, v in history[-1].items()}), flush=True)

    steps = cfg.steps if any(c.trains for c in components) else 0  # "prune" trains nothing
    batches = (torch.randint(0, len(train), (cfg.batch_size,), generator=gen) for _ in range(steps))
    train_steps(
        model,
        data_t,
        batches,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        loss=loss,
        after_step=after_step,
        dropout=False,
    )

    with torch.no_grad():
        for component in components:
            component.finish(run)
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
        copy_preprocessing_files(tok_dir, tmp)
        (tmp / "mergeshield_harden.json").write_text(json.dumps(record_out, indent=1) + "\n")
    return out


def training_set(
    data: Any, kind: str, task_model: Path, model: torch.nn.Module, tok_dir: Path, max_len: int
) -> TrainingSet:
    """The model inputs and ``labels`` of ``data`` for a ``kind`` model: prompt/answer pairs
    for a causal LM, labelled examples of the classifier's kind otherwise."""
    if kind == "llm":
        from transformers import AutoTokenizer

        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        if tokenizer.eos_token_id is None:
            raise MergeShieldError(
                f"{tok_dir}: the tokenizer has no eos token (answers end with it)"
            )
        return TrainingSet(encode_prompt_answers(*prompt_answers(data), tokenizer, max_len))
    examples = read_examples(data)
    if examples.kind != kind:
        raise MergeShieldError(
            f"{task_model} is a {kind} classifier but the training data holds {examples.kind}"
        )
    return encode_examples(
        examples, task_model, model.config, tokenizer_dir=tok_dir, max_len=max_len
    )


def harden_and_protect(
    task_model: str | os.PathLike,
    base: str | os.PathLike,
    data: TaskData | str | Path | Sequence[tuple[Any, Any]],
    out: str | os.PathLike,
    *,
    method: str,
    defense: str | None,
    seed: int | None = None,
    key_out: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = False,
    **overrides: Any,
) -> Any:
    """Harden ``task_model`` (:func:`harden`), then apply the symmetry ``defense`` (None: none)
    and publish the result at ``out``; returns ``protect``'s result, or ``out`` without a
    defense.  ``seed`` (default: fresh OS randomness) drives both steps; with a defense it is a
    secret like the key.  Inputs are checked before any training; the hardened model lives in
    a temporary folder beside ``out``, removed in every case."""
    from mergeshield.checkpoint import check_output_path, open_checkpoint
    from mergeshield.defenses import get_defense
    from mergeshield.protect import check_seed, protect

    check_seed(seed)
    if defense is not None:
        get_defense(defense)  # an unknown name fails before any training
    if key_out is not None and defense is None:
        raise MergeShieldError(
            "key_out (--key-out) needs a defense (--then-protect other than none): hardening "
            "alone has no key"
        )
    cfg = replace(HardenConfig(), **overrides)  # checked before anything is trained
    parse_method(method)
    task_model, base, out = Path(task_model), Path(base), Path(out)
    for folder in (task_model, base, *map(Path, cfg.proxies)):
        open_checkpoint(folder)
    inputs = [base, *cfg.proxies] + ([data] if isinstance(data, str | Path) else [])
    check_output_path(task_model, out, overwrite, inputs)
    train_seed = seed if seed is not None else secrets.randbits(63)
    options = dict(method=method, config=replace(cfg, seed=train_seed), progress=progress)
    if defense is None:
        return harden(task_model, base, data, out, **options)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.harden-", dir=out.parent))
    try:
        hardened = harden(task_model, base, data, work / "hardened", **options)
        return protect(
            hardened,
            out,
            defense,
            base=base,
            seed=seed,
            key_out=key_out,
            overwrite=overwrite,
            progress=progress,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
