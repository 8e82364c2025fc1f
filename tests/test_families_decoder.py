"""Issue 16, decoder half: Qwen3, Gemma 2, Gemma 3, Phi-3, Mixtral, Qwen2-MoE and Qwen3-MoE.

Each tiny model is a "fine-tune" of a random base (the base plus a small random step), saved by
the pinned transformers' ``save_pretrained``.  For every defense: the protected copy loads with
the stock ``AutoModelForCausalLM`` and computes the same function (fp32 relative error <= 1e-4),
the transformed tensors moved, a 50/50 average with the base lands farther from the fine-tune
than the unprotected average does, ``unprotect`` restores it and the input is untouched.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mergeshield.architectures.config import read_config
from mergeshield.architectures.families import FAMILIES
from mergeshield.checkpoint import open_checkpoint
from mergeshield.cli import main
from mergeshield.defenses import DEFENSES
from mergeshield.errors import MergeShieldError
from mergeshield.folders import load_tensors
from mergeshield.protect import load_key, protect, unprotect
from mergeshield.symmetries.linalg import commutes_with_rope, rope_commuting
from mergeshield.symmetries.qk_norm import norm_map, pair_maps
from tests.tiny_models import DECODER_MODELS, build, outputs

DEFENSE_NAMES = sorted(DEFENSES)
FINE_TUNE_STEP = 0.1  # per tensor, times its standard deviation


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Per model: (fine-tune folder, base folder, fine-tuned model, inputs), built on demand."""
    root = tmp_path_factory.mktemp("decoders")
    made: dict[str, tuple[Path, Path, torch.nn.Module, dict]] = {}

    def get(name: str):
        if name not in made:
            base, inputs = build(name, root / f"{name}-base", seed=1)
            tuned = copy.deepcopy(base)
            g = torch.Generator().manual_seed(2)
            with torch.no_grad():
                for p in tuned.parameters():
                    p.add_(FINE_TUNE_STEP * p.std() * torch.randn(p.shape, generator=g))
            tuned.save_pretrained(root / name)
            made[name] = (root / name, root / f"{name}-base", tuned.eval(), inputs)
        return made[name]

    return get


def moved_roles(defense: str, block) -> list[str]:
    """Roles the defense moves (``mergebarrier``: Q and K only; ``mergelock``: no MLP)."""
    roles = ["q", "k"] if defense == "mergebarrier" else ["q", "k", "v", "o"]
    if defense in ("params", "all"):
        roles += [r for r in block.slots() if r.split(".")[-1] in ("up", "down", "gate")]
    return roles


def averaged(model: torch.nn.Module, a: dict, b: dict) -> torch.nn.Module:
    """``model``'s architecture with the 50/50 average of two state dicts."""
    merged = copy.deepcopy(model)
    avg = {k: (a[k].double() + b[k].double()).div(2).to(a[k].dtype) for k in a}
    merged.load_state_dict(avg, strict=False)  # tied heads are absent from the files
    return merged.eval()


def change(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Distance to the reference outputs, in units of their spread."""
    return ((y - ref).norm() / (ref - ref.mean()).norm()).item()


@pytest.mark.parametrize("defense", DEFENSE_NAMES)
@pytest.mark.parametrize("name", list(DECODER_MODELS))
def test_decoder_family_is_protected_exactly(tiny, tmp_path, name, defense):
    original, base, model, inputs = tiny(name)
    before_input = digest(original)
    out, key = tmp_path / "protected", tmp_path / "k.safetensors"
    protect(original, out, defense, base=base, seed=7, key_out=key)
    assert digest(original) == before_input, "the input was modified"

    reference = outputs(model, inputs)
    stock = AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code
    rel = ((outputs(stock, inputs) - reference).abs().max() / reference.abs().max()).item()
    assert rel <= 1e-4, f"{name}/{defense}: relative output error {rel:.2e}"

    orig_t, prot_t, base_t = (load_tensors(f) for f in (original, out, base))
    for block in open_checkpoint(original).spec.blocks:
        for role in moved_roles(defense, block):
            w = block.slots()[role].weight
            dist = ((prot_t[w] - orig_t[w]).norm() / orig_t[w].norm()).item()
            assert dist >= 0.3, f"{name}/{defense}: {role} ({w}) moved only {dist:.3f}"

    plain = change(outputs(averaged(model, base_t, orig_t), inputs), reference)
    guarded = change(outputs(averaged(model, base_t, prot_t), inputs), reference)
    print(f"\n{name}/{defense}: 50/50 with base, output change {plain:.3f} -> {guarded:.3f}")
    assert guarded > plain, (
        f"{name}/{defense}: merge change {guarded:.3f} <= unprotected {plain:.3f}"
    )

    unprotect(out, key, tmp_path / "restored")
    for k, t in load_tensors(tmp_path / "restored").items():
        err = ((t.double() - orig_t[k].double()).abs().max() / orig_t[k].abs().max()).item()
        assert err <= 1e-5, f"{name}/{defense}: {k} restored with relative error {err:.2e}"


@pytest.mark.parametrize("name", list(DECODER_MODELS))
def test_config_reader_gives_the_towers_transformers_gives(tiny, name):
    raw = json.loads((tiny(name)[0] / "config.json").read_text())
    family = FAMILIES[raw["model_type"]]
    fields = {k: v for k, v in raw.items() if k != "model_type"}
    expected = family.towers(AutoConfig.for_model(raw["model_type"], **fields))
    assert family.towers(read_config(raw)) == expected


@pytest.mark.parametrize("name", ["qwen3-gqa2", "gemma3", "qwen3_moe"])
def test_normed_heads_get_signed_pair_maps_matching_the_norm_permutation(tiny, tmp_path, name):
    """Per-head q/k norms: every QK map is a sign or a quarter turn on each rotary pair, the
    quarter turns are the same for every head, and they are the norm weights' swaps."""
    protect(tiny(name)[0], tmp_path / "p", "all", seed=4, key_out=tmp_path / "k")
    _, transforms = load_key(tmp_path / "k")
    for t in transforms.values():
        d = t.qk.shape[1]
        assert set(np.unique(t.qk)) <= {-1.0, 0.0, 1.0}
        pattern = np.abs(t.qk)
        assert (pattern == pattern[0]).all()
        np.testing.assert_array_equal(pattern[0], np.eye(d)[t.norm_perm])
        assert all(commutes_with_rope(a) for a in t.qk)
        assert t.norm_scale is not None and (t.norm_scale > 0).all()


def _normed_scores(wq, wk, uq, uk, x, angles):
    """Scores of one query/key head with per-head RMSNorms and RoPE at positions 0..n-1."""

    def head(w, u):
        y = x @ w.T
        y = y / np.sqrt((y**2).mean(-1, keepdims=True) + 1e-6) * u
        return np.stack(
            [rope_commuting(np.ones(len(angles)), p * angles) @ v for p, v in enumerate(y)]
        )

    return head(wq, uq) @ head(wk, uk).T


def test_qk_norm_group_keeps_scores_and_other_rope_maps_do_not():
    """The derivation in :mod:`mergeshield.symmetries.qk_norm`, numerically: signs, quarter
    turns with the norm weights swapped, and scales moved onto the norm weights keep every
    score; a generic rotary-commuting map (what Llama gets), or a sign on one query row only,
    does not."""
    rng = np.random.default_rng(0)
    d, h, n = 8, 12, 6
    wq, wk, x = (
        rng.standard_normal((d, h)),
        rng.standard_normal((d, h)),
        rng.standard_normal((n, h)),
    )
    uq, uk = rng.uniform(0.5, 1.5, d), rng.uniform(0.5, 1.5, d)
    angles = rng.uniform(0.1, 1.0, d // 2)
    scores = _normed_scores(wq, wk, uq, uk, x, angles)

    swap = np.array([True, False, True, False])
    a = pair_maps(rng.choice([-1.0, 1.0], (1, d // 2)), swap)[0]
    perm, scale = norm_map(swap, rng.uniform(0.2, 5.0, d // 2))
    moved = _normed_scores(a @ wq, a @ wk, scale * uq[perm], uk[perm] / scale, x, angles)
    np.testing.assert_allclose(moved, scores, rtol=1e-10, atol=1e-10)

    generic = rope_commuting(rng.uniform(0.5, 2, d // 2), rng.uniform(0, 6, d // 2))
    broken = _normed_scores(generic @ wq, np.linalg.inv(generic).T @ wk, uq, uk, x, angles)
    assert np.abs(broken - scores).max() > 1e-2
    one_row = np.diag([-1.0] + [1.0] * (d - 1))  # half a pair: not rotary-commuting
    broken = _normed_scores(one_row @ wq, one_row @ wk, uq, uk, x, angles)
    assert np.abs(broken - scores).max() > 1e-2


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_moe_routers_are_kept_and_every_expert_is_permuted(tiny, tmp_path, name):
    """Routers and the shared expert's gate are copied bit for bit; every expert, the shared
    expert and a dense layer's MLP are permuted each on its own."""
    original = tiny(name)[0]
    protect(original, tmp_path / "p", "all", seed=5, key_out=tmp_path / "k")
    orig_t, prot_t = load_tensors(original), load_tensors(tmp_path / "p")
    routers = [k for k in orig_t if k.endswith(("mlp.gate.weight", "moe.gate.weight"))]
    routers += [k for k in orig_t if "shared_expert_gate" in k]
    assert routers
    for k in routers:
        assert torch.equal(orig_t[k], prot_t[k]), k
    spec = open_checkpoint(original).spec
    _, transforms = load_key(tmp_path / "k")
    for block, t in zip(spec.blocks, transforms.values(), strict=True):
        sizes = [m.n_units for m in block.extra_mlps]
        assert len(t.extra_unit_perm if sizes else []) == sum(sizes)
        pieces = np.split(t.extra_unit_perm, np.cumsum(sizes)[:-1]) if sizes else []
        for perm, n in zip(pieces, sizes, strict=True):
            assert sorted(perm) == list(range(n)) and (perm != np.arange(n)).any()
    if name == "qwen2_moe":  # layer 1 is dense (mlp_only_layers): one MLP, permuted
        assert not spec.blocks[1].extra_mlps and spec.blocks[1].mlp.n_units == 80
        assert [m.label for m in spec.blocks[0].extra_mlps] == ["expert1", "expert2", "shared"]


def test_phi3_fused_rows_are_split_by_head_counts(tiny):
    """Phi-3's ``qkv_proj`` holds q | k | v with ``n_heads``, ``n_kv``, ``n_kv`` heads of rows."""
    block = open_checkpoint(tiny("phi3-gqa2")[0]).spec.blocks[0]
    assert (block.attention.q.rows, block.attention.k.rows, block.attention.v.rows) == (
        (0, 64),
        (64, 96),
        (96, 128),
    )
    assert (block.mlp.gate.chunk, block.mlp.up.chunk) == ((0, 2), (1, 2))


@pytest.mark.parametrize("defense", DEFENSE_NAMES)
def test_partial_rotary_qk_maps_keep_rotated_and_free_dimensions_apart(tiny, tmp_path, defense):
    """Phi-4-mini's layout (here 10 of 16 dimensions rotated, pairs ``(j, j + 5)``): every QK
    map acts on the rotated pairs alone and never mixes them with the 6 free dimensions."""
    from mergeshield.symmetries.linalg import rope_commuting

    original = tiny("phi3-partial")[0]
    assert open_checkpoint(original).spec.blocks[0].attention.rotary == 10
    protect(original, tmp_path / "p", defense, seed=3, key_out=tmp_path / "k")
    _, transforms = load_key(tmp_path / "k")
    rotation = rope_commuting(np.ones(5), np.linspace(0.3, 2.9, 5))  # generic angles
    full = np.eye(16)
    full[:10, :10] = rotation
    for t in transforms.values():
        for a in t.qk:
            assert not a[:10, 10:].any() and not a[10:, :10].any()
            np.testing.assert_allclose(a @ full, full @ a, atol=1e-9 * np.abs(a).max())


def run_fails(args: list[str], capsys, expect: str) -> None:
    capsys.readouterr()  # the fixture's save_pretrained progress bars
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("mergeshield: error:"), err
    assert expect in err[0], err[0]


def test_bad_decoder_inputs_get_one_line_errors(tiny, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny("qwen3-gqa2")[0]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(7)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    before = digest(bad)
    run_fails(["protect", str(bad), str(tmp_path / "o1"), "--quiet"], capsys, "q_norm.weight")
    assert digest(bad) == before and not (tmp_path / "o1").exists()

    del tensors["model.layers.0.self_attn.q_norm.weight"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    run_fails(["protect", str(bad), str(tmp_path / "o2"), "--quiet"], capsys, "lacks 1 tensor")

    phi = tmp_path / "phi"
    shutil.copytree(tiny("phi3-mha")[0], phi)
    cfg = json.loads((phi / "config.json").read_text())
    cfg["rope_parameters"]["partial_rotary_factor"] = 0.625  # 5 of 8 dimensions: odd
    (phi / "config.json").write_text(json.dumps(cfg))
    run_fails(["protect", str(phi), str(tmp_path / "o3"), "--quiet"], capsys, "rotates 5 of 8")

    with pytest.raises(MergeShieldError, match="num_experts must be a positive integer"):
        read_config({"model_type": "qwen2_moe", "num_experts": "4"})


@pytest.mark.parametrize("name", ["qwen3-gqa2", "gemma3", "gemma3-d256", "phi3-gqa2", "qwen2_moe"])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("backend", ["numpy-streamed", "torch"])
def test_stored_bf16_transform_is_bit_identical_to_float64_path(tiny, name, inverse, backend):
    """The norm-weight step, fused row views and every expert's units, on bf16 tensors as
    protect runs them, give exactly the bytes of the float64 transform cast back once."""
    from mergeshield.arrays import Gathered, to_numpy
    from mergeshield.defenses.base import BlockContext, DefenseOptions
    from mergeshield.shards import reader
    from mergeshield.symmetries.transform import Float64View, apply_transform

    ckpt = open_checkpoint(tiny(name)[0])
    block = ckpt.spec.blocks[0]
    with reader(ckpt) as r:
        stored = {k: v.to(torch.bfloat16) for k, v in r.block(block).items()}
    ctx = BlockContext(block, Float64View(stored), None, np.random.default_rng(5), DefenseOptions())
    t = DEFENSES["all"].sample(ctx)
    fast = {k: v.clone() for k, v in stored.items()}
    if backend != "torch":
        fast = {k: to_numpy(v) for k, v in fast.items()}
    apply_transform(fast, block, t, inverse=inverse, stream_mlp=backend == "numpy-streamed")
    fast = {k: v.materialize() if isinstance(v, Gathered) else v for k, v in fast.items()}
    wide = {k: v.double() for k, v in stored.items()}
    apply_transform(wide, block, t, inverse=inverse)
    for k, value in wide.items():
        expected = to_numpy(value.to(torch.bfloat16).contiguous()).view(np.uint16)
        assert np.array_equal(to_numpy(fast[k]).view(np.uint16), expected), k
    bits = {k: to_numpy(stored[k]).view(np.uint16) for k in block.attention.norms()}
    for k, old in bits.items():  # the norm weights moved (scaled, some pairs swapped)
        assert not np.array_equal(to_numpy(fast[k]).view(np.uint16), old), k


@pytest.mark.parametrize("name", ["qwen3-gqa2", "gemma3"])
def test_norm_pinned_qk_maps_alone_still_disrupt_a_merge(tiny, tmp_path, name):
    """The documented exception: with per-head norms only signs, pair swaps and norm scales act
    on Q/K; merged through those tensors alone (all else original) the outputs still move
    more than twice as far as in the unprotected merge (README: 0.65-0.82 against 0.22-0.28 for
    Qwen3, 0.37-0.44 against 0.12 for Gemma 3, ``benchmarks/qk_norm_merge.py``)."""
    original, base, model, inputs = tiny(name)
    protect(original, tmp_path / "p", "mergelock", seed=0)
    orig_t, prot_t, base_t = (load_tensors(f) for f in (original, tmp_path / "p", base))
    qk_only = {
        k: prot_t[k] if any(s in k for s in ("q_proj", "k_proj", "q_norm", "k_norm")) else v
        for k, v in orig_t.items()
    }
    reference = outputs(model, inputs)
    plain = change(outputs(averaged(model, base_t, orig_t), inputs), reference)
    guarded = change(outputs(averaged(model, base_t, qk_only), inputs), reference)
    assert guarded > 2 * plain, f"{name}: QK-only merge change {guarded:.3f}, plain {plain:.3f}"


def test_verify_lists_every_expert(tiny, tmp_path):
    """``verify``'s table has a row per expert and for the shared expert (and the dense
    layer's MLP), each moved by ``all``; the summary line counts the experts; the attention
    rows include the per-head q/k norms."""
    from mergeshield.verify import moved_summary, tensor_groups, verify

    original = tiny("qwen2_moe")[0]
    protect(original, tmp_path / "p", "all", seed=6)
    report = verify(original, tmp_path / "p")
    assert report.ok, report
    experts = [f"layer 0 {e} mlp" for e in ("expert0", "expert1", "expert2", "shared")]
    mlps = [*experts, "layer 1 mlp"]
    assert set(report.moved) == {"layer 0 attention", "layer 1 attention", *mlps} | {
        "embeddings, norms, heads"
    }
    for group in mlps:
        assert report.moved[group] > 0.3, (group, report.moved[group])
    summary = moved_summary(report.moved)
    assert "experts " in summary and "(4 experts)" in summary and "mlp " in summary, summary

    groups = tensor_groups(open_checkpoint(tiny("qwen3_moe")[0]).spec)
    assert "model.layers.1.self_attn.k_norm.weight" in groups["layer 1 attention"]
    assert len([g for g in groups if g.startswith("layer 1 expert")]) == 3


@pytest.mark.parametrize("defense", ["all", "mergelock", "params"])
def test_wide_heads_get_block_diagonal_vo_maps_that_mix_the_head(tiny, tmp_path, defense):
    """head_dim 256 (> VO_BLOCK = 128): every V/O map is ``blockdiag(B_1, B_2) P`` (two dense
    128 x 128 blocks, ``P`` a permutation of the head's 256 dimensions that sends dimensions of
    both halves into each block), applied at the cost of a 128-dimensional head."""
    from mergeshield.symmetries.linalg import VO_BLOCK
    from mergeshield.symmetries.transform import split_blocks

    protect(tiny("gemma3-d256")[0], tmp_path / "p", defense, seed=8, key_out=tmp_path / "k")
    _, transforms = load_key(tmp_path / "k")
    for t in transforms.values():
        perm, blocks = split_blocks(t.vo, VO_BLOCK)
        assert blocks.shape == (2 * len(t.vo), VO_BLOCK, VO_BLOCK)
        assert np.count_nonzero(blocks) == blocks.size  # dense blocks
        for p in perm:  # each block reads dimensions from both halves of the head
            halves = p.reshape(2, VO_BLOCK) // VO_BLOCK
            assert all(set(h) == {0, 1} for h in halves)
        assert np.count_nonzero(t.vo) == len(t.vo) * 2 * VO_BLOCK**2  # half the entries zero
