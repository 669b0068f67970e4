"""Tensor layouts: how a stored weight is seen as a matrix (..., d_out, d_in).

The maths of MD decoupling is about matrices: rows are outputs, columns are
inputs. Layers store their weights in other layouts; a ``Layout`` turns
the stored tensor into that matrix and back, by an einops pattern. The
direction keeps the stored shape (so it shards like the plain weight), and
the matrix is a view of it, except for a ``flatten_in`` tensor whose trailing
dims cannot be merged (a channels_last convolution): then it is a copy, and
in-place work must be written back (``Layout.write_back``).

- ``linear``: ``o i -> o i``, as nn.Linear.
- ``transposed``: ``i o -> o i``, as transformers' GPT-2 ``Conv1D``.
- ``flatten_in``: ``o i k1 .. kn -> o (i k1 .. kn)``, as nn.ConvNd; the kernel
  joins the input axis.
- ``batched``: ``... o i -> ... o i``, as fused MoE expert weights; one matrix
  (one sphere, one set of gains) per leading index.

Names are resolved once, at the API's edge, with ``layout_of``; inside,
everything takes the ``Layout`` object.

Examples:
    >>> import torch
    >>> conv = layout_of("flatten_in")
    >>> conv.to_matrix(torch.zeros(8, 3, 5, 5)).shape
    torch.Size([8, 75])
    >>> conv.from_matrix(torch.zeros(8, 75), (8, 3, 5, 5)).shape
    torch.Size([8, 3, 5, 5])
"""

from __future__ import annotations

from collections.abc import Sequence

from einops import rearrange
from torch import Tensor

from ._kinds import Kinds

__all__ = ["LAYOUTS", "Layout", "layout_of"]

_PLANNED_NDIM = 8  # patterns kept for tensors of up to this many dims (more: worked out per call)


class Layout:
    """One way of storing a matrix: the einops patterns from the stored tensor to its
    matrix view and back (``patterns``); subclasses say which dims exist."""

    name = ""

    def __init__(self) -> None:
        self._by_ndim = tuple(self._without_identity(n) for n in range(_PLANNED_NDIM))

    def patterns(self, ndim: int) -> tuple[str, str]:
        """(stored -> matrix, matrix -> stored) einops patterns for an ``ndim``-D tensor."""
        return "o i -> o i", "o i -> o i"

    def matrix_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape (*batch, d_out, d_in) of the matrix view of a tensor of ``shape``."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2:
            raise ValueError(f"layout {self.name!r} needs a 2-D tensor, got shape {shape}")
        return shape

    def matrix_dim(self, ndim: int, storage_dim: int) -> int | None:
        """The matrix dim (-2 out, -1 in) that storage dim ``storage_dim`` becomes; None
        for a batch dim."""
        return (-2, -1)[storage_dim]

    def merges(self, storage_dim: int) -> bool:
        """Whether storage dim ``storage_dim`` shares its matrix dim with another one (so a
        slice of it is no slice of the matrix dim)."""
        return False

    def to_matrix(self, t: Tensor) -> Tensor:
        """The matrix view (..., d_out, d_in) of a stored tensor (a copy only where
        ``is_view`` says so)."""
        there = self._moves(t.ndim)[0]
        return t if there is None else rearrange(t, there)

    def from_matrix(self, m: Tensor, shape: Sequence[int]) -> Tensor:
        """Inverse of ``to_matrix``: back to the stored ``shape``."""
        back = self._moves(len(shape))[1]
        return m if back is None else rearrange(m, back, **_sizes(back, shape))

    def _moves(self, ndim: int) -> tuple[str | None, str | None]:
        """``patterns``, None for one that moves nothing; worked out once per ndim when
        the layout is made, since this runs per tensor per step."""
        if ndim < len(self._by_ndim):
            return self._by_ndim[ndim]
        return self._without_identity(ndim)

    def _without_identity(self, ndim: int) -> tuple[str | None, str | None]:
        return tuple(None if _identity(p) else p for p in self.patterns(ndim))  # type: ignore[return-value]

    def is_view(self, t: Tensor) -> bool:
        """Whether ``to_matrix`` of ``t`` is a view (decided from the strides alone)."""
        return True

    def write_back(self, matrix: Tensor, t: Tensor) -> None:
        """Copy in-place changes made to ``to_matrix(t)`` back into ``t`` when that was a copy."""
        if not self.is_view(t):
            t.copy_(self.from_matrix(matrix, t.shape))

    def __repr__(self) -> str:
        return f"Layout({self.name!r})"


def _identity(pattern: str) -> bool:
    there, back = pattern.split("->")
    return there.split() == back.split()


def _sizes(pattern: str, shape: Sequence[int]) -> dict[str, int]:
    """The axis sizes an inverse pattern needs to split a merged axis: every named axis of
    its output side but the first (the first follows from the others)."""
    axes = pattern.split("->")[1].split()
    return {a: int(n) for a, n in list(zip(axes, shape))[1:] if a != "..."}


class LinearLayout(Layout):
    name = "linear"


class TransposedLayout(Layout):
    name = "transposed"

    def patterns(self, ndim: int) -> tuple[str, str]:
        return "i o -> o i", "o i -> i o"

    def matrix_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        d_in, d_out = super().matrix_shape(shape)
        return (d_out, d_in)

    def matrix_dim(self, ndim: int, storage_dim: int) -> int | None:
        return (-1, -2)[storage_dim]


class FlattenInLayout(Layout):
    name = "flatten_in"

    def patterns(self, ndim: int) -> tuple[str, str]:
        if ndim == 2:  # no kernel: already the matrix
            return super().patterns(ndim)
        kernel = " ".join(f"k{j}" for j in range(1, ndim - 1))
        return f"o i {kernel} -> o (i {kernel})", f"o (i {kernel}) -> o i {kernel}"

    def matrix_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2:
            raise ValueError(f"layout 'flatten_in' needs >= 2 dims, got shape {shape}")
        inner = 1
        for s in shape[1:]:
            inner *= s
        return (shape[0], inner)

    def matrix_dim(self, ndim: int, storage_dim: int) -> int | None:
        return -2 if storage_dim == 0 else -1

    def merges(self, storage_dim: int) -> bool:
        return storage_dim > 0  # d_in and the kernel make one matrix dim

    def is_view(self, t: Tensor) -> bool:
        for k in range(1, t.ndim - 1):
            if (
                t.shape[k + 1] != 1
                and t.shape[k] != 1
                and t.stride(k) != t.stride(k + 1) * t.shape[k + 1]
            ):
                return False
        return True


class BatchedLayout(Layout):
    name = "batched"

    def patterns(self, ndim: int) -> tuple[str, str]:
        return "... o i -> ... o i", "... o i -> ... o i"

    def matrix_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(int(s) for s in shape)
        if len(shape) < 3:
            raise ValueError(f"layout 'batched' needs >= 3 dims, got shape {shape}")
        return shape

    def matrix_dim(self, ndim: int, storage_dim: int) -> int | None:
        return {ndim - 2: -2, ndim - 1: -1}.get(storage_dim)


layout_of: Kinds[Layout] = Kinds("layout", Layout)
for _cls in (LinearLayout, TransposedLayout, FlattenInLayout, BatchedLayout):
    layout_of.add(_cls())
LAYOUTS = layout_of.names
