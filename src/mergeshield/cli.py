"""The ``mergeshield`` command.

Exit codes: 0 success, 1 a check failed (e.g. ``verify`` above its tolerance), 2 bad input
(a one-line message on stderr; nothing is written and the input is never modified).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mergeshield import __version__
from mergeshield.errors import MergeShieldError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # mergeshield never downloads anything
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DESCRIPTION = """\
Protect a fine-tuned transformer checkpoint against unauthorized model merging, and measure
how well the protection holds.

  protect    rewrite a checkpoint so it computes the same function but breaks merging
  verify     check that a protected model computes the same function as the original
  unprotect  undo a protection with its key file (for the owner)
  defenses   list the defenses and supported model types
  merge      merge checkpoints with mergekit, the way free-riders do
  attack     align a protected checkpoint back to its public base model (adaptive attacks)
  audit      measure a protection against merges and attacks: tables, JSON and plots
  demo       the whole story on a real model (MiniLM-L6), in one command
"""


def _add_protect(sub) -> None:
    from mergeshield.defenses import DEFENSES

    p = sub.add_parser(
        "protect",
        help="write a protected copy of a checkpoint folder",
        description="Write a protected copy of MODEL to OUT: the same function, weights far from "
        "the original, so merges with models of the same base collapse.",
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
    from mergeshield.defenses import DefenseOptions
    from mergeshield.protect import protect

    if not 0 < args.flip_fraction <= 1:
        raise MergeShieldError("--flip-fraction must be in (0, 1]")
    if args.max_cond < 1:
        raise MergeShieldError("--max-cond must be at least 1")
    if args.scale and not 0 < args.scale[0] <= args.scale[1]:
        raise MergeShieldError("--scale needs 0 < LOW <= HIGH")
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
    return 0


def _add_verify(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="check that PROTECTED computes the same function as ORIGINAL",
        description="Run both models (stock transformers Auto classes) on the same inputs; "
        "print the "
        "max absolute and relative output error and how far each tensor group moved. Exits 1 "
        "when the relative error exceeds the tolerance.",
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
    from rich.console import Console
    from rich.table import Table

    from mergeshield.verify import verify

    texts = list(args.text or [])
    if args.texts_file:
        if not args.texts_file.is_file():
            raise MergeShieldError(f"{args.texts_file}: no such file")
        texts += [line for line in args.texts_file.read_text().splitlines() if line.strip()]
    report = verify(args.original, args.protected, texts=texts or None, tolerance=args.tolerance)
    if args.json:
        print(json.dumps(report.__dict__ | {"ok": report.ok}, indent=2))
    else:
        table = Table(title="relative L2 distance moved, per tensor group")
        table.add_column("tensor group")
        table.add_column("moved", justify="right")
        for group, dist in report.moved.items():
            table.add_row(group, f"{dist:.3f}")
        console = Console()
        console.print(table)
        verdict = "[green]same function[/green]" if report.ok else "[red]DIFFERENT function[/red]"
        console.print(
            f"outputs ({report.outputs}): max abs error {report.max_abs_error:.3e}, max relative "
            f"error {report.max_rel_error:.3e} (tolerance {report.tolerance:.0e}): {verdict}"
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
    from mergeshield.protect import unprotect

    out = unprotect(
        args.protected, args.key, args.out, overwrite=args.overwrite, progress=not args.quiet
    )
    print(f"restored {args.protected} -> {out}")
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
    return 0


COMMANDS: list[Callable] = [_add_protect, _add_verify, _add_unprotect, _add_defenses]


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
    try:
        return args.run(args)
    except MergeShieldError as err:
        print(f"mergeshield: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mergeshield: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
