"""The audit on the real small text family (MiniLM-L6 fine-tuned on WordNet tasks)."""

from __future__ import annotations

import json

import pytest

from mergeshield.evaluation.audit import HOLDS, UNPROTECTED_MIN, AuditPlan, run_audit
from mergeshield.evaluation.zoo import build_family

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    family = build_family("text", "small", progress=False)  # shared with tests/test_zoo.py
    plan = AuditPlan(
        victim="wordnet_noun",
        free_riders=("wordnet_verb",),
        defenses=("params", "mergelock", "mergebarrier"),
        methods=("task_arithmetic",),
        attacks=("aga",),
        grid=(0.5, 1.0),
        interpolation=(0.0, 0.5, 1.0),
    )
    out = tmp_path_factory.mktemp("audit")
    return run_audit(plan, out, family=family, progress=False), out, family


def test_unprotected_merge_keeps_most_of_the_gain(audit):
    result, _, _ = audit
    row = next(r for r in result.merges if r.variant == "unprotected")
    assert row.victim_kept >= UNPROTECTED_MIN
    assert row.partner_kept["wordnet_verb"] >= UNPROTECTED_MIN


def test_protected_standalone_accuracy_is_identical(audit):
    result, _, _ = audit
    for defense in ("params", "mergelock", "mergebarrier"):
        assert result.standalone[defense] == result.standalone["unprotected"]


def test_verdicts_follow_the_measurements(audit):
    """Whatever the outcome, the report states it as measured."""
    result, out, family = audit
    data = json.loads((out / "report.json").read_text())
    assert len(data["merges"]) == 7  # unprotected + 3 defenses + 3 attacked
    for row in data["merges"]:
        holds = row["victim_kept"] <= HOLDS and all(
            k <= HOLDS for k in row["partner_kept"].values()
        )
        assert row["holds"] == holds
        if row["defense"] != "none" and not row["attack"]:
            assert row["verdict"] == ("protection holds" if holds else "PROTECTION FAILS")
        base, ft = family.base_accuracy["wordnet_noun"], family.finetuned_accuracy["wordnet_noun"]
        assert row["victim_kept"] == pytest.approx((row["victim_accuracy"] - base) / (ft - base))
    report = (out / "report.md").read_text()
    assert "PROTECTION FAILS" in report or "protection holds" in report
    assert (out / "merged_accuracy.png").stat().st_size > 0
    assert (out / "interpolation.png").stat().st_size > 0


def test_interpolation_path_is_measured(audit):
    """The midpoint is measured; the unprotected model's path stays far above the base (it is
    linearly connected to it), which is what the defenses set out to break."""
    result, _, family = audit
    for variant, points in result.interpolation.items():
        assert [a for a, _ in points] == [0.0, 0.5, 1.0]
        assert points[-1][1] == result.standalone[variant]
    mid = dict(result.interpolation["unprotected"])[0.5]
    assert mid > family.base_accuracy["wordnet_noun"]


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_grid_stride_thins_each_method_grid_keeping_the_largest(stride):
    from mergeshield.evaluation.audit import coefficient_grid
    from mergeshield.merging import get_method

    plan = AuditPlan(grid_stride=stride)
    for method in ("task_arithmetic", "ties", "linear", "slerp"):
        full = get_method(method).grid
        grid = coefficient_grid(plan, method)
        assert grid[-1] == full[-1]
        assert list(grid) == sorted(grid) and set(grid) <= set(full)
        assert len(grid) == -(-len(full) // stride)  # ceil(len / stride)
    assert coefficient_grid(plan, "model_stock") == (1.0,)  # no knob to sweep
    assert coefficient_grid(AuditPlan(grid=(0.3,), grid_stride=stride), "ties") == (0.3,)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"pairs": ("fortunes",)}, "not free-riders"),
        ({"pairs": ()}, "nothing to merge"),
        ({"grid_stride": 0}, "grid_stride"),
        ({"attacked_only": True}, "attacked_only"),
    ],
)
def test_bad_audit_plans_fail_before_any_work(changes, message, tmp_path):
    from mergeshield.errors import MergeShieldError

    family = build_family("text", "small", progress=False)
    plan = AuditPlan(victim="wordnet_noun", free_riders=("wordnet_verb",), **changes)
    with pytest.raises(MergeShieldError, match=message):
        run_audit(plan, tmp_path / "report", family=family, progress=False)
    assert not (tmp_path / "report").exists()
