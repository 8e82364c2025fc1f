"""mergeshield.merging: real mergekit merges of tiny random BERT, Llama and ViT models.

Every expected value is computed here by hand in torch from the input tensors, never read back
from mergekit, so a wrong config (wrong weights, wrong base, wrong λ) fails the tests.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from mergeshield.errors import MergeShieldError
from mergeshield.folders import load_tensors, save_tensors, tensor_names
from mergeshield.merging import (
    METHODS,
    aliases_bug_present,
    backbone_prefix,
    extract_backbone,
    merge,
    merge_config,
    mergekit_workarounds,
    run_mergekit,
    sweep,
)

TASK_VECTOR_METHODS = [
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "della",
]
NUM_LABELS = (2, 5, 3)


# --------------------------------------------------------------------------- tiny models


def _perturbed_task(task, base_model: torch.nn.Module, scale: float, seed: int) -> None:
    """Load the base weights into ``task``'s backbone, then add N(0, scale²) to every weight."""
    backbone = getattr(task, task.base_model_prefix)
    missing, unexpected = backbone.load_state_dict(base_model.state_dict(), strict=False)
    assert all("pooler" in name for name in [*missing, *unexpected]), (missing, unexpected)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in task.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def _build_family(root: Path, family: str) -> dict[str, object]:
    """A base backbone folder and three task models (heads of different sizes) with backbones."""
    torch.manual_seed(0)
    if family == "bert":
        config = BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            vocab_size=99,
        )
        base_model, task_class = BertModel(config), BertForSequenceClassification
    elif family == "llama":
        config = LlamaConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=99,
            pad_token_id=0,
        )
        base_model, task_class = LlamaModel(config), LlamaForSequenceClassification
    else:
        config = ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            image_size=16,
            patch_size=4,
            num_channels=1,
        )
        base_model, task_class = ViTModel(config), ViTForImageClassification
    base = root / "base"
    base_model.save_pretrained(base)
    if family == "bert":
        # Like MiniLM (saved by transformers 4): the buffer position_ids is in the checkpoint.
        tensors = load_tensors(base)
        tensors["embeddings.position_ids"] = torch.arange(config.max_position_embeddings)[None]
        save_tensors(tensors, base)
    tasks, backbones = [], []
    for index, num_labels in enumerate(NUM_LABELS):
        task_config = type(config)(**{**config.to_dict(), "num_labels": num_labels})
        task = task_class(task_config)
        _perturbed_task(task, base_model, scale=0.02, seed=100 + index)
        tasks.append(root / f"task{index}")
        task.save_pretrained(tasks[-1])
        backbones.append(extract_backbone(tasks[-1], base, root / f"backbone{index}"))
    return {"root": root, "base": base, "tasks": tasks, "backbones": backbones}


@pytest.fixture(scope="module", params=["bert", "llama", "vit"])
def family(request, tmp_path_factory) -> dict[str, object]:
    return _build_family(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> dict[str, object]:
    return _build_family(tmp_path_factory.mktemp("bert_only"), "bert")


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> dict[str, object]:
    return _build_family(tmp_path_factory.mktemp("vit_only"), "vit")


def _float64(folder: Path) -> dict[str, torch.Tensor]:
    return {name: t.double() for name, t in load_tensors(folder).items() if t.is_floating_point()}


def _assert_close(out: Path, expected: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    got = _float64(out)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=atol, msg=name)


# --------------------------------------------------------------------------- backbones


def test_backbone_prefix_is_found_from_names_alone() -> None:
    base = ["embeddings.word_embeddings.weight", "encoder.layer.0.output.dense.weight"]
    task = [
        "bert.embeddings.word_embeddings.weight",
        "bert.encoder.layer.0.output.dense.weight",
        "classifier.weight",
    ]
    assert backbone_prefix(task, base) == "bert."
    assert backbone_prefix(base, base) == ""
    assert backbone_prefix(["model.layers.0.w", "score.weight"], ["layers.0.w"]) == "model."
    with pytest.raises(MergeShieldError, match="no tensor of the task model matches"):
        backbone_prefix(["classifier.weight"], base)


def test_extract_backbone_round_trips_tensors_exactly(family) -> None:
    base, task, backbone = family["base"], family["tasks"][1], family["backbones"][1]
    base_tensors, task_tensors = load_tensors(base), load_tensors(task)
    out = load_tensors(backbone)
    assert list(out) == tensor_names(base)
    assert (backbone / "config.json").read_bytes() == (base / "config.json").read_bytes()
    prefix = {"BertModel": "bert.", "LlamaModel": "model.", "ViTModel": "vit."}[
        json.loads((base / "config.json").read_text())["architectures"][0]
    ]
    for name, tensor in out.items():
        if prefix + name in task_tensors:
            assert torch.equal(tensor, task_tensors[prefix + name]), name
            assert not torch.equal(tensor, base_tensors[name]) or not tensor.is_floating_point()
        else:  # only buffers / unused pooler come from the base
            assert "position_ids" in name or "pooler" in name, name
            assert torch.equal(tensor, base_tensors[name])
    assert not any(name.startswith(("classifier", "score")) for name in out)
    reloaded = AutoModel.from_pretrained(backbone)
    assert (
        type(reloaded).__name__
        == json.loads((base / "config.json").read_text())["architectures"][0]
    )


def test_extract_backbone_of_a_base_layout_model_is_a_copy(bert, tmp_path) -> None:
    out = extract_backbone(bert["backbones"][0], bert["base"], tmp_path / "copy")
    first, second = load_tensors(out), load_tensors(bert["backbones"][0])
    assert list(first) == list(second)
    assert all(torch.equal(first[name], second[name]) for name in first)
    # rewriting an existing folder replaces it and leaves no temporary folder behind
    extract_backbone(bert["tasks"][2], bert["base"], out)
    assert torch.equal(
        load_tensors(out)["pooler.dense.bias"],
        load_tensors(bert["tasks"][2])["bert.pooler.dense.bias"],
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_extract_backbone_rejects_an_unrelated_model(bert, vit, tmp_path) -> None:
    with pytest.raises(MergeShieldError, match="is it a fine-tune of that base"):
        extract_backbone(vit["tasks"][0], bert["base"], tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


# --------------------------------------------------------------------------- every method


def _cases() -> list[tuple[str, int]]:
    cases = []
    for name, spec in METHODS.items():
        for n in (1, 2, 3):
            if n >= spec.min_models and (spec.max_models is None or n <= spec.max_models):
                cases.append((name, n))
    return cases


@pytest.mark.parametrize(("method", "n_models"), _cases())
def test_every_method_runs_and_reloads(family, method, n_models, tmp_path) -> None:
    base, backbones = family["base"], family["backbones"][:n_models]
    coefficient = METHODS[method].grid[len(METHODS[method].grid) // 2]
    out = merge(method, base, backbones, tmp_path / "merged", coefficient=coefficient)
    assert tensor_names(out) == tensor_names(base)
    merged = _float64(out)
    assert all(torch.isfinite(t).all() for t in merged.values())
    # the merge is neither the base nor one of the inputs
    for source in (base, *backbones):
        inputs = _float64(source)
        assert any(not torch.allclose(merged[k], inputs[k]) for k in merged), source
    model = AutoModel.from_pretrained(out)
    assert (
        type(model).__name__ == json.loads((base / "config.json").read_text())["architectures"][0]
    )
    assert sorted(os.listdir(tmp_path)) == ["merged"]


# --------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("c", [0.6, 1.0])
def test_linear_is_the_weighted_mean(bert, tmp_path, c) -> None:
    base, models = _float64(bert["base"]), [_float64(b) for b in bert["backbones"]]
    out = merge("linear", bert["base"], bert["backbones"], tmp_path / "m", coefficient=c)
    expected = {k: (1 - c) * base[k] + c * sum(m[k] for m in models) / len(models) for k in base}
    _assert_close(out, expected)


def test_task_arithmetic_is_base_plus_lambda_sum_of_task_vectors(bert, tmp_path) -> None:
    base, models = _float64(bert["base"]), [_float64(b) for b in bert["backbones"]]
    lam = 0.35
    out = merge("task_arithmetic", bert["base"], bert["backbones"], tmp_path / "m", coefficient=lam)
    expected = {k: base[k] + lam * sum(m[k] - base[k] for m in models) for k in base}
    _assert_close(out, expected)


def _ties_by_hand(base, models, lam: float, density: float) -> dict[str, torch.Tensor]:
    """TIES (Yadav et al.): trim to top-density |δ|, elect sign of the sum, disjoint mean."""
    out = {}
    for name, theta0 in base.items():
        deltas = []
        for model in models:
            delta = (model[name] - theta0).flatten()
            k = max(1, int(density * delta.numel()))
            keep = torch.zeros_like(delta)
            keep[delta.abs().topk(k).indices] = 1
            deltas.append(delta * keep)
        stacked = torch.stack(deltas)
        elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).double()
        agree = (stacked.sign() == elected).double()
        count = agree.sum(0)
        mean = (stacked * agree).sum(0) / torch.where(count == 0, 1.0, count)
        out[name] = theta0 + lam * mean.reshape(theta0.shape)
    return out


def test_ties_matches_trim_elect_disjoint_mean(bert, tmp_path) -> None:
    base, models = _float64(bert["base"]), [_float64(b) for b in bert["backbones"]]
    out = merge(
        "ties",
        bert["base"],
        bert["backbones"],
        tmp_path / "m",
        coefficient=1.3,
        params={"density": 0.3},
    )
    _assert_close(out, _ties_by_hand(base, models, lam=1.3, density=0.3))


def test_ties_on_a_toy_tensor(bert, tmp_path) -> None:
    """δ₁ = (3, −1, 0.5, 2), δ₂ = (−2, −2, 1, −3): elected signs (+, −, +, −), so the disjoint
    mean is (3, (−1−2)/2, (0.5+1)/2, −3) = (3, −1.5, 0.75, −3); other entries have δ = 0."""
    name = "pooler.dense.bias"
    folders = []
    for index, values in enumerate(([0.0] * 4, [3.0, -1.0, 0.5, 2.0], [-2.0, -2.0, 1.0, -3.0])):
        folder = tmp_path / f"toy{index}"
        shutil.copytree(bert["base"], folder)
        tensors = load_tensors(folder)
        tensors[name] = torch.zeros_like(tensors[name])
        tensors[name][:4] = torch.tensor(values)
        save_tensors(tensors, folder)
        folders.append(folder)
    out = merge(
        "ties", folders[0], folders[1:], tmp_path / "m", coefficient=2.0, params={"density": 1.0}
    )
    merged = load_tensors(out)[name]
    assert merged[:4].tolist() == [6.0, -3.0, 1.5, -6.0]
    assert torch.equal(merged[4:], torch.zeros_like(merged[4:]))


def test_breadcrumbs_drops_outliers_and_small_entries(bert, tmp_path) -> None:
    base, models = _float64(bert["base"]), [_float64(b) for b in bert["backbones"][:2]]
    density, gamma, lam = 0.6, 0.1, 0.8
    out = merge(
        "breadcrumbs",
        bert["base"],
        bert["backbones"][:2],
        tmp_path / "m",
        coefficient=lam,
        params={"density": density, "gamma": gamma},
    )
    expected = {}
    for name, theta0 in base.items():
        total = torch.zeros_like(theta0).flatten()
        for model in models:
            delta = (model[name] - theta0).flatten()
            n = delta.numel()
            n_keep, n_top = int(density * n), int(gamma * n)
            n_bottom = max(0, n - n_keep - n_top)
            order = delta.abs().argsort()
            keep = torch.zeros_like(delta)
            keep[order[n_bottom : n_bottom + n_keep]] = 1
            total += delta * keep
        expected[name] = theta0 + lam * total.reshape(theta0.shape)
    _assert_close(out, expected)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_without_dropping_is_task_arithmetic(bert, tmp_path, method) -> None:
    base, models = _float64(bert["base"]), [_float64(b) for b in bert["backbones"]]
    out = merge(
        method,
        bert["base"],
        bert["backbones"],
        tmp_path / "m",
        coefficient=0.4,
        params={"density": 1.0},
    )
    if method == "dare_linear":
        expected = {k: base[k] + 0.4 * sum(m[k] - base[k] for m in models) for k in base}
    else:  # TIES sign election without trimming and without the division (normalize=False)
        expected = {}
        for k, theta0 in base.items():
            stacked = torch.stack([m[k] - theta0 for m in models])
            elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).double()
            expected[k] = theta0 + 0.4 * (stacked * (stacked.sign() == elected)).sum(0)
    _assert_close(out, expected)


@pytest.mark.parametrize("method", ["dare_linear", "della"])
def test_random_drop_keeps_a_rescaled_subset_and_is_seeded(bert, tmp_path, method) -> None:
    """One model: out = base + λ·mask·δ·‖δ‖₁/‖mask·δ‖₁, about a ``density`` share kept."""
    base, model = _float64(bert["base"]), _float64(bert["backbones"][0])
    lam, density = 0.5, 0.4
    params = {"density": density}

    def run(name: str, seed: int) -> Path:
        return merge(
            method,
            bert["base"],
            bert["backbones"][:1],
            tmp_path / name,
            coefficient=lam,
            params=params,
            seed=seed,
        )

    first, again, other = run("a", 1), run("b", 1), run("c", 2)
    merged, same, different = _float64(first), _float64(again), _float64(other)
    big = "encoder.layer.0.intermediate.dense.weight"
    kept_share = []
    for name, theta0 in base.items():
        assert torch.equal(merged[name], same[name]), name
        delta = model[name] - theta0
        step = (merged[name] - theta0) / lam
        kept = step != 0
        if not kept.any():
            continue
        rescale = delta.abs().sum() / delta[kept].abs().sum()  # mergekit's L1 rescale
        torch.testing.assert_close(step[kept], rescale * delta[kept], rtol=0, atol=1e-6)
        torch.testing.assert_close(step.abs().sum(), delta.abs().sum(), rtol=1e-4, atol=1e-6)
        kept_share.append(kept.double().mean().item())
    assert not torch.equal(merged[big], different[big])
    assert abs(sum(kept_share) / len(kept_share) - density) < 0.1


def _slerp_by_hand(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Whole-tensor slerp; a zero tensor (norm <= 1e-8) is normalised by 1, as mergekit does."""
    a, b = v0.flatten(), v1.flatten()
    norm_a = a.norm() if a.norm() > 1e-8 else 1.0
    norm_b = b.norm() if b.norm() > 1e-8 else 1.0
    cos = torch.dot(a / norm_a, b / norm_b).clamp(-1, 1)
    if cos.abs() > 0.9995:
        return (1 - t) * v0 + t * v1
    omega = torch.arccos(cos)
    return (torch.sin((1 - t) * omega) * v0 + torch.sin(t * omega) * v1) / torch.sin(omega)


@pytest.mark.parametrize("n_models", [1, 2])
def test_slerp_interpolates_on_the_sphere(bert, tmp_path, n_models) -> None:
    base, models = _float64(bert["base"]), [_float64(b) for b in bert["backbones"][:2]]
    start, end = (base, models[0]) if n_models == 1 else (models[0], models[1])
    t = 0.3
    out = merge("slerp", bert["base"], bert["backbones"][:n_models], tmp_path / "m", coefficient=t)
    _assert_close(out, {k: _slerp_by_hand(start[k], end[k], t) for k in base}, atol=1e-5)


@pytest.mark.parametrize("n_models", [2, 3])
def test_model_stock_ratio_comes_from_task_vector_cosines(bert, tmp_path, n_models) -> None:
    base, models = _float64(bert["base"]), [_float64(b) for b in bert["backbones"][:n_models]]
    out = merge(
        "model_stock", bert["base"], bert["backbones"][:n_models], tmp_path / "m", coefficient=1.0
    )
    expected = {}
    for name, theta0 in base.items():
        deltas = [(m[name] - theta0).flatten() for m in models]
        cosines = [
            torch.dot(deltas[i], deltas[j]) / (deltas[i].norm() * deltas[j].norm()).clamp(min=1e-6)
            for i in range(n_models)
            for j in range(i + 1, n_models)
        ]
        cos = torch.stack(cosines).mean().clamp(-1, 1)
        denominator = 1 + (n_models - 1) * cos
        t = 0.0 if abs(denominator) < 1e-6 else n_models * cos / denominator
        expected[name] = t * sum(m[name] for m in models) / n_models + (1 - t) * theta0
    _assert_close(out, expected, atol=1e-5)


@pytest.mark.parametrize("method", [*TASK_VECTOR_METHODS, "linear"])
def test_coefficient_zero_gives_the_base_back(bert, tmp_path, method) -> None:
    out = merge(method, bert["base"], bert["backbones"], tmp_path / "m", coefficient=0.0)
    merged, base = load_tensors(out), load_tensors(bert["base"])
    assert list(merged) == list(base)
    for name in base:
        assert torch.equal(merged[name], base[name]), name


# --------------------------------------------------------------------------- sweep


def test_sweep_returns_all_scores_and_keeps_only_the_argmax(bert, tmp_path) -> None:
    """Toy score: closeness of one merged tensor to base + 0.3·Σδ, so the argmax is λ = 0.3."""
    name = "encoder.layer.1.output.dense.weight"
    base, models = _float64(bert["base"]), [_float64(b) for b in bert["backbones"]]
    target = base[name] + 0.3 * sum(m[name] - base[name] for m in models)
    calls = []

    def score(path: Path) -> float:
        calls.append(path)
        assert path.is_dir()
        return -float((load_tensors(path, [name])[name].double() - target).norm())

    grid = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    workdir = tmp_path / "work"
    result = sweep(
        "task_arithmetic",
        bert["base"],
        bert["backbones"],
        score,
        grid=grid,
        workdir=workdir,
        keep_best=tmp_path / "best",
    )
    assert [c for c, _ in result.scores] == grid
    values = [s for _, s in result.scores]
    assert result.best_score == max(values)
    assert result.best_coefficient == grid[values.index(max(values))] == 0.3
    assert result.best_path == tmp_path / "best"
    assert len(calls) == len(grid)
    assert list(workdir.iterdir()) == []
    reference = merge(
        "task_arithmetic", bert["base"], bert["backbones"], tmp_path / "ref", coefficient=0.3
    )
    kept, ref = load_tensors(result.best_path), load_tensors(reference)
    assert all(torch.equal(kept[k], ref[k]) for k in ref)


def test_sweep_ties_go_to_the_first_and_nothing_is_kept_without_keep_best(bert, tmp_path) -> None:
    result = sweep(
        "slerp",
        bert["base"],
        bert["backbones"][:2],
        lambda path: 1.0,
        workdir=tmp_path / "work",
        keep_best=None,
    )
    assert result.best_coefficient == METHODS["slerp"].grid[0]
    assert len(result.scores) == len(METHODS["slerp"].grid)
    assert result.best_path is None
    assert list((tmp_path / "work").iterdir()) == []


def test_sweep_cleans_up_when_the_score_fails(bert, tmp_path) -> None:
    def score(path: Path) -> float:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        sweep(
            "task_arithmetic",
            bert["base"],
            bert["backbones"],
            score,
            grid=[0.5],
            workdir=tmp_path / "work",
            keep_best=tmp_path / "best",
        )
    assert list((tmp_path / "work").iterdir()) == []
    assert not (tmp_path / "best").exists()


# --------------------------------------------------------------------------- input checks


def test_bad_inputs_are_refused_before_mergekit_runs(bert, tmp_path) -> None:
    base, backbones = bert["base"], bert["backbones"]
    bad = [
        ("nope", [backbones[0]], 0.5, None, "unknown merge method 'nope'"),
        ("model_stock", [backbones[0]], 1.0, None, "needs at least 2 models"),
        ("model_stock", backbones, 0.5, None, "has no coefficient"),
        ("slerp", backbones, 0.5, None, "takes at most 2 models"),
        ("ties", [backbones[0], backbones[0]], 0.5, None, "must be distinct folders"),
        ("ties", [backbones[0]], 0.5, {"densty": 0.5}, r"not \['densty'\]"),
        ("task_arithmetic", [bert["root"]], 0.5, None, "is not a checkpoint folder"),
    ]
    for method, models, coefficient, params, message in bad:
        with pytest.raises(MergeShieldError, match=message):
            merge(method, base, models, tmp_path / "m", coefficient=coefficient, params=params)
    assert not (tmp_path / "m").exists()


def test_merge_keeps_the_callers_random_state(bert, tmp_path) -> None:
    torch.manual_seed(123)
    random.seed(123)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(123)
    random.seed(123)
    merge("dare_ties", bert["base"], bert["backbones"], tmp_path / "m", coefficient=0.5, seed=7)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]


# --------------------------------------------------------------------------- mergekit bugs


def test_bert_aliases_bug_is_still_in_mergekit(bert, tmp_path) -> None:
    """If this fails, mergekit fixed the BERT aliases bug: drop that workaround."""
    assert aliases_bug_present()
    config = merge_config("task_arithmetic", bert["base"], bert["backbones"], coefficient=0.5)
    with pytest.raises(TypeError, match="can only concatenate list"):
        run_mergekit(config, tmp_path / "m", workarounds_off=("bert_aliases",))
    assert not (tmp_path / "m").exists()


def test_vit_layers_are_dropped_by_mergekit_without_the_names_workaround(vit, tmp_path) -> None:
    """If this fails, mergekit reads ViT layers itself: drop the auto_arch_names workaround."""
    config = merge_config("task_arithmetic", vit["base"], vit["backbones"], coefficient=0.5)
    with pytest.raises(MergeShieldError, match=r"dropped \d+ tensors.*encoder\.layer\.0"):
        run_mergekit(config, tmp_path / "m", workarounds_off=("auto_arch_names",))


def test_della_crashes_on_cls_token_without_the_workaround(vit, tmp_path) -> None:
    """If this fails, mergekit's DELLA handles size-1 dims: drop the della_size1_dim fix."""
    config = merge_config("della", vit["base"], vit["backbones"], coefficient=1.0)
    with pytest.raises(RuntimeError, match="p_in >= 0 && p_in <= 1"):
        run_mergekit(config, tmp_path / "m", workarounds_off=("della_size1_dim",))


def test_mergekit_reads_a_rewritten_folder_from_its_stale_cache(bert, tmp_path) -> None:
    """Without clearing mergekit's LoaderCache, a folder rewritten in place is read stale."""
    model = tmp_path / "model"
    results = {}
    for off in [(), ("stale_caches",)]:
        extract_backbone(bert["tasks"][0], bert["base"], model)
        config = merge_config("task_arithmetic", bert["base"], [model], coefficient=1.0)
        run_mergekit(config, tmp_path / "first", workarounds_off=off)
        extract_backbone(bert["tasks"][1], bert["base"], model)  # same path, new tensors
        run_mergekit(config, tmp_path / "second", workarounds_off=off)
        results[off] = load_tensors(tmp_path / "second")
    with mergekit_workarounds():  # clears the caches left behind by the unpatched run
        pass
    fresh = load_tensors(model)
    name = "encoder.layer.0.output.dense.weight"
    assert torch.equal(results[()][name], fresh[name])
    assert not torch.equal(results[("stale_caches",)][name], fresh[name])


def test_workarounds_are_restored_and_idempotent() -> None:
    import mergekit.architecture.auto as auto
    import mergekit.sparsify as sparsify
    from mergekit.plan import MergePlanner

    originals = (MergePlanner.plan_tensor, auto.get_transformers_info, sparsify.della_magprune)
    with mergekit_workarounds():
        patched = (MergePlanner.plan_tensor, auto.get_transformers_info, sparsify.della_magprune)
        assert all(p is not o for p, o in zip(patched, originals, strict=True))
        with mergekit_workarounds():
            again = (MergePlanner.plan_tensor, auto.get_transformers_info, sparsify.della_magprune)
            assert again == patched
        assert (
            MergePlanner.plan_tensor,
            auto.get_transformers_info,
            sparsify.della_magprune,
        ) == patched
    assert (
        MergePlanner.plan_tensor,
        auto.get_transformers_info,
        sparsify.della_magprune,
    ) == originals
    with (
        pytest.raises(MergeShieldError, match="unknown workarounds"),
        mergekit_workarounds(disable=("no_such_fix",)),
    ):
        pass


def test_linear_with_a_base_model_fails_in_mergekit(bert, tmp_path) -> None:
    """Why ``linear`` lists the base as a weighted input instead of ``base_model``."""
    config = {
        "merge_method": "linear",
        "base_model": str(bert["base"]),
        "models": [{"model": str(b), "parameters": {"weight": 1.0}} for b in bert["backbones"]],
        "dtype": "float32",
    }
    with pytest.raises(RuntimeError, match="Missing required parameter weight"):
        run_mergekit(config, tmp_path / "m")


def test_untied_head_merged_into_tied_base_is_kept_and_config_untied(tmp_path) -> None:
    """mergekit writes the merged lm_head but copies the tied config of the base."""
    kwargs = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=99,
    )
    torch.manual_seed(0)
    base_model = LlamaForCausalLM(LlamaConfig(**kwargs, tie_word_embeddings=True))
    base_model.save_pretrained(tmp_path / "base")
    folders = []
    for index, tied in enumerate((True, False)):
        model = LlamaForCausalLM(LlamaConfig(**kwargs, tie_word_embeddings=tied))
        model.load_state_dict(base_model.state_dict(), strict=False)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            model.lm_head.weight.copy_(base_model.model.embed_tokens.weight)
            for parameter in model.parameters():
                parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
        model.save_pretrained(tmp_path / f"m{index}")
        folders.append(tmp_path / f"m{index}")
    assert "lm_head.weight" not in tensor_names(tmp_path / "base")
    out = merge("task_arithmetic", tmp_path / "base", folders, tmp_path / "out", coefficient=1.0)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    base, m0, m1 = (_float64(f) for f in (tmp_path / "base", *folders))
    embed = "model.embed_tokens.weight"
    expected_head = base[embed] + (m0[embed] - base[embed]) + (m1["lm_head.weight"] - base[embed])
    merged = _float64(out)
    torch.testing.assert_close(merged["lm_head.weight"], expected_head, rtol=0, atol=1e-6)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    torch.testing.assert_close(loaded.lm_head.weight.double(), expected_head, rtol=0, atol=1e-6)
    assert math.isclose(float(loaded.config.tie_word_embeddings), 0.0)
