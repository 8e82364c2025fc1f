"""PaRaMS MLP mismatching at scale: exact Hungarian vs greedy vs random permutation.

For a gated MLP of width ``n`` and hidden size ``h``, each unit is the vector
``[up row, gate row, down column]`` (``3h`` numbers).  The base model's units are
``N(0, 0.02^2)``; the protected model is a "fine-tune": its units are the base's plus 20%
noise.  PaRaMS picks the permutation ``P`` maximizing ``||theta_base - P theta||``, i.e.
minimizing ``sum_i C[i, perm[i]]`` with ``C = U_base U^T`` (Hungarian, ``O(n^3)``).

Reported per width: the time of the cost matrix and of each solver, and where each lands
from the base, as ``||U_base - U[perm]|| / ||U_base||`` (identity: ~0.2, the fine-tune
itself; random: ~sqrt(2 + 0.04) = 1.43; exact: the maximum).

    python benchmarks/assignment.py --widths 1024 2048 4096 --hidden 2048
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from mergeshield.defenses.base import greedy_assignment, mismatch_cost


def distance(base: torch.Tensor, units: torch.Tensor, perm: np.ndarray) -> float:
    return ((base - units[torch.as_tensor(perm)]).norm() / base.norm()).item()


def run(width: int, hidden: int, exact: bool, seed: int = 0) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    base = 0.02 * torch.randn(width, 3 * hidden, generator=g, dtype=torch.float64)
    units = base + 0.2 * 0.02 * torch.randn(width, 3 * hidden, generator=g, dtype=torch.float64)
    row: dict[str, float] = {"width": width, "hidden": hidden}
    t = time.perf_counter()
    cost = mismatch_cost(base, units).numpy()
    row["cost_s"] = time.perf_counter() - t
    row["identity"] = distance(base, units, np.arange(width))
    row["random"] = distance(base, units, np.random.default_rng(seed).permutation(width))
    t = time.perf_counter()
    perm = greedy_assignment(cost)
    row["greedy_s"] = time.perf_counter() - t
    row["greedy"] = distance(base, units, perm)
    if exact:
        t = time.perf_counter()
        _, perm = linear_sum_assignment(cost)
        row["exact_s"] = time.perf_counter() - t
        row["exact"] = distance(base, units, perm)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--hidden", type=int, default=2048, help="model hidden size")
    parser.add_argument(
        "--exact-max", type=int, default=4096, help="skip the exact solver above this width"
    )
    args = parser.parse_args()
    for width in args.widths:
        print(json.dumps(run(width, args.hidden, width <= args.exact_max)), flush=True)


if __name__ == "__main__":
    main()
