"""The shape of the no-null mode on the LLM family, in memory (issue 18, session 14).

    python benchmarks/detect_shape.py --seeds 1 2 3 4 [--nulls-only] --out shape.json

For the small SmolLM2 family (victim antonym): the owner's task vector ``o`` per trained
matrix, its residual ``r`` and shared part ``t`` (:func:`mergeshield.detect.references`); for
each model ``Z_res`` and ``Z_shared`` (:func:`mergeshield.detect.view_score` of the per-matrix
``z`` against ``r`` and ``t``, raw view, the 105 matrices the experts train), the effects
``E = sqrt(Z / Z_self)`` and the shape ``E_res / E_shared``.  Models: the release,
same-task fine-tunes with the victim's recipe and seeds ``--seeds`` (cached beside the
detection study's, ``benchmarks/detect.py``), and unless ``--nulls-only`` the other experts,
merges of the release by every method (two-model and all-task) and merges without it.  The
whole detection study with the LLM family (``benchmarks/detect.py --kind llm``) needs 21
minutes of building and 19 GB; this measures the shape alone in about 7 minutes of one core.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from detect import same_task_model

from mergeshield.detect import references, tensor_z, view_score
from mergeshield.evaluation.zoo import build_family, default_cache_dir
from mergeshield.folders import load_tensors
from mergeshield.merging.kernels import merge_tensors

MERGES = {
    "task_arithmetic": (0.2, 1.0),
    "ties": (0.4, 1.0),
    "dare_ties": (0.6,),
    "dare_linear": (0.6,),
    "breadcrumbs": (0.6,),
    "della": (1.0,),
    "linear": (0.6,),
    "model_stock": (1.0,),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--nulls-only", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    family = build_family("llm", "small", progress=False)
    work = default_cache_dir() / "detect-bench" / f"{family.root.name}-shape"
    base = load_tensors(family.base)
    victim, arith, topic = (load_tensors(family.tasks[t]) for t in family.tasks)
    names = [n for n, b in base.items() if b.dim() == 2 and not torch.equal(victim[n], b)]
    refs = {n: references(victim[n].float() - base[n].float(), base[n].float()) for n in names}

    def scores(model: dict[str, torch.Tensor]) -> tuple[float, float]:
        z_res, z_shared = [], []
        for n in names:
            s = model[n].float() - base[n].float()
            z_res.append(tensor_z(s, refs[n][0]))
            z_shared.append(tensor_z(s, refs[n][1]))
        return view_score(z_res), view_score(z_shared)

    self_res, self_shared = scores(victim)
    rows = []

    def report(name: str, model: dict[str, torch.Tensor]) -> None:
        z_res, z_shared = scores(model)
        e_res = math.sqrt(max(z_res, 0.0) / self_res)
        e_shared = math.sqrt(max(z_shared, 0.0) / self_shared)
        shape = e_res / e_shared if e_shared > 0 else 0.0
        rows.append(dict(model=name, Z_res=z_res, Z_shared=z_shared, E_res=e_res,
                         E_shared=e_shared, shape=shape))  # fmt: skip
        print(f"{name:42s} E {e_res:.3f} E_shared {e_shared:.3f} shape {shape:.3f}", flush=True)
        args.out.write_text(json.dumps(rows, indent=1))

    same = {s: same_task_model(family, "antonym", s, work / f"antonym-seed{s}") for s in args.seeds}
    for seed, folder in same.items():
        report(f"null: antonym seed {seed}", load_tensors(folder))
    if args.nulls_only:
        return
    report("release", victim)
    report("null: arithmetic", arith)
    report("null: bbc_topic", topic)
    for method, coefficients in MERGES.items():
        for c in coefficients:
            two = merge_tensors(method, base, [victim, arith], coefficient=c)
            report(f"release: {method} {c} two-model", two)
            every = merge_tensors(method, base, [victim, arith, topic], coefficient=c)
            report(f"release: {method} {c} all-task", every)
    for t in (0.2, 0.6):  # slerp(arithmetic, victim; t): t is the victim's weight
        merged = merge_tensors("slerp", base, [arith, victim], coefficient=t)
        report(f"release: slerp t={t}", merged)
    other = load_tensors(same[args.seeds[0]])
    for method in ("task_arithmetic", "ties", "della"):
        merged = merge_tensors(method, base, [other, arith, topic], coefficient=1.0)
        report(f"null: {method} 1.0 same-task seed + others", merged)
    merged = merge_tensors("slerp", base, [arith, other], coefficient=0.5)
    report("null: slerp 0.5 same-task seed + arithmetic", merged)


if __name__ == "__main__":
    main()
