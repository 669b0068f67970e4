"""Converter throughput and memory on a >= 1 GB training checkpoint.

    ./run python -m benchmarks.export_speed [--gb 1.0] [--repeats 9]

Writes a training checkpoint (a stack of registered 4096x4096 Linear layers,
fp32), then times, interleaved, a plain file copy of it (``cp`` then ``sync`` of
the copy: the converter also fsyncs its output) and ``python -m export`` on it
(a fresh process, startup included), page cache warm for both, and records the converter's peak resident memory (ru_maxrss of the
child). Results: benchmarks/results/export.json and export.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import mdparam
from benchmarks.readme import insert_if_committed

ROOT = Path(__file__).resolve().parent.parent


def run_child(cmd: list[str], capture: bool = False) -> tuple[float, int] | tuple[float, int, str]:
    """Wall seconds and peak RSS (bytes) of a command, via /usr/bin/time.

    (ru_maxrss from os.wait4 would count this process's pages too: a forked
    child holds them until it execs.)
    """
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        t0 = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", out.name, *cmd],
            cwd=ROOT,
            check=True,
            capture_output=capture,
            text=True,
        )
        elapsed = time.perf_counter() - t0
        rss = int(out.read().split()[-1]) * 1024
        return (elapsed, rss, proc.stdout) if capture else (elapsed, rss)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    return p.parse_args()


def write_checkpoint(path: Path, width: int, layers: int) -> int:
    """A training checkpoint of ``layers`` registered ``width``-square Linears; its bytes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(layers)))
    mdparam.register(model)
    mdparam.save_training(model, path)
    del model
    return path.stat().st_size


def commands(src: Path, work: Path) -> dict[str, list[str]]:
    """The three timed commands on ``src``: cp + sync, the converter, a user-space copy."""
    py = sys.executable
    return {
        # cp, then fsync as the converter does (its file must survive a crash).
        "copy": ["sh", "-c", f"cp {src} {work / 'copy.bin'} && sync {work / 'copy.bin'}"],
        # The converter's own entry point, timed inside too (without interpreter start and imports).
        "convert": [
            py,
            "-c",
            "import sys, time; t = time.perf_counter(); from export.convert import main; "
            "t1 = time.perf_counter(); rc = main(sys.argv[1:]); print(time.perf_counter() - t1); sys.exit(rc)",
            str(src),
            str(work / "plain.safetensors"),
            "--force",
            "--quiet",
        ],
        # A user-space copy (read into a buffer, write, fsync): the I/O path the converter takes.
        "user_copy": [
            py,
            "-c",
            "import os, sys; src = open(sys.argv[1], 'rb'); buf = memoryview(bytearray(64 << 20)); "
            "fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)\n"
            "while (n := src.readinto(buf)): os.write(fd, buf[:n])\n"
            "os.fsync(fd)",
            str(src),
            str(work / "ucopy.bin"),
        ],
    }


def time_commands(cmds: dict[str, list[str]], repeats: int) -> dict[str, list[float]]:
    """Every command ``repeats`` times, interleaved, page cache warm: seconds and peak RSS."""
    copies, ucopies, convs, inner, rss = [], [], [], [], []
    run_child(cmds["copy"])  # warm the page cache for both
    for _ in range(repeats):
        copies.append(run_child(cmds["copy"])[0])
        ucopies.append(run_child(cmds["user_copy"])[0])
        t, r, out = run_child(cmds["convert"], capture=True)
        convs.append(t)
        inner.append(float(out.split()[-1]))
        rss.append(r)
    return {"copy": copies, "user_copy": ucopies, "convert": convs, "inner": inner, "rss": rss}


def summarize(
    args: argparse.Namespace, size: int, layers: int, times: dict, baseline_rss: int
) -> dict:
    """export.json: the machine, the checkpoint, every timing and the medians' throughputs."""
    tensor_bytes = args.width * args.width * 4
    copies, ucopies, convs, inner = (times[k] for k in ("copy", "user_copy", "convert", "inner"))
    copy_s, conv_s, inner_s = (
        statistics.median(copies),
        statistics.median(convs),
        statistics.median(inner),
    )
    ucopy_s = statistics.median(ucopies)
    return {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "checkpoint_bytes": size,
        "largest_tensor_bytes": tensor_bytes,
        "layers": layers,
        "repeats": args.repeats,
        "copy_seconds": copies,
        "convert_seconds": convs,
        "copy_MBps_median": size / copy_s / 1e6,
        "user_copy_seconds": ucopies,
        "user_copy_MBps_median": size / ucopy_s / 1e6,
        "throughput_ratio_convert_over_user_copy": ucopy_s / conv_s,
        "convert_MBps_median": size / conv_s / 1e6,
        "throughput_ratio_convert_over_copy": copy_s / conv_s,
        "convert_inner_seconds": inner,
        "convert_inner_MBps_median": size / inner_s / 1e6,
        "throughput_ratio_inner_convert_over_copy": copy_s / inner_s,
        "convert_peak_rss_bytes": max(times["rss"]),
        "import_only_rss_bytes": baseline_rss,
        "rss_budget_bytes": 2 * tensor_bytes + 300 * 2**20,
    }


def render(result: dict, width: int) -> str:
    """The Markdown table of export.md and docs/guides/export.md."""
    size, layers = result["checkpoint_bytes"], result["layers"]
    peak, baseline_rss = result["convert_peak_rss_bytes"], result["import_only_rss_bytes"]
    mb = 2**20
    return (
        "| checkpoint | cp + sync | user-space copy + fsync | converter command | vs cp | vs user-space copy | converter without interpreter start | vs cp | converter peak RSS | budget (2x largest tensor + 300 MB) | RSS of `import torch, mdparam, export` alone |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
        f"| {size / 1e9:.2f} GB, {layers} x {width}^2 fp32 | {result['copy_MBps_median']:.0f} MB/s "
        f"| {result['user_copy_MBps_median']:.0f} MB/s "
        f"| {result['convert_MBps_median']:.0f} MB/s | {result['throughput_ratio_convert_over_copy']:.2f} "
        f"| {result['throughput_ratio_convert_over_user_copy']:.2f} "
        f"| {result['convert_inner_MBps_median']:.0f} MB/s | {result['throughput_ratio_inner_convert_over_copy']:.2f} "
        f"| {peak / mb:.0f} MiB | {result['rss_budget_bytes'] / mb:.0f} MiB | {baseline_rss / mb:.0f} MiB |\n"
    )


def main() -> None:
    args = parse_args()
    tensor_bytes = args.width * args.width * 4
    layers = max(1, round(args.gb * 1e9 / tensor_bytes))
    work = Path(tempfile.mkdtemp(prefix="mdparam-export-bench-"))
    try:
        src = work / "train.safetensors"
        size = write_checkpoint(src, args.width, layers)
        baseline_rss = run_child([sys.executable, "-c", "import torch, mdparam, export"])[1]
        times = time_commands(commands(src, work), args.repeats)
        result = summarize(args, size, layers, times, baseline_rss)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "export.json").write_text(json.dumps(result, indent=2) + "\n")
    table = render(result, args.width)
    (out / "export.md").write_text(
        "Converter benchmark (`./run python -m benchmarks.export_speed`): `python -m export` as a "
        "fresh process (startup included) against `cp` + `sync` of the same file (an in-kernel copy) and a user-space copy "
        "(Python read/write + fsync, each a fresh process), page cache warm, "
        f"{args.repeats} interleaved repeats, medians.\n\n" + table
    )
    insert_if_committed("export", table, out)
    print(table)


if __name__ == "__main__":
    main()
