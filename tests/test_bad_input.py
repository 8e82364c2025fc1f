"""Bad input: a one-line error, a non-zero exit, nothing written, the input never changed."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeshield.cli import main
from mergeshield.shards import ShardWriter
from tests.tiny_models import build


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good") / "bert"
    build("bert-seqcls", folder)
    return folder


# progress bars: rich ("protect (all) ━━ 1/2 0:00:00"), tqdm ("Loading weights: 5%|▌ | 1/20 [")
PROGRESS = re.compile(r"━|\d+/\d+ \d+:\d\d:\d\d|\| *\d+/\d+ \[")


def one_error_line(stderr: str) -> str:
    """The single error line of a failed command's whole stderr; every other line must be a
    progress bar (no traceback, no second message)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if not PROGRESS.search(line)]
    assert len(errors) == 1, stderr
    assert errors[0].startswith("mergeshield: error:"), stderr
    assert "Traceback" not in stderr, stderr
    return errors[0]


def run_fails(args: list[str], capsys, expect: str, watch: Path | None = None) -> str:
    """Run the CLI; it must exit 2 with one error line containing ``expect``, and leave the
    folder ``watch`` (an input) byte for byte unchanged."""
    before = hashes(watch) if watch and watch.exists() else None
    code = main(args)
    err = one_error_line(capsys.readouterr().err)
    assert code == 2, err
    assert expect in err, err
    if before is not None:
        assert hashes(watch) == before, "the input was modified"
    return err


def broken_copy(good: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    return bad


def edit_config(folder: Path, **changes: object) -> None:
    """Rewrite ``folder``'s config.json with ``changes`` (a callable maps the old value)."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        cfg[key] = value(cfg.get(key)) if callable(value) else value
    path.write_text(json.dumps(cfg))


def assert_nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")]


def test_missing_folder(tmp_path, capsys):
    run_fails(["protect", str(tmp_path / "nope"), str(tmp_path / "out")], capsys, "no such folder")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_no_config(good, tmp_path, capsys):
    bad = broken_copy(good, tmp_path)
    (bad / "config.json").unlink()
    run_fails(["protect", str(bad), str(tmp_path / "out")], capsys, "no config.json", bad)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_unsupported_model_type_lists_supported(good, tmp_path, capsys):
    bad = broken_copy(good, tmp_path)
    edit_config(bad, model_type="mamba")
    err = run_fails(
        ["protect", str(bad), str(tmp_path / "out")], capsys, "unsupported model_type 'mamba'", bad
    )
    assert "bert" in err and "llama" in err and "gpt2" in err
    assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("cut", [4, 200, -10])
def test_truncated_safetensors(good, tmp_path, capsys, cut):
    bad = broken_copy(good, tmp_path)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:cut])
    run_fails(["protect", str(bad), str(tmp_path / "out")], capsys, "safetensors file", bad)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_corrupt_header(good, tmp_path, capsys):
    bad = broken_copy(good, tmp_path)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[8:40] = b"x" * 32
    (bad / "model.safetensors").write_bytes(bytes(data))
    run_fails(["protect", str(bad), str(tmp_path / "out")], capsys, "corrupt safetensors", bad)
    assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize(
    "where",
    ["bert.encoder.layer.1.intermediate.dense.weight", "bert.embeddings.word_embeddings.weight"],
)
def test_nan_or_inf_weights(good, tmp_path, capsys, value, where):
    bad = broken_copy(good, tmp_path)
    tensors = load_file(bad / "model.safetensors")
    tensors[where][0, 0] = value
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    run_fails(["protect", str(bad), str(tmp_path / "out")], capsys, "NaN or Inf", bad)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_integer_weights(good, tmp_path, capsys):
    bad = broken_copy(good, tmp_path)
    tensors = load_file(bad / "model.safetensors")
    name = "bert.encoder.layer.0.attention.self.query.weight"
    tensors[name] = (tensors[name] * 100).to(torch.int8)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    run_fails(["protect", str(bad), str(tmp_path / "out")], capsys, "integer or quantized", bad)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_quantization_config(good, tmp_path, capsys):
    bad = broken_copy(good, tmp_path)
    edit_config(bad, quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    run_fails(["protect", str(bad), str(tmp_path / "out")], capsys, "quantized", bad)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_shape_disagrees_with_config(good, tmp_path, capsys):
    bad = broken_copy(good, tmp_path)
    edit_config(bad, intermediate_size=lambda n: n + 4)
    run_fails(["protect", str(bad), str(tmp_path / "out")], capsys, "config.json implies", bad)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_fewer_layers_than_config(good, tmp_path, capsys):
    bad = broken_copy(good, tmp_path)
    edit_config(bad, num_hidden_layers=lambda n: n + 1)
    run_fails(["protect", str(bad), str(tmp_path / "out")], capsys, "lacks", bad)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_existing_output_needs_overwrite(good, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    run_fails(["protect", str(good), str(out)], capsys, "--overwrite", good)
    assert (out / "keep.txt").read_text() == "precious"
    assert main(["protect", str(good), str(out), "--overwrite", "-q"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_output_inside_input(good, tmp_path, capsys):
    bad = broken_copy(good, tmp_path)
    run_fails(["protect", str(bad), str(bad / "protected")], capsys, "inside", bad)
    run_fails(["protect", str(bad), str(bad)], capsys, "inside", bad)
    assert not (bad / "protected").exists()


def test_key_inside_output_is_refused(good, tmp_path, capsys):
    out = tmp_path / "out"
    run_fails(
        ["protect", str(good), str(out), "--key-out", str(out / "k.key")], capsys, "secret", good
    )
    assert_nothing_written(tmp_path, out)


def test_bin_only_checkpoint(good, tmp_path, capsys):
    bad = broken_copy(good, tmp_path)
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    run_fails(["protect", str(bad), str(tmp_path / "out")], capsys, "only safetensors", bad)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_wrong_key_for_model(good, tmp_path, capsys):
    other = tmp_path / "llama"
    build("llama-gqa2", other)
    assert (
        main(["protect", str(other), str(tmp_path / "p"), "--key-out", str(tmp_path / "k"), "-q"])
        == 0
    )
    assert main(["protect", str(good), str(tmp_path / "p2"), "-q"]) == 0
    run_fails(
        ["unprotect", str(tmp_path / "p2"), str(tmp_path / "k"), str(tmp_path / "r")],
        capsys,
        "key is for",
    )
    assert not (tmp_path / "r").exists()


def test_successful_protect_leaves_input_unchanged(good, tmp_path):
    before = hashes(good)
    assert (
        main(["protect", str(good), str(tmp_path / "out"), "-q", "--key-out", str(tmp_path / "k")])
        == 0
    )
    assert hashes(good) == before
    assert main(["verify", str(good), str(tmp_path / "out")]) == 0


def test_verify_fails_on_a_different_model(good, tmp_path, capsys):
    other = tmp_path / "other"
    build("bert-seqcls", other, seed=5)
    assert main(["verify", str(good), str(other)]) == 1
    assert "DIFFERENT" in capsys.readouterr().out


def test_sharded_checkpoint_round_trip(tmp_path):
    """A sharded checkpoint keeps its shard layout; a layer straddling shards is handled."""
    model, _ = build("llama-gqa2", tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2
    assert main(["protect", str(tmp_path / "sharded"), str(tmp_path / "out"), "-q"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == shards
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    for shard in shards:
        names = set(load_file(tmp_path / "out" / shard))
        assert names == {k for k, v in index["weight_map"].items() if v == shard}
    assert main(["verify", str(tmp_path / "sharded"), str(tmp_path / "out")]) == 0


def test_a_failed_background_write_stops_protect_and_leaves_nothing(
    good, tmp_path, capsys, monkeypatch
):
    """Writes run on a background thread; a failure there (here: the disk fills up at the
    third tensor) must still end the command with one error line and no output."""
    calls = []
    real_write = ShardWriter.write

    def failing_write(self, name, tensor):
        calls.append(name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_write(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", failing_write)
    out = tmp_path / "out"
    run_fails(["protect", str(good), str(out), "--seed", "1"], capsys, "No space left", good)
    assert_nothing_written(tmp_path, out)
    assert len(calls) >= 3
