"""A built family of fine-tunes of one base: where its models are and how well they score.

Built and cached by :mod:`mergeshield.evaluation.zoo`; read by the accuracy, audit and
frontier modules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeshield.errors import MergeShieldError


@dataclass
class Family:
    """A built family: absolute paths, label names and test accuracies per task.

    ``finetuned_accuracy[t]``: test accuracy of the fine-tuned model of task ``t``.
    ``base_accuracy[t]``: test accuracy of the *base* backbone combined with task ``t``'s
    fine-tuned classification head (the floor a merged backbone is compared against).
    """

    kind: str
    setting: str
    root: Path
    base: Path
    tasks: dict[str, Path]
    labels: dict[str, list[str]]
    base_accuracy: dict[str, float]
    finetuned_accuracy: dict[str, float]
    build_seconds: float = 0.0
    reused: bool = False
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, root: Path) -> Family:
        """The family whose ``manifest.json`` is in ``root``."""
        path = Path(root) / "manifest.json"
        if not path.is_file():
            raise MergeShieldError(f"no family manifest at {path}: build it with build_family()")
        m = json.loads(path.read_text())
        root = path.parent.resolve()
        return cls(
            kind=m["kind"],
            setting=m["setting"],
            root=root,
            base=root / m["base"],
            tasks={t: root / e["path"] for t, e in m["tasks"].items()},
            labels={t: e["labels"] for t, e in m["tasks"].items()},
            base_accuracy={t: e["base_accuracy"] for t, e in m["tasks"].items()},
            finetuned_accuracy={t: e["finetuned_accuracy"] for t, e in m["tasks"].items()},
            build_seconds=m["build_seconds"],
            reused=True,
            manifest=m,
        )
