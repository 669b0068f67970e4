"""Directions sharded by FSDP2: global sphere norms from local shards.

Under FSDP2 each direction is a DTensor whose local shard holds some rows
(``Shard(0)``). A norm that reduces over a sharded dimension (the whole
matrix for a flat sphere, each column for a col sphere) needs the other
ranks' partial sums: every rank computes its local squared norms, all of
them go into one buffer, and one all-reduce per process group makes them
global. Norms over dimensions held whole on each rank (rows of a row sphere
sharded by rows) need no collective. Under DDP parameters are replicated
plain tensors and none of this is used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .sphere import norm_dtype, sphere_dims
from .views import to_matrix

__all__ = [
    "is_sharded",
    "local_radius",
    "relative_step_sharded_",
    "retract_sharded_",
    "sharded_norms",
]

_TINY = 1e-30


def is_sharded(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _matrix_dims_of_storage(layout: str, ndim: int) -> dict[int, int | None]:
    """Storage dim -> the matrix dim it becomes (-2 out, -1 in, None for a batch or merged dim)."""
    if layout == "linear":
        return {0: -2, 1: -1}
    if layout == "transposed":
        return {0: -1, 1: -2}
    if layout == "flatten_in":
        return {0: -2, **{k: -1 for k in range(1, ndim)}}
    if layout == "batched":
        return {**{k: None for k in range(ndim - 2)}, ndim - 2: -2, ndim - 1: -1}
    raise ValueError(f"unknown layout {layout!r}")


def _reduce_groups(d: Tensor, sphere: str, layout: str) -> list:
    """Process groups over which this direction's local norms are partial sums."""
    reduced = set(sphere_dims(sphere))
    to_matrix_dim = _matrix_dims_of_storage(layout, d.ndim)
    groups = []
    for mesh_dim, placement in enumerate(d.placements):
        if placement.is_shard():
            storage_dim = placement.dim % d.ndim
            if to_matrix_dim[storage_dim] in reduced:
                groups.append(d.device_mesh.get_group(mesh_dim))
    return groups


def local_radius(d: Tensor, layout: str, radius: float | Tensor) -> float | Tensor:
    """The part of a per-unit radius tensor that belongs to this rank's shard."""
    if not isinstance(radius, Tensor):
        return radius
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(
        d.shape, d.device_mesh, d.placements
    )
    to_matrix_dim = _matrix_dims_of_storage(layout, d.ndim)
    out = radius
    for storage_dim, (size, start) in enumerate(zip(local_shape, offset)):
        mdim = to_matrix_dim[storage_dim]
        full = d.shape[storage_dim]
        if size == full:
            continue
        if mdim is None or out.shape[mdim] == 1:
            continue  # a dim the radius does not vary along
        if layout == "flatten_in" and storage_dim > 0:
            raise NotImplementedError("per-unit radius on a convolution sharded along its kernel")
        out = out.narrow(mdim, start, size)
    return out


def _all_reduce(flat: Tensor, group: object) -> None:
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)


def sharded_norms(
    directions: Sequence[Tensor], spheres: Sequence[str], layouts: Sequence[str]
) -> list[Tensor]:
    """Global norms (per sphere unit, keepdim, fp32 for low precision) of DTensor directions.

    One all-reduce per distinct process group, whatever the number of tensors.
    """
    squares: list[Tensor] = []
    pending: dict[int, tuple[object, list[int]]] = {}
    for i, (d, sphere, layout) in enumerate(zip(directions, spheres, layouts)):
        m = to_matrix(d.to_local(), layout)
        n = torch.linalg.vector_norm(
            m, dim=sphere_dims(sphere), keepdim=True, dtype=norm_dtype(m.dtype)
        )
        squares.append(n.square_())
        for group in _reduce_groups(d, sphere, layout):
            pending.setdefault(id(group), (group, []))[1].append(i)
    for group, idx in pending.values():
        flat = torch.cat([squares[i].reshape(-1) for i in idx])
        _all_reduce(flat, group)
        offset = 0
        for i in idx:
            n = squares[i].numel()
            squares[i] = flat[offset : offset + n].view_as(squares[i])
            offset += n
    return [s.sqrt_() for s in squares]


def retract_sharded_(
    directions: Sequence[Tensor],
    spheres: Sequence[str],
    layouts: Sequence[str],
    radii: Sequence[float | Tensor],
) -> list[Tensor]:
    """:func:`mdparam.retraction.retract_` for DTensor directions: global norms, local rescale."""
    norms = sharded_norms(directions, spheres, layouts)
    for d, layout, radius, n in zip(directions, layouts, radii, norms):
        to_matrix(d.to_local(), layout).mul_(radius / n.clamp_min(_TINY))
    return norms


def relative_step_sharded_(
    directions: Sequence[Tensor],
    previous: Sequence[Tensor],
    spheres: Sequence[str],
    layouts: Sequence[str],
    radii: Sequence[float | Tensor],
    lrs: Sequence[Tensor],
) -> None:
    """:func:`mdparam.retraction.relative_step_` for DTensor directions (previous: local shards)."""
    steps = []
    for d, prev in zip(directions, previous):
        torch.sub(d.to_local(), prev, out=prev)
        steps.append(prev)
    norms = _norms_like(directions, steps, spheres, layouts)
    for d, u, layout, radius, lr, n in zip(directions, steps, layouts, radii, lrs, norms):
        m = to_matrix(d.to_local(), layout)
        m.addcmul_(to_matrix(u, layout), lr * radius / n.clamp_min(_TINY) - 1)


def _norms_like(directions, locals_, spheres, layouts) -> list[Tensor]:
    """Global norms of local tensors sharded like ``directions``."""
    from torch.distributed.tensor import DTensor

    wrapped = [
        DTensor.from_local(
            t, d.device_mesh, d.placements, run_check=False, shape=d.shape, stride=d.stride()
        )
        for t, d in zip(locals_, directions)
    ]
    return sharded_norms(wrapped, spheres, layouts)
