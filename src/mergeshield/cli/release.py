"""Commands on the owner's release: protect, verify, unprotect, defenses, harden."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from mergeshield.cli.command import call, command, parsed
from mergeshield.errors import MergeShieldError


def _add_protect(sub) -> None:
    from mergeshield.defenses import DEFENSES

    p = command(sub, "protect", _run_protect)
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
    p.add_argument("--quiet", "-q", action="store_false", dest="progress", help="no progress bar")


def _run_protect(args) -> int:
    """write a protected copy of a checkpoint folder

    Write a protected copy of MODEL to OUT: the same function, weights far from the original, so
    naive merges with models of the same base collapse. Informed attackers (coefficient-1
    merges, alignment to the base) can undo this; `mergeshield audit` measures how much.
    """
    from mergeshield.allocator import keep_freed_memory
    from mergeshield.defenses import DefenseOptions
    from mergeshield.protect import protect

    keep_freed_memory()  # this process streams one checkpoint, then exits

    options = call(
        DefenseOptions,
        args,
        scale=tuple(args.scale) if args.scale else None,
        max_cond=None if math.isinf(args.max_cond) else args.max_cond,
    )
    result = call(protect, args, options=options)
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
    p = command(sub, "verify", _run_verify)
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


def _run_verify(args) -> int:
    """check that PROTECTED computes the same function as ORIGINAL

    Run both models (stock transformers Auto classes) on the same inputs; print the max absolute
    and relative output error, how far the weights moved and, for language models, how many
    greedy next tokens differ. fp32 checkpoints are held to --tolerance; bf16/fp16 ones to a
    round trip of ORIGINAL through the same dtype (the yardstick is printed). Exits 1 for a
    different function, 2 for bad input.
    """
    from mergeshield.verify import moved_summary, verify

    texts = list(args.text or [])
    if args.texts_file:
        if not args.texts_file.is_file():
            raise MergeShieldError(f"{args.texts_file}: no such file")
        texts += [line for line in args.texts_file.read_text().splitlines() if line.strip()]
    report = call(verify, args, texts=texts or None)
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
    p = command(sub, "unprotect", _run_unprotect)
    p.add_argument("protected", type=Path)
    p.add_argument("key", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", "-q", action="store_false", dest="progress")


def _run_unprotect(args) -> int:
    """restore the original weights with the key file

    Undo a protection with the key written by `protect --key-out`.
    """
    from mergeshield.allocator import keep_freed_memory
    from mergeshield.protect import unprotect

    keep_freed_memory()

    out = call(unprotect, args)
    print(f"restored {args.protected} -> {out}")
    return 0


def _add_harden(sub) -> None:
    from mergeshield.defenses import DEFENSES
    from mergeshield.hardening.config import (
        COMPONENTS,
        DEFAULT_DEFENSE,
        DEFAULT_METHOD,
        TARGETS,
        HardenConfig,
    )

    defaults = HardenConfig()
    p = command(sub, "harden", _run_harden)
    p.add_argument(
        "task_model",
        metavar="model",
        type=Path,
        help="fine-tuned classifier or causal LM checkpoint folder",
    )
    p.add_argument("out", type=Path, help="output folder (written atomically)")
    p.add_argument("--base", type=Path, required=True, help="the public base model folder")
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="training data: .jsonl/.csv with text and label, an image folder "
        "(root/<label>/<image>), or a `datasets` save_to_disk folder; for a causal LM the same "
        "files or folder with prompt and answer (the loss is on the answer)",
    )
    p.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        help=f"components joined with '+', from {', '.join(COMPONENTS)} (default: "
        f"{DEFAULT_METHOD}; arf needs separate q/k/v/o projections)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=defaults.steps,
        help=f"default {defaults.steps} (measured on MiniLM; the ViT was hardened with 300 "
        "steps, SmolLM2 with 120)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=defaults.lr,
        help=f"default {defaults.lr:g} (MiniLM; the ViT 5e-4, SmolLM2 5e-5)",
    )
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument(
        "--lam", type=float, default=defaults.lam, help="weight of the simulated-merge terms"
    )
    p.add_argument(
        "--target",
        choices=TARGETS,
        default=defaults.target,
        help="what the simulated merges are pushed to: 'uniform' predictions (KL(U||p)), or "
        "'margin': the true class (answer token) ranked below another by --margin logit "
        "spreads, which a merge cannot meet by only lowering its confidence",
    )
    p.add_argument("--margin", type=float, default=defaults.margin, help="see --target")
    p.add_argument(
        "--max-len",
        type=int,
        default=defaults.max_len,
        help="token limit (text; a causal LM's prompt + answer + eos, prompts cut on the left)",
    )
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
        dest="defense",
        choices=[*sorted(DEFENSES), "none"],
        default=DEFAULT_DEFENSE,
        help=f"the exact symmetry defense applied to the hardened model (default "
        f"{DEFAULT_DEFENSE}; none: publish the hardened model as trained)",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="reproducible randomness (with a defense A SEED IS A KEY: keep it secret). "
        "Default: fresh OS randomness",
    )
    p.add_argument("--key-out", type=Path, help="with a defense: write the secret key to this file")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if present")
    p.add_argument(
        "--quiet", "-q", action="store_false", dest="progress", help="no progress output"
    )


def _run_harden(args) -> int:
    """fine-tune a release so that merges of it fail (needs the owner's task data)

    Continue training the classifier or causal LM MODEL on the owner's task DATA so that it
    keeps its own accuracy (a causal LM: its answers) while simulated merges of it rank the
    true label (answer token) below another (TRAP2-style scale sensitivity, merge-aware,
    anchor-repulsive ARF, MergeGuard), then apply an exact symmetry defense (default: all,
    with its secret key). Output loads with stock Auto classes. The default is the candidate
    that measured strongest on two of three families, and no candidate yet stops every
    attacked merge at a small standalone cost: see BENCHMARKS.md, 'Session 19'.
    """
    from mergeshield.hardening.config import HardenConfig
    from mergeshield.hardening.harden import harden_and_protect

    # the HardenConfig fields among the flags go to harden_and_protect's **overrides (seed,
    # also a field, is its own parameter: the same value either way)
    overrides = parsed(args, HardenConfig) | {"proxies": tuple(str(p) for p in args.proxies)}
    defense = None if args.defense == "none" else args.defense
    result = call(harden_and_protect, args, defense=defense, **overrides)
    if defense is None:
        print(f"hardened {args.task_model} with {args.method} -> {args.out}")
        return 0
    print(
        f"hardened {args.task_model} with {args.method}, then {result.defense} -> {result.output}"
    )
    if result.key:
        print(f"key (secret, do not publish): {result.key}")
    return 0


def _add_defenses(sub) -> None:
    command(sub, "defenses", _run_defenses)


def _run_defenses(args) -> int:
    """list defenses and supported model types"""
    from mergeshield.architectures import SUPPORTED_MODEL_TYPES
    from mergeshield.defenses import DEFENSES

    for d in DEFENSES.values():
        print(f"{d.name:14s} {d.summary}")
    print(f"\nsupported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    from mergeshield.defenses.published import FAMILY_NOTES  # issue 16: what differs per type

    for model_type, note in FAMILY_NOTES.items():
        print(f"\n{model_type}: {note}")
    return 0


COMMANDS: list[Callable] = [
    _add_protect,
    _add_verify,
    _add_unprotect,
    _add_defenses,
    _add_harden,
]
