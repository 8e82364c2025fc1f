"""Time ``mergeshield protect`` against a plain copy and a mergekit merge of the same folder.

For a synthetic Llama-shaped bf16 checkpoint (``make_synthetic.py``), each run times, as
separate subprocesses under ``/usr/bin/time`` (wall, user + system CPU, peak RSS):

- ``copy``: ``cp -r MODEL OUT`` (no ``sync``: like the others it leaves dirty pages); GNU cp
  copies with ``copy_file_range``, one copy inside the kernel, no pass through user space;
- ``user-copy``: the same files read into user memory and written back in 1 MiB chunks
  (``read`` + ``write``): the floor of any tool that must see the bytes to transform them
  (1 MiB: larger writes are several times slower here, see ``shards.WRITE_CHUNK``);
- ``imports``: ``python -c "import mergeshield.protect"``: the interpreter and the libraries
  that any protect run loads first (torch, numpy, safetensors), no I/O;
- ``protect``: ``mergeshield protect MODEL OUT --defense all --seed RUN --quiet``;
- ``mergekit-linear``: ``mergekit-yaml`` linear merge (0.5/0.5) of MODEL with its copy, bf16;
- ``mergekit-passthrough``: ``mergekit-yaml`` passthrough of MODEL alone (a pure rewrite).

Outputs are deleted after each command, then every command starts after the same pause
(``--settle``, default 5 s).  Why: on this VM, memory freed a moment ago (the previous
command's output pages) is still backed by the host, and writing into it is 3-8x cheaper than
writing into memory the host has taken back a few seconds later (measured in BENCHMARKS.md,
"Scale"); without the pause the command that happens to follow a deletion most closely
(``cp``, whose first write comes milliseconds after it starts) wins by that alone.
Prints one JSON line per command and a Markdown table of medians; the 1-minute load average
before each command is recorded too (the machine may be shared).

    python benchmarks/scale.py 1b --runs 3 --workdir /work/bench
    python benchmarks/scale.py 8b-slice --layers 2 4 --runs 3 --workdir /work/bench
    python benchmarks/scale.py qwen3-8b-slice --layers 2 4 --commands copy protect
    python benchmarks/scale.py gemma3-12b-slice --layers 2 4 --commands copy protect

``--layers 2 4``: the difference of the two gives the time and memory per layer, without the
embeddings (the new families' shapes: issue 16).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_synthetic import SHAPES, write_checkpoint  # noqa: E402

TIME = "/usr/bin/time"
COMMANDS = ["copy", "user-copy", "imports", "protect", "mergekit-linear", "mergekit-passthrough"]
BIN = Path(sys.executable).parent


def timed(cmd: list[str]) -> dict[str, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (GiB) of ``cmd``."""
    load = os.getloadavg()[0]
    with tempfile.NamedTemporaryFile("r", suffix=".time") as f:
        proc = subprocess.run(
            [TIME, "-o", f.name, "-f", "%e %U %S %M", *cmd],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        wall, user, sys_, rss_kb = f.read().split()[-4:]
    return {
        "wall_s": float(wall),
        "cpu_s": float(user) + float(sys_),
        "user_s": float(user),
        "sys_s": float(sys_),
        "rss_gib": int(rss_kb) / 2**20,
        "load": load,
    }


USER_COPY = """
import os, sys
src, dst = sys.argv[1:]
os.makedirs(dst)
buf = bytearray(1 << 20)
for name in sorted(os.listdir(src)):
    with open(os.path.join(src, name), "rb", buffering=0) as f, open(
        os.path.join(dst, name), "wb", buffering=0
    ) as g:
        while n := f.readinto(buf):
            g.write(memoryview(buf)[:n])
"""


def mergekit_config(path: Path, models: list[Path], method: str) -> Path:
    lines = [f"merge_method: {method}", "dtype: bfloat16", "models:"]
    for m in models:
        lines.append(f"  - model: {m}")
        if method == "linear":
            lines.append(f"    parameters: {{weight: {1 / len(models)}}}")
    path.write_text("\n".join(lines) + "\n")
    return path


def bench(model: Path, work: Path, runs: int, which: list[str], settle: float) -> list[dict]:
    rows = []
    copy = work / "copy-input"  # the second input of the linear merge
    if "mergekit-linear" in which and not copy.exists():
        shutil.copytree(model, copy)
    for run in range(runs):
        for name in which:
            out = work / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            if name == "copy":
                cmd = ["cp", "-r", str(model), str(out)]
            elif name == "user-copy":
                cmd = [sys.executable, "-c", USER_COPY, str(model), str(out)]
            elif name == "imports":
                cmd = [sys.executable, "-c", "import mergeshield.protect"]
            elif name == "protect":
                cmd = [str(BIN / "mergeshield"), "protect", str(model), str(out)]
                cmd += ["--defense", "all", "--seed", str(run), "--quiet"]
            else:
                method = name.removeprefix("mergekit-")
                inputs = [model, copy] if method == "linear" else [model]
                cfg = mergekit_config(work / f"{method}.yml", inputs, method)
                cmd = [str(BIN / "mergekit-yaml"), str(cfg), str(out), "--quiet"]
            time.sleep(settle)
            row = {"command": name, "run": run} | timed(cmd)
            shutil.rmtree(out, ignore_errors=True)
            print(json.dumps(row), flush=True)
            rows.append(row)
    shutil.rmtree(copy, ignore_errors=True)
    return rows


def summary(rows: list[dict], shard_gib: float) -> str:
    out = [
        f"largest input shard: {shard_gib:.2f} GiB",
        "",
        "| command | runs | wall s (median) | CPU s (median) | peak RSS GiB | load |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in dict.fromkeys(r["command"] for r in rows):
        sel = [r for r in rows if r["command"] == name]
        med = {k: statistics.median(r[k] for r in sel) for k in ("wall_s", "cpu_s", "rss_gib")}
        loads = f"{min(r['load'] for r in sel):.1f}-{max(r['load'] for r in sel):.1f}"
        out.append(
            f"| {name} | {len(sel)} | {med['wall_s']:.1f} | {med['cpu_s']:.1f} | "
            f"{med['rss_gib']:.2f} | {loads} |"
        )
    ratios = [
        p["wall_s"] / c["wall_s"]
        for p in rows
        if p["command"] == "protect"
        for c in rows
        if c["command"] == "copy" and c["run"] == p["run"]
    ]
    if ratios:
        each = ", ".join(f"{r:.1f}" for r in ratios)
        median = statistics.median(ratios)
        out += ["", f"protect / copy wall time, same run: {each} (median {median:.1f})"]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, nargs="+", default=[None], help="layer counts")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/work/bench"))
    parser.add_argument(
        "--commands",
        nargs="+",
        default=[c for c in COMMANDS if c != "imports"],
        choices=COMMANDS,
    )
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    parser.add_argument(
        "--settle", type=float, default=5.0, help="seconds of pause before every command"
    )
    args = parser.parse_args()
    for layers in args.layers:
        family = "" if "model_type" in SHAPES[args.shape] else "llama-"
        model = args.workdir / f"{family}{args.shape}-{layers or 'all'}"
        if not model.exists():
            write_checkpoint(model, args.shape, layers, args.shard_gb)
        shard = max(f.stat().st_size for f in model.glob("*.safetensors")) / 2**30
        print(f"# {model}", flush=True)
        try:
            rows = bench(model, args.workdir, args.runs, args.commands, args.settle)
        finally:
            if not args.keep:
                shutil.rmtree(model, ignore_errors=True)
        print(summary(rows, shard), flush=True)


if __name__ == "__main__":
    main()
