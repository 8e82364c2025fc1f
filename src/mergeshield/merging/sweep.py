"""The strong free-rider: merge at every coefficient of a grid and keep the best merge."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeshield.errors import MergeShieldError
from mergeshield.merging.methods import get_method, merge


@dataclass(frozen=True)
class SweepResult:
    """Every ``(coefficient, score)`` tried, in grid order, and the best one (first argmax).

    ``best_path`` is where the best merge was kept (``keep_best``), or None if it was deleted.
    """

    method: str
    scores: tuple[tuple[float, float], ...]
    best_coefficient: float
    best_score: float
    best_path: Path | None


def sweep(
    method: str,
    base: Path,
    models: list[Path],
    score: Callable[[Path], float],
    *,
    grid: Sequence[float] | None = None,
    workdir: Path,
    keep_best: Path | None = None,
    params: dict[str, Any] | None = None,
    seed: int = 0,
) -> SweepResult:
    """Merge at each coefficient c of ``grid`` (default: the method's grid); score each merge.

    ``score(path)`` rates a merged checkpoint folder (higher is better, e.g. held-out accuracy
    of the victim task with the victim's head): the attacker keeps c* = argmax_c score(merge(c))
    (first one on ties; NaN scores never win).  Merges are written under ``workdir``; all but
    the running best are deleted as soon as they are beaten, and the best is moved to
    ``keep_best`` (replacing it) or deleted when ``keep_best`` is None.
    """
    spec = get_method(method)
    coefficients = [float(c) for c in (spec.grid if grid is None else grid)]
    if not coefficients:
        raise MergeShieldError("empty coefficient grid")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results: list[tuple[float, float]] = []
    best: tuple[float, float, Path] | None = None
    candidate: Path | None = None
    try:
        for index, coefficient in enumerate(coefficients):
            candidate = workdir / f"{method}-{index:03d}"
            merge(
                method, base, models, candidate, coefficient=coefficient, params=params, seed=seed
            )
            value = float(score(candidate))
            results.append((coefficient, value))
            if not math.isnan(value) and (best is None or value > best[1]):
                if best is not None:
                    shutil.rmtree(best[2])
                best = (coefficient, value, candidate)
            else:
                shutil.rmtree(candidate)
            candidate = None
    except BaseException:
        for path in (candidate, best[2] if best else None):
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
        raise
    if best is None:
        raise MergeShieldError(f"every score of the {method} sweep was NaN")
    best_path: Path | None = None
    if keep_best is None:
        shutil.rmtree(best[2])
    else:
        best_path = Path(keep_best)
        best_path.parent.mkdir(parents=True, exist_ok=True)
        if best_path.exists():
            shutil.rmtree(best_path)
        shutil.move(best[2], best_path)  # a rename on the same filesystem
    return SweepResult(
        method=method,
        scores=tuple(results),
        best_coefficient=best[0],
        best_score=best[1],
        best_path=best_path,
    )
