"""The speed suite's measurements: its sections, the child processes they run in, and the record.

Every section is a function of the parsed command line that returns a JSON-able
dict. Sections in ``SECTIONS`` are what ``--sections`` chooses from; the ones in
``CHILD_ONLY`` are the single-process measurements those start through
``CHILDREN`` (``python -m benchmarks.speed --child --section NAME``, in the
repository root), so each variant gets a fresh process: its own compile caches
and its own peak memory.
"""

from __future__ import annotations

import argparse
import gc
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
from dataclasses import dataclass, field

import torch

import mdparam
from benchmarks.fused_step import OPTIMIZERS as RECIPE_OPTIMIZERS
from benchmarks.fused_step import SIDES as RECIPE_SIDES
from benchmarks.fused_step import build_side
from benchmarks.workloads import (
    BENCH_GPT,
    ROOT,
    build_factored,
    build_optimizer_variants,
    build_pair,
    copier,
    interleaved,
    summary,
    timed,
)

COMMAND = "benchmarks.speed"  # the module the children run (python -m, from the root)
GLIBC_TUNED = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"
ALLOCATORS = {"default": {}, "tuned": {"GLIBC_TUNABLES": GLIBC_TUNED}}  # environment of each
ALLOCATOR_INDEPENDENT = ("compile", "recompiles")  # the allocator does not change what is compiled
IN_PARENT = ("compile", "memory")  # sections that start every variant's process themselves
OPAQUE = {"MDPARAM_BENCH_FUSE": "opaque"}  # workloads.py registers with fuse="opaque"


# --- child processes -------------------------------------------------------------------


@dataclass
class Children:
    """How sections start their child processes: ``benchmarks.speed --child`` with these extras."""

    env: dict[str, str] = field(default_factory=dict)  # the allocator of the current pass
    flags: list[str] = field(default_factory=list)  # the options every child gets

    def run(self, extra: list[str], cold: bool = False, env_extra: dict | None = None) -> dict:
        """One child process; its last stdout line is its result. ``cold``: no compile caches."""
        env = {**os.environ, **self.env, "TORCHINDUCTOR_COMPILE_THREADS": "1", **(env_extra or {})}
        with tempfile.TemporaryDirectory() as cache:
            if cold:
                env.update(
                    TORCHINDUCTOR_CACHE_DIR=cache,
                    TORCHINDUCTOR_FX_GRAPH_CACHE="0",
                    TORCHINDUCTOR_AUTOGRAD_CACHE="0",
                )
            out = subprocess.run(
                [sys.executable, "-m", COMMAND, "--child", *extra, *self.flags],
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


CHILDREN = Children()


def child_flags(args: argparse.Namespace) -> list[str]:
    """The options every child gets: sections that start timing processes run in a child too."""
    return [
        "--processes",
        str(args.processes),
        "--repeats",
        str(args.repeats),
        "--compile-repeats",
        str(args.compile_repeats),
        "--recompile-steps",
        str(args.recompile_steps),
    ]


def run_section(name: str, args: argparse.Namespace) -> dict:
    """One section of ``SECTIONS``: in this process if it starts its own children, else in one."""
    return SECTIONS[name](args) if name in IN_PARENT else CHILDREN.run(["--section", name])


# --- sections --------------------------------------------------------------------------


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


def _pair_flags(variant: dict) -> list[str]:
    """The ``pair_child`` command line of one variant of ``pairs``."""
    flags = [
        "--mode",
        variant["mode"],
        "--dtype",
        variant.get("dtype", "fp32"),
        "--batch",
        str(variant.get("batch", 8)),
        "--seq",
        str(variant.get("seq", 128)),
    ]
    if variant.get("factored"):
        flags.append("--factored")
    return ["--section", "pair_child", *flags]


def pairs(args: argparse.Namespace, variants: list[dict]) -> dict:
    """Run every variant in ``args.processes`` fresh processes (interleaved); combine."""
    runs: dict[str, list[dict]] = {v["key"]: [] for v in variants}
    for _ in range(args.processes):
        for v in variants:
            runs[v["key"]].append(CHILDREN.run(_pair_flags(v), env_extra=v.get("env")))
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
    return pairs(args, variants)


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
    return pairs(argparse.Namespace(**{**vars(args), "processes": 1}), variants)


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
    runs = [CHILDREN.run(["--section", "optstep_child"]) for _ in range(args.processes)]
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
    copy_all = copier(retract.directions)

    # The relative-step mode's work around one step: record D before it, rescale the step after.
    relative = mdparam.Retraction(md.model, relative_step=True)
    relative.attach(torch.optim.SGD(mdparam.param_groups(md.model, lr=0.0)))

    def relative_step() -> None:  # what the pre- and post-step hooks do around one step
        relative.relative.record()
        relative()

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
        "direction_elements": sum(d.numel() for d in retract.directions),
        "retract_s": r,
        "retract_compiled_s": rc,
        "relative_s": rel,
        "copy_s": c,
        "compiled_md_step_s": s,
    }


def section_retraction(args: argparse.Namespace) -> dict:
    """Retraction time vs a copy of the same tensors (one read + one write per element), per process."""
    runs = [CHILDREN.run(["--section", "retraction_child"]) for _ in range(args.processes)]
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
            res = CHILDREN.run(
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
    """Peak resident memory of 5 steps of one variant (the other one freed first)."""
    plain, md = build_pair(compiled=args.compiled)
    side = plain if args.variant == "plain" else md
    other = md if args.variant == "plain" else plain
    del other
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
            res[variant] = CHILDREN.run(["--section", "memory_child", "--variant", variant, *extra])
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


def section_recipe_child(args: argparse.Namespace) -> dict:
    """One process: plain torch, the fused recipe and the formed recipe, interleaved, for the
    base optimizer ``--variant`` (benchmarks/fused_step.py builds the three steps)."""
    sides = {s: build_side(s, BENCH_GPT, args.variant) for s in RECIPE_SIDES}
    t = interleaved(sides, repeats=args.repeats, warmup=3)
    out = {k: summary(v) for k, v in t.items()}
    for side in ("fused", "formed"):
        out[f"{side}_ratio"] = statistics.median(t[side]) / statistics.median(t["plain"])
    return out


def section_recipe(args: argparse.Namespace) -> dict:
    """The recipe's whole step (compiled model, clipping at 1.0) / plain torch's, fused and
    formed, with AdamW and with Muon."""
    out = {}
    for opt in RECIPE_OPTIMIZERS:
        runs = [
            CHILDREN.run(["--section", "recipe_child", "--variant", opt])
            for _ in range(args.processes)
        ]
        out[opt] = {}
        for side in ("fused", "formed"):
            ratios = [r[f"{side}_ratio"] for r in runs]
            out[opt][f"{side}_ratio"] = statistics.median(ratios)
            out[opt][f"{side}_ratio_per_process"] = ratios
        print(f"  recipe {opt}: {out[opt]}", file=sys.stderr)
    return out


SECTIONS = {
    "step": section_step,
    "retraction": section_retraction,
    "optstep": section_optstep,
    "compile": section_compile,
    "memory": section_memory,
    "recompiles": section_recompiles,
    "small": section_small,
    "recipe": section_recipe,
}
CHILD_ONLY = {
    "compile_child": section_compile_child,
    "memory_child": section_memory_child,
    "pair_child": section_pair_child,
    "retraction_child": section_retraction_child,
    "optstep_child": section_optstep_child,
    "recipe_child": section_recipe_child,
}


# --- what was measured, and where ------------------------------------------------------


def version_of(dist: str) -> str | None:
    """The installed version of a distribution, or None if it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """The machine and the software versions of this run (``results["machine"]``)."""
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mdparam": mdparam.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "heavyball": version_of("heavyball"),
    }


def workload_info(repeats: int) -> dict:
    """The model, batch and optimizer every section times (``results["workload"]``)."""
    return {
        "model": "examples/gpt.py GPT",
        "config": vars(BENCH_GPT),
        "parameters": 27_341_312,
        "tokens_per_step": "8 x 128",
        "optimizer": "AdamW (plain: weight_decay 0.1, one group; MD: mdparam.param_groups) + mdparam.Retraction",
        "repeats": repeats,
    }
