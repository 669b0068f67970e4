"""Reproduce the paper's claims at CPU scale: each method tuned on the same LR grid, three widths.

    ./run python -m benchmarks.reproduce                         # the full sweep (resumes)
    ./run python -m benchmarks.reproduce --methods md-adamw --widths 64
    ./run python -m benchmarks.reproduce --report                # tables and plots only

Every method (examples/methods.py says what each is) is trained at each
width on a learning-rate grid with a factor sqrt(2) between points, starting
from 7 points around the method's usual LR and extended on whichever side
the best LR sits until the best is interior. At each method's best LR, two
more seeds run. Runs are eager (no compile: the same maths, and compiling
hundreds of runs would cost more than training them), one thread each, as
many in parallel as --workers.

Everything is saved after each run to benchmarks/results/reproduce.json, so an
interrupted sweep resumes where it stopped. The report writes reproduce.md
(docs/reproduction.md's table), reproduce_lr.png (validation loss against LR, per
method and width) and reproduce_curves.png (loss curves at the best LRs).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
from dataclasses import asdict
from pathlib import Path

from benchmarks.readme import insert_if_committed
from benchmarks.runs import RESULTS, load, resume, run_rounds, score
from examples.methods import METHODS, RunConfig, base_optimizer, other_lr_of

CENTER = {  # middle of the first grid; the grid then follows the results
    "adamw": 2e-3,
    "md-adamw": 1e-3,
    "md-adamw-relative": 4e-3,
    "muon": 2.828e-2,
    "md-muon": 3e-2,
    "sphere": 1e-3,
}
FIRST_GRID = range(-2, 3)


def secondary_lrs(method: str) -> dict[str, float]:
    """The LRs besides the swept one that a method's runs use, for the results' settings.

    Each was tuned at width 128 with the same budget (benchmarks/ablation.py) and then
    fixed: the AdamW LR for embeddings, head and norms (MD: mdparam.recipe's choice;
    baselines: methods.BASELINE_OTHER_LR) and the MD gain LR (RunConfig's, the recipe's).
    """
    from mdparam._recipe import base_optimizer_of

    cfg = RunConfig(method=method)
    if method.startswith("md-"):
        base = base_optimizer_of(base_optimizer(method))
        return {"other_lr": base.other_lr, "gain_lr": cfg.gain_lr}
    return {"other_lr": other_lr_of(cfg), **({"split_lr": True} if method == "adamw" else {})}


MAX_POINTS = 15


def grid_lr(method: str, k: int) -> float:
    """Grid point k (any integer) of a method: CENTER * sqrt(2)^k, rounded for stable keys."""
    return float(f"{CENTER[method] * 2 ** (k / 2):.4g}")


def key(method: str, width: int, k: int, seed: int) -> str:
    return f"{method}|w{width}|k{k}|s{seed}"


def runs_of(
    data: dict, method: str, width: int, seed: int | None = 0, horizon: int = 1
) -> dict[int, dict]:
    """Grid index -> run, for one method, width, seed (None: any) and horizon."""
    out = {}
    for r in data["runs"].values():
        c = r["config"]
        if (
            c["method"] == method
            and c["width"] == width
            and (seed is None or c["seed"] == seed)
            and r.get("horizon", 1) == horizon
        ):
            out[r["k"]] = r
    return out


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
            ks: set[int] = set(FIRST_GRID) if not runs else set()
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
    return jobs + horizon_jobs(data, args)


def horizon_jobs(data: dict, args: argparse.Namespace) -> list[dict]:
    """The horizon check: each method's best LR at width 128, --horizon times the steps.

    Runs once that method's grid at that width is settled (best LR interior, seeds done).
    """
    if args.horizon <= 1 or args.horizon_width not in args.widths:
        return []
    jobs = []
    for method in args.methods:
        best = settled_best(data, method, args.horizon_width, args.seeds)
        if best is None:
            continue
        for seed in range(args.horizon_seeds):
            jobs.append(job(method, args.horizon_width, best, seed, args, args.horizon))
    return jobs


def settled_best(data: dict, method: str, width: int, seeds: int) -> int | None:
    runs = runs_of(data, method, width)
    best = best_k(data, method, width)
    if best is None or not (min(runs) < best < max(runs)):
        return None
    done = all(best in runs_of(data, method, width, s) for s in range(1, seeds + 1))
    return best if done else None


def job(
    method: str, width: int, k: int, seed: int, args: argparse.Namespace, horizon: int = 1
) -> dict:
    cfg = RunConfig(
        method=method,
        width=width,
        depth=args.depth,
        heads=max(1, width // 32),
        block=args.block,
        batch=args.batch,
        steps=args.steps * horizon,
        lr=grid_lr(method, k),
        split_lr=method == "adamw",  # its own LR for embeddings, head, norms (ablation)
        seed=seed,
        compile=False,
        eval_batches=args.eval_batches,
        threads=1,
    )
    tag = key(method, width, k, seed) + (f"|h{horizon}" if horizon > 1 else "")
    return {"key": tag, "k": k, "horizon": horizon, "config": asdict(cfg)}


def recipe_settings() -> dict:
    """The knobs every run shares, recorded so that a resumed sweep cannot mix recipes."""
    cfg = RunConfig()
    knobs = ("gain_lr", "init", "out_scale", "embed_head", "clip_scope", "clip")
    return {**{k: getattr(cfg, k) for k in knobs}, "weight_decay": cfg.weight_decay}


def sweep(args: argparse.Namespace, path: Path) -> None:
    settings = {
        "depth": args.depth,
        "steps": args.steps,
        "batch": args.batch,
        "block": args.block,
        "tokens_per_run": args.steps * args.batch * args.block,
        "secondary_lrs": {m: secondary_lrs(m) for m in METHODS},
        "eval_batches": args.eval_batches,
        "grid_factor": "sqrt(2)",
        "recipe": recipe_settings(),
    }
    data = resume(path, settings)
    run_rounds(path, data, lambda d: next_jobs(d, args), args.workers)


# --- report ------------------------------------------------------------------------------


def seed_runs(data: dict, method: str, width: int, k: int, horizon: int = 1) -> list[dict]:
    """Every seed's run at one grid point."""
    return [
        r
        for r in data["runs"].values()
        if r["config"]["method"] == method
        and r["config"]["width"] == width
        and r["k"] == k
        and r.get("horizon", 1) == horizon
    ]


def summarize(data: dict) -> dict:
    out = {}
    methods = sorted({r["config"]["method"] for r in data["runs"].values()}, key=METHODS.index)
    widths = sorted({r["config"]["width"] for r in data["runs"].values()})
    for m in methods:
        for w in widths:
            b = best_k(data, m, w)
            if b is None:
                continue
            seeds = seed_runs(data, m, w, b)
            vals = [score(r) for r in seeds]
            runs = runs_of(data, m, w)
            out[(m, w)] = {
                "best_lr": seeds[0]["config"]["lr"],
                "best_k": b,
                "interior": min(runs) < b < max(runs),
                "mean": statistics.mean(vals),
                "spread": (max(vals) - min(vals)) / 2 if len(vals) > 1 else float("nan"),
                "n_seeds": len(vals),
            }
    return out


PAIRS = (("md-muon", "muon"), ("md-adamw", "adamw"), ("md-adamw-relative", "adamw"))


def gaps_table(s: dict, widths: list[int]) -> str:
    pairs = [(a, b) for a, b in PAIRS if any((a, w) in s and (b, w) in s for w in widths)]
    if not pairs:
        return ""
    lines = [
        "| width | " + " | ".join(f"{a} − {b}" for a, b in pairs) + " |",
        "|---|" + "---|" * len(pairs),
    ]
    for w in widths:
        cells = [
            f"{s[(a, w)]['mean'] - s[(b, w)]['mean']:+.3f}" if (a, w) in s and (b, w) in s else "–"
            for a, b in pairs
        ]
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def horizon_table(data: dict, s: dict) -> str:
    """Each method's best width-128 configuration at 1x and at the longer horizon."""
    rows = []
    for r in data["runs"].values():
        h = r.get("horizon", 1)
        if h > 1:
            rows.append((r["config"]["method"], r["config"]["width"], r["k"], h))
    if not rows:
        return ""
    h = max(x[3] for x in rows)
    width = rows[0][1]
    methods = sorted({x[0] for x in rows}, key=METHODS.index)
    short, long_ = {}, {}
    for m in methods:
        if (m, width) not in s:
            continue
        k = s[(m, width)]["best_k"]
        short[m] = [score(r) for r in seed_runs(data, m, width, k)]
        long_[m] = [score(r) for r in seed_runs(data, m, width, k, h)]
    steps = data.get("settings", {}).get("steps", 0)
    rank = {
        which: {m: i + 1 for i, m in enumerate(sorted(d, key=lambda m: statistics.mean(d[m])))}
        for which, d in (("short", short), ("long", {m: v for m, v in long_.items() if v}))
    }
    lines = [
        f"| method (width {width}, its best LR) | {steps} steps | rank | {steps * h} steps | rank |",
        "|---|---|---|---|---|",
    ]
    for m in methods:
        if m not in short:
            continue
        a, b = short[m], long_.get(m) or []
        cell_b = (
            f"{statistics.mean(b):.3f} ± {(max(b) - min(b)) / 2:.3f} ({len(b)} seeds)" if b else "–"
        )
        lines.append(
            f"| {m} (lr {s[(m, width)]['best_lr']:.3g}) | {statistics.mean(a):.3f} ± "
            f"{(max(a) - min(a)) / 2:.3f} ({len(a)} seeds) | {rank['short'][m]} | {cell_b} | "
            f"{rank['long'].get(m, '–')} |"
        )
    return "\n".join(lines) + "\n"


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
        f"{hours:.1f} h of wall time on this machine. Command: `./run python -m benchmarks.reproduce`.\n"
    )
    gaps = gaps_table(s, widths)
    if gaps:
        text += (
            "\nMD minus its baseline (negative: MD better), seed means at each best LR:\n\n" + gaps
        )
    horizon = horizon_table(data, s)
    if horizon:
        text += "\nHorizon check (each method's best LR at width 128, run longer):\n\n" + horizon
    (out_dir / "reproduce.md").write_text(text)
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
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--seeds", type=int, default=2, help="extra seeds at each best LR")
    p.add_argument("--horizon", type=int, default=4, help="steps multiple of the horizon check")
    p.add_argument("--horizon-width", type=int, default=128)
    p.add_argument("--horizon-seeds", type=int, default=2)
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
