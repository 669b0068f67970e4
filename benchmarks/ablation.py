"""One knob at a time away from the MD recipe, 3 seeds per row: what each default is worth.

    ./run python -m benchmarks.ablation              # every row (resumes)
    ./run python -m benchmarks.ablation --report     # table and plot only

The recipe is mdparam.recipe's defaults as examples/methods.py uses them
(RECIPE below: the paper's start, gain LR 1e-3, residual output projections
on a 1/sqrt(2L) sphere, clipping on the fused weights, and embeddings and
head on a unit row sphere with head gains for Muon, plain for AdamW). Each
row changes one knob, for md-muon, md-adamw and md-adamw-relative, at width
128 (depth 2, 500 steps of 8x128 bytes) and a fixed direction LR per method
(LRS, near each method's optimum). The Muon and AdamW baselines run beside
them at their own best LRs, with knobs of their own tried the same way.

``--results`` with another file keeps a separate ablation: the first round,
which chose the defaults from a recipe with gain LR 3e-3 and embeddings and
head plain for every method, is benchmarks/results/ablation_round1.json.

Results: benchmarks/results/ablation.json, ablation.md (docs/reproduction.md's
table), ablation.png.
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import asdict
from pathlib import Path

from benchmarks.readme import insert_if_committed
from benchmarks.runs import RESULTS, load, resume, run_rounds, save, score
from examples.methods import RunConfig, base_optimizer

METHODS = ("md-muon", "md-adamw", "md-adamw-relative")
BASELINES = {"muon": 0.0283, "adamw": 0.002}  # their best LRs at width 128 (reproduce.json)
LRS = {"md-muon": 0.0424, "md-adamw": 0.000707, "md-adamw-relative": 0.004}
# The knobs each MD run starts from, per method: mdparam.recipe's defaults except other_lr,
# which stays at the 3e-3 this round ran with; its own rows below moved the recipe's
# default to 1e-2 (Muon) and 3e-2 (AdamW).
RECIPE = {
    m: {
        "init": "sphere",
        "gain_lr": 1e-3,
        "out_scale": True,
        "embed_head": "sphere-gains" if m == "md-muon" else "plain",
        "clip_scope": "fused",
        "other_lr": 3e-3,
    }
    for m in METHODS
}
VARIANTS: dict[str, dict] = {  # label -> the knob changed; a row equal to a recipe is skipped
    "recipe": {},
    "init: preserve": {"init": "preserve"},
    "gain LR 1e-3": {"gain_lr": 1e-3},
    "gain LR 3e-3": {"gain_lr": 3e-3},
    "gain LR 1e-2": {"gain_lr": 1e-2},
    "output projections: sphere not scaled": {"out_scale": False},
    "embeddings + head: plain": {"embed_head": "plain"},
    "embeddings + head: unit row sphere": {"embed_head": "sphere"},
    "embeddings + head: unit row sphere, head gains": {"embed_head": "sphere-gains"},
    "clipping: all parameters' gradients": {"clip_scope": "all"},
    "AdamW LR (embeddings, head, norms) 1e-3": {"other_lr": 1e-3},
    "AdamW LR (embeddings, head, norms) 1e-2": {"other_lr": 1e-2},
    "AdamW LR (embeddings, head, norms) 3e-2": {"other_lr": 3e-2},
    "AdamW LR (embeddings, head, norms) 1e-1": {"other_lr": 1e-1},
}


def md_rows() -> list[tuple[str, str, dict]]:
    """(method, label, knobs) of every MD row, leaving out changes that are the recipe itself."""
    rows = []
    for m in METHODS:
        for label, change in VARIANTS.items():
            if change and all(RECIPE[m].get(k) == v for k, v in change.items()):
                continue
            rows.append((m, label, {**RECIPE[m], **change}))
    return rows


# The baselines get knobs of their own, tried the same way, so both sides are tuned.
BASELINE_VARIANTS: dict[str, dict[str, dict]] = {
    "muon": {
        "weight decay 0": {"weight_decay": 0.0},
        "weight decay 0.2": {"weight_decay": 0.2},
        "AdamW LR (embeddings, head, norms) 1e-3": {"other_lr": 1e-3},
        "AdamW LR (embeddings, head, norms) 1e-2": {"other_lr": 1e-2},
        "AdamW LR (embeddings, head, norms) 3e-2": {"other_lr": 3e-2},
    },
    "adamw": {
        "weight decay 0": {"weight_decay": 0.0},
        "weight decay 0.2": {"weight_decay": 0.2},
        "no warmup": {"warmup_frac": 0.0},
        "warmup 10%": {"warmup_frac": 0.1},
        "AdamW LR (embeddings, head, norms) 1e-2": {"split_lr": True, "other_lr": 1e-2},
        "AdamW LR (embeddings, head, norms) 3e-2": {"split_lr": True, "other_lr": 3e-2},
        "AdamW LR (embeddings, head, norms) 1e-1": {"split_lr": True, "other_lr": 1e-1},
    },
}
SETTINGS = {"width": 128, "depth": 2, "heads": 4, "block": 128, "batch": 8, "steps": 500}


def jobs(seeds: int) -> list[dict]:
    out = []
    rows = [(m, "baseline", lr, {}) for m, lr in BASELINES.items()]
    rows += [
        (m, label, BASELINES[m], knobs)
        for m, variants in BASELINE_VARIANTS.items()
        for label, knobs in variants.items()
    ]
    md = [(m, label, LRS[m], knobs) for m, label, knobs in md_rows()]
    for group in (rows, md):  # the baselines' rows first: the reproduction needs their knobs
        for seed in range(seeds):
            for method, label, lr, knobs in group:
                cfg = RunConfig(
                    method=method,
                    lr=lr,
                    seed=seed,
                    compile=False,
                    eval_batches=16,
                    threads=1,
                    **SETTINGS,
                    **knobs,
                )
                key = f"{method}|{label}|s{seed}"
                out.append({"key": key, "config": asdict(cfg), "label": label})
    return out


def summarize(data: dict) -> dict[tuple[str, str], dict]:
    groups: dict[tuple[str, str], list[float]] = {}
    for r in data["runs"].values():
        groups.setdefault((r["config"]["method"], r["label"]), []).append(score(r))
    return {
        k: {
            "mean": statistics.mean(v),
            "spread": (max(v) - min(v)) / 2,
            "n": len(v),
            "values": sorted(v),
        }
        for k, v in groups.items()
    }


def report(data: dict, out_dir: Path) -> str:
    s = summarize(data)
    if not s:
        return "no runs yet\n"
    lines = [
        "| change from the recipe | " + " | ".join(METHODS) + " |",
        "|---|" + "---|" * len(METHODS),
    ]
    labels = [lab for lab in VARIANTS if any((m, lab) in s for m in METHODS)]
    labels += sorted({lab for m, lab in s if m in METHODS and lab not in VARIANTS})
    for label in labels:
        cells = []
        for m in METHODS:
            row, base = s.get((m, label)), s.get((m, "recipe"))
            if row is None:
                cells.append("(the recipe)" if _is_recipe(m, label) else "–")
                continue
            delta = (
                "" if label == "recipe" or base is None else f" ({row['mean'] - base['mean']:+.3f})"
            )
            cells.append(f"{row['mean']:.3f} ± {row['spread']:.3f}{delta}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    base_cells = [
        f"{m} {s[(m, 'baseline')]['mean']:.3f} ± {s[(m, 'baseline')]['spread']:.3f} (lr {lr})"
        for m, lr in BASELINES.items()
        if (m, "baseline") in s
    ]
    lines += ["", baseline_table(s)]
    n = min(v["n"] for v in s.values())
    hours = data.get("wall_seconds", 0) / 3600
    text = (
        "\n".join(lines)
        + f"\n\nValidation loss in nats per byte, mean ± half-range over {n} seeds (change from "
        "the recipe row in parentheses; lower is better). Direction LR per method: "
        + ", ".join(f"{m} {lr}" for m, lr in LRS.items())
        + ". Baselines at their best LRs: "
        + "; ".join(base_cells)
        + f". Width 128, depth 2, 500 steps of 8x128 bytes, eager. {len(data['runs'])} runs, "
        f"{hours:.1f} h of wall time. Command: `./run python -m benchmarks.ablation`.\n"
    )
    (out_dir / "ablation.md").write_text(text)
    insert_if_committed("ablation", text, out_dir)
    plot(s, out_dir / "ablation.png")
    return text


def _is_recipe(method: str, label: str) -> bool:
    change = VARIANTS.get(label)
    return bool(change) and all(RECIPE[method].get(k) == v for k, v in change.items())


def baseline_table(s: dict) -> str:
    lines = [
        "| baseline: change from its recipe | val loss (change) |",
        "|---|---|",
    ]
    for m, variants in BASELINE_VARIANTS.items():
        base = s.get((m, "baseline"))
        if base is None:
            continue
        lines.append(f"| {m} (lr {BASELINES[m]}) | {base['mean']:.3f} ± {base['spread']:.3f} |")
        for label in variants:
            row = s.get((m, label))
            if row is not None:
                delta = row["mean"] - base["mean"]
                lines.append(
                    f"| {m}: {label} | {row['mean']:.3f} ± {row['spread']:.3f} ({delta:+.3f}) |"
                )
    return "\n".join(lines)


def plot(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [lab for lab in VARIANTS if any((m, lab) in s for m in METHODS)]
    fig, axes = plt.subplots(1, len(METHODS), figsize=(5.2 * len(METHODS), 4.2), sharey=True)
    for ax, m in zip(axes, METHODS):
        for i, label in enumerate(labels):
            row = s.get((m, label))
            if row is None:
                continue
            ax.plot(row["values"], [i] * len(row["values"]), "o", color="C0", ms=4, alpha=0.6)
            ax.plot([row["mean"]], [i], "|", color="k", ms=14, mew=2)
        if (m, "recipe") in s:
            ax.axvline(s[(m, "recipe")]["mean"], color="C2", lw=1, label="recipe (mean)")
        base = base_optimizer(m)
        if (base, "baseline") in s:
            ax.axvline(s[(base, "baseline")]["mean"], color="C3", ls="--", lw=1, label=f"{base}")
        ax.set_title(f"{m} (lr {LRS[m]})", fontsize=10)
        ax.set_xlabel("validation loss (nats / byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("One knob away from the MD recipe (dots: seeds; bar: mean)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--results", default=str(RESULTS / "ablation.json"))
    p.add_argument("--report", action="store_true", help="only write the table and plot")
    args = p.parse_args()
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = resume(path, {**SETTINGS, "lrs": LRS, "baselines": BASELINES, "recipe": RECIPE})
    save(path, data)
    if not args.report:
        run_rounds(path, data, lambda d: jobs(args.seeds), args.workers)
    print(report(load(path), path.parent))


if __name__ == "__main__":
    main()
