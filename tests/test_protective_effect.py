"""The protective effect, measured on the merges free-riders do, on tiny random families.

Each family has a base ``theta_0`` and two fine-tunes ``theta_0 + tau`` (the victim and another
task) with random task vectors.  For a release ``R`` (the victim, or the victim protected by a
defense) and a partner ``P`` (the base, or the other fine-tune), the 50/50 merge
``(R + P) / 2`` is compared with the victim's function on fixed inputs:
``d(X) = |f(X) - f(victim)|``.

The bound comes from the unprotected merge itself: averaging the victim with ``P`` lands between
them, so ``d((victim + P) / 2) < d(P)``: the merge keeps part of the victim's function.  A
protection works when the protected merge keeps none of it: ``d((R + P) / 2) >= d(P)``, the
merged model is no closer to the victim than the partner it was merged with.  Every defense
meets it on these random models, MergeBarrier included (on the trained MiniLM it barely changes
merges: BENCHMARKS.md; random weights have no dominant QK directions for its flips to spare).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeshield.defenses import DEFENSES
from mergeshield.protect import protect
from tests.tiny_models import build, outputs

FAMILIES = ["bert-seqcls", "vit", "gpt2", "llama-gqa2"]
DEFENSE_NAMES = sorted(DEFENSES)
TASK_SCALE = 0.03  # |tau| per entry, relative to the mean |theta_0| of its tensor


def _fine_tune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + TASK_SCALE * v.abs().mean() * torch.randn(v.shape, generator=g)
        if v.is_floating_point() and v.dim() >= 1
        else v
        for k, v in base.items()
    }


def _save(tensors: dict[str, torch.Tensor], like: Path, folder: Path) -> Path:
    """A checkpoint folder with ``tensors`` under their stored names and ``like``'s config
    (loaded back with ``from_pretrained``, which maps stored names to modules)."""
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    shutil.copy2(like / "config.json", folder / "config.json")
    return folder


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """name -> (model, inputs, base, victim folder, other fine-tune) for each tiny family."""
    root = tmp_path_factory.mktemp("effect")
    made = {}
    for name in FAMILIES:
        model, inputs = build(name, root / name / "base")
        base = load_file(root / name / "base" / "model.safetensors")
        victim = _save(_fine_tune(base, seed=1), root / name / "base", root / name / "victim")
        made[name] = (model, inputs, base, victim, _fine_tune(base, seed=2))
    return made


def _distance_to_victim(model, victim, tensors, inputs, folder: Path) -> float:
    """|f(tensors) - f(victim)| on ``inputs``."""
    merged = type(model).from_pretrained(_save(tensors, victim, folder)).eval()
    return float((outputs(merged, inputs) - _victim_outputs(model, victim, inputs)).norm())


_VICTIM_OUTPUTS: dict[Path, torch.Tensor] = {}


def _victim_outputs(model, victim: Path, inputs) -> torch.Tensor:
    if victim not in _VICTIM_OUTPUTS:
        _VICTIM_OUTPUTS[victim] = outputs(type(model).from_pretrained(victim).eval(), inputs)
    return _VICTIM_OUTPUTS[victim]


def _average(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (a[k].double() + b[k].double()).div(2).to(a[k].dtype) for k in a}


def _distances(families, family, defense, tmp_path) -> dict[str, tuple[float, float, float]]:
    """partner -> (d(partner), d(unprotected merge), d(protected merge))."""
    model, inputs, base, victim_folder, other = families[family]
    victim = load_file(victim_folder / "model.safetensors")
    protect(victim_folder, tmp_path / "p", defense, seed=5, progress=False)
    released = load_file(tmp_path / "p" / "model.safetensors")
    out = {}
    for partner_name, partner in (("base", base), ("other fine-tune", other)):
        out[partner_name] = tuple(
            _distance_to_victim(model, victim_folder, t, inputs, tmp_path / f"{partner_name}-{i}")
            for i, t in enumerate((partner, _average(victim, partner), _average(released, partner)))
        )
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("defense", DEFENSE_NAMES)
def test_protected_merge_keeps_none_of_the_victim(families, family, defense, tmp_path):
    for partner, (d_partner, d_plain, d_protected) in _distances(
        families, family, defense, tmp_path
    ).items():
        assert d_plain < d_partner, f"{family}: the unprotected merge with {partner} is no merge"
        assert d_protected >= d_partner, (
            f"{family}/{defense}: merged with {partner}, the release stays closer to the victim "
            f"({d_protected:.3g}) than {partner} itself ({d_partner:.3g})"
        )
