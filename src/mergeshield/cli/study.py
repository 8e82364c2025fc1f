"""Commands that measure: audit, finetune, frontier, demo."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from mergeshield.cli.command import call, command
from mergeshield.errors import MergeShieldError
from mergeshield.hardening.config import DEFAULT_DEFENSE, DEFAULT_METHOD, TARGETS, HardenConfig
from mergeshield.objective import OBJECTIVES


def _audit_arguments(p) -> None:
    p.add_argument("--out", "-o", type=Path, default=Path("reports/audit"), help="report folder")
    p.add_argument(
        "--config",
        type=Path,
        help="an audit file (YAML: your base, release, free-riders and data; see the README); "
        "the options below given on the command line replace its fields",
    )
    p.add_argument(
        "--kind",
        choices=["text", "image", "llm"],
        help="built-in task family, audited as its shipped file KIND-SETTING.yml plans (default "
        "text; llm: SmolLM2-135M experts, exact match of greedy answers)",
    )
    p.add_argument(
        "--setting",
        choices=["small", "full"],
        help="small (default): builds in minutes (CI, demo); full: real numbers",
    )
    p.add_argument("--victim", help="victim task (default: the family's first task)")
    p.add_argument("--free-riders", nargs="+", help="free-rider tasks (default: all others)")
    p.add_argument(
        "--defenses", nargs="*", help="defenses to audit (none: only the unprotected merges)"
    )
    p.add_argument("--methods", nargs="+")
    p.add_argument("--attacks", nargs="*")
    p.add_argument(
        "--grid",
        type=float,
        nargs="+",
        help="coefficients the attacker tries (default: each method's grid)",
    )
    p.add_argument(
        "--grid-stride",
        type=int,
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
    p.add_argument("--seed", type=int, help="protection seed (a reproducible audit; default 0)")
    _dtype_argument(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")


def _dtype_argument(p) -> None:
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="the dtype the models are released and merged in (default float32; bfloat16 as "
        "most LLMs are published; scored in float32)",
    )


def _add_audit(sub) -> None:
    p = sub.add_parser(
        "audit",
        help="measure defenses against real merges and adaptive attacks",
        description="Build (or reuse) a family of fine-tuned models, protect the victim with each "
        "defense, merge it with the free-riders through mergekit at the attacker's best "
        "coefficient, optionally after adaptive attacks, and write report.md, report.json and "
        "PNG plots.",
    )
    _audit_arguments(p)
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
    _dtype_argument(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    p.set_defaults(run=_run_audit, demo=True)


def _add_finetune(sub) -> None:
    p = command(sub, "finetune", _run_finetune)
    p.add_argument("base", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=Path, required=True, help="training data")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument(
        "--max-length",
        dest="max_len",
        metavar="MAX_LENGTH",
        type=int,
        default=32,
        help="token limit of text inputs",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", "-q", action="store_false", dest="progress")


def _run_finetune(args) -> int:
    """fine-tune a classifier from a base model on your data (to build a family)

    Fine-tune BASE (the whole model and a new head) on TRAIN: JSONL/CSV text with 'text' and
    'label', an image folder root/<label>/*, or a datasets folder. The labels are the data's
    sorted label names. Writes a classification checkpoint to OUT.
    """
    from mergeshield.evaluation.zoo import finetune_classifier

    info = call(finetune_classifier, args)
    print(
        f"fine-tuned {args.base} on {info['n_train']} examples ({len(info['labels'])} labels, "
        f"final loss {info['final_epoch_loss']}) -> {args.out}"
    )
    return 0


# the exact defense alone, harden's default alone and both (what `harden` publishes)
FRONTIER_CANDIDATES = [
    "unprotected",
    DEFAULT_DEFENSE,
    DEFAULT_METHOD,
    f"{DEFAULT_METHOD}/{DEFAULT_DEFENSE}",
]


def _add_frontier(sub) -> None:
    defaults = HardenConfig()
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
    p.add_argument(
        "--builds",
        type=Path,
        metavar="DIR",
        help="keep the candidate releases in DIR and evaluate those built there before with "
        "the same settings again instead of retraining them (to add attacks or methods to a "
        "finished study); a folder built with other settings is refused (default: OUT/builds, "
        "replaced with --overwrite)",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="an audit file (as for audit): its family (built-in, your own classifiers or "
        "causal LMs), victim, free-riders, objective and seed; its defenses are the default "
        "candidates; on your own models, hardening candidates and the fine-tune attack train "
        "on the victim's train: data",
    )
    p.add_argument(
        "--kind",
        choices=["text", "image", "llm"],
        help="built-in family (default text; llm: SmolLM2-135M experts, exact match)",
    )
    p.add_argument("--setting", choices=["small", "full"], help="default small")
    p.add_argument("--victim", help="victim task (default: the family's first)")
    p.add_argument(
        "--free-riders",
        nargs="+",
        help="default: the family's last task; with two or more, each is merged with the victim "
        "and all of them at once (the all-task merge)",
    )
    p.add_argument(
        "--proxies", nargs="*", help="proxy fine-tunes for 'merge' (default: the second task)"
    )
    p.add_argument(
        "--candidates",
        nargs="+",
        help="'unprotected', a defense, a harden method, or HARDEN/DEFENSE (default: "
        f"{' '.join(FRONTIER_CANDIDATES)}, harden's defaults; with --config: unprotected "
        "and the file's defenses)",
    )
    p.add_argument(
        "--steps", type=int, default=defaults.steps, help="harden steps (harden's default)"
    )
    p.add_argument(
        "--lr", type=float, default=defaults.lr, help="harden learning rate (its default)"
    )
    p.add_argument(
        "--target",
        choices=TARGETS,
        default=defaults.target,
        help="harden's --target for every hardened candidate",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=["task_arithmetic", "ties"],
        help="merge methods (any of `mergeshield merge`'s; default task_arithmetic ties)",
    )
    p.add_argument(
        "--grid-stride",
        type=int,
        default=2,
        metavar="K",
        help="methods other than task_arithmetic (0.5 0.7 1) and ties (1 1.5 2) sweep every "
        "K-th coefficient of their own grid, the largest always (default 2)",
    )
    p.add_argument(
        "--attacks",
        nargs="+",
        default=["none", "aga", "rebasin", "procrustes"],
        help="none, aga, rebasin, procrustes; an alignment attack may be followed by +prune "
        "or +noise (=fraction): the aligned update is then pruned or noised",
    )
    p.add_argument("--no-finetune", action="store_true", help="skip the fine-tune attack")
    p.add_argument(
        "--finetune",
        type=int,
        nargs=2,
        metavar=("EXAMPLES", "STEPS"),
        help="size of the fine-tune attack: victim training examples and AdamW steps "
        "(default 64 24)",
    )
    p.add_argument(
        "--objective",
        choices=list(OBJECTIVES),
        help="the attacker's score of a merge (as in audit; default min)",
    )
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    p.set_defaults(run=_run_frontier)


def _run_frontier(args) -> int:
    import shutil

    from mergeshield.evaluation.audit_file import audit_family, builtin_file, load_audit_file
    from mergeshield.evaluation.frontier import (
        FrontierPlan,
        parse_attack,
        parse_candidate,
        run_frontier,
    )
    from mergeshield.merging.methods import get_method

    if args.config is not None and (args.kind or args.setting):
        raise MergeShieldError("give --config or --kind/--setting, not both")
    config = args.config or builtin_file(f"{args.kind or 'text'}-{args.setting or 'small'}")
    tasks_given = {"victim": args.victim, "free_riders": args.free_riders}
    audit = load_audit_file(config, {k: v for k, v in tasks_given.items() if v is not None})
    default = ["unprotected", *audit.plan.defenses] if args.config else FRONTIER_CANDIDATES
    candidates = [parse_candidate(c) for c in args.candidates or default]
    finetune = not args.no_finetune
    if args.finetune is not None and (args.no_finetune or min(args.finetune) < 1):
        raise MergeShieldError("--finetune takes two positive integers, without --no-finetune")
    if not audit.builtin and audit.tasks[0].train is None:  # tasks[0]: the victim
        add = f"add train: DATA to the victim ({audit.tasks[0].name}) in {config}"
        hardened = [c.name for c in candidates if c.harden is not None]
        if hardened:
            raise MergeShieldError(
                f"candidates {hardened} harden on the victim's training data, which {config} "
                f"does not name: {add}, or use unprotected and defenses"
            )
        if finetune:
            print(
                f"the fine-tune attack is skipped: it trains on the victim's training data ({add})"
            )
            finetune = False
    for method in args.methods:
        get_method(method)  # the one-line error naming the known methods
    if args.grid_stride < 1:
        raise MergeShieldError(f"--grid-stride must be at least 1, got {args.grid_stride}")
    for attack in args.attacks:
        parse_attack(attack)
    if args.out.exists() and any(args.out.iterdir()):
        if not args.overwrite:
            raise MergeShieldError(f"{args.out}: already exists; pass --overwrite to replace it")
        shutil.rmtree(args.out)
    with audit_family(audit) as family:
        tasks = list(family.tasks)
        victim = audit.plan.victim or tasks[0]
        proxies = (
            args.proxies if args.proxies is not None else (tasks[1:2] if audit.builtin else [])
        )
        riders = audit.plan.free_riders or [t for t in tasks if t not in (victim, *proxies)][-1:]
        for t in (victim, *proxies, *riders):
            if t not in family.tasks:
                raise MergeShieldError(f"task {t!r} is not in the family {config} ({tasks})")
        defaults = FrontierPlan()
        plan = FrontierPlan(
            victim=victim,
            free_riders=tuple(riders),
            proxies=tuple(proxies),
            methods=tuple(args.methods),
            grids={m: g for m, g in defaults.grids.items() if m in args.methods},
            grid_stride=args.grid_stride,
            attacks=tuple(args.attacks),
            finetune=(tuple(args.finetune or defaults.finetune) if finetune else None),
            objective=args.objective or audit.plan.objective,
            seed=audit.plan.seed if args.seed is None else args.seed,
        )
        candidates = [
            c
            if c.harden is None
            else replace(
                c, harden_kwargs={"steps": args.steps, "lr": args.lr, "target": args.target}
            )
            for c in candidates
        ]
        results = run_frontier(plan, candidates, args.out, family=family, builds=args.builds)
    for r in results:
        s = r.summary()
        kept = ", ".join(
            f"{m} victim {s[m]['kept']:.0%} / free-riders "
            + " ".join(f"{k:.0%}" for k in s[m]["partner_kept"].values())
            + f" ({s[m]['attack']})"
            for m in r.best
        )
        print(f"{r.name}: standalone {r.standalone:.3f}; best joint attack keeps: {kept}")
    print(f"report: {args.out / 'frontier.md'}")
    return 0


def audit_overrides(args) -> dict[str, Any]:
    """The audit-file fields that the command line's options set (those given)."""
    fields: dict[str, Any] = {
        "victim": getattr(args, "victim", None),
        "free_riders": getattr(args, "free_riders", None),
        "defenses": getattr(args, "defenses", None),
        "methods": getattr(args, "methods", None),
        "attacks": getattr(args, "attacks", None),
        "grid": getattr(args, "grid", None),
        "grid_stride": getattr(args, "grid_stride", None),
        "pairs": getattr(args, "pairs", None),
        "objective": getattr(args, "objective", None),
        "interpolation": getattr(args, "interpolation", None),
        "seed": getattr(args, "seed", None),
        "dtype": getattr(args, "dtype", None),
        "merge_all": True if getattr(args, "merge_all", False) else None,
        "attacked_only": True if getattr(args, "attacked_only", False) else None,
        "protocol": False if getattr(args, "no_protocol", False) else None,
    }
    return {k: v for k, v in fields.items() if v is not None}


def audit_config(args) -> Path:
    """The audit file ``audit``/``demo`` run: ``--config``, else the shipped file of the demo
    or of ``--kind``/``--setting`` (``families/KIND-SETTING.yml``)."""
    from mergeshield.evaluation.audit_file import builtin_file

    if getattr(args, "demo", False):
        return builtin_file({"text": "demo", "llm": "demo-llm"}[args.kind])
    if args.config is not None:
        if args.kind or args.setting:
            raise MergeShieldError("give --config or --kind/--setting, not both")
        return args.config
    return builtin_file(f"{args.kind or 'text'}-{args.setting or 'small'}")


def _run_audit(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from mergeshield.evaluation.audit import HEADER, summary_table
    from mergeshield.evaluation.audit_file import run_audit_file

    if args.out.exists() and not args.overwrite and any(args.out.iterdir()):
        raise MergeShieldError(f"{args.out}: already exists; pass --overwrite to replace it")
    result = run_audit_file(audit_config(args), args.out, overrides=audit_overrides(args))
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


COMMANDS: list[Callable] = [
    _add_audit,
    _add_finetune,
    _add_frontier,
    _add_demo,
]
