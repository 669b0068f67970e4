"""PyTorch Lightning: Trainer.fit with the recipe, checkpoint, resume, export (optional extra)."""

import pytest
import safetensors.torch
import torch
from conftest import rel_err, sphere_error, tiny_gpt

L = pytest.importorskip("lightning")

import mdparam  # noqa: E402
from mdparam import lightning as mdl  # noqa: E402


def batches(n=8, batch=2, block=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 64, (n * batch, block), generator=g)
    data = torch.utils.data.TensorDataset(x, torch.roll(x, -1, 1))
    return torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False)


class LitGPT(L.LightningModule):
    def __init__(self, optimizer="muon"):
        super().__init__()
        self.model = tiny_gpt()
        self.base = optimizer
        self.automatic_optimization = optimizer == "adamw"  # Muon's pair: manual
        self.sphere = []

    def configure_model(self):
        lr = 0.02 if self.base == "muon" else 0.01
        mdl.setup(self, self.model, self.base, lr=lr, head="head")

    def configure_optimizers(self):
        return mdl.configure_optimizers(self)

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):
        mdl.clip(self)  # automatic mode: the recipe's clipping (fused scope)

    def training_step(self, batch, batch_idx):
        loss = self.model.loss(*batch)
        if not self.automatic_optimization:
            mdl.step(self, loss)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.sphere.append(sphere_error(self.model))


class StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def trainer(tmp_path, epochs, **kw):
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_fit_checkpoint_resume_and_export(tmp_path, optimizer):
    full = LitGPT(optimizer)
    trainer(tmp_path / "full", 2).fit(full, batches())
    assert len(full.sphere) == 16 and max(full.sphere) <= 1e-5  # every step back on the sphere
    steps = full.trainer.global_step
    assert steps == 16  # the fused step: one optimizer for either base (Lightning counts each)
    lrs = [s.get_last_lr()[0] for s in full.mdparam_recipe.schedulers]
    assert all(lr < 0.02 for lr in lrs)  # the schedule ran

    half = LitGPT(optimizer)  # the same run, stopped after its first epoch
    t = trainer(tmp_path / "half", 2, callbacks=[StopAfterFirstEpoch()])
    t.fit(half, batches())
    ckpt = tmp_path / "half.ckpt"
    t.save_checkpoint(ckpt)
    assert len(half.sphere) == 8
    resumed = LitGPT(optimizer)
    trainer(tmp_path / "half", 2).fit(resumed, batches(), ckpt_path=ckpt)
    assert len(resumed.sphere) == 8  # only the second epoch ran
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name  # the resumed run is the uninterrupted one

    mdparam.save_plain(full.model, tmp_path / "model.safetensors")
    plain = tiny_gpt(seed=7)
    plain.load_state_dict(safetensors.torch.load_file(tmp_path / "model.safetensors"), strict=True)
    x = next(iter(batches()))[0]
    assert rel_err(plain(x), full.model(x)) <= 1e-5


def test_a_step_before_setup_says_what_to_do():
    with pytest.raises(RuntimeError, match="configure_model"):
        mdl.configure_optimizers(LitGPT())
