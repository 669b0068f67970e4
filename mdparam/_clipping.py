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
import torch.distributed as dist
from torch import Tensor, nn

from ._distributed import is_sharded, local_radius, pieces
from ._kinds import check_choice
from ._parametrization import gain_magnitudes
from ._tree import Registered, full_tensor, registered, unique_directions

__all__ = ["CLIP_SCOPES", "clip_grad_norm_", "fused_grad_norm", "grad_norm"]

CLIP_SCOPES = ("fused", "all")


def _inverse_square(mag: Tensor) -> Tensor:
    # A magnitude of exactly 0 also zeroes its row of dL/dD, so dL/dW there is unknown;
    # it counts as 0 rather than as 0/0.
    m = mag.detach().float()
    return torch.where(m > 0, 1.0 / m.square(), torch.zeros_like(m))


def _fused_square(entry: Registered) -> Tensor | None:
    """This rank's part of ||dL/dW||^2 of one registered tensor, from dL/dD and the gains."""
    grad = entry.direction.grad
    if grad is None:
        return None
    local = grad.to_local() if is_sharded(grad) else grad
    layout = entry.config.geometry.layout
    g2 = layout.to_matrix(local.detach()).float().square()
    gains = tuple(full_tensor(g.detach()) for g in entry.gains)  # small: whole on every rank
    for mag in gain_magnitudes(gains, entry.config):
        inv = _inverse_square(mag)
        if is_sharded(grad):  # this shard's rows or columns of the gain
            inv = local_radius(grad, layout, inv)
        g2 = g2 * inv
    return g2.sum()


def _square(t: Tensor) -> Tensor:
    local = t.to_local() if is_sharded(t) else t
    return local.detach().float().square().sum()


def _total(squares: list[tuple[Tensor, Tensor]]) -> Tensor:
    """sqrt of the sum of (this rank's squares, the tensor they came from) over the job.

    Without DTensors the squares are whole here. With them, one all-reduce over
    the job sums ``squares x pieces / world`` (see ``_world_weight``), so a
    sharded tensor counts each of its pieces once and a replicated one once.
    """
    if not squares:
        return torch.zeros(())
    device = squares[0][0].device
    if not any(is_sharded(t) for _, t in squares):
        return torch.stack([sq.to(device) for sq, _ in squares]).sum().sqrt()
    total = torch.stack([sq.to(device) * _world_weight(t) for sq, t in squares]).sum()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.sqrt()


def _world_weight(t: Tensor) -> float:
    world = dist.get_world_size()
    if not is_sharded(t):
        return 1.0 / world  # replicated on every rank (DDP, or a module left unsharded)
    return pieces(t) / world


def fused_grad_norm(model: nn.Module) -> Tensor:
    """The L2 norm of the gradient as the plain model would see it.

    That is, over dL/dW of every MD-parametrized tensor (recovered from dL/dD
    and the gains) and the gradient of every other trainable parameter.
    Directions' and gains' own gradients do not enter. Works on FSDP2 and
    tensor-parallel models too (one all-reduce; call it on every rank).
    """
    entries = unique_directions(registered(model))
    md_ids = {id(e.direction) for e in entries} | {id(g) for e in entries for g in e.gains}
    squares = [(sq, e.direction.grad) for e in entries if (sq := _fused_square(e)) is not None]
    squares += [
        (_square(p.grad), p.grad)
        for p in model.parameters()
        if p.requires_grad and id(p) not in md_ids and p.grad is not None
    ]
    return _total(squares)


def grad_norm(model: nn.Module) -> Tensor:
    """The L2 norm over every parameter's gradient (directions and gains included).

    As ``torch.nn.utils.get_total_norm``, also for a model whose gradients mix
    DTensors and plain tensors (tensor parallel on some layers), which torch's refuses.
    """
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    return _total([(_square(g), g) for g in grads])


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
        max_norm: the largest total L2 norm allowed; ``math.inf`` measures the
            norm and changes nothing.
        scope: ``"fused"`` (the authors' clipping) measures the norm on the
            fused weights' gradients dL/dW plus every unregistered
            parameter's gradient, then scales the gradients of directions,
            gains and the rest by one factor, which equals clipping dL/dW
            before D and the gains receive it. ``"all"`` measures it over
            every parameter's gradient, gains and directions included (as
            ``torch.nn.utils.clip_grad_norm_``).
        error_if_nonfinite: raise if the total norm is NaN or infinite.

    Under FSDP2 and tensor parallelism call it on every rank: the norm is
    global (one all-reduce).

    Examples:
        >>> import math, torch, mdparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        >>> _ = mdparam.register(model, init="sphere")
        >>> model(torch.randn(4, 8)).square().sum().mul(100).backward()
        >>> before = mdparam.clip_grad_norm_(model, 1.0)
        >>> after = mdparam.clip_grad_norm_(model, math.inf)  # only measures: now at the limit
        >>> bool(before > 1), round(float(after), 4)
        (True, 1.0)
    """
    check_choice("clip scope", scope, CLIP_SCOPES)
    if not (isinstance(max_norm, int | float) and max_norm > 0 and not math.isnan(max_norm)):
        raise ValueError(
            f"max_norm must be a positive number (math.inf only measures), got {max_norm!r}"
        )
    total = fused_grad_norm(model) if scope == "fused" else grad_norm(model)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"mdparam.clip_grad_norm_: the total gradient norm is {float(total)} ({scope} scope); "
            "the step diverged: lower the learning rate or check the data for inf/NaN"
        )
    if math.isinf(max_norm):
        return total  # only measured: no pass over the gradients
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                grad = p.grad.to_local() if is_sharded(p.grad) else p.grad
                grad.mul_(coef.to(grad.device, grad.dtype))
    return total
