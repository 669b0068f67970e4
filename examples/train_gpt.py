"""The main job: train a small byte-level GPT with MD decoupling, export it, reload it plain.

    ./run main                         # MD-Muon (mdparam.recipe) under torch.compile, minutes on 2 cores
    ./run main --optimizer adamw --relative-step   # MD-AdamW with the relative step
    ./run main --baseline              # the same GPT with plain Muon, no mdparam
    ./run main --text my.txt --steps 3000 --width 256

Steps: build the standard-library corpus (or read --text), build the GPT
(examples/gpt.py: plain nn.Linear layers), set it up with mdparam.recipe, train
with a progress bar, evaluate, export a plain safetensors checkpoint, build a
fresh plain GPT, load the checkpoint with strict=True, check that its logits
agree with the trained model's, sample text from the plain model, and write a
loss-curve plot and a JSON summary into --out.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import safetensors.torch
import torch

import mdparam
from examples.corpus import Corpus, load_corpus
from examples.gpt import GPT
from examples.methods import DEFAULT_LR, MD_METHODS, RunConfig, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--optimizer", choices=["adamw", "muon"], default="muon")
    p.add_argument("--baseline", action="store_true", help="plain model and optimizer, no mdparam")
    p.add_argument(
        "--relative-step", action="store_true", help="MD-AdamW with the relative-step retraction"
    )
    p.add_argument(
        "--lr", type=float, default=None, help="direction LR (MD) or matrix LR (baseline)"
    )
    p.add_argument("--gain-lr", type=float, default=RunConfig.gain_lr)
    p.add_argument(
        "--other-lr",
        type=float,
        default=None,
        help="AdamW LR of embeddings, norms and output head (default: the recipe's choice)",
    )
    p.add_argument(
        "--text", default=None, help="train on this text file instead of the stdlib corpus"
    )
    p.add_argument("--no-compile", action="store_true")
    p.add_argument(
        "--formed-step",
        action="store_true",
        help="MD: the recipe's step that forms W in the forward (fused=False) instead of the fused step",
    )
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--sample-bytes", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/main")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def method_of(args: argparse.Namespace) -> str:
    if args.baseline:
        if args.relative_step:
            raise SystemExit("--relative-step is an MD option; drop --baseline")
        return args.optimizer
    if args.relative_step:
        if args.optimizer != "adamw":
            raise SystemExit(
                "--relative-step goes with --optimizer adamw (Muon's MD step is already relative)"
            )
        return "md-adamw-relative"
    return f"md-{args.optimizer}"


def plot(result: dict, path: Path, title: str) -> None:
    """Loss curves; for MD runs, beside them the gains and the direction's step per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = result["train_losses"]
    stats = result.get("stats") or []
    fig, axes = plt.subplots(1, 2 if stats else 1, figsize=(12 if stats else 7, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(range(1, len(losses) + 1), losses, lw=0.6, alpha=0.5, label="train (per step)")
    k = max(1, len(losses) // 50)
    smooth = [
        sum(losses[max(0, i - k) : i + 1]) / len(losses[max(0, i - k) : i + 1])
        for i in range(len(losses))
    ]
    ax.plot(range(1, len(losses) + 1), smooth, lw=1.5, label=f"train (mean of {k + 1})")
    steps, vals = zip(*result["evals"])
    ax.plot(steps, vals, "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if stats:
        ax = axes[0][1]
        xs = [s for s, _ in stats]
        for key, label in (
            ("row_gain_mean", "phi(r), mean over layers"),
            ("col_gain_mean", "phi(c), mean over layers"),
        ):
            if f"mdparam/{key}" in stats[0][1]:
                ax.plot(xs, [r[f"mdparam/{key}"] for _, r in stats], label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("gain magnitude")
        ax.grid(alpha=0.3)
        ax2 = ax.twinx()
        ax2.plot(
            xs,
            [r["mdparam/direction_step"] for _, r in stats],
            color="tab:red",
            lw=0.8,
            label="||D_t - D_t-1|| / ||D||",
        )
        ax2.set_yscale("log")
        ax2.set_ylabel("direction step per step (log)", color="tab:red")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8)
        ax.set_title("mdparam.stats during training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_config(args: argparse.Namespace, method: str) -> RunConfig:
    """The training harness's run for these flags."""
    return RunConfig(
        method=method,
        width=args.width,
        depth=args.depth,
        heads=args.heads,
        block=args.block,
        batch=args.batch,
        steps=args.steps,
        lr=args.lr,
        gain_lr=args.gain_lr,
        other_lr=args.other_lr,
        seed=args.seed,
        compile=not args.no_compile,
        fused_step=not args.formed_step,
        eval_every=args.eval_every,
        track_stats=True,
    )


def export_and_reload(
    model: GPT, method: str, corpus: Corpus, args: argparse.Namespace, out: Path
) -> tuple[GPT, dict]:
    """Export, then load into a fresh plain GPT that never saw mdparam and compare logits.

    Returns the plain model and the export's record for the summary.
    """
    ckpt = out / "model.safetensors"
    if method not in MD_METHODS:  # a baseline: nothing to fuse
        safetensors.torch.save_file(model.state_dict(), ckpt)
    else:
        mdparam.save_plain(model, ckpt, overwrite=True, metadata={"method": method})
    plain = GPT(model.cfg)
    plain.load_state_dict(safetensors.torch.load_file(ckpt), strict=True)
    gen = torch.Generator().manual_seed(99)
    x, _ = corpus.batch("val", 4, args.block, gen)
    with torch.no_grad():
        model.eval()
        plain.eval()
        a, b = model(x), plain(x)
    max_abs = float((a - b).abs().max())
    rel = max_abs / float(b.abs().max())
    agree = rel <= 1e-5
    print(
        f"exported {ckpt} ({ckpt.stat().st_size / 1e6:.1f} MB); fresh plain GPT loaded it with strict=True; "
        f"logits {'agree' if agree else 'DISAGREE'}: max abs diff {max_abs:.2e}, relative {rel:.2e}"
    )
    export = {
        "path": str(ckpt),
        "strict_load": True,
        "max_abs_logit_diff": max_abs,
        "max_rel_logit_diff": rel,
        "agree": agree,
    }
    return plain, export


def sample_text(plain: GPT, args: argparse.Namespace) -> str:
    """A few lines from the plain model, printed; the whole sample returned."""
    torch.manual_seed(args.seed)
    prompt = torch.tensor([list(b"def ")], dtype=torch.long)
    sample = bytes(plain.generate(prompt, args.sample_bytes, temperature=0.8, top_k=40)[0].tolist())
    text = sample.decode("utf-8", errors="replace")
    print("--- sample from the plain model ---")
    print("\n".join(text.splitlines()[:8]))
    print("-----------------------------------")
    return text


def summarize(method: str, result: dict, corpus: Corpus, export: dict, text: str) -> dict:
    """summary.json: the run, its corpus, its losses, the export check and the sample."""
    return {
        "method": method,
        "config": result["config"],
        "lr": result["lr"],
        "corpus": {
            "source": corpus.source,
            "sha256": corpus.sha256,
            "files": corpus.files,
            "train_bytes": len(corpus.train),
            "val_bytes": len(corpus.val),
        },
        "val_loss": result["val_loss"],
        "val_bits_per_byte": result["val_loss"] / math.log(2),
        "final_train_loss": result["final_train_loss"],
        "diverged": result["diverged"],
        "seconds": result["seconds"],
        "tokens_per_second": result["tokens_per_second"],
        "export": export,
        "registered": result["registered"],
        "evals": result["evals"],
        "stats_last": result["stats"][-1][1] if result["stats"] else None,
        "sample": text,
        "torch": torch.__version__,
        "mdparam": mdparam.__version__,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    method = method_of(args)
    corpus = load_corpus(args.text)
    print(
        f"corpus: {corpus.source}, {len(corpus.train):,} train / {len(corpus.val):,} val bytes, "
        f"sha256 {corpus.sha256[:16]}"
    )
    cfg = run_config(args, method)
    print(
        f"method {method}, lr {cfg.lr or DEFAULT_LR[method]}, {args.steps} steps of {args.batch}x{args.block} tokens"
        f"{', torch.compile(fullgraph=True)' if cfg.compile else ''}"
    )
    result = train(cfg, corpus, progress=not args.quiet)
    setup = result.pop("_setup")
    model = setup.model
    if result["diverged"]:
        print("training diverged (non-finite loss); lower --lr")
    print(
        f"validation loss {result['val_loss']:.4f} nats/byte ({result['val_loss'] / math.log(2):.3f} bits/byte), "
        f"{result['tokens_per_second']:,.0f} tokens/s"
    )
    plain, export = export_and_reload(model, method, corpus, args, out)
    text = sample_text(plain, args)
    title = (
        f"{method}, width {args.width}, depth {args.depth}: val {result['val_loss']:.3f} nats/byte"
    )
    plot(result, out / "loss.png", title)
    summary = summarize(method, result, corpus, export, text)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out / 'loss.png'} and {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
