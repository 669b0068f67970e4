"""What the einops layouts cost in a training step, against hand-written torch reshapes.

    ./run python -m benchmarks.layouts_cost            # ~2 min
    ./run python -m benchmarks.layouts_cost --steps 10 --out /tmp/trial

Two small models whose weights are not stored as (d_out, d_in): a convolution
net (``flatten_in``: ``o i k1 k2 -> o (i k1 k2)``) and an MLP whose layers keep
their weight as (d_in, d_out) (``transposed``, as GPT-2's Conv1D; registered
through ``mdparam.register_adapter``). Each trains with
``mdparam.recipe(model, "adamw", fused=False, compile=False)``, eager, where
every step calls the layouts in the forward and the retraction. The two sides
differ only in the layouts' two methods: ``einops`` (as shipped) and ``torch``
(the same moves as ``permute``/``reshape``, patched in). They alternate step
by step in one process; each side's median; the ratio of medians, over
``--repeats`` fresh pairs of models.

Compiled (``torch.compile(model, fullgraph=True)``, the fused recipe): how
often einops runs once the graphs are built (zero means the layouts were
traced into reshapes and cost nothing at run time).
Results: benchmarks/results/layouts_cost.json and .md (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from unittest import mock

import torch
from torch import nn
from tqdm import tqdm

import mdparam
from benchmarks.readme import RESULTS, insert_if_committed
from mdparam import _layouts


class ConvNet(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((-2, -1)))


class InOut(nn.Module):
    """A linear layer that keeps its weight as (d_in, d_out), as GPT-2's Conv1D."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) / d_in**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


mdparam.register_adapter(InOut, {"weight": "transposed"})


class InOutMLP(nn.Module):
    def __init__(self, width: int = 256, depth: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(InOut(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.nn.functional.gelu(layer(x))
        return x


SIDES = ("einops", "torch")
MODELS = {
    "conv (flatten_in)": (ConvNet, lambda: torch.randn(16, 3, 16, 16)),
    "mlp (transposed)": (InOutMLP, lambda: torch.randn(64, 256)),
}


def torch_to_matrix(self: _layouts.Layout, t: torch.Tensor) -> torch.Tensor:
    if self.name == "transposed":
        return t.transpose(-2, -1)
    if self.name == "flatten_in":
        return t.reshape(t.shape[0], -1)
    return t


def torch_from_matrix(self: _layouts.Layout, m: torch.Tensor, shape) -> torch.Tensor:
    if self.name == "transposed":
        return m.transpose(-2, -1)
    if self.name == "flatten_in":
        return m.reshape(tuple(shape))
    return m


def native_layouts():
    """The layouts' two methods as hand-written torch calls, for the ``torch`` side."""
    return mock.patch.multiple(
        _layouts.Layout, to_matrix=torch_to_matrix, from_matrix=torch_from_matrix
    )


def build(name: str, compiled: bool = False):
    """The model registered on every layer kind mdparam knows, its recipe, a batch maker."""
    cls, data = MODELS[name]
    torch.manual_seed(0)
    model = cls()
    mdparam.register(model, layers="all", init="sphere")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fused step may fall back for a layout: fine here
        train = mdparam.recipe(model, "adamw", lr=0.01, fused=compiled, compile=compiled)
    fwd = torch.compile(model, fullgraph=True) if compiled else model
    return fwd, train, data


def one_step(fwd, train, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    fwd(x).square().mean().backward()
    train.step()
    return time.perf_counter() - t0


def eager_ratio(name: str, steps: int, warmup: int = 5) -> dict:
    """einops / torch: medians of alternating eager steps, one model per side."""
    sides = {side: build(name) for side in SIDES}
    times: dict[str, list[float]] = {side: [] for side in sides}
    for i in tqdm(range(warmup + steps), desc=name, leave=False):
        for side, (fwd, train, data) in sides.items():
            x = data()
            if side == "torch":
                with native_layouts():
                    t = one_step(fwd, train, x)
            else:
                t = one_step(fwd, train, x)
            if i >= warmup:
                times[side].append(t)
    med = {side: statistics.median(ts) * 1e3 for side, ts in times.items()}
    return {"median_ms": med, "ratio": med["einops"] / med["torch"]}


def compiled_calls(name: str, steps: int = 3) -> dict:
    """How often einops.rearrange runs: while the graphs are built, and after."""
    calls = {"n": 0}
    real = _layouts.rearrange

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    with mock.patch.object(_layouts, "rearrange", counted):
        fwd, train, data = build(name, compiled=True)
        one_step(fwd, train, data())
        one_step(fwd, train, data())
        built = calls["n"]
        for _ in range(steps):
            one_step(fwd, train, data())
    return {"while_compiling": built, "per_step_after": (calls["n"] - built) / steps}


def table(results: dict) -> str:
    lines = [
        "| model (layout) | eager step, einops / torch: median (range) | median ms einops / torch "
        "| einops calls: while compiling / per compiled step after |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        ratios = [e["ratio"] for e in r["eager"]]
        ms = {s: statistics.median(e["median_ms"][s] for e in r["eager"]) for s in SIDES}
        c = r["compiled"]
        lines.append(
            f"| {name} | {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) "
            f"| {ms['einops']:.2f} / {ms['torch']:.2f} "
            f"| {c['while_compiling']} / {c['per_step_after']:g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200, help="timed steps per side and repeat")
    p.add_argument("--repeats", type=int, default=3, help="fresh model pairs per model")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one core per process: steady timings on 2-core machines
    results = {
        name: {
            "eager": [eager_ratio(name, args.steps) for _ in range(args.repeats)],
            "compiled": compiled_calls(name),
        }
        for name in MODELS
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "layouts_cost.json").write_text(json.dumps(results, indent=1))
    text = table(results)
    (out / "layouts_cost.md").write_text(text + "\n")
    print(text)
    insert_if_committed("layouts_cost", text, out)


if __name__ == "__main__":
    main()
