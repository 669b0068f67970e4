"""PyTorch Lightning: the recipe in a LightningModule's hooks (``pip install mdparam[lightning]``).

Three calls, one per hook::

    import lightning as L
    from mdparam import lightning as mdl

    class LitGPT(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = GPT(cfg)
            self.automatic_optimization = False  # Muon's recipe has two optimizers

        def configure_model(self):  # before a checkpoint is restored into the module
            mdl.setup(self, self.model, "muon", lr=0.03, head="head")

        def configure_optimizers(self):
            return mdl.configure_optimizers(self)

        def training_step(self, batch, batch_idx):
            loss = self.model.loss(*batch)
            mdl.step(self, loss)  # backward, clip, step every optimizer, schedule, zero
            return loss

``setup`` registers the model with ``mdparam.recipe`` (once, in
``configure_model``, so that resuming from a Lightning checkpoint loads into
the registered model) and keeps the ``mdparam.Recipe`` on the module;
the LR schedule runs over the batches the trainer will step on unless
``steps=`` says otherwise. With ``"adamw"`` (one optimizer) automatic optimization works too:
leave ``automatic_optimization`` on, return ``configure_optimizers`` and
call ``clip`` from ``configure_gradient_clipping``; Lightning's
``optimizer.step()`` then runs the retraction.

Lightning's FSDP and DeepSpeed strategies replace parameters after
``configure_model`` and are not supported; single-device and DDP are.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ._clipping import clip_grad_norm_
from ._recipe import Recipe, recipe

__all__ = ["ATTRIBUTE", "clip", "configure_optimizers", "setup", "step"]

ATTRIBUTE = "mdparam_recipe"  # where setup() keeps the Recipe on the LightningModule


def setup(
    module: nn.Module, model: nn.Module, optimizer: str = "muon", **recipe_kwargs: Any
) -> Recipe:
    """Register ``model`` (usually a submodule of ``module``) with the recipe, once.

    Call it from ``configure_model``; later calls return the same recipe.
    ``recipe_kwargs`` go to ``mdparam.recipe`` (``lr`` is required);
    without ``steps``, ``configure_optimizers`` decays the LRs over the
    batches the trainer will step on (``estimated_stepping_batches``).
    """
    existing = getattr(module, ATTRIBUTE, None)
    if existing is not None:
        return existing
    made = recipe(model, optimizer, **recipe_kwargs)
    object.__setattr__(module, ATTRIBUTE, made)  # not an nn.Module attribute: no state_dict entry
    return made


def _stepping_batches(module: nn.Module) -> int | None:
    """How many batches the trainer will step on, or None (no trainer, or no end)."""
    try:
        total = module.trainer.estimated_stepping_batches
    except (AttributeError, RuntimeError):  # Lightning raises when no Trainer is attached
        return None
    return int(total) if total != float("inf") and total > 0 else None


def _recipe_of(module: nn.Module) -> Recipe:
    made = getattr(module, ATTRIBUTE, None)
    if made is None:
        raise RuntimeError(
            "mdparam.lightning: no recipe on this module. Call mdparam.lightning.setup(self, "
            "self.model, ...) in configure_model (it runs before configure_optimizers)"
        )
    return made


def configure_optimizers(module: nn.Module) -> tuple[list, list[dict]]:
    """What ``configure_optimizers`` returns: the recipe's optimizers and per-step schedulers."""
    made = _recipe_of(module)
    held = {id(p) for p in made.trainable()}
    if not all(id(p) in held for p in made.model.parameters() if p.requires_grad):
        raise RuntimeError(
            "mdparam.lightning: the model's parameters changed after configure_model (Lightning's "
            "FSDP and DeepSpeed strategies replace them), so the recipe's optimizers no longer "
            "hold them. Use a single-device or DDP strategy, or shard by hand: "
            "mdparam.register_for_recipe -> fully_shard -> mdparam.recipe"
        )
    if made.steps is None:  # setup() was not told: decay over the batches Lightning will run
        made.schedule(_stepping_batches(module))
    schedulers = [{"scheduler": s, "interval": "step"} for s in made.schedulers]
    return list(made.optimizers), schedulers


def clip(module: nn.Module) -> Tensor | None:
    """Clip as the recipe says (for ``configure_gradient_clipping`` in automatic mode)."""
    made = _recipe_of(module)
    if made.clip is None or made.fused is not None:  # the fused step clips inside
        return None
    return clip_grad_norm_(made.model, made.clip, scope=made.clip_scope)


def step(module: Any, loss: Tensor) -> None:
    """Manual optimization: backward, clip, step every optimizer through Lightning, schedule.

    The optimizers step in the recipe's order (the one holding the hidden
    directions, which carries the retraction, last) through Lightning's
    optimizer wrappers, so ``trainer.global_step`` counts them.
    """
    _recipe_of(module)
    optimizers = module.optimizers()
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    module.manual_backward(loss)
    clip(module)
    for opt in optimizers:
        opt.step()
    schedulers = module.lr_schedulers()
    for sched in schedulers if isinstance(schedulers, list) else [schedulers]:
        if sched is not None:
            sched.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
