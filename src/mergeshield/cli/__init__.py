"""The ``mergeshield`` command.

Exit codes: 0 success, 1 a check failed (e.g. ``verify`` above its tolerance), 2 bad input
(a one-line message on stderr; nothing is written and the input is never modified).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from mergeshield.cli import adversary, release, study
from mergeshield.errors import MergeShieldError
from mergeshield.version import __version__

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # mergeshield never downloads anything
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DESCRIPTION = """\
Protect a fine-tuned transformer checkpoint against unauthorized model merging, and measure
how well the protection holds (`mergeshield audit`; the honest answer is in its report).

example:
  mergeshield protect my-model/ my-model-protected/ --base base-model/ --key-out my.key
  mergeshield verify my-model/ my-model-protected/
"""


COMMANDS: list[Callable] = release.COMMANDS + adversary.COMMANDS + study.COMMANDS


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
