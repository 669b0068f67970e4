"""The main job's GPT trained with MD under PyTorch Lightning (``pip install mdparam[lightning]``).

    ./run python -m examples.train_lightning                  # Muon's recipe, 2 epochs on CPU
    ./run python -m examples.train_lightning --optimizer adamw

Registration happens in ``configure_model`` (Lightning restores a checkpoint
after it), the optimizers come from the recipe, and ``mdparam.lightning.step``
runs backward, clipping, every optimizer (the retraction last), the LR
schedule and zeroing. At the end the plain checkpoint is written and loaded
into a fresh plain GPT with strict=True.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import safetensors.torch
import torch

import mdparam
from examples.corpus import load_corpus
from examples.gpt import GPT, GPTConfig
from examples.methods import DEFAULT_LR
from mdparam import lightning as mdl


class LitGPT(L.LightningModule):
    def __init__(self, cfg: GPTConfig, optimizer: str, lr: float) -> None:
        super().__init__()
        self.model = GPT(cfg)
        self.base, self.lr = optimizer, lr
        self.automatic_optimization = False  # Muon's recipe has two optimizers

    def configure_model(self) -> None:
        mdl.setup(self, self.model, self.base, lr=self.lr, head="head")

    def configure_optimizers(self):
        return mdl.configure_optimizers(self)

    def training_step(self, batch, batch_idx):
        loss = self.model.loss(*batch)
        mdl.step(self, loss)  # backward, clip, step every optimizer, schedule, zero
        self.log("loss", loss, prog_bar=True)
        return loss


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--optimizer", choices=["muon", "adamw"], default="muon")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batches", type=int, default=50, help="batches per epoch")
    p.add_argument("--out", default="runs/lightning")
    args = p.parse_args()
    corpus, gen = load_corpus(), torch.Generator().manual_seed(0)
    data = [corpus.batch("train", 8, 128, gen) for _ in range(args.batches)]
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    cfg = GPTConfig(256, 128, 2, 4, 128)
    method = "md-muon" if args.optimizer == "muon" else "md-adamw-relative"
    lit = LitGPT(cfg, args.optimizer, DEFAULT_LR[method])
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator="cpu", logger=False, default_root_dir=args.out
    )
    trainer.fit(lit, loader)
    path = mdparam.save_plain(lit.model, Path(args.out) / "model.safetensors", overwrite=True)
    plain = GPT(cfg)
    plain.load_state_dict(safetensors.torch.load_file(path), strict=True)
    print(f"wrote {path}; a plain GPT loaded it with strict=True")


if __name__ == "__main__":
    main()
