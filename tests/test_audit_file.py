"""Audit files: a user's base, release, free-riders and data, described in YAML.

The end-to-end test writes everything a user would have: a tiny BERT base with a word-level
tokenizer, two classifiers fine-tuned from it (random task vectors, their own heads and label
names), JSONL data whose labels are each classifier's own predictions (so the fine-tune scores
1 and the base backbone less), and the audit file; then runs ``mergeshield audit --config``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf

from mergeshield.cli import main
from mergeshield.errors import MergeShieldError
from mergeshield.evaluation.audit_file import builtin_file, load_audit_file
from mergeshield.folders import load_tensors
from tests.tiny_models import LM_TASKS, build_lm_family, greedy_exact_match, lm_rows

WORDS = [f"w{i}" for i in range(90)]


def _tokenizer(folder: Path) -> tf.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]"
    )
    tok.save_pretrained(folder)
    return tok


def _texts(seed: int, n: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [
        " ".join(WORDS[int(i)] for i in torch.randint(0, 90, (8,), generator=g)) for _ in range(n)
    ]


@pytest.fixture(scope="module")
def user_files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("user")
    config = tf.BertConfig(
        vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=60, max_position_embeddings=64, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    base = tf.BertModel(config).eval()
    base.save_pretrained(root / "base")
    tok = _tokenizer(root / "base")
    tasks = (("noun", ["a", "b", "c"], 1), ("verb", ["x", "y", "z"], 3), ("adj", ["p", "q"], 5))
    for name, labels, seed in tasks:
        cfg = tf.BertConfig(
            **config.to_diff_dict() | {"num_labels": len(labels)},
            id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)},
        )
        torch.manual_seed(seed)
        model = tf.BertForSequenceClassification(cfg).eval()
        g = torch.Generator().manual_seed(seed)
        state = {
            "bert." + k: v + 0.3 * v.abs().mean() * torch.randn(v.shape, generator=g)
            if v.is_floating_point()
            else v
            for k, v in base.state_dict().items()
        }
        model.load_state_dict(state, strict=False)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        for split, split_seed in (("val", 10), ("test", 20), ("train", 30)):
            texts = _texts(seed * 100 + split_seed, 64)
            with torch.no_grad():
                pred = model(**tok(texts, return_tensors="pt", padding=True)).logits.argmax(-1)
            rows = [{"text": t, "label": labels[int(p)]} for t, p in zip(texts, pred, strict=True)]
            (root / f"{name}-{split}.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    (root / "audit.yml").write_text(
        "base: base\n"
        "victim: {model: noun, val: noun-val.jsonl, test: noun-test.jsonl}\n"
        "free_riders:\n  - {model: verb, val: verb-val.jsonl, test: verb-test.jsonl}\n"
        "defenses: [mergelock]\nattacks: []\nmethods: [task_arithmetic]\n"
        "grid: [0.5, 1.0]\nprotocol: false\nmax_length: 16\n"
    )
    return root


def _noun_test(model: torch.nn.Module, user_files: Path) -> float:
    """``model``'s accuracy on noun-test.jsonl, tokenized here with the noun tokenizer."""
    from mergeshield.evaluation.accuracy import accuracy

    rows = [json.loads(line) for line in (user_files / "noun-test.jsonl").read_text().split("\n")
            if line]  # fmt: skip
    tok = tf.AutoTokenizer.from_pretrained(user_files / "noun")
    enc = tok([r["text"] for r in rows], return_tensors="pt", padding=True)
    labels = torch.tensor([model.config.label2id[r["label"]] for r in rows])
    return accuracy(model, {**enc, "labels": labels})


def test_audit_file_end_to_end(user_files, tmp_path, capsys):
    from mergeshield.modeling import load_classifier

    out = tmp_path / "report"
    assert main(["audit", "--config", str(user_files / "audit.yml"), "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["victim"] == "noun" and data["free_riders"] == ["verb"]
    assert [r["variant"] for r in data["merges"]] == ["unprotected", "mergelock"]
    # each classifier scores 1 on labels that are its own predictions, with its own head
    assert data["family"]["finetuned_accuracy"] == {"noun": 1.0, "verb": 1.0}
    # the base backbone's accuracy, computed here with the victim's head and its tokenizer
    model = load_classifier(user_files / "noun", "text")
    model.bert.load_state_dict(tf.BertModel.from_pretrained(user_files / "base").state_dict())
    assert data["family"]["base_accuracy"]["noun"] == pytest.approx(_noun_test(model, user_files))
    assert "objective: min" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("metric: f1\n", "unknown metric 'f1'"),
        ("colour: red\n", r"unknown fields \['colour'\]"),
        ("objective: max\n", "unknown objective 'max'"),
        ("defenses: [paramz]\n", r"unknown defenses \['paramz'\]"),
        ("methods: [soup]\n", "unknown merge method 'soup'"),
    ],
)
def test_bad_audit_fields(user_files, tmp_path, capsys, edit, message):
    bad = tmp_path / "bad.yml"
    bad.write_text((user_files / "audit.yml").read_text() + edit)
    with pytest.raises(MergeShieldError, match=message):
        load_audit_file(bad)
    assert main(["audit", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message.split("'")[0].replace("\\", "") in err
    assert not (tmp_path / "r").exists()


def _variant(user_files: Path, tmp_path: Path, old: str, new: str) -> Path:
    text = (user_files / "audit.yml").read_text()
    assert old in text
    bad = tmp_path / "bad.yml"
    bad.write_text(text.replace(old, new))
    # paths stay relative to the user's folder
    bad.write_text(
        bad.read_text()
        .replace("base: base", f"base: {user_files / 'base'}")
        .replace("model: noun", f"model: {user_files / 'noun'}")
        .replace("model: verb", f"model: {user_files / 'verb'}")
        .replace(" noun-", f" {user_files}/noun-")
        .replace(" verb-", f" {user_files}/verb-")
    )
    return bad


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (", val: verb-val.jsonl", "", "no 'val' split"),
        ("test: noun-test.jsonl", "test: nowhere.jsonl", "test data .* not found"),
        ("model: verb", "model: nowhere", "is not a checkpoint folder"),
        ("noun-test.jsonl}", "noun-test.jsonl, train: nowhere.jsonl}", "train data .* not found"),
    ],
)
def test_bad_audit_paths(user_files, tmp_path, old, new, message):
    with pytest.raises(MergeShieldError, match=message):
        load_audit_file(_variant(user_files, tmp_path, old, new))


def test_free_rider_of_another_architecture_and_labels_of_another_head(user_files, tmp_path):
    from mergeshield.evaluation.audit_file import materialize
    from tests.tiny_models import build

    build("gpt2", tmp_path / "gpt2")
    with pytest.raises(MergeShieldError, match="gpt2 model, the base .* not a fine-tune of that"):
        load_audit_file(_variant(user_files, tmp_path, "model: verb", "model: gpt2"))
    # the verb data's labels (x, y, z) given to the noun model (a, b, c)
    audit = load_audit_file(
        _variant(user_files, tmp_path, "test: noun-test.jsonl", "test: verb-test.jsonl")
    )
    with pytest.raises(MergeShieldError, match="noun test data: unknown label '[xyz]'"):
        materialize(audit, tmp_path / "family2")
    # the same check on the optional train split
    audit = load_audit_file(
        _variant(
            user_files, tmp_path, "noun-test.jsonl}", "noun-test.jsonl, train: verb-train.jsonl}"
        )
    )
    with pytest.raises(MergeShieldError, match="noun train data: unknown label '[xyz]'"):
        materialize(audit, tmp_path / "family3")


def test_exact_match_is_refused_on_classifiers(user_files, tmp_path, capsys):
    bad = _variant(
        user_files, tmp_path, "max_length: 16\n", "max_length: 16\nmetric: exact_match\n"
    )
    assert main(["audit", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "metric exact_match scores a causal LM" in err
    assert "it is a classifier: use metric: accuracy" in err


def test_kind_runs_its_shipped_file_and_flags_override_fields(tmp_path):
    """``--kind text --setting small`` is the shipped text-small.yml (one code path, so the
    same numbers on the same cached family); each option given replaces one field of it, a
    ``--victim`` alone makes every other task a free-rider; the demo runs demo.yml."""
    from dataclasses import replace

    from mergeshield.cli import build_parser
    from mergeshield.cli.study import audit_config, audit_overrides

    def plan(*argv: str):
        args = build_parser().parse_args(["audit", *argv])
        return load_audit_file(audit_config(args), audit_overrides(args)).plan

    shipped = load_audit_file(builtin_file("text-small")).plan
    assert plan("--kind", "text", "--setting", "small") == shipped == plan()
    assert plan("--kind", "image") == load_audit_file(builtin_file("image-small")).plan
    flags = ["--methods", "ties", "--no-protocol", "--grid", "0.5", "1", "--attacks"]
    flags += ["--victim", "wordnet_verb", "--merge-all", "--seed", "4", "--objective", "mean"]
    assert plan(*flags) == replace(
        shipped,
        methods=("ties",),
        protocol=(),
        grid=(0.5, 1.0),
        attacks=(),
        victim="wordnet_verb",
        merge_all=True,
        seed=4,
        objective="mean",
    )
    with pytest.raises(MergeShieldError, match="unknown defenses"):
        plan("--defenses", "paramz")
    with pytest.raises(MergeShieldError, match="give --config or --kind"):
        plan("--config", str(builtin_file("text-small")), "--kind", "text")
    demo = load_audit_file(builtin_file("demo")).plan
    assert demo.tasks == ("wordnet_noun", "wordnet_verb") and demo.free_riders == ("wordnet_verb",)
    with pytest.raises(MergeShieldError, match="no shipped audit file 'nope'"):
        builtin_file("nope")


def test_builtin_family_metric_must_match_its_kind(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("family: {kind: llm, setting: small}\nmetric: accuracy\n")
    with pytest.raises(MergeShieldError, match="built-in llm family is scored by exact_match"):
        load_audit_file(bad)
    bad.write_text("family: {kind: text, setting: small}\nmetric: exact_match\n")
    with pytest.raises(MergeShieldError, match="built-in text family is scored by accuracy"):
        load_audit_file(bad)
    assert load_audit_file(builtin_file("llm-small")).metric == "exact_match"


def test_frontier_config_on_your_own_classifiers(user_files, tmp_path, capsys):
    """``frontier --config``: the file's family and tasks, unprotected and the file's defenses
    as candidates, the fine-tune attack skipped (it needs training data the file does not
    name: the note says to add train:); the unprotected release scores what the audit file's
    family measured."""
    out = tmp_path / "frontier"
    args = ["frontier", "--config", str(user_files / "audit.yml"), "--out", str(out)]
    args += ["--methods", "task_arithmetic", "--attacks", "none"]
    assert main(args) == 0, capsys.readouterr().err
    note = capsys.readouterr().out
    assert "fine-tune attack is skipped" in note and "add train: DATA to the victim (noun)" in note
    data = json.loads((out / "frontier.json").read_text())
    assert (data["victim"], data["plan"]["free_riders"]) == ("noun", ["verb"])
    results = {r["name"]: r for r in data["details"]}
    assert set(results) == {"unprotected", "mergelock"}
    assert results["unprotected"]["standalone"] == data["finetuned_accuracy"] == 1.0
    assert results["mergelock"]["standalone"] == 1.0  # the same function
    assert main([*args, "--overwrite", "--candidates", "trap2"]) == 2
    err = capsys.readouterr().err
    assert "harden on the victim's training data" in err and "add train: DATA" in err


def test_frontier_sweeps_every_merge_method(user_files, tmp_path, capsys):
    """The frontier's attacker merges with any mergekit method: each method's own grid
    thinned by ``--grid-stride`` (task arithmetic and TIES keep the frontier's grids), the
    coefficient-1 insertion for the task-vector methods only, the best setting per method
    re-merged by mergekit; an unknown method is refused with one line."""
    from mergeshield.merging.methods import get_method

    out = tmp_path / "frontier"
    methods = ["linear", "ties", "slerp", "model_stock"]
    args = ["frontier", "--config", str(user_files / "audit.yml"), "--out", str(out)]
    args += ["--methods", *methods, "--attacks", "none", "--candidates", "unprotected"]
    assert main([*args, "--grid-stride", "3"]) == 0, capsys.readouterr().err
    data = json.loads((out / "frontier.json").read_text())
    (result,) = data["details"]
    for method in methods:
        rows = [r for r in result["rows"] if r["method"] == method]
        sweep = [r for r in rows if r["search"] == "sweep"]
        grid = [c for c, *_ in sweep[0]["curve"]]
        expected = (1.0, 1.5, 2.0) if method == "ties" else get_method(method).thinned(3)
        assert grid == list(expected)
        assert {r["search"] for r in rows} == (
            {"sweep", "insertion"} if method == "ties" else {"sweep"}
        )
        best = result["best"][method]
        assert best["val_joint"] == max(r["val_joint"] for r in rows)
        assert best["test_victim_mergekit"] == pytest.approx(best["test_victim"], abs=0.02)
    assert get_method("linear").thinned(3) == (0.5, 1.0)  # of 1, .8, .6, .5, .4, .2
    assert get_method("model_stock").thinned(3) == (1.0,)
    md = (out / "frontier.md").read_text()
    assert all(f"| unprotected | {m} |" in md for m in methods)
    bad = [*args, "--overwrite", "--methods", "lineer"]
    assert main(bad) == 2 and "lineer" in capsys.readouterr().err


def test_frontier_merges_the_victim_with_every_free_rider_at_once(user_files, tmp_path, capsys):
    """With two free-riders the frontier's attacker merges the victim with each (two-model) and
    with both at once (all-task), per method that takes three models (slerp takes two); the
    all-task merge is judged by its weakest task over all three, its best setting re-merged by
    mergekit, and its curve scores every merged task."""
    config = user_files / "audit-two-free-riders.yml"
    adj = "  - {model: adj, val: adj-val.jsonl, test: adj-test.jsonl}\n"
    text = (user_files / "audit.yml").read_text()
    config.write_text(text.replace("free_riders:\n", "free_riders:\n" + adj))
    out = tmp_path / "frontier"
    args = ["frontier", "--config", str(config), "--out", str(out), "--candidates", "unprotected"]
    args += ["--methods", "task_arithmetic", "slerp", "--attacks", "none"]
    assert main(args) == 0, capsys.readouterr().err
    data = json.loads((out / "frontier.json").read_text())
    (result,) = data["details"]
    all_tasks = "task_arithmetic, all tasks"
    assert set(result["best"]) == {"task_arithmetic", "slerp", all_tasks}
    groups = {(r["method"], tuple(r["partners"])) for r in result["rows"]}
    assert groups == {
        ("task_arithmetic", ("adj",)),
        ("task_arithmetic", ("verb",)),
        ("task_arithmetic", ("adj", "verb")),
        ("slerp", ("adj",)),
        ("slerp", ("verb",)),
    }
    for key, best in result["best"].items():  # each re-merged with the free-riders it chose
        assert set(best["test_partners"]) == set(best["partners"]), key
        assert best["test_partners_mergekit"].keys() == best["test_partners"].keys(), key
        two = [r for r in result["rows"] if r["method"] == best["method"]]
        two = [r for r in two if len(r["partners"]) == len(best["partners"])]
        assert best["val_joint"] == max(r["val_joint"] for r in two), key
    rows = [r for r in result["rows"] if len(r["partners"]) == 2]
    assert {r["search"] for r in rows} == {"sweep", "insertion"}
    assert all(len(point) == 4 for r in rows for point in r["curve"])  # c, victim, adj, verb
    best = result["best"][all_tasks]
    assert best["val_joint"] == max(r["val_joint"] for r in rows)
    assert best["test_partners"].keys() == best["test_partners_mergekit"].keys() == {"adj", "verb"}
    for task, acc in best["test_partners"].items():
        assert best["test_partners_mergekit"][task] == pytest.approx(acc, abs=0.02)
    summary = data["summary"][0][all_tasks]
    assert summary["weakest"] == pytest.approx(
        min(summary["kept"], *summary["partner_kept"].values())
    )
    assert f"| unprotected | {all_tasks} |" in (out / "frontier.md").read_text()


def test_frontier_config_hardens_and_fine_tunes_on_the_files_train_data(
    user_files, tmp_path, capsys, monkeypatch
):
    """With ``train:`` on the victim, ``frontier --config`` builds a hardening candidate (3
    steps) and runs the fine-tune attack (32 examples, 4 steps); its figures are
    re-computable: the hardened release is what ``harden`` makes of the same file, its
    standalone accuracy is that checkpoint's test accuracy measured here, and the fine-tune
    attack starts (step 0) at the best task-arithmetic merge's in-memory test accuracy.
    ``--builds`` reuses that release for another study without training it again, and refuses
    it for other settings or a folder frontier did not build."""
    from mergeshield.folders import load_tensors
    from mergeshield.hardening.harden import harden
    from mergeshield.modeling import load_classifier

    config = _variant(
        user_files, tmp_path, "noun-test.jsonl}", "noun-test.jsonl, train: noun-train.jsonl}"
    )
    out = tmp_path / "frontier"
    args = ["frontier", "--config", str(config), "--out", str(out), "--methods", "task_arithmetic"]
    args += ["--attacks", "none", "--candidates", "trap2+merge", "--steps", "3", "--lr", "1e-3"]
    args += ["--target", "margin", "--finetune", "32", "4"]
    assert main(args) == 0, capsys.readouterr().err
    assert "skipped" not in capsys.readouterr().out
    bad = [*args[:-2], "0", "4", "--overwrite"]
    assert main(bad) == 2 and "--finetune takes two positive" in capsys.readouterr().err
    data = json.loads((out / "frontier.json").read_text())
    (result,) = data["details"]
    released = out / "builds" / "trap2+merge" / "hardened"
    made = released.stat().st_mtime_ns
    # the frontier's harden call: the file's train data and max_length, no proxies, --target
    options: dict = {"method": "trap2+merge", "steps": 3, "lr": 1e-3, "max_len": 16}
    options["target"] = "margin"
    data_file = user_files / "noun-train.jsonl"
    again = harden(user_files / "noun", user_files / "base", data_file, tmp_path / "a", **options)
    ours, theirs = load_tensors(released), load_tensors(again)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    noun = load_tensors(user_files / "noun")
    assert any(not torch.equal(ours[k], noun[k]) for k in noun)  # it trained
    model = load_classifier(released, "text")
    assert result["standalone"] == pytest.approx(_noun_test(model, user_files))
    finetune = result["finetune"]
    assert (finetune["examples"], finetune["steps"]) == (32, 4)
    assert [step for step, *_ in finetune["best_merge"]] == [0, 2, 4]
    best = result["best"]["task_arithmetic"]
    # before any step: the best merge's own test scores, the victim's and the free-rider's
    assert finetune["best_merge"][0][1:] == pytest.approx(
        [best["test_victim"], best["test_partners"]["verb"]]
    )
    assert [step for step, *_ in finetune["merge_without_victim"]] == [0, 2, 4]

    def no_training(*args, **kwargs):
        raise AssertionError("a release built with the same settings was trained again")

    monkeypatch.setattr("mergeshield.hardening.harden.harden", no_training)
    more = [*args[:-3], "--no-finetune", "--builds", str(out / "builds")]
    more[more.index("--out") + 1] = str(tmp_path / "more")
    assert main(more) == 0, capsys.readouterr().err
    again_data = json.loads((tmp_path / "more" / "frontier.json").read_text())
    assert again_data["details"][0]["standalone"] == result["standalone"]
    assert released.stat().st_mtime_ns == made
    other = list(more)
    other[other.index("--steps") + 1] = "4"
    other[other.index("--out") + 1] = str(tmp_path / "other")
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "built with other harden_kwargs" in err and "another --builds" in err
    assert not (tmp_path / "other").exists()  # refused before any report is written
    foreign = tmp_path / "foreign" / "trap2+merge"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("not a build")
    other = list(more)
    other[other.index("--builds") + 1] = str(tmp_path / "foreign")
    other[other.index("--out") + 1] = str(tmp_path / "third")
    assert main(other) == 2 and "is not a frontier build" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "not a build"


def test_finetune_command_builds_a_classifier_of_the_base(user_files, tmp_path, capsys):
    """``mergeshield finetune``: a classification checkpoint of the base, with the data's sorted
    label names, the base's tokenizer, a trained backbone; an existing output is refused."""
    out = tmp_path / "tuned"
    args = ["finetune", str(user_files / "base"), str(out), "--train"]
    args += [str(user_files / "verb-val.jsonl"), "--epochs", "3", "--lr", "1e-3", "-q"]
    assert main(args) == 0
    assert "3 labels" in capsys.readouterr().out
    model = tf.AutoModelForSequenceClassification.from_pretrained(out)
    assert [model.config.id2label[i] for i in range(3)] == ["x", "y", "z"]
    assert (out / "tokenizer.json").is_file()
    base = tf.BertModel.from_pretrained(user_files / "base").state_dict()
    moved = [k for k, v in model.bert.state_dict().items() if k in base and not v.equal(base[k])]
    assert len(moved) > len(base) // 2
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err


# --- a causal-LM family: prompt/answer data, exact match of the greedy answer ---------------


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory) -> Path:
    """The tiny causal-LM family of :func:`tests.tiny_models.build_lm_family`."""
    return build_lm_family(tmp_path_factory.mktemp("lm"))


def test_causal_lm_audit_file_end_to_end(lm_files, tmp_path):
    """``metric: exact_match`` on the user's causal LMs; the command line's ``--defenses``
    replaces the file's.  Every reported figure is recomputed here by token-by-token greedy
    decoding: the fine-tunes and the base on the test prompts, and the reported unprotected
    merge, merged again by mergekit at the reported coefficient."""
    from mergeshield.merging import merge

    out = tmp_path / "report"
    args = ["audit", "--config", str(lm_files / "audit.yml"), "--out", str(out)]
    assert main([*args, "--defenses", "mergelock"]) == 0
    data = json.loads((out / "report.json").read_text())
    assert (data["victim"], data["free_riders"], data["family"]["kind"]) == ("opp", ["next"], "llm")
    assert [r["variant"] for r in data["merges"]] == ["unprotected", "mergelock"]
    tok = tf.AutoTokenizer.from_pretrained(lm_files / "base")
    test = {t: lm_rows(t, range(20, 40)) for t in LM_TASKS}
    for task in LM_TASKS:
        tuned = greedy_exact_match(lm_files / task, test[task], tok)
        base = greedy_exact_match(lm_files / "base", test[task], tok)
        assert data["family"]["finetuned_accuracy"][task] == pytest.approx(tuned)
        assert data["family"]["base_accuracy"][task] == pytest.approx(base)
        assert tuned >= base + 0.5  # each fine-tune answers its own prompts
    # MergeLock computes the same function: the release answers exactly as the fine-tune
    assert data["standalone"]["mergelock"] == data["standalone"]["unprotected"]
    row = data["merges"][0]
    merged = merge(
        "task_arithmetic",
        lm_files / "base",
        [lm_files / "opp", lm_files / "next"],
        tmp_path / "merged",
        coefficient=row["coefficient"],
    )
    assert row["victim_accuracy"] == pytest.approx(greedy_exact_match(merged, test["opp"], tok))
    assert row["partner_accuracy"]["next"] == pytest.approx(
        greedy_exact_match(merged, test["next"], tok)
    )


def test_causal_lm_audit_in_bf16(lm_files, tmp_path):
    """``--dtype bfloat16``: the base and the fine-tunes released in bf16, protected and merged
    in it.  The references are the bf16 models' scores (greedy decoding here, in float32 like
    the audit); mergekit writes bf16 merges that equal the in-memory ones bit for bit; the
    reported unprotected merge, merged again here by mergekit from models cast by
    transformers, scores as reported; protection still computes the release's function."""
    from mergeshield.merging import merge

    out = tmp_path / "report"
    args = ["audit", "--config", str(lm_files / "audit.yml"), "--out", str(out)]
    assert main([*args, "--defenses", "params", "mergelock", "--dtype", "bfloat16"]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["family"]["dtype"] == "bfloat16" and data["plan"]["dtype"] == "bfloat16"
    tok = tf.AutoTokenizer.from_pretrained(lm_files / "base")
    test = {t: lm_rows(t, range(20, 40)) for t in LM_TASKS}
    bf16 = {}
    for name in ("base", *LM_TASKS):
        model = tf.AutoModelForCausalLM.from_pretrained(lm_files / name, dtype=torch.bfloat16)
        model.save_pretrained(tmp_path / f"{name}-bf16")
        bf16[name] = tmp_path / f"{name}-bf16"
    for task in LM_TASKS:
        tuned = greedy_exact_match(bf16[task], test[task], tok, torch.float32)
        base = greedy_exact_match(bf16["base"], test[task], tok, torch.float32)
        assert data["family"]["finetuned_accuracy"][task] == pytest.approx(tuned)
        assert data["family"]["base_accuracy"][task] == pytest.approx(base)
    assert data["standalone"]["params"] == data["standalone"]["mergelock"]
    assert data["standalone"]["mergelock"] == pytest.approx(
        data["family"]["finetuned_accuracy"]["opp"], abs=0.05 + 1e-9
    )  # bf16 rounding of the protected weights: at most one of the 20 test prompts
    for row in data["merges"]:
        assert row["kernel_check"]["differing_tensors"] == [], row["variant"]
    row = data["merges"][0]
    merged = merge(
        "task_arithmetic",
        bf16["base"],
        [bf16["opp"], bf16["next"]],
        tmp_path / "merged",
        coefficient=row["coefficient"],
        out_dtype="bfloat16",
    )
    assert {t.dtype for t in load_tensors(merged).values()} == {torch.bfloat16}
    for task, reported in (("opp", row["victim_accuracy"]), *row["partner_accuracy"].items()):
        assert reported == pytest.approx(greedy_exact_match(merged, test[task], tok, torch.float32))


def _lm_variant(lm_files: Path, tmp_path: Path, old: str, new: str) -> Path:
    text = (lm_files / "audit.yml").read_text()
    assert old in text
    bad = tmp_path / "bad.yml"
    bad.write_text(text.replace(old, new).replace("base: base", f"base: {lm_files / 'base'}"))
    for name in ("opp", "next", "opp-val.jsonl", "opp-test.csv", "next-val", "next-test.jsonl"):
        target = tmp_path / name
        if not target.exists():
            target.symlink_to(lm_files / name)
    return bad


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("metric: exact_match\n", "", "metric accuracy scores a classifier .* use metric: exact"),
        ("model: next", "model: qwen", "qwen2 model, the base .* a llama: not a fine-tune"),
        ("model: next", "model: wide", "wide: tensor .* shape .* in base"),
        ("test: next-test.jsonl", "test: nowhere.jsonl", "test data .* not found"),
        ("val: opp-val.jsonl", "val: questions.jsonl", "row 1 needs 'prompt' and 'answer'"),
        ("test: opp-test.csv", "test: empty.csv", "opp test data: .* holds no examples"),
        ("val: next-val", "val: texts", r"no \['prompt'\] column"),
    ],
)
def test_bad_causal_lm_audit_files(lm_files, tmp_path, capsys, old, new, message):
    """One-line errors, exit 2, nothing written: accuracy on a causal LM, a free-rider of
    another model type or shape, a missing path, missing columns, an empty split."""
    import re

    from datasets import Dataset

    from tests.tiny_models import build

    if new == "model: qwen":
        build("qwen2", tmp_path / "qwen")
    if new == "model: wide":
        build("llama-mha", tmp_path / "wide")
    (tmp_path / "questions.jsonl").write_text(json.dumps({"question": "a", "answer": " b"}))
    (tmp_path / "empty.csv").write_text("prompt,answer\n")
    Dataset.from_list([{"text": "opp w1 is", "answer": " w10"}]).save_to_disk(
        str(tmp_path / "texts")
    )
    bad = _lm_variant(lm_files, tmp_path, old, new)
    capsys.readouterr()
    assert main(["audit", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and re.search(message, err), err
    assert not (tmp_path / "r").exists()


def test_cast_checkpoint_casts_floats_copies_side_files_and_leaves_stray_weights(tmp_path):
    """:func:`mergeshield.folders.cast_checkpoint`: floating tensors rounded to bf16, integer
    ones kept, config says bf16, tokenizer/generation files copied, other weight files (a
    stray ``pytorch_model.bin``) not; the source is unchanged."""
    from mergeshield.folders import cast_checkpoint, save_tensors

    src = tmp_path / "src"
    src.mkdir()
    tensors = {"w": torch.randn(4, 3), "ids": torch.arange(5)}
    save_tensors(tensors, src)
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float32"}))
    (src / "generation_config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"stray")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = cast_checkpoint(src, tmp_path / "out", torch.bfloat16)
    got = load_tensors(out)
    assert got["w"].dtype == torch.bfloat16 and torch.equal(got["w"], tensors["w"].bfloat16())
    assert torch.equal(got["ids"], tensors["ids"])
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
