"""How a stored weight tensor is seen as a matrix (..., d_out, d_in).

The maths of MD decoupling is about matrices: rows are outputs, columns are
inputs. Layers store their weights in other layouts; a *layout* names the view
that turns the stored tensor into that matrix. The direction keeps the stored
shape (so it shards like the plain weight), and the matrix is a view of it,
except for a ``flatten_in`` tensor whose trailing dims cannot be merged (a
channels_last convolution): then it is a copy, and in-place work must be
written back (:func:`write_back`).

- ``linear``: (d_out, d_in), as nn.Linear.
- ``transposed``: (d_in, d_out), as transformers' GPT-2 ``Conv1D``.
- ``flatten_in``: (d_out, d_in, *kernel), as nn.ConvNd; the kernel joins the
  input axis.
- ``batched``: (*batch, d_out, d_in), as fused MoE expert weights; one matrix
  (one sphere, one set of gains) per leading index.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

__all__ = [
    "LAYOUTS",
    "from_matrix",
    "is_view",
    "matrix_dim",
    "matrix_shape",
    "to_matrix",
    "write_back",
]

LAYOUTS = ("linear", "transposed", "flatten_in", "batched")


def matrix_shape(shape: Sequence[int], layout: str) -> tuple[int, ...]:
    """Shape (*batch, d_out, d_in) of the matrix view of a tensor of ``shape``."""
    shape = tuple(int(s) for s in shape)
    if layout == "linear":
        if len(shape) != 2:
            raise ValueError(f"layout 'linear' needs a 2-D tensor, got shape {shape}")
        return shape
    if layout == "transposed":
        if len(shape) != 2:
            raise ValueError(f"layout 'transposed' needs a 2-D tensor, got shape {shape}")
        return (shape[1], shape[0])
    if layout == "flatten_in":
        if len(shape) < 2:
            raise ValueError(f"layout 'flatten_in' needs >= 2 dims, got shape {shape}")
        inner = 1
        for s in shape[1:]:
            inner *= s
        return (shape[0], inner)
    if layout == "batched":
        if len(shape) < 3:
            raise ValueError(f"layout 'batched' needs >= 3 dims, got shape {shape}")
        return shape
    raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


def matrix_dim(layout: str, ndim: int, storage_dim: int) -> int | None:
    """The matrix dim (-2 out, -1 in) that storage dim ``storage_dim`` of an ``ndim``-D
    tensor becomes under :func:`to_matrix`; None for a batch dim."""
    if layout == "linear":
        return (-2, -1)[storage_dim]
    if layout == "transposed":
        return (-1, -2)[storage_dim]
    if layout == "flatten_in":
        return -2 if storage_dim == 0 else -1
    if layout == "batched":
        return {ndim - 2: -2, ndim - 1: -1}.get(storage_dim)
    raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


def to_matrix(t: Tensor, layout: str) -> Tensor:
    """View a stored tensor as its matrix (..., d_out, d_in)."""
    if layout in ("linear", "batched"):
        return t
    if layout == "transposed":
        return t.mT
    if layout == "flatten_in":
        return t.flatten(1)
    raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


def from_matrix(m: Tensor, layout: str, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`to_matrix`: back to the stored ``shape``."""
    if layout in ("linear", "batched"):
        return m
    if layout == "transposed":
        return m.mT
    if layout == "flatten_in":
        return m.reshape(shape)
    raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


def is_view(t: Tensor, layout: str) -> bool:
    """Whether :func:`to_matrix` of ``t`` is a view (decided from the strides alone)."""
    if layout != "flatten_in":
        return True
    for k in range(1, t.ndim - 1):
        if (
            t.shape[k + 1] != 1
            and t.shape[k] != 1
            and t.stride(k) != t.stride(k + 1) * t.shape[k + 1]
        ):
            return False
    return True


def write_back(matrix: Tensor, t: Tensor, layout: str) -> None:
    """Copy in-place changes made to ``to_matrix(t)`` back into ``t`` when that was a copy."""
    if not is_view(t, layout):
        t.copy_(from_matrix(matrix, layout, t.shape))
