"""Reproduce the paper's claims at CPU scale: each method tuned on the same LR grid, three widths.

    ./run python benchmarks/reproduce.py                         # the full sweep (resumes)
    ./run python benchmarks/reproduce.py --methods md-adamw --widths 64
    ./run python benchmarks/reproduce.py --report                # tables and plots only

Every method (examples/training.py says what each is) is trained at each
width on a learning-rate grid with a factor sqrt(2) between points, starting
from 7 points around the method's usual LR and extended on whichever side
the best LR sits until the best is interior. At each method's best LR, two
more seeds run. Runs are eager (no compile: the same maths, and compiling
hundreds of runs would cost more than training them), one thread each, as
many in parallel as --workers.

Everything is saved after each run to benchmarks/results/reproduce.json, so an
interrupted sweep resumes where it stopped. The report writes reproduce.md
(the README's table), reproduce_lr.png (validation loss against LR, per
method and width) and reproduce_curves.png (loss curves at the best LRs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.training import METHODS, RunConfig  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CENTER = {  # middle of the first grid; the grid then follows the results
    "adamw": 4e-3,
    "md-adamw": 1.6e-2,
    "md-adamw-relative": 2e-2,
    "muon": 2e-2,
    "md-muon": 3e-2,
    "sphere": 1.6e-2,
}
MAX_POINTS = 15


def grid_lr(method: str, k: int) -> float:
    """Grid point k (any integer) of a method: CENTER * sqrt(2)^k, rounded for stable keys."""
    return float(f"{CENTER[method] * 2 ** (k / 2):.4g}")


def key(method: str, width: int, k: int, seed: int) -> str:
    return f"{method}|w{width}|k{k}|s{seed}"


# --- worker ------------------------------------------------------------------------------

_CORPUS = None


def _init_worker() -> None:
    global _CORPUS
    import torch

    torch.set_num_threads(1)
    from examples.corpus import load_corpus

    _CORPUS = load_corpus()


def _run(job: dict) -> tuple[str, dict]:
    from examples.training import train

    cfg = RunConfig(**job["config"])
    res = train(cfg, _CORPUS)
    res.pop("_setup")
    losses = res.pop("train_losses")
    stride = max(1, len(losses) // 100)
    res["curve"] = [
        (i + 1, sum(losses[i : i + stride]) / len(losses[i : i + stride]))
        for i in range(0, len(losses), stride)
    ]
    res["k"] = job["k"]
    return job["key"], res


# --- sweep -------------------------------------------------------------------------------


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def save(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


def runs_of(data: dict, method: str, width: int, seed: int | None = 0) -> dict[int, dict]:
    out = {}
    for r in data["runs"].values():
        c = r["config"]
        if c["method"] == method and c["width"] == width and (seed is None or c["seed"] == seed):
            out[r["k"]] = r
    return out


def score(r: dict) -> float:
    v = r["val_loss"]
    return v if (v == v and not r["diverged"]) else math.inf  # NaN -> inf


def best_k(data: dict, method: str, width: int) -> int | None:
    runs = runs_of(data, method, width)
    if not runs:
        return None
    return min(runs, key=lambda k: (score(runs[k]), k))


def next_jobs(data: dict, args: argparse.Namespace) -> list[dict]:
    """What to run next: the first grid, extensions past an edge, extra seeds at the best LR."""
    jobs = []
    for method in args.methods:
        for width in args.widths:
            runs = runs_of(data, method, width)
            ks: set[int] = set(range(-3, 4)) if not runs else set()
            if runs:
                best = best_k(data, method, width)
                lo, hi = min(runs), max(runs)
                if best == lo and len(runs) < MAX_POINTS:
                    ks |= {lo - 1, lo - 2}
                elif best == hi and len(runs) < MAX_POINTS:
                    ks |= {hi + 1, hi + 2}
                elif math.isfinite(score(runs[best])):
                    for seed in range(1, args.seeds + 1):
                        if best not in runs_of(data, method, width, seed):
                            jobs.append(job(method, width, best, seed, args))
            for k in sorted(ks - set(runs)):
                jobs.append(job(method, width, k, 0, args))
    return jobs


def job(method: str, width: int, k: int, seed: int, args: argparse.Namespace) -> dict:
    cfg = RunConfig(
        method=method,
        width=width,
        depth=args.depth,
        heads=max(1, width // 32),
        block=args.block,
        batch=args.batch,
        steps=args.steps,
        lr=grid_lr(method, k),
        gain_lr=args.gain_lr,
        other_lr=args.other_lr,
        seed=seed,
        compile=False,
        eval_batches=args.eval_batches,
        threads=1,
    )
    from dataclasses import asdict

    return {"key": key(method, width, k, seed), "k": k, "config": asdict(cfg)}


def sweep(args: argparse.Namespace, path: Path) -> None:
    data = load(path)
    settings = {
        "depth": args.depth,
        "steps": args.steps,
        "batch": args.batch,
        "block": args.block,
        "tokens_per_run": args.steps * args.batch * args.block,
        "gain_lr": args.gain_lr,
        "other_lr": args.other_lr,
        "eval_batches": args.eval_batches,
        "grid_factor": "sqrt(2)",
    }
    if data["runs"] and data.get("settings") != settings:
        raise SystemExit(
            f"{path} holds runs made with other settings ({data.get('settings')}); "
            "pass --results NEW.json to start a separate sweep, or the same settings to resume"
        )
    data["settings"] = settings
    started = time.time()
    with ProcessPoolExecutor(max_workers=args.workers, initializer=_init_worker) as pool:
        while True:
            jobs = [j for j in next_jobs(data, args) if j["key"] not in data["runs"]]
            if not jobs:
                break
            print(
                f"[sweep] {len(jobs)} runs in this round ({len(data['runs'])} done)",
                file=sys.stderr,
                flush=True,
            )
            futures = {pool.submit(_run, j): j for j in jobs}
            for fut in as_completed(futures):
                k, res = fut.result()
                data["runs"][k] = res
                save(path, data)
                c = res["config"]
                print(
                    f"  {c['method']:>18} w{c['width']:<4} lr {c['lr']:<8.4g} seed {c['seed']}: "
                    f"val {res['val_loss']:.4f}{' (diverged)' if res['diverged'] else ''} "
                    f"[{res['seconds']:.0f}s]",
                    file=sys.stderr,
                    flush=True,
                )
    data.setdefault("wall_seconds", 0.0)
    data["wall_seconds"] += time.time() - started
    save(path, data)


# --- report ------------------------------------------------------------------------------


def summarize(data: dict) -> dict:
    out = {}
    methods = sorted({r["config"]["method"] for r in data["runs"].values()}, key=METHODS.index)
    widths = sorted({r["config"]["width"] for r in data["runs"].values()})
    for m in methods:
        for w in widths:
            b = best_k(data, m, w)
            if b is None:
                continue
            seeds = [
                r
                for r in data["runs"].values()
                if r["config"]["method"] == m and r["config"]["width"] == w and r["k"] == b
            ]
            vals = [r["val_loss"] for r in seeds]
            runs = runs_of(data, m, w)
            out[(m, w)] = {
                "best_lr": grid_lr(m, b) if m in CENTER else seeds[0]["lr"],
                "best_k": b,
                "interior": min(runs) < b < max(runs),
                "mean": statistics.mean(vals),
                "spread": (max(vals) - min(vals)) / 2 if len(vals) > 1 else float("nan"),
                "n_seeds": len(vals),
            }
    return out


def report(data: dict, out_dir: Path) -> str:
    s = summarize(data)
    if not s:
        return "no runs yet\n"
    methods = sorted({m for m, _ in s}, key=METHODS.index)
    widths = sorted({w for _, w in s})
    lines = [
        "| method | "
        + " | ".join(f"width {w}: val loss (best LR)" for w in widths)
        + " | optimal-LR drift, "
        f"width {widths[0]} -> {widths[-1]} |",
        "|---|" + "---|" * len(widths) + "---|",
    ]
    for m in methods:
        cells = []
        for w in widths:
            r = s.get((m, w))
            if r is None:
                cells.append("–")
                continue
            spread = f" ± {r['spread']:.3f}" if r["n_seeds"] > 1 else ""
            edge = "" if r["interior"] else " (edge)"
            cells.append(f"{r['mean']:.3f}{spread} ({r['best_lr']:.3g}{edge})")
        drift = "–"
        if (m, widths[0]) in s and (m, widths[-1]) in s:
            steps = s[(m, widths[-1])]["best_k"] - s[(m, widths[0])]["best_k"]
            drift = f"{steps:+d} grid steps ({2 ** (steps / 2):.2g}x)"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {drift} |")
    st = data.get("settings", {})
    n = len(data["runs"])
    hours = data.get("wall_seconds", 0) / 3600
    text = (
        "\n".join(lines)
        + f"\n\nValidation loss in nats per byte (mean ± half-range over {1 + max(0, min(r['n_seeds'] for r in s.values()) - 1)} seeds at the best LR; "
        f"LR in parentheses). Depth {st.get('depth')}, {st.get('steps')} steps of {st.get('batch')}x{st.get('block')} "
        f"tokens per run, LR grid factor sqrt(2), one drift step = a factor sqrt(2). {n} runs, "
        f"{hours:.1f} h of wall time on this machine. Command: `./run python benchmarks/reproduce.py`.\n"
    )
    (out_dir / "reproduce.md").write_text(text)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from readme import insert_if_committed

    insert_if_committed("reproduce", text, out_dir)
    plot(data, s, out_dir)
    return text


def plot(data: dict, s: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({m for m, _ in s}, key=METHODS.index)
    widths = sorted({w for _, w in s})
    from matplotlib.ticker import NullFormatter

    cols = 3
    rows = (len(methods) + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.4 * cols, 3.6 * rows), sharey=True, squeeze=False
    )
    flat_axes = [ax for row in axes for ax in row]
    for ax in flat_axes[len(methods) :]:
        ax.set_visible(False)
    for ax, m in zip(flat_axes, methods):
        for w in widths:
            runs = runs_of(data, m, w)
            pts = sorted((r["config"]["lr"], score(r)) for r in runs.values())
            xs = [p[0] for p in pts if math.isfinite(p[1])]
            ys = [p[1] for p in pts if math.isfinite(p[1])]
            ax.plot(xs, ys, "o-", ms=3, label=f"width {w}")
            if (m, w) in s:
                ax.plot([s[(m, w)]["best_lr"]], [s[(m, w)]["mean"]], "k*", ms=9)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{m} (star: mean of 3 seeds at the best LR)", fontsize=9)
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3, which="both")
    for row in axes:
        row[0].set_ylabel("validation loss (nats / byte)")
    axes[0][0].legend()
    lows = [v["mean"] for v in s.values()]
    axes[0][0].set_ylim(min(lows) - 0.05, min(lows) + 0.8)
    fig.tight_layout()
    fig.savefig(out_dir / "reproduce_lr.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(widths), figsize=(4.5 * len(widths), 3.6), squeeze=False)
    for ax, w in zip(axes[0], widths):
        for m in methods:
            if (m, w) not in s:
                continue
            r = runs_of(data, m, w)[s[(m, w)]["best_k"]]
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, lw=1.2, label=f"{m} (lr {r['config']['lr']:.3g})")
        ax.set_title(f"width {w}: training loss at each method's best LR")
        ax.set_xlabel("step")
        ax.set_ylim(top=3.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training loss (nats / byte)")
    fig.tight_layout()
    fig.savefig(out_dir / "reproduce_curves.png", dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    p.add_argument("--widths", nargs="*", type=int, default=[64, 128, 256])
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--gain-lr", type=float, default=1e-2)
    p.add_argument("--other-lr", type=float, default=3e-3)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--seeds", type=int, default=2, help="extra seeds at each best LR")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--results", default=str(RESULTS / "reproduce.json"))
    p.add_argument("--report", action="store_true", help="only write the tables and plots")
    args = p.parse_args()
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not args.report:
        sweep(args, path)
    print(report(load(path), path.parent))


if __name__ == "__main__":
    main()
