"""The speed suite's report, from its results (speed.json): the README table and the plot.

``render`` gives the Markdown table (speed.md, and the README between
``<!-- begin:speed -->`` and ``<!-- end:speed -->``), ``plot`` the bar chart
(speed.png), ``write_report`` both and the README. Nothing here measures
or needs torch.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.readme import insert_if_committed

# The issues' targets for MD / plain ratios, by their place in the results: one
# definition for the README table and the plot.
TARGETS = {
    ("step", "eager_fp32", "ratio"): "1.05",
    ("step", "compiled_fp32", "ratio"): "1.02",
    ("retraction", "retract_over_bound"): "1.1",
    ("compile", "ratio"): "1.2",
    ("optstep", "md_compiled_step_over_plain", "ratio"): "1.00",
    ("optstep", "md_compiled_step_over_plain_compiled_opt", "ratio"): "1.02",
    ("recipe", "adamw", "fused_ratio"): "1.03",
    ("recipe", "muon", "fused_ratio"): "1.03",
}
COLUMNS = ("default", "tuned")  # the allocators of the table's two value columns, in order

# The plot's bars: (label, place in the results).
PLOT_ROWS = [
    ("recipe, adamw, fused step", ("recipe", "adamw", "fused_ratio")),
    ("recipe, muon, fused step", ("recipe", "muon", "fused_ratio")),
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

# The table's ratio rows at its top: (label, place in the results); targets from TARGETS.
TABLE_RATIOS = [
    (
        'recipe(model, "adamw"), fused step / plain AdamW (compiled model, clip 1.0)',
        ("recipe", "adamw", "fused_ratio"),
    ),
    ("the same, formed step (fused=False)", ("recipe", "adamw", "formed_ratio")),
    (
        'recipe(model, "muon"), fused step / plain Muon + AdamW (compiled model, clip 1.0)',
        ("recipe", "muon", "fused_ratio"),
    ),
    ("the same, formed step (fused=False)", ("recipe", "muon", "formed_ratio")),
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
        "cold compile time, fuse as an opaque op (register(fuse='opaque'))",
        ("compile", "opaque_fuse_ratio"),
    ),
    (
        "train step, compiled fp32, fuse as an opaque op (register(fuse='opaque'))",
        ("step", "compiled_fp32_opaque_fuse", "ratio"),
    ),
    ("peak RSS, eager", ("memory", "eager", "peak_ratio")),
    ("peak RSS, compiled", ("memory", "compiled", "peak_ratio")),
]

# The optimizer-step rows: (label, key in results["optstep"], target; None: from TARGETS).
TABLE_OPTSTEP = [
    (
        "MD step with mdparam.compile_step / plain step (optimizer eager)",
        "md_compiled_step_over_plain",
        None,
    ),
    (
        "heavyball HyperBallAdamW step / plain step (optimizer eager)",
        "heavyball_over_plain",
        "MD at or ahead",
    ),
    (
        "MD step with compile_step / plain step with compiled optimizer",
        "md_compiled_step_over_plain_compiled_opt",
        None,
    ),
    (
        "the same, retraction captured in the step's graph (Retraction(compile=True))",
        "md_retraction_in_graph_over_plain_compiled_opt",
        None,
    ),
    (
        "plain step with compiled optimizer / plain step (optimizer eager)",
        "plain_compiled_opt_over_plain",
        None,
    ),
]
SMALL_TOKENS = (8, 16, 32, 64)  # the "small" section's tokens per call


def result(r: dict, alloc: str, keys: tuple[str, ...]) -> object:
    """The value at ``keys`` in one allocator's results, or None where the run has none."""
    node = r.get(alloc, {})
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


def target(keys: tuple[str, ...]) -> str:
    """The target column of the ratio at ``keys``: ``<= 1.05x``, or empty without a target."""
    return f"<= {TARGETS[keys]}x" if keys in TARGETS else ""


def fmt(v: object, spec: str = "{:.3f}x") -> str:
    """A number as ``spec`` formats it; a dash for anything else (a missing result)."""
    return spec.format(v) if isinstance(v, int | float) else "–"


def plot(r: dict, path: Path) -> None:
    """A bar chart of the main MD / plain ratios against their targets (both allocators)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def get(alloc: str, keys: tuple[str, ...]) -> float:
        v = result(r, alloc, keys)
        return v if isinstance(v, int | float) else float("nan")

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(PLOT_ROWS) + 1.2))
    ys = range(len(PLOT_ROWS))
    for off, alloc, color in ((-0.2, "default", "tab:blue"), (0.2, "tuned", "tab:orange")):
        vals = [get(alloc, keys) - 1 for _, keys in PLOT_ROWS]
        label = "default allocator" if alloc == "default" else "GLIBC_TUNABLES set"
        ax.barh([y + off for y in ys], vals, height=0.38, left=1, color=color, label=label)
    for y, (_, keys) in zip(ys, PLOT_ROWS):
        if keys in TARGETS:
            x = float(TARGETS[keys])
            ax.plot([x, x], [y - 0.45, y + 0.45], color="black", lw=2)
    ax.plot([], [], color="black", lw=2, label="target")
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_yticks(list(ys), [label for label, _ in PLOT_ROWS])
    ax.invert_yaxis()
    ax.set_xlabel("MD / plain (1 = no cost)")
    ax.set_title(f"mdparam speed suite, benchmark GPT, {r.get('machine', {}).get('date', '')}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the table -------------------------------------------------------------------------


def _line(label: str, cells: list[object], note: str | None) -> str:
    """One table row; ``note=None`` closes it with an empty target cell written ``| |``."""
    end = " |" if note is None else f" {note} |"
    return f"| {label} | {cells[0]} | {cells[1]} |{end}"


def _ratio_line(r: dict, label: str, keys: tuple[str, ...], note: str | None = None) -> str:
    """A row of one MD / plain ratio per allocator; its target from TARGETS unless ``note``."""
    cells = [fmt(result(r, alloc, keys)) for alloc in COLUMNS]
    return _line(label, cells, target(keys) if note is None else note)


def _share_line(r: dict, label: str, key: str, note: str | None) -> str:
    """A row of one of the retraction section's shares of a compiled MD step, in percent."""
    cells = [fmt(result(r, alloc, ("retraction", key)), "{:.2%}") for alloc in COLUMNS]
    return _line(label, cells, note)


def _recompiles_line(r: dict) -> str:
    """The row of the recompiles after warm-up (0 is the target)."""
    steps, count = ("recompiles", "steps"), ("recompiles", "recompiles_after_warmup")
    dash = lambda v: "–" if v is None else v  # noqa: E731
    label = (
        f"recompiles after warm-up, {dash(result(r, 'default', steps))} steps "
        "with LR scheduler + retraction"
    )
    return _line(label, [dash(result(r, alloc, count)) for alloc in COLUMNS], "0")


def _small_lines(r: dict) -> list[str]:
    """The rows of the "small" section: the ratio at each token count, plain and factored."""
    lines = []
    for mode in ("eager", "compiled"):
        for what, field in (("MD", "ratio"), ("MD, factored forward", "factored_ratio")):
            cells = [
                " / ".join(
                    fmt(result(r, alloc, ("small", f"{mode}_{t}", field)), "{:.2f}")
                    for t in SMALL_TOKENS
                )
                for alloc in COLUMNS
            ]
            tokens = " / ".join(str(t) for t in SMALL_TOKENS)
            lines.append(
                _line(f"train step, {mode}, {what}, {tokens} tokens per call", cells, None)
            )
    return lines


def _footer(r: dict) -> str:
    """The machine, the copy bandwidth and the command under the table."""
    m = r.get("machine", {})
    bw = result(r, "default", ("retraction", "copy_bandwidth_GBps"))
    later = sorted(
        {
            f"{name} {res['date']}"
            for alloc in ("default", "tuned")
            for name, res in r.get(alloc, {}).items()
            if res.get("date") not in (None, m.get("date"))
        }
    )
    rerun = f" (sections re-run since: {', '.join(later)})" if later else ""
    return (
        f"Machine: {m.get('cpu_count')} cores, {m.get('platform')}, torch {m.get('torch')}, "
        f"measured {m.get('date')}{rerun}. Copy bandwidth in the retraction run: "
        f"{fmt(bw, '{:.1f} GB/s')}. Command: `./run bench` (results in "
        "benchmarks/results/speed.json; `--sections NAME` re-runs one section).\n"
    )


def render(r: dict) -> str:
    """The Markdown table the README shows."""
    lines = [
        "| MD / plain | default allocator | GLIBC_TUNABLES set | target |",
        "|---|---|---|---|",
        *(_ratio_line(r, label, keys) for label, keys in TABLE_RATIOS),
        _share_line(
            r,
            "retraction as a share of a compiled MD step",
            "retract_fraction_of_compiled_step",
            "<= 0.5%",
        ),
        *(
            _ratio_line(r, label, ("optstep", key, "ratio"), note)
            for label, key, note in TABLE_OPTSTEP
        ),
        _share_line(
            r,
            "a copy of the directions (the bound) as a share of a compiled MD step",
            "copy_fraction_of_compiled_step",
            None,
        ),
        _share_line(
            r,
            "relative-step mode (record D + rescale the step + retract) as a share of a compiled MD step",
            "relative_fraction_of_compiled_step",
            None,
        ),
        _recompiles_line(r),
        *_small_lines(r),
    ]
    return "\n".join(lines) + "\n\n" + _footer(r)


def write_report(r: dict, out_dir: Path) -> str:
    """speed.md and speed.png in ``out_dir``; the README too if that is benchmarks/results.

    Returns the table.
    """
    text = render(r)
    (out_dir / "speed.md").write_text(text)
    plot(r, out_dir / "speed.png")
    insert_if_committed("speed", text, out_dir)
    return text
