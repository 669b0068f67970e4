"""Gradient-norm clipping measured on the fused weights, as the authors clip.

The authors' optimizer sees the fused weight W as the model's parameter: it
clips dL/dW (together with every other parameter's gradient) and only then
derives the gradients of D and of the gains from the clipped dL/dW. Here the
model's leaves are D and the raw gains, so ``torch.nn.utils.clip_grad_norm_``
would measure their gradients instead. With W = diag(a) D diag(b),
dL/dD = a * dL/dW * b elementwise, so ||dL/dW|| is read back from dL/dD, and
because the gradients of D and of the gains are linear in dL/dW, scaling all
of them by the clip factor is the same as clipping dL/dW first.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .distributed import is_sharded
from .layouts import to_matrix
from .parametrization import gain_magnitudes
from .tree import Registered, registered, unique_directions

__all__ = ["CLIP_SCOPES", "clip_grad_norm_", "fused_grad_norm"]

CLIP_SCOPES = ("fused", "all")


def _inverse_square(mag: Tensor) -> Tensor:
    # A magnitude of exactly 0 also zeroes its row of dL/dD, so dL/dW there is unknown;
    # it counts as 0 rather than as 0/0.
    m = mag.detach().float()
    return torch.where(m > 0, 1.0 / m.square(), torch.zeros_like(m))


def _fused_square(entry: Registered) -> Tensor | None:
    """||dL/dW||^2 of one registered tensor, from its direction's gradient and its gains."""
    grad = entry.direction.grad
    if grad is None:
        return None
    g2 = to_matrix(grad.detach(), entry.config.layout).float().square()
    mags = gain_magnitudes(tuple(g.detach() for g in entry.gains), entry.config)
    for mag in mags:
        g2 = g2 * _inverse_square(mag)
    return g2.sum()


def fused_grad_norm(model: nn.Module) -> Tensor:
    """The L2 norm of the gradient as the plain model would see it.

    That is, over dL/dW of every MD-parametrized tensor (recovered from dL/dD
    and the gains) and the gradient of every other trainable parameter.
    Directions' and gains' own gradients do not enter.
    """
    entries = unique_directions(registered(model))
    params = [p for p in model.parameters() if p.requires_grad]
    if any(is_sharded(p) for p in params):
        raise NotImplementedError(
            "mdparam.clip_grad_norm_(scope='fused') does not support FSDP2-sharded "
            "parameters yet; use scope='all' (torch's clipping over D, gains and the rest)"
        )
    md_ids = {id(e.direction) for e in entries}
    md_ids |= {id(g) for e in entries for g in e.gains}
    squares = [s for s in map(_fused_square, entries) if s is not None]
    squares += [
        p.grad.detach().float().square().sum()
        for p in params
        if id(p) not in md_ids and p.grad is not None
    ]
    if not squares:
        return torch.zeros(())
    return torch.stack([s.to(squares[0].device) for s in squares]).sum().sqrt()


def clip_grad_norm_(
    model: nn.Module,
    max_norm: float,
    *,
    scope: str = "fused",
    error_if_nonfinite: bool = False,
) -> Tensor:
    """Clip the gradients of ``model`` in place; return the total norm before clipping.

    Args:
        model: a registered model (a compiled or DDP wrapper works too, as
            long as its parameters are the model's).
        max_norm: the largest total L2 norm allowed.
        scope: ``"fused"`` (the authors' clipping) measures the norm on the
            fused weights' gradients dL/dW plus every unregistered
            parameter's gradient, then scales the gradients of directions,
            gains and the rest by one factor, which equals clipping dL/dW
            before D and the gains receive it. ``"all"`` is
            ``torch.nn.utils.clip_grad_norm_`` over every parameter, gains and
            directions included.
        error_if_nonfinite: raise if the total norm is NaN or infinite.

    Example:
        >>> import torch, mdparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        >>> _ = mdparam.register(model, init="sphere")
        >>> model(torch.randn(4, 8)).square().sum().mul(100).backward()
        >>> before = mdparam.clip_grad_norm_(model, 1.0)
        >>> bool(before > 1), round(float(mdparam.fused_grad_norm(model)), 4)
        (True, 1.0)
    """
    if scope not in CLIP_SCOPES:
        raise ValueError(f"unknown clip scope {scope!r}; choose one of {CLIP_SCOPES}")
    if not (isinstance(max_norm, int | float) and math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be a positive finite number, got {max_norm!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if scope == "all":
        return torch.nn.utils.clip_grad_norm_(
            params, max_norm, error_if_nonfinite=error_if_nonfinite
        )
    total = fused_grad_norm(model)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"mdparam.clip_grad_norm_: the total gradient norm is {float(total)} (fused scope); "
            "the step diverged: lower the learning rate or check the data for inf/NaN"
        )
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
