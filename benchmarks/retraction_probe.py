"""Where the eager retraction's slow mode goes: its time next to its parts, with page faults.

    ./run python benchmarks/retraction_probe.py [--depth 2] [--eager]

Builds the shape matrix's GPT (width 512, vocab 256, 8x128 tokens, compiled), then
times, interleaved (medians of 15), the retraction, a copy of the directions into
buffers of their own, an in-place foreach multiply of the directions, their foreach
norms (read only) and a clone, each with the minor page faults it caused; before any
training step, after 3 and 13 compiled steps, and after a 5 s pause. Ends with a
torch.profiler table of 10 retractions. Prints only; the README quotes its runs.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import torch  # noqa: E402
from torch.profiler import profile  # noqa: E402

from workloads import BENCH_GPT, build_pair, copier  # noqa: E402


def measure(tag: str, ops: dict, reps: int = 15) -> None:
    times = {k: [] for k in ops}
    faults = dict.fromkeys(ops, 0)
    for _ in range(reps):
        for name, fn in ops.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    cells = [
        f"{k} {statistics.median(v) * 1e3:.2f} ms / {faults[k] // reps} faults"
        for k, v in times.items()
    ]
    print(f"{tag:<15}", " | ".join(cells), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--eager", action="store_true", help="train steps not compiled")
    args = p.parse_args()
    cfg = replace(BENCH_GPT, n_layer=args.depth, vocab_size=256)
    _, md = build_pair(cfg, compiled=not args.eager, batch=8, seq=128)
    dirs = [d.detach() for d in md.retraction.directions]
    ops = {
        "retract": md.retraction,
        "copy": copier(dirs),
        "inplace_mul": lambda: torch._foreach_mul_(dirs, 1.0),
        "norm_read": lambda: torch._foreach_norm(dirs),
        "clone": lambda: [d.clone() for d in dirs],
    }
    measure("fresh", ops)
    done = 0
    for total in (3, 13):
        for _ in range(total - done):
            md.step()
        done = total
        measure(f"after {total} steps", ops)
    time.sleep(5)
    measure("after 5 s pause", ops)
    with profile() as prof:
        for _ in range(10):
            md.retraction()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
