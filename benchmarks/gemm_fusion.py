"""Would scaling inside the matmul beat forming W? Measured on the CPU.

    ./run python -m benchmarks.gemm_fusion [--processes 3] [--repeats 20]

MD's extra time in a compiled step is forming W = phi(r) * D * phi(c) and its
gradients (benchmarks/results/profile.md). The way around it is never to form
W: y = phi(r) * ((x * phi(c)) @ D^T), with the row scaling as an epilogue of
the matmul and the column scaling fused into whatever produced x. This
times, forward + backward, compiled (fullgraph), interleaved, a stack of four
pre-norm MLP blocks with the benchmark GPT's shapes (512 -> 2048 -> 512, 8 x 128
tokens per call):

- ``plain``: nn.Linear;
- ``md``: mdparam.register (W formed, what the library does);
- ``md_factored``: the factored forward above, inductor's default lowering;
- ``md_factored_bmm_autotune``: the same written as a batch-1 ``bmm`` under
  ``mode="max-autotune-no-cudagraphs"``. Inductor's CPU GEMM template (the
  only CPU matmul that takes a fused epilogue) is offered for ``mm`` only when
  the weight is a constant module buffer (frozen inference), for ``bmm``
  also when it is a graph input, as training weights are. The script records
  which kernels the autotuner picked.

and then the speed suite's whole GPT train step (AdamW, retraction; q/k/v/o
projections too) with W formed and with the factored forward.

Each process is fresh; the ratio's median over processes is reported. Results:
benchmarks/results/gemm_fusion.json, and a table in docs/performance.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import mdparam
from benchmarks.readme import insert_if_committed
from benchmarks.workloads import (
    ROOT,
    _factored_forward,
    build_factored,
    build_pair,
    factored_parts,
    interleaved,
    summary,
)

LABELS = {
    "md": "MLP blocks: MD, W formed (the library)",
    "md_factored": "MLP blocks: MD, factored forward, default lowering",
    "md_factored_bmm_autotune": "MLP blocks: MD, factored forward as bmm, max-autotune",
    "gpt_md": "benchmark GPT train step: MD, W formed (the library)",
    "gpt_md_factored": "benchmark GPT train step: MD, factored forward",
}


class MLPStack(nn.Module):
    """Four pre-norm residual MLP blocks sharing one set of weights' shapes."""

    def __init__(self, width: int = 512, blocks: int = 4) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))
        self.ups = nn.ModuleList(nn.Linear(width, 4 * width, bias=False) for _ in range(blocks))
        self.downs = nn.ModuleList(nn.Linear(4 * width, width, bias=False) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, up, down in zip(self.norms, self.ups, self.downs, strict=True):
            x = x + down(F.gelu(up(norm(x))))
        return x


def _bmm_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """phi(r) * ((x * phi(c)) @ D^T) as a batch-1 bmm, so a CPU GEMM template may take it."""
    d, a, b = factored_parts(self)
    xs = (x * b).reshape(1, -1, x.shape[-1])
    y = torch.bmm(xs, d.t().unsqueeze(0))
    return y.reshape(*x.shape[:-1], -1) * a


def _with_forward(model: nn.Module, forward) -> nn.Module:
    model = copy.deepcopy(model)
    for entry in mdparam.registered(model):
        entry.module.forward = types.MethodType(forward, entry.module)
    return model


def child(args: argparse.Namespace) -> dict:
    """One process: build, compile and time every variant, interleaved."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    base = MLPStack()
    md = copy.deepcopy(base)
    mdparam.register(md)
    models = {
        "plain": (base, {}),
        "md": (md, {}),
        "md_factored": (_with_forward(md, _factored_forward), {}),
        "md_factored_bmm_autotune": (
            _with_forward(md, _bmm_forward),
            {"mode": "max-autotune-no-cudagraphs"},
        ),
    }
    x = torch.randn(8 * 128, 512, generator=torch.Generator().manual_seed(1))
    steps, kernels = {}, {}
    for name, (model, options) in models.items():
        compiled = torch.compile(model, fullgraph=True, **options)
        params = list(model.parameters())

        def step(compiled=compiled, params=params) -> None:
            compiled(x).square().mean().backward()
            for p in params:
                p.grad = None

        try:
            _, code = run_and_get_code(step)
        except Exception as err:  # a compile that fails is a result here: record it
            torch._dynamo.reset()  # the variants compiled so far recompile in the warm-up
            kernels[name] = {"error": f"{type(err).__name__}: {_first_line(err)}"}
            continue
        text = "\n".join(code)
        kernels[name] = {
            "aten_matmuls": len(re.findall(r"extern_kernels\.(?:mm|addmm|bmm)\(", text)),
            # The template's C++ defines a "kernel_micro_gemm" (checked by forcing the template).
            "cpp_gemm_template": bool(re.search(r"\bkernel_micro_gemm\b", text)),
        }
        steps[name] = step
    times = interleaved(steps, repeats=args.repeats, warmup=3)
    plain = statistics.median(times["plain"])
    # The whole training step of the speed suite's GPT (AdamW + retraction), W formed or not.
    gpt_plain, gpt_md = build_pair(compiled=True)
    gpt = {"plain": gpt_plain.step, "md": gpt_md.step, "md_factored": build_factored(gpt_md).step}
    gpt_times = interleaved(gpt, repeats=args.repeats, warmup=3)
    gpt_base = statistics.median(gpt_times["plain"])
    ratios = {k: statistics.median(v) / plain for k, v in times.items() if k != "plain"}
    ratios |= {
        f"gpt_{k}": statistics.median(v) / gpt_base for k, v in gpt_times.items() if k != "plain"
    }
    return {
        "times": {k: summary(v) for k, v in times.items()}
        | {f"gpt_{k}": summary(v) for k, v in gpt_times.items()},
        "ratios": ratios,
        "kernels": kernels,
    }


def _first_line(err: Exception) -> str:
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return lines[0][:200] if lines else ""


def _autotune_log(stderr: str) -> dict[str, dict[str, float]]:
    """The autotuner's timings, {"bmm(shapes)": {choice: ms}}, from what it prints."""
    found: dict[str, dict[str, float]] = {}
    current = None
    for line in stderr.splitlines():
        if head := re.match(r"AUTOTUNE (\S+\(.*\))", line):
            current = found.setdefault(head[1], {})
        elif current is not None and (row := re.match(r"\s+(\S+) ([\d.]+) ms", line)):
            current[row[1]] = float(row[2])
        elif not line.startswith(("strides:", "dtypes:")):
            current = None  # the block of choices has ended
    return found


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def run_processes(args: argparse.Namespace) -> list[dict]:
    """``args.processes`` fresh child processes, each with cold caches; their results."""
    runs = []
    for i in range(args.processes):
        with tempfile.TemporaryDirectory() as cache:  # cold caches: autotuning really runs
            env = {
                **os.environ,
                "TORCHINDUCTOR_COMPILE_THREADS": "1",
                "TORCHINDUCTOR_CACHE_DIR": cache,
            }
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.gemm_fusion",
                    "--child",
                    "--repeats",
                    str(args.repeats),
                ],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
        if out.returncode:
            sys.stderr.write(out.stderr)
            raise SystemExit(f"benchmark process {i} failed")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        runs[-1]["autotune"] = _autotune_log(out.stderr)
        print(f"process {i}: " + str({k: round(v, 3) for k, v in runs[-1]["ratios"].items()}))
    return runs


def combine(args: argparse.Namespace, runs: list[dict]) -> dict:
    """gemm_fusion.json: the machine, the workload, the medians over processes."""
    return {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "workload": "4 pre-norm MLP blocks 512->2048->512, fwd+bwd; the speed suite's GPT "
        "train step (AdamW, retraction); 1024 tokens per call, fp32, compiled",
        "processes": args.processes,
        "repeats": args.repeats,
        "ratio": {
            k: statistics.median(got)
            if (got := [r["ratios"][k] for r in runs if k in r["ratios"]])
            else None
            for k in LABELS
        },
        "ratio_per_process": {k: [r["ratios"].get(k) for r in runs] for k in LABELS},
        "kernels": [r["kernels"] for r in runs],
        "autotune_ms": [r["autotune"] for r in runs],
    }


def _rows(result: dict, runs: list[dict]) -> list[str]:
    """The table's header and one row per variant of ``LABELS``."""
    rows = [
        "| compiled, MD / plain nn.Linear | ratio (median of processes) | per process "
        "| aten matmuls in the graphs / CPU GEMM template used |",
        "|---|---|---|---|",
    ]
    for k, label in LABELS.items():
        per = " / ".join(
            "compile failed" if v is None else f"{v:.3f}" for v in result["ratio_per_process"][k]
        )
        counts = " / ".join(
            sorted(
                {
                    f"{kern['aten_matmuls']} / {'yes' if kern['cpp_gemm_template'] else 'no'}"
                    for r in runs
                    if (kern := r["kernels"].get(k)) and "error" not in kern
                }
            )
        )
        ratio = "-" if result["ratio"][k] is None else f"{result['ratio'][k]:.3f}x"
        rows.append(f"| {label} | {ratio} | {per} | {counts or '-'} |")
    return rows


def render(args: argparse.Namespace, result: dict, runs: list[dict]) -> str:
    """The table of docs/performance.md: the rows, the autotuner's picks, failures, footer."""
    errors = sorted(
        {kern["error"] for r in runs for kern in r["kernels"].values() if "error" in kern}
    )
    tuned = [
        f"{op}: aten {min((v for c, v in t.items() if not c.startswith('cpp')), default=float('nan')):.1f} ms, "
        f"CPU GEMM template {min((v for c, v in t.items() if c.startswith('cpp')), default=float('nan')):.1f} ms"
        for op, t in runs[0]["autotune"].items()
    ]
    return (
        "\n".join(_rows(result, runs))
        + (
            "\n\nWhat the autotuner timed for the bmm variant (first process): "
            + "; ".join(tuned)
            + "."
            if tuned
            else ""
        )
        + "".join(f"\n\nCompile failure: `{e}`." for e in errors)
        + (
            f"\n\n{result['workload']}; {args.processes} fresh processes x {args.repeats} "
            f"interleaved repeats; torch {torch.__version__}. "
            "Command: `./run python -m benchmarks.gemm_fusion`."
        )
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.child:
        print(json.dumps(child(args)))
        return
    runs = run_processes(args)
    result = combine(args, runs)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gemm_fusion.json").write_text(json.dumps(result, indent=2) + "\n")
    table = render(args, result, runs)
    insert_if_committed("gemm_fusion", table, out_dir)
    print(table)


if __name__ == "__main__":
    main()
