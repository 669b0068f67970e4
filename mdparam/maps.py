"""Gain maps phi: raw gain -> positive magnitude, and their inverses.

A gain map turns an unconstrained raw gain into the magnitude that scales a
row or a column of the direction. ``softplus`` is the authors' choice (always
positive, linear for large values); ``exp`` is positive and multiplicative;
``identity`` lets a gain change sign.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GAIN_MAPS", "apply_gain_map", "invert_gain_map"]

GAIN_MAPS = ("softplus", "identity", "exp")

# torch's softplus returns x itself above this threshold; the inverse mirrors it
# so that phi(phi^-1(y)) == y to rounding for every y.
_SOFTPLUS_THRESHOLD = 20.0


def _phi(raw: Tensor, gain_map: str) -> Tensor:
    if gain_map == "softplus":
        return F.softplus(raw)
    if gain_map == "exp":
        return torch.exp(raw)
    raise ValueError(f"unknown gain_map {gain_map!r}; choose one of {GAIN_MAPS}")


def _phi_grad(raw: Tensor, grad: Tensor, gain_map: str) -> Tensor:
    if gain_map == "softplus":  # torch's own: sigmoid, 1 above the threshold
        return torch.ops.aten.softplus_backward(grad, raw, 1.0, _SOFTPLUS_THRESHOLD)
    return grad * torch.exp(raw)


# Under torch.compile the gain maps run as opaque ops. Gains are vectors, so
# eager kernels cost microseconds, while inductor's vectorised exp/log1p code
# for every layer's softplus and its backward added about a third to the cold
# compile time of the benchmark GPT (benchmarks/speed.py, "cold compile").
@torch.library.custom_op("mdparam::gain_map", mutates_args=())
def _gain_map_op(raw: Tensor, gain_map: str) -> Tensor:
    return _phi(raw, gain_map)


@_gain_map_op.register_fake
def _(raw: Tensor, gain_map: str) -> Tensor:
    return torch.empty_like(raw)


@torch.library.custom_op("mdparam::gain_map_backward", mutates_args=())
def _gain_map_backward_op(raw: Tensor, grad: Tensor, gain_map: str) -> Tensor:
    return _phi_grad(raw, grad, gain_map)


@_gain_map_backward_op.register_fake
def _(raw: Tensor, grad: Tensor, gain_map: str) -> Tensor:
    return torch.empty_like(grad)


def _setup(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(inputs[0])
    ctx.gain_map = inputs[1]


def _backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
    (raw,) = ctx.saved_tensors
    return _gain_map_backward_op(raw, grad, ctx.gain_map), None


_gain_map_op.register_autograd(_backward, setup_context=_setup)


def apply_gain_map(raw: Tensor, gain_map: str) -> Tensor:
    """phi(raw): the positive magnitude a raw gain stands for."""
    if gain_map == "identity":
        return raw
    if gain_map not in GAIN_MAPS:
        raise ValueError(f"unknown gain_map {gain_map!r}; choose one of {GAIN_MAPS}")
    if torch.compiler.is_compiling():
        return _gain_map_op(raw, gain_map)
    return _phi(raw, gain_map)


def invert_gain_map(value: Tensor, gain_map: str) -> Tensor:
    """phi^-1(value): the raw gain whose magnitude is ``value``.

    ``value`` must be positive for softplus and exp. Computed stably:
    softplus^-1(y) = y + log(-expm1(-y)), which neither overflows for large y
    nor loses digits for small y.
    """
    if gain_map == "softplus":
        inverse = value + torch.log(-torch.expm1(-value))
        return torch.where(value > _SOFTPLUS_THRESHOLD, value, inverse)
    if gain_map == "exp":
        return torch.log(value)
    if gain_map == "identity":
        return value.clone()
    raise ValueError(f"unknown gain_map {gain_map!r}; choose one of {GAIN_MAPS}")
