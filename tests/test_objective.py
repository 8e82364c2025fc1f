"""The free-rider's objective: the attacker scores a merge by every merged task, not the victim.

The unit tests check the objective and verdict rules on hand-made numbers.  The tiny-family
test runs the real audit (real ``protect``, real mergekit merges) on a tiny random BERT family
whose tasks are classifiers made here: task ``t`` is a fixed random 6-class linear head on the
first token's hidden state, its labels are the fine-tuned model's own predictions, so a
model's accuracy on ``t`` is its agreement with the fine-tune (1 for the fine-tune itself).
The victim's task vector is ten times the free-rider's, so the victim alone prefers large
coefficients, which destroy the free-rider's task.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeshield.errors import MergeShieldError
from mergeshield.evaluation import audit as audit_module
from mergeshield.evaluation.audit import AuditPlan, run_audit
from mergeshield.evaluation.zoo import Family
from mergeshield.objective import (
    HOLDS_TEXT,
    INSERTED_TEXT,
    USEFUL_TEXT,
    check_objective,
    choose,
    joint_score,
    kept,
    unprotected_verdict,
    verdict,
)
from tests.tiny_models import build

# --- the rules on hand-made numbers ----------------------------------------------------------


def test_joint_scores():
    p = {"a": 0.2, "b": 0.6}
    assert joint_score(0.9, p, "min") == 0.2
    assert joint_score(0.9, p, "mean") == pytest.approx((0.9 + 0.2 + 0.6) / 3)
    assert joint_score(0.9, p, "victim") == 0.9
    assert math.isnan(joint_score(0.9, {"a": math.nan}, "min"))
    with pytest.raises(MergeShieldError, match="unknown objective 'max'"):
        check_objective("max")
    assert kept(0.8, 0.5, 0.9) == pytest.approx(0.75)
    assert math.isnan(kept(0.8, 0.5, 0.5))  # a task the fine-tune did not improve


@pytest.mark.parametrize(
    ("victim_kept", "partner_kept", "expected"),
    [
        (0.9, {"fr": 0.5}, USEFUL_TEXT),  # both tasks survive: a merge the free-rider uses
        (0.95, {"fr": 0.01}, INSERTED_TEXT),  # the release inserted, the free-rider's task lost
        (0.95, {"fr": 0.8, "fr2": 0.05}, INSERTED_TEXT),  # one free-rider task lost is enough
        (0.02, {"fr": 0.9}, HOLDS_TEXT),  # the victim's task is gone
        (0.05, {"fr": 0.05}, HOLDS_TEXT),  # at the bound
    ],
)
def test_verdicts(victim_kept, partner_kept, expected):
    assert verdict(victim_kept, partner_kept) == expected


def test_unprotected_sanity_verdict():
    assert unprotected_verdict(0.9, {"fr": 0.6}) == "merge works"
    assert unprotected_verdict(0.9, {"fr": 0.59}).startswith("merge itself weak")


def test_choose_takes_the_first_argmax_and_skips_nan():
    curve = [
        (0.2, 0.3, {"fr": 0.4}),
        (0.5, 0.6, {"fr": 0.5}),
        (1.0, 0.9, {"fr": 0.0}),
        (1.5, math.nan, {"fr": 0.9}),
    ]
    assert choose(curve, "victim") == 1.0
    assert choose(curve, "min") == 0.5
    assert choose(curve, "mean") == 0.5  # 0.55 against 0.45 at 1.0


# --- the real audit on a tiny family ------------------------------------------------------------


def _inputs(split: str) -> torch.Tensor:
    return torch.randint(0, 97, (128, 9), generator=torch.Generator().manual_seed(SEEDS[split]))


SEEDS = {"val": 11, "test": 12}
TASKS = {"victim": (0.3, 1), "rider": (0.03, 2)}  # task -> (task vector scale, seed)


def _model(folder: Path, tensors: dict[str, torch.Tensor] | None = None):
    from transformers import AutoModel

    from mergeshield.modeling import quiet_transformers

    with quiet_transformers():
        model = AutoModel.from_pretrained(folder).eval()
    if tensors is not None:
        model.load_state_dict(tensors, strict=False)
    return model


def _predictions(folder: Path, task: str, split: str, tensors=None) -> torch.Tensor:
    """The task's fixed random head on the model in ``folder`` (with ``tensors`` loaded)."""
    model = _model(folder, tensors)
    head = torch.randn(48, 6, generator=torch.Generator().manual_seed(TASKS[task][1]))
    with torch.no_grad():
        return (model(input_ids=_inputs(split)).last_hidden_state @ head).argmax(-1)


@functools.cache
def _labels(folder: Path, task: str, split: str) -> torch.Tensor:
    return _predictions(folder, task, split)


def _agreement(task_model, task, *, family, split="test", backbone=None) -> float:
    """The audit's ``evaluate`` for the tiny family: agreement with the task's fine-tune."""
    labels = _labels(family.tasks[task], task, split)
    return float(
        (_predictions(Path(backbone or task_model), task, split) == labels).mean(
            dtype=torch.float64
        )
    )


@pytest.fixture(scope="module")
def tiny_family(tmp_path_factory) -> Family:
    """A base and two fine-tunes along random directions, the victim's 10x the free-rider's."""
    root = tmp_path_factory.mktemp("tiny-family")
    build("bert", root / "base", seed=0)
    base = load_file(root / "base" / "model.safetensors")
    tasks = {}
    for task, (scale, seed) in TASKS.items():
        g = torch.Generator().manual_seed(seed)
        tuned = {
            k: v + scale * v.abs().mean() * torch.randn(v.shape, generator=g)
            if v.is_floating_point() and v.dim() == 2 and "embeddings" not in k
            else v
            for k, v in base.items()
        }
        folder = root / task
        folder.mkdir()
        save_file(tuned, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text((root / "base" / "config.json").read_text())
        tasks[task] = folder
    family = Family("text", "tiny", root, root / "base", tasks, {}, {}, {}, manifest={"tasks": {}})
    for t in tasks:
        val, test = (
            _agreement(None, t, family=family, split=s, backbone=family.base) for s in SEEDS
        )
        family.base_accuracy[t], family.finetuned_accuracy[t] = test, 1.0
        family.manifest["tasks"][t] = {"base_val_accuracy": val, "finetuned_val_accuracy": 1.0}
    return family


class _AgreementScorer:
    """The audit's in-memory scorer for the tiny family: agreement of merged tensors with the
    task's fine-tune (what :func:`_agreement` measures on folders)."""

    def __init__(self, family: Family, task: str, head_model: Path) -> None:
        self.family, self.task = family, task
        self.data = {s: {"labels": _labels(family.tasks[task], task, s)} for s in SEEDS}

    def __call__(self, backbone: dict[str, torch.Tensor], split: str) -> float:
        got = _predictions(self.family.base, self.task, split, tensors=backbone)
        return float((got == self.data[split]["labels"]).mean(dtype=torch.float64))


@pytest.fixture
def functional_score(monkeypatch):
    monkeypatch.setattr(audit_module, "evaluate", _agreement)
    monkeypatch.setattr(audit_module, "Scorer", _AgreementScorer)
    return _agreement


def _audit(family: Family, tmp_path: Path, objective: str, defenses=()):
    plan = AuditPlan(
        victim="victim",
        free_riders=("rider",),
        defenses=defenses,
        methods=("task_arithmetic",),
        grid=(0.2, 0.5, 0.8, 1.0),
        objective=objective,
        protocol=(("task_arithmetic", 0.8),),
        interpolation=(0.0, 1.0),
    )
    return run_audit(plan, tmp_path / objective, family=family, progress=False)


def test_victim_and_min_objectives_choose_different_coefficients(
    tiny_family, functional_score, tmp_path
):
    """Each objective picks the argmax of its own score on the validation curve, measured here
    independently of the audit by merging with mergekit at every coefficient."""
    from mergeshield.merging import merge

    val = {}
    for c in (0.2, 0.5, 0.8, 1.0):
        folder = merge(
            "task_arithmetic",
            tiny_family.base,
            [tiny_family.tasks["victim"], tiny_family.tasks["rider"]],
            tmp_path / f"m{c}",
            coefficient=c,
        )
        val[c] = {
            t: kept(
                functional_score(None, t, family=tiny_family, split="val", backbone=folder),
                tiny_family.manifest["tasks"][t]["base_val_accuracy"],
                1.0,
            )
            for t in TASKS
        }
    expected_victim = max(val, key=lambda c: val[c]["victim"])
    expected_min = max(val, key=lambda c: min(val[c].values()))
    assert expected_victim != expected_min  # the family is built so that they differ

    by_victim = _audit(tiny_family, tmp_path, "victim").merges[0]
    by_min = _audit(tiny_family, tmp_path, "min").merges[0]
    assert by_victim.coefficient == expected_victim
    assert by_min.coefficient == expected_min
    # the victim view recorded by the min audit is the victim audit's choice, with the
    # validation shares that choice was made on (here recomputed through mergekit)
    assert by_min.victim_view["coefficient"] == expected_victim
    assert by_min.victim_view["split"] == "val"
    assert by_min.victim_view["victim_kept"] == pytest.approx(val[expected_victim]["victim"])
    assert by_min.victim_view["partner_kept"]["rider"] == pytest.approx(
        val[expected_victim]["rider"]
    )
    # the victim objective buys victim share with the free-rider's task
    assert by_victim.victim_kept > by_min.victim_kept
    assert by_victim.partner_kept["rider"] < by_min.partner_kept["rider"]
    for c, v, p in by_min.val_kept:
        assert v == pytest.approx(val[c]["victim"]) and p["rider"] == pytest.approx(val[c]["rider"])


def test_inserted_release_is_named_and_min_objective_does_not_count_it(
    tiny_family, functional_score, tmp_path
):
    """MergeLock's release merged by task arithmetic: the victim objective takes coefficient 1
    (the release inserted whole) and keeps the victim while the free-rider's task is lost; the
    joint objective finds no merge that serves both."""
    by_victim = _audit(tiny_family, tmp_path, "victim", defenses=("mergelock",))
    row = next(r for r in by_victim.merges if r.variant == "mergelock")
    assert row.coefficient == 1.0
    assert row.victim_kept > 0.5 and row.partner_kept["rider"] <= 0.05
    assert audit_module.row_verdict(row) == INSERTED_TEXT
    report = (tmp_path / "victim" / "report.md").read_text()
    assert "release inserted whole" in report and "objective `victim`" in report

    by_min = _audit(tiny_family, tmp_path, "min", defenses=("mergelock",))
    row = next(r for r in by_min.merges if r.variant == "mergelock")
    assert audit_module.row_verdict(row) != USEFUL_TEXT
    unprotected = next(r for r in by_min.merges if r.variant == "unprotected")
    assert unprotected.weakest > row.weakest
    protocol = {r.variant: r for r in by_min.protocol}
    assert protocol["unprotected"].degradation == 0.0
    assert protocol["mergelock"].degradation > 0.0
    data = (tmp_path / "min" / "report.json").read_text()
    assert '"objective": "min"' in data
    assert (tmp_path / "min" / "merge_map.png").stat().st_size > 0
