"""Where MD's extra step time goes: torch.profiler on plain and MD steps of the benchmark GPT.

    ./run python -m benchmarks.profile_step            # eager and compiled

For each mode, profiles a few steps of each side and lists the operators whose
self CPU time per step grew most from plain to MD (benchmarks/results/profile.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.workloads import ROOT, build_pair


def per_step_self_ms(step, steps: int) -> tuple[dict[str, float], float]:
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    table = {e.key: e.self_cpu_time_total / 1000 / steps for e in prof.key_averages()}
    return table, sum(table.values())


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "profile.md"))
    args = p.parse_args()
    lines = [
        "Self CPU time per step by operator, MD minus plain (`./run python -m benchmarks.profile_step`, "
        f"torch.profiler, {args.steps} steps each after 2 warm-up steps, the benchmark GPT, 8x128 tokens, "
        f"torch {torch.__version__}).",
        "",
    ]
    for mode in ("eager", "compiled"):
        plain, md = build_pair(compiled=mode == "compiled")
        a, ta = per_step_self_ms(plain.step, args.steps)
        b, tb = per_step_self_ms(md.step, args.steps)
        diff = sorted(((b.get(k, 0.0) - a.get(k, 0.0), k) for k in set(a) | set(b)), reverse=True)
        lines += [
            f"**{mode}**: plain {ta:.0f} ms, MD {tb:.0f} ms per step (+{tb - ta:.0f} ms, {tb / ta:.3f}x)",
            "",
            "| operator | plain ms/step | MD ms/step | MD - plain |",
            "|---|---|---|---|",
        ]
        for d, k in diff[: args.top]:
            lines.append(f"| `{k[:70]}` | {a.get(k, 0.0):.2f} | {b.get(k, 0.0):.2f} | {d:+.2f} |")
        lines.append("")
        del plain, md
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
