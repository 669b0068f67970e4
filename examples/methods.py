"""One training run of the small GPT: the methods compared, their recipes, the loop.

The main job (examples/train_gpt.py), the reproduction sweep
(benchmarks/reproduce.py) and the recipe ablation (benchmarks/ablation.py)
all call ``train``, so both sides of every comparison run the same code
except for the method.

Every method clips the gradient norm at 1.0. Methods (the swept ``lr`` is the
matrix LR of baselines, the direction LR of MD):

- ``adamw``: plain AdamW, weight decay 0.1 on matrices (embeddings, head,
  hidden), linear warmup over 5% of the steps, then linear decay to 0.
- ``muon``: torch.optim.Muon on hidden matrices (weight decay 0.1), AdamW
  (other_lr, weight decay 0.1 on matrices) on the rest; warmup and linear
  decay as adamw.
- ``md-muon``, ``md-adamw``, ``md-adamw-relative``: ``mdparam.recipe``
  with Muon, AdamW, and AdamW with the relative step: the paper's start,
  no weight decay, no warmup, linear decay, clipping on the fused weights,
  residual output projections on a 1/sqrt(2L) sphere; embeddings and head
  as the recipe chooses for the base optimizer. RunConfig's knobs change
  one choice at a time (benchmarks/ablation.py).
- ``sphere``: the pure sphere (gains "none", init "sphere"; Hyperball/HyperP
  family) with AdamW on directions; no warmup, linear decay.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import mdparam
from examples.corpus import Corpus
from examples.gpt import GPT, GPTConfig

METHODS = ("adamw", "md-adamw", "md-adamw-relative", "muon", "md-muon", "sphere")
MD_METHODS = ("md-adamw", "md-adamw-relative", "md-muon", "sphere")


@dataclass
class RunConfig:
    method: str = "md-adamw"
    width: int = 128
    depth: int = 4
    heads: int = 4
    block: int = 128
    batch: int = 16
    steps: int = 1000
    lr: float | None = None  # None: the method's default below
    gain_lr: float = 1e-3  # MD only
    other_lr: float | None = None  # None: the recipe's choice (MD), BASELINE_OTHER_LR (baselines)
    weight_decay: float = 0.1  # baselines only
    # AdamW baseline: embeddings, head and norms at other_lr instead of the one swept lr
    # (the knob every other method has; benchmarks/ablation.py tunes it)
    split_lr: bool = False
    warmup_frac: float = 0.05  # baselines only
    clip: float | None = 1.0  # gradient-norm clipping, every method
    # The MD recipe's knobs (mdparam.recipe; the ablation varies them one at a time):
    init: str = "sphere"  # "sphere" (the paper's start) or "preserve"
    out_scale: bool = True  # residual output projections on a 1/sqrt(2L) sphere
    # embeddings and head: "plain", "sphere" or "sphere-gains"; None: mdparam.recipe's
    # choice for the base optimizer (Muon: "sphere-gains", AdamW: "plain")
    embed_head: str | None = None
    clip_scope: str = "fused"  # "fused" (dL/dW, the authors') or "all"
    fused_step: bool = True  # MD only: mdparam.recipe's fused step (False: W formed in the forward)
    seed: int = 0
    compile: bool = True
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 8
    threads: int | None = None
    track_stats: bool = False  # MD only: mdparam.stats after every step

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.width % self.heads:
            raise ValueError(
                f"width {self.width} is not divisible by heads {self.heads}; pick a width that "
                f"is a multiple of the heads (--width/--heads in the main job)"
            )


# The AdamW LR of embeddings, head and norms where RunConfig.other_lr is None, as
# benchmarks/ablation.py tuned it (the MD methods take mdparam.recipe's own choice).
BASELINE_OTHER_LR = {"muon": 1e-2, "adamw": 3e-2, "sphere": 3e-2}


def other_lr_of(cfg: RunConfig) -> float | None:
    """This run's AdamW LR for embeddings, head and norms (None: the recipe chooses)."""
    if cfg.other_lr is not None or cfg.method.startswith("md-"):
        return cfg.other_lr
    return BASELINE_OTHER_LR[cfg.method]


DEFAULT_LR = {  # each method's best LR at width 128 in benchmarks/results/reproduce.json
    "adamw": 2e-3,
    "md-adamw": 2e-3,
    "md-adamw-relative": 5.66e-3,
    "muon": 2.83e-2,
    "md-muon": 3e-2,
    "sphere": 1.41e-3,
}


@dataclass
class Setup:
    model: GPT
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]
    retraction: mdparam.Retraction | None = None
    registered: list[str] = field(default_factory=list)
    recipe: mdparam.Recipe | None = None
    clip: float | None = 1.0

    def step(self) -> None:
        """Clip, step, schedule, zero grads: the recipe's step for MD methods."""
        if self.recipe is not None:
            self.recipe.step()
            return
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        for opt in self.optimizers:
            opt.step()
        for opt, sched in zip(self.optimizers, self.schedulers):
            sched.step()
            opt.zero_grad(set_to_none=True)


def _schedule(steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, 1.0 - (step - warmup) / max(1, steps - warmup))

    return factor


def _matrices(model: nn.Module, hidden_only: bool) -> tuple[list, list]:
    """(2-D params, the rest); hidden_only keeps embeddings and head out of the first list."""
    mats, rest = [], []
    for name, p in model.named_parameters():
        is_hidden = name.startswith("blocks.")
        (mats if p.ndim == 2 and (is_hidden or not hidden_only) else rest).append(p)
    return mats, rest


OUTPUT_PROJECTIONS = ("blocks.*.attn.o", "blocks.*.mlp.down")


def base_optimizer(method: str) -> str:
    """The base optimizer of an MD method, as ``mdparam.recipe`` names it."""
    return "muon" if method == "md-muon" else "adamw"


def md_recipe(model: GPT, cfg: RunConfig, lr: float) -> mdparam.Recipe:
    """The MD methods' setup: ``mdparam.recipe`` with this run's knobs."""
    scale = 1 / math.sqrt(2 * cfg.depth)
    return mdparam.recipe(
        model,
        base_optimizer(cfg.method),
        lr=lr,
        steps=cfg.steps,
        gain_lr=cfg.gain_lr,
        other_lr=other_lr_of(cfg),
        relative_step=cfg.method == "md-adamw-relative",
        clip=cfg.clip,
        clip_scope=cfg.clip_scope,
        head="head",
        head_mode=cfg.embed_head,
        embeddings=None if cfg.embed_head is None else cfg.embed_head.split("-")[0],
        radius_scale=dict.fromkeys(OUTPUT_PROJECTIONS, scale) if cfg.out_scale else None,
        init=cfg.init,
        fused=cfg.fused_step,
    )


def _baseline(model: GPT, cfg: RunConfig, lr: float) -> list[torch.optim.Optimizer]:
    if cfg.method == "adamw":
        mats, rest = _matrices(model, hidden_only=cfg.split_lr)
        aux_lr = other_lr_of(cfg) if cfg.split_lr else lr
        emb_head = [p for p in rest if p.ndim == 2]
        vectors = [p for p in rest if p.ndim != 2]
        groups = [
            {"params": mats, "weight_decay": cfg.weight_decay},
            {"params": emb_head, "weight_decay": cfg.weight_decay, "lr": aux_lr},
            {"params": vectors, "weight_decay": 0.0, "lr": aux_lr},
        ]
        return [torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)]
    mats, rest = _matrices(model, hidden_only=True)
    emb_head = [p for p in rest if p.ndim == 2]
    vectors = [p for p in rest if p.ndim != 2]
    return [
        torch.optim.Muon(mats, lr=lr, weight_decay=cfg.weight_decay),
        torch.optim.AdamW(
            [
                {"params": emb_head, "weight_decay": cfg.weight_decay},
                {"params": vectors, "weight_decay": 0.0},
            ],
            lr=other_lr_of(cfg),
        ),
    ]


def build(cfg: RunConfig) -> Setup:
    """The model and the optimizers of a method, as the module docstring describes."""
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(256, cfg.block, cfg.depth, cfg.heads, cfg.width))
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.method]
    if cfg.method in ("adamw", "muon"):
        opts = _baseline(model, cfg, lr)
        factor = _schedule(cfg.steps, max(1, int(cfg.warmup_frac * cfg.steps)))
        schedulers = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in opts]
        return Setup(model, opts, schedulers, clip=cfg.clip)
    if cfg.method == "sphere":
        names = mdparam.register(model, exclude="head", gains="none", init="sphere")
        groups = mdparam.param_groups(
            model, lr=lr, gain_lr=cfg.gain_lr, other_lr=other_lr_of(cfg), other_weight_decay=0.0
        )
        opts = [torch.optim.AdamW(groups)]
        retraction = mdparam.Retraction(model)
        retraction.attach(opts[0])
        schedulers = [torch.optim.lr_scheduler.LambdaLR(opts[0], _schedule(cfg.steps, 0))]
        return Setup(model, opts, schedulers, retraction, names, clip=cfg.clip)
    recipe = md_recipe(model, cfg, lr)
    return Setup(
        model, recipe.optimizers, recipe.schedulers, recipe.retraction, recipe.registered, recipe
    )


@torch.no_grad()
def evaluate(model: nn.Module, corpus: Corpus, cfg: RunConfig) -> float:
    gen = torch.Generator().manual_seed(1234)  # the same validation batches for every run
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(cfg.eval_batches):
        x, y = corpus.batch("val", cfg.batch, cfg.block, gen)
        total += float(F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
    model.train(was_training)
    return total / cfg.eval_batches


def train(cfg: RunConfig, corpus: Corpus, *, progress: bool = False, on_step=None) -> dict:
    """Train one run; returns its config, curves, final losses and timing."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    setup = build(cfg)
    model = setup.model
    fwd = torch.compile(model, fullgraph=True) if cfg.compile else model
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    losses: list[float] = []
    evals: list[tuple[int, float]] = []
    stats: list[tuple[int, dict]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    t_compiled = None
    diverged = False
    for step in range(cfg.steps):
        x, y = corpus.batch("train", cfg.batch, cfg.block, gen)
        loss = F.cross_entropy(fwd(x).flatten(0, 1), y.flatten())
        loss.backward()
        try:
            setup.step()
        except mdparam.RetractionError:
            diverged = True
        value = float(loss.detach())
        losses.append(value)
        if cfg.track_stats and setup.recipe is not None:
            record = mdparam.stats(model, per_layer=False)
            if "mdparam/direction_step" in record:
                stats.append((step + 1, record))
        if step == 0:
            t_compiled = time.perf_counter()
        if diverged or not math.isfinite(value):
            diverged = True
            break
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            evals.append((step + 1, evaluate(model, corpus, cfg)))
        if on_step is not None:
            on_step(step, value)
        if bar is not None:
            elapsed = time.perf_counter() - (t_compiled or t0)
            rate = cfg.batch * cfg.block * step / elapsed if step and elapsed > 0 else 0.0
            bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{rate:,.0f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    val = float("nan") if diverged else evaluate(model, corpus, cfg)
    evals.append((len(losses), val))
    steady = time.perf_counter() - (t_compiled or t0)
    return {
        "config": asdict(cfg),
        "lr": cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.method],
        "diverged": diverged,
        "train_losses": losses,
        "evals": evals,
        "final_train_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "val_loss": val,
        "seconds": seconds,
        "tokens_per_second": cfg.batch * cfg.block * max(0, len(losses) - 1) / steady
        if steady > 0
        else 0.0,
        "registered": setup.registered,
        "stats": stats,
        "_setup": setup,
    }
