"""One command: its parser, documented by the function that runs it, and the call of the library
with its parsed arguments.

A command's argparse ``dest`` names are the library's parameter names (``--key-out`` is
``key_out``, ``--quiet`` stores ``progress=False``), so a flag reaches the library without being
named again; a command passes by hand only the values it converts or renames.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def command(sub: Any, name: str, run: Callable[[argparse.Namespace], int]) -> Any:
    """Add the subcommand ``name`` to ``sub`` (the subparsers) that calls ``run(args)``: the
    first paragraph of ``run``'s docstring is the one-line help, the rest the description
    (argparse folds the white space of both)."""
    summary, _, details = inspect.cleandoc(run.__doc__ or "").partition("\n\n")
    p = sub.add_parser(name, help=summary, description=details or None)
    p.set_defaults(run=run)
    return p


def parsed(args: argparse.Namespace, function: Callable[..., Any]) -> dict[str, Any]:
    """``{name: args.name}`` for every named parameter of ``function`` (a dataclass: its
    fields) that the command parsed; the others keep the function's defaults."""
    parameters = inspect.signature(function).parameters.values()
    return {p.name: getattr(args, p.name) for p in parameters if p.kind in NAMED and p.name in args}


def call(function: Callable[..., T], args: argparse.Namespace, **given: Any) -> T:
    """``function(**parsed(args, function) | given)``: the parsed arguments that ``function``
    takes, with ``given`` (values the command converts, or passes under another name) over
    them."""
    return function(**(parsed(args, function) | given))
