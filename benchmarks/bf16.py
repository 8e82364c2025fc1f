"""SmolLM2-135M in bf16: how much float error each defense adds, against bf16 itself.

The fp32 SmolLM2 folder is the reference.  Compared with its logits on real prompts
(max relative error ``max|y - y_ref| / max|y_ref|``):

- ``bf16 round-trip``: the fp32 weights rounded to bf16 (the unprotected bf16 checkpoint);
- each defense applied to the bf16 checkpoint (``protect`` casts its float64 result to bf16).

Each is evaluated twice: weights computed in fp32 (isolates the weight rounding) and natively
in bf16 (what a user runs).  Also reported: whether 20 greedy tokens of 4 chat prompts equal
the fp32 model's and the unprotected bf16 model's (same compute dtype).

    python benchmarks/bf16.py                       # defaults (max_cond 100)
    python benchmarks/bf16.py --low-precision on    # diagonal x orthogonal dense maps
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeshield.convert import smollm2_checkpoint
from mergeshield.defenses import DEFENSES, DefenseOptions
from mergeshield.protect import protect

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the ocean.",
    "List three primary colors.",
    "Explain what a computer is in simple words.",
]


def logits(model, tokenizer) -> torch.Tensor:
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model(**enc).logits.double()
    return out * enc["attention_mask"][..., None]  # ignore padded positions


def greedy(model, tokenizer) -> list[list[int]]:
    outs = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            enc = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )
            ids = model.generate(**enc, max_new_tokens=20, do_sample=False)
            outs.append(ids[0, enc["input_ids"].shape[1] :].tolist())
    return outs


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).abs().max() / ref.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--defenses", nargs="+", default=sorted(DEFENSES))
    parser.add_argument("--max-cond", type=float, default=None, help="override max_cond")
    parser.add_argument(
        "--low-precision",
        choices=["auto", "on", "off"],
        default="auto",
        help="dense QK/VO maps as diagonal x orthogonal (auto: on for 16-bit weights)",
    )
    args = parser.parse_args()
    fp32 = smollm2_checkpoint(dtype=torch.float32)
    bf16 = smollm2_checkpoint(dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(str(fp32))
    ref_model = AutoModelForCausalLM.from_pretrained(str(fp32), dtype=torch.float32).eval()
    ref, ref_gen = logits(ref_model, tok), greedy(ref_model, tok)
    del ref_model

    def evaluate(folder: Path) -> dict[str, dict]:
        res = {}
        for compute in (torch.float32, torch.bfloat16):
            m = AutoModelForCausalLM.from_pretrained(str(folder), dtype=compute).eval()
            res[str(compute).removeprefix("torch.")] = {
                "logits": logits(m, tok),
                "gen": greedy(m, tok),
            }
        return res

    base = evaluate(bf16)
    for compute, r in base.items():
        print(
            json.dumps(
                {
                    "model": "bf16 round-trip",
                    "compute": compute,
                    "rel_err_vs_fp32": rel(r["logits"], ref),
                    "greedy_eq_fp32": r["gen"] == ref_gen,
                }
            ),
            flush=True,
        )
    kwargs = {}
    if args.max_cond is not None:
        kwargs["max_cond"] = args.max_cond
    if args.low_precision != "auto":
        kwargs["low_precision"] = args.low_precision == "on"
    options = DefenseOptions(**kwargs)
    work = Path(tempfile.mkdtemp(prefix="bf16-bench-"))
    try:
        for defense in args.defenses:
            out = work / defense
            protect(bf16, out, defense, base=bf16, seed=0, options=options)
            res = evaluate(out)
            for compute, r in res.items():
                print(
                    json.dumps(
                        {
                            "model": defense,
                            "compute": compute,
                            "rel_err_vs_fp32": rel(r["logits"], ref),
                            "rel_err_vs_bf16": rel(r["logits"], base[compute]["logits"]),
                            "greedy_eq_fp32": r["gen"] == ref_gen,
                            "greedy_eq_bf16": r["gen"] == base[compute]["gen"],
                            "options": {k: str(v) for k, v in kwargs.items()},
                        }
                    ),
                    flush=True,
                )
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
