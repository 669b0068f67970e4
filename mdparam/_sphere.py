"""Spheres that hold the direction D, and the policies that pick their radius.

Each kind is a ``Sphere``, whose methods take the *matrix view*
(..., d_out, d_in) of a tensor (see ``mdparam._layouts``). Names are
resolved once, at the API's edge, with ``sphere_of``.

Examples:
    >>> import torch
    >>> row = sphere_of("row")
    >>> d = row.project(torch.randn(3, 4), 2.0)
    >>> torch.allclose(row.norm(d), torch.full((3, 1), 2.0))
    True

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

from ._gains import GainKind, gain_kind_of
from ._kinds import Kinds, check_choice

__all__ = [
    "RADIUS_POLICIES",
    "SPHERES",
    "Sphere",
    "norm_dtype",
    "resolve_radius",
    "sphere_of",
]

RADIUS_POLICIES = ("shape", "init")


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms of bf16/fp16 tensors are accumulated in fp32."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class Sphere:
    """A sphere kind: which units of the matrix it normalises, and how gains take up a norm.

    ``dims`` are the matrix dims a norm reduces over; ``unit_role`` is the gain
    role with one entry per unit (None for the flat sphere, whose one unit
    any gain can scale).
    """

    name = ""
    dims: tuple[int, ...] = ()
    unit_role: str | None = None

    def norm(self, matrix: Tensor) -> Tensor:
        """Norm of each unit, keepdim so it broadcasts against ``matrix``."""
        return torch.linalg.vector_norm(
            matrix, dim=self.dims, keepdim=True, dtype=norm_dtype(matrix.dtype)
        )

    def units(self, d_out: int, d_in: int) -> int:
        """How many units (rows, columns or the whole matrix) one matrix has."""
        raise NotImplementedError

    def whole_tensor(self, mshape: tuple[int, ...]) -> bool:
        """Whether a tensor whose matrix view has shape ``mshape`` is one unit of this sphere."""
        return False

    def shape_radius(self, d_out: int, d_in: int) -> float:
        """Radius per unit of the ``"shape"`` policy: ||D||_F = sqrt(max(d_out, d_in))."""
        return math.sqrt(max(d_out, d_in) / self.units(d_out, d_in))

    def project(self, matrix: Tensor, radius: float | Tensor) -> Tensor:
        """Rescale each unit of ``matrix`` to norm ``radius`` (same dtype out)."""
        return (matrix * (radius / self.norm(matrix))).to(matrix.dtype)

    def can_absorb(self, gains: GainKind) -> bool:
        """Whether ``gains`` can take up any per-unit scale this sphere removes."""
        return self.unit_role in gains.roles

    def absorb(
        self, scale: Tensor, gains: GainKind, mshape: tuple[int, ...]
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Split the per-unit ``scale`` removed by the sphere into gain magnitudes.

        Returns the magnitudes per gain role (ones where a role takes nothing) and
        what the gains could not take (ones when everything was absorbed).
        """
        ones = torch.ones((), dtype=scale.dtype, device=scale.device)
        mags = {r: ones.expand(gains.shape(r, mshape)) for r in gains.roles}
        if not self.can_absorb(gains):
            return mags, scale
        mags[self.unit_role] = scale.squeeze(self.dims[0])
        return mags, ones.expand_as(scale)

    def absorbing_gains(self) -> tuple[str, ...]:
        """Names of the gain layouts that can take up what this sphere removes."""
        return tuple(g.name for g in gain_kind_of if self.can_absorb(g))

    def __repr__(self) -> str:
        return f"Sphere({self.name!r})"


class FlatSphere(Sphere):
    name = "flat"
    dims = (-2, -1)

    def units(self, d_out: int, d_in: int) -> int:
        return 1

    def whole_tensor(self, mshape: tuple[int, ...]) -> bool:
        return len(mshape) == 2  # batched matrices are normed one by one

    def can_absorb(self, gains: GainKind) -> bool:
        return bool(gains.roles)

    def absorb(
        self, scale: Tensor, gains: GainKind, mshape: tuple[int, ...]
    ) -> tuple[dict[str, Tensor], Tensor]:
        mags, leftover = super().absorb(scale, gains, mshape)
        if not gains.roles:
            return mags, leftover
        s = scale.squeeze(-1)  # (*batch, 1)
        share = s.sqrt() if len(gains.roles) == 2 else s  # rowcol: half each way
        for role in gains.roles:
            mags[role] = share.expand(gains.shape(role, mshape))
        return mags, torch.ones_like(scale)


class RowSphere(Sphere):
    name = "row"
    dims = (-1,)
    unit_role = "row_gain"

    def units(self, d_out: int, d_in: int) -> int:
        return d_out


class ColSphere(Sphere):
    name = "col"
    dims = (-2,)
    unit_role = "col_gain"

    def units(self, d_out: int, d_in: int) -> int:
        return d_in


sphere_of: Kinds[Sphere] = Kinds("sphere", Sphere)
for _cls in (FlatSphere, RowSphere, ColSphere):
    sphere_of.add(_cls())
SPHERES = sphere_of.names


def resolve_radius(radius: str | float, matrix: Tensor, sphere: Sphere) -> float | Tensor:
    """Turn a radius policy into a number, or for ``"init"`` a tensor.

    ``matrix`` is the weight's matrix view at registration. ``"shape"`` and
    numbers give a Python float (a function of the shape or the option, so
    nothing to save). ``"init"`` gives the weight's norms as a tensor that
    broadcasts like ``Sphere.norm`` (fp32 for bf16/fp16 weights): it is
    kept with the model's state, so a checkpoint or DCP resume restores it.
    """
    if isinstance(radius, str):
        if radius == "shape":
            return sphere.shape_radius(matrix.shape[-2], matrix.shape[-1])
        if radius == "init":
            return _init_radius(matrix, sphere)
        check_choice("radius", radius, RADIUS_POLICIES, extra=" or a positive number")
    if isinstance(radius, bool) or not isinstance(radius, numbers.Real):
        raise ValueError(
            f"radius must be one of {RADIUS_POLICIES} or a positive number, got {radius!r}"
        )
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a positive finite number, got {radius!r}")
    return float(radius)


def _init_radius(matrix: Tensor, kind: Sphere) -> Tensor:
    if matrix.is_meta:
        raise ValueError(
            "radius='init' reads the weight's norm, but the weight is on the "
            "meta device and has no values; use radius='shape' or a number "
            "for meta-device registration"
        )
    norms = kind.norm(matrix.detach())
    if not bool(torch.all(torch.isfinite(norms) & (norms > 0))):
        raise ValueError(
            "radius='init' needs a weight whose norm (per unit of the "
            f"{kind.name!r} sphere) is finite and non-zero"
        )
    return norms
