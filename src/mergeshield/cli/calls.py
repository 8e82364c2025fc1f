"""Calling the library with a command's parsed arguments.

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
