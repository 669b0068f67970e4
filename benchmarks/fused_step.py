"""The recipe's whole training step against plain torch, fused step and formed step side by side.

    ./run python -m benchmarks.fused_step              # 3 shapes x 2 optimizers, both allocators
    ./run python -m benchmarks.fused_step --shapes 256x4 --processes 1 --allocators default

Workload: the example GPT (pre-LN, GELU MLP, untied head), byte vocabulary
(256), 8 x 128 tokens per step, fp32, ``torch.compile(model, fullgraph=True)``,
gradient clipping at 1.0 on every side. Per shape and base optimizer:

- ``plain``: the plain model; AdamW (or Muon on the blocks' matrices and
  AdamW on the rest), ``torch.nn.utils.clip_grad_norm_``;
- ``fused``: ``mdparam.recipe(model, opt, ...)``, the default fused step;
- ``formed``: the same recipe with ``fused=False`` (W formed in the forward).

Speed: the three step in turn (plain, fused, formed, plain, ...) in one
process; each side's median over the timed steps; ratios of medians, over
``--processes`` fresh processes per allocator setting. Memory and cold
compile: each side alone in a fresh process with an empty inductor cache:
the seconds of its first two steps, and the process's peak RSS after 10;
then again with that compile cache, now warm, where the peak RSS is
training's rather than compiling's. Results: benchmarks/results/fused_step.json and .md (docs/performance.md shows the table).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import mdparam
from benchmarks.readme import RESULTS, insert_if_committed
from benchmarks.workloads import interleaved
from examples.gpt import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent

SHAPES = {"256x4": (256, 4), "384x4": (384, 4), "512x6": (512, 6)}
OPTIMIZERS = ("adamw", "muon")
SIDES = ("plain", "fused", "formed")
ALLOCATORS = {
    "default": {},
    "tuned": {
        "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"
    },
}
LR = {"adamw": 0.02, "muon": 0.02}  # speed does not depend on it; a plausible value


def plain_optimizers(model: GPT, optimizer: str) -> list[torch.optim.Optimizer]:
    if optimizer == "adamw":
        return [torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)]
    hidden = [p for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2]
    ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [torch.optim.Muon(hidden, lr=0.02), torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.0)]


def shape_config(shape: str) -> GPTConfig:
    """The example GPT at one of ``SHAPES`` (byte vocabulary, 128 tokens per sequence)."""
    width, layers = SHAPES[shape]
    return GPTConfig(
        vocab_size=256, block_size=128, n_layer=layers, n_head=width // 64, n_embd=width
    )


def build_side(side: str, cfg: GPTConfig, optimizer: str):
    """A step function on a GPT of ``cfg`` (8 sequences per step): forward, backward, clip,
    optimizer step(s), zero grads."""
    torch.manual_seed(0)
    model = GPT(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (8, cfg.block_size), generator=g)
    y = torch.randint(0, cfg.vocab_size, (8, cfg.block_size), generator=g)
    if side == "plain":
        opts = plain_optimizers(model, optimizer)
        fwd = torch.compile(model, fullgraph=True)

        def step() -> None:
            F.cross_entropy(fwd(x).flatten(0, 1), y.flatten()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for o in opts:
                o.step()
            for o in opts:
                o.zero_grad(set_to_none=True)

        return step
    train = mdparam.recipe(
        model, optimizer, lr=LR[optimizer], steps=10_000, head="head", fused=side == "fused"
    )
    fwd = torch.compile(model, fullgraph=True)

    def md_step() -> None:
        F.cross_entropy(fwd(x).flatten(0, 1), y.flatten()).backward()
        train.step()

    return md_step


def child_speed(args: argparse.Namespace) -> dict:
    steps = {s: build_side(s, shape_config(args.shape), args.optimizer) for s in SIDES}
    times = interleaved(steps, repeats=args.repeats, warmup=3)  # the warm-up compiles
    med = {s: statistics.median(t) for s, t in times.items()}
    return {
        "median_ms": {s: 1e3 * m for s, m in med.items()},
        "ratio": {s: med[s] / med["plain"] for s in SIDES},
    }


def child_memory(args: argparse.Namespace) -> dict:
    step = build_side(args.side, shape_config(args.shape), args.optimizer)
    t0 = time.perf_counter()
    step()
    step()
    cold = time.perf_counter() - t0
    for _ in range(8):
        step()
    return {
        "cold_s": cold,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_child(flags: list[str], env_extra: dict, cache: str | None = None) -> dict:
    """A child process; ``cache``: its inductor cache directory (None: the default one)."""
    env = {**os.environ, **env_extra, "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    if cache is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.fused_step", "--child", *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {flags} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace, data: dict, path: Path) -> None:
    todo = [(s, o) for s in args.shapes for o in args.optimizers]
    for n, (shape, opt) in enumerate(todo, 1):
        point = data.setdefault(f"{shape}/{opt}", {"speed": {}, "memory": {}})
        for alloc in args.allocators if args.speed else []:
            runs = [
                run_child(
                    [
                        "--what",
                        "speed",
                        "--shape",
                        shape,
                        "--optimizer",
                        opt,
                        "--repeats",
                        str(args.repeats),
                    ],
                    ALLOCATORS[alloc],
                )
                for _ in range(args.processes)
            ]
            point["speed"][alloc] = runs
            ratios = {s: [round(r["ratio"][s], 3) for r in runs] for s in ("fused", "formed")}
            print(f"[{n}/{len(todo)}] {shape} {opt} {alloc}: {ratios}", flush=True)
            path.write_text(json.dumps(data, indent=1))
        for alloc in args.allocators if args.memory else []:
            env, mems = ALLOCATORS[alloc], point["memory"].setdefault(alloc, {})
            for side in SIDES:
                flags = ["--what", "memory", "--shape", shape, "--optimizer", opt, "--side", side]
                with tempfile.TemporaryDirectory() as cache:
                    mem = mems[side] = run_child(flags, env, cache)  # empty cache
                    # the same cache, now warm: the peak is training's rather than compiling's
                    mem["warm_rss_mib"] = run_child(flags, env, cache)["max_rss_mib"]
            print(f"[{n}/{len(todo)}] {shape} {opt} {alloc} memory: {mems}", flush=True)
            path.write_text(json.dumps(data, indent=1))


def _per_side(mem: dict, key: str) -> str:
    """``plain / fused / formed`` of one memory measurement, or empty without any."""
    return " / ".join(f"{mem[s].get(key, float('nan')):.0f}" for s in SIDES) if mem else ""


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def report(data: dict) -> str:
    """The Markdown table: ratios to plain per allocator, peak RSS and cold compile."""
    allocs = sorted({a for p in data.values() for a in p["speed"]})
    head = ["shape / optimizer"]
    for a in allocs:
        head += [f"fused ({a})", f"formed ({a})"]
    mem_allocs = sorted({a for p in data.values() for a in p.get("memory", {})})
    for a in mem_allocs:
        head += [
            f"peak RSS MiB, whole process ({a}): plain / fused / formed",
            f"peak RSS MiB, warm compile cache ({a}): plain / fused / formed",
        ]
    head += [f"cold s ({a}): plain / fused / formed" for a in mem_allocs[:1]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    means: dict[tuple, list[float]] = {}
    for key, point in data.items():
        row = [key]
        for a in allocs:
            runs = point["speed"].get(a, [])
            for side in ("fused", "formed"):
                vals = [r["ratio"][side] for r in runs]
                row.append(_spread(vals) if vals else "")
                if vals:
                    means.setdefault((key.split("/")[1], a, side), []).append(
                        statistics.median(vals)
                    )
        mems = point.get("memory", {})
        for a in mem_allocs:
            row += [_per_side(mems.get(a, {}), k) for k in ("max_rss_mib", "warm_rss_mib")]
        row += [_per_side(mems.get(a, {}), "cold_s") for a in mem_allocs[:1]]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for (opt, a, side), vals in sorted(means.items()):
        mean = statistics.mean(vals)
        lines.append(f"- {opt}, {side}, {a} allocator: mean over {len(vals)} shapes {mean:.3f}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--optimizers", nargs="*", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    p.add_argument("--allocators", nargs="*", default=list(ALLOCATORS), choices=list(ALLOCATORS))
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20, help="timed steps per side and process")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--no-speed", dest="speed", action="store_false", help="memory only")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--report", action="store_true", help="only rewrite the table from --out")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--what", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--optimizer", help=argparse.SUPPRESS)
    p.add_argument("--side", help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = parser().parse_args()
    if args.child:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        result = child_speed(args) if args.what == "speed" else child_memory(args)
        print(json.dumps(result))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fused_step.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    if not args.report:
        measure(args, data, path)
    table = report(data)
    (out / "fused_step.md").write_text(table + "\n")
    insert_if_committed("fused_step", table, out)
    print(table)


if __name__ == "__main__":
    main()
