"""The speed benchmark suite: what MD decoupling costs per step, measured side by side.

    ./run bench                     # everything, both allocator settings (about an hour)
    ./run bench --sections step     # a subset; see --help

Each section runs in its own process (fresh compile caches, its own peak
memory), once with the default glibc allocator and once with
GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296.
Plain and MD variants run interleaved (A B A B ...) in one process, and the
reported numbers are ratios of medians. Results: benchmarks/results/speed.json
and speed.md (docs/performance.md shows the table).

Workload: the benchmark GPT (6 layers, d=512, untied head, vocab 8192, 27.3M
parameters), 8 x 128 tokens per step, fp32, AdamW.
"""

# The command: measuring is in speed_measure.py, the table, plot and README in speed_report.py.

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks.readme import RESULTS
from benchmarks.speed_measure import (
    ALLOCATOR_INDEPENDENT,
    ALLOCATORS,
    CHILD_ONLY,
    CHILDREN,
    SECTIONS,
    child_flags,
    machine_info,
    run_section,
    workload_info,
)
from benchmarks.speed_report import write_report


def parser() -> argparse.ArgumentParser:
    """The command line; the hidden options are what the child processes get."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--allocators", nargs="*", default=list(ALLOCATORS), choices=list(ALLOCATORS))
    p.add_argument("--repeats", type=int, default=15, help="timed steps per variant and process")
    p.add_argument(
        "--processes",
        type=int,
        default=3,
        help="fresh processes per variant (ratios vary by process)",
    )
    p.add_argument("--compile-repeats", type=int, default=3)
    p.add_argument("--recompile-steps", type=int, default=200)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument(
        "--report", action="store_true", help="only redraw the table and plot from --out"
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--section", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="eager", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--factored", action="store_true", help=argparse.SUPPRESS)
    return p


def measure(args: argparse.Namespace, results: dict, path: Path) -> None:
    """Every chosen section under every chosen allocator, saved to ``path`` after each."""
    for alloc in args.allocators:
        CHILDREN.env = dict(ALLOCATORS[alloc])
        for name in args.sections:
            if alloc == "tuned" and name in ALLOCATOR_INDEPENDENT:
                continue
            print(f"[{alloc}] {name} ...", file=sys.stderr, flush=True)
            t0 = time.time()
            res = run_section(name, args)
            res["seconds"] = round(time.time() - t0, 1)
            res["date"] = time.strftime("%Y-%m-%d")
            results.setdefault(alloc, {})[name] = res
            path.write_text(json.dumps(results, indent=2) + "\n")  # keep partial results


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    CHILDREN.flags = child_flags(args)
    if args.child:
        fn = {**SECTIONS, **CHILD_ONLY}[args.section]
        print(json.dumps(fn(args)))
        return
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "speed.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if args.report:
        print(write_report(results, out_dir))
        return
    if set(args.sections) == set(SECTIONS) or "machine" not in results:
        results["machine"] = machine_info()  # a partial re-run keeps the suite's date
        results["workload"] = workload_info(args.repeats)
    measure(args, results, path)
    print(write_report(results, out_dir))


if __name__ == "__main__":
    main()
