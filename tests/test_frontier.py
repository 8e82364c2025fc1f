"""The frontier study end to end on the small text family (real MiniLM, real mergekit)."""

from __future__ import annotations

import json
import math

import pytest

from mergeshield.cli import main
from mergeshield.evaluation.zoo import build_family

pytestmark = pytest.mark.slow  # fine-tunes and merges the real MiniLM


def test_frontier_command_measures_each_candidate_and_attack(tmp_path, capsys):
    family = build_family("text", "small", progress=False)  # shared with tests/test_audit.py
    out = tmp_path / "frontier"
    args = ["frontier", "--kind", "text", "--setting", "small", "--out", str(out)]
    args += ["--candidates", "unprotected", "prune/mergelock", "--methods", "task_arithmetic"]
    args += ["--attacks", "none", "aga+prune", "--no-finetune", "--seed", "3"]
    assert main(args) == 0, capsys.readouterr().err
    data = json.loads((out / "frontier.json").read_text())
    victim = data["victim"]
    results = {r["name"]: r for r in data["details"]}
    assert set(results) == {"unprotected", "prune/mergelock"}
    # the unprotected release is the family's fine-tune itself (the manifest keeps 4 decimals)
    assert abs(results["unprotected"]["standalone"] - family.finetuned_accuracy[victim]) < 1e-4
    # pruning 20% of the update costs little but is not free of change; MergeLock adds nothing
    pruned = results["prune/mergelock"]["standalone"]
    assert abs(pruned - family.finetuned_accuracy[victim]) < 0.1
    for res in results.values():
        variants = {row["variant"] for row in res["rows"]}
        assert variants == {"none", "aga+prune"}
        searches = {row["search"] for row in res["rows"]}
        assert searches == {"sweep", "insertion"}
        best = res["best"]["task_arithmetic"]
        # the attacker's best merge, re-run through real mergekit, scores what the in-memory
        # formula predicted
        assert math.isfinite(best["test_victim_mergekit"])
        assert abs(best["test_victim_mergekit"] - best["test_victim"]) < 0.02
        mergekit, in_memory = best["test_partners_mergekit"], best["test_partners"]
        assert mergekit.keys() == in_memory.keys() == {data["plan"]["free_riders"][0]}
        assert all(abs(mergekit[t] - in_memory[t]) < 0.02 for t in mergekit)
        # the best attack is the one with the best joint (weakest-task) validation score
        assert best["val_joint"] == max(r["val_joint"] for r in res["rows"])
    rider = data["plan"]["free_riders"][0]
    for summary in data["summary"]:
        cell = summary["task_arithmetic"]
        gap = family.finetuned_accuracy[rider] - family.base_accuracy[rider]
        rider_kept = (cell["partners"][rider] - family.base_accuracy[rider]) / gap
        assert abs(cell["weakest"] - min(cell["kept"], rider_kept)) < 1e-9
    assert "aga+prune" in (out / "frontier.md").read_text()
    assert (out / "frontier.png").stat().st_size > 0


def test_hardened_release_is_undone_under_the_joint_objective(tmp_path, capsys):
    """README's hardening statement on the small family: merge+arf hardening then MergeLock, the
    best candidate of the earlier victim-only study, does not stop a TIES merge that serves both
    tasks once the release is aligned by AGA: the weakest task keeps more than the 60% a usable
    merge keeps (the audit's bound for an unprotected merge)."""
    out = tmp_path / "frontier"
    args = ["frontier", "--kind", "text", "--setting", "small", "--out", str(out)]
    args += ["--candidates", "merge+arf/mergelock", "--methods", "ties", "--attacks", "aga"]
    args += ["--no-finetune", "--steps", "120", "--lr", "3e-5", "--target", "uniform"]
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads((out / "frontier.json").read_text())["summary"][0]
    assert summary["ties"]["weakest"] > 0.60
    assert not summary["meets_target"]
