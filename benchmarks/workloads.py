"""The models, optimizers and training steps the speed benchmarks time.

One place builds both sides of every comparison, so plain and MD differ only
in ``mdparam.register`` (and what it implies: param groups, retraction).
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import mdparam
from examples.gpt import GPT, GPTConfig
from mdparam import _forward

ROOT = Path(__file__).resolve().parent.parent

# The benchmark GPT: 6 layers, d=512, untied head; 27.3M parameters.
BENCH_GPT = GPTConfig(
    vocab_size=8192, block_size=128, n_layer=6, n_head=8, n_embd=512, tie_head=False
)


@dataclass
class Side:
    """One side of a comparison: a model, its optimizer, and a step function."""

    name: str
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    step: Callable[[], float]
    retraction: mdparam.Retraction | None = None
    inputs: tuple[torch.Tensor, torch.Tensor] | None = None
    compiled: bool = False
    autocast_bf16: bool = False


def md_adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    """The MD side's optimizer in every comparison: AdamW on mdparam's groups, one LR."""
    return torch.optim.AdamW(mdparam.param_groups(model, lr=1e-3, gain_lr=1e-3))


def build_pair(
    cfg: GPTConfig = BENCH_GPT,
    *,
    compiled: bool,
    batch: int = 8,
    seq: int = 128,
    autocast_bf16: bool = False,
    seed: int = 0,
    sched: bool = False,
    register: dict | None = None,
) -> tuple[Side, Side]:
    """A plain and an MD GPT with the same initial function, each with AdamW.

    ``register``: more keyword arguments for mdparam.register (``exclude="head"``,
    ``forward="auto"``).
    """
    torch.manual_seed(seed)
    plain = GPT(cfg)
    md = copy.deepcopy(plain)
    # the speed suite's opaque-fuse variant runs its child processes with this set
    fuse = os.environ.get("MDPARAM_BENCH_FUSE", "traced")
    mdparam.register(md, fuse=fuse, **(register or {}))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randint(cfg.vocab_size, (batch, seq), generator=g)
    y = torch.randint(cfg.vocab_size, (batch, seq), generator=g)

    sides = []
    for name, model in (("plain", plain), ("md", md)):
        if name == "plain":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
            retraction = None
        else:
            opt = md_adamw(model)
            retraction = mdparam.Retraction(model)
            retraction.attach(opt)
        scheduler = (
            torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)) if sched else None
        )
        fwd = torch.compile(model, fullgraph=True) if compiled else model
        step = _make_step(fwd, opt, x, y, autocast_bf16, scheduler)
        sides.append(Side(name, model, opt, step, retraction, (x, y), compiled, autocast_bf16))
    return sides[0], sides[1]


def build_optimizer_variants(
    cfg: GPTConfig = BENCH_GPT, batch: int = 8, seq: int = 128, seed: int = 0
) -> dict:
    """Compiled models, four ways of stepping them: what issue "compiled training step" compares.

    - ``plain``: plain model, eager AdamW (foreach), the default users run;
    - ``plain_compiled_opt``: plain model, AdamW step compiled (tensor LR);
    - ``md_compiled_step``: MD model, mdparam.compile_step(AdamW, Retraction(m)):
      on the CPU the retraction runs eagerly, per tensor, after the compiled step;
    - ``md_compiled_step_retraction_in_graph``: the same with Retraction(m,
      compile=True), captured in the step's graph;
    - ``heavyball``: plain model, heavyball.HyperBallAdamW (optional peer; its
      optimizer-level sphere compiles its own step), when heavyball is installed.
    """
    torch.manual_seed(seed)
    base = GPT(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randint(cfg.vocab_size, (batch, seq), generator=g)
    y = torch.randint(cfg.vocab_size, (batch, seq), generator=g)
    out = {}

    def side(name, model, opt, stepper):
        fwd = torch.compile(model, fullgraph=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))

        def step() -> float:
            loss = F.cross_entropy(fwd(x).flatten(0, 1), y.flatten())
            loss.backward()
            stepper()
            sched.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        out[name] = Side(name, model, opt, step, None, (x, y), True, False)

    m = copy.deepcopy(base)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1)
    side("plain", m, opt, opt.step)

    m = copy.deepcopy(base)
    opt = torch.optim.AdamW(m.parameters(), lr=torch.tensor(1e-3), weight_decay=0.1)
    side("plain_compiled_opt", m, opt, torch.compile(opt.step))

    m = copy.deepcopy(base)
    mdparam.register(m)
    opt = md_adamw(m)
    side("md_compiled_step", m, opt, mdparam.compile_step(opt, mdparam.Retraction(m)))

    m = copy.deepcopy(base)  # the same, with the retraction inside the step's graph
    mdparam.register(m)
    opt = md_adamw(m)
    retraction = mdparam.Retraction(m, compile=True)
    side("md_compiled_step_retraction_in_graph", m, opt, mdparam.compile_step(opt, retraction))

    try:
        import heavyball
    except ImportError:
        return out
    m = copy.deepcopy(base)
    opt = heavyball.HyperBallAdamW(m.parameters(), lr=1e-3)
    side("heavyball", m, opt, opt.step)
    return out


def factored_parts(
    layer: torch.nn.Linear,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(D, phi(r), phi(c)) of a registered Linear with row and column gains."""
    plist = layer.parametrizations.weight
    phi = plist[0].config.geometry.gain_map
    return (plist.original0, phi(plist.original1), phi(plist.original2))


def _factored_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """y = phi(r) * ((x * phi(c)) @ D^T) + bias: mdparam's factored forward, W never built."""
    return _forward.factored_linear(self, x)


def build_factored(md: Side) -> Side:
    """A copy of an MD side whose layers use the factored forward (register(forward="factored"))."""
    model = copy.deepcopy(md.model)
    for e in mdparam.registered(model):
        _forward.install_forward(e.module, "factored")
    opt = md_adamw(model)
    retraction = mdparam.Retraction(model)
    retraction.attach(opt)
    fwd = torch.compile(model, fullgraph=True) if md.compiled else model
    x, y = md.inputs
    step = _make_step(fwd, opt, x, y, md.autocast_bf16, None)
    return Side("md_factored", model, opt, step, retraction, (x, y), md.compiled, md.autocast_bf16)


def _make_step(fwd, opt, x, y, autocast_bf16: bool, scheduler) -> Callable[[], float]:
    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
            logits = fwd(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def copier(tensors: list[torch.Tensor]) -> Callable[[], None]:
    """A function that copies ``tensors`` into buffers of their own: the bandwidth bound
    the retraction is measured against (it reads and writes the same bytes)."""
    sources = [t.detach() for t in tensors]
    buffers = [torch.empty_like(t) for t in sources]

    def copy_all() -> None:
        for s, b in zip(sources, buffers):
            b.copy_(s)

    return copy_all


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, A B A B ..., after ``warmup`` untimed calls each."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return times


def summary(times: list[float]) -> dict[str, float]:
    q = (
        statistics.quantiles(times, n=4)
        if len(times) >= 4
        else [min(times), statistics.median(times), max(times)]
    )
    return {"median": statistics.median(times), "q1": q[0], "q3": q[-1], "n": len(times)}
