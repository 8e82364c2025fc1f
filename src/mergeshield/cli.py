"""The ``mergeshield`` command.

Exit codes: 0 success, 1 a check failed (e.g. ``verify`` above its tolerance), 2 bad input
(a one-line message on stderr; nothing is written and the input is never modified).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from mergeshield import __version__
from mergeshield.errors import MergeShieldError
from mergeshield.objective import OBJECTIVES

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # mergeshield never downloads anything
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DESCRIPTION = """\
Protect a fine-tuned transformer checkpoint against unauthorized model merging, and measure
how well the protection holds (`mergeshield audit`; the honest answer is in its report).

example:
  mergeshield protect my-model/ my-model-protected/ --base base-model/ --key-out my.key
  mergeshield verify my-model/ my-model-protected/
"""


def _add_protect(sub) -> None:
    from mergeshield.defenses import DEFENSES

    p = sub.add_parser(
        "protect",
        help="write a protected copy of a checkpoint folder",
        description="Write a protected copy of MODEL to OUT: the same function, weights far from "
        "the original, so naive merges with models of the same base collapse. Informed attackers "
        "(coefficient-1 merges, alignment to the base) can undo this; `mergeshield audit` "
        "measures how much.",
    )
    p.add_argument(
        "model", type=Path, help="Hugging Face checkpoint folder (config.json + safetensors)"
    )
    p.add_argument("out", type=Path, help="output folder (written atomically)")
    p.add_argument(
        "--defense",
        "-d",
        default="all",
        choices=sorted(DEFENSES),
        help="defense to apply (default: all)",
    )
    p.add_argument(
        "--base", type=Path, help="public base model; PaRaMS moves MLP units farthest from it"
    )
    p.add_argument(
        "--seed",
        type=int,
        help="reproducible randomness. A SEED IS A KEY: whoever knows it "
        "can undo the protection; keep it secret. Default: fresh OS randomness",
    )
    p.add_argument(
        "--key-out", type=Path, help="write the secret key (needed by `unprotect`) to this file"
    )
    p.add_argument(
        "--scaling",
        default="nonsymmetric",
        choices=["diagonal", "symmetric", "nonsymmetric"],
        help="PaRaMS attention scaling variant (default: nonsymmetric)",
    )
    p.add_argument(
        "--scale",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="range of the random scales (default: each paper's)",
    )
    p.add_argument(
        "--max-cond",
        type=float,
        default=100.0,
        help="bound on the condition number of every QK/VO matrix; float error grows "
        "about as max_cond * eps(dtype) (default: 100; 'inf' for none)",
    )
    p.add_argument(
        "--flip-fraction",
        type=float,
        default=0.5,
        help="MergeBarrier: share of each head's QK directions flipped (default: 0.5)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace OUT (and the key file) if present"
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_protect)


def _run_protect(args) -> int:
    from mergeshield.allocator import keep_freed_memory
    from mergeshield.defenses import DefenseOptions
    from mergeshield.protect import protect

    keep_freed_memory()  # this process streams one checkpoint, then exits

    if not 0 < args.flip_fraction <= 1:
        raise MergeShieldError("--flip-fraction must be in (0, 1]")
    if not args.max_cond >= 1:  # NaN fails too
        raise MergeShieldError("--max-cond must be at least 1 (or inf)")
    if args.scale and not (0 < args.scale[0] <= args.scale[1] < math.inf):
        raise MergeShieldError("--scale needs finite 0 < LOW <= HIGH")
    options = DefenseOptions(
        scaling=args.scaling,
        scale=tuple(args.scale) if args.scale else None,
        max_cond=None if math.isinf(args.max_cond) else args.max_cond,
        flip_fraction=args.flip_fraction,
    )
    result = protect(
        args.model,
        args.out,
        args.defense,
        base=args.base,
        seed=args.seed,
        key_out=args.key_out,
        options=options,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(
        f"protected {args.model} with {result.defense} ({result.n_blocks} blocks) "
        f"-> {result.output}"
    )
    if result.key:
        print(f"key (secret, do not publish): {result.key}")
    if result.left_out:
        names = ", ".join(str(p.relative_to(args.model)) for p in result.left_out)
        print(f"left out (other weight files, never published): {names}")
    return 0


def _add_verify(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="check that PROTECTED computes the same function as ORIGINAL",
        description="Run both models (stock transformers Auto classes) on the same inputs; "
        "print the max absolute and relative output error, how far the weights moved and, for "
        "language models, how many greedy next tokens differ. fp32 checkpoints are held to "
        "--tolerance; bf16/fp16 ones to a round trip of ORIGINAL through the same dtype (the "
        "yardstick is printed). Exits 1 for a different function, 2 for bad input.",
    )
    p.add_argument("original", type=Path)
    p.add_argument("protected", type=Path)
    p.add_argument(
        "--text", action="append", help="input text (repeatable); default: random token ids"
    )
    p.add_argument("--texts-file", type=Path, help="file with one input text per line")
    p.add_argument(
        "--tolerance", type=float, default=1e-4, help="max relative output error (default 1e-4)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=_run_verify)


def _run_verify(args) -> int:
    from mergeshield.verify import moved_summary, verify

    texts = list(args.text or [])
    if args.texts_file:
        if not args.texts_file.is_file():
            raise MergeShieldError(f"{args.texts_file}: no such file")
        texts += [line for line in args.texts_file.read_text().splitlines() if line.strip()]
    report = verify(args.original, args.protected, texts=texts or None, tolerance=args.tolerance)
    if args.json:
        print(json.dumps(report.__dict__ | {"ok": report.ok, "bound": report.bound}, indent=2))
    else:
        print(moved_summary(report.moved))
        if report.round_trip_error is not None:
            print(
                f"yardstick: {report.yardstick} of the original, relative error "
                f"{report.round_trip_error:.3e}; accepted up to {report.bound:.3e}"
            )
        if report.tokens_differ is not None:
            also = (
                f" (round trip: {report.round_trip_tokens_differ})"
                if report.round_trip_tokens_differ is not None
                else ""
            )
            print(
                f"greedy next tokens differ at {report.tokens_differ} of "
                f"{report.tokens_compared} positions{also}"
            )
        verdict = "same function" if report.ok else "DIFFERENT function"
        print(
            f"outputs ({report.outputs}): max abs error {report.max_abs_error:.3e}, max relative "
            f"error {report.max_rel_error:.3e} (bound {report.bound:.1e}, {report.yardstick}): "
            f"{verdict}"
        )
    return 0 if report.ok else 1


def _add_unprotect(sub) -> None:
    p = sub.add_parser(
        "unprotect",
        help="restore the original weights with the key file",
        description="Undo a protection with the key written by `protect --key-out`.",
    )
    p.add_argument("protected", type=Path)
    p.add_argument("key", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(run=_run_unprotect)


def _run_unprotect(args) -> int:
    from mergeshield.allocator import keep_freed_memory
    from mergeshield.protect import unprotect

    keep_freed_memory()

    out = unprotect(
        args.protected, args.key, args.out, overwrite=args.overwrite, progress=not args.quiet
    )
    print(f"restored {args.protected} -> {out}")
    return 0


def _add_harden(sub) -> None:
    from mergeshield.defenses import DEFENSES
    from mergeshield.defenses.harden_config import COMPONENTS, HardenConfig

    defaults = HardenConfig()
    p = sub.add_parser(
        "harden",
        help="fine-tune a release so that merges of it fail (needs the owner's task data)",
        description="Continue training the classifier MODEL on the owner's task DATA so that it "
        "keeps its own accuracy while simulated merges of it predict nothing (TRAP2-style scale "
        "sensitivity, merge-aware, anchor-repulsive ARF, MergeGuard), then optionally apply an "
        "exact symmetry defense. Output loads with stock Auto classes. Whether it holds against "
        "adaptive attacks is measured, not promised: see BENCHMARKS.md, 'Beyond the papers'.",
    )
    p.add_argument("model", type=Path, help="fine-tuned classifier checkpoint folder")
    p.add_argument("out", type=Path, help="output folder (written atomically)")
    p.add_argument("--base", type=Path, required=True, help="the public base model folder")
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="training data: .jsonl/.csv with text and label, an image folder "
        "(root/<label>/<image>), or a `datasets` save_to_disk folder",
    )
    p.add_argument(
        "--method",
        default="trap2+merge",
        help=f"components joined with '+', from {', '.join(COMPONENTS)} (default: trap2+merge)",
    )
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument(
        "--lam", type=float, default=defaults.lam, help="weight of the simulated-merge terms"
    )
    p.add_argument("--max-len", type=int, default=defaults.max_len, help="token limit (text)")
    p.add_argument(
        "--prune-fraction",
        type=float,
        default=defaults.prune_fraction,
        help="'prune': share of each tensor's smallest update entries reset to the base",
    )
    p.add_argument(
        "--proxies",
        type=Path,
        nargs="+",
        default=[],
        help="other fine-tunes of the same base, simulated as merge partners ('merge')",
    )
    p.add_argument("--train-embeddings", action="store_true", help="also train the embeddings")
    p.add_argument(
        "--then-protect",
        choices=sorted(DEFENSES),
        help="apply this exact symmetry defense to the hardened model",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="reproducible randomness (with --then-protect A SEED IS A KEY: keep it secret). "
        "Default: fresh OS randomness",
    )
    p.add_argument(
        "--key-out", type=Path, help="with --then-protect: write the secret key to this file"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if present")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p.set_defaults(run=_run_harden)


def _run_harden(args) -> int:
    import secrets
    import shutil
    import tempfile

    from mergeshield.checkpoint import check_output_path, open_checkpoint
    from mergeshield.defenses.harden import harden, parse_method
    from mergeshield.protect import protect

    parse_method(args.method)
    for name in ("steps", "batch_size", "max_len"):
        if getattr(args, name) < 1:
            raise MergeShieldError(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr <= 0 or args.lam < 0:
        raise MergeShieldError("--lr must be positive and --lam non-negative")
    if not 0 <= args.prune_fraction < 1:
        raise MergeShieldError("--prune-fraction must lie in [0, 1)")
    if args.key_out and not args.then_protect:
        raise MergeShieldError("--key-out needs --then-protect (hardening alone has no key)")
    open_checkpoint(args.model)
    open_checkpoint(args.base)
    for proxy in args.proxies:
        open_checkpoint(proxy)
    check_output_path(args.model, args.out, args.overwrite, [args.base, *args.proxies, args.data])
    seed = args.seed if args.seed is not None else secrets.randbits(63)
    options = dict(
        method=args.method,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        lam=args.lam,
        max_len=args.max_len,
        prune_fraction=args.prune_fraction,
        proxies=tuple(str(p) for p in args.proxies),
        train_embeddings=args.train_embeddings,
        seed=seed,
        progress=not args.quiet,
    )
    if not args.then_protect:
        harden(args.model, args.base, args.data, args.out, **options)
        print(f"hardened {args.model} with {args.method} -> {args.out}")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.harden-", dir=args.out.parent))
    try:
        hardened = harden(args.model, args.base, args.data, work / "hardened", **options)
        result = protect(
            hardened,
            args.out,
            args.then_protect,
            base=args.base,
            seed=args.seed,
            key_out=args.key_out,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"hardened {args.model} with {args.method}, then {result.defense} -> {result.output}")
    if result.key:
        print(f"key (secret, do not publish): {result.key}")
    return 0


def _add_defenses(sub) -> None:
    p = sub.add_parser("defenses", help="list defenses and supported model types")
    p.set_defaults(run=_run_defenses)


def _run_defenses(args) -> int:
    from mergeshield.architectures import SUPPORTED_MODEL_TYPES
    from mergeshield.defenses import DEFENSES

    for d in DEFENSES.values():
        print(f"{d.name:14s} {d.summary}")
    print(f"\nsupported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    from mergeshield.defenses.published import FAMILY_NOTES  # issue 16: what differs per type

    for model_type, note in FAMILY_NOTES.items():
        print(f"\n{model_type}: {note}")
    return 0


def _add_merge(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="merge checkpoints with mergekit, as free-riders do",
        description="Merge MODELS (checkpoints that share BASE) with mergekit. Classification "
        "checkpoints are reduced to their backbone first, as free-riders merge backbones.",
    )
    p.add_argument("base", type=Path, help="the shared pretrained base model folder")
    p.add_argument("models", type=Path, nargs="+", help="fine-tuned (or protected) model folders")
    p.add_argument("--out", "-o", type=Path, required=True, help="output folder")
    p.add_argument("--method", "-m", default="task_arithmetic", help="mergekit method (see --list)")
    p.add_argument(
        "--coefficient",
        "-c",
        type=float,
        default=None,
        help="the method's scaling knob (lambda, t or weight); default: its default",
    )
    p.add_argument("--seed", type=int, default=0, help="mergekit random seed (DARE, DELLA)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_run_merge)


def _run_merge(args) -> int:
    import tempfile

    from mergeshield.checkpoint import check_output_path, check_same_architecture, open_checkpoint
    from mergeshield.merging import extract_backbone, get_method, merge

    spec = get_method(args.method)
    check_output_path(args.base, args.out, args.overwrite, args.models)
    if args.coefficient is not None and not math.isfinite(args.coefficient):
        raise MergeShieldError("--coefficient must be a finite number")
    base = open_checkpoint(args.base)
    for model in args.models:
        check_same_architecture(base, open_checkpoint(model))
    coefficient = (
        args.coefficient if args.coefficient is not None else spec.grid[len(spec.grid) // 2]
    )
    with tempfile.TemporaryDirectory(prefix="mergeshield-merge-") as work:
        backbones = [
            extract_backbone(m, args.base, Path(work) / f"{i}") for i, m in enumerate(args.models)
        ]
        merge(args.method, args.base, backbones, args.out, coefficient=coefficient, seed=args.seed)
    print(
        f"merged {len(args.models)} model(s) with {args.method} "
        f"(coefficient {coefficient:g}) -> {args.out}"
    )
    return 0


def _add_attack(sub) -> None:
    from mergeshield.attacks import ATTACKS

    p = sub.add_parser(
        "attack",
        help="align a protected checkpoint back onto its public base model",
        description="The informed adversary: undo a protection using only the public base model "
        "(no key), so that ordinary merges work again. Writes a checkpoint to OUT.",
    )
    p.add_argument("protected", type=Path)
    p.add_argument("base", type=Path, help="the public pretrained base model folder")
    p.add_argument("out", type=Path)
    p.add_argument("--method", "-m", default="aga", choices=sorted(ATTACKS))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(run=_run_attack)


def _run_attack(args) -> int:
    from mergeshield.attacks import attack

    out = attack(
        args.protected,
        args.base,
        args.out,
        args.method,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(f"aligned {args.protected} onto {args.base} with {args.method} -> {out}")
    return 0


def _audit_arguments(p, defaults) -> None:
    p.add_argument("--out", "-o", type=Path, default=defaults["out"], help="report folder")
    p.add_argument(
        "--config",
        type=Path,
        help="an audit file (YAML: your base, release, free-riders and data; see the README); "
        "it replaces the plan options below",
    )
    p.add_argument(
        "--kind",
        choices=["text", "image", "llm"],
        default="text",
        help="task family (llm: SmolLM2-135M experts, exact match of greedy answers)",
    )
    p.add_argument(
        "--setting",
        choices=["small", "full"],
        default="small",
        help="small: builds in minutes (CI, demo); full: real numbers",
    )
    p.add_argument("--victim", help="victim task (default: the family's first task)")
    p.add_argument("--free-riders", nargs="+", help="free-rider tasks (default: all others)")
    p.add_argument(
        "--defenses",
        nargs="*",
        default=defaults["defenses"],
        help="defenses to audit (none: only the unprotected merges)",
    )
    p.add_argument("--methods", nargs="+", default=defaults["methods"])
    p.add_argument("--attacks", nargs="*", default=defaults["attacks"])
    p.add_argument(
        "--grid",
        type=float,
        nargs="+",
        default=defaults["grid"],
        help="coefficients the attacker tries (default: each method's grid)",
    )
    p.add_argument(
        "--grid-stride",
        type=int,
        default=1,
        metavar="K",
        help="try every K-th coefficient of each method's grid, the largest always included",
    )
    p.add_argument(
        "--pairs",
        nargs="*",
        help="free-riders merged pairwise with the victim (default: all; none: only --merge-all)",
    )
    p.add_argument(
        "--attacked-only",
        action="store_true",
        help="merge only the attacked variants (adds an attack to an earlier audit)",
    )
    p.add_argument(
        "--merge-all",
        action="store_true",
        help="also merge the victim with all free-riders at once",
    )
    p.add_argument(
        "--objective",
        choices=list(OBJECTIVES),
        default="min",
        help="the attacker's score of a merge: min (default: the weakest merged task's share "
        "of gain kept), mean (the papers' average), victim (the victim's share alone)",
    )
    p.add_argument(
        "--no-protocol",
        action="store_true",
        help="skip the papers' fixed merges (task arithmetic 0.3 and 0.8, TIES, averaging)",
    )
    p.add_argument(
        "--interpolation",
        type=float,
        nargs="+",
        metavar="ALPHA",
        help="alphas of the base-to-model path scored on the victim (default 0 .25 .5 .75 1; "
        "0 and 1 cost nothing)",
    )
    p.add_argument("--seed", type=int, default=0, help="protection seed (a reproducible audit)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")


def _add_audit(sub) -> None:
    p = sub.add_parser(
        "audit",
        help="measure defenses against real merges and adaptive attacks",
        description="Build (or reuse) a family of fine-tuned models, protect the victim with each "
        "defense, merge it with the free-riders through mergekit at the attacker's best "
        "coefficient, optionally after adaptive attacks, and write report.md, report.json and "
        "PNG plots.",
    )
    _audit_arguments(
        p,
        {
            "out": Path("reports/audit"),
            "defenses": ["params", "mergelock", "mergebarrier"],
            "methods": ["task_arithmetic", "ties", "dare_ties", "linear"],
            "attacks": ["aga"],
            "grid": None,
        },
    )
    p.set_defaults(run=_run_audit)


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole story on the real MiniLM-L6 model, in one command",
        description="Fine-tune MiniLM-L6 on real text tasks (cached after the first run), protect "
        "the victim with PaRaMS, MergeLock and MergeBarrier, merge it with a free-rider's model "
        "through mergekit, attack it with anchor alignment (AGA), and print the verdicts. The "
        "audit it runs is the shipped file mergeshield/evaluation/families/demo.yml.",
    )
    p.add_argument("--out", "-o", type=Path, default=Path("reports/demo"), help="report folder")
    p.add_argument(
        "--kind",
        choices=["text", "llm"],
        default="text",
        help="text: MiniLM-L6 (demo.yml); llm: SmolLM2-135M generative experts (demo-llm.yml)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    p.set_defaults(run=_run_audit, demo=True)


def _add_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a classifier from a base model on your data (to build a family)",
        description="Fine-tune BASE (the whole model and a new head) on TRAIN: JSONL/CSV text "
        "with 'text' and 'label', an image folder root/<label>/*, or a datasets folder. The "
        "labels are the data's sorted label names. Writes a classification checkpoint to OUT.",
    )
    p.add_argument("base", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=Path, required=True, help="training data")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-length", type=int, default=32, help="token limit of text inputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(run=_run_finetune)


def _run_finetune(args) -> int:
    from mergeshield.evaluation.zoo import finetune_classifier

    info = finetune_classifier(
        args.base,
        args.train,
        args.out,
        epochs=args.epochs,
        lr=args.lr,
        max_len=args.max_length,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(
        f"fine-tuned {args.base} on {info['n_train']} examples ({len(info['labels'])} labels, "
        f"final loss {info['final_epoch_loss']}) -> {args.out}"
    )
    return 0


def _add_frontier(sub) -> None:
    p = sub.add_parser(
        "frontier",
        help="standalone cost vs what the best adaptive attack still merges, per candidate",
        description="For each candidate release of the victim (unprotected, a defense, a "
        "hardened model, or hardened then protected), measure its standalone accuracy and the "
        "victim accuracy of the best merge an informed attacker reaches (alignment attacks x "
        "coefficient sweep and coefficient-1 insertion, plus a short fine-tune); write "
        "frontier.md, frontier.json and frontier.png.",
    )
    p.add_argument("--out", "-o", type=Path, default=Path("reports/frontier"))
    p.add_argument("--kind", choices=["text", "image"], default="text")
    p.add_argument("--setting", choices=["small", "full"], default="small")
    p.add_argument("--victim", help="victim task (default: the family's first)")
    p.add_argument("--free-riders", nargs="+", help="default: the family's last task")
    p.add_argument(
        "--proxies", nargs="*", help="proxy fine-tunes for 'merge' (default: the second task)"
    )
    p.add_argument(
        "--candidates",
        nargs="+",
        default=["unprotected", "mergelock", "trap2+merge", "trap2+merge/mergelock"],
        help="'unprotected', a defense, a harden method, or HARDEN/DEFENSE",
    )
    p.add_argument("--steps", type=int, default=60, help="harden steps")
    p.add_argument("--lr", type=float, default=5e-5, help="harden learning rate")
    p.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"])
    p.add_argument(
        "--attacks",
        nargs="+",
        default=["none", "aga", "rebasin", "procrustes"],
        help="none, aga, rebasin, procrustes; an alignment attack may be followed by +prune "
        "or +noise (=fraction): the aligned update is then pruned or noised",
    )
    p.add_argument("--no-finetune", action="store_true", help="skip the fine-tune attack")
    p.add_argument(
        "--objective",
        choices=list(OBJECTIVES),
        default="min",
        help="the attacker's score of a merge (as in audit)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    p.set_defaults(run=_run_frontier)


def _run_frontier(args) -> int:
    import shutil

    from mergeshield.evaluation.frontier import (
        FrontierPlan,
        parse_attack,
        parse_candidate,
        run_frontier,
    )
    from mergeshield.evaluation.zoo import build_family

    candidates = [parse_candidate(c) for c in args.candidates]
    unknown = [m for m in args.methods if m not in ("task_arithmetic", "ties")]
    if unknown:
        raise MergeShieldError(f"frontier methods are task_arithmetic and ties, not {unknown}")
    for attack in args.attacks:
        parse_attack(attack)
    if args.out.exists() and any(args.out.iterdir()):
        if not args.overwrite:
            raise MergeShieldError(f"{args.out}: already exists; pass --overwrite to replace it")
        shutil.rmtree(args.out)
    family = build_family(args.kind, args.setting)
    tasks = list(family.tasks)
    victim = args.victim or tasks[0]
    proxies = args.proxies if args.proxies is not None else tasks[1:2]
    riders = args.free_riders or [t for t in tasks if t not in (victim, *proxies)][-1:]
    for t in (victim, *proxies, *riders):
        if t not in family.tasks:
            raise MergeShieldError(f"task {t!r} is not in the {args.kind} family ({tasks})")
    defaults = FrontierPlan()
    plan = FrontierPlan(
        victim=victim,
        free_riders=tuple(riders),
        proxies=tuple(proxies),
        methods=tuple(args.methods),
        grids={m: defaults.grids[m] for m in args.methods},
        attacks=tuple(args.attacks),
        finetune=None if args.no_finetune else defaults.finetune,
        objective=args.objective,
        seed=args.seed,
    )
    candidates = [
        c if c.harden is None else replace(c, harden_kwargs={"steps": args.steps, "lr": args.lr})
        for c in candidates
    ]
    results = run_frontier(plan, candidates, args.out, family=family)
    for r in results:
        s = r.summary()
        kept = ", ".join(
            f"{m} victim {s[m]['kept']:.0%} / free-rider {s[m]['partner_kept']:.0%} "
            f"({s[m]['attack']})"
            for m in plan.methods
        )
        print(f"{r.name}: standalone {r.standalone:.3f}; best joint attack keeps: {kept}")
    print(f"report: {args.out / 'frontier.md'}")
    return 0


def _run_audit(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from mergeshield.evaluation.audit import (
        HEADER,
        PAPER_SETTINGS,
        AuditPlan,
        run_audit,
        summary_table,
    )
    from mergeshield.evaluation.audit_file import builtin_file, run_audit_file

    if args.out.exists() and not args.overwrite and any(args.out.iterdir()):
        raise MergeShieldError(f"{args.out}: already exists; pass --overwrite to replace it")
    demo = {"text": "demo", "llm": "demo-llm"}.get(args.kind, "demo")
    config = builtin_file(demo) if getattr(args, "demo", False) else args.config
    if config is not None:
        result = run_audit_file(config, args.out)
    else:
        plan = AuditPlan(
            kind=args.kind,
            setting=args.setting,
            victim=args.victim,
            free_riders=tuple(args.free_riders) if args.free_riders else None,
            defenses=tuple(args.defenses),
            methods=tuple(args.methods),
            attacks=tuple(args.attacks),
            grid=tuple(args.grid) if args.grid else None,
            grid_stride=args.grid_stride,
            pairs=tuple(args.pairs) if args.pairs is not None else None,
            merge_all=args.merge_all,
            attacked_only=args.attacked_only,
            objective=args.objective,
            protocol=() if args.no_protocol else PAPER_SETTINGS,
            interpolation=(
                tuple(args.interpolation) if args.interpolation else AuditPlan.interpolation
            ),
            seed=args.seed,
        )
        result = run_audit(plan, args.out)
    plan = result.plan
    console = Console(width=None if sys.stdout.isatty() else 180)
    table = Table(
        title=f"victim: {result.victim}; gain kept = share of fine-tuning gain surviving the "
        f"merge; attacker's objective: {plan.objective}"
    )
    for column in HEADER:
        table.add_column(column)
    for row in summary_table(result):
        table.add_row(*row)
    console.print(table)
    console.print(
        "standalone victim accuracy: "
        + ", ".join(f"{k} {v:.4f}" for k, v in result.standalone.items())
    )
    console.print(f"report: {args.out / 'report.md'} ({result.seconds:.0f} s)")
    return 0


def _add_detect(sub) -> None:
    from mergeshield.attacks import ATTACKS

    p = sub.add_parser(
        "detect",
        help="is the owner's release inside SUSPECT (merged, aligned, fine-tuned)?",
        description="Measure how much of the release's own task vector (its residual after the "
        "shared task direction) the suspect carries, after aligning it onto the base; print a "
        "one-line verdict with the false-positive probability, write report.json and "
        "detect.png. Exits 0 when the release is found, 1 when not, 2 on bad input.",
    )
    p.add_argument("suspect", type=Path, help="the published model to examine")
    p.add_argument("--original", type=Path, required=True, help="your unprotected fine-tune")
    p.add_argument("--base", type=Path, required=True, help="the public base model")
    p.add_argument("--key", type=Path, help="the key of your protected release (--key-out)")
    p.add_argument(
        "--null",
        type=Path,
        nargs="+",
        default=[],
        metavar="MODEL",
        help="models known not to contain the release (same-task fine-tunes are the best)",
    )
    p.add_argument("--alpha", type=float, default=0.01, help="false-positive level (0.01)")
    p.add_argument(
        "--attack",
        default="aga",
        choices=[*sorted(ATTACKS), "none"],
        help="alignment of the suspect onto the base (default aga)",
    )
    p.add_argument("--out", type=Path, default=Path("detect-report"), help="report folder")
    p.set_defaults(run=_run_detect)


def _run_detect(args) -> int:
    from mergeshield.detect import detect

    result = detect(
        args.suspect,
        args.original,
        args.base,
        key=args.key,
        null=args.null,
        alpha=args.alpha,
        attack=None if args.attack == "none" else args.attack,
        out=args.out,
    )
    print(result.line())
    return 0 if result.found else 1


COMMANDS: list[Callable] = [
    _add_protect,
    _add_verify,
    _add_unprotect,
    _add_defenses,
    _add_harden,
    _add_merge,
    _add_attack,
    _add_detect,
    _add_audit,
    _add_finetune,
    _add_frontier,
    _add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mergeshield",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mergeshield {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    previous = _interrupt_on_sigterm()
    try:
        return args.run(args)
    except MergeShieldError as err:
        print(f"mergeshield: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, permissions: the output was not renamed into place
        print(f"mergeshield: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mergeshield: interrupted; no partial output was left", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt_on_sigterm() -> Any:
    """Make SIGTERM interrupt like Ctrl-C, so temporaries are removed on the way out (Python's
    default SIGTERM ends the process at once); returns the previous handler (None off the main
    thread, where handlers cannot be set)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, interrupt)


if __name__ == "__main__":
    sys.exit(main())
