"""Commands that act as the free-rider does, and the owner's answer: merge, attack, detect."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from mergeshield.cli.command import call, command
from mergeshield.errors import MergeShieldError


def _add_merge(sub) -> None:
    p = command(sub, "merge", _run_merge)
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


def _run_merge(args) -> int:
    """merge checkpoints with mergekit, as free-riders do

    Merge MODELS (checkpoints that share BASE) with mergekit. Classification checkpoints are
    reduced to their backbone first, as free-riders merge backbones.
    """
    from mergeshield.checkpoint import check_output_path, check_same_architecture, open_checkpoint
    from mergeshield.folders import scratch
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
    with scratch("merge") as work:
        backbones = [
            extract_backbone(m, args.base, work / f"{i}") for i, m in enumerate(args.models)
        ]
        merge(args.method, args.base, backbones, args.out, coefficient=coefficient, seed=args.seed)
    print(
        f"merged {len(args.models)} model(s) with {args.method} "
        f"(coefficient {coefficient:g}) -> {args.out}"
    )
    return 0


def _add_attack(sub) -> None:
    from mergeshield.attacks import ATTACKS

    p = command(sub, "attack", _run_attack)
    p.add_argument("protected", type=Path)
    p.add_argument("base", type=Path, help="the public pretrained base model folder")
    p.add_argument("out", type=Path)
    p.add_argument("--method", "-m", default="aga", choices=sorted(ATTACKS))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", "-q", action="store_false", dest="progress")


def _run_attack(args) -> int:
    """align a protected checkpoint back onto its public base model

    The informed adversary: undo a protection using only the public base model (no key), so that
    ordinary merges work again. Writes a checkpoint to OUT.
    """
    from mergeshield.attacks import attack

    out = call(attack, args)
    print(f"aligned {args.protected} onto {args.base} with {args.method} -> {out}")
    return 0


def _add_detect(sub) -> None:
    from mergeshield.attacks import ATTACKS

    p = command(sub, "detect", _run_detect)
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


def _run_detect(args) -> int:
    """is the owner's release inside SUSPECT (merged, aligned, fine-tuned)?

    Measure how much of the release's own task vector (its residual after the shared task
    direction) the suspect carries, after aligning it onto the base; print a one-line verdict
    with the false-positive probability, write report.json and detect.png. Exits 0 when the
    release is found, 1 when not, 2 on bad input.
    """
    from mergeshield.detect import detect

    result = call(detect, args, attack=None if args.attack == "none" else args.attack)
    print(result.line())
    return 0 if result.found else 1


COMMANDS: list[Callable] = [
    _add_merge,
    _add_attack,
    _add_detect,
]
