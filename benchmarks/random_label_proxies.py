"""Do owner-made proxies close the Procrustes insertion? (issue 19, MiniLM)

What stops every hardened candidate on MiniLM and SmolLM2 is task arithmetic's insertion of
0.3 of an *unseen* free-rider's task vector into the Procrustes-aligned release; with the
free-rider itself as the merge-aware term's proxy (an oracle) that merge fails.  An owner
without other fine-tunes can still make proxies: fine-tune the public base on their own
training text with random labels (``--random K`` such models, 4 labels each, the zoo's recipe,
seeds 0..K-1; labels drawn with ``numpy`` seed ``100 + i``).  This hardens the victim with the
family's other tasks as proxies (``--proxies``) plus those K, protects it with ``all``, and
runs the frontier's task-arithmetic attack after Procrustes and re-basin (two-model merges
with ``--free-rider``; nothing of the free-rider is used to harden).

    python benchmarks/random_label_proxies.py --random 6 --out /tmp/rlp6
    python benchmarks/random_label_proxies.py --random 0 --out /tmp/rlp0   # the baseline

Writes ``frontier.json``/``frontier.md`` to ``--out`` (the release under ``--out/builds``,
the random-label models under ``--out/proxies``) and prints the best merge and every row.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mergeshield.evaluation.frontier import Candidate, FrontierPlan, run_frontier
from mergeshield.evaluation.zoo import build_family, finetune_classifier
from mergeshield.tasks import load_task


def random_label_proxy(base: Path, texts: list[str], folder: Path, i: int, max_len: int) -> Path:
    """The base fine-tuned on ``texts`` with 4 random labels (numpy seed ``100 + i``)."""
    if (folder / "config.json").is_file():
        return folder
    rng = np.random.default_rng(100 + i)
    data = folder.with_suffix(".jsonl")
    with data.open("w") as f:
        for text in texts:
            f.write(json.dumps({"text": text, "label": f"c{int(rng.integers(4))}"}) + "\n")
    finetune_classifier(base, data, folder, max_len=max_len, seed=i, progress=False)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", choices=["small", "full"], default="small")
    ap.add_argument("--victim", default="wordnet_noun")
    ap.add_argument("--free-rider", default="bbc_news")
    ap.add_argument("--proxies", nargs="*", default=["wordnet_verb", "fortunes"])
    ap.add_argument("--random", type=int, default=6, help="random-label proxies to add")
    ap.add_argument("--candidate", default="trap2+merge+arf")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    family = build_family("text", args.setting, progress=False)
    s = family.manifest["settings"]
    max_len = dict(s.get("max_len_overrides") or ()).get(args.victim, s["max_len"])
    victim = load_task(args.victim, s["n_train"], s["n_val"], s["n_test"], s["seed"])
    (args.out / "proxies").mkdir(parents=True, exist_ok=True)
    proxies = [str(family.tasks[p]) for p in args.proxies]
    start = time.perf_counter()
    for i in range(args.random):
        folder = args.out / "proxies" / f"random{i}"
        proxies.append(
            str(random_label_proxy(family.base, list(victim.train.x), folder, i, max_len))
        )
    made = time.perf_counter() - start
    plan = FrontierPlan(
        victim=args.victim,
        free_riders=(args.free_rider,),
        proxies=tuple(args.proxies),
        methods=("task_arithmetic",),
        grids={"task_arithmetic": FrontierPlan().grids["task_arithmetic"]},
        attacks=("procrustes", "rebasin"),
        finetune=None,
        seed=args.seed,
    )
    kwargs = {"steps": args.steps, "lr": args.lr, "target": "margin", "proxies": tuple(proxies)}
    candidate = Candidate(f"{args.candidate}/all", args.candidate, kwargs, "all")
    (result,) = run_frontier(
        plan, [candidate], args.out, family=family, builds=args.out / "builds", progress=False
    )
    print(
        f"random-label proxies: {args.random} ({made:.0f} s); release and attacks "
        f"{time.perf_counter() - start - made:.0f} s"
    )
    print(
        f"standalone {result.standalone:.3f} (fine-tune {result.finetuned:.3f}, base "
        f"{result.base:.3f})"
    )
    for key, m in result.best.items():
        print(
            f"best {key}: {m.variant}/{m.search}@{m.coefficient:g} test victim "
            f"{m.test_victim:.3f} ({result.kept(m.test_victim):.0%}) free-rider "
            f"{m.test_partners}"
        )
    for r in result.rows:
        print(
            f"  {r.variant:10s} {r.search:9s} c={r.coefficient:<4g} val victim "
            f"{r.val_victim:.3f} free-rider {r.val_partners}"
        )


if __name__ == "__main__":
    main()
