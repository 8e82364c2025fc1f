"""Rich progress bars, shown only when asked for (the CLI asks; the Python API is quiet)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)

Advance = Callable[[], None]
Bars = Callable[[str, int], Advance]  # bars(label, total) -> advance


@contextmanager
def progress_bars(show: bool = True) -> Iterator[Bars]:
    """Yields ``bars(label, total) -> advance()``: one more bar on stderr per call while the
    block runs (all of them on one display), or no-ops when ``show`` is false."""
    if not show:
        yield lambda label, total: lambda: None
        return
    columns = (
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as display:

        def bars(label: str, total: int) -> Advance:
            task = display.add_task(label, total=total)
            return lambda: display.advance(task)

        yield bars


@contextmanager
def progress_bar(label: str, total: int, show: bool = True) -> Iterator[Advance]:
    """Yields ``advance()`` of one bar (:func:`progress_bars`)."""
    with progress_bars(show) as bars:
        yield bars(label, total)
