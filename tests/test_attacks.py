"""Attacks by an adversary holding the public base, on tiny models of several families.

Setup: ``base`` is a tiny random model; the "fine-tune" ``ft`` adds to every tensor ``W`` a
random update ``tau`` with ``||tau|| = EPS ||W||`` exactly, so over the block tensors the
public base lies at relative distance ``d_base = ||tau|| / ||F||`` (about ``EPS``) from ``ft``.
``ft`` is protected with each defense and attacked.  Thresholds come from the maths in
:mod:`mergeshield.attacks.align`:

- ``aga`` puts every attention head at ``F - tau Pi`` (``||tau Pi|| <= ||tau||``) and undoes
  the MLP symmetries exactly, so the attacked model is no farther from ``ft`` than the base:
  ``d_attacked <= d_base`` (up to float32 storage rounding, ~1e-7 relative);
- ``procrustes`` is an exact symmetry (same function as the protected model) and, against an
  orthogonal defense, lands within ``2 ||tau||`` of ``ft`` (triangle inequality); against a
  non-orthogonal ``A`` every orthogonal ``R`` leaves ``||(R A - I) X_F|| >= sigma_min(X_F)
  dist(A, O(d))``, which is computed here from the key to check the failure honestly;
- ``rebasin`` undoes pure permutations bit for bit.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergeshield.architectures.spec import BlockSpec
from mergeshield.attacks import ATTACKS, attack
from mergeshield.attacks.matching import read_heads
from mergeshield.checkpoint import open_checkpoint
from mergeshield.defenses.base import random_head_permutation
from mergeshield.errors import MergeShieldError
from mergeshield.protect import load_key, protect
from mergeshield.rewrite import rewrite
from mergeshield.shards import reader
from mergeshield.symmetries.transform import BlockTransform, apply_transform
from mergeshield.verify import tensor_groups
from tests.tiny_models import build, outputs

FAMILIES = ["bert-seqcls", "gpt2", "llama-gqa2", "qwen2", "clip"]
MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]  # every expert (and Qwen2-MoE's shared one)
NORMED = ["qwen3-gqa2", "gemma3"]  # per-head q/k norms: signs, pair swaps, norm scales
DEFENSES = ["params", "mergelock", "mergebarrier", "all"]
EPS = 0.03  # relative size of the fine-tuning update of every tensor
FLOAT_SLACK = 1e-4  # relative; float32 storage of weights moved by cond <= 100 maps


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors |= {k: f.get_tensor(k).to(torch.float64) for k in f.keys()}
    return tensors


def block_names(folder: Path) -> list[str]:
    return [n for b in open_checkpoint(folder).spec.blocks for n in b.tensor_names()]


def distance(a: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], names: list[str]) -> float:
    """``||a - ref|| / ||ref||`` over the tensors ``names``, as one vector."""
    num = sum((a[n] - ref[n]).square().sum() for n in names)
    den = sum(ref[n].square().sum() for n in names)
    return float((num / den).sqrt())


def relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


class Family:
    """Base and fine-tuned checkpoints of one tiny family, with protected copies on demand."""

    def __init__(self, name: str, root: Path) -> None:
        self.name, self.root = name, root
        self.model, self.inputs = build(name, root / "base")
        ft = type(self.model).from_pretrained(root / "base")
        g = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for p in ft.parameters():
                noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
                p.add_((EPS * p.double().norm() * noise / noise.norm()).to(p.dtype))
        ft.save_pretrained(root / "ft")
        self.base, self.ft = root / "base", root / "ft"
        self.names = block_names(self.ft)
        self.folder_counter = 0
        self.base_t, self.ft_t = load_tensors(self.base), load_tensors(self.ft)
        self.d_base = distance(self.base_t, self.ft_t, self.names)
        self._protected: dict[str, Path] = {}
        self.ft_out = self.run_tensors(self.ft_t)

    def protected(self, defense: str) -> Path:
        if defense not in self._protected:
            out = self.root / f"prot-{defense}"
            protect(
                self.ft, out, defense, base=self.base, seed=0, key_out=self.root / f"{defense}.key"
            )
            self._protected[defense] = out
        return self._protected[defense]

    def key(self, defense: str) -> dict[int, BlockTransform]:
        self.protected(defense)
        return load_key(self.root / f"{defense}.key")[1]

    def run(self, folder: Path) -> torch.Tensor:
        """Outputs of the checkpoint ``folder`` loaded by stock transformers."""
        return outputs(type(self.model).from_pretrained(folder).eval(), self.inputs)

    def run_tensors(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Outputs with ``tensors`` (every stored tensor) loaded into the family's model."""
        state = {k: v.to(torch.float32) for k, v in tensors.items()}
        if not state.keys() <= self.model.state_dict().keys():  # fused in memory (MoE experts)
            self.folder_counter += 1
            folder = self.root / f"tensors-{self.folder_counter}"
            folder.mkdir()
            save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
            shutil.copy2(self.base / "config.json", folder / "config.json")
            return self.run(folder)
        _, unexpected = self.model.load_state_dict(state, strict=False)
        assert not unexpected
        return outputs(self.model, self.inputs)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    cache: dict[str, Family] = {}

    def get(name: str) -> Family:
        if name not in cache:
            cache[name] = Family(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def test_registry_lists_the_three_attacks():
    assert set(ATTACKS) == {"aga", "rebasin", "procrustes"}


@pytest.mark.parametrize("family", FAMILIES + NORMED)
@pytest.mark.parametrize("defense", DEFENSES)
def test_aga_recovers_the_fine_tuned_weights(families, tmp_path, family, defense):
    fam = families(family)
    prot = fam.protected(defense)
    out = attack(prot, fam.base, tmp_path / "aga", "aga")
    d_prot = distance(load_tensors(prot), fam.ft_t, fam.names)
    d_att = distance(load_tensors(out), fam.ft_t, fam.names)
    assert d_prot > 5 * fam.d_base, f"setup: {defense} should move the weights ({d_prot:.3f})"
    assert d_att <= fam.d_base * (1 + FLOAT_SLACK), f"aga {d_att:.4f} vs base {fam.d_base:.4f}"
    assert d_att < 0.2 * d_prot


@pytest.mark.parametrize("family", FAMILIES + NORMED)
def test_aga_recovers_the_function_against_all(families, tmp_path, family):
    """Averaging with the base works again: ``(attacked + W0) / 2`` behaves like ``(F + W0) / 2``.

    The attacked weights lie at most ``||tau||`` from ``ft`` (as the base does), so to first
    order its output error is at most the base's output error ``e_base``.
    """
    fam = families(family)
    prot = fam.protected("all")
    out = attack(prot, fam.base, tmp_path / "aga", "aga")
    e_base = relative(fam.run_tensors(fam.base_t), fam.ft_out)
    e_att = relative(fam.run(out), fam.ft_out)
    assert e_att <= e_base, f"attacked {e_att:.4f} vs base {e_base:.4f}"

    prot_t, att_t = load_tensors(prot), load_tensors(out)

    def avg(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (t[k] + fam.base_t[k]) / 2 for k in t}

    merged_ft = fam.run_tensors(avg(fam.ft_t))
    e_merge_prot = relative(fam.run_tensors(avg(prot_t)), merged_ft)
    e_merge_att = relative(fam.run_tensors(avg(att_t)), merged_ft)
    assert e_merge_att <= e_base, f"merge of attacked {e_merge_att:.4f} vs base {e_base:.4f}"
    assert e_merge_att < 0.2 * e_merge_prot


@pytest.mark.parametrize("family", FAMILIES + NORMED)
@pytest.mark.parametrize("defense", DEFENSES)
def test_procrustes_is_an_exact_symmetry(families, tmp_path, family, defense):
    fam = families(family)
    prot = fam.protected(defense)
    out = attack(prot, fam.base, tmp_path / "procrustes", "procrustes")
    before, after = fam.ft_out, fam.run_tensors(load_tensors(out))
    err = float((after - before).abs().max() / before.abs().max())
    assert err <= 1e-4, f"{family}/{defense}: procrustes changed the function ({err:.2e})"
    if defense == "mergebarrier":  # orthogonal flips: undone within 2 ||tau||
        d_att = distance(load_tensors(out), fam.ft_t, fam.names)
        assert d_att <= 2 * fam.d_base * (1 + FLOAT_SLACK)


def _dist_to_orthogonal(m: np.ndarray) -> float:
    """``min_R ||m - R||_F`` over orthogonal ``R`` = ``||sigma(m) - 1||``."""
    return float(np.linalg.norm(np.linalg.svd(m, compute_uv=False) - 1.0))


def _sigma_min(x: torch.Tensor) -> np.ndarray:
    return torch.linalg.svdvals(x)[:, -1].numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_procrustes_cannot_undo_mergelock(families, tmp_path, family):
    """MergeLock's finding, as it happens: the distance stays above the orthogonal floor.

    For every orthogonal ``R`` and head ``h`` of group ``g``: ``||R A_g X_Q^h - X_Q^h|| >=
    sigma_min(X_Q^h) dist(A_g, O)``, likewise K with ``A_g^-T``, V with ``B_g``, O with
    ``B_g^-T``; the floor below sums these over all heads (computed from the key).
    """
    fam = families(family)
    prot = fam.protected("mergelock")
    key = fam.key("mergelock")
    out = attack(prot, fam.base, tmp_path / "procrustes", "procrustes")
    ckpt = open_checkpoint(fam.ft)
    floor2 = 0.0
    with reader(ckpt) as ft_reader:
        for i, block in enumerate(ckpt.spec.blocks):
            att, t = block.attention, key[i]
            heads, r = read_heads(ft_reader.block(block), att), att.group_size
            for g in range(att.n_kv_heads):
                a, b = t.qk[g], t.vo[g]
                group = slice(g * r, (g + 1) * r)
                floor2 += (_sigma_min(heads.q[group]) ** 2).sum() * _dist_to_orthogonal(a) ** 2
                floor2 += (
                    _sigma_min(heads.k[g : g + 1])[0] ** 2
                    * _dist_to_orthogonal(np.linalg.inv(a).T) ** 2
                )
                floor2 += _sigma_min(heads.v[g : g + 1])[0] ** 2 * _dist_to_orthogonal(b) ** 2
                floor2 += (_sigma_min(heads.o[group]) ** 2).sum() * _dist_to_orthogonal(
                    np.linalg.inv(b).T
                ) ** 2
    norm = float(sum(fam.ft_t[n].square().sum() for n in fam.names).sqrt())
    floor = float(np.sqrt(floor2)) / norm
    d_att = distance(load_tensors(out), fam.ft_t, fam.names)
    assert floor > 5 * fam.d_base, "setup: MergeLock's matrices should be far from orthogonal"
    assert d_att >= floor * (1 - FLOAT_SLACK), f"procrustes {d_att:.3f} below floor {floor:.3f}"


def _permute(src: Path, out: Path, seed: int) -> None:
    """Rewrite ``src`` with random head and MLP unit permutations only."""
    ckpt = open_checkpoint(src)
    rng = np.random.default_rng(seed)

    def transform_block(index: int, block: BlockSpec, tensors: dict[str, torch.Tensor]):
        kv, q = random_head_permutation(block.attention, rng)
        units = BlockTransform.of_units(perms=[rng.permutation(m.n_units) for m in block.mlps()])
        apply_transform(tensors, block, replace(units, kv_perm=kv, q_perm=q))
        return tensors

    rewrite(ckpt, out, transform_block, {})


@pytest.mark.parametrize("family", FAMILIES + MOE)
def test_rebasin_undoes_pure_permutations_exactly(families, tmp_path, family):
    fam = families(family)
    _permute(fam.ft, tmp_path / "permuted", seed=5)
    permuted = load_tensors(tmp_path / "permuted")
    assert distance(permuted, fam.ft_t, fam.names) > 5 * fam.d_base  # the test can fail
    out = attack(tmp_path / "permuted", fam.base, tmp_path / "rebasin", "rebasin")
    restored = load_tensors(out)
    assert restored.keys() == fam.ft_t.keys()
    for name, value in fam.ft_t.items():
        assert torch.equal(restored[name], value), name


@pytest.mark.parametrize("family", ["bert-seqcls", "llama-gqa2"])
def test_rebasin_undoes_params_mlp_permutation_but_not_the_scaling(families, tmp_path, family):
    fam = families(family)
    out = attack(fam.protected("params"), fam.base, tmp_path / "rebasin", "rebasin")
    restored = load_tensors(out)
    mlp_names = [
        n
        for b in open_checkpoint(out).spec.blocks
        for s in b.mlp.slots().values()
        for n in s.names()
    ]
    for name in mlp_names:
        assert torch.equal(restored[name], fam.ft_t[name]), name
    assert distance(restored, fam.ft_t, fam.names) > 5 * fam.d_base


def test_task_model_aligns_to_a_backbone_base(families, tmp_path):
    """A ``BertForSequenceClassification`` (``bert.`` prefix) against a ``BertModel`` base:
    the same result as against the base in the task layout."""
    from transformers import BertModel

    fam = families("bert-seqcls")
    BertModel.from_pretrained(fam.base).save_pretrained(tmp_path / "backbone")
    prot = fam.protected("all")
    via_task = load_tensors(attack(prot, fam.base, tmp_path / "a", "aga"))
    via_backbone = load_tensors(attack(prot, tmp_path / "backbone", tmp_path / "b", "aga"))
    assert via_task.keys() == via_backbone.keys()
    for name, value in via_task.items():
        assert torch.equal(value, via_backbone[name]), name


def test_output_metadata_names_the_attack(families, tmp_path):
    fam = families("bert-seqcls")
    out = attack(fam.protected("all"), fam.base, tmp_path / "a", "aga")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["mergeshield_attack"] == "aga" and "mergeshield_defense" not in meta


def test_bad_requests_are_refused(families, tmp_path):
    fam = families("bert-seqcls")
    prot = fam.protected("all")
    with pytest.raises(MergeShieldError, match="unknown attack"):
        attack(prot, fam.base, tmp_path / "a", "nope")
    other = families("gpt2")
    with pytest.raises(MergeShieldError, match="not the same architecture"):
        attack(prot, other.base, tmp_path / "b", "aga")
    (tmp_path / "c").mkdir()
    with pytest.raises(MergeShieldError, match="already exists"):
        attack(prot, fam.base, tmp_path / "c", "aga")


def mlp_groups(folder: Path) -> dict[str, list[str]]:
    """Tensor names of every MLP of every block, by ``verify``'s group name (a
    mixture-of-experts layer: ``layer 0 expert2 mlp``, ``layer 0 shared mlp``)."""
    groups = tensor_groups(open_checkpoint(folder).spec)
    return {group: names for group, names in groups.items() if group.endswith(" mlp")}


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("method", ["aga", "procrustes"])
def test_alignment_recovers_every_expert(families, tmp_path, family, method):
    """Against ``all`` (every expert's units permuted and half of them sign-flipped), each
    expert, the shared expert and a dense layer's MLP come back on their own: no farther
    from the fine-tune than the base is (the MLP step is exact, its scale fit lands within
    the base's distance; module docstring), while the protected copy is far."""
    fam = families(family)
    prot = fam.protected("all")
    out = attack(prot, fam.base, tmp_path / method, method)
    prot_t, att_t = load_tensors(prot), load_tensors(out)
    groups = mlp_groups(fam.ft)
    n_experts = sum(1 for g in groups if g.split()[-2].startswith(("expert", "shared")))
    moe_blocks = [b for b in open_checkpoint(fam.ft).spec.blocks if b.extra_mlps]
    assert n_experts == sum(len(b.mlps()) for b in moe_blocks) >= 4, groups
    for group, names in groups.items():
        d_base = distance(fam.base_t, fam.ft_t, names)
        d_prot = distance(prot_t, fam.ft_t, names)
        d_att = distance(att_t, fam.ft_t, names)
        assert d_prot > 5 * d_base, f"setup: {group} should move ({d_prot:.3f})"
        assert d_att <= d_base * (1 + FLOAT_SLACK), f"{method} {group}: {d_att:.4f} vs {d_base:.4f}"


@pytest.mark.parametrize("family", MOE)
def test_rebasin_undoes_every_experts_params_permutation(families, tmp_path, family):
    """PaRaMS permutes every expert's units (no scales): Re-Basin puts each back bit for bit.
    (Against ``all`` it cannot: permutations only, blind to the sign flips.)"""
    fam = families(family)
    out = attack(fam.protected("params"), fam.base, tmp_path / "rebasin", "rebasin")
    restored = load_tensors(out)
    for group, names in mlp_groups(fam.ft).items():
        for name in names:
            assert torch.equal(restored[name], fam.ft_t[name]), f"{group}: {name}"
