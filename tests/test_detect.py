"""mergeshield.detect on a tiny BERT family with known task vectors.

Every fine-tune is ``base + L_task + e_model - wd * base``: ``L_task`` the task's direction
(rank 2 plus a small full-rank part, shared by every fine-tune of that task), ``e_model`` the
model's own noise, ``wd * base`` weight decay (the same direction for every model).  The
victim is task 0 with its own noise; same-task hard negatives are task 0 with other noise.
Merges are real mergekit runs.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from mergeshield.attacks import attack
from mergeshield.attacks.adaptive import perturb_then_align
from mergeshield.cli import main
from mergeshield.detect import (
    E_MIN,
    SHAPE_MIN,
    detect,
    detect_all,
    flip_p,
    null_p,
    residual,
    tensor_z,
    threshold,
)
from mergeshield.errors import MergeShieldError
from mergeshield.folders import load_tensors, save_tensors
from mergeshield.merging import merge
from mergeshield.protect import protect

CONFIG = dict(
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=99,
    max_position_embeddings=32,
)
TASK_SCALE = 0.02  # per entry, against base weights of about 0.2
WEIGHT_DECAY = 0.01


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """torch on one thread: on the shared 2-core VM two threads spin against other jobs
    (measured: these tests 9 s on one thread, 75 s on two at load 4)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _save(tensors: dict[str, torch.Tensor], config: Path, out: Path, prefix: str = "") -> Path:
    out.mkdir(parents=True)
    save_tensors({prefix + k: v.contiguous() for k, v in tensors.items()}, out)
    shutil.copy2(config / "config.json", out / "config.json")
    return out


def _direction(shape: torch.Size, gen: torch.Generator, full_rank: float = 0.2) -> torch.Tensor:
    """A task's direction: rank 2 plus a full-rank part with ``full_rank`` times its norm."""
    if len(shape) < 2:
        return torch.randn(shape, generator=gen)
    cols = math.prod(shape[1:])
    low = torch.randn(shape[0], 2, generator=gen) @ torch.randn(2, cols, generator=gen)
    low = (low / low.norm() * math.prod(shape) ** 0.5).reshape(shape)
    return low + full_rank * torch.randn(shape, generator=gen)


def _fine_tune(
    base: dict[str, torch.Tensor], task: int, noise: int, scale: float = 1.0, full_rank: float = 0.2
):
    """``base + TASK_SCALE (scale L_task + e_noise) - wd base`` for every float tensor."""
    task_gen = torch.Generator().manual_seed(1000 + task)
    noise_gen = torch.Generator().manual_seed(2000 + noise)
    out = {}
    for name, b in sorted(base.items()):
        if not b.is_floating_point():
            out[name] = b
            continue
        d = scale * _direction(b.shape, task_gen, full_rank)
        d = d + torch.randn(b.shape, generator=noise_gen)
        out[name] = b + TASK_SCALE * d - WEIGHT_DECAY * b
    return out


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("detect")
    torch.manual_seed(0)
    model = BertModel(BertConfig(**CONFIG, initializer_range=0.2))
    model.save_pretrained(root / "base")
    base = load_tensors(root / "base")
    paths = {"root": root, "base": root / "base"}
    # the original as a task model (``bert.`` prefix and a head), like the zoo's
    victim = _fine_tune(base, task=0, noise=0)
    victim_task = {"bert." + k: v for k, v in victim.items()}
    victim_task["classifier.weight"] = torch.randn(3, CONFIG["hidden_size"])
    victim_task["classifier.bias"] = torch.zeros(3)
    (root / "original").mkdir()
    save_tensors(victim_task, root / "original")
    config = json.loads((root / "base" / "config.json").read_text())
    config["architectures"] = ["BertForSequenceClassification"]
    (root / "original" / "config.json").write_text(json.dumps(config))
    paths["victim"] = _save(victim, root / "base", root / "victim")
    for task in (1, 2, 3):
        paths[f"task{task}"] = _save(
            _fine_tune(base, task, 10 + task), root / "base", root / f"t{task}"
        )
    for seed in range(1, 7):  # same task, other noise, other strength
        tensors = _fine_tune(base, 0, 100 + seed, scale=0.7 + 0.1 * seed)
        paths[f"same{seed}"] = _save(tensors, root / "base", root / f"same{seed}")
    return paths


def _merge(fam: dict[str, Path], name: str, method: str, models: list[str], c: float) -> Path:
    out = fam["root"] / "merges" / name
    if not out.is_dir():
        merge(method, fam["base"], [fam[m] for m in models], out, coefficient=c)
    return out


POSITIVES = [
    ("task_arithmetic", ["victim", "task1"], 0.2),
    ("task_arithmetic", ["victim", "task1", "task2", "task3"], 1.0),
    ("ties", ["victim", "task1", "task2", "task3"], 1.0),
    ("dare_ties", ["victim", "task1", "task2"], 0.5),
    ("dare_linear", ["victim", "task1"], 0.3),
    ("breadcrumbs", ["victim", "task1", "task2", "task3"], 0.5),
    ("della", ["victim", "task1", "task2"], 1.0),
    ("slerp", ["task1", "victim"], 0.2),  # t = the victim's weight
    ("linear", ["victim", "task1", "task2", "task3"], 1.0),  # all-task average
    ("model_stock", ["victim", "task1", "task2"], 1.0),
]


def test_merges_of_the_victim_are_found(fam) -> None:
    suspects = [_merge(fam, f"{m}-{len(models)}-{c}", m, models, c) for m, models, c in POSITIVES]
    nulls = [fam[f"same{s}"] for s in (1, 2, 3)] + [fam["task1"]]
    for null in ([], nulls):
        results = detect_all(suspects, fam["root"] / "original", fam["base"], null=null)
        missed = [r.suspect for r in results if not r.found]
        assert not missed, (null, [(r.suspect, r.statistic, r.effect) for r in results])
        assert all(r.views["raw"] > 10 for r in results)


def test_protected_then_aligned_pruned_or_noised_is_found(fam) -> None:
    root = fam["root"]
    prot = root / "protected"
    protect(fam["victim"], prot, "all", base=fam["base"], key_out=root / "p.key", seed=3)
    aligned = attack(prot, fam["base"], root / "aligned", "aga")
    pruned = perturb_then_align(prot, fam["base"], root / "pruned", prune=0.5)
    noised = perturb_then_align(prot, fam["base"], root / "noised", noise=0.5)
    fam.update(aligned=aligned, pruned=pruned, noised=noised, protected=prot)
    suspects = [aligned, pruned, noised]
    suspects += [_merge(fam, f"{m}-aligned", "task_arithmetic", [m, "task1"], 0.5) for m in
                 ("aligned", "pruned", "noised")]  # fmt: skip
    results = detect_all(suspects, root / "original", fam["base"])
    assert all(r.found for r in results), [(r.suspect, r.statistic, r.effect) for r in results]
    # merged as published: the owner's key view sees it on its own (here the tensors that
    # `all` leaves in place show it in the other views too)
    as_published = _merge(fam, "protected-ta", "task_arithmetic", ["protected", "task1"], 0.5)
    with_key = detect(as_published, root / "original", fam["base"], key=root / "p.key")
    assert with_key.found and with_key.views["key"] > 10


def test_the_key_view_finds_no_model_without_the_release(fam, tmp_path) -> None:
    """With the owner's key, models that do not contain the release stay not found: the key
    view's reference ``T(theta_original) - b`` holds the frame change ``T(b) - b``, whose part
    along ``-b`` every fine-tune's weight decay and every re-weighted merge (a linear merge's
    weights summing to 1 in floating point: ``x = (1 + eps) b`` where nothing was trained)
    carries; the reference is taken off ``b`` as well as ``T(b)``."""
    key = tmp_path / "p.key"
    protect(fam["victim"], tmp_path / "p", "all", base=fam["base"], key_out=key, seed=7)
    suspects = [fam[f"task{t}"] for t in (1, 2)] + [fam[f"same{s}"] for s in (4, 5)]
    suspects += [
        _merge(fam, "null-linear-key", "linear", ["same4", "task1"], 0.4),
        _merge(fam, "null-ta-key", "task_arithmetic", ["same5", "task3"], 0.5),
    ]
    nulls = [fam[f"same{s}"] for s in (1, 2, 3)] + [fam["task1"]]
    for null in ([], nulls):
        results = detect_all(suspects, fam["root"] / "original", fam["base"], null=null, key=key)
        false = [(r.suspect, r.views, r.effect, r.shape) for r in results if r.found]
        assert not false, null
    in_frame = _merge(fam, "key-ta-in-frame", "task_arithmetic", ["victim", "task1"], 0.5)
    assert detect(in_frame, fam["root"] / "original", fam["base"], key=key).found


def test_alignment_runs_only_off_the_base_frame(fam, tmp_path) -> None:
    """A merge in the base's frame is not aligned (its aligned view is its raw view); the
    protected release itself (units permuted, heads transformed) is, and only aligned is it
    found."""
    in_frame = _merge(fam, "frame-ta", "task_arithmetic", ["victim", "task1"], 0.5)
    prot = tmp_path / "p"
    protect(fam["victim"], prot, "all", base=fam["base"], seed=5)
    suspects = [in_frame, prot, fam["task2"]]
    merged, protected, other = detect_all(suspects, fam["root"] / "original", fam["base"])
    assert merged.views["aligned"] == merged.views["raw"]
    # the same test twice: the sign-flip p-value counts it once (Bonferroni over 1 view)
    tensors = len(other.scores.z["raw"])
    assert other.views["aligned"] == other.views["raw"]
    assert (
        0
        < other.p_flip
        == flip_p(other.statistic, tensors, 1)
        < flip_p(other.statistic, tensors, 2)
    )
    assert protected.p_flip == flip_p(protected.statistic, tensors, 2)
    assert protected.views["aligned"] > 2 * max(protected.views["raw"], 1.0)  # measured 4.2x
    assert protected.found


def test_independent_and_same_task_fine_tunes_are_not_found(fam) -> None:
    suspects = [fam[f"task{t}"] for t in (1, 2, 3)] + [fam[f"same{s}"] for s in (4, 5, 6)]
    suspects += [
        _merge(fam, "null-ties", "ties", ["same4", "task1", "task2"], 1.0),
        _merge(fam, "null-ta", "task_arithmetic", ["same5", "task3"], 0.5),
    ]
    nulls = [fam[f"same{s}"] for s in (1, 2, 3)] + [fam["task1"]]
    for null in ([], nulls):
        results = detect_all(suspects, fam["root"] / "original", fam["base"], null=null)
        false = [(r.suspect, r.statistic, r.p_value) for r in results if r.found]
        assert not false, null
        # with null models the suspect must beat the sign-flip null too
        assert all(r.p_value == max(r.p_flip, r.p_null or 0.0) for r in results)
    same = detect(fam["same4"], fam["root"] / "original", fam["base"])
    assert same.effect < 0.1 and same.scores.signed["raw"] > 3  # shares the task, not the release


def test_shape_refuses_same_task_fine_tunes_above_the_effect_floor(fam, tmp_path) -> None:
    """A task whose direction has a large full-rank part (0.45 of its norm; the task above:
    0.2) puts part of the task into the release's residual, so same-task fine-tunes reach an
    effect above ``E_MIN`` and a tiny sign-flip p, as same-task SmolLM2 fine-tunes do (E
    0.12-0.14): the effect floor alone would call them found.  Their shape ``E / E_shared``
    stays low (they carry the shared part, not the residual in the release's proportion),
    and merges of the release keep the release's proportion: without null models the
    fine-tunes are not found, the merges are (measured: fine-tunes E 0.17-0.20, shape
    0.23-0.27; merges shape 0.62-0.84)."""
    base = load_tensors(fam["base"])
    task = 7

    def model(noise: int, name: str) -> Path:
        tensors = _fine_tune(base, task, noise, full_rank=0.45)
        return _save(tensors, fam["base"], tmp_path / name)

    original = model(0, "original")
    same = [model(500 + seed, f"same{seed}") for seed in (1, 2, 3)]
    merges = []
    for method, others, c in (("task_arithmetic", ["task1"], 1.0), ("ties", ["task1", "task2",
            "task3"], 1.0), ("slerp", ["task1"], 0.2)):  # fmt: skip
        models = [fam[o] for o in others]
        models = [models[0], original] if method == "slerp" else [original, *models]
        merges.append(merge(method, fam["base"], models, tmp_path / method, coefficient=c))
    results = detect_all([*same, *merges], original, fam["base"])
    for r in results[:3]:  # same-task fine-tunes: above the effect floor, refused by the shape
        assert r.p_flip <= r.alpha and r.effect >= E_MIN, (r.effect, r.p_flip)
        assert r.shape < SHAPE_MIN and not r.found, (r.effect, r.shape)
    for r in results[3:]:
        assert r.found and r.shape >= SHAPE_MIN, (r.suspect, r.effect, r.shape)


def test_null_models_cannot_lower_the_bar_below_the_sign_flip_null() -> None:
    """Session 14's ViT: calibration fine-tunes scored tightly at -2.8 to -1.8, so the t
    prediction alone called a null DARE merge at Z = -0.08 found (p_null 0.004); it does not
    beat the sign-flip null (p_flip 0.98), and the threshold with null models is never below
    that null's quantile."""
    nulls = [-2.18, -2.33, -1.88, -1.77, -2.78]
    flip_only = threshold([], tensors=24, views=2, self_statistic=0.0, alpha=0.01)
    assert threshold(nulls, tensors=24, views=2, self_statistic=0.0, alpha=0.01) == flip_only > 0
    assert null_p(-0.08, nulls) < 0.01 < 0.9 < flip_p(-0.08, tensors=24, views=2)


def test_residual_and_z() -> None:
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(64, 80, generator=gen, dtype=torch.float64)
    low = torch.randn(64, 3, generator=gen, dtype=torch.float64) @ torch.randn(
        3, 80, generator=gen, dtype=torch.float64
    )
    noise = 0.1 * torch.randn(64, 80, generator=gen, dtype=torch.float64)
    r = residual(10 * low + noise - 0.5 * b, b, rank=8)
    assert abs(float((r * b).sum())) < 1e-8 * float(b.norm() * r.norm())  # no decay direction
    assert float((r * low).sum()).__abs__() < 0.05 * float(r.norm() * low.norm())  # no low rank
    # z is scale-invariant and about N(0, 1) for unrelated tensors
    s = torch.randn(64, 80, generator=gen, dtype=torch.float64)
    assert tensor_z(3 * s, r) == pytest.approx(tensor_z(s, r))
    zs = [tensor_z(torch.randn(64, 80, generator=gen, dtype=torch.float64), r) for _ in range(300)]
    mean = sum(zs) / len(zs)
    sd = (sum((z - mean) ** 2 for z in zs) / len(zs)) ** 0.5
    assert abs(mean) < 0.2 and 0.85 < sd < 1.15


def test_float32_statistic_matches_float64(fam) -> None:
    """The streaming pass reads and scores in float32: its raw-view ``Z`` equals the same sum
    computed here from the stored tensors in float64, to 1e-4 relative."""
    suspect = _merge(fam, "f64-ta", "task_arithmetic", ["victim", "task1"], 0.6)
    result = detect(suspect, fam["root"] / "original", fam["base"], attack=None)
    b, o, x = (load_tensors(p) for p in (fam["base"], fam["victim"], suspect))
    zs = []
    for name in result.scores.z["raw"]:
        b64 = b[name].double()
        zs.append(tensor_z(x[name].double() - b64, residual(o[name].double() - b64, b64)))
    assert len(zs) > 10
    assert result.scores.signed["raw"] == pytest.approx(sum(zs) / math.sqrt(len(zs)), rel=1e-4)
    expected = (sum(z * z for z in zs) - len(zs)) / math.sqrt(2 * len(zs))
    assert result.views["raw"] == pytest.approx(expected, rel=1e-4)


def test_cli_exit_codes_report_and_bad_inputs(fam, tmp_path, capsys) -> None:
    root, base = fam["root"], str(fam["base"])
    suspect = _merge(fam, "cli-ta", "task_arithmetic", ["victim", "task2"], 0.4)
    args = ["--original", str(root / "original"), "--base", base]
    assert main(["detect", str(suspect), *args, "--out", str(tmp_path / "r")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("release FOUND") and "\n" not in line
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["found"] and report["line"] == line
    assert (tmp_path / "r" / "detect.png").stat().st_size > 1000
    nulls = ["--null", str(fam["same1"]), str(fam["same2"]), str(fam["task1"])]
    assert main(["detect", str(fam["same3"]), *args, *nulls, "--out", str(tmp_path / "n")]) == 1
    assert capsys.readouterr().out.startswith("release not found")

    # bad inputs: one line on stderr, exit 2
    other_size = tmp_path / "wide"
    BertModel(BertConfig(**{**CONFIG, "hidden_size": 64})).save_pretrained(other_size)
    unrelated = tmp_path / "unrelated"
    torch.manual_seed(7)
    BertModel(BertConfig(**CONFIG, initializer_range=0.2)).save_pretrained(unrelated)
    cases = {
        "another size": (["detect", str(suspect), "--original", str(root / "original"),
                          "--base", str(other_size)], "not the same architecture"),
        "not derived": (["detect", str(unrelated), *args], "not derived from base"),
        "missing": (["detect", str(tmp_path / "nope"), *args], "no such folder"),
        "another architecture": (["detect", str(suspect), *args[:2], "--base",
                                  str(_vit(tmp_path))], "not the same architecture"),
    }  # fmt: skip
    capsys.readouterr()  # the progress bars of save_pretrained
    for name, (argv, message) in cases.items():
        assert main([*argv, "--out", str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (name, err)
    with pytest.raises(MergeShieldError, match="alpha"):
        detect(suspect, root / "original", base, alpha=0)


def _vit(tmp_path: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    out = tmp_path / "vit"
    ViTModel(
        ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, image_size=16, patch_size=4)
    ).save_pretrained(out)  # fmt: skip
    return out


@pytest.mark.parametrize(
    "name", ["llama-gqa2", "gpt2", "vit", "qwen2", "t5-v1.1", "mixtral", "qwen2_moe", "gemma3"]
)
def test_other_families(name, tmp_path) -> None:
    """A task-arithmetic mix of the victim is found and another task's model is not, on the
    tiny models of the other families (RoPE and GQA, fused transposed c_attn, ViT, q/k/v
    biases, T5's attention-only cross-attention blocks, MoE experts, q/k norms); the original
    is compared in its own layout; with the key, a mix of the release protected with ``all``
    and re-basin-aligned is found too (the key view's frame matching on every layout)."""
    from tests.tiny_models import build

    build(name, tmp_path / "base")
    base = load_tensors(tmp_path / "base")
    victim, other = _fine_tune(base, 0, 0), _fine_tune(base, 1, 1)
    mix = {k: b + 0.3 * (victim[k] - b) + 0.3 * (other[k] - b) if b.is_floating_point() else b
           for k, b in base.items()}  # fmt: skip
    for label, tensors in (("original", victim), ("other", other), ("mix", mix)):
        _save(tensors, tmp_path / "base", tmp_path / label)
    found, not_found = detect_all(
        [tmp_path / "mix", tmp_path / "other"], tmp_path / "original", tmp_path / "base"
    )
    assert found.found and not not_found.found, (found.line(), not_found.line())
    # with the key: the release protected with `all`, re-basin-aligned, then mixed the same way
    key = tmp_path / "original.key"
    protect(tmp_path / "original", tmp_path / "protected", "all", base=tmp_path / "base",
            key_out=key, seed=1)  # fmt: skip
    aligned = load_tensors(attack(tmp_path / "protected", tmp_path / "base", tmp_path / "rb",
                                  "rebasin"))  # fmt: skip
    mixed = {k: b + 0.6 * (aligned[k] - b) + 0.6 * (other[k] - b) if b.is_floating_point() else b
             for k, b in base.items()}  # fmt: skip
    _save(mixed, tmp_path / "base", tmp_path / "rb-mix")
    found, not_found = detect_all(
        [tmp_path / "rb-mix", tmp_path / "other"], tmp_path / "original", tmp_path / "base",
        key=key,
    )  # fmt: skip
    assert found.found and not not_found.found, (found.line(), not_found.line())


def _llama_family(root: Path, more: dict[str, tuple[int, int, float]]) -> dict[str, Path]:
    """Tiny Llama (RoPE, GQA 2, tied embeddings) and fine-tunes of its upper decoder layer
    only, like the llm family: ``victim``, ``task1``, ``task2`` and ``more`` (label: task,
    noise, scale)."""
    from tests.tiny_models import build

    build("llama-gqa2", root / "base")
    base = load_tensors(root / "base")
    fam = {"root": root, "base": root / "base"}
    models = {"victim": (0, 0, 1.0), "task1": (1, 11, 1.0), "task2": (2, 12, 1.0)} | more
    for label, (task, noise, scale) in models.items():
        tuned = _fine_tune(base, task, noise, scale)
        upper = {k: tuned[k] if k.startswith("model.layers.1.") else b for k, b in base.items()}
        fam[label] = _save(upper, fam["base"], root / label)
    return fam


def test_llama_release_in_a_mergekit_merge(tmp_path) -> None:
    """Tiny Llama (RoPE, GQA 2, tied embeddings) trained like the llm family, only its upper
    decoder layer: the release is found in a mergekit TIES merge with two other experts and,
    protected then aligned by aga, in a task-arithmetic merge; it is not found in the same
    TIES merge with a same-task fine-tune in its place, with or without null models."""
    same = {f"same{s}": (0, 100 + s, 0.7 + 0.1 * s) for s in (1, 2, 3, 4)}
    fam = _llama_family(tmp_path, same)
    protect(fam["victim"], tmp_path / "protected", "all", base=fam["base"], seed=2)
    fam["aligned"] = attack(tmp_path / "protected", fam["base"], tmp_path / "aligned", "aga")
    suspects = [
        _merge(fam, "ties", "ties", ["victim", "task1", "task2"], 1.0),
        _merge(fam, "aligned-ta", "task_arithmetic", ["aligned", "task1"], 0.5),
        _merge(fam, "null-ties", "ties", ["same4", "task1", "task2"], 1.0),
    ]
    nulls = [fam["same1"], fam["same2"], fam["same3"], fam["task1"]]
    for null in ([], nulls):
        found, aligned, without = detect_all(suspects, fam["victim"], fam["base"], null=null)
        assert found.found and aligned.found, (found.line(), aligned.line())
        assert not without.found, without.line()
        assert found.statistic > 4 * max(without.statistic, 1.0)


def test_the_key_view_follows_a_release_merged_in_a_frame_of_its_own(tmp_path) -> None:
    """Tiny Llama, release protected with ``all`` (head maps, unit permutations and signs):
    re-basin undoes only its permutations, so a merge of it mixes the key's head maps and
    unit signs with the base's frame, and TIES keeps some of its entries whole and drops
    others; the key view finds both merges and TIES of the release as published (permuting
    the owner's frame onto the suspect's, removing the frame change entry by entry).  Another
    owner's release (a same-task fine-tune, protected with its own key) merged the same ways
    is not found with this owner's key."""
    fam = _llama_family(tmp_path, {"same": (0, 105, 1.0)})
    key = tmp_path / "victim.key"
    protect(fam["victim"], tmp_path / "protected", "all", base=fam["base"], key_out=key, seed=4)
    protect(fam["same"], tmp_path / "other", "all", base=fam["base"], seed=5)
    for release in ("protected", "other"):
        fam[release] = tmp_path / release
        fam[f"{release}-rb"] = attack(
            fam[release], fam["base"], tmp_path / f"{release}-rb", "rebasin"
        )
    merges = {
        f"{release}-{kind}": _merge(fam, f"{release}-{kind}", method, [model, *partners], c)
        for release in ("protected", "other")
        for kind, method, model, partners, c in (
            ("rb-ta", "task_arithmetic", f"{release}-rb", ["task1"], 0.6),
            ("rb-ties", "ties", f"{release}-rb", ["task1", "task2"], 1.0),
            ("ties", "ties", release, ["task1", "task2"], 1.0),
        )
    }
    names = list(merges)
    found = detect_all(list(merges.values()), fam["victim"], fam["base"], key=key)
    results = dict(zip(names, found, strict=True))
    for name, result in results.items():
        if name.startswith("protected"):
            # before the key view followed the frame: the re-basin TIES merge at key Z -0.1
            # (now 4.9; TIES as published 5.1, re-basin task arithmetic 112)
            assert result.found and result.views["key"] > 3, (name, result.line(), result.views)
        else:
            assert not result.found and result.views["key"] < 3, (name, result.line(), result.views)
