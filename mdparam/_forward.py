"""How a registered nn.Linear computes its output: with W formed, or factored.

W = diag(a) D diag(b) can be formed and used (``F.linear(x, W)``), or never
formed: y = a * ((x * b) @ D^T). Forming W is elementwise work on the matrix
(d_out x d_in); the factored form does it on the activations instead
(tokens x (d_in + d_out)). So the factored form is cheaper when

    tokens * (d_in + d_out) < d_out * d_in,

that is, for few tokens per call (decoding, small batches). ``"auto"`` picks
by that rule on every call: a Python branch in eager mode, and a choice made
once per traced shape under torch.compile (no graph break; a new shape
recompiles, as it would anyway). Both forms give the same values and
gradients to rounding.
"""

from __future__ import annotations

import types

import torch.nn.functional as F
from torch import Tensor, nn

from ._kinds import check_choice
from ._tree import originals

__all__ = [
    "FORWARDS",
    "factored_is_cheaper",
    "factored_linear",
    "install_forward",
    "uninstall_forward",
]

FORWARDS = ("formed", "factored", "auto")


def factored_is_cheaper(tokens: int, d_out: int, d_in: int) -> bool:
    """Whether y = a * ((x * b) @ D^T) does less elementwise work than forming W."""
    return tokens * (d_out + d_in) < d_out * d_in


def factored_linear(module: nn.Linear, x: Tensor) -> Tensor:
    """A registered Linear's output without forming W: phi(r) * ((x * phi(c)) @ D^T) + bias."""
    plist = module.parametrizations.weight
    config = plist[0].config
    geometry = config.geometry
    raws = originals(plist)[1:]
    out_scale = None
    for role, raw in zip(geometry.gains.roles, raws):
        mag = geometry.gain_map(raw)
        if role == "col_gain":
            x = x * mag
        else:  # row or scalar gain: scales the output
            out_scale = mag
    y = F.linear(x, plist.original0)
    if out_scale is not None:
        y = y * out_scale
    return y if module.bias is None else y + module.bias


def _linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    mode = self.parametrizations.weight[0].forward_mode
    if mode == "factored" or (
        mode == "auto"
        and factored_is_cheaper(x.numel() // x.shape[-1], self.out_features, self.in_features)
    ):
        return factored_linear(self, x)
    return F.linear(x, self.weight, self.bias)


def install_forward(module: nn.Module, mode: str) -> None:
    """Give a registered nn.Linear the forward ``mode`` says (``"formed"``: torch's own)."""
    check_choice("forward", mode, FORWARDS)
    linear = isinstance(module, nn.Linear)
    if mode == "factored" and not linear:
        raise ValueError(
            f"forward='factored' is for nn.Linear layers; {type(module).__name__} forms its "
            "weight. Use forward='auto' or 'formed' for this layer (overrides= by type)"
        )
    module.parametrizations.weight[0].forward_mode = mode if linear else "formed"
    if mode == "formed" or not linear:
        uninstall_forward(module)
    else:
        module.forward = types.MethodType(_linear_forward, module)


def uninstall_forward(module: nn.Module) -> None:
    """Back to the class's own forward (the instance attribute goes)."""
    if "forward" in vars(module):
        del module.forward
