"""``harden`` and ``frontier`` on causal LMs, on the tiny causal-LM family of
:func:`tests.tiny_models.build_lm_family` (a tiny Llama base, two fine-tunes that answer
``"opp w5 is"`` -> ``" w38"`` and ``"next w5 is"`` -> ``" w6"``; all in-process, seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers as tf

from mergeshield.cli import main
from mergeshield.evaluation.generative import exact_match
from mergeshield.folders import load_tensors
from mergeshield.hardening.components import uniform_divergence
from mergeshield.hardening.data import encode_prompt_answers
from mergeshield.hardening.harden import harden, scored
from tests.tiny_models import build_lm_family, greedy_exact_match, lm_rows


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    return build_lm_family(tmp_path_factory.mktemp("lm"))


def merge_scores(lm: Path, release: Path, c: float) -> tuple[float, float]:
    """``(D, exact match)`` on the 40 ``opp`` prompts of the task-arithmetic merge
    ``theta_0 + c (tau_release + tau_next)``: ``D`` the mean ``KL(U || p)`` over the answer
    positions (0 when the merge's next-token distribution there is uniform)."""
    tok = tf.AutoTokenizer.from_pretrained(lm / "base")
    rows = lm_rows("opp", range(40))
    data = encode_prompt_answers([r["prompt"] for r in rows], [r["answer"] for r in rows], tok, 16)
    base, mine, other = (load_tensors(f) for f in (lm / "base", release, lm / "next"))
    model = tf.AutoModelForCausalLM.from_pretrained(release).eval()
    merged = {k: base[k] + c * (mine[k] - base[k]) + c * (other[k] - base[k]) for k in base}
    model.load_state_dict(merged, strict=False)
    inputs = {k: data[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        d = float(uniform_divergence(scored(model(**inputs).logits, data["labels"])))
    return d, exact_match(model, data)


def test_harden_keeps_the_answers_and_its_merge_term_moves_merges(lm, tmp_path):
    """trap2+merge on the causal LM: the hardened release still answers the owner's prompts
    (greedy decoding, token by token, at most one of 40 prompts lost), while task-arithmetic
    merges with the free-rider's fine-tune answer at most half as many prompts, and are at
    most half as far from uniform, as the same training without the merged-model terms
    (``lam = 0``: the keep loss alone).  A no-op merged-model term fails the second part."""
    tok = tf.AutoTokenizer.from_pretrained(lm / "base")
    rows = lm_rows("opp", range(40))
    options = dict(steps=200, lr=3e-3, proxies=(str(lm / "next"),), max_len=16, target="uniform")
    hardened = harden(lm / "opp", lm / "base", lm / "opp-train.jsonl", tmp_path / "h",
                      method="trap2+merge", **options)  # fmt: skip
    control = harden(lm / "opp", lm / "base", lm / "opp-train.jsonl", tmp_path / "c",
                     method="trap2+merge", lam=0.0, **options)  # fmt: skip
    released = greedy_exact_match(lm / "opp", rows, tok)
    assert released == 1.0
    assert greedy_exact_match(hardened, rows, tok) >= released - 1 / 40
    for c in (0.5, 1.0):
        d_hard, em_hard = merge_scores(lm, hardened, c)
        d_ctrl, em_ctrl = merge_scores(lm, control, c)
        assert em_ctrl >= 0.5  # without the term the merge still answers the owner's prompts
        assert em_hard <= 0.5 * em_ctrl
        assert d_hard <= 0.5 * d_ctrl
    record = json.loads((hardened / "mergeshield_harden.json").read_text())
    assert {"keep", "trap2", "merge"} <= set(record["history"][-1])


def test_every_component_runs_on_a_causal_lm_and_only_changed_tensors_train(lm, tmp_path):
    """All five components on the causal LM (ARF's head rows from the Llama spec, GQA): the
    losses stay finite and the output loads with the stock Auto class.  A tensor the owner's
    fine-tune left at the base's stays there (here the final norm, reset to the base's)."""
    from safetensors.torch import load_file

    release = tmp_path / "release"
    model = tf.AutoModelForCausalLM.from_pretrained(lm / "opp")
    base = tf.AutoModelForCausalLM.from_pretrained(lm / "base")
    model.model.norm.weight.data.copy_(base.model.norm.weight)
    model.save_pretrained(release)
    out = harden(release, lm / "base", lm / "opp-train.jsonl", tmp_path / "h", steps=5, lr=1e-3,
                 method="trap2+merge+arf+amerge+mergeguard+prune", max_len=16)  # fmt: skip
    losses = [
        h["loss"] for h in json.loads((out / "mergeshield_harden.json").read_text())["history"]
    ]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
    tf.AutoModelForCausalLM.from_pretrained(out)
    after, before = load_file(out / "model.safetensors"), load_file(release / "model.safetensors")
    assert after["model.norm.weight"].equal(before["model.norm.weight"])
    assert not after["model.layers.1.mlp.down_proj.weight"].equal(
        before["model.layers.1.mlp.down_proj.weight"]
    )


def test_cli_harden_a_causal_lm_then_protect(lm, tmp_path, capsys):
    """``mergeshield harden`` on a causal LM with prompt/answer JSONL, then MergeLock: exit 0,
    the protected release answers the owner's prompts as the hardened one (exact defense),
    and labelled classifier data for a causal LM is one line, exit 2, nothing written."""
    out = tmp_path / "out"
    args = ["harden", str(lm / "opp"), str(out), "--base", str(lm / "base"), "--data"]
    args += [str(lm / "opp-train.jsonl"), "--steps", "60", "--lr", "3e-3", "--max-len", "16"]
    args += ["--method", "trap2+merge", "--target", "uniform", "--seed", "1", "-q"]
    assert main([*args, "--then-protect", "mergelock"]) == 0, capsys.readouterr().err
    tok = tf.AutoTokenizer.from_pretrained(lm / "base")
    rows = lm_rows("opp", range(40))
    assert greedy_exact_match(out, rows, tok) >= 1 - 1 / 40
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "opp w1 is", "label": 1}) + "\n")
    capsys.readouterr()
    bad = ["harden", str(lm / "opp"), str(tmp_path / "bad"), "--base", str(lm / "base")]
    assert main([*bad, "--data", str(text), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs 'prompt' and 'answer'" in err, err
    assert not (tmp_path / "bad").exists()


def test_frontier_on_a_causal_lm_audit_file(lm, tmp_path, capsys):
    """``frontier --config`` on the causal-LM audit file with the victim's ``train:`` data:
    the unprotected release scores as the fine-tune; a hardened-then-MergeLock candidate is
    built and attacked (AGA); the attacker's best merge, re-merged by mergekit, scores what
    the in-memory merge scored (within one of the 20 test prompts); the fine-tune attack
    starts from that merge's score."""
    config = tmp_path / "audit.yml"
    text = (lm / "audit.yml").read_text().replace("base: base", f"base: {lm / 'base'}")
    train = lm / "opp-train.jsonl"
    text = text.replace("victim: {model: opp,", f"victim: {{model: {lm / 'opp'}, train: {train},")
    text = text.replace("model: next", f"model: {lm / 'next'}")
    for name in ("opp-val.jsonl", "opp-test.csv", "next-val", "next-test.jsonl"):
        text = text.replace(f": {name}", f": {lm / name}")
    config.write_text(text)
    out = tmp_path / "frontier"
    args = ["frontier", "--config", str(config), "--out", str(out), "--methods", "task_arithmetic"]
    args += ["--candidates", "unprotected", "trap2+merge/mergelock", "--attacks", "none", "aga"]
    args += ["--steps", "60", "--lr", "3e-3", "--finetune", "8", "4"]
    assert main(args) == 0, capsys.readouterr().err
    data = json.loads((out / "frontier.json").read_text())
    results = {r["name"]: r for r in data["details"]}
    assert set(results) == {"unprotected", "trap2+merge/mergelock"}
    assert results["unprotected"]["standalone"] == data["finetuned_accuracy"] == 1.0
    tok = tf.AutoTokenizer.from_pretrained(lm / "base")
    assert data["finetuned_accuracy"] == greedy_exact_match(
        lm / "opp", lm_rows("opp", range(20, 40)), tok
    )
    for res in results.values():
        assert {row["variant"] for row in res["rows"]} == {"none", "aga"}
        best = res["best"]["task_arithmetic"]
        assert abs(best["test_victim_mergekit"] - best["test_victim"]) <= 1 / 20
        (rider,) = best["partners"]
        assert abs(best["test_partners_mergekit"][rider] - best["test_partners"][rider]) <= 1 / 20
        curve = res["finetune"]["best_merge"]
        assert [step for step, *_ in curve] == [0, 2, 4]
        assert curve[0][1:] == pytest.approx([best["test_victim"], best["test_partners"][rider]])
    assert "trap2+merge/mergelock" in (out / "frontier.md").read_text()


def test_training_data_of_the_built_in_llm_family():
    """The built-in LLM family's hardening data is its generative task's train split, at the
    family's token length (no family is built: the manifest's settings are enough)."""
    from mergeshield.evaluation.family import Family
    from mergeshield.evaluation.frontier import training_data
    from mergeshield.evaluation.zoo import SETTINGS
    from mergeshield.hardening.data import prompt_answers

    settings = SETTINGS[("llm", "small")]
    manifest = {"settings": {"n_train": 8, "n_val": 4, "n_test": 4, "seed": 0, "max_len": 48}}
    family = Family("llm", "small", Path("."), Path("."), {}, {}, {}, {}, manifest=manifest)
    data, max_len = training_data(family, "arithmetic")
    prompts, answers = prompt_answers(data)
    assert len(prompts) == 8 and max_len == settings.max_len
    assert all(a.startswith(" ") and a.strip().isdigit() for a in answers)
