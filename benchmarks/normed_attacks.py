"""The alignment attacks against ``all`` on families with per-head q/k norms.

For the tiny Qwen3, Gemma 3 and Qwen3-MoE models of ``tests/tiny_models.py`` (a random base,
the "fine-tune" its base plus an update of 3% of every tensor's norm, as in
``tests/test_attacks.py``), protected with ``all`` and attacked: the attacked model's relative
output error against the fine-tune (next to the base's own) and its relative weight distance
to the fine-tune over the block tensors (next to the base's and the protected copy's).

    PYTHONPATH=src:. python benchmarks/normed_attacks.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from mergeshield.attacks import attack
from tests.test_attacks import Family, distance, load_tensors, relative


def main() -> None:
    for name in ("qwen3-gqa2", "gemma3", "qwen3_moe"):
        with tempfile.TemporaryDirectory() as tmp:
            fam = Family(name, Path(tmp))
            prot = fam.protected("all")
            e_base = relative(fam.run_tensors(fam.base_t), fam.ft_out)
            d_prot = distance(load_tensors(prot), fam.ft_t, fam.names)
            for method in ("aga", "procrustes", "rebasin"):
                out = attack(prot, fam.base, Path(tmp) / method, method)
                e = relative(fam.run(out), fam.ft_out)
                d = distance(load_tensors(out), fam.ft_t, fam.names)
                print(
                    f"{name} {method}: output error {e:.4f} (base {e_base:.4f}); weight "
                    f"distance {d:.4f} (base {fam.d_base:.4f}, protected {d_prot:.3f})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
