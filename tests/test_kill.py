"""A real ``mergeshield protect`` in a subprocess, killed (SIGKILL, SIGTERM) at several moments
of its write: no output is ever half there, no key is lost, SIGTERM leaves nothing behind, and
the next run on the same output cleans up what SIGKILL left and succeeds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergeshield.protect import load_key, protect, unprotect
from tests.test_bad_input import hashes
from tests.tiny_models import build_sharded

# Runs ``mergeshield protect`` with one function wrapped to write a marker file and wait at
# the chosen moment (the test then sends the signal):
#   start    the temporary output exists, nothing written yet (copy_side_files)
#   shard    the first shard is complete, the second one is being written
#   key      the key is published, the output is not
#   publish  the previous output is moved aside, the new one is not yet in place (--overwrite)
DRIVER = """
import importlib, os, sys, time, types
from pathlib import Path

stage, marker, args = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
rewrite = importlib.import_module("mergeshield.rewrite")
folders = importlib.import_module("mergeshield.folders")
protect = importlib.import_module("mergeshield.protect")


def pause():
    marker.write_text(str(os.getpid()))
    time.sleep(60)


def after(fn, when=lambda *a: True):
    def wrapped(*a, **kw):
        result = fn(*a, **kw)
        if when(*a):
            pause()
        return result
    return wrapped


if stage == "start":
    rewrite.copy_side_files = after(rewrite.copy_side_files)
elif stage == "shard":
    shards = []
    real_init = rewrite.ShardWriter.__init__
    def init(self, *a, **kw):
        shards.append(a[0])
        if len(shards) == 2:
            pause()
        real_init(self, *a, **kw)
    rewrite.ShardWriter.__init__ = init
elif stage == "key":
    protect.save_key = after(protect.save_key)
elif stage == "publish":
    proxy = types.ModuleType("os")
    proxy.__dict__.update(os.__dict__)
    proxy.replace = after(os.replace, lambda src, dst: ".old-" in str(dst))
    folders.os = proxy

from mergeshield.cli import main
sys.exit(main(args))
"""

STAGES = ["start", "shard", "key", "publish"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return build_sharded("llama-gqa2", tmp_path_factory.mktemp("sharded") / "model")


def run_until(stage: str, args: list[str], marker: Path) -> subprocess.Popen:
    """Start the driver; return once it waits at ``stage``."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-c", DRIVER, stage, str(marker), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"ended early: {proc.communicate()}")
        assert time.monotonic() < deadline, "never reached the stage"
        time.sleep(0.05)
    return proc


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["KILL", "TERM"])
@pytest.mark.parametrize("stage", STAGES)
def test_killed_protect_loses_nothing_and_the_next_run_succeeds(sharded, tmp_path, stage, sig):
    work = tmp_path / "work"
    work.mkdir()
    out, key = work / "out", work / "k.key"
    previous = None
    if stage == "publish":  # an earlier output and key, being replaced
        protect(sharded, out, "all", seed=1, key_out=key)
        previous = (hashes(out), key.read_bytes())
    before = hashes(sharded)
    args = ["protect", str(sharded), str(out), "--key-out", str(key), "--seed", "2", "-q"]
    if previous:
        args.append("--overwrite")
    proc = run_until(stage, args, tmp_path / "marker")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert hashes(sharded) == before, "the input was changed"

    if sig == signal.SIGTERM:  # interrupted like Ctrl-C: cleaned up on the way out
        assert proc.returncode == 130, err
        assert b"Traceback" not in err, err
        expected = ["k.key", "out"] if previous else []
        assert entries(work) == expected
        if previous:
            assert (hashes(out), key.read_bytes()) == previous
    else:
        assert proc.returncode == -signal.SIGKILL
        if out.exists():  # never half there: a complete earlier output (publish: moved aside)
            assert previous and hashes(out) == previous[0]
        if stage == "key":  # the key came first
            assert key.is_file() and not out.exists()
        left = {name.split("-")[0] for name in entries(work) if name.startswith(".")}
        assert left >= {".out.tmp", ".out.lock"}  # left behind, for the next run to clean
        if stage == "publish":
            assert ".out.old" in left

    # the next run on the same output cleans up and succeeds
    overwrite = previous is not None or key.exists()
    result = protect(sharded, out, "all", seed=2, key_out=key, overwrite=overwrite)
    assert result.output == out
    assert entries(work) == ["k.key", "out"]
    restored = unprotect(out, key, tmp_path / "restored")
    assert set(hashes(restored)) == set(before)
    assert load_key(key)[0]["key_id"]


SCRATCH_DRIVER = """
import sys, time
from pathlib import Path
from mergeshield.folders import scratch

with scratch(sys.argv[1]) as work:
    (work / "merge.bin").write_bytes(b"x" * 1000)
    Path(sys.argv[2]).write_text(str(work))
    time.sleep(60)
"""


def test_scratch_of_a_killed_run_is_swept_by_the_next_run(tmp_path, monkeypatch):
    """An audit's working folder (``folders.scratch``) outlives ``kill -9`` of its process only
    until the next run of any command: the next ``scratch`` removes it, while the folder of a
    live process stays, and the caller's own folder is removed when its block ends."""
    import tempfile

    from mergeshield.folders import scratch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    procs, folders = [], []
    for job in ("killed", "alive"):
        marker = tmp_path / f"{job}.marker"
        procs.append(
            subprocess.Popen([sys.executable, "-c", SCRATCH_DRIVER, job, str(marker)], env=env)
        )
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        folders.append(Path(marker.read_text()))
    killed, alive = folders
    try:
        procs[0].kill()
        procs[0].wait(timeout=30)
        assert killed.is_dir() and alive.is_dir()
        with scratch("next") as mine:
            assert mine.parent == tmp_path and mine.name.startswith("mergeshield-next-")
            assert not killed.exists(), "the killed run's folder was not swept"
            assert alive.is_dir(), "a live run's folder was swept"
        assert not mine.exists()
    finally:
        procs[1].kill()
        procs[1].wait(timeout=30)
    with scratch("after"):
        assert not alive.exists()
