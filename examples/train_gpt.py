"""Train a small byte-level GPT with MD decoupling on the standard-library corpus.

    ./run main                      # defaults: a few minutes on 2 CPU cores
    ./run main --steps 50 --baseline

The model (examples/gpt.py) is written with plain nn.Linear layers;
mdparam.register turns every one of them into direction and gains.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mdparam
from examples.corpus import load_corpus
from examples.gpt import GPT, GPTConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument(
        "--lr", type=float, default=None, help="direction LR (MD) or matrix LR (baseline)"
    )
    p.add_argument("--gain-lr", type=float, default=1e-2)
    p.add_argument("--other-lr", type=float, default=3e-3)
    p.add_argument("--baseline", action="store_true", help="plain AdamW, no mdparam")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/main")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    corpus = load_corpus()
    cfg = GPTConfig(256, args.block, args.depth, args.heads, args.width)
    model = GPT(cfg)
    if args.baseline:
        lr = args.lr or 3e-3
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    else:
        lr = args.lr or 2e-2
        mdparam.register(model)
        opt = torch.optim.AdamW(
            mdparam.param_groups(model, lr=lr, gain_lr=args.gain_lr, other_lr=args.other_lr)
        )
        mdparam.Retraction(model, compile=not args.no_compile).attach(opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / args.steps)
    step_model = model if args.no_compile else torch.compile(model, fullgraph=True)
    gen = torch.Generator().manual_seed(args.seed)
    losses = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = corpus.batch("train", args.batch, args.block, gen)
        loss = torch.nn.functional.cross_entropy(step_model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(
                f"step {step:5d}  loss {losses[-1]:.4f}  {time.perf_counter() - t0:.1f}s",
                flush=True,
            )
    with torch.no_grad():
        val_gen = torch.Generator().manual_seed(1234)
        val = (
            sum(model.loss(*corpus.batch("val", 16, args.block, val_gen)).item() for _ in range(8))
            / 8
        )
    summary = {
        "method": "baseline" if args.baseline else "md",
        "final_train_loss": sum(losses[-10:]) / min(10, len(losses)),
        "val_loss": val,
        "val_bits_per_byte": val / math.log(2),
        "corpus_sha256": corpus.sha256,
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
