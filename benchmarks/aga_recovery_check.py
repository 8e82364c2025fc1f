"""Does the hardening's differentiable AGA predict the real attack? (issue 19, SmolLM2)

``harden``'s ``arf`` and ``amerge`` terms train against :func:`aga_recovery`, a per-head ridge
fit of the release onto the base applied to the *unprotected* parameters; a free-rider runs
the real AGA (``attack(..., "aga")``) on the *protected* release.  Session 16 found the
hardening's effect on the merges of the recovered release does not carry over to the real
AGA's merges on SmolLM2.  This compares the two recoveries' task vectors, per role, for the
LLM family's victim as released and hardened (``--harden``, like the frontier's candidate
``METHOD/all`` with its proxies: the family's second task):

    ||tau_proxy - tau_real|| / ||tau_real||,   ||tau_real - tau|| / ||tau||,
    ||tau_proxy - tau|| / ||tau||

(``tau`` the release's own task vector before protection).  Builds are cached under
``~/.cache/mergeshield/aga-check``.

    python benchmarks/aga_recovery_check.py [--harden merge+arf --steps 40 --lr 5e-5]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from mergeshield.architectures.families import describe
from mergeshield.attacks import attack
from mergeshield.evaluation import zoo
from mergeshield.evaluation.frontier import Candidate, FrontierPlan, build_candidate
from mergeshield.folders import load_tensors
from mergeshield.hardening.components import aga_recovery, attention_specs


def roles(config, names: list[str]) -> dict[str, str]:
    """Tensor name -> ``q``, ``k``, ``v``, ``o`` or ``mlp``, from the architecture spec."""
    out = {}
    for block in describe(config, names).blocks:
        out |= {slot.weight: role for role, slot in block.attention.slots().items()}
        out |= {s.weight: "mlp" for mlp in block.mlps() for s in mlp.slots().values()}
    return out


def compare(release: Path, protected: Path, base: Path, work: Path) -> dict[str, dict]:
    """Per role the three relative distances of the module docstring."""
    from transformers import AutoConfig

    aligned = work / "aligned-aga"
    if not (aligned / "config.json").is_file():
        attack(protected, base, aligned, "aga")
    b, r, a = load_tensors(base), load_tensors(release), load_tensors(aligned)
    b = {n: v.float() for n, v in b.items()}
    r = {n: v.float() for n, v in r.items() if n in b}
    a = {n: v.float() for n, v in a.items() if n in b}
    config = AutoConfig.from_pretrained(release)
    proxy = aga_recovery(r, b, {n: n for n in r}, attention_specs(config, list(b)))
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for n, part in roles(config, list(b)).items():
        tau, real, prox = r[n] - b[n], a[n] - b[n], proxy[n] - b[n]
        s = sums[part]
        s["tau"] += float(tau.square().sum())
        s["real"] += float(real.square().sum())
        s["proxy-real"] += float((prox - real).square().sum())
        s["real-tau"] += float((real - tau).square().sum())
        s["proxy-tau"] += float((prox - tau).square().sum())
    out = {}
    for part, s in sums.items():
        out[part] = {
            "proxy vs real": (s["proxy-real"] / max(s["real"], 1e-30)) ** 0.5,
            "real vs tau": (s["real-tau"] / max(s["tau"], 1e-30)) ** 0.5,
            "proxy vs tau": (s["proxy-tau"] / max(s["tau"], 1e-30)) ** 0.5,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harden", default="merge+arf", help="'' for the release as built")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    family = zoo.build_family("llm", "small", progress=False)
    tasks = list(family.tasks)
    plan = FrontierPlan(victim=tasks[0], proxies=(tasks[1],), seed=args.seed)
    root = zoo.default_cache_dir() / "aga-check" / family.root.name
    results = {}
    for label, method in (("as built", None), (f"hardened {args.harden}", args.harden)):
        if method == "":
            continue
        kwargs = {"steps": args.steps, "lr": args.lr} if method else {}
        name = f"{method}-{args.steps}-{args.lr}" if method else "as-built"
        cand = Candidate(name, harden=method, harden_kwargs=kwargs, defense="all")
        folder = root / name
        start = time.perf_counter()
        protected = build_candidate(cand, family, plan, folder, progress=False)
        release = folder / "hardened" if method else family.tasks[plan.victim]
        results[label] = compare(release, protected, family.base, folder)
        print(f"{label} ({time.perf_counter() - start:.0f} s):", flush=True)
        for part, row in results[label].items():
            cells = ", ".join(f"{k} {v:.3f}" for k, v in row.items())
            print(f"  {part}: {cells}", flush=True)
    (root / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
