"""Generative tasks for a causal LM family (SmolLM2-135M), scored by exact match of the greedy
answer.  All data are real and offline, or generated here from a fixed seed:

- ``antonym``: WordNet 3.0 adjective antonym pairs (``data.adj``, pointer ``!``, single words):
  ``"The opposite of hot is"`` -> ``" cold"``.  Pairs are split by *unordered* pair, so the
  reverse of a test pair is never in train.
- ``arithmetic``: word problems generated in code (names x objects x add/subtract templates,
  operands 2..30 and 1..12, results >= 0): ``"Ann has 12 apples and buys 7 more. How many
  apples does Ann have now?"`` -> ``" 19"``; splits hold disjoint operand pairs.
- ``bbc_topic``: the topic of a BBC News article (first :data:`BBC_PROMPT_CHARS` characters) as
  a generated word (tech, business, politics, sport, entertainment).

Each example is ``prompt + answer + eos``.  The model is trained with the loss on the answer
and eos tokens only.  Exact match of the greedy answer is computed from one teacher-forced
forward pass: greedy decoding emits exactly ``answer + eos`` iff, at every answer position
``t``, ``argmax logits[t-1]`` is the answer token ``t`` (each greedy step conditions on the
same prefix as the teacher-forced pass).  Ties in the argmax count as torch's ``argmax`` picks.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mergeshield.errors import MergeShieldError
from mergeshield.hardening.data import IGNORE, encode_prompt_answers
from mergeshield.modeling import Tensors, share_correct
from mergeshield.tasks import WORDNET_DIR, Splits, _bbc

LLM_TASKS: tuple[str, ...] = ("antonym", "arithmetic", "bbc_topic")
BBC_PROMPT_CHARS = 120
NAMES = ("Ann", "Ben", "Carla", "Dev", "Eva", "Femi", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lea")
OBJECTS = ("apples", "books", "coins", "pens", "stamps", "cards", "shells", "marbles")


@dataclass
class GenSplit:
    """Prompts and their reference answers (the answer starts with its leading space)."""

    prompts: list[str]
    answers: list[str]

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class GenTask(Splits):
    """A generative task with fixed train/val/test splits."""

    name: str
    train: GenSplit
    val: GenSplit
    test: GenSplit


def load_gen_task(name: str, n_train: int, n_val: int, n_test: int, seed: int = 0) -> GenTask:
    """Task ``name`` with (at most) the requested split sizes; test is drawn first, so it does
    not depend on ``n_train``/``n_val``."""
    if name not in LLM_TASKS:
        raise MergeShieldError(f"unknown LLM task {name!r}; known: {', '.join(LLM_TASKS)}")
    groups = _source(name)
    order = np.random.default_rng(seed).permutation(len(groups))
    splits: list[GenSplit] = []
    start = 0
    for n in (n_test, n_val, n_train):
        prompts: list[str] = []
        answers: list[str] = []
        while start < len(order) and len(prompts) < n:
            for prompt, answer in groups[order[start]]:
                prompts.append(prompt)
                answers.append(answer)
            start += 1
        splits.append(GenSplit(prompts[:n], answers[:n]))
    test, val, train = splits
    return GenTask(name, train, val, test)


@functools.lru_cache(maxsize=4)
def _source(name: str) -> list[list[tuple[str, str]]]:
    """Groups of (prompt, answer) examples; a group never spans two splits."""
    if name == "antonym":
        return _antonyms()
    if name == "arithmetic":
        return _arithmetic()
    texts, y, labels = _bbc()
    return [
        [(f"Article: {t[:BBC_PROMPT_CHARS]}\nTopic:", f" {labels[c]}")]
        for t, c in zip(texts, y, strict=True)
    ]


def _antonyms() -> list[list[tuple[str, str]]]:
    """WordNet adjective antonym pairs of single lower-case words, both directions per group."""
    path = WORDNET_DIR / "data.adj"
    if not path.is_file():
        raise MergeShieldError(f"WordNet not found at {path}: apt-get install wordnet-base")
    words: dict[str, list[str]] = {}
    pointers: list[tuple[str, int, str, int]] = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):
                continue
            fields = line.split("|", 1)[0].split()
            offset, n_words = fields[0], int(fields[3], 16)
            words[offset] = [fields[4 + 2 * i].split("(")[0] for i in range(n_words)]
            at = 4 + 2 * n_words
            for p in range(int(fields[at])):
                symbol, target, _, st = fields[at + 1 + 4 * p : at + 5 + 4 * p]
                if symbol == "!":
                    pointers.append((offset, int(st[:2], 16), target, int(st[2:], 16)))
    pairs: set[tuple[str, str]] = set()
    for src, i, dst, j in pointers:
        a, b = words[src][i - 1], words[dst][j - 1]
        if a.isalpha() and b.isalpha() and a.islower() and b.islower() and a != b:
            pairs.add((min(a, b), max(a, b)))
    first: dict[str, str] = {}
    for a, b in sorted(pairs):  # one antonym per word, so every prompt has one answer
        first.setdefault(a, b)
        first.setdefault(b, a)
    groups = []
    for a, b in sorted(pairs):
        group = [(f"The opposite of {x} is", f" {y}") for x, y in ((a, b), (b, a)) if first[x] == y]
        if group:
            groups.append(group)
    return groups


def _arithmetic() -> list[list[tuple[str, str]]]:
    """Add/subtract word problems; one group per operand pair ``(a, b)``, ``a`` in 2..30 and
    ``b`` in 1..12, holding the addition and (when ``a >= b``) the subtraction."""
    rng = np.random.default_rng(1234)
    groups = []
    for a in range(2, 31):
        for b in range(1, 13):
            group = []
            for verb, result in ((f"buys {b} more", a + b), (f"gives away {b}", a - b)):
                name, obj = NAMES[rng.integers(len(NAMES))], OBJECTS[rng.integers(len(OBJECTS))]
                if result >= 0:
                    text = f"{name} has {a} {obj} and {verb}. How many {obj} does {name} have now?"
                    group.append((text, f" {result}"))
            groups.append(group)
    return groups


def encode(split: GenSplit, tokenizer: Any, max_len: int) -> dict[str, torch.Tensor]:
    """:func:`mergeshield.hardening.data.encode_prompt_answers` of ``split``: ``prompt +
    answer + eos``, ``labels`` on the answer and eos only."""
    return encode_prompt_answers(split.prompts, split.answers, tokenizer, max_len)


def exact_match(model: torch.nn.Module, data: dict[str, torch.Tensor], batch: int = 64) -> float:
    """Share of examples whose greedy answer is exactly the reference (answer then eos), from
    teacher-forced logits (see the module doc).  Only the positions that predict an answer
    token of some row in the batch get logits (``logits_to_keep``, where the model takes it):
    the vocabulary projection is a fifth of SmolLM2's work per token, and the answers are a
    few tokens of each row."""
    keeps = "logits_to_keep" in inspect.signature(model.forward).parameters

    def judge(model: torch.nn.Module, inputs: Tensors, labels: torch.Tensor) -> torch.Tensor:
        target = labels[:, 1:]  # logits at t predict token t + 1
        scored = target != IGNORE
        positions = scored.any(0).nonzero().squeeze(1)
        if keeps:
            logits = model(**inputs, logits_to_keep=positions).logits
        else:
            logits = model(**inputs).logits[:, positions]
        wrong = (logits.argmax(-1) != target[:, positions]) & scored[:, positions]
        return ~wrong.any(1)

    return share_correct(model, data, judge, batch)
