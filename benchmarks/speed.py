"""The speed benchmark suite: what MD decoupling costs per step, measured side by side.

    ./run bench                     # everything, both allocator settings (about an hour)
    ./run bench --sections step     # a subset; see --help

Each section runs in its own process (fresh compile caches, its own peak
memory), once with the default glibc allocator and once with
GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296.
Plain and MD variants run interleaved (A B A B ...) in one process, and the
reported numbers are ratios of medians. Results: benchmarks/results/speed.json
and speed.md (the README shows the table).

Workload: the benchmark GPT (6 layers, d=512, untied head, vocab 8192, 27.3M
parameters), 8 x 128 tokens per step, fp32, AdamW.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import (
    BENCH_GPT,
    ROOT,
    build_factored,
    build_optimizer_variants,
    build_pair,
    interleaved,
    summary,
    timed,
)

import mdparam

GLIBC_TUNED = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"
RESULTS = ROOT / "benchmarks" / "results"


# --- sections (each runs in a child process) -----------------------------------------


def section_pair_child(args: argparse.Namespace) -> dict:
    """One process: plain and MD steps interleaved, for one variant."""
    compiled, bf16 = args.mode == "compiled", args.dtype == "bf16"
    plain, md = build_pair(compiled=compiled, autocast_bf16=bf16, batch=args.batch, seq=args.seq)
    sides = {"plain": plain.step, "md": md.step}
    if args.factored:
        sides["md_factored"] = build_factored(md).step
    t = interleaved(sides, repeats=args.repeats, warmup=3)
    out = {k: summary(v) for k, v in t.items()}
    for k in sides:
        if k != "plain":
            out[f"{k}_ratio"] = statistics.median(t[k]) / statistics.median(t["plain"])
    return out


def _pairs(args: argparse.Namespace, variants: list[dict]) -> dict:
    """Run every variant in ``args.processes`` fresh processes (interleaved); combine."""
    runs: dict[str, list[dict]] = {v["key"]: [] for v in variants}
    for _ in range(args.processes):
        for v in variants:
            flags = [
                "--mode",
                v["mode"],
                "--dtype",
                v.get("dtype", "fp32"),
                "--batch",
                str(v.get("batch", 8)),
                "--seq",
                str(v.get("seq", 128)),
            ]
            if v.get("factored"):
                flags.append("--factored")
            runs[v["key"]].append(
                _child(["--section", "pair_child", *flags], env_extra=v.get("env"))
            )
    out = {}
    for key, rs in runs.items():
        ratios = [r["md_ratio"] for r in rs]
        out[key] = {
            "ratio": statistics.median(ratios),
            "ratio_per_process": ratios,
            "plain_median_s": statistics.median(r["plain"]["median"] for r in rs),
            "md_median_s": statistics.median(r["md"]["median"] for r in rs),
        }
        if "md_factored_ratio" in rs[0]:
            out[key]["factored_ratio"] = statistics.median(r["md_factored_ratio"] for r in rs)
            out[key]["factored_ratio_per_process"] = [r["md_factored_ratio"] for r in rs]
        print(
            f"  {key}: ratio {out[key]['ratio']:.3f} {[round(x, 3) for x in ratios]}",
            file=sys.stderr,
        )
    return out


def section_step(args: argparse.Namespace) -> dict:
    """Train-step time, MD / plain, eager and compiled, fp32 and bf16 autocast."""
    variants = [
        {"key": f"{mode}_{dtype}", "mode": mode, "dtype": dtype}
        for mode in ("eager", "compiled")
        for dtype in ("fp32", "bf16")
    ]
    variants.append({"key": "compiled_fp32_opaque_fuse", "mode": "compiled", "env": OPAQUE})
    return _pairs(args, variants)


def section_small(args: argparse.Namespace) -> dict:
    """One sequence of 8-64 tokens per call: MD / plain, and a factored forward.

    One process per variant: the ratios here are far from 1, so the spread
    between processes matters less than in the step section.
    """
    variants = [
        {"key": f"{mode}_{tokens}", "mode": mode, "batch": 1, "seq": tokens, "factored": True}
        for mode in ("eager", "compiled")
        for tokens in (8, 16, 32, 64)
    ]
    return _pairs(argparse.Namespace(**{**vars(args), "processes": 1}), variants)


def section_optstep_child(args: argparse.Namespace) -> dict:
    """One process: the four optimizer-step variants, interleaved (see build_optimizer_variants)."""
    sides = build_optimizer_variants()
    first = {
        name: timed(side.step) for name, side in sides.items()
    }  # compile of the model and the step
    t = interleaved(
        {name: side.step for name, side in sides.items()}, repeats=args.repeats, warmup=2
    )
    med = {name: statistics.median(v) for name, v in t.items()}
    return {
        "median_s": med,
        "first_step_s": first,
        "step_compile_s": {name: first[name] - med[name] for name in sides},
    }


def section_optstep(args: argparse.Namespace) -> dict:
    """MD with mdparam.compile_step against plain AdamW (eager and compiled step) and heavyball."""
    runs = [_child(["--section", "optstep_child"]) for _ in range(args.processes)]
    names = list(runs[0]["median_s"])

    def ratio(a: str, b: str) -> dict:
        per = [r["median_s"][a] / r["median_s"][b] for r in runs]
        return {"ratio": statistics.median(per), "per_process": per}

    out = {
        "md_compiled_step_over_plain": ratio("md_compiled_step", "plain"),
        "md_compiled_step_over_plain_compiled_opt": ratio("md_compiled_step", "plain_compiled_opt"),
        "plain_compiled_opt_over_plain": ratio("plain_compiled_opt", "plain"),
        "md_retraction_in_graph_over_plain_compiled_opt": ratio(
            "md_compiled_step_retraction_in_graph", "plain_compiled_opt"
        ),
        "first_step_s": {n: statistics.median(r["first_step_s"][n] for r in runs) for n in names},
        "runs": runs,
    }
    if "heavyball" in names:
        out["heavyball_over_plain"] = ratio("heavyball", "plain")
        out["md_compiled_step_over_heavyball"] = ratio("md_compiled_step", "heavyball")
    for k, v in out.items():
        if isinstance(v, dict) and "ratio" in v:
            print(
                f"  {k}: {v['ratio']:.3f} {[round(x, 3) for x in v['per_process']]}",
                file=sys.stderr,
            )
    return out


def section_retraction_child(args: argparse.Namespace) -> dict:
    """One process: the retraction, the relative-step mode and a copy of the same bytes."""
    _, md = build_pair(compiled=True)
    for _ in range(3):
        md.step()
    retract = md.retraction
    dirs = [d.detach() for d in retract.directions]
    dsts = [torch.empty_like(d) for d in dirs]

    def copy_all() -> None:
        for d, o in zip(dirs, dsts):
            o.copy_(d)

    # The relative-step mode's work around one step: record D before it, rescale the step after.
    relative = mdparam.Retraction(md.model, relative_step=True)
    relative.attach(torch.optim.SGD(mdparam.param_groups(md.model, lr=0.0)))

    def relative_step() -> None:  # what the pre- and post-step hooks do around one step
        with torch.no_grad():
            for prev, d in zip(relative._previous, relative.directions):
                prev.copy_(d)
        relative._after_step()

    compiled = mdparam.Retraction(md.model, compile=True)  # the path compile="auto" skips on CPU
    t = interleaved(
        {"retract": retract, "compiled": compiled, "relative": relative_step, "copy": copy_all},
        repeats=args.repeats * 5,
        warmup=5,
    )
    steps = interleaved({"md_step": md.step}, repeats=max(5, args.repeats // 2), warmup=1)
    r, rc, rel, c = (statistics.median(t[k]) for k in ("retract", "compiled", "relative", "copy"))
    s = statistics.median(steps["md_step"])
    return {
        "direction_elements": sum(d.numel() for d in dirs),
        "retract_s": r,
        "retract_compiled_s": rc,
        "relative_s": rel,
        "copy_s": c,
        "compiled_md_step_s": s,
    }


def section_retraction(args: argparse.Namespace) -> dict:
    """Retraction time vs a copy of the same tensors (one read + one write per element), per process."""
    runs = [_child(["--section", "retraction_child"]) for _ in range(args.processes)]
    numel = runs[0]["direction_elements"]
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    return {
        "direction_elements": numel,
        "per_process": runs,
        "copy_bandwidth_GBps": 8 * numel / med("copy_s") / 1e9,
        "retract_over_bound": statistics.median(r["retract_s"] / r["copy_s"] for r in runs),
        "retract_over_bound_per_process": [r["retract_s"] / r["copy_s"] for r in runs],
        "retract_compiled_over_bound": statistics.median(
            r["retract_compiled_s"] / r["copy_s"] for r in runs
        ),
        "copy_fraction_of_compiled_step": statistics.median(
            r["copy_s"] / r["compiled_md_step_s"] for r in runs
        ),
        "retract_fraction_of_compiled_step": statistics.median(
            r["retract_s"] / r["compiled_md_step_s"] for r in runs
        ),
        "relative_over_retract": statistics.median(r["relative_s"] / r["retract_s"] for r in runs),
        "relative_fraction_of_compiled_step": statistics.median(
            r["relative_s"] / r["compiled_md_step_s"] for r in runs
        ),
    }


def section_compile_child(args: argparse.Namespace) -> dict:
    """Cold compile of one variant (run in a fresh process with caches off)."""
    plain, md = build_pair(compiled=True)
    side = plain if args.variant == "plain" else md
    first = timed(side.step)  # forward + backward compile and the first step
    if side.retraction is not None:
        side.retraction()  # already compiled by the step's hook
    rest = statistics.median([timed(side.step) for _ in range(3)])
    return {"first_step": first, "steady_step": rest, "compile_seconds": first - rest}


def section_compile(args: argparse.Namespace) -> dict:
    """Cold compile time MD / plain: fresh processes, caches off, interleaved."""
    runs: dict[str, list[float]] = {"plain": [], "md": [], "md_opaque_fuse": []}
    for _ in range(args.compile_repeats):
        for key in runs:
            variant = "plain" if key == "plain" else "md"
            env = OPAQUE if key == "md_opaque_fuse" else None
            res = _child(
                ["--section", "compile_child", "--variant", variant], cold=True, env_extra=env
            )
            runs[key].append(res["compile_seconds"])
    plain = statistics.median(runs["plain"])
    return {
        "plain_seconds": runs["plain"],
        "md_seconds": runs["md"],
        "md_opaque_fuse_seconds": runs["md_opaque_fuse"],
        "ratio": statistics.median(runs["md"]) / plain,
        "opaque_fuse_ratio": statistics.median(runs["md_opaque_fuse"]) / plain,
    }


def section_memory_child(args: argparse.Namespace) -> dict:
    plain, md = build_pair(compiled=args.compiled)
    side = plain if args.variant == "plain" else md
    other = md if args.variant == "plain" else plain
    del other
    import gc

    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(5):
        side.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_rss": peak, "rss_before_training": before}


def section_memory(args: argparse.Namespace) -> dict:
    """Peak resident memory of 5 training steps, each variant in its own process."""
    out = {}
    for mode in ("eager", "compiled"):
        res = {}
        for variant in ("plain", "md"):
            extra = ["--compiled"] if mode == "compiled" else []
            res[variant] = _child(["--section", "memory_child", "--variant", variant, *extra])
        out[mode] = {
            **res,
            "peak_ratio": res["md"]["peak_rss"] / res["plain"]["peak_rss"],
            "training_growth_ratio": (res["md"]["peak_rss"] - res["md"]["rss_before_training"])
            / max(1, res["plain"]["peak_rss"] - res["plain"]["rss_before_training"]),
        }
    return out


def section_recompiles(args: argparse.Namespace) -> dict:
    """Graphs compiled over 200 steps with an LR scheduler and the retraction."""
    from torch._dynamo.utils import counters

    counters.clear()
    _, md = build_pair(compiled=True, sched=True, batch=2, seq=64)
    for _ in range(2):
        md.step()
    after_warmup = counters["stats"]["unique_graphs"]
    for _ in range(args.recompile_steps):
        md.step()
    return {
        "steps": args.recompile_steps,
        "graphs_after_warmup": after_warmup,
        "graphs_at_end": counters["stats"]["unique_graphs"],
        "recompiles_after_warmup": counters["stats"]["unique_graphs"] - after_warmup,
        "graph_breaks": sum(counters["graph_break"].values()),
        "lr_changed": md.opt.param_groups[0]["lr"] != 1e-3,
    }


SECTIONS = {
    "step": section_step,
    "retraction": section_retraction,
    "optstep": section_optstep,
    "compile": section_compile,
    "memory": section_memory,
    "recompiles": section_recompiles,
    "small": section_small,
}
CHILD_ONLY = {
    "compile_child": section_compile_child,
    "memory_child": section_memory_child,
    "pair_child": section_pair_child,
    "retraction_child": section_retraction_child,
    "optstep_child": section_optstep_child,
}


# --- driver ----------------------------------------------------------------------------


_ENV: dict[str, str] = {}


def _child(extra: list[str], cold: bool = False, env_extra: dict | None = None) -> dict:
    env = {**os.environ, **_ENV, "TORCHINDUCTOR_COMPILE_THREADS": "1", **(env_extra or {})}
    with tempfile.TemporaryDirectory() as cache:
        if cold:
            env.update(
                TORCHINDUCTOR_CACHE_DIR=cache,
                TORCHINDUCTOR_FX_GRAPH_CACHE="0",
                TORCHINDUCTOR_AUTOGRAD_CACHE="0",
            )
        out = subprocess.run(
            [sys.executable, __file__, "--child", *extra, *_PASS],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    sys.stderr.write(
        out.stderr
        if out.returncode
        else "".join(ln + "\n" for ln in out.stderr.splitlines() if ln.startswith("  "))
    )
    if out.returncode:
        raise RuntimeError(f"benchmark child {extra} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


_PASS: list[str] = []
OPAQUE = {"MDPARAM_OPAQUE_FUSE": "1"}  # mdparam's fuse as an opaque op under torch.compile


def _version_of(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument(
        "--allocators", nargs="*", default=["default", "tuned"], choices=["default", "tuned"]
    )
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
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--section", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="eager", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--factored", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    # Every child gets these: sections that start timing processes run in a child too.
    _PASS.extend(
        [
            "--processes",
            str(args.processes),
            "--repeats",
            str(args.repeats),
            "--compile-repeats",
            str(args.compile_repeats),
            "--recompile-steps",
            str(args.recompile_steps),
        ]
    )
    if args.child:
        fn = {**SECTIONS, **CHILD_ONLY}[args.section]
        print(json.dumps(fn(args)))
        return
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "speed.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["machine"] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mdparam": mdparam.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "heavyball": _version_of("heavyball"),
    }
    results["workload"] = {
        "model": "examples/gpt.py GPT",
        "config": vars(BENCH_GPT),
        "parameters": 27_341_312,
        "tokens_per_step": "8 x 128",
        "optimizer": "AdamW (plain: weight_decay 0.1, one group; MD: mdparam.param_groups) + mdparam.Retraction",
        "repeats": args.repeats,
    }
    for alloc in args.allocators:
        _ENV.clear()
        if alloc == "tuned":
            _ENV["GLIBC_TUNABLES"] = GLIBC_TUNED
        for name in args.sections:
            if alloc == "tuned" and name in ("compile", "recompiles"):
                continue  # the allocator does not change what is compiled
            print(f"[{alloc}] {name} ...", file=sys.stderr, flush=True)
            t0 = time.time()
            res = (
                SECTIONS[name](args)
                if name == "compile" or name == "memory"
                else _child(["--section", name])
            )
            res["seconds"] = round(time.time() - t0, 1)
            results.setdefault(alloc, {})[name] = res
            path.write_text(json.dumps(results, indent=2) + "\n")  # keep partial results
    (out_dir / "speed.md").write_text(render(results))
    plot(results, out_dir / "speed.png")
    from readme import insert_if_committed

    insert_if_committed("speed", render(results), out_dir)
    print(render(results))


# The issues' targets for MD / plain ratios, by their place in the results: one
# definition for the README table and the plot.
TARGETS = {
    ("step", "eager_fp32", "ratio"): "1.05",
    ("step", "compiled_fp32", "ratio"): "1.02",
    ("retraction", "retract_over_bound"): "1.1",
    ("compile", "ratio"): "1.2",
    ("optstep", "md_compiled_step_over_plain", "ratio"): "1.00",
    ("optstep", "md_compiled_step_over_plain_compiled_opt", "ratio"): "1.02",
}


def _result(r: dict, alloc: str, keys: tuple[str, ...]) -> object:
    """The value at ``keys`` in one allocator's results, or None where the run has none."""
    node = r.get(alloc, {})
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


def _target(keys: tuple[str, ...]) -> str:
    return f"<= {TARGETS[keys]}x" if keys in TARGETS else ""


def plot(r: dict, path: Path) -> None:
    """A bar chart of the main MD / plain ratios against their targets (both allocators)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        ("step, eager fp32", ("step", "eager_fp32", "ratio")),
        ("step, compiled fp32", ("step", "compiled_fp32", "ratio")),
        ("step, eager bf16", ("step", "eager_bf16", "ratio")),
        ("step, compiled bf16", ("step", "compiled_bf16", "ratio")),
        ("retraction / copy bound", ("retraction", "retract_over_bound")),
        ("cold compile", ("compile", "ratio")),
        ("cold compile, opaque fuse", ("compile", "opaque_fuse_ratio")),
        ("peak RSS, eager", ("memory", "eager", "peak_ratio")),
        ("compile_step / plain (eager opt)", ("optstep", "md_compiled_step_over_plain", "ratio")),
        ("heavyball / plain (eager opt)", ("optstep", "heavyball_over_plain", "ratio")),
        (
            "compile_step / plain (compiled opt)",
            ("optstep", "md_compiled_step_over_plain_compiled_opt", "ratio"),
        ),
    ]

    def get(alloc: str, keys: tuple[str, ...]) -> float:
        v = _result(r, alloc, keys)
        return v if isinstance(v, int | float) else float("nan")

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    ys = range(len(rows))
    for off, alloc, color in ((-0.2, "default", "tab:blue"), (0.2, "tuned", "tab:orange")):
        vals = [get(alloc, keys) - 1 for _, keys in rows]
        label = "default allocator" if alloc == "default" else "GLIBC_TUNABLES set"
        ax.barh([y + off for y in ys], vals, height=0.38, left=1, color=color, label=label)
    for y, (_, keys) in zip(ys, rows):
        if keys in TARGETS:
            target = float(TARGETS[keys])
            ax.plot([target, target], [y - 0.45, y + 0.45], color="black", lw=2)
    ax.plot([], [], color="black", lw=2, label="target")
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_yticks(list(ys), [label for label, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("MD / plain (1 = no cost)")
    ax.set_title(f"mdparam speed suite, benchmark GPT, {r.get('machine', {}).get('date', '')}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(r: dict) -> str:
    """The Markdown table the README shows."""

    def get(alloc: str, *keys: str) -> object:
        v = _result(r, alloc, keys)
        return "–" if v is None else v

    def x(v: object, fmt: str = "{:.3f}x") -> str:
        return fmt.format(v) if isinstance(v, int | float) else "–"

    rows = [
        ("train step, eager fp32", ("step", "eager_fp32", "ratio")),
        ("train step, compiled fp32", ("step", "compiled_fp32", "ratio")),
        ("train step, eager bf16 autocast", ("step", "eager_bf16", "ratio")),
        ("train step, compiled bf16 autocast", ("step", "compiled_bf16", "ratio")),
        (
            "retraction / copy of the same bytes (bandwidth bound)",
            ("retraction", "retract_over_bound"),
        ),
        (
            "the same, Retraction(compile=True) (not the CPU default)",
            ("retraction", "retract_compiled_over_bound"),
        ),
        ("cold compile time", ("compile", "ratio")),
        (
            "cold compile time, fuse as an opaque op (MDPARAM_OPAQUE_FUSE=1)",
            ("compile", "opaque_fuse_ratio"),
        ),
        (
            "train step, compiled fp32, fuse as an opaque op (MDPARAM_OPAQUE_FUSE=1)",
            ("step", "compiled_fp32_opaque_fuse", "ratio"),
        ),
        ("peak RSS, eager", ("memory", "eager", "peak_ratio")),
        ("peak RSS, compiled", ("memory", "compiled", "peak_ratio")),
    ]
    lines = [
        "| MD / plain | default allocator | GLIBC_TUNABLES set | target |",
        "|---|---|---|---|",
    ]
    for label, keys in rows:
        lines.append(
            f"| {label} | {x(get('default', *keys))} | {x(get('tuned', *keys))} | {_target(keys)} |"
        )
    frac = ("retraction", "retract_fraction_of_compiled_step")
    lines.append(
        f"| retraction as a share of a compiled MD step | {x(get('default', *frac), '{:.2%}')} "
        f"| {x(get('tuned', *frac), '{:.2%}')} | <= 0.5% |"
    )
    for label, key, target in (
        (
            "MD step with mdparam.compile_step / plain step (optimizer eager)",
            "md_compiled_step_over_plain",
            _target(("optstep", "md_compiled_step_over_plain", "ratio")),
        ),
        (
            "heavyball HyperBallAdamW step / plain step (optimizer eager)",
            "heavyball_over_plain",
            "MD at or ahead",
        ),
        (
            "MD step with compile_step / plain step with compiled optimizer",
            "md_compiled_step_over_plain_compiled_opt",
            _target(("optstep", "md_compiled_step_over_plain_compiled_opt", "ratio")),
        ),
        (
            "the same, retraction captured in the step's graph (Retraction(compile=True))",
            "md_retraction_in_graph_over_plain_compiled_opt",
            "",
        ),
        (
            "plain step with compiled optimizer / plain step (optimizer eager)",
            "plain_compiled_opt_over_plain",
            "",
        ),
    ):
        lines.append(
            f"| {label} | {x(get('default', 'optstep', key, 'ratio'))} | {x(get('tuned', 'optstep', key, 'ratio'))} | {target} |"
        )
    cf = ("retraction", "copy_fraction_of_compiled_step")
    lines.append(
        f"| a copy of the directions (the bound) as a share of a compiled MD step "
        f"| {x(get('default', *cf), '{:.2%}')} | {x(get('tuned', *cf), '{:.2%}')} | |"
    )
    rel = ("retraction", "relative_fraction_of_compiled_step")
    lines.append(
        f"| relative-step mode (record D + rescale the step + retract) as a share of a compiled MD step "
        f"| {x(get('default', *rel), '{:.2%}')} | {x(get('tuned', *rel), '{:.2%}')} | |"
    )
    rec = ("recompiles", "recompiles_after_warmup")
    lines.append(
        f"| recompiles after warm-up, {get('default', 'recompiles', 'steps')} steps with LR scheduler + retraction "
        f"| {get('default', *rec)} | {get('tuned', *rec)} | 0 |"
    )
    for mode in ("eager", "compiled"):
        for what, field in (("MD", "ratio"), ("MD, factored forward", "factored_ratio")):
            cells = []
            for alloc in ("default", "tuned"):
                vals = [get(alloc, "small", f"{mode}_{t}", field) for t in (8, 16, 32, 64)]
                cells.append(" / ".join(x(v, "{:.2f}") for v in vals))
            lines.append(
                f"| train step, {mode}, {what}, 8 / 16 / 32 / 64 tokens per call | {cells[0]} | {cells[1]} | |"
            )
    m = r.get("machine", {})
    bw = get("default", "retraction", "copy_bandwidth_GBps")
    return (
        "\n".join(lines)
        + f"\n\nMachine: {m.get('cpu_count')} cores, {m.get('platform')}, torch {m.get('torch')}, "
        f"measured {m.get('date')}. Copy bandwidth in the retraction run: {x(bw, '{:.1f} GB/s')}. "
        "Command: `./run bench` (results in benchmarks/results/speed.json).\n"
    )


if __name__ == "__main__":
    main()
