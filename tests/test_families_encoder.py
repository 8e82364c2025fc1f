"""Issue 16, encoder and seq2seq half: XLM-R, DistilBERT, T5 (v1.0, v1.1, encoder alone) and CLIP
towers saved alone (with and without their ``text_model.``/``vision_model.`` prefix).

Every model is a tiny random one built in-process (:data:`tests.tiny_models.ENCODER_MODELS`).
The "original" is a fine-tune of a random "base": the base plus a small random move, as a
released fine-tune is its public base plus a small update; merges average with that base.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from mergeshield.architectures.config import read_config
from mergeshield.architectures.families import FAMILIES
from mergeshield.checkpoint import open_checkpoint
from mergeshield.defenses import DEFENSES
from mergeshield.errors import MergeShieldError
from mergeshield.folders import load_tensors
from mergeshield.protect import load_key, protect, unprotect
from tests.tiny_models import ENCODER_MODELS, build, outputs

DEFENSE_NAMES = sorted(DEFENSES)
FAMILY_NAMES = list(ENCODER_MODELS)
# Per-element size of the fine-tune's move, relative to each tensor's spread.
FINETUNE = 0.1
# The stock Auto class each family loads with (no trust_remote_code).  The CLIP
# ``...WithProjection`` classes have none: AutoModel loads their tower (the projection is
# left over), and the exactness test loads them with their own class.
AUTO_CLASSES = {
    "xlm-roberta-seqcls": tf.AutoModelForSequenceClassification,
    "distilbert-seqcls": tf.AutoModelForSequenceClassification,
    "distilbert": tf.AutoModel,
    "t5-v1.0": tf.AutoModelForSeq2SeqLM,
    "t5-v1.1": tf.AutoModelForSeq2SeqLM,
    "t5-encoder": tf.AutoModelForTextEncoding,
    "clip-text": tf.AutoModel,
    "clip-vision": tf.AutoModel,
    "clip-text-proj": tf.AutoModel,
    "clip-vision-proj": tf.AutoModel,
}


@dataclass
class Tiny:
    original: Path
    base: Path
    model: Any
    base_model: Any
    inputs: dict[str, torch.Tensor]


def finetune(base_model: Any, seed: int) -> Any:
    """A copy of ``base_model`` moved by ``FINETUNE`` of each tensor's spread (tied tensors
    stay tied: they are one parameter)."""
    model = copy.deepcopy(base_model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1:
                p.add_(FINETUNE * p.std() * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Tiny]:
    root = tmp_path_factory.mktemp("encoder-families")
    made = {}
    for name in FAMILY_NAMES:
        base_model, inputs = build(name, root / f"{name}-base", seed=1)
        model = finetune(base_model, seed=2)
        model.save_pretrained(root / name)
        made[name] = Tiny(root / name, root / f"{name}-base", model, base_model, inputs)
    return made


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def relative_error(after: torch.Tensor, before: torch.Tensor) -> float:
    return ((after - before).abs().max() / before.abs().max()).item()


def moved_names(folder: Path, defense: str) -> set[str]:
    """The weights ``defense`` must move: Q and K always, V and O but for MergeBarrier, the MLP
    for the permuting defenses (blocks without an MLP: T5's cross-attention)."""
    names = set()
    for block in open_checkpoint(folder).spec.blocks:
        roles = ["q", "k"] + (["v", "o"] if defense != "mergebarrier" else [])
        if defense in ("params", "all") and block.mlp is not None:
            roles += list(block.mlp.slots())
        names |= {block.slots()[role].weight for role in roles}
    return names


def merged_change(tiny: Tiny, model_folder: Path) -> float:
    """Output change of the 50/50 average of the base and ``model_folder`` against the
    original's outputs, relative to their spread."""
    base_t, model_t = load_tensors(tiny.base), load_tensors(model_folder)
    avg = {k: (base_t[k].double() + model_t[k].double()).div(2).to(base_t[k].dtype) for k in base_t}
    merged = copy.deepcopy(tiny.base_model)
    merged.load_state_dict(avg, strict=False)
    before = outputs(tiny.model, tiny.inputs)
    after = outputs(merged.eval(), tiny.inputs)
    return ((after - before).norm() / (before - before.mean()).norm()).item()


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("defense", DEFENSE_NAMES)
def test_protected_model_is_exact_moved_and_loads_with_auto_class(tiny, tmp_path, family, defense):
    t = tiny[family]
    before_digest = folder_digest(t.original)
    out = tmp_path / "protected"
    protect(t.original, out, defense, base=t.base, seed=7)
    assert folder_digest(t.original) == before_digest, "the input folder was modified"

    reloaded = type(t.model).from_pretrained(out).eval()
    rel = relative_error(outputs(reloaded, t.inputs), outputs(t.model, t.inputs))
    assert rel <= 1e-4, f"{family}/{defense}: max relative output error {rel:.2e}"
    auto, info = AUTO_CLASSES[family].from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info

    orig_t, prot_t = load_tensors(t.original), load_tensors(out)
    assert orig_t.keys() == prot_t.keys()
    for name in orig_t:
        assert prot_t[name].dtype == orig_t[name].dtype and prot_t[name].shape == orig_t[name].shape
    for name in moved_names(t.original, defense):
        x = orig_t[name].double()
        moved = ((prot_t[name].double() - x).norm() / x.norm()).item()
        assert moved >= 0.5, f"{family}/{defense}: {name} moved only {moved:.3f}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("defense", DEFENSE_NAMES)
def test_average_with_base_disrupts_more_than_unprotected(tiny, tmp_path, family, defense):
    """The free-rider's merge: a 50/50 average with the public base.  Of the unprotected
    fine-tune it stays near the fine-tune's function; of the protected one it does not."""
    t = tiny[family]
    protect(t.original, tmp_path / "p", defense, base=t.base, seed=3)
    plain, protected = merged_change(t, t.original), merged_change(t, tmp_path / "p")
    assert protected > max(2 * plain, 0.1), (
        f"{family}/{defense}: merge changes outputs by {protected:.3f} (unprotected {plain:.3f})"
    )


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("defense", DEFENSE_NAMES)
def test_unprotect_restores_original(tiny, tmp_path, family, defense):
    t = tiny[family]
    protect(t.original, tmp_path / "p", defense, base=t.base, key_out=tmp_path / "k.key")
    unprotect(tmp_path / "p", tmp_path / "k.key", tmp_path / "r")
    orig_t, rest_t = load_tensors(t.original), load_tensors(tmp_path / "r")
    in_blocks = {n for b in open_checkpoint(t.original).spec.blocks for n in b.tensor_names()}
    for name, x in orig_t.items():
        if name not in in_blocks:  # copied twice, never transformed: the same bytes
            assert torch.equal(rest_t[name], x), name
            continue
        err = ((rest_t[name].double() - x.double()).abs().max() / x.double().abs().max()).item()
        assert err <= 1e-5, f"{family}/{defense}: {name} restored with relative error {err:.2e}"


@pytest.mark.parametrize("family", ["t5-v1.0", "t5-v1.1", "t5-encoder"])
def test_t5_self_attention_heads_take_one_permutation_per_stack(tiny, tmp_path, family):
    """T5's relative position bias (layer 0, one column per head) is shared by every layer of
    a stack, so ``all`` permutes the self-attention heads of every layer of a stack alike and
    the bias table's columns with them; cross-attention has no bias and its heads take a
    permutation per layer.  Over the stacks and seeds the permutations are not identities."""
    t = tiny[family]
    blocks = open_checkpoint(t.original).spec.blocks
    orig_t = load_tensors(t.original)
    moved = cross_moved = 0
    for seed in range(3):
        key = tmp_path / f"k{seed}"
        protect(t.original, tmp_path / f"p{seed}", "all", seed=seed, key_out=key)
        _, transforms = load_key(key)
        prot_t = load_tensors(tmp_path / f"p{seed}")
        per_stack: dict[str, np.ndarray] = {}
        for i, block in enumerate(blocks):
            att, perm = block.attention, transforms[i].q_perm
            identity = np.arange(att.n_heads)
            if block.mlp is None:
                assert block.name.endswith("cross") and att.shared_heads is None
                assert att.position_bias is None
                cross_moved += not np.array_equal(perm, identity)
                continue
            first = per_stack.setdefault(att.shared_heads, perm)
            np.testing.assert_array_equal(perm, first, err_msg=block.name)
            np.testing.assert_array_equal(transforms[i].kv_perm, perm)
            if block.name.endswith(" 0"):  # the stack's first layer stores the bias
                assert att.position_bias.endswith("relative_attention_bias.weight")
                bias = att.position_bias
                assert torch.equal(prot_t[bias], orig_t[bias][:, torch.as_tensor(perm)]), bias
            else:
                assert att.position_bias is None
        assert len(per_stack) == (1 if family == "t5-encoder" else 2)
        moved += sum(not np.array_equal(p, np.arange(len(p))) for p in per_stack.values())
    assert moved >= 2 and (family == "t5-encoder" or cross_moved)


def test_t5_key_with_unequal_head_permutations_in_a_stack_is_refused(tiny, tmp_path, capsys):
    """A key whose blocks of one stack permute heads differently would break the shared bias:
    ``unprotect`` refuses it with one line."""
    from mergeshield.cli import main
    from mergeshield.protect import save_key

    t = tiny["t5-v1.1"]
    key = tmp_path / "k.safetensors"
    protect(t.original, tmp_path / "p", "all", seed=1, key_out=key)
    meta, transforms = load_key(key)
    t1 = transforms[1]  # the encoder's second layer
    t1.q_perm = t1.kv_perm = np.roll(t1.q_perm, 1)
    save_key(key, transforms, "all", open_checkpoint(t.original), meta["key_id"])
    capsys.readouterr()
    code = main(["unprotect", str(tmp_path / "p"), str(key), str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unlike block 0 of the same stack" in err[0], err
    assert not (tmp_path / "r").exists()


def test_t5_blocks_cover_both_stacks_and_cross_attention(tiny):
    spec = open_checkpoint(tiny["t5-v1.1"].original).spec
    assert [b.name for b in spec.blocks] == [
        "encoder 0",
        "encoder 1",
        *[f"decoder {i}{s}" for i in range(3) for s in ("", " cross")],
    ]
    cross = spec.blocks[3]
    assert cross.attention.q.weight == "decoder.block.0.layer.1.EncDecAttention.q.weight"
    assert cross.attention.head_dim == 16 and cross.attention.n_heads == 3
    gated = spec.blocks[0].mlp
    assert gated.gate.weight.endswith("wi_0.weight") and gated.up.weight.endswith("wi_1.weight")
    assert spec.blocks[2].mlp.down.weight == "decoder.block.0.layer.2.DenseReluDense.wo.weight"
    plain = open_checkpoint(tiny["t5-v1.0"].original).spec.blocks[0].mlp
    assert plain.gate is None and plain.up.weight.endswith("DenseReluDense.wi.weight")
    assert len(open_checkpoint(tiny["t5-encoder"].original).spec.blocks) == 2


@pytest.mark.parametrize(
    "family, prefix",
    [
        ("clip-text", ""),
        ("clip-vision", ""),
        ("clip-text-proj", "text_model."),
        ("clip-vision-proj", "vision_model."),
    ],
)
def test_clip_tower_alone_found_with_or_without_prefix(tiny, family, prefix):
    spec = open_checkpoint(tiny[family].original).spec
    assert len(spec.blocks) == 2
    assert spec.blocks[0].attention.q.weight == f"{prefix}encoder.layers.0.self_attn.q_proj.weight"
    projection = {"text_projection.weight", "visual_projection.weight"}
    assert all(name.startswith(prefix) for name in set(spec.residual) - projection)


def test_t5_untied_lm_head_is_copied(tiny, tmp_path):
    """A v1.1 checkpoint written by transformers 4 stores an untied ``lm_head.weight``
    (transformers 5 always ties it): it lies on the residual stream and is copied as is."""
    src = tmp_path / "untied"
    shutil.copytree(tiny["t5-v1.1"].original, src)
    tensors = load_file(src / "model.safetensors")
    tensors["lm_head.weight"] = torch.randn_like(tensors["shared.weight"])
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    assert "lm_head.weight" in open_checkpoint(src).spec.residual
    protect(src, tmp_path / "p", "all", seed=1)
    assert torch.equal(load_tensors(tmp_path / "p")["lm_head.weight"], tensors["lm_head.weight"])


def _edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))


@pytest.mark.parametrize(
    "family, changes, message",
    [
        ("t5-v1.0", {"num_layers": 3}, "lacks 6 tensor"),
        ("t5-v1.1", {"feed_forward_proj": "relu"}, "DenseReluDense.wi.weight"),
        ("t5-v1.0", {"d_kv": 4}, "config.json implies q of shape"),
        ("distilbert", {"hidden_dim": 61}, "config.json implies up of shape"),
        ("xlm-roberta-seqcls", {"num_attention_heads": "4"}, "must be a positive integer"),
        ("clip-vision", {"intermediate_size": 50}, "config.json implies up of shape"),
        ("clip-text-proj", {"num_hidden_layers": 3}, "lacks 6 tensor"),
        ("clip-text", {"model_type": "clip"}, "no text_model.layer-0 attention"),
    ],
)
def test_bad_inputs_get_one_line_errors(tiny, tmp_path, family, changes, message):
    src = tmp_path / "bad"
    shutil.copytree(tiny[family].original, src)
    _edit_config(src, **changes)
    before = folder_digest(src)
    with pytest.raises(MergeShieldError, match=message) as err:
        protect(src, tmp_path / "out", "all", seed=1)
    assert "\n" not in str(err.value)
    assert folder_digest(src) == before and not (tmp_path / "out").exists()


def test_t5_position_bias_of_another_head_count_is_refused(tiny, tmp_path):
    """The bias table's columns follow the heads: a table with a column too many is refused
    with one line naming it, before anything is written."""
    src = tmp_path / "bad"
    shutil.copytree(tiny["t5-v1.0"].original, src)
    tensors = load_file(src / "model.safetensors")
    name = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    tensors[name] = torch.randn(tensors[name].shape[0], tensors[name].shape[1] + 1)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeShieldError, match="one column per head") as err:
        protect(src, tmp_path / "out", "all", seed=1)
    assert name in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_light_config_reader_matches_transformers(tiny, family):
    """The towers read from config.json without transformers equal those from AutoConfig."""
    raw = json.loads((tiny[family].original / "config.json").read_text())
    model_type = raw.pop("model_type")
    towers = FAMILIES[model_type].towers
    assert towers(read_config(raw | {"model_type": model_type})) == towers(
        tf.AutoConfig.for_model(model_type, **raw)
    )


@pytest.mark.parametrize("family", ["t5-v1.1", "t5-encoder", "clip-text"])
def test_verify_and_exact_attacks_run(tiny, tmp_path, family):
    """``verify`` loads T5 with its Auto class and feeds its decoder; the exact attacks skip
    the MLP of cross-attention blocks and match T5's self-attention heads once per stack (a
    per-layer permutation would break the shared position bias), so their output still
    computes the protected (= original) function."""
    from mergeshield.attacks import attack
    from mergeshield.verify import verify

    t = tiny[family]
    protect(t.original, tmp_path / "p", "all", seed=5)
    report = verify(t.original, tmp_path / "p")
    assert report.ok, report
    assert not any(group.endswith("cross mlp") for group in report.moved)
    for method in ("rebasin", "procrustes"):
        attack(tmp_path / "p", t.base, tmp_path / method, method)
        assert verify(t.original, tmp_path / method).ok, method


@pytest.mark.parametrize("family", ["t5-v1.0", "t5-v1.1"])
@pytest.mark.parametrize("method", ["aga", "procrustes"])
def test_attacks_put_t5_stack_heads_back_in_order(tiny, tmp_path, family, method):
    """The attacks match T5's self-attention heads once per stack, on all of its layers: the
    position bias tables come back to the original's bit for bit (a pure column move)."""
    from mergeshield.attacks import attack

    t = tiny[family]
    protect(t.original, tmp_path / "p", "all", seed=2)
    orig_t, prot_t = load_tensors(t.original), load_tensors(tmp_path / "p")
    out = load_tensors(attack(tmp_path / "p", t.base, tmp_path / method, method))
    biases = [n for n in orig_t if n.endswith("relative_attention_bias.weight")]
    assert len(biases) == 2 and any(not torch.equal(prot_t[n], orig_t[n]) for n in biases)
    for name in biases:
        assert torch.equal(out[name], orig_t[name]), name


def test_defenses_command_says_what_t5_keeps(capsys):
    from mergeshield.cli import main

    assert main(["defenses"]) == 0
    out = capsys.readouterr().out
    for model_type in ("xlm-roberta", "distilbert", "t5", "clip_text_model"):
        assert model_type in out
    assert "\nt5: all permutes self-attention heads with one permutation per stack" in out
