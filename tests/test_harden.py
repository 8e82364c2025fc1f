"""Training-time hardening, adaptive attacks and the frontier's in-memory merges, on tiny BERTs.

Toy task: sentences of 6 words from a 12-word vocabulary; label 1 when ``good`` occurs more
often than ``bad``.  A tiny random ``BertModel`` is the "base"; the "release" is that base
fine-tuned on the toy task (all in-process, a few seconds on CPU).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
)

from mergeshield.architectures import AttentionSpec, Slot
from mergeshield.attacks.adaptive import insert, insertion_config, perturb_update
from mergeshield.errors import MergeShieldError
from mergeshield.folders import load_tensors as load_folder_tensors
from mergeshield.hardening.components import (
    aga_recovery,
    rank_margin,
    sample_scale,
    uniform_divergence,
)
from mergeshield.hardening.config import HardenConfig, parse_method
from mergeshield.hardening.data import read_examples
from mergeshield.hardening.harden import harden
from mergeshield.merging import extract_backbone
from mergeshield.modeling import backbone_map

WORDS = ["good", "bad", "cat", "dog", "sun", "rain", "tree", "car", "blue", "red", "one", "two"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def toy_examples(n: int, seed: int) -> list[tuple[str, int]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (6,), generator=gen)]
        label = int(words.count("good") > words.count("bad"))
        out.append((" ".join(words), label))
    return out


def save_tokenizer(folder: Path) -> None:
    (folder / "vocab.txt").write_text("\n".join(SPECIALS + WORDS) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True})
    )


def tiny_config(num_labels: int = 2) -> BertConfig:
    return BertConfig(
        vocab_size=len(SPECIALS) + len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
        initializer_range=0.2,
    )


def encode(folder: Path, examples: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok([t for t, _ in examples], padding="longest", return_tensors="pt")
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": torch.tensor([y for _, y in examples]),
    }


def acc_at_scale(model_dir: Path, base_dir: Path, data: dict, s: float) -> float:
    """Accuracy of ``theta_0 + s (theta - theta_0)`` (backbone only, the head kept)."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    base = load_folder_tensors(base_dir)
    names = backbone_map(model, base)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in names:
                b = base[names[n]]
                p.copy_(b + s * (p - b))
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    return float((logits.argmax(-1) == data["labels"]).float().mean())


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny base (BertModel folder) and its fine-tune on the toy task."""
    root = tmp_path_factory.mktemp("toy")
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config())
    base_dir, ft_dir = root / "base", root / "ft"
    model.bert.save_pretrained(base_dir)
    save_tokenizer(base_dir)
    ft_dir.mkdir()
    save_tokenizer(ft_dir)
    data = encode(ft_dir, toy_examples(512, seed=1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(250):
        idx = torch.randint(0, 512, (64,), generator=gen)
        loss = model(**{k: v[idx] for k, v in data.items()}).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(ft_dir)
    train_file = root / "train.jsonl"
    train_file.write_text(
        "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in toy_examples(512, 2))
    )
    return {"root": root, "base": base_dir, "ft": ft_dir, "train": train_file}


# ----------------------------------------------------------------------------- unit pieces


def test_uniform_divergence_is_zero_at_uniform_and_positive_elsewhere() -> None:
    assert float(uniform_divergence(torch.zeros(3, 5))) == pytest.approx(0.0, abs=1e-6)
    assert float(uniform_divergence(torch.tensor([[4.0, 0.0, -1.0]]))) > 0.1


def test_rank_margin_is_scale_free_where_the_uniform_divergence_is_not() -> None:
    """A merge that keeps every prediction right and only lowers its confidence (logits times
    0.01) has ``D`` near 0, the hardening's "merged model predicts nothing", yet the same
    accuracy; the rank margin does not move, and it is low only where the true class trails.
    With two classes too (a row's own spread would leave only the sign of the lead there)."""
    torch.manual_seed(0)
    softplus_1 = math.log1p(math.e)
    for classes in (6, 2):
        logits = torch.randn(64, classes)
        right, wrong = logits.argmax(-1), logits.argmin(-1)
        assert float(uniform_divergence(0.01 * logits)) < 1e-3 < float(uniform_divergence(logits))
        for t in (0.01, 30.0):
            torch.testing.assert_close(
                rank_margin(t * logits, right, 1.0), rank_margin(logits, right, 1.0)
            )
        assert float(rank_margin(logits, right, 1.0)) > softplus_1  # every true class leads
        assert float(rank_margin(logits, wrong, 1.0)) < math.log(2)  # every true class trails
        keep_right = float(rank_margin(logits, right, 1.0, trail=False))
        assert keep_right < softplus_1 < float(rank_margin(logits, wrong, 1.0, trail=False))
        # the row that leads by less is pushed down (the spread is the batch's: with two
        # classes a row's own would leave only the sign of its lead, and no gradient)
        z = torch.tensor([[1.0, 0.0] + [-1.0] * (classes - 2), [3.0, 0.0] + [-1.0] * (classes - 2)])
        z.requires_grad_(True)
        rank_margin(z, torch.tensor([0, 0]), 1.0).backward()
        assert z.grad[0, 0] > 0.05


def test_sample_scale_avoids_the_band_around_one() -> None:
    cfg = HardenConfig()
    gen = torch.Generator().manual_seed(0)
    draws = [sample_scale(gen, cfg) for _ in range(2000)]
    assert min(draws) >= cfg.s_min and max(draws) <= cfg.s_max
    assert not any(1 - cfg.delta < s < 1 + cfg.delta for s in draws)
    assert any(s < 0.5 for s in draws) and any(s > 1.5 for s in draws)


def test_parse_method_and_data_formats(tmp_path: Path) -> None:
    assert parse_method("trap2+merge") == ["trap2", "merge"]
    with pytest.raises(MergeShieldError, match="unknown harden method 'trap3'"):
        parse_method("trap3")
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("text,label\nhello world,good\nbye,1\n")
    examples = read_examples(csv_file)
    assert (examples.kind, examples.inputs, examples.labels) == (
        "text",
        ["hello world", "bye"],
        ["good", "1"],
    )
    with pytest.raises(MergeShieldError, match="d.txt not found"):
        read_examples(tmp_path / "d.txt")
    (tmp_path / "d.txt").write_text("hello world\n")
    with pytest.raises(MergeShieldError, match="must be .jsonl, .csv"):
        read_examples(tmp_path / "d.txt")


def test_aga_recovery_removes_exactly_the_row_space_part_of_tau() -> None:
    """``rec = X - tau Pi`` per head, for Q (with its bias as a last column) and for O
    (``W_O[:, h]^T``): the head's row-space component of the update is gone."""
    torch.manual_seed(0)
    n_heads, d = 2, 8
    att = AttentionSpec(
        q=Slot("q.weight", "q.bias"),
        k=Slot("k.weight"),
        v=Slot("v.weight"),
        o=Slot("o.weight"),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=d // n_heads,
    )
    base = {k: torch.randn(d, d, dtype=torch.float64) for k in ("q", "k", "v", "o")}
    base = {f"{k}.weight": v for k, v in base.items()} | {"q.bias": torch.randn(d).double()}
    tau = {k: 0.05 * torch.randn_like(v) for k, v in base.items()}
    params = {f"bert.{k}": base[k] + tau[k] for k in base}
    names = {f"bert.{k}": k for k in base}
    rec = aga_recovery(params, base, names, [att])
    q = torch.cat([params["bert.q.weight"], params["bert.q.bias"][:, None]], 1)
    tau_q = torch.cat([tau["q.weight"], tau["q.bias"][:, None]], 1)
    rec_q = torch.cat([rec["bert.q.weight"], rec["bert.q.bias"][:, None]], 1)
    o, tau_o, rec_o = params["bert.o.weight"].T, tau["o.weight"].T, rec["bert.o.weight"].T
    for x_all, t_all, r_all in ((q, tau_q, rec_q), (o, tau_o, rec_o)):
        for h in range(n_heads):
            rows = slice(h * 4, (h + 1) * 4)
            x = x_all[rows]
            pi = x.T @ torch.linalg.solve(x @ x.T, x)
            torch.testing.assert_close(r_all[rows], x - t_all[rows] @ pi)


def test_insertion_config_weights() -> None:
    cfg = insertion_config(Path("/b"), Path("/v"), [Path("/o1"), Path("/o2")], 0.4, "ties")
    assert cfg["merge_method"] == "ties"
    assert [m["parameters"]["weight"] for m in cfg["models"]] == [1.0, 0.4, 0.4]
    assert cfg["parameters"]["lambda"] == 1.0 and cfg["parameters"]["density"] == 0.2
    with pytest.raises(MergeShieldError, match="at least one other model"):
        insertion_config(Path("/b"), Path("/v"), [], 0.4)


def test_perturb_update_prunes_smallest_entries() -> None:
    base = {"w": torch.zeros(10)}
    released = {"w": torch.arange(10, dtype=torch.float32)}
    out = perturb_update(released, base, prune=0.5)
    assert int((out["w"] != 0).sum()) == 5 and float(out["w"][-1]) == 9.0


# ----------------------------------------------------------------------------- with mergekit


def _backbones(toy: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    """The toy fine-tune's backbone and a second "free-rider" backbone (base + noise)."""
    victim = extract_backbone(toy["ft"], toy["base"], tmp_path / "v")
    other = tmp_path / "o"
    model = AutoModelForSequenceClassification.from_pretrained(toy["ft"])
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.bert.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "o_full")
    extract_backbone(tmp_path / "o_full", toy["base"], other)
    return victim, other


def test_coefficient_one_insertion_by_mergekit_matches_the_formula(
    toy: dict[str, Path], tmp_path: Path
) -> None:
    victim, other = _backbones(toy, tmp_path)
    out = insert(toy["base"], victim, [other], tmp_path / "m", coefficient=0.3)
    b, v, o, m = (load_folder_tensors(p) for p in (toy["base"], victim, other, out))
    for name in b:
        if b[name].is_floating_point():
            expect = b[name] + (v[name] - b[name]) + 0.3 * (o[name] - b[name])
            torch.testing.assert_close(m[name], expect, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- harden


def test_harden_loss_decreases_and_output_loads(toy: dict[str, Path], tmp_path: Path) -> None:
    out = harden(
        toy["ft"],
        toy["base"],
        toy["train"],
        tmp_path / "h",
        method="trap2+merge+arf+amerge",
        steps=30,
        lr=1e-3,
        batch_size=32,
        train_embeddings=True,
        target="uniform",
    )
    record = json.loads((out / "mergeshield_harden.json").read_text())
    losses = [h["loss"] for h in record["history"]]
    assert {"trap2", "merge", "arf", "amerge"} <= set(record["history"][0])
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 2
    ft = AutoModelForSequenceClassification.from_pretrained(toy["ft"])
    torch.testing.assert_close(model.classifier.weight, ft.classifier.weight)  # head frozen


def test_merge_term_adds_partners_outside_attention_for_frame_mismatched_merges(
    toy: dict[str, Path],
) -> None:
    """The merge-aware term's frame-mismatched merges (a re-based or rotated protected release
    plus a partner's task vector, which acts only where the frames agree) keep the partner on
    every tensor outside the heads' Q, K, V and O: the MLP, norms and embeddings."""
    from mergeshield.hardening.components import REGISTRY, Run
    from mergeshield.modeling import base_in_module_names

    model = AutoModelForSequenceClassification.from_pretrained(toy["ft"])
    base = base_in_module_names(model, toy["base"])
    names = backbone_map(model, base)
    theta0 = {n: base[short] for n, short in names.items()}
    run = Run(model, HardenConfig(), torch.Generator(), names, theta0, base, toy["base"], {},
              lambda params, batch: torch.zeros(1))  # fmt: skip
    REGISTRY.lookup("merge").prepare(run)
    inside = run.cache["attention"]
    outside = set(names) - inside
    assert inside == {
        f"bert.encoder.layer.{i}.attention.{m}.{p}"
        for i in range(2)
        for m in ("self.query", "self.key", "self.value", "output.dense")
        for p in ("weight", "bias")
    }
    assert "bert.encoder.layer.0.intermediate.dense.weight" in outside
    assert "bert.encoder.layer.1.attention.output.LayerNorm.weight" in outside


@pytest.mark.parametrize("target", ["uniform", "margin"])
def test_trap2_makes_the_toy_model_scale_sensitive(
    toy: dict[str, Path], tmp_path: Path, target: str
) -> None:
    """After TRAP2 hardening the release keeps its accuracy at s = 1 and loses it at
    s = 0.5 and s = 2, where the plain fine-tune still works; with either target."""
    data = encode(toy["ft"], toy_examples(400, seed=9))
    before = {s: acc_at_scale(toy["ft"], toy["base"], data, s) for s in (0.5, 1.0, 2.0)}
    out = harden(
        toy["ft"],
        toy["base"],
        toy["train"],
        tmp_path / "h",
        method="trap2",
        steps=300,
        lr=2e-3,
        batch_size=64,
        train_embeddings=True,
        target=target,
    )
    after = {s: acc_at_scale(out, toy["base"], data, s) for s in (0.5, 1.0, 2.0)}
    assert before[1.0] >= 0.85
    assert after[1.0] >= before[1.0] - 0.05
    assert after[0.5] < before[0.5] - 0.15 or after[0.5] < 0.65
    assert after[2.0] < before[2.0] - 0.15 or after[2.0] < 0.65


# ----------------------------------------------------------------------------- real (slow)


@pytest.mark.research
@pytest.mark.slow
def test_real_small_family_trap2_keeps_standalone(tmp_path: Path) -> None:
    """A short TRAP2+merge hardening of the MiniLM ``wordnet_noun`` model keeps its
    standalone accuracy within 2 points and drops the plain lambda = 0.5 merge."""
    from mergeshield.evaluation.accuracy import evaluate
    from mergeshield.evaluation.zoo import build_family
    from mergeshield.tasks import load_task

    fam = build_family("text", "small", progress=False)
    s = fam.manifest["settings"]
    data = load_task("wordnet_noun", s["n_train"], s["n_val"], s["n_test"], s["seed"])
    out = harden(
        fam.tasks["wordnet_noun"],
        fam.base,
        data,
        tmp_path / "h",
        method="trap2+merge",
        steps=40,
        lr=5e-5,
        proxies=(str(fam.tasks["wordnet_verb"]),),
        target="uniform",
    )
    acc = evaluate(out, "wordnet_noun", family=fam)
    assert acc >= fam.finetuned_accuracy["wordnet_noun"] - 0.02


# ----------------------------------------------------------------------------- CLI


def _tree_hashes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_cli_harden_then_protect_round_trips_with_the_key(
    toy: dict[str, Path], tmp_path: Path
) -> None:
    """``harden --then-protect`` = ``harden`` followed by the symmetry defense: unprotecting
    with the key gives the plain hardened model (same seed); the input is untouched and the
    published record holds neither the seed nor local paths."""
    from mergeshield.cli import main
    from mergeshield.protect import unprotect

    before = _tree_hashes(toy["ft"])
    common = [str(toy["ft"]), "--base", str(toy["base"]), "--data", str(toy["train"])]
    common += ["--steps", "5", "--lr", "1e-3", "--seed", "7", "-q"]
    plain, protected, key = tmp_path / "plain", tmp_path / "protected", tmp_path / "k.key"
    assert main(["harden", *common[:1], str(plain), *common[1:], "--then-protect", "none"]) == 0
    argv = ["harden", common[0], str(protected), *common[1:], "--then-protect", "mergelock"]
    assert main([*argv, "--key-out", str(key)]) == 0
    assert _tree_hashes(toy["ft"]) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.key", "plain", "protected"]
    record = (plain / "mergeshield_harden.json").read_text()
    assert json.loads(record)["config"]["seed"] is None and str(tmp_path) not in record
    restored = tmp_path / "restored"
    unprotect(protected, key, restored)
    a = load_folder_tensors(plain)
    b = load_folder_tensors(restored)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4)
    moved = load_folder_tensors(protected)
    assert any((moved[n] - a[n]).norm() > 0.1 * a[n].norm() for n in a if a[n].ndim == 2)


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"--data": "missing.jsonl"}, "not found"),
        ({"--method": "trap3"}, "unknown harden method"),
        ({"--key-out": "k.key", "--then-protect": "none"}, "needs a defense"),
        ({"--steps": "0"}, "steps must be at least 1"),
        ({"out": "exists"}, "already exists"),
        ({"--data": "images"}, "holds image"),
    ],
)
def test_cli_harden_bad_input_exits_2_and_writes_nothing(
    toy: dict[str, Path], tmp_path: Path, capsys, change: dict[str, str], expect: str
) -> None:
    from PIL import Image

    from mergeshield.cli import main

    (tmp_path / "exists").mkdir()
    (tmp_path / "images" / "good").mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "images" / "good" / "a.png")
    args = {"--base": str(toy["base"]), "--data": str(toy["train"]), "--steps": "2"}
    out = tmp_path / change.pop("out", "out")
    args |= {k: str(tmp_path / v) if k in ("--data", "--key-out") else v for k, v in change.items()}
    before = sorted(tmp_path.rglob("*"))
    argv = ["harden", str(toy["ft"]), str(out), "-q"]
    assert main(argv + [x for kv in args.items() for x in kv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mergeshield: error:") and expect in err and "\n" not in err
    assert sorted(tmp_path.rglob("*")) == before


def tiny_vit_config(**kw: Any) -> Any:
    """A one-layer 8x8 grayscale ViT classifier with two labels."""
    from transformers import ViTConfig

    return ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
        **kw,
    )


def test_harden_image_classifier_from_an_image_folder(tmp_path: Path) -> None:
    """ViT classifier + ``root/<label>/*.png``: the spec-driven ARF term and the image
    preprocessing work, and the result loads with AutoModelForImageClassification."""
    from PIL import Image
    from transformers import AutoModelForImageClassification, ViTForImageClassification

    config = tiny_vit_config(id2label={0: "dark", 1: "light"}, label2id={"dark": 0, "light": 1})
    torch.manual_seed(0)
    model = ViTForImageClassification(config)
    model.vit.save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "ft")
    gen = torch.Generator().manual_seed(0)
    for label, level in (("dark", 40), ("light", 200)):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(6):
            noise = torch.randint(0, 30, (10, 10), generator=gen, dtype=torch.uint8)
            Image.fromarray((noise + level).numpy()).save(tmp_path / "data" / label / f"{i}.png")
    out = harden(
        tmp_path / "ft",
        tmp_path / "base",
        tmp_path / "data",
        tmp_path / "h",
        method="trap2+arf",
        steps=4,
        batch_size=4,
        lr=1e-3,
    )
    hardened = AutoModelForImageClassification.from_pretrained(out)
    assert hardened.config.num_labels == 2
    before = dict(model.named_parameters())
    moved = [
        n
        for n, p in hardened.named_parameters()
        if not torch.equal(p, before[n]) and ".embeddings." not in f".{n}"
    ]
    assert len(moved) > len(list(hardened.named_parameters())) // 2  # the encoder trained
    record = json.loads((out / "mergeshield_harden.json").read_text())
    assert record["n_examples"] == 12 and all(math.isfinite(h["arf"]) for h in record["history"])


def test_datasets_folder_is_read(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    DatasetDict(
        {"train": Dataset.from_dict({"sentence": ["a b", "c"], "label": [1, 0]})}
    ).save_to_disk(str(tmp_path / "ds"))
    examples = read_examples(tmp_path / "ds")
    assert (examples.kind, examples.inputs, examples.labels) == ("text", ["a b", "c"], [1, 0])


def test_frontier_candidates_parse() -> None:
    from mergeshield.evaluation.frontier import parse_candidate

    assert parse_candidate("unprotected").harden is None
    c = parse_candidate("mergelock")
    assert (c.harden, c.defense) == (None, "mergelock")
    c = parse_candidate("trap2+merge/params")
    assert (c.harden, c.defense) == ("trap2+merge", "params")
    for bad, message in (
        ("trap3", "unknown harden method 'trap3'"),
        ("trap2/nodefense", "unknown defense 'nodefense'"),
    ):
        with pytest.raises(MergeShieldError, match=message):
            parse_candidate(bad)


def test_frontier_attacks_parse() -> None:
    from mergeshield.evaluation.frontier import parse_attack

    assert parse_attack("none") == ("none", {})
    assert parse_attack("aga") == ("aga", {})
    assert parse_attack("aga+prune") == ("aga", {"prune": 0.2})
    assert parse_attack("procrustes+prune=0.5+noise=0.05") == (
        "procrustes",
        {"prune": 0.5, "noise": 0.05},
    )
    for bad, message in (
        ("agaa", "unknown attack 'agaa'"),
        ("none+prune", "after an alignment attack, add"),
        ("aga+shrink", "after an alignment attack, add"),
        ("aga+prune=x", "'x' is not a number"),
        ("aga+noise=1.5", r"noise must lie in \[0, 1\)"),
    ):
        with pytest.raises(MergeShieldError, match=message):
            parse_attack(bad)


def test_prune_component_resets_the_smallest_update_entries_and_trains_nothing(
    toy: dict[str, Path], tmp_path: Path
) -> None:
    """``prune`` alone: every backbone entry is either the fine-tune's (untouched: no training
    step ran) or the base's, and at least the requested share of each tensor is the base's."""
    out = harden(
        toy["ft"], toy["base"], toy["train"], tmp_path / "p", method="prune", prune_fraction=0.3
    )
    assert json.loads((out / "mergeshield_harden.json").read_text())["history"] == []
    pruned, ft = load_folder_tensors(out), load_folder_tensors(toy["ft"])
    base = {"bert." + k: v for k, v in load_folder_tensors(toy["base"]).items()}
    checked = 0
    for name, b in base.items():
        if b.numel() < 2 or not b.is_floating_point():
            continue
        p, f = pruned[name], ft[name]
        assert bool(((p == f) | (p == b)).all()), name
        assert float((p == b).float().mean()) >= 0.3 - 1 / b.numel(), name
        checked += 1
    assert checked > 10


def test_alignment_then_pruning_zeroes_the_aligned_update(
    toy: dict[str, Path], tmp_path: Path
) -> None:
    from mergeshield.attacks.adaptive import perturb_then_align
    from mergeshield.protect import protect

    protect(toy["ft"], tmp_path / "locked", "mergelock", seed=3)
    out = perturb_then_align(
        tmp_path / "locked", toy["base"], tmp_path / "aligned", attack="aga", prune=0.4
    )
    aligned = load_folder_tensors(out)
    for name, b in load_folder_tensors(toy["base"]).items():
        if b.numel() > 1 and b.is_floating_point():
            assert float((aligned["bert." + name] == b).float().mean()) >= 0.4 - 1 / b.numel()


def test_finetune_recovery_on_an_image_classifier_with_stored_names(tmp_path: Path) -> None:
    """The frontier's fine-tune attack on a ViT: the stored backbone names are mapped to the
    module's (transformers 5 renames ViT on load) and pixel inputs train without masks."""
    from transformers import ViTForImageClassification

    from mergeshield.attacks.adaptive import finetune_recovery
    from mergeshield.modeling import stored_to_module_names

    config = tiny_vit_config()
    torch.manual_seed(0)
    ViTForImageClassification(config).vit.save_pretrained(tmp_path / "base")
    model = ViTForImageClassification(config)
    names = stored_to_module_names(model.base_model, tmp_path / "base")
    stored = load_folder_tensors(tmp_path / "base")
    backbone = {names.get(k, k): v for k, v in stored.items()}
    train = {"pixel_values": torch.randn(8, 1, 8, 8), "labels": torch.randint(0, 2, (8,))}

    def training_loss(m: torch.nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            return float(m(**train).loss)

    curve = finetune_recovery(
        model, backbone, train, n_examples=8, steps=20, evaluate=training_loss, lr=1e-3
    )
    assert [s for s, _ in curve] == [0, 10, 20]
    # the fine-tune really trains: the loss falls at each checkpoint, by a quarter in all
    assert curve[2][1] < curve[1][1] < curve[0][1] and curve[2][1] < 0.75 * curve[0][1]
    module = model.base_model.state_dict()
    assert len(backbone) == len(stored) and set(backbone) <= set(module)
