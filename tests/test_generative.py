"""Generative tasks of the LLM family and exact match of the greedy answer (fast, tiny models)."""

from __future__ import annotations

import re

import pytest
import torch

from mergeshield.errors import MergeShieldError
from mergeshield.evaluation.generative import IGNORE, LLM_TASKS, exact_match, load_gen_task
from mergeshield.tasks import BBC_TOPICS
from tests.tiny_models import build


def _pairs(split):
    return list(zip(split.prompts, split.answers, strict=True))


def test_antonym_splits_share_no_pair_in_either_direction():
    task = load_gen_task("antonym", 300, 50, 100)
    assert (len(task.train), len(task.val), len(task.test)) == (300, 50, 100)
    word = re.compile(r"The opposite of (\w+) is")

    def unordered(split):
        return {frozenset((word.match(p).group(1), a.strip())) for p, a in _pairs(split)}

    train, val, test = (unordered(s) for s in (task.train, task.val, task.test))
    assert not (train & test) and not (train & val) and not (val & test)
    assert all(a.startswith(" ") and a.strip().isalpha() for a in task.test.answers)


def test_arithmetic_answers_are_right_and_test_does_not_depend_on_train_size():
    task = load_gen_task("arithmetic", 200, 20, 60)
    for prompt, answer in _pairs(task.test) + _pairs(task.train):
        a, b = (int(x) for x in re.findall(r"\d+", prompt)[:2])
        expected = a + b if "buys" in prompt else a - b
        assert int(answer) == expected >= 0, prompt
    assert task.test.prompts == load_gen_task("arithmetic", 50, 5, 60).test.prompts
    assert not set(task.test.prompts) & set(task.train.prompts)


def test_bbc_topic_answers_are_topics_and_unknown_task_is_refused():
    task = load_gen_task("bbc_topic", 50, 10, 40)
    assert {a.strip() for a in task.test.answers} <= set(BBC_TOPICS)
    assert all(p.endswith("\nTopic:") for p in task.test.prompts)
    assert set(LLM_TASKS) == {"antonym", "arithmetic", "bbc_topic"}
    with pytest.raises(MergeShieldError, match="unknown LLM task"):
        load_gen_task("wordnet_noun", 10, 10, 10)


def test_teacher_forced_exact_match_equals_greedy_generation(tmp_path):
    """Rows of different lengths (right-padded): the reference is the model's own greedy
    continuation for even rows (a match) and has its second token changed for odd rows."""
    model, _ = build("llama-gqa2", tmp_path / "m", seed=3)
    gen = torch.Generator().manual_seed(0)
    rows, labels = [], []
    for i in range(8):
        prompt = torch.randint(3, 100, (4 + i % 3,), generator=gen)
        with torch.no_grad():
            out = model.generate(
                prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=3, do_sample=False, pad_token_id=0,
            )[0, len(prompt) :]  # fmt: skip
        answer = out.clone()
        if i % 2:
            answer[1] = (answer[1] + 1) % model.config.vocab_size
        rows.append(torch.cat([prompt, answer]))
        labels.append(torch.cat([torch.full((len(prompt),), IGNORE), answer]))
    width = max(len(r) for r in rows)
    data = {
        "input_ids": torch.zeros(8, width, dtype=torch.long),
        "attention_mask": torch.zeros(8, width, dtype=torch.long),
        "labels": torch.full((8, width), IGNORE),
    }
    for i, (r, lab) in enumerate(zip(rows, labels, strict=True)):
        data["input_ids"][i, : len(r)] = r
        data["attention_mask"][i, : len(r)] = 1
        data["labels"][i, : len(r)] = lab
    assert exact_match(model, data, batch=3) == 0.5

    class AllLogits(torch.nn.Module):
        """A causal LM without ``logits_to_keep``: every position's logits are computed."""

        def __init__(self, lm: torch.nn.Module) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask):  # noqa: ANN001, ANN201
            return self.lm(input_ids=input_ids, attention_mask=attention_mask)

    for batch in (1, 3, 8):  # rows whose answers sit at other positions share a batch
        assert exact_match(model, data, batch=batch) == 0.5, batch
        assert exact_match(AllLogits(model), data, batch=batch) == 0.5, batch


def test_llm_audit_files_load_without_building():
    from mergeshield.evaluation.audit_file import builtin_file, load_audit_file

    for name in ("llm-small", "llm-full", "demo-llm"):
        audit = load_audit_file(builtin_file(name))
        assert audit.builtin and audit.plan.kind == "llm", name
    demo = load_audit_file(builtin_file("demo-llm")).plan
    assert (demo.victim, demo.free_riders) == ("antonym", ("arithmetic",))
