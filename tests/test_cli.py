"""Every research command through the CLI (``protect``/``verify``/``unprotect`` have their own
files): what each prints, what it writes, and its exit status on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeshield.cli import main
from mergeshield.defenses import DEFENSES
from tests.tiny_models import build


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT base and two fine-tunes of it (base + random task vectors)."""
    root = tmp_path_factory.mktemp("cli")
    build("bert", root / "base")
    base = load_file(root / "base" / "model.safetensors")
    out = {"base": root / "base"}
    for name, seed in (("a", 1), ("b", 2)):
        g = torch.Generator().manual_seed(seed)
        tuned = {
            k: v + 0.05 * v.abs().mean() * torch.randn(v.shape, generator=g)
            if v.is_floating_point()
            else v
            for k, v in base.items()
        }
        (root / name).mkdir()
        save_file(tuned, root / name / "model.safetensors", metadata={"format": "pt"})
        (root / name / "config.json").write_text((root / "base" / "config.json").read_text())
        out[name] = root / name
    return out


def _one_line_error(capsys, *needles: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("mergeshield: error:"), err
    for needle in needles:
        assert needle in err, err


def test_defenses_lists_every_defense_and_model_type(capsys):
    from mergeshield.architectures import SUPPORTED_MODEL_TYPES

    assert main(["defenses"]) == 0
    out = capsys.readouterr().out
    for name in DEFENSES:
        assert any(line.startswith(name) for line in out.splitlines()), name
    for model_type in SUPPORTED_MODEL_TYPES:
        assert model_type in out


def test_merge_writes_what_the_formula_gives(tiny, tmp_path, capsys):
    """Task arithmetic at 0.5 through the CLI: theta_0 + 0.5 (tau_a + tau_b), tensor by tensor."""
    out = tmp_path / "merged"
    args = ["merge", str(tiny["base"]), str(tiny["a"]), str(tiny["b"]), "-o", str(out)]
    assert main([*args, "-m", "task_arithmetic", "-c", "0.5"]) == 0
    assert "task_arithmetic (coefficient 0.5)" in capsys.readouterr().out
    merged = load_file(out / "model.safetensors")
    base, a, b = (load_file(tiny[k] / "model.safetensors") for k in ("base", "a", "b"))
    for name, t in base.items():
        if t.is_floating_point():
            expected = t + 0.5 * ((a[name] - t) + (b[name] - t))
            torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    assert main([*args, "-m", "task_arithmetic", "-c", "0.5"]) == 2  # exists, no --overwrite
    _one_line_error(capsys, "--overwrite")
    assert main([*args, "-m", "no_such_method", "--overwrite"]) == 2
    _one_line_error(capsys, "unknown merge method 'no_such_method'")


def test_attack_undoes_a_permutation_defense(tiny, tmp_path, capsys):
    """AGA aligns PaRaMS' release back onto the base: far closer to the original afterwards."""
    protected, aligned = tmp_path / "protected", tmp_path / "aligned"
    assert (
        main(
            [
                "protect",
                str(tiny["a"]),
                str(protected),
                "--defense",
                "params",
                "--base",
                str(tiny["base"]),
                "--seed",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["attack", str(protected), str(tiny["base"]), str(aligned), "-q"]) == 0
    assert "aligned" in capsys.readouterr().out
    original = load_file(tiny["a"] / "model.safetensors")

    def distance(folder: Path) -> float:
        t = load_file(folder / "model.safetensors")
        return sum(float((t[k] - v).norm()) for k, v in original.items() if v.is_floating_point())

    assert distance(aligned) < 0.1 * distance(protected)
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses the unknown attack
        main(["attack", str(protected), str(tiny["base"]), str(aligned), "-m", "nope"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_audit_and_demo_parse_into_the_plan_they_run(monkeypatch, tmp_path, capsys):
    """The audit and demo commands build the plan they document (objective, protocol, grid)."""
    from mergeshield.evaluation import audit as audit_module

    plans = []

    def fake_run_audit(plan, out, **kwargs):
        plans.append(plan)
        return audit_module.AuditResult(plan, {}, "victim", [], seconds=0.0)

    monkeypatch.setattr(audit_module, "run_audit", fake_run_audit)
    assert main(["demo", "--out", str(tmp_path / "d")]) == 0
    assert (
        main(
            [
                "audit",
                "--out",
                str(tmp_path / "a"),
                "--objective",
                "mean",
                "--no-protocol",
                "--methods",
                "ties",
                "--attacks",
            ]
        )
        == 0
    )
    demo, audit = plans
    assert (demo.objective, demo.protocol) == ("min", audit_module.PAPER_SETTINGS)
    assert demo.tasks == ("wordnet_noun", "wordnet_verb") and demo.grid == (0.3, 0.5, 0.7, 1.0)
    assert (audit.objective, audit.protocol, audit.methods, audit.attacks) == (
        "mean",
        (),
        ("ties",),
        (),
    )
    assert "objective: min" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["audit", "--objective", "max"])


@pytest.mark.slow
def test_audit_command_on_the_small_text_family(tmp_path, capsys):
    """A real audit through the CLI: MergeLock, task arithmetic at 1 only, no protocol."""
    import json

    out = tmp_path / "report"
    args = [
        "audit",
        "--out",
        str(out),
        "--victim",
        "wordnet_noun",
        "--free-riders",
        "wordnet_verb",
        "--defenses",
        "mergelock",
        "--methods",
        "task_arithmetic",
        "--attacks",
        "--grid",
        "1.0",
        "--no-protocol",
    ]
    assert main(args) == 0
    printed = " ".join(capsys.readouterr().out.split())  # the table wraps long cells
    data = json.loads((out / "report.json").read_text())
    assert [r["variant"] for r in data["merges"]] == ["unprotected", "mergelock"]
    report = (out / "report.md").read_text()
    for row in data["merges"]:
        assert row["verdict"] in report
        assert row["verdict"].split()[0] in printed
    assert main(args) == 2  # the report exists
    _one_line_error(capsys, "--overwrite")
