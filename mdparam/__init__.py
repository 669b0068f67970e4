"""mdparam: Magnitude-Direction decoupling for any PyTorch model.

W = diag(phi(r)) . D . diag(phi(c)): a direction D on a fixed-norm sphere and
learnable per-row and per-column gains, each stepped at its own learning rate
by any torch.optim optimizer.

    import mdparam
    train = mdparam.recipe(model, "muon", lr=0.03, steps=10_000)  # from scratch
    ...
    loss.backward(); train.step()
"""

from ._adapters import Adapter, register_adapter
from ._checkpoint import load_plain, load_training, plain_state_dict, save_plain, save_training
from ._clipping import clip_grad_norm_
from ._compiled_step import compile_step
from ._optim import muon_optimizers, param_groups
from ._parametrization import MagnitudeDirection, MDConfig, fuse
from ._recipe import Recipe, recipe, register_for_recipe
from ._register import register, reinitialize, remove
from ._retraction import Retraction, RetractionError
from ._stats import Stats, stats
from ._tree import Registered, registered
from ._version import __version__
from .hf import save_pretrained

__all__ = [
    "Adapter",
    "MDConfig",
    "MagnitudeDirection",
    "Recipe",
    "Registered",
    "Retraction",
    "RetractionError",
    "Stats",
    "__version__",
    "clip_grad_norm_",
    "compile_step",
    "fuse",
    "load_plain",
    "load_training",
    "muon_optimizers",
    "parallelize_module",
    "param_groups",
    "plain_state_dict",
    "recipe",
    "register",
    "register_adapter",
    "register_for_recipe",
    "registered",
    "reinitialize",
    "remove",
    "save_plain",
    "save_pretrained",
    "save_training",
    "stats",
]


def __getattr__(name: str):
    # tensor parallelism loads torch.distributed.tensor, which most users never need
    if name == "parallelize_module":
        from ._tensor_parallel import parallelize_module

        return parallelize_module
    raise AttributeError(f"module 'mdparam' has no attribute {name!r}")
