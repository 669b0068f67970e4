"""Gain maps phi: raw gain -> positive magnitude, and their inverses.

A gain map turns an unconstrained raw gain into the magnitude that scales a
row or a column of the direction. ``softplus`` is the authors' choice (always
positive, linear for large values); ``exp`` is positive and multiplicative;
``identity`` lets a gain change sign. Each is a ``GainMap``, callable
as phi; names are resolved once, at the API's edge, with ``gain_map_of``.

Examples:
    >>> import torch
    >>> softplus = gain_map_of("softplus")
    >>> softplus(softplus.inverse(torch.tensor([0.5, 2.0])))
    tensor([0.5000, 2.0000])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._kinds import Kinds

__all__ = [
    "GAIN_MAPS",
    "GainMap",
    "gain_map_of",
    "gain_map_op",
]

# torch's softplus returns x itself above this threshold; the inverse mirrors it
# so that phi(phi^-1(y)) == y to rounding for every y.
_SOFTPLUS_THRESHOLD = 20.0


class GainMap:
    """phi and its inverse. ``__call__`` is phi inside autograd and torch.compile."""

    name = ""
    opaque = True  # under torch.compile, run as one opaque op (see gain_map_op)

    def phi(self, raw: Tensor) -> Tensor:
        raise NotImplementedError

    def phi_backward(self, raw: Tensor, grad: Tensor) -> Tensor:
        """grad * phi'(raw)."""
        raise NotImplementedError

    def inverse(self, value: Tensor) -> Tensor:
        """phi^-1(value): the raw gain whose magnitude is ``value``."""
        raise NotImplementedError

    def __call__(self, raw: Tensor) -> Tensor:
        if self.opaque and torch.compiler.is_compiling():
            return gain_map_op(raw, self.name)
        return self.phi(raw)

    def __repr__(self) -> str:
        return f"GainMap({self.name!r})"


class SoftplusMap(GainMap):
    name = "softplus"

    def phi(self, raw: Tensor) -> Tensor:
        return F.softplus(raw)

    def phi_backward(self, raw: Tensor, grad: Tensor) -> Tensor:
        # torch's own: sigmoid, 1 above the threshold
        return torch.ops.aten.softplus_backward(grad, raw, 1.0, _SOFTPLUS_THRESHOLD)

    def inverse(self, value: Tensor) -> Tensor:
        # softplus^-1(y) = y + log(-expm1(-y)): neither overflows for large y nor
        # loses digits for small y. ``value`` must be positive.
        inverse = value + torch.log(-torch.expm1(-value))
        return torch.where(value > _SOFTPLUS_THRESHOLD, value, inverse)


class ExpMap(GainMap):
    name = "exp"

    def phi(self, raw: Tensor) -> Tensor:
        return torch.exp(raw)

    def phi_backward(self, raw: Tensor, grad: Tensor) -> Tensor:
        return grad * torch.exp(raw)

    def inverse(self, value: Tensor) -> Tensor:
        return torch.log(value)


class IdentityMap(GainMap):
    name = "identity"
    opaque = False

    def phi(self, raw: Tensor) -> Tensor:
        return raw

    def phi_backward(self, raw: Tensor, grad: Tensor) -> Tensor:
        return grad

    def inverse(self, value: Tensor) -> Tensor:
        return value.clone()


gain_map_of: Kinds[GainMap] = Kinds("gain_map", GainMap)
for _cls in (SoftplusMap, IdentityMap, ExpMap):
    gain_map_of.add(_cls())
GAIN_MAPS = gain_map_of.names


# Under torch.compile the gain maps run as opaque ops. Gains are vectors, so
# eager kernels cost microseconds, while inductor's vectorised exp/log1p code
# for every layer's softplus and its backward adds much to the cold compile
# time of a model (benchmarks/speed.py, "cold compile").
@torch.library.custom_op("mdparam::gain_map", mutates_args=())
def gain_map_op(raw: Tensor, gain_map: str) -> Tensor:
    return gain_map_of(gain_map).phi(raw)


@gain_map_op.register_fake
def _(raw: Tensor, gain_map: str) -> Tensor:
    return torch.empty_like(raw)


@torch.library.custom_op("mdparam::gain_map_backward", mutates_args=())
def _gain_map_backward_op(raw: Tensor, grad: Tensor, gain_map: str) -> Tensor:
    return gain_map_of(gain_map).phi_backward(raw, grad)


@_gain_map_backward_op.register_fake
def _(raw: Tensor, grad: Tensor, gain_map: str) -> Tensor:
    return torch.empty_like(grad)


def _setup(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(inputs[0])
    ctx.gain_map = inputs[1]


def _backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
    (raw,) = ctx.saved_tensors
    return _gain_map_backward_op(raw, grad, ctx.gain_map), None


gain_map_op.register_autograd(_backward, setup_context=_setup)
