"""The audit on the real small text family (MiniLM-L6 fine-tuned on WordNet tasks)."""

from __future__ import annotations

import json

import pytest

from mergeshield.evaluation.audit import AuditPlan, run_audit
from mergeshield.evaluation.zoo import build_family


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
        protocol=(("task_arithmetic", 0.8),),
    )
    out = tmp_path_factory.mktemp("audit")
    return run_audit(plan, out, family=family, progress=False), out, family


# A merge that any free-rider could use keeps a clear majority of every merged task's gain; the
# bound is the one the issue states for a family fit to judge defenses (60%).
USABLE = 0.60


@pytest.mark.slow
def test_unprotected_merge_keeps_most_of_every_task(audit):
    result, _, _ = audit
    row = next(r for r in result.merges if r.variant == "unprotected")
    assert row.victim_kept >= USABLE
    assert row.partner_kept["wordnet_verb"] >= USABLE


@pytest.mark.slow
def test_protected_standalone_accuracy_is_identical(audit):
    result, _, _ = audit
    for defense in ("params", "mergelock", "mergebarrier"):
        assert result.standalone[defense] == result.standalone["unprotected"]


@pytest.mark.slow
def test_reported_merges_are_scored_independently(audit, tmp_path):
    """Re-merge every reported row (attacked ones included) with mergekit at its coefficient,
    score it outside the audit, and compare with report.json."""
    from mergeshield.evaluation.accuracy import evaluate
    from mergeshield.merging import extract_backbone, merge

    result, out, family = audit
    data = json.loads((out / "report.json").read_text())
    assert data["objective"] == "min"
    assert len(data["merges"]) == 7  # unprotected + 3 defenses + 3 attacked
    rider = extract_backbone(family.tasks["wordnet_verb"], family.base, tmp_path / "rider")
    for row in data["merges"]:
        if row["variant"] not in ("unprotected", "mergelock", "mergelock+aga"):
            continue  # three rows cover the three kinds (the same code scores all)
        variant = extract_backbone(
            _variant_folder(row, family, tmp_path),
            family.base,
            tmp_path / "bb" / row["variant"].replace("+", "-then-"),
        )
        merged = merge(
            "task_arithmetic",
            family.base,
            [variant, rider],
            tmp_path / "merged" / row["variant"].replace("+", "-then-"),
            coefficient=row["coefficient"],
        )
        for task, acc in (
            ("wordnet_noun", row["victim_accuracy"]),
            ("wordnet_verb", row["partner_accuracy"]["wordnet_verb"]),
        ):
            assert evaluate(family.tasks[task], task, family=family, backbone=merged) == acc
        # the in-memory sweep's merge scores as mergekit's does (within one test example)
        assert row["kernel_check"]["agrees"], row["kernel_check"]
        # the chosen coefficient maximizes the weakest validation share (first on ties)
        scores = [min(v, *p.values()) for _, v, p in row["val_kept"]]
        assert row["coefficient"] == row["val_kept"][scores.index(max(scores))][0]
        weakest = min(row["victim_kept"], row["partner_kept"]["wordnet_verb"])
        if row["defense"] == "none":
            continue
        expected = (
            "MERGE USEFUL TO THE FREE-RIDER"
            if weakest > 0.05
            else "release inserted, free-rider's task lost"
            if row["victim_kept"] > 0.05
            else "protection holds"
        )
        assert row["verdict"] == expected


@pytest.mark.slow
def test_headline_claims_of_the_readme(audit):
    """README's summary, on the small family: PaRaMS and MergeLock collapse every merge below
    coefficient 1 (the weakest task keeps at most 5%), yet at coefficient 1 the release is
    inserted whole (the victim keeps a usable share); AGA undoes every defense (the best merge
    is usable again); and the papers' fixed protocol shows more than PaRaMS' "over 40%"
    degradation for both."""
    result, _, _ = audit
    rows = {r.variant: r for r in result.merges}
    for defense in ("params", "mergelock"):
        curve = {c: (v, p["wordnet_verb"]) for c, v, p in rows[defense].val_kept}
        assert all(min(shares) <= 0.05 for c, shares in curve.items() if c < 1.0)
        assert curve[1.0][0] >= USABLE
        assert rows[f"{defense}+aga"].weakest >= USABLE
        protocol = next(
            r for r in result.protocol if r.variant == defense and r.method == "task_arithmetic"
        )
        assert protocol.degradation > 0.40
    assert rows["mergebarrier+aga"].weakest >= USABLE


def _variant_folder(row, family, tmp_path):
    """The victim variant of a report row, rebuilt outside the audit (same seed)."""
    from mergeshield.attacks import attack
    from mergeshield.protect import protect

    original = family.tasks["wordnet_noun"]
    if row["defense"] == "none":
        return original
    protected = tmp_path / row["defense"]
    if not protected.exists():
        protect(original, protected, row["defense"], base=family.base, seed=0, progress=False)
    if not row["attack"]:
        return protected
    attacked = tmp_path / row["variant"].replace("+", "-then-")
    attack(protected, family.base, attacked, row["attack"])
    return attacked


@pytest.mark.slow
def test_report_states_the_objective_and_the_protocol(audit):
    result, out, _ = audit
    report = (out / "report.md").read_text()
    assert "objective `min`" in report
    protocol = {(r.variant, r.method, r.coefficient): r for r in result.protocol}
    assert protocol[("unprotected", "task_arithmetic", 0.8)].degradation == 0.0
    for r in result.protocol:
        assert r.mean_accuracy == pytest.approx(sum(r.accuracy.values()) / 2)
    assert (out / "merge_map.png").stat().st_size > 0
    assert (out / "interpolation.png").stat().st_size > 0


@pytest.mark.slow
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


def test_differing_tensors_is_bit_for_bit():
    """The recheck skips scoring the in-memory merge only when every tensor is identical."""
    import torch

    from mergeshield.evaluation.audit import differing_tensors

    a = {"w": torch.tensor([1.0, 2.0]), "ids": torch.arange(3)}
    assert differing_tensors(a, {k: v.clone() for k, v in a.items()}) == []
    nudged = torch.nextafter(torch.tensor(2.0), torch.tensor(3.0))  # one ulp away
    assert differing_tensors(a, {**a, "w": torch.stack([torch.tensor(1.0), nudged])}) == ["w"]
    assert differing_tensors(a, {**a, "w": a["w"].double()}) == ["w"]
    assert differing_tensors(a, {"w": a["w"]}) == ["ids"]
    assert differing_tensors({"w": a["w"]}, a) == ["ids"]


@pytest.mark.slow
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
