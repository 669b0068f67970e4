"""How the eager retraction should group its work: per tensor, or chunks of whole tensors.

    ./run python -m benchmarks.retraction_chunks [--processes 3] [--report]
    OMP_WAIT_POLICY=ACTIVE ./run python -m benchmarks.retraction_chunks --tag omp_active

For a few model shapes (the shape matrix's GPT, eager AdamW steps), each in fresh
processes, times the retraction's tensor work (with its norm check) against a copy of
the same tensors, interleaved (medians): the per-tensor loop (``retract_``, one norm and
one multiply per direction) and ``mdparam._retraction.RetractionGroups`` with chunks
of 2, 8 and 32 MiB and with no limit (the default). Timed alone, then right after
training steps with the order rotated so that each variant goes first as often as the
others. Results: benchmarks/results/retraction_chunks.{json,md}; docs/performance.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
SHAPES = {"w256 d4": (256, 4), "w512 d4": (512, 4), "w1024 d4": (1024, 4), "w512 d8": (512, 8)}
CHUNKS = {"per tensor": "loop", "2 MiB": 2 << 20, "8 MiB": 8 << 20, "32 MiB": 32 << 20}
CHUNKS["no limit (default)"] = None


def variants(retraction) -> dict:
    """The copy (the bound) and one function per way of grouping the retraction."""
    import torch

    from benchmarks.workloads import copier
    from mdparam._retraction import RetractionGroups, retract_, retract_grouped_

    r = retraction
    dirs, radii = [d.detach() for d in r.directions], r.radii()
    ops = {"copy": copier(dirs)}
    for name, size in CHUNKS.items():
        if size == "loop":

            def run() -> None:
                r.check_norms(retract_(dirs, r.spheres, r.layouts, radii))

        else:
            groups = RetractionGroups(dirs, r.spheres, r.layouts, chunk_bytes=size)

            def run(groups=groups) -> None:
                r.check_norms(retract_grouped_(dirs, r.spheres, r.layouts, radii, groups))

        ops[name] = torch.no_grad()(run)
    return ops


def child(shape: str, repeats: int) -> dict:
    """One process: every variant alone, then right after eager training steps."""
    from benchmarks.workloads import build_pair, timed
    from examples.gpt import GPTConfig

    width, depth = SHAPES[shape]
    gpt = GPTConfig(256, 256, depth, width // 64, width)
    _, md = build_pair(gpt, compiled=False, batch=4, seq=256)
    ops = variants(md.retraction)
    alone = {k: [] for k in ops}
    inside = {k: [] for k in ops}
    for _ in range(repeats):
        for k, f in ops.items():
            alone[k].append(timed(f))
    names = list(ops)
    for _ in range(max(1, repeats // 3)):
        for i in range(len(names)):
            md.step()
            for k in names[i:] + names[:i]:
                inside[k].append(timed(ops[k]))
    tensors = len(md.retraction.directions)
    return {"alone": _ratios(alone), "inside": _ratios(inside), "tensors": tensors}


def _ratios(times: dict) -> dict:
    copy = statistics.median(times["copy"])
    return {k: statistics.median(v) / copy for k, v in times.items() if k != "copy"}


def render(data: dict) -> str:
    lines = [
        "| shape (directions) | timed | " + " | ".join(CHUNKS) + " |",
        "|---|---|" + "---|" * len(CHUNKS),
    ]
    for shape, runs in data["shapes"].items():
        if not runs:
            continue
        for where, label in (("alone", "alone"), ("inside", "after a step")):
            cells = []
            for name in CHUNKS:
                vals = [r[where][name] for r in runs]
                cells.append(f"{statistics.median(vals):.2f} ({min(vals):.2f}-{max(vals):.2f})")
            lines.append(
                f"| {shape} ({runs[0]['tensors']}) | {label} | " + " | ".join(cells) + " |"
            )
    lines += [
        "",
        f"Retraction / copy of the same tensors: the median over {data['processes']} fresh "
        "processes (their range in parentheses) of the ratio of medians; eager AdamW steps, "
        "vocab 256, 4x256 tokens. Command: "
        f"`{_env_prefix(data)}./run python -m benchmarks.retraction_chunks`.",
    ]
    return "\n".join(lines) + "\n"


def _env_prefix(data: dict) -> str:
    return "".join(f"{k}={v} " for k, v in data.get("env", {}).items())


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--processes", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--shapes", nargs="*", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--tag", default="", help="results file suffix (say, for an env variant)")
    p.add_argument("--report", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.repeats)))
        return
    stem = "retraction_chunks" + (f"_{args.tag}" if args.tag else "")
    path = RESULTS / f"{stem}.json"
    if args.report:
        data = json.loads(path.read_text())
    else:
        from tqdm import tqdm

        env = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") if k in os.environ}
        data = {"processes": args.processes, "env": env, "shapes": {s: [] for s in args.shapes}}
        todo = [
            s for _ in range(args.processes) for s in args.shapes
        ]  # every shape once, then again
        for shape in tqdm(todo, desc="processes", unit="process"):
            cmd = [sys.executable, "-m", "benchmarks.retraction_chunks", "--child", shape]
            cmd += ["--repeats", str(args.repeats)]
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
            data["shapes"][shape].append(json.loads(out.strip().splitlines()[-1]))
            path.write_text(json.dumps(data, indent=1) + "\n")
    text = render(data)
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
