"""Exact invariance of every defense on tiny random models of every family."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, BertConfig, BertForSequenceClassification

from mergeshield.architectures import SUPPORTED_MODEL_TYPES, describe
from mergeshield.architectures.config import read_config
from mergeshield.architectures.families import FAMILIES
from mergeshield.checkpoint import open_checkpoint
from mergeshield.defenses import DEFENSES, DefenseOptions
from mergeshield.errors import MergeShieldError
from mergeshield.folders import load_tensors
from mergeshield.protect import load_key, protect, unprotect
from mergeshield.symmetries.linalg import commutes_with_rope
from tests.tiny_models import MODELS, build, outputs

DEFENSE_NAMES = sorted(DEFENSES)


def transformed_names(folder: Path, defense: str) -> set[str]:
    """Tensors the defense is meant to move: attention always, MLP for permuting defenses."""
    ckpt = open_checkpoint(folder)
    names = set()
    for block in ckpt.spec.blocks:
        roles = ["q", "k"]
        if defense != "mergebarrier":
            roles += ["v", "o"]
        if defense in ("params", "all"):
            roles += ["up", "down"] + (["gate"] if block.mlp.gate else [])
        for role in roles:
            slot = block.slots()[role]
            names.add(slot.weight)
    return names


def reload(folder: Path, like: torch.nn.Module) -> torch.nn.Module:
    model = type(like).from_pretrained(folder)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One original and one base checkpoint per tiny family, built once."""
    root = tmp_path_factory.mktemp("tiny")
    made = {}
    for name in MODELS:
        model, inputs = build(name, root / name)
        _, _ = build(name, root / f"{name}-base", seed=1)
        made[name] = (root / name, root / f"{name}-base", model, inputs)
    return made


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("defense", DEFENSE_NAMES)
def test_protected_model_computes_the_same_function(checkpoints, tmp_path, family, defense):
    original, base, model, inputs = checkpoints[family]
    out = tmp_path / "protected"
    protect(original, out, defense, base=base, seed=7)
    before = outputs(model, inputs)
    after = outputs(reload(out, model), inputs)
    rel = ((after - before).abs().max() / before.abs().max()).item()
    assert rel <= 1e-4, f"{family}/{defense}: max relative output error {rel:.2e}"

    orig_t, prot_t = load_tensors(original), load_tensors(out)
    assert orig_t.keys() == prot_t.keys()
    for name in orig_t:
        assert prot_t[name].dtype == orig_t[name].dtype and prot_t[name].shape == orig_t[name].shape
    for name in transformed_names(original, defense):
        moved = (
            (prot_t[name].double() - orig_t[name].double()).norm() / orig_t[name].double().norm()
        ).item()
        assert moved >= 0.5, f"{family}/{defense}: {name} moved only {moved:.3f}"


@pytest.mark.parametrize("family", ["bert-seqcls", "gpt2", "llama-gqa2", "clip"])
@pytest.mark.parametrize("defense", DEFENSE_NAMES)
def test_naive_average_with_original_is_far_from_both(checkpoints, tmp_path, family, defense):
    """A 50/50 weight average of original and protected model computes neither function."""
    original, base, model, inputs = checkpoints[family]
    out = tmp_path / "protected"
    protect(original, out, defense, seed=3)
    orig_t, prot_t = load_tensors(original), load_tensors(out)
    avg = {k: (orig_t[k].double() + prot_t[k].double()).div(2).to(orig_t[k].dtype) for k in orig_t}
    merged = type(model)(model.config).eval()
    merged.load_state_dict(avg, strict=False)
    before = outputs(model, inputs)
    after = outputs(merged, inputs)
    # The merge moves the outputs by more than a tenth of their own spread (the protected
    # model computes the original function, so this is also the distance to it).
    change = ((after - before).norm() / (before - before.mean()).norm()).item()
    assert change > 0.1, f"{family}/{defense}: 50/50 average changed outputs by only {change:.3f}"


@pytest.mark.parametrize("family", ["bert-seqcls", "gpt2", "llama-gqa2", "qwen2", "clip", "vit"])
@pytest.mark.parametrize("defense", DEFENSE_NAMES)
def test_unprotect_restores_original(checkpoints, tmp_path, family, defense):
    original, base, _, _ = checkpoints[family]
    protect(original, tmp_path / "p", defense, base=base, key_out=tmp_path / "k.key")
    unprotect(tmp_path / "p", tmp_path / "k.key", tmp_path / "r")
    orig_t, rest_t = load_tensors(original), load_tensors(tmp_path / "r")
    for name, t in orig_t.items():
        err = (
            (rest_t[name].double() - t.double()).abs().max()
            / t.double().abs().max().clamp_min(1e-30)
        ).item()
        assert err <= 1e-5, f"{name}: restored with relative error {err:.2e}"


def test_seed_reproduces_and_os_randomness_differs(checkpoints, tmp_path):
    original = checkpoints["bert"][0]
    for name, seed in [("a", 5), ("b", 5), ("c", None), ("d", None)]:
        protect(original, tmp_path / name, "mergelock", seed=seed)
    a, b, c, d = (load_tensors(tmp_path / n) for n in "abcd")
    key = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(a[key], b[key])
    assert not torch.equal(c[key], d[key])
    assert not torch.equal(a[key], c[key])


def test_metadata_records_protection_but_never_the_key(checkpoints, tmp_path):
    original = checkpoints["bert"][0]
    protect(original, tmp_path / "p", "all", seed=123456789, key_out=tmp_path / "secret.key")
    with safe_open(str(tmp_path / "p" / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["mergeshield_defense"] == "all"
    assert "mergeshield_version" in meta
    published = b"".join(p.read_bytes() for p in (tmp_path / "p").rglob("*") if p.is_file())
    assert b"123456789" not in published
    assert not list((tmp_path / "p").rglob("*.key"))
    meta, transforms = load_key(tmp_path / "secret.key")
    assert meta["defense"] == "all" and len(transforms) == 2


@pytest.mark.parametrize("family", ["llama-mha", "llama-gqa2", "mistral-gqa4", "qwen2"])
@pytest.mark.parametrize("defense", DEFENSE_NAMES)
def test_rope_models_get_only_rope_commuting_qk_maps(checkpoints, tmp_path, family, defense):
    original = checkpoints[family][0]
    protect(original, tmp_path / "p", defense, seed=1, key_out=tmp_path / "k")
    _, transforms = load_key(tmp_path / "k")
    for t in transforms.values():
        assert t.qk is not None
        for a in t.qk:
            assert commutes_with_rope(a)


def test_gqa_head_permutation_stays_within_groups(checkpoints, tmp_path):
    original = checkpoints["mistral-gqa4"][0]  # 4 query heads on 1 key/value head
    protect(original, tmp_path / "p", "all", seed=2, key_out=tmp_path / "k")
    _, transforms = load_key(tmp_path / "k")
    spec = open_checkpoint(original).spec
    r = spec.blocks[0].attention.group_size
    for t in transforms.values():
        assert sorted(t.q_perm // r) == sorted(np.repeat(np.arange(len(t.kv_perm)), r))
        assert all(t.q_perm[h] // r == t.kv_perm[h // r] for h in range(len(t.q_perm)))


def test_max_cond_bounds_every_matrix(checkpoints, tmp_path):
    original = checkpoints["bert"][0]
    options = DefenseOptions(max_cond=10.0)
    protect(original, tmp_path / "p", "mergelock", seed=1, key_out=tmp_path / "k", options=options)
    _, transforms = load_key(tmp_path / "k")
    for t in transforms.values():
        for a in list(t.qk) + list(t.vo):
            assert np.linalg.cond(a) <= 10.0 * (1 + 1e-9)


def test_describe_lists_heads_and_units_of_clip_towers():
    cfg = AutoConfig.for_model(
        "clip",
        text_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40
        ),
        vision_config=dict(
            hidden_size=48, num_hidden_layers=3, num_attention_heads=6, intermediate_size=56
        ),
    )
    keys = [
        f"{tower}_model.encoder.layers.{i}.{part}"
        for tower, n in (("text", 2), ("vision", 3))
        for i in range(n)
        for part in (
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.out_proj.weight",
            "mlp.fc1.weight",
            "mlp.fc2.weight",
        )
    ]
    spec = describe(cfg, keys + ["logit_scale"])
    assert [b.attention.n_heads for b in spec.blocks] == [4, 4, 6, 6, 6]
    assert [b.mlp.n_units for b in spec.blocks] == [40, 40, 56, 56, 56]
    assert spec.residual == ("logit_scale",)


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_light_config_reader_gives_the_towers_transformers_gives(checkpoints, model_type):
    """``read_config`` (no transformers) fills the fields the adapters read with the same
    defaults as ``AutoConfig``: compared on an all-default config and on every tiny model."""
    family = FAMILIES[model_type]
    raws = [{"model_type": model_type}]
    raws += [
        raw
        for folder, *_ in checkpoints.values()
        if (raw := json.loads((folder / "config.json").read_text()))["model_type"] == model_type
    ]
    for raw in raws:
        fields = {k: v for k, v in raw.items() if k != "model_type"}
        expected = family.towers(AutoConfig.for_model(model_type, **fields))
        assert family.towers(read_config(raw)) == expected


def test_light_config_reader_rejects_bad_counts(tmp_path):
    with pytest.raises(MergeShieldError, match="num_attention_heads must be a positive integer"):
        read_config({"model_type": "bert", "num_attention_heads": "12"})
    with pytest.raises(MergeShieldError, match="vision_config must be an object"):
        read_config({"model_type": "clip", "vision_config": 3})
    with pytest.raises(MergeShieldError, match="num_hidden_layers must be a positive integer"):
        read_config({"model_type": "llama", "num_hidden_layers": None})  # only nullable fields
    with pytest.raises(MergeShieldError, match="hidden_act must be a string"):
        read_config({"model_type": "llama", "hidden_act": ["silu"]})
    gqa_default = read_config({"model_type": "llama", "num_key_value_heads": None})
    assert gqa_default.num_key_value_heads is None


def test_params_mismatch_moves_mlp_farther_from_a_prefixed_base(tmp_path):
    """``--base`` may be a plain ``BertModel`` while the model is a ``...ForSequenceClassification``
    (``bert.`` prefix); PaRaMS's Hungarian mismatching lands farther from it than a random
    permutation does."""
    base_model, _ = build("bert", tmp_path / "base")
    torch.manual_seed(3)
    task = BertForSequenceClassification(BertConfig(**base_model.config.to_dict(), num_labels=3))
    task.bert.load_state_dict(base_model.state_dict())
    with torch.no_grad():  # fine-tuning: a small move away from the base
        for p in task.bert.encoder.parameters():
            p.add_(0.05 * p.std() * torch.randn_like(p))
    task.save_pretrained(tmp_path / "task")
    protect(tmp_path / "task", tmp_path / "far", "params", base=tmp_path / "base", seed=1)
    protect(tmp_path / "task", tmp_path / "random", "params", seed=1)
    base_t, far_t, rand_t = (load_tensors(tmp_path / n) for n in ("base", "far", "random"))
    name = "encoder.layer.0.intermediate.dense.weight"
    dist_far = (far_t["bert." + name] - base_t[name]).norm()
    dist_random = (rand_t["bert." + name] - base_t[name]).norm()
    assert dist_far > dist_random


@pytest.mark.parametrize("family", ["bert-seqcls", "llama-gqa2", "mistral-gqa4"])
def test_barrier_flip_of_permuted_heads_is_the_permuted_flip(checkpoints, family):
    """``all`` reorders the flips by kv_perm instead of recomputing them on a permuted copy:
    both give the same matrices, and each flip is a symmetric orthogonal reflection of
    ``flip_fraction * d`` directions computed from the whole query group."""
    from mergeshield.checkpoint import open_checkpoint
    from mergeshield.defenses.base import BlockContext, DefenseOptions, random_head_permutation
    from mergeshield.defenses.published import barrier_flips
    from mergeshield.shards import reader
    from mergeshield.symmetries.transform import BlockTransform, apply_transform

    ckpt = open_checkpoint(checkpoints[family][0])
    block = ckpt.spec.blocks[0]
    att = block.attention
    with reader(ckpt) as r:
        weights = r.block(block)
    options = DefenseOptions(low_precision=False)
    rng = np.random.default_rng(3)
    kv_perm, q_perm = random_head_permutation(att, rng)
    moved = {k: v.clone() for k, v in weights.items()}
    apply_transform(moved, block, BlockTransform(kv_perm=kv_perm, q_perm=q_perm))
    flips = barrier_flips(BlockContext(block, weights, None, rng, options))
    recomputed = barrier_flips(BlockContext(block, moved, None, rng, options))
    np.testing.assert_allclose(flips[kv_perm], recomputed, atol=1e-9)
    d, r = att.head_dim, att.group_size
    for g, p in enumerate(flips):
        np.testing.assert_allclose(p, p.T, atol=1e-12)
        np.testing.assert_allclose(p @ p, np.eye(d), atol=1e-9)
        assert round(float(np.trace(p))) == d - 2 * max(1, round(0.5 * d))
        if not att.rope:  # the flipped directions are the top eigenvectors of the group energy
            wq = weights[att.q.weight].reshape(att.n_heads, d, -1)[g * r : (g + 1) * r]
            wk = weights[att.k.weight].reshape(att.n_kv_heads, d, -1)[g]
            gram = (wk @ wk.T + sum(x @ x.T for x in wq)).numpy()
            vals, vecs = np.linalg.eigh(gram)
            top = vecs[:, -max(1, round(0.5 * d)) :]
            np.testing.assert_allclose(p @ top, -top, atol=1e-8)


def test_allocator_settings_apply_on_glibc():
    """The CLI's mallopt settings are accepted (in a child process: they are process-wide)."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt settings are glibc-specific")
    code = "from mergeshield.allocator import keep_freed_memory as k; raise SystemExit(not k())"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize("family", ["bert-seqcls", "gpt2", "llama-gqa2", "qwen2", "clip"])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("unit_scale", ["signs", "powers of two", "other"])
@pytest.mark.parametrize("backend", ["numpy", "numpy-streamed", "torch"])
def test_stored_dtype_transform_is_bit_identical_to_float64_path(
    checkpoints, family, inverse, dtype, unit_scale, backend
):
    """The transform on the stored tensors (permutations and ``all``'s signs or 2^k scales in
    place, chunked float64 products rounded once, what protect does with numpy arrays) gives
    exactly the bytes of widening the whole block to float64, transforming and casting back;
    so do MLP weights left as :class:`Gathered` maps to be streamed (``numpy-streamed``)."""
    from mergeshield.arrays import Gathered, to_numpy
    from mergeshield.defenses.base import BlockContext
    from mergeshield.shards import reader
    from mergeshield.symmetries.transform import Float64View, apply_transform, is_power_of_two

    ckpt = open_checkpoint(checkpoints[family][0])
    with reader(ckpt) as r:
        stored = {k: v.to(dtype) for k, v in r.block(ckpt.spec.blocks[0]).items()}
    block = ckpt.spec.blocks[0]
    ctx = BlockContext(block, Float64View(stored), None, np.random.default_rng(5), DefenseOptions())
    t = DEFENSES["all"].sample(ctx)
    assert block.mlp.gate is None or is_power_of_two(t.unit_scale)
    if t.unit_scale is not None and unit_scale != "signs":
        rng = np.random.default_rng(6)
        factor = (
            np.exp2(rng.integers(-3, 4, t.unit_scale.shape))
            if unit_scale == "powers of two"
            else rng.uniform(0.5, 2.0, t.unit_scale.shape)
        )
        t = replace(t, unit_scale=t.unit_scale * factor)
    fast = {k: v.clone() for k, v in stored.items()}
    if backend != "torch":
        fast = {k: to_numpy(v) for k, v in fast.items()}
    apply_transform(fast, block, t, inverse=inverse, stream_mlp=backend == "numpy-streamed")
    gathered = [k for k, v in fast.items() if isinstance(v, Gathered)]
    streams = backend == "numpy-streamed" and (unit_scale == "signs" or t.unit_scale is None)
    assert bool(gathered) == (streams and t.unit_perm is not None)
    fast = {k: v.materialize() if isinstance(v, Gathered) else v for k, v in fast.items()}
    wide = {k: v.double() for k, v in stored.items()}
    apply_transform(wide, block, t, inverse=inverse)
    bits = {2: np.uint16, 4: np.uint32}[stored[block.mlp.up.weight].element_size()]
    for name, value in wide.items():
        expected = to_numpy(value.to(dtype).contiguous()).view(bits)
        assert np.array_equal(to_numpy(fast[name]).view(bits), expected), name
    changed = [n for n in stored if not np.array_equal(to_numpy(fast[n]), to_numpy(stored[n]))]
    assert changed


def test_rotary_pair_maps_are_recognised_and_applied_exactly():
    """QK maps of rotary models (``c_j R(phi_j)`` per pair, times a flip, inverted) take the
    4-products-per-weight path; its result is the dense product's up to float64 rounding,
    and the same in chunks as whole (chunking never changes a bit)."""
    import unittest.mock

    from mergeshield.symmetries import transform
    from mergeshield.symmetries.linalg import rope_commuting

    rng = np.random.default_rng(0)
    d, n = 8, 6
    a = np.stack([rope_commuting(rng.uniform(0.5, 2, d // 2), rng.uniform(0, 6, d // 2))])
    a = np.repeat(a, n, axis=0) @ np.diag([1, -1, 1, 1, 1, -1, 1, 1.0])
    for mats in (a, np.linalg.inv(a), np.swapaxes(np.linalg.inv(a), 1, 2)):
        pairs = transform.rotary_pairs(mats)
        assert pairs is not None and pairs.shape == (n, 2, 2, d // 2)
        x = rng.standard_normal((n * d, 5))
        dense = (mats @ x.reshape(n, d, 5)).reshape(x.shape)
        np.testing.assert_allclose(transform.map_row_blocks(x, mats, d), dense, atol=1e-14)
    dense_mats = a.copy()
    dense_mats[2, 0, 1] = 1e-300  # one entry outside the pairs: the general product
    assert transform.rotary_pairs(dense_mats) is None
    assert transform.rotary_pairs(rng.standard_normal((2, 7, 7))) is None
    x = rng.standard_normal((n * d, 3)).astype(np.float32)
    rows, columns = transform.map_row_blocks(x, a, d), transform.map_column_blocks(x.T, a, d)
    with unittest.mock.patch.object(transform, "CHUNK_ELEMENTS", 1):  # one head / row a chunk
        assert np.array_equal(transform.map_row_blocks(x, a, d), rows)
        assert np.array_equal(transform.map_column_blocks(x.T, a, d), columns)


def test_power_of_two_unit_scales_are_recognised():
    """Only +-2^k scales may skip the float64 working copy (their products are exact)."""
    from mergeshield.symmetries.transform import is_power_of_two

    assert is_power_of_two(np.array([1.0, -2.0, 0.125, 8.0, -0.5]))
    assert not is_power_of_two(np.array([1.0, 3.0]))
    assert not is_power_of_two(np.array([0.1]))


@pytest.mark.parametrize("command", ["protect", "unprotect"])
def test_protect_and_unprotect_never_import_torch(checkpoints, tmp_path, command):
    """The streaming core runs on numpy alone: the CLI's protect and unprotect leave torch
    (2 s of imports), transformers and scipy unloaded."""
    import subprocess
    import sys

    src = checkpoints["llama-gqa2"][0]
    key = tmp_path / "key.safetensors"
    protect(src, tmp_path / "prot", "all", seed=3, key_out=key)
    args = ["protect", str(src), str(tmp_path / "out"), "--seed", "1", "--quiet"]
    if command == "unprotect":
        args = ["unprotect", str(tmp_path / "prot"), str(key), str(tmp_path / "out"), "--quiet"]
    code = (
        "import sys; from mergeshield.cli import main; rc = main(sys.argv[1:]); "
        "loaded = [m for m in ('torch', 'transformers', 'scipy') if m in sys.modules]; "
        "assert not loaded, loaded; raise SystemExit(rc)"
    )
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "config.json").is_file()


def test_blocks_transformed_in_parallel_give_the_same_bytes(checkpoints, tmp_path, monkeypatch):
    """protect transforms two blocks at once and writes two tensors at once; with one of each
    at a time the output is byte-identical (each block draws from its own generator, and each
    tensor is written at its own offset)."""
    from mergeshield import rewrite as rewrite_module

    src = checkpoints["llama-gqa2"][0]
    assert len(open_checkpoint(src).spec.blocks) > 1
    protect(src, tmp_path / "parallel", "all", seed=11)
    monkeypatch.setattr(rewrite_module, "BLOCK_WORKERS", 1)
    monkeypatch.setattr(rewrite_module, "WRITE_THREADS", 1)
    protect(src, tmp_path / "serial", "all", seed=11)
    for file in sorted((tmp_path / "serial").iterdir()):
        assert file.read_bytes() == (tmp_path / "parallel" / file.name).read_bytes(), file.name


def _in_dtype(original: Path, folder: Path, dtype: torch.dtype) -> Path:
    """A copy of ``original`` with its floating tensors stored in ``dtype``."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(original, folder)
    tensors = {k: v.to(dtype) for k, v in load_tensors(original).items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", ["llama-gqa2", "bert-seqcls"])
def test_low_precision_protect_verify_unprotect(checkpoints, tmp_path, dtype, family):
    """A bf16/fp16 checkpoint end to end: the protected copy keeps the dtype and passes
    ``verify`` against the dtype's round trip; ``unprotect`` restores every tensor within a
    few roundings of the dtype (each of the two rewrites rounds once, times the transforms'
    conditioning, kept near 1 in low precision), relative to each tensor's largest entry."""
    from mergeshield.verify import verify

    low = _in_dtype(checkpoints[family][0], tmp_path / "low", dtype)
    protect(low, tmp_path / "p", "all", seed=6, key_out=tmp_path / "k")
    report = verify(low, tmp_path / "p")
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    assert report.ok and report.yardstick == f"{name} round trip"
    assert report.max_rel_error <= report.bound
    unprotect(tmp_path / "p", tmp_path / "k", tmp_path / "r")
    eps = torch.finfo(dtype).eps
    orig_t, rest_t = load_tensors(low), load_tensors(tmp_path / "r")
    worst = 0.0
    for name, t in orig_t.items():
        assert rest_t[name].dtype == dtype
        err = ((rest_t[name].double() - t.double()).abs().max() / t.double().abs().max()).item()
        worst = max(worst, err / eps)
    # two roundings of at most eps/2 each, times conditioning below 2 (measured: 0.4-0.7 eps)
    assert worst <= 2, f"restored within {worst:.1f} eps"


def test_unprotect_of_a_sharded_checkpoint_keeps_its_shards(checkpoints, tmp_path):
    model = checkpoints["llama-gqa2"][2]
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2
    protect(tmp_path / "sharded", tmp_path / "p", "all", seed=2, key_out=tmp_path / "k")
    unprotect(tmp_path / "p", tmp_path / "k", tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").glob("*.safetensors")) == shards
    index = json.loads((tmp_path / "r" / "model.safetensors.index.json").read_text())
    orig_t, rest_t = load_tensors(tmp_path / "sharded"), load_tensors(tmp_path / "r")
    assert set(index["weight_map"]) == set(orig_t)
    for name, t in orig_t.items():
        err = ((rest_t[name].double() - t.double()).abs().max() / t.double().abs().max()).item()
        assert err <= 1e-5, f"{name}: restored with relative error {err:.2e}"
