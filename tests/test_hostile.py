"""Hostile folders, wrong keys and careless use (issue 14): one error line and exit 2, or a
correct output; never a write outside the output, a leftover temporary, an unprotected weight
in the output or a lost key."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from mergeshield.cli import main
from mergeshield.errors import MergeShieldError
from mergeshield.folders import exclusive
from mergeshield.protect import KEY_ID, _content_hash, load_key, protect, unprotect
from tests.test_bad_input import (
    assert_nothing_written,
    broken_copy,
    edit_config,
    hashes,
    one_error_line,
    run_fails,
)
from tests.tiny_models import build, build_sharded

INDEX = "model.safetensors.index.json"
# the module (``mergeshield.protect`` the attribute is the function)
protect_module = importlib.import_module("mergeshield.protect")


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bert") / "bert"
    build("bert-seqcls", folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama") / "llama"
    build("llama-gqa2", folder)
    return folder


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return build_sharded("llama-gqa2", tmp_path_factory.mktemp("sharded") / "model")


@pytest.fixture(scope="module")
def protected(llama, tmp_path_factory) -> tuple[Path, Path]:
    """``llama`` protected, with its key."""
    root = tmp_path_factory.mktemp("protected")
    protect(llama, root / "p", "all", seed=3, key_out=root / "k.key")
    return root / "p", root / "k.key"


def with_index(bert: Path, tmp_path: Path, weight_map: object) -> Path:
    """A copy of ``bert`` whose weights are listed in an index (``weight_map`` as given)."""
    bad = broken_copy(bert, tmp_path)
    (bad / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return bad


# ---------------------------------------------------------------- 1. writes outside the output


@pytest.mark.parametrize("shard", ["ABSOLUTE", "../outside.safetensors", "sub/x.safetensors"])
def test_index_shard_outside_the_folder_is_refused(bert, tmp_path, capsys, shard):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(bert / "model.safetensors", outside)
    shard = str(outside) if shard == "ABSOLUTE" else shard
    names = load_file(bert / "model.safetensors").keys()
    bad = with_index(bert, tmp_path, {name: shard for name in names})
    (bad / "model.safetensors").unlink()
    before = outside.read_bytes()
    out = tmp_path / "out"
    run_fails(["protect", str(bad), str(out)], capsys, "plain *.safetensors file names", bad)
    assert outside.read_bytes() == before
    assert_nothing_written(tmp_path, out)


@pytest.mark.parametrize(
    ("weight_map", "expect"),
    [
        (["model.safetensors"], "no weight_map object"),
        ({"bert.pooler.dense.weight": None}, "plain *.safetensors"),
        ({"bert.pooler.dense.weight": 3}, "plain *.safetensors"),
        ({"bert.pooler.dense.weight": ".."}, "plain *.safetensors"),
    ],
)
def test_malformed_index_is_one_error_line(bert, tmp_path, capsys, weight_map, expect):
    bad = with_index(bert, tmp_path, weight_map)
    run_fails(["protect", str(bad), str(tmp_path / "out")], capsys, expect, bad)
    assert_nothing_written(tmp_path, tmp_path / "out")


# ------------------------------------------------------- 2. no unprotected weights published


def test_other_weight_files_are_left_out_and_listed(sharded, tmp_path, capsys):
    """A stray .bin, a backup .safetensors, an original/ .pth, a model.safetensors beside
    the index and a .git folder are not published; the command says which."""
    src = tmp_path / "src"
    shutil.copytree(sharded, src)
    first_shard = sorted(src.glob("model-*.safetensors"))[0]
    shutil.copy(first_shard, src / "model.safetensors")
    shutil.copy(first_shard, src / "model-backup.safetensors")
    (src / "pytorch_model.bin").write_bytes(b"original weights")
    (src / "original").mkdir()
    (src / "original" / "consolidated.00.pth").write_bytes(b"original weights")
    (src / "original" / "params.json").write_text("{}")
    (src / ".git" / "lfs").mkdir(parents=True)
    (src / ".git" / "lfs" / "blob").write_bytes(b"original weights")
    (src / "tokenizer_config.json").write_text("{}")
    out = tmp_path / "out"
    assert main(["protect", str(src), str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    for name in ("model.safetensors,", "model-backup.safetensors", "pytorch_model.bin", ".git"):
        assert name in printed, printed
    assert "original/consolidated.00.pth" in printed, printed
    published = {str(p.relative_to(out)) for p in out.rglob("*")}
    shards = {p.name for p in sharded.glob("model-*.safetensors")}
    assert published == shards | {
        INDEX, "config.json", "generation_config.json", "tokenizer_config.json",
        "original", "original/params.json",
    }  # fmt: skip
    assert main(["verify", str(sharded), str(out)]) == 0


# ------------------------------------------------------------------- 3. the key is never lost


def test_key_is_written_before_the_output_is_published(llama, tmp_path, monkeypatch):
    seen = []
    real = protect_module.save_key

    def spy(path, *args):
        seen.append((tmp_path / "out").exists())
        real(path, *args)

    monkeypatch.setattr(protect_module, "save_key", spy)
    args = ["protect", str(llama), str(tmp_path / "out"), "-q", "--key-out", str(tmp_path / "k")]
    assert main(args) == 0
    assert seen == [False]
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600


@pytest.mark.parametrize("overwrite", [False, True])
def test_full_disk_while_writing_the_key_publishes_nothing(
    llama, tmp_path, capsys, monkeypatch, overwrite
):
    """With --overwrite, the previous output and its key stay as they were."""
    out, key = tmp_path / "out", tmp_path / "k"
    if overwrite:
        protect(llama, out, "all", seed=1, key_out=key)
    before = (hashes(out), key.read_bytes()) if overwrite else None

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(protect_module, "save_file", full)
    args = ["protect", str(llama), str(out), "--seed", "2", "--key-out", str(key), "-q"]
    run_fails(args + (["--overwrite"] if overwrite else []), capsys, "No space left", llama)
    if overwrite:
        assert (hashes(out), key.read_bytes()) == before
    else:
        assert_nothing_written(tmp_path, out)
        assert not key.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_interrupt_just_after_publishing_keeps_the_key(llama, tmp_path, monkeypatch):
    """Ctrl-C right after the output was renamed into place: output and key both stay."""
    real = protect_module.rewrite

    def rewrite_then_interrupt(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(protect_module, "rewrite", rewrite_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        protect(llama, tmp_path / "out", "all", seed=1, key_out=tmp_path / "k")
    monkeypatch.undo()
    unprotect(tmp_path / "out", tmp_path / "k", tmp_path / "r")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k", "out", "r"]


def test_key_refused_without_overwrite_and_kept(llama, tmp_path, capsys):
    key = tmp_path / "k"
    key.write_bytes(b"an older key")
    run_fails(
        ["protect", str(llama), str(tmp_path / "out"), "--key-out", str(key)],
        capsys,
        "pass --overwrite",
    )
    assert key.read_bytes() == b"an older key"
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_key_path_that_is_a_folder_is_refused_even_with_overwrite(llama, tmp_path, capsys):
    (tmp_path / "keys").mkdir()
    args = ["protect", str(llama), str(tmp_path / "out"), "--key-out", str(tmp_path / "keys")]
    run_fails(args + ["--overwrite"], capsys, "exists and is not a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys"]


# ------------------------------------------------------------- 4. keys bound to their output


def test_published_metadata_holds_the_key_id_not_the_key(protected):
    out, key = protected
    meta, transforms = load_key(key)
    for shard in out.glob("*.safetensors"):
        with open(shard, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        assert header["__metadata__"][KEY_ID] == meta["key_id"]
        assert not [name for name in header if name.startswith("block.")]
    assert len(meta["key_id"]) == 32 and transforms


def test_stale_key_of_an_earlier_run_is_refused(llama, tmp_path, capsys):
    """--overwrite onto an output: the old key no longer matches the new output."""
    protect(llama, tmp_path / "p", "all", seed=1, key_out=tmp_path / "old.key")
    protect(llama, tmp_path / "p", "all", seed=1, key_out=tmp_path / "new.key", overwrite=True)
    args = ["unprotect", str(tmp_path / "p"), str(tmp_path / "old.key"), str(tmp_path / "r")]
    run_fails(args, capsys, "belongs to another protected checkpoint")
    assert_nothing_written(tmp_path, tmp_path / "r")
    args[2] = str(tmp_path / "new.key")
    assert main(args + ["-q"]) == 0


def test_key_of_another_model_of_the_same_shape_is_refused(protected, tmp_path, capsys):
    other = tmp_path / "other"
    build("llama-gqa2", other, seed=7)
    protect(other, tmp_path / "p", "all", seed=3, key_out=tmp_path / "k")
    args = ["unprotect", str(protected[0]), str(tmp_path / "k"), str(tmp_path / "r")]
    run_fails(args, capsys, "belongs to another protected checkpoint", protected[0])
    assert_nothing_written(tmp_path, tmp_path / "r")


def _edited_key(key: Path, tmp_path: Path, edit, rehash: bool) -> Path:
    """``key`` with ``edit(arrays, meta)`` applied; ``rehash``: a deliberate edit that also
    updates the content hash (so the contents are checked, not only the hash)."""
    from safetensors import safe_open

    with safe_open(str(key), framework="numpy") as f:
        meta = dict(f.metadata())
    arrays = load_numpy(key)
    edit(arrays, meta)
    if rehash:
        meta["content_sha256"] = _content_hash(arrays)
    path = tmp_path / "edited.key"
    save_numpy(arrays, path, metadata=meta)
    return path


def _drop_block(arrays, meta):
    for name in [n for n in arrays if n.startswith("block.1.")]:
        del arrays[name]


def _short_column(arrays, meta):
    arrays["block.0.vo"] = np.ascontiguousarray(arrays["block.0.vo"][..., :-1])


def _nan(arrays, meta):
    arrays["block.0.qk"][0, 0, 0] = np.nan


def _not_a_permutation(arrays, meta):
    arrays["block.0.unit_perm"][0] = arrays["block.0.unit_perm"][1]


def _singular(arrays, meta):
    arrays["block.0.vo"][0] = 0.0


def _zero_scale(arrays, meta):
    arrays["block.0.unit_scale"][3] = 0.0


def _stray_tensor(arrays, meta):
    arrays["block.0.extra"] = np.zeros(2)


def _old_format(arrays, meta):
    meta["format"] = "mergeshield-key/1"


def _block_out_of_range(arrays, meta):
    arrays["block.9.unit_scale"] = arrays["block.0.unit_scale"].copy()


def _fewer_blocks(arrays, meta):
    meta["n_blocks"] = "1"


@pytest.mark.parametrize(
    ("edit", "rehash", "expect"),
    [
        (_drop_block, False, "damaged or edited"),
        (_nan, False, "damaged or edited"),
        (_short_column, True, "has shape"),
        (_nan, True, "not finite"),
        (_not_a_permutation, True, "not a permutation"),
        (_singular, True, "singular"),
        (_zero_scale, True, "zero scales"),
        (_stray_tensor, True, "unexpected tensor"),
        (_old_format, False, "not a current mergeshield key"),
        (_block_out_of_range, True, "key has block 9"),
        (_fewer_blocks, False, "key is for a 1-block"),
    ],
)
def test_edited_key_is_one_error_line(protected, tmp_path, capsys, edit, rehash, expect):
    out, key = protected
    edited = _edited_key(key, tmp_path, edit, rehash)
    args = ["unprotect", str(out), str(edited), str(tmp_path / "r")]
    run_fails(args, capsys, expect, out)
    assert_nothing_written(tmp_path, tmp_path / "r")


@pytest.mark.parametrize("content", [b"", b"not a key at all", "FOLDER"])
def test_key_that_is_no_safetensors_file(protected, tmp_path, capsys, content):
    key = tmp_path / "k"
    if content == "FOLDER":
        key.mkdir()
    else:
        key.write_bytes(content)
    args = ["unprotect", str(protected[0]), str(key), str(tmp_path / "r")]
    run_fails(args, capsys, "key file", protected[0])


def test_library_raises_the_same_errors(protected, tmp_path):
    out, key = protected
    edited = _edited_key(key, tmp_path, _short_column, rehash=True)
    with pytest.raises(MergeShieldError, match=r"block 0 vo has shape"):
        unprotect(out, edited, tmp_path / "r")
    with pytest.raises(MergeShieldError, match=r"--seed must be a non-negative integer"):
        protect(out, tmp_path / "x", seed=-1)


# ---------------------------------------------------- 5. --overwrite never replaces an input


def test_protect_onto_its_base_is_refused(llama, tmp_path, capsys):
    base = broken_copy(llama, tmp_path)
    run_fails(
        ["protect", str(llama), str(base), "--base", str(base), "--overwrite", "-q"],
        capsys,
        "output must not be the input",
        base,
    )


def test_protect_key_inside_the_base_is_refused(llama, tmp_path, capsys):
    base = broken_copy(llama, tmp_path)
    key = base / "model.safetensors"
    args = ["protect", str(llama), str(tmp_path / "o"), "--base", str(base), "--key-out", str(key)]
    run_fails(args + ["--overwrite"], capsys, "must not be written inside", base)


def test_attack_onto_its_base_is_refused(protected, llama, tmp_path, capsys):
    base = broken_copy(llama, tmp_path)
    run_fails(
        ["attack", str(protected[0]), str(base), str(base), "--overwrite", "-q"],
        capsys,
        "output must not be the input",
        base,
    )


def test_unprotect_onto_the_key_folder_is_refused(protected, tmp_path, capsys):
    folder = tmp_path / "keys"
    folder.mkdir()
    key = folder / "k.key"
    shutil.copy(protected[1], key)
    run_fails(
        ["unprotect", str(protected[0]), str(key), str(folder), "--overwrite", "-q"],
        capsys,
        "must not contain the input",
        folder,
    )


@pytest.mark.parametrize("where", ["onto a model", "inside a model", "inside the base"])
def test_merge_output_never_replaces_or_enters_an_input(llama, tmp_path, capsys, where):
    base, model = broken_copy(llama, tmp_path), tmp_path / "model"
    shutil.copytree(llama, model)
    out = {"onto a model": model, "inside a model": model / "m", "inside the base": base / "m"}
    watch = base if where == "inside the base" else model
    run_fails(
        ["merge", str(base), str(model), "-o", str(out[where]), "--overwrite"],
        capsys,
        "output must not",
        watch,
    )


def test_mergekit_runner_never_writes_onto_an_input(llama, tmp_path):
    from mergeshield.merging.mergekit_runner import run_mergekit

    model = broken_copy(llama, tmp_path)
    config = {
        "merge_method": "linear",
        "models": [{"model": str(model), "parameters": {"weight": 1.0}}],
        "dtype": "float32",
    }
    for out in (model, model / "inside"):
        with pytest.raises(MergeShieldError, match="output must not be the input"):
            run_mergekit(config, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


# ---------------------------------------------------------------------- 6. denial of service


@pytest.mark.parametrize("layers", [10**18, 10**7])
def test_absurd_layer_count_is_refused_at_once(bert, tmp_path, capsys, layers):
    bad = broken_copy(bert, tmp_path)
    edit_config(bad, num_hidden_layers=layers)
    run_fails(["protect", str(bad), str(tmp_path / "out")], capsys, "stores only", bad)
    assert_nothing_written(tmp_path, tmp_path / "out")


# -------------------------------------------------------------------- 7. no tracebacks


def _write_header(file: Path, header: bytes) -> None:
    file.write_bytes(len(header).to_bytes(8, "little") + header)


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    "header",
    [b"null", b"3", b"[1, 2]", b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}',
     b'{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', DEEP,
     b'{"__metadata__": {"format": 3}}', b'{"a": 1}',
     b'{"a": {"dtype": "F32", "shape": [0, 100000000000000000000], "data_offsets": [0, 0]}}'],
)  # fmt: skip
def test_hostile_safetensors_header(bert, tmp_path, capsys, header):
    bad = broken_copy(bert, tmp_path)
    _write_header(bad / "model.safetensors", header)
    run_fails(["protect", str(bad), str(tmp_path / "out")], capsys, "safetensors file", bad)
    assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("name", ["config.json", INDEX])
def test_deeply_nested_config_or_index(bert, tmp_path, capsys, name):
    bad = broken_copy(bert, tmp_path)
    (bad / name).write_bytes(DEEP)
    run_fails(["protect", str(bad), str(tmp_path / "out")], capsys, "not valid JSON", bad)


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["--seed", "-1"], "--seed must be a non-negative integer"),
        (["--scale", "1", "inf"], "--scale needs finite"),
        (["--scale", "1", "nan"], "--scale needs finite"),
        (["--max-cond", "nan"], "--max-cond must be at least 1"),
        (["--flip-fraction", "nan"], "--flip-fraction"),
    ],
)
def test_bad_numbers_are_refused(llama, tmp_path, capsys, extra, expect):
    run_fails(["protect", str(llama), str(tmp_path / "out"), *extra], capsys, expect, llama)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_merge_with_nan_coefficient_is_refused(llama, tmp_path, capsys):
    args = ["merge", str(llama), str(llama), "-o", str(tmp_path / "m"), "-c", "nan"]
    run_fails(args, capsys, "--coefficient must be a finite number", llama)
    assert_nothing_written(tmp_path, tmp_path / "m")


def test_verify_on_a_model_transformers_cannot_load_is_bad_input(llama, tmp_path, capsys):
    """Exit 2 (bad input), not 1 (a different function)."""
    bad = broken_copy(llama, tmp_path)
    edit_config(bad, hidden_act="no-such-activation")
    run_fails(["verify", str(llama), str(bad)], capsys, "transformers cannot load", bad)


# -------------------------------------------------------------------- 8. temporaries


def test_dangling_symlink_output_is_refused(llama, tmp_path, capsys):
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    run_fails(["protect", str(llama), str(out), "--overwrite", "-q"], capsys, "symbolic link")
    assert out.is_symlink() and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_symlink_to_a_folder_is_refused_with_overwrite(llama, tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "out").symlink_to(target)
    run_fails(
        ["protect", str(llama), str(tmp_path / "out"), "--overwrite", "-q"], capsys, "symbolic"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "target"]


def test_current_folder_as_output_is_refused(llama, tmp_path, capsys, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    (here / "precious.txt").write_text("mine")
    monkeypatch.chdir(here)
    run_fails(["protect", str(llama), ".", "--overwrite", "-q"], capsys, "current folder")
    assert [p.name for p in here.iterdir()] == ["precious.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["here"]


def test_leftovers_of_a_killed_run_are_cleaned_by_the_next(llama, tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.tmp-dead0001").mkdir()
    (tmp_path / ".out.tmp-dead0001" / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / ".out.lock").write_text("999999\n")  # a lock no process holds
    (tmp_path / ".k.tmp-dead0002").write_bytes(b"half a key")
    protect(llama, out, "all", seed=1, key_out=tmp_path / "k")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k", "out"]


def test_an_old_output_moved_aside_is_put_back(llama, tmp_path):
    """A run killed between moving the old output aside and publishing its own: the next run
    on that output puts the old one back first (and, without --overwrite, keeps it)."""
    out = tmp_path / "out"
    protect(llama, out, "all", seed=1)
    before = hashes(out)
    os.replace(out, tmp_path / ".out.old-dead0001")
    with pytest.raises(MergeShieldError, match="already exists; pass --overwrite"):
        protect(llama, out, "all", seed=2)
    assert hashes(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_concurrent_run_on_the_same_output_is_refused(llama, tmp_path, capsys):
    out = tmp_path / "out"
    with exclusive(out):  # another run holds the output
        run_fails(
            ["protect", str(llama), str(out), "--overwrite", "-q"], capsys, "another mergeshield"
        )
    assert_nothing_written(tmp_path, out)


def test_concurrent_run_on_the_same_key_is_refused(llama, tmp_path, capsys):
    with exclusive(tmp_path / "k"):
        args = ["protect", str(llama), str(tmp_path / "o"), "--key-out", str(tmp_path / "k")]
        run_fails(args, capsys, "another mergeshield")
    assert_nothing_written(tmp_path, tmp_path / "o")


# ------------------------------------------------------------------- 9. correct blame


@pytest.mark.parametrize("defense", ["params", "all"])
def test_overflowing_transform_is_not_blamed_on_the_input(bert, tmp_path, capsys, defense):
    args = ["protect", str(bert), str(tmp_path / "out"), "-d", defense, "--scale", "1", "1e300"]
    err = run_fails(args, capsys, "transform produced NaN or Inf", bert)
    assert "contains NaN" not in err
    assert_nothing_written(tmp_path, tmp_path / "out")


# ------------------------------------------------------------ 10. verify in low precision


@pytest.fixture(scope="module")
def llama_bf16(llama, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bf16") / "bf16"
    shutil.copytree(llama, folder)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(llama / "model.safetensors").items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_verify_judges_bf16_against_a_bf16_round_trip(llama_bf16, tmp_path, capsys):
    out = tmp_path / "p"
    protect(llama_bf16, out, "all", seed=4)
    assert main(["verify", str(llama_bf16), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "yardstick: bf16 round trip" in printed and "same function" in printed, printed
    assert "greedy next tokens differ at" in printed
    assert len(printed.strip().splitlines()) <= 4  # a summary, not a table per block


def test_verify_verdict_rule():
    """fp32: the tolerance alone; bf16/fp16: LOW_PRECISION_FACTOR times the round trip's error,
    and greedy tokens differing at most that factor times as often (or at one position)."""
    from dataclasses import replace

    from mergeshield.verify import LOW_PRECISION_FACTOR, VerifyReport

    fp32 = VerifyReport(max_abs_error=1.0, max_rel_error=2e-4, tolerance=1e-4, outputs="logits")
    assert not fp32.ok and replace(fp32, max_rel_error=1e-4).ok
    low = replace(
        fp32,
        yardstick="bf16 round trip",
        round_trip_error=1e-2,
        tokens_compared=100,
        round_trip_tokens_differ=1,
    )
    bound = LOW_PRECISION_FACTOR * 1e-2
    assert low.bound == bound
    assert replace(low, max_rel_error=bound, tokens_differ=int(LOW_PRECISION_FACTOR)).ok
    assert not replace(low, max_rel_error=bound * 1.01, tokens_differ=0).ok
    assert not replace(low, max_rel_error=0.0, tokens_differ=int(LOW_PRECISION_FACTOR) + 1).ok
    assert replace(low, round_trip_tokens_differ=0, tokens_differ=1, max_rel_error=0.0).ok
    assert not replace(low, round_trip_tokens_differ=0, tokens_differ=2, max_rel_error=0.0).ok


def test_verify_still_tells_a_different_bf16_model(llama_bf16, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(llama_bf16, other)
    tensors = load_file(other / "model.safetensors")
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        tensors[name] = -tensors[name]  # the MLPs' contributions reversed
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    assert main(["verify", str(llama_bf16), str(other)]) == 1
    assert "DIFFERENT function" in capsys.readouterr().out


# ------------------------------------------------------------------------ 11. minor


def test_merge_refuses_a_model_with_other_layer_count(llama, tmp_path, capsys):
    cfg = tf.LlamaConfig.from_pretrained(llama)
    cfg.num_hidden_layers = 3
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "three")
    args = ["merge", str(llama), str(tmp_path / "three"), "-o", str(tmp_path / "m")]
    run_fails(args, capsys, "has 3 blocks", llama)
    assert_nothing_written(tmp_path, tmp_path / "m")


def test_verify_text_without_tokenizer_files(llama, tmp_path, capsys):
    assert main(["verify", str(llama), str(llama), "--text", "hello"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "no tokenizer files" in err
