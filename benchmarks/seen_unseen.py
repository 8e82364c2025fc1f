"""Does a hardened release fail under task vectors it never saw? (issue 19, MiniLM)

The merge-aware term trains the release ``theta_r`` to fail at ``theta_r + c tau_p`` for its
proxies ``p``.  A free-rider's task arithmetic after Procrustes adds its own ``tau_f``, which
the hardening never saw.  For a frontier build of the small or full MiniLM family (a folder
``.../builds/CANDIDATE`` that ``random_label_proxies.py`` or ``mergeshield frontier`` wrote),
this aligns the protected release with Procrustes (as the frontier's attack does) and measures,
for every task vector ``tau`` of the family's other tasks and of ``--extra`` models (e.g. the
random-label proxies), the victim's test accuracy of ``theta_aligned + c tau`` (its share of
the gain kept) for ``c`` in ``--coefficients``, whether ``tau`` was one of the hardening's
proxies (the build record), and the cosine of ``tau`` with the release's own task vector and
with the nearest proxy (the build's ``hardened`` model gives the release's own).

    python benchmarks/seen_unseen.py /tmp/rlp0/builds/trap2+merge+arf_all \
        --extra /tmp/rlp6/proxies/random?
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mergeshield.attacks import attack
from mergeshield.evaluation.accuracy import Scorer, backbone_tensors
from mergeshield.evaluation.frontier import BUILD_RECORD
from mergeshield.evaluation.zoo import build_family
from mergeshield.folders import scratch
from mergeshield.merging import extract_backbone
from mergeshield.objective import kept

Tensors = dict[str, torch.Tensor]


def task_vector(folder: Path, base: Path, base_t: Tensors, work: Path) -> Tensors:
    """``theta - theta_0`` of a model's backbone (floating tensors only)."""
    theta = backbone_tensors(extract_backbone(folder, base, work / folder.name))
    return {k: theta[k] - v for k, v in base_t.items() if v.is_floating_point()}


def cosine(a: Tensors, b: Tensors) -> float:
    """Cosine of two task vectors, flattened (float64)."""
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in a)
    norm = (sum(float(a[k].double().square().sum()) for k in a) ** 0.5) * (
        sum(float(b[k].double().square().sum()) for k in b) ** 0.5
    )
    return dot / max(norm, 1e-30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build", type=Path, help="a frontier build folder (holds frontier_build.json)")
    ap.add_argument("--setting", choices=["small", "full"], default="small")
    ap.add_argument("--defense", default="all")
    ap.add_argument("--extra", nargs="*", type=Path, default=[], help="more fine-tunes of the base")
    ap.add_argument("--coefficients", nargs="+", type=float, default=[0.1, 0.3, 0.5, 1.0])
    args = ap.parse_args()

    record = json.loads((args.build / BUILD_RECORD).read_text())
    seen = {str(Path(p).resolve()) for p in record["harden_kwargs"].get("proxies", [])}
    seen |= set(record["proxies"])
    family = build_family("text", args.setting, progress=False)
    victim = next(t for t, f in family.tasks.items() if str(Path(f).resolve()) == record["victim"])
    released = args.build / f"protected-{args.defense}"
    models = {t: Path(f) for t, f in family.tasks.items() if t != victim}
    models |= {p.name: p for p in args.extra}
    base_t = backbone_tensors(family.base)
    score = Scorer(family, victim, released)
    base_acc, ft_acc = family.base_accuracy[victim], family.finetuned_accuracy[victim]
    with scratch("seen-unseen") as work:
        aligned = attack(released, family.base, work / "aligned", "procrustes")
        theta = backbone_tensors(extract_backbone(aligned, family.base, work / "theta"))
        # the release's own task vector: the hardened model's (what the aligned one computes)
        own = task_vector(args.build / "hardened", family.base, base_t, work)
        vectors = {n: task_vector(f, family.base, base_t, work / "v") for n, f in models.items()}
        print(
            f"victim {victim}: aligned release {score(theta, 'test'):.3f} (fine-tune "
            f"{ft_acc:.3f}, base {base_acc:.3f})"
        )
        print(
            "vector | proxy of the hardening | cos(own) | cos(nearest proxy) | "
            + " | ".join(f"c={c:g}" for c in args.coefficients)
        )
        for name, folder in models.items():
            near = [
                cosine(vectors[name], v)
                for n, v in vectors.items()
                if n != name and str(models[n].resolve()) in seen
            ]
            cells = []
            for c in args.coefficients:
                merged = theta | {k: theta[k] + c * t for k, t in vectors[name].items()}
                acc = score(merged, "test")
                cells.append(f"{acc:.3f} ({kept(acc, base_acc, ft_acc):.0%})")
            print(
                f"{name} | {'yes' if str(folder.resolve()) in seen else 'no'} | "
                f"{cosine(vectors[name], own):.3f} | {max(near, default=float('nan')):.3f} | "
                + " | ".join(cells)
            )


if __name__ == "__main__":
    main()
