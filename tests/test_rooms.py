"""The shared rooms of the rebuild: one registry style, options that check themselves, one
atomic file write, one training loop."""

from __future__ import annotations

import math
import os
import stat

import pytest
import torch

from mergeshield.attacks import ATTACKS
from mergeshield.defenses import DEFENSES, DefenseOptions
from mergeshield.errors import MergeShieldError
from mergeshield.folders import atomic_file
from mergeshield.hardening.components import REGISTRY as COMPONENT_REGISTRY
from mergeshield.hardening.config import COMPONENTS, HardenConfig
from mergeshield.merging import METHODS
from mergeshield.modeling import train_steps
from mergeshield.registry import Registry


@pytest.mark.parametrize(
    ("registry", "names"),
    [
        (DEFENSES, {"params", "mergelock", "mergebarrier", "all"}),
        (ATTACKS, {"aga", "rebasin", "procrustes"}),
        (COMPONENT_REGISTRY, set(COMPONENTS)),
        (
            METHODS,
            {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear"}
            | {"breadcrumbs", "della", "slerp", "model_stock"},
        ),
    ],
)
def test_every_registry_is_one_style_and_names_its_choices(registry, names):
    assert isinstance(registry, Registry)
    assert set(registry) == names
    for name in names:
        assert registry.lookup(name).name == name
    with pytest.raises(MergeShieldError, match=f"unknown {registry.kind} 'nope'; choose from"):
        registry.lookup("nope")


def test_a_name_registers_once():
    registry = Registry("thing")
    item = type("Item", (), {"name": "a"})()
    assert registry.register(item) is item
    with pytest.raises(AssertionError, match="registered twice"):
        registry.register(item)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scaling": "wavy"}, "unknown PaRaMS scaling"),
        ({"scale": (0.0, 2.0)}, "--scale needs finite"),
        ({"scale": (3.0, 2.0)}, "--scale needs finite"),
        ({"scale": (1.0, math.inf)}, "--scale needs finite"),
        ({"max_cond": 0.5}, "--max-cond must be at least 1"),
        ({"max_cond": math.nan}, "--max-cond must be at least 1"),
        ({"flip_fraction": 0.0}, "--flip-fraction must be in"),
        ({"flip_fraction": math.nan}, "--flip-fraction must be in"),
        ({"exact_assignment_max": -1}, "exact_assignment_max"),
    ],
)
def test_defense_options_refuse_what_no_defense_can_use(change, message):
    with pytest.raises(MergeShieldError, match=message):
        DefenseOptions(**change)


def test_defense_options_defaults_and_bounds_are_accepted():
    DefenseOptions()
    DefenseOptions(scaling="diagonal", scale=(0.5, 0.5), max_cond=None, flip_fraction=1.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": 0}, "steps must be at least 1"),
        ({"steps": 2.5}, "steps must be an int"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"lam": -1.0}, "non-negative"),
        ({"s_min": 0.99}, "s_min must lie"),
        ({"s_max": 1.01}, "s_max must exceed"),
        ({"c_min": 0.8, "c_max": 0.5}, "c_min <= c_max"),
        ({"ties_density": 0.0}, "ties_density"),
        ({"prune_fraction": 1.0}, "prune_fraction"),
        ({"weighting": "log"}, "weighting must be one of"),
        ({"lr": math.nan}, "lr must be a finite number"),
        ({"proxies": ["a"]}, "proxies must be a tuple"),
    ],
)
def test_harden_config_refuses_bad_values_with_one_line(change, message):
    with pytest.raises(MergeShieldError, match=message) as err:
        HardenConfig(**change)
    assert "\n" not in str(err.value)


def test_atomic_file_publishes_whole_or_not_at_all(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]  # no temporary left
    with atomic_file(path, mode=0o600) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


class _Linear(torch.nn.Module):
    """A model with the transformers calling convention: ``model(**batch).loss``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(3, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor):  # noqa: D401
        return type("Out", (), {"loss": (self.w(x).squeeze(-1) - labels).square().mean()})()


def test_train_steps_follows_the_batches_and_lowers_the_loss():
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    data = {"x": x, "labels": x @ torch.tensor([1.0, -2.0, 0.5])}
    model = _Linear()
    seen = []
    order = [torch.arange(i, i + 16) % 64 for i in range(0, 16 * 40, 16)]
    losses = train_steps(model, data, order, lr=0.05, after_step=lambda s, loss: seen.append(s))
    assert seen == list(range(1, 41))
    assert len(losses) == 40 and losses[-1] < 0.1 * losses[0]
    assert not model.training
