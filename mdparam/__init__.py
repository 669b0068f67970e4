"""mdparam: Magnitude-Direction decoupling for any PyTorch model.

W = diag(phi(r)) . D . diag(phi(c)): a direction D on a fixed-norm sphere and
learnable per-row and per-column gains, each stepped at its own learning rate
by any torch.optim optimizer.

    import mdparam
    mdparam.register(model)
    opt = torch.optim.AdamW(mdparam.param_groups(model, lr=3e-3, gain_lr=1e-3))
    mdparam.Retraction(model).attach(opt)
"""

from .adapters import Adapter, register_adapter
from .checkpoint import load_plain, load_training, plain_state_dict, save_plain, save_training
from .clipping import clip_grad_norm_, fused_grad_norm
from .compiled_step import CompiledStep, compile_step
from .hf import save_pretrained
from .optim import muon_optimizers, muon_param_groups, param_groups, split_params
from .parametrization import MagnitudeDirection, MDConfig, fuse
from .recipe import Recipe, recipe
from .register import Registered, register, registered, reinitialize, remove
from .retraction import Retraction, RetractionError
from .stats import stats

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "CompiledStep",
    "MDConfig",
    "MagnitudeDirection",
    "Recipe",
    "Registered",
    "Retraction",
    "RetractionError",
    "__version__",
    "clip_grad_norm_",
    "compile_step",
    "fuse",
    "fused_grad_norm",
    "load_plain",
    "load_training",
    "muon_optimizers",
    "muon_param_groups",
    "param_groups",
    "plain_state_dict",
    "recipe",
    "register",
    "register_adapter",
    "registered",
    "reinitialize",
    "remove",
    "save_plain",
    "save_pretrained",
    "save_training",
    "split_params",
    "stats",
]
