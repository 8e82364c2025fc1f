"""mergeshield.merging.kernels: every in-memory kernel against mergekit on tiny models.

For each tiny model family (tests/tiny_models.py) a base and three "task models" (the base plus
N(0, 0.02²) noise on every float tensor) are written; every merge method of the registry is run
by mergekit (``methods.merge``) and by the kernel, and each tensor must agree to a relative
error of 1e-6 (max |kernel − mergekit| / max |mergekit|), DARE and DELLA included (same seed).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mergeshield.attacks.adaptive import insert
from mergeshield.errors import MergeShieldError
from mergeshield.folders import load_tensors, save_tensors
from mergeshield.merging import METHODS, merge
from mergeshield.merging.kernels import (
    TASK_VECTOR_RULES,
    magnitude_mask,
    merge_tensors,
    outlier_mask,
    prepare,
)
from tests.tiny_models import build

# One model per architecture family that mergekit 0.1.5 merges: BERT-like encoders, ViT, GPT-2
# (Conv1D), Llama-like decoders.  (mergekit raises NotImplementedError on CLIP and drops
# Mixtral's experts, so neither can be compared.)  Two task models on ViT, GPT-2 and Llama;
# one and three on BERT (slerp's one-model form, model_stock's n > 2).
FAMILIES = {"bert": (1, 3), "vit": (2,), "gpt2": (2,), "llama-gqa2": (2,)}
RELATIVE = 1e-6


def _task_models(root: Path, name: str) -> tuple[Path, list[Path]]:
    """A base folder and three noisy copies of it (same config, same tensor names)."""
    base = root / "base"
    build(name, base)
    tensors = load_tensors(base)
    tasks = []
    for index in range(3):
        g = torch.Generator().manual_seed(10 + index)
        noisy = {
            k: t + 0.02 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t
            for k, t in tensors.items()
        }
        folder = root / f"task{index}"
        folder.mkdir()
        save_tensors(noisy, folder)
        shutil.copy2(base / "config.json", folder / "config.json")
        tasks.append(folder)
    return base, tasks


def _relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert sorted(got) == sorted(want)
    worst = 0.0
    for k, w in want.items():
        g = got[k]
        assert g.shape == w.shape, k
        if not w.is_floating_point():
            assert torch.equal(g.to(w.dtype), w), k
            continue
        scale = w.double().abs().max().clamp(min=1e-30)
        worst = max(worst, float((g.double() - w.double()).abs().max() / scale))
    return worst


def _cases(sizes: tuple[int, ...]) -> list[tuple[str, int]]:
    """(method, number of task models) for every method that takes that many."""
    return [
        (m, n)
        for m, spec in METHODS.items()
        for n in sizes
        if n >= spec.min_models and (spec.max_models is None or n <= spec.max_models)
    ]


@pytest.mark.parametrize(("family", "sizes"), FAMILIES.items())
def test_every_kernel_matches_mergekit(family, sizes, tmp_path) -> None:
    base, tasks = _task_models(tmp_path, family)
    base_t = load_tensors(base)
    models_t = [load_tensors(t) for t in tasks]
    errors = {}
    for method, n in _cases(sizes):
        grid = METHODS[method].grid
        c = grid[len(grid) // 2]
        out = merge(method, base, tasks[:n], tmp_path / "merged", coefficient=c, seed=7)
        ours = merge_tensors(method, base_t, models_t[:n], coefficient=c, seed=7)
        errors[(method, n)] = _relative_error(ours, load_tensors(out))
    assert all(e <= RELATIVE for e in errors.values()), errors


def test_sweep_reuses_one_sparsification_and_keeps_mergekit_draws(tmp_path) -> None:
    """prepare(method)(c) is the mergekit merge at every c of a grid (the masks drawn once),
    and the kernel keeps the caller's torch random state."""
    base, tasks = _task_models(tmp_path, "bert")
    base_t, models_t = load_tensors(base), [load_tensors(t) for t in tasks[:2]]
    for method in ("dare_ties", "della", "slerp", "linear"):
        at = prepare(method, base_t, models_t, seed=3)
        for c in METHODS[method].grid[::3]:
            out = merge(method, base, tasks[:2], tmp_path / "m", coefficient=c, seed=3)
            assert _relative_error(at(c), load_tensors(out)) <= RELATIVE, (method, c)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    prepare("dare_linear", base_t, models_t, seed=1)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_weighted_insertion_matches_mergekit(method, tmp_path) -> None:
    """Model weights (1, c) at lambda 1 (the frontier's coefficient-1 insertion), as
    ``attacks.adaptive.insert`` makes mergekit merge."""
    base, tasks = _task_models(tmp_path, "bert")
    out = insert(base, tasks[0], [tasks[1]], tmp_path / "m", coefficient=0.3, method=method)
    models = [load_tensors(t) for t in tasks[:2]]
    ours = merge_tensors(
        method, load_tensors(base), models, coefficient=1.0, params={"weights": [1.0, 0.3]}
    )
    assert _relative_error(ours, load_tensors(out)) <= RELATIVE


def test_other_seeds_draw_other_masks(tmp_path) -> None:
    base, tasks = _task_models(tmp_path, "bert")
    base_t, models_t = load_tensors(base), [load_tensors(t) for t in tasks[:2]]
    a = merge_tensors("dare_ties", base_t, models_t, coefficient=0.5, seed=0)
    b = merge_tensors("dare_ties", base_t, models_t, coefficient=0.5, seed=1)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_masks_keep_the_documented_counts() -> None:
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(40, 25, generator=g)
    mask = magnitude_mask(delta, 0.2)
    assert int(mask.sum()) == 200
    assert delta.abs()[mask.bool()].min() >= delta.abs()[~mask.bool()].max()
    crumbs = outlier_mask(delta, 0.9, 0.01)
    assert int(crumbs.sum()) == 900
    order = delta.abs().reshape(-1).argsort()
    kept = crumbs.reshape(-1)[order]
    assert kept[:90].sum() == 0 and kept[90:990].all() and kept[990:].sum() == 0


def test_masks_resolve_tied_magnitudes_as_mergekit_does() -> None:
    """Real fine-tunes have equal float32 |δ| at the top-k threshold (the MiniLM TIES merge
    differed by 0.5% before this): the kernels then keep exactly mergekit's entries."""
    from mergekit.sparsify import magnitude, magnitude_outliers

    g = torch.Generator().manual_seed(1)
    delta = torch.randint(-6, 7, (40, 25), generator=g).float() * 0.01
    for density in (0.1, 0.2, 0.5):
        assert torch.equal(delta * magnitude_mask(delta, density), magnitude(delta, density))
        got = delta * outlier_mask(delta, density, 0.05)
        assert torch.equal(got, magnitude_outliers(delta, density, gamma=0.05))


def test_every_registered_method_has_a_kernel() -> None:
    assert set(TASK_VECTOR_RULES) | {"linear", "slerp", "model_stock"} == set(METHODS)


def test_kernels_refuse_bad_inputs(tmp_path) -> None:
    base = {"w": torch.zeros(3, 2)}
    with pytest.raises(MergeShieldError, match="lacks"):
        merge_tensors("ties", base, [{}], coefficient=1.0)
    with pytest.raises(MergeShieldError, match="shape"):
        merge_tensors("ties", base, [{"w": torch.zeros(2, 3)}], coefficient=1.0)
    with pytest.raises(MergeShieldError, match="cannot merge"):
        merge_tensors("model_stock", base, [base], coefficient=1.0)
    with pytest.raises(MergeShieldError, match="parameters"):
        merge_tensors("ties", base, [base], coefficient=1.0, params={"gamma": 0.1})
    with pytest.raises(MergeShieldError, match="unknown merge method"):
        merge_tensors("nope", base, [base], coefficient=1.0)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "della", "dare_ties"])
def test_sparse_cache_reuses_the_shared_models_masks_bit_for_bit(method, monkeypatch) -> None:
    """With a :class:`SparseCache` of the free-rider, merging it with two different variants
    gives exactly the uncached merges, computes the free-rider's deterministic part (mask or
    DELLA's probabilities) once, and computes it again after the free-rider changed in place."""
    from mergeshield.merging import kernels

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(40, 30, generator=g), "b": torch.randn(30, generator=g)}

    def noisy() -> dict[str, torch.Tensor]:
        return {k: t + 0.05 * torch.randn(t.shape, generator=g) for k, t in base.items()}

    rider, variants = noisy(), [noisy(), noisy()]
    calls = []
    real = kernels._deterministic_part
    monkeypatch.setattr(
        kernels, "_deterministic_part", lambda delta, *a: calls.append(1) or real(delta, *a)
    )
    cache = kernels.SparseCache([rider])
    deterministic = method != "dare_ties"
    for index, variant in enumerate(variants):
        calls.clear()
        cached = prepare(method, base, [variant, rider], seed=3, cache=cache)(0.7)
        per_model = len(calls)
        calls.clear()
        plain = prepare(method, base, [variant, rider], seed=3)(0.7)
        assert all(torch.equal(cached[k], plain[k]) for k in base)
        if deterministic:  # 2 tensors x 2 models uncached; the rider's 2 come from the cache
            assert len(calls) == 4 and per_model == (4 if index == 0 else 2)
    if deterministic:
        rider["w"].add_(0.1)  # in place: the cached part of "w" is stale
        calls.clear()
        cached = prepare(method, base, [variants[0], rider], seed=3, cache=cache)(0.7)
        assert len(calls) == 3
        plain = prepare(method, base, [variants[0], rider], seed=3)(0.7)
        assert all(torch.equal(cached[k], plain[k]) for k in base)


REUSE_DRIVER = """
import resource, torch
from mergeshield.merging.kernels import reuse_freed_memory

def faults(times):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        block = torch.ones(16 * 2**20)  # 64 MB, written through
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

plain = faults(16)
with reuse_freed_memory():
    faults(2)  # the heap grows to hold the blocks
    reused = faults(16)
print(plain, reused)
"""


def test_reuse_freed_memory_stops_refaulting_large_blocks() -> None:
    """Inside ``reuse_freed_memory`` a freed 64 MB block is reused without new page faults;
    before it, glibc maps and faults fresh pages for each one (in a fresh process: an
    earlier audit in this one may have left its heap grown)."""
    import ctypes.util
    import subprocess
    import sys

    if ctypes.util.find_library("c") is None:
        pytest.skip("no C library to tune")
    out = subprocess.run(
        [sys.executable, "-c", REUSE_DRIVER], capture_output=True, text=True, check=True
    )
    plain, reused = map(int, out.stdout.split())
    assert plain > 16 * 10_000  # 16384 pages a block
    assert reused < plain / 4  # measured: two blocks' worth, against sixteen
