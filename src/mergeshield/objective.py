"""What a free-rider wants from a merge: one model that keeps *every* merged task.

For each merged task ``t`` (the victim and each free-rider task), the share of its fine-tuning
gain that the merged model keeps is

    ``kept_t = (acc_t(merged) - acc_t(base)) / (acc_t(fine-tuned) - acc_t(base))``

(0: the base model's level, 1: the task's own fine-tune).  The attacker scores a merge by one
of three objectives, and picks the coefficient that maximizes it on validation data:

* ``min`` (default): ``min_t kept_t``, the weakest merged task decides.  A merge that keeps
  the victim but loses the free-rider's own task scores low: it is the release, not a merge.
* ``mean``: ``mean_t kept_t``, the papers' average normalized accuracy.
* ``victim``: ``kept_victim`` alone, the strictest view of insertion (task arithmetic at
  coefficient 1 inserts the release whole and always "keeps" the victim).

Verdict of a merge (the attacker's best one), with ``HOLDS = 5%``:

* ``protection holds``: the weakest task keeps at most ``HOLDS`` of its gain, and so does the
  victim;
* ``release inserted, free-rider's task lost``: the victim keeps more than ``HOLDS`` but some
  free-rider task keeps at most ``HOLDS``: the merged model is the release itself, useless to a
  free-rider who wants both tasks;
* ``MERGE USEFUL TO THE FREE-RIDER``: every merged task keeps more than ``HOLDS``.

An unprotected merge is a sanity check: it must keep at least ``UNPROTECTED_MIN`` of the
weakest task's gain, otherwise the audit cannot tell a defense from a broken merge.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

OBJECTIVES = ("min", "mean", "victim")
HOLDS = 0.05  # a protection holds when the weakest merged task keeps at most this share
UNPROTECTED_MIN = 0.60  # an unprotected merge must keep at least this share of every task

HOLDS_TEXT = "protection holds"
INSERTED_TEXT = "release inserted, free-rider's task lost"
USEFUL_TEXT = "MERGE USEFUL TO THE FREE-RIDER"


def check_objective(objective: str) -> str:
    """``objective`` if it is one of :data:`OBJECTIVES`, else a one-line error."""
    if objective not in OBJECTIVES:
        from mergeshield.errors import MergeShieldError

        raise MergeShieldError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    return objective


def kept(acc: float, base: float, finetuned: float) -> float:
    """Share of the fine-tuning gain present in ``acc`` (0: base level, 1: fine-tuned level);
    NaN when the fine-tune gained nothing (the task cannot judge a merge)."""
    gap = finetuned - base
    return (acc - base) / gap if gap > 0 else float("nan")


def joint_score(victim_kept: float, partner_kept: Mapping[str, float], objective: str) -> float:
    """The attacker's score of a merge under ``objective`` (NaN if any share is NaN)."""
    shares = [victim_kept, *partner_kept.values()]
    if any(math.isnan(s) for s in shares):
        return float("nan")
    if objective == "min":
        return min(shares)
    if objective == "mean":
        return sum(shares) / len(shares)
    check_objective(objective)
    return victim_kept


def weakest(victim_kept: float, partner_kept: Mapping[str, float]) -> float:
    """The smallest share kept over all merged tasks."""
    return joint_score(victim_kept, partner_kept, "min")


def verdict(victim_kept: float, partner_kept: Mapping[str, float]) -> str:
    """The verdict on a protected (or attacked) release's best merge; see the module doc."""
    if weakest(victim_kept, partner_kept) > HOLDS:
        return USEFUL_TEXT
    if victim_kept > HOLDS:
        return INSERTED_TEXT
    return HOLDS_TEXT


def unprotected_verdict(victim_kept: float, partner_kept: Mapping[str, float]) -> str:
    """Sanity verdict on the unprotected merge: does it keep every task well enough?"""
    if weakest(victim_kept, partner_kept) >= UNPROTECTED_MIN:
        return "merge works"
    return f"merge itself weak (a task keeps <{UNPROTECTED_MIN:.0%})"


def choose(curve: list[tuple[float, float, Mapping[str, float]]], objective: str) -> float:
    """The coefficient ``objective`` picks from a validation curve ``(c, victim kept,
    {free-rider: kept})``: the first argmax; NaN never wins (as in
    :func:`mergeshield.merging.sweep`); NaN when every score is NaN."""
    best_c, best = math.nan, -math.inf
    for c, v, p in curve:
        value = joint_score(v, p, objective)
        if not math.isnan(value) and value > best:
            best_c, best = c, value
    return best_c
