"""The eager retraction's slow mode: which part of it slows down, and when.

    ./run python -m benchmarks.retraction_probe [--processes 3] [--depth 2]
    OMP_NUM_THREADS=1 ./run python -m benchmarks.retraction_probe

Builds the shape matrix's GPT (width 512, vocab 256, 8x128 tokens, compiled) in fresh
processes and, after every two compiled training steps, times interleaved (medians of
11) on the directions, in this order: the retraction, the per-tensor loop it replaced,
their foreach norms (read only), an in-place foreach multiply by 1.0 right after a
foreach norm of the same tensors (only the multiply timed), a copy into buffers of
their own (the bound), and the same multiply after that copy, with the minor page faults
of each. A round is marked SLOW when the multiply after the norm takes over 2x the one
after the copy. Prints the rounds; benchmarks/results/retraction_probe.txt keeps runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import torch

from benchmarks.workloads import BENCH_GPT, ROOT, build_pair, copier
from mdparam._retraction import retract_


def operations(r, dirs: list[torch.Tensor]) -> dict:
    """name -> function; a function may return the seconds to count (else the call is timed)."""

    @torch.no_grad()
    def per_tensor() -> None:
        r.check_norms(retract_(r.directions, r.spheres, r.layouts, r.radii()))

    def mul_after_norm() -> float:
        torch._foreach_norm(dirs)
        t0 = time.perf_counter()
        torch._foreach_mul_(dirs, 1.0)
        return time.perf_counter() - t0

    return {
        "retract": r,
        "per_tensor": per_tensor,
        "norm": lambda: torch._foreach_norm(dirs),
        "norm>mul": mul_after_norm,
        "copy": copier(dirs),  # reads the directions with an elementwise op's split
        "mul": lambda: torch._foreach_mul_(dirs, 1.0),  # so this one follows no norm
    }


def measure(ops: dict, reps: int = 11) -> dict:
    times = {k: [] for k in ops}
    faults = dict.fromkeys(ops, 0)
    for _ in range(reps):
        for name, fn in ops.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            out = fn()
            times[name].append(out if isinstance(out, float) else time.perf_counter() - t0)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return {
        k: {"ms": statistics.median(v) * 1e3, "faults": faults[k] // reps} for k, v in times.items()
    }


def child(depth: int, rounds: int) -> list[dict]:
    cfg = replace(BENCH_GPT, n_layer=depth, vocab_size=256)
    _, md = build_pair(cfg, compiled=True, batch=8, seq=128)
    ops = operations(md.retraction, [d.detach() for d in md.retraction.directions])
    out = []
    for _ in range(rounds):
        md.step()
        md.step()
        out.append(measure(ops))
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--processes", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.depth, args.rounds)))
        return
    cmd = [sys.executable, "-m", "benchmarks.retraction_probe", "--child"]
    cmd += ["--depth", str(args.depth), "--rounds", str(args.rounds)]
    for proc in range(args.processes):
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
        for i, res in enumerate(json.loads(done.stdout.strip().splitlines()[-1])):
            slow = res["norm>mul"]["ms"] > 2 * res["mul"]["ms"]
            cells = " | ".join(f"{k} {v['ms']:.2f} ms/{v['faults']}f" for k, v in res.items())
            print(f"process {proc} round {i} {'SLOW' if slow else 'ok  '} {cells}", flush=True)


if __name__ == "__main__":
    main()
