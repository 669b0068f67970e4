"""What MD costs per step at every model shape: the shape matrix.

    ./run python -m benchmarks.shapes                  # every point (resumes), then the report
    ./run python -m benchmarks.shapes --report         # table and heatmap from the JSON
    ./run python -m benchmarks.shapes --points w256 t128 --repeats 6
    ./run python -m benchmarks.shapes --retraction-only  # re-time only the retraction

Points vary one axis at a time around a centre (the benchmark GPT of the speed
suite: width 512, depth 4, vocab 256, 1024 tokens per call, fp32): width
256-1024, depth 2-8, vocab 256 or 32768 with the head plain or registered,
128-4096 tokens per call, and bf16 autocast; plus the corners where tokens
and width pull apart. Each point runs in a fresh process and measures, plain
and MD side by side (interleaved, medians):

- the train step (forward, backward, AdamW, retraction), eager and compiled
  (``torch.compile(fullgraph=True)``), MD registered with ``forward="auto"``
  (the factored Linear where it does less work) and with W formed;
- the cold compile time (the first compiled step, caches off);
- the retraction, alone and timed inside the compiled training loop, against a
  copy of the same tensors;
- recompiles after warm-up over steps with a changing LR.

``--processes N`` repeats every point in N processes to show how much the
ratios move between runs. Results: benchmarks/results/shapes.json,
shapes.md (docs/performance.md's table) and shapes.png (heatmap).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

RESULTS = HERE / "results"
CENTRE = {
    "width": 512,
    "depth": 4,
    "vocab": 256,
    "head": "registered",
    "tokens": 1024,
    "dtype": "fp32",
}
POINTS = {  # name -> the axes that differ from CENTRE
    "centre": {},
    "w256": {"width": 256},
    "w1024": {"width": 1024},
    "d2": {"depth": 2},
    "d8": {"depth": 8},
    "v32k-plain-head": {"vocab": 32768, "head": "plain"},
    "v32k-registered-head": {"vocab": 32768},
    "t128": {"tokens": 128},
    "t4096": {"tokens": 4096},
    "bf16": {"dtype": "bf16"},
    "w256-t4096": {"width": 256, "tokens": 4096},
    "w1024-t128": {"width": 1024, "tokens": 128},
}


def point_config(name: str) -> dict:
    return {**CENTRE, **POINTS[name]}


# --- one point, in a child process ----------------------------------------------------------


def pair_args(cfg: dict) -> tuple:
    """A point's GPT config, build_pair keywords and registration (head plain or not)."""
    import torch

    from examples.gpt import GPTConfig

    torch.set_num_threads(os.cpu_count() or 1)
    seq = min(cfg["tokens"], 256)
    gpt = GPTConfig(cfg["vocab"], seq, cfg["depth"], cfg["width"] // 64, cfg["width"])
    kw = dict(batch=cfg["tokens"] // seq, seq=seq, autocast_bf16=cfg["dtype"] == "bf16")
    register = {"exclude": "head"} if cfg["head"] == "plain" else {}
    return gpt, kw, register


def measure_point(cfg: dict, repeats: int) -> dict:
    from torch._dynamo.utils import counters

    from benchmarks.workloads import build_pair, interleaved, timed

    gpt, kw, register = pair_args(cfg)
    out: dict = {}
    for mode in ("eager", "compiled"):
        compiled = mode == "compiled"
        plain, md = build_pair(
            gpt, compiled=compiled, register={**register, "forward": "auto"}, **kw
        )
        _, formed = build_pair(gpt, compiled=compiled, register=register, **kw)
        sides = {"plain": plain.step, "md": md.step, "md_formed": formed.step}
        first = {k: timed(step) for k, step in sides.items()}  # compiles, when compiled
        t = interleaved(sides, repeats=repeats, warmup=1)
        med = {k: statistics.median(v) for k, v in t.items()}
        out[mode] = {
            "median_s": med,
            "ratio": med["md"] / med["plain"],
            "ratio_formed": med["md_formed"] / med["plain"],
            "first_call_s": first,
        }
        if compiled:
            out["compile_ratio"] = (first["md"] - med["md"]) / (first["plain"] - med["plain"])
            out["retraction"] = retraction_in_loop(md, repeats)
            counters.clear()
            out["recompiles"] = recompiles_with_changing_lr(md)
    return out


def measure_retraction(cfg: dict, repeats: int) -> dict:
    """Only the retraction columns of a point (after the retraction's code changed)."""
    from benchmarks.workloads import build_pair

    gpt, kw, register = pair_args(cfg)
    _, md = build_pair(gpt, compiled=True, register={**register, "forward": "auto"}, **kw)
    for _ in range(3):
        md.step()
    return {"retraction": retraction_in_loop(md, repeats)}


def retraction_in_loop(md, repeats: int) -> dict:
    """The retraction and a copy of the directions, alone and right after training steps."""
    from benchmarks.workloads import copier

    retraction = md.retraction
    dirs = retraction.directions
    copy_all = copier(dirs)

    alone = {"retract": [], "copy": []}
    inside = {"retract": [], "copy": []}
    for _ in range(repeats):
        for name, fn in (("retract", retraction), ("copy", copy_all)):
            t0 = time.perf_counter()
            fn()
            alone[name].append(time.perf_counter() - t0)
    for _ in range(repeats):
        md.step()  # a compiled step (which retracted), then the two, as a loop would see them
        for name, fn in (("retract", retraction), ("copy", copy_all)):
            t0 = time.perf_counter()
            fn()
            inside[name].append(time.perf_counter() - t0)
    med = {
        k: {n: statistics.median(v) for n, v in d.items()}
        for k, d in (("alone", alone), ("inside", inside))
    }
    return {
        "alone_ratio": med["alone"]["retract"] / med["alone"]["copy"],
        "inside_ratio": med["inside"]["retract"] / med["inside"]["copy"],
        "median_s": med,
        "tensors": len(dirs),
        "elements": sum(d.numel() for d in dirs),
    }


def recompiles_with_changing_lr(md, steps: int = 6) -> int:
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    for i in range(steps):
        for group in md.opt.param_groups:
            group["lr"] = 1e-3 / (1 + i)
        md.step()
    return counters["stats"]["unique_graphs"] - before


# --- the matrix -----------------------------------------------------------------------------


def run_point(name: str, repeats: int, retraction_only: bool = False) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}  # cold compiles
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    cmd = [sys.executable, "-m", "benchmarks.shapes", "--child", name, "--repeats", str(repeats)]
    cmd += ["--retraction-only"] if retraction_only else []
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"point {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace, path: Path) -> dict:
    data = json.loads(path.read_text()) if path.exists() else {"points": {}}
    names = args.points or list(POINTS)
    from tqdm import tqdm

    if args.retraction_only:  # every measured process of the chosen points, in place
        keys = [k for k, v in data["points"].items() if v["point"] in names]
        for key in tqdm(keys, desc="retraction", unit="process"):
            entry = data["points"][key]
            entry.setdefault("retraction_before", entry["retraction"])
            entry.update(run_point(entry["point"], args.repeats, retraction_only=True))
            path.write_text(json.dumps(data, indent=1) + "\n")
        return data

    # every point once before any point twice, so that a stopped run still covers the matrix
    todo = [
        (n, p) for p in range(args.processes) for n in names if f"{n}#{p}" not in data["points"]
    ]
    for name, proc in tqdm(todo, desc="shape points", unit="process"):
        res = run_point(name, args.repeats)
        data["points"][f"{name}#{proc}"] = {"point": name, "config": point_config(name), **res}
        path.write_text(json.dumps(data, indent=1) + "\n")
    return data


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--points", nargs="*", choices=list(POINTS))
    p.add_argument("--repeats", type=int, default=10, help="timed steps per side and mode")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--report", action="store_true")
    p.add_argument(
        "--retraction-only",
        action="store_true",
        help="re-time only the retraction of the points already measured (old kept)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        fn = measure_retraction if args.retraction_only else measure_point
        print(json.dumps(fn(point_config(args.child), args.repeats)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "shapes.json"
    data = json.loads(path.read_text()) if args.report else measure(args, path)
    from benchmarks.shapes_report import write_report

    print(write_report(data, out))


if __name__ == "__main__":
    main()
