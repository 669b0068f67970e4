"""Spheres that hold the direction D, and the policies that pick their radius.

All functions take the *matrix view* (..., d_out, d_in) of a tensor (see
:mod:`mdparam.views`).

- ``flat``: ||D||_F = R for each matrix (the authors' default).
- ``row``: every row has norm R (nGPT-style when R = 1).
- ``col``: every column has norm R.

Radius policies:

- ``"shape"`` (default): the whole matrix has Frobenius norm
  sqrt(max(d_out, d_in)), spread evenly over its units. So a flat sphere has
  R = sqrt(max(d_out, d_in)), a row sphere gives each row
  sqrt(max(d_out, d_in) / d_out) and a col sphere gives each column
  sqrt(max(d_out, d_in) / d_in). All three kinds then have the same
  ||D||_F, and one learning rate means the same relative step on each.
- ``"init"``: the weight's own norm at registration (per row or column for
  row/col spheres; per matrix for batched weights).
- a positive number: the norm of each unit the sphere normalises: the whole
  matrix for ``flat``, each row for ``row``, each column for ``col``
  (``radius=1.0, sphere="row"`` gives unit rows).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = [
    "RADIUS_POLICIES",
    "SPHERES",
    "norm_dtype",
    "project",
    "resolve_radius",
    "shape_radius",
    "sphere_dims",
    "sphere_norm",
]

SPHERES = ("flat", "row", "col")
RADIUS_POLICIES = ("shape", "init")


def sphere_dims(sphere: str) -> tuple[int, ...]:
    """The matrix dims a sphere reduces over when it takes a norm."""
    if sphere == "flat":
        return (-2, -1)
    if sphere == "row":
        return (-1,)
    if sphere == "col":
        return (-2,)
    raise ValueError(f"unknown sphere {sphere!r}; choose one of {SPHERES}")


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms of bf16/fp16 tensors are accumulated in fp32."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def sphere_norm(matrix: Tensor, sphere: str) -> Tensor:
    """Norm of each unit of the sphere, keepdim so it broadcasts against ``matrix``."""
    return torch.linalg.vector_norm(
        matrix, dim=sphere_dims(sphere), keepdim=True, dtype=norm_dtype(matrix.dtype)
    )


def shape_radius(d_out: int, d_in: int, sphere: str) -> float:
    """Radius of the ``"shape"`` policy for one unit of the sphere."""
    total = max(d_out, d_in)
    if sphere == "flat":
        return math.sqrt(total)
    if sphere == "row":
        return math.sqrt(total / d_out)
    if sphere == "col":
        return math.sqrt(total / d_in)
    raise ValueError(f"unknown sphere {sphere!r}; choose one of {SPHERES}")


def resolve_radius(radius: str | float, matrix: Tensor, sphere: str) -> float | Tensor:
    """Turn a radius policy into a number, or for ``"init"`` a tensor.

    ``matrix`` is the weight's matrix view at registration. ``"shape"`` and
    numbers give a Python float (a function of the shape or the option, so
    nothing to save). ``"init"`` gives the weight's norms as a tensor that
    broadcasts like :func:`sphere_norm` (fp32 for bf16/fp16 weights): it is
    kept with the model's state, so a checkpoint or DCP resume restores it.
    """
    if isinstance(radius, str):
        if radius == "shape":
            return shape_radius(matrix.shape[-2], matrix.shape[-1], sphere)
        if radius == "init":
            if matrix.is_meta:
                raise ValueError(
                    "radius='init' reads the weight's norm, but the weight is on the "
                    "meta device and has no values; use radius='shape' or a number "
                    "for meta-device registration"
                )
            norms = sphere_norm(matrix.detach(), sphere)
            if not bool(torch.all(torch.isfinite(norms) & (norms > 0))):
                raise ValueError(
                    "radius='init' needs a weight whose norm (per unit of the "
                    f"{sphere!r} sphere) is finite and non-zero"
                )
            return norms
        raise ValueError(
            f"unknown radius {radius!r}; choose one of {RADIUS_POLICIES} or a positive number"
        )
    if isinstance(radius, bool) or not isinstance(radius, numbers.Real):
        raise ValueError(
            f"radius must be one of {RADIUS_POLICIES} or a positive number, got {radius!r}"
        )
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a positive finite number, got {radius!r}")
    return float(radius)


def project(matrix: Tensor, sphere: str, radius: float | Tensor) -> Tensor:
    """Rescale each unit of ``matrix`` to norm ``radius`` (same dtype out)."""
    norms = sphere_norm(matrix, sphere)
    return (matrix * (radius / norms)).to(matrix.dtype)
