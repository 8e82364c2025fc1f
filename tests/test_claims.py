"""The README's claims about the full families, pinned on their small analogues.

README.md reports matrices measured on the full text and vision families (BENCHMARKS.md): every
merge method against each defense, without and after an alignment attack.  Those families take
an hour to build, so these tests run the same matrices on the small families that CI builds and
assert the same statements, each with the rule the README states:

- a protection *holds* against a method when the attacker's best merge (chosen by the joint
  objective on validation data) keeps at most 5% of the weakest merged task's gain;
- a defense leaves *no merge worth having* when, for every method whose unprotected merge is
  usable (keeps more than 5%), its best merge either holds or keeps at most a quarter of the
  weakest-task share that the unprotected merge by the same method keeps (it takes away at
  least three quarters of what merging gives the free-rider);
- an attack *undoes* a defense for a method when its best merge keeps the weakest task's gain
  within 10 points of what the unprotected merge keeps (about three times the sampling
  error of a share measured on 300 test examples).
"""

from __future__ import annotations

import pytest

from mergeshield.evaluation.audit import AuditPlan, run_audit
from mergeshield.evaluation.zoo import build_family
from mergeshield.merging.methods import METHODS

HOLDS = 0.05  # README: "a protection holds when that best merge keeps at most 5%"
WORTH = 0.25  # a merge worth having keeps more than a quarter of the unprotected merge's share
UNDONE = 0.10  # within 10 points of the unprotected merge's weakest share
ALL_METHODS = tuple(METHODS)
TEXT_METHODS = ("task_arithmetic", "ties")


def _rows(result) -> dict[tuple[str, str], object]:
    return {(r.variant, r.method): r for r in result.merges}


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    """Small vision family, victim fashion_rotated merged with digits by every method,
    each defense without and after AGA, on each method's whole grid (a grid of every other
    coefficient can miss SLERP's narrow crossover, where both tasks are kept, for one variant
    and find it for another: 0.5 and 0.7 straddle the best merges at 0.6)."""
    family = build_family("image", "small", progress=False)
    plan = AuditPlan(
        kind="image",
        victim="fashion_rotated",
        free_riders=("digits",),
        defenses=("params", "mergelock", "mergebarrier"),
        attacks=("aga",),
        methods=ALL_METHODS,
        protocol=(),
        interpolation=(0.0, 1.0),
    )
    out = tmp_path_factory.mktemp("vision")
    return _rows(run_audit(plan, out, family=family, progress=False))


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """Small text family (the demo's), victim wordnet_noun merged with wordnet_verb by a plain
    and a sparsified, sign-elected sum (every mergekit merge of MiniLM costs seconds), PaRaMS
    without and after each alignment attack."""
    family = build_family("text", "small", progress=False)
    plan = AuditPlan(
        victim="wordnet_noun",
        free_riders=("wordnet_verb",),
        defenses=("params",),
        attacks=("aga", "rebasin", "procrustes"),
        methods=TEXT_METHODS,
        grid_stride=3,
        protocol=(),
        interpolation=(0.0, 1.0),
    )
    out = tmp_path_factory.mktemp("text")
    return _rows(run_audit(plan, out, family=family, progress=False))


def _worth_having(rows, variant: str) -> dict[str, tuple[float, float]]:
    """method -> (weakest share kept by ``variant``'s best merge, by the unprotected one), for
    the methods whose unprotected merge is usable, where the variant's merge does not hold and
    keeps more than WORTH of the unprotected share."""
    out = {}
    for (name, method), row in rows.items():
        if name != variant:
            continue
        unprotected = rows[("unprotected", method)].weakest
        if unprotected > HOLDS and row.weakest > max(HOLDS, WORTH * unprotected):
            out[method] = (row.weakest, unprotected)
    return out


@pytest.mark.slow
def test_vision_params_leaves_no_merge_worth_having(vision):
    """README: "without an attack PaRaMS leaves no merge worth having"."""
    assert _worth_having(vision, "params") == {}


@pytest.mark.slow
def test_vision_mergelock_leaves_only_near_insertions_worth_having(vision):
    """README: MergeLock's merges worth having, if any, are sums near the release inserted
    whole (linear or task arithmetic, the victim keeping more than the free-rider); every
    other method's best merge is not worth having.  The coefficient where such a merge appears
    depends on the family's build, which is not bit-reproducible across CPUs: task arithmetic
    at 0.9 (41% / 16%) on session 11's build, at 0.8 (24% / 9%) on session 13's."""
    worth = _worth_having(vision, "mergelock")
    for method in worth:
        row = vision[("mergelock", method)]
        assert row.victim_kept > max(row.partner_kept.values()), (method, row.victim_kept)
    assert set(worth) <= {"linear", "task_arithmetic"}, worth


@pytest.mark.slow
def test_vision_params_holds_against_every_method(vision):
    """README: PaRaMS holds (at most 5% of the weakest task's gain) against every method."""
    kept = {m: vision[("params", m)].weakest for m in ALL_METHODS}
    assert all(k <= HOLDS for k in kept.values()), kept


@pytest.mark.slow
def test_vision_mergebarrier_leaves_a_useful_merge(vision):
    """README: "MergeBarrier does" (leave a merge worth having)."""
    assert _worth_having(vision, "mergebarrier")


@pytest.mark.slow
@pytest.mark.parametrize("defense", ["params", "mergelock", "mergebarrier"])
def test_vision_aga_merges_as_if_unprotected(vision, defense):
    """README: "after AGA every method merges as if unprotected"."""
    for method in ALL_METHODS:
        attacked = vision[(f"{defense}+aga", method)].weakest
        unprotected = vision[("unprotected", method)].weakest
        assert attacked >= unprotected - UNDONE, (method, attacked, unprotected)


@pytest.mark.slow
def test_text_params_leaves_no_merge_that_serves_both_tasks_but_the_inserted_release(text):
    """README: PaRaMS collapses every merge below coefficient 1; at coefficient 1 or more a sum
    inserts the release whole (the victim keeps a usable share, 60%), and only there may the
    free-rider keep some of its own gain (full text family: 5%; small family: about 26%)."""
    for method in TEXT_METHODS:
        row = text[("params", method)]
        inserted = row.coefficient >= 1.0 and row.victim_kept >= 0.60
        assert row.weakest <= HOLDS or inserted, (method, row.coefficient, row.weakest)
        below = [min(v, *p.values()) for c, v, p in row.val_kept if c < 1.0]
        assert all(share <= HOLDS for share in below), (method, below)


@pytest.mark.slow
def test_text_aga_undoes_params(text):
    """README: AGA undoes PaRaMS "for every method" (model_stock aside)."""
    for method in TEXT_METHODS:
        attacked = text[("params+aga", method)].weakest
        unprotected = text[("unprotected", method)].weakest
        assert attacked >= unprotected - UNDONE, (method, attacked, unprotected)


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["rebasin", "procrustes"])
def test_text_rebasin_and_procrustes_do_not_undo_params(text, attack):
    """README: "re-basin and Procrustes do not undo it": for every method the attacked merge
    stays more than 10 points below the unprotected one."""
    for method in TEXT_METHODS:
        attacked = text[(f"params+{attack}", method)].weakest
        unprotected = text[("unprotected", method)].weakest
        assert attacked < unprotected - UNDONE, (method, attacked, unprotected)


@pytest.fixture(scope="module")
def text_mergelock(tmp_path_factory):
    """Small text family, MergeLock without an attack, task arithmetic only."""
    family = build_family("text", "small", progress=False)
    plan = AuditPlan(
        victim="wordnet_noun",
        free_riders=("wordnet_verb",),
        defenses=("mergelock",),
        attacks=(),
        methods=("task_arithmetic",),
        grid_stride=3,
        protocol=(),
        interpolation=(0.0, 1.0),
    )
    out = tmp_path_factory.mktemp("text-mergelock")
    return _rows(run_audit(plan, out, family=family, progress=False))


@pytest.mark.slow
def test_text_mergelock_leaves_task_arithmetic_at_one_worth_having(text_mergelock):
    """README: on the text families MergeLock leaves task arithmetic at coefficient 1 a merge
    worth having (full family: 47% of the free-rider's gain, the victim's 91%): it maps only
    the attention heads, and the free-rider's other updates still add to the release."""
    row = text_mergelock[("mergelock", "task_arithmetic")]
    assert row.coefficient >= 1.0 and row.victim_kept >= 0.60, (row.coefficient, row.victim_kept)
    assert _worth_having(text_mergelock, "mergelock") == {
        "task_arithmetic": (row.weakest, text_mergelock[("unprotected", "task_arithmetic")].weakest)
    }
