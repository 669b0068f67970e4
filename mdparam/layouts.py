"""Tensor layouts: how a stored weight is seen as a matrix (..., d_out, d_in).

The maths of MD decoupling is about matrices: rows are outputs, columns are
inputs. Layers store their weights in other layouts; a :class:`Layout` turns
the stored tensor into that matrix and back. The direction keeps the stored
shape (so it shards like the plain weight), and the matrix is a view of it,
except for a ``flatten_in`` tensor whose trailing dims cannot be merged (a
channels_last convolution): then it is a copy, and in-place work must be
written back (:meth:`Layout.write_back`).

- ``linear``: (d_out, d_in), as nn.Linear.
- ``transposed``: (d_in, d_out), as transformers' GPT-2 ``Conv1D``.
- ``flatten_in``: (d_out, d_in, *kernel), as nn.ConvNd; the kernel joins the
  input axis.
- ``batched``: (*batch, d_out, d_in), as fused MoE expert weights; one matrix
  (one sphere, one set of gains) per leading index.

The functions below take a layout's name or object.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .kinds import Kinds

__all__ = [
    "LAYOUTS",
    "Layout",
    "from_matrix",
    "is_view",
    "layout_of",
    "matrix_dim",
    "matrix_shape",
    "to_matrix",
    "write_back",
]


class Layout:
    """One way of storing a matrix; subclasses override the views."""

    name = ""

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
        return t

    def from_matrix(self, m: Tensor, shape: Sequence[int]) -> Tensor:
        """Inverse of :meth:`to_matrix`: back to the stored ``shape``."""
        return m

    def is_view(self, t: Tensor) -> bool:
        """Whether :meth:`to_matrix` of ``t`` is a view (decided from the strides alone)."""
        return True

    def write_back(self, matrix: Tensor, t: Tensor) -> None:
        """Copy in-place changes made to ``to_matrix(t)`` back into ``t`` when that was a copy."""
        if not self.is_view(t):
            t.copy_(self.from_matrix(matrix, t.shape))

    def __repr__(self) -> str:
        return f"Layout({self.name!r})"


class LinearLayout(Layout):
    name = "linear"


class TransposedLayout(Layout):
    name = "transposed"

    def matrix_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        d_in, d_out = super().matrix_shape(shape)
        return (d_out, d_in)

    def matrix_dim(self, ndim: int, storage_dim: int) -> int | None:
        return (-1, -2)[storage_dim]

    def to_matrix(self, t: Tensor) -> Tensor:
        return t.mT

    def from_matrix(self, m: Tensor, shape: Sequence[int]) -> Tensor:
        return m.mT


class FlattenInLayout(Layout):
    name = "flatten_in"

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

    def to_matrix(self, t: Tensor) -> Tensor:
        return t.flatten(1)

    def from_matrix(self, m: Tensor, shape: Sequence[int]) -> Tensor:
        return m.reshape(shape)

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


def matrix_shape(shape: Sequence[int], layout: str | Layout) -> tuple[int, ...]:
    """Shape (*batch, d_out, d_in) of the matrix view of a tensor of ``shape``."""
    return layout_of(layout).matrix_shape(shape)


def matrix_dim(layout: str | Layout, ndim: int, storage_dim: int) -> int | None:
    """The matrix dim (-2 out, -1 in) that storage dim ``storage_dim`` of an ``ndim``-D
    tensor becomes under :func:`to_matrix`; None for a batch dim."""
    return layout_of(layout).matrix_dim(ndim, storage_dim)


def to_matrix(t: Tensor, layout: str | Layout) -> Tensor:
    """View a stored tensor as its matrix (..., d_out, d_in)."""
    return layout_of(layout).to_matrix(t)


def from_matrix(m: Tensor, layout: str | Layout, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`to_matrix`: back to the stored ``shape``."""
    return layout_of(layout).from_matrix(m, shape)


def is_view(t: Tensor, layout: str | Layout) -> bool:
    """Whether :func:`to_matrix` of ``t`` is a view (decided from the strides alone)."""
    return layout_of(layout).is_view(t)


def write_back(matrix: Tensor, t: Tensor, layout: str | Layout) -> None:
    """Copy in-place changes made to ``to_matrix(t)`` back into ``t`` when that was a copy."""
    layout_of(layout).write_back(matrix, t)
