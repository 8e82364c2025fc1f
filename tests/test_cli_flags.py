"""Every flag of the commands that call one library function reaches that function.

The commands pass their parsed arguments by name (:func:`mergeshield.cli.command.call`): a flag
whose ``dest`` is not a parameter of the function would be dropped without a word.  Each case
runs a command with every flag set away from its default, the library function replaced by a
recorder, and compares what the function received with what the flags say.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mergeshield.cli import main
from mergeshield.cli.command import command, parsed
from mergeshield.defenses import DefenseOptions

P = Path
PROTECTED = SimpleNamespace(
    defense="mergelock", n_blocks=2, output=P("o"), key="K", left_out=[], found=True
)
REPORT = SimpleNamespace(
    moved={},
    round_trip_error=None,
    tokens_differ=None,
    outputs="logits",
    max_abs_error=0.0,
    max_rel_error=0.0,
    bound=1e-4,
    yardstick="fp32",
    ok=True,
)
FINETUNED = {"n_train": 3, "labels": ["a", "b"], "final_epoch_loss": 0.5}

CASES: list[tuple[str, str, Any, list[str], dict[str, Any]]] = [
    (
        "mergeshield.protect",
        "protect",
        PROTECTED,
        ["protect", "m", "o", "-d", "params", "--base", "b", "--seed", "3", "--key-out", "k"]
        + ["--scaling", "diagonal", "--scale", "0.5", "2", "--max-cond", "inf"]
        + ["--flip-fraction", "0.3", "--overwrite", "-q"],
        dict(
            model=P("m"),
            out=P("o"),
            defense="params",
            base=P("b"),
            seed=3,
            key_out=P("k"),
            options=DefenseOptions(
                scaling="diagonal", scale=(0.5, 2.0), max_cond=None, flip_fraction=0.3
            ),
            overwrite=True,
            progress=False,
        ),
    ),
    (
        "mergeshield.protect",
        "protect",
        PROTECTED,
        ["protect", "m", "o"],
        dict(
            model=P("m"),
            out=P("o"),
            defense="all",
            base=None,
            seed=None,
            key_out=None,
            options=DefenseOptions(),
            overwrite=False,
            progress=True,
        ),
    ),
    (
        "mergeshield.verify",
        "verify",
        REPORT,
        ["verify", "a", "b", "--text", "x", "--text", "y", "--tolerance", "0.001"],
        dict(original=P("a"), protected=P("b"), texts=["x", "y"], tolerance=0.001),
    ),
    (
        "mergeshield.protect",
        "unprotect",
        P("o"),
        ["unprotect", "p", "k", "o", "--overwrite", "-q"],
        dict(protected=P("p"), key=P("k"), out=P("o"), overwrite=True, progress=False),
    ),
    (
        "mergeshield.attacks",
        "attack",
        P("o"),
        ["attack", "p", "b", "o", "-m", "rebasin", "--overwrite", "-q"],
        dict(
            protected=P("p"),
            base=P("b"),
            out=P("o"),
            method="rebasin",
            overwrite=True,
            progress=False,
        ),
    ),
    (
        "mergeshield.detect",
        "detect",
        SimpleNamespace(line=lambda: "found", found=True),
        ["detect", "s", "--original", "f", "--base", "b", "--key", "k", "--null", "n1", "n2"]
        + ["--alpha", "0.05", "--attack", "none", "--out", "r"],
        dict(
            suspect=P("s"),
            original=P("f"),
            base=P("b"),
            key=P("k"),
            null=[P("n1"), P("n2")],
            alpha=0.05,
            attack=None,
            out=P("r"),
        ),
    ),
    (
        "mergeshield.hardening.harden",
        "harden_and_protect",
        PROTECTED,
        ["harden", "m", "o", "--base", "b", "--data", "d", "--method", "trap2", "--steps", "7"]
        + ["--lr", "0.001", "--batch-size", "4", "--lam", "0.5", "--max-len", "9"]
        + ["--target", "margin", "--margin", "0.5"]
        + ["--prune-fraction", "0.3", "--proxies", "p1", "p2", "--train-embeddings"]
        + ["--then-protect", "mergelock", "--seed", "5", "--key-out", "k", "--overwrite", "-q"],
        dict(
            task_model=P("m"),
            base=P("b"),
            data=P("d"),
            out=P("o"),
            method="trap2",
            defense="mergelock",
            seed=5,
            key_out=P("k"),
            overwrite=True,
            progress=False,
            overrides=dict(
                steps=7,
                lr=0.001,
                batch_size=4,
                lam=0.5,
                target="margin",
                margin=0.5,
                max_len=9,
                prune_fraction=0.3,
                proxies=("p1", "p2"),
                train_embeddings=True,
            ),
        ),
    ),
    (
        "mergeshield.evaluation.zoo",
        "finetune_classifier",
        FINETUNED,
        ["finetune", "b", "o", "--train", "t", "--epochs", "3", "--lr", "0.001"]
        + ["--max-length", "16", "--seed", "2", "-q"],
        dict(
            base=P("b"),
            train=P("t"),
            out=P("o"),
            epochs=3,
            lr=0.001,
            max_len=16,
            seed=2,
            progress=False,
        ),
    ),
]


@pytest.mark.parametrize(
    ("module", "name", "result", "argv", "expected"), CASES, ids=[c[3][0] for c in CASES]
)
def test_every_flag_reaches_the_library(
    monkeypatch, capsys, module: str, name: str, result: Any, argv: list[str], expected: dict
) -> None:
    received: list[dict[str, Any]] = []
    target = importlib.import_module(module)
    real = getattr(target, name)

    @functools.wraps(real)  # the recorder shows the real signature, as the CLI reads it
    def record(*args: Any, **kwargs: Any) -> Any:
        received.append(dict(inspect.signature(real).bind(*args, **kwargs).arguments))
        return result

    monkeypatch.setattr(target, name, record)
    monkeypatch.setattr("mergeshield.allocator.keep_freed_memory", lambda: None)
    main(argv)
    assert received == [expected], capsys.readouterr().err


def test_a_command_is_documented_by_its_run_function() -> None:
    """The first paragraph of the run function's docstring is the help, the rest the
    description; the parser runs the function."""
    import argparse

    def run(args: argparse.Namespace) -> int:
        """say hello

        Print a greeting
        to the world."""
        return 0

    parser = argparse.ArgumentParser()
    p = command(parser.add_subparsers(), "hello", run)
    assert p.description == "Print a greeting\nto the world."
    assert p.parse_args([]).run is run
    assert "say hello" in parser.format_help()
    assert "Print a greeting to the world." in p.format_help()


def test_parsed_takes_only_the_parameters_the_function_names() -> None:
    """Other parsed values stay behind; a dataclass gives its fields; **kwargs take nothing."""
    import argparse

    def f(a: int, *, b: int = 0, **rest: Any) -> None: ...

    args = argparse.Namespace(a=1, b=2, c=3, rest=4)
    assert parsed(args, f) == {"a": 1, "b": 2}
    assert parsed(args, DefenseOptions) == {}
    assert parsed(argparse.Namespace(flip_fraction=0.3), DefenseOptions) == {"flip_fraction": 0.3}


@pytest.mark.parametrize(("flags", "defense"), [([], "all"), (["--then-protect", "none"], None)])
def test_harden_publishes_the_default_candidate_unless_told_otherwise(
    monkeypatch, flags: list[str], defense: str | None
) -> None:
    """Without flags ``harden`` runs the default candidate: DEFAULT_METHOD with HardenConfig's
    steps, lr and target, then DEFAULT_DEFENSE; ``--then-protect none`` publishes the hardened
    model as trained.  ``frontier``'s default candidates are that release and its parts."""
    from mergeshield.cli.study import FRONTIER_CANDIDATES
    from mergeshield.hardening import harden
    from mergeshield.hardening.config import DEFAULT_DEFENSE, DEFAULT_METHOD, HardenConfig

    received: list[dict[str, Any]] = []

    @functools.wraps(harden.harden_and_protect)  # the CLI reads the real signature
    def record(**kw: Any) -> Any:
        received.append(kw)
        return PROTECTED

    monkeypatch.setattr(harden, "harden_and_protect", record)
    assert main(["harden", "m", "o", "--base", "b", "--data", "d", "-q", *flags]) == 0
    (kw,) = received
    assert kw["method"] == DEFAULT_METHOD and kw["defense"] == defense
    assert defense is None or defense == DEFAULT_DEFENSE
    defaults = HardenConfig()
    for field in ("steps", "lr", "target"):
        assert kw[field] == getattr(defaults, field)
    assert FRONTIER_CANDIDATES[-1] == f"{DEFAULT_METHOD}/{DEFAULT_DEFENSE}"
