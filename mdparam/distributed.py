"""Directions sharded by FSDP2: global sphere norms from local shards.

Under FSDP2 each direction is a DTensor whose local shard holds some rows
(``Shard(0)``). A norm that reduces over a sharded dimension (the whole
matrix for a flat sphere, each column for a col sphere) needs the other
ranks' partial sums: every rank computes its local squared norms, all of
them go into one buffer, and one all-reduce per process group makes them
global. Norms over dimensions held whole on each rank (rows of a row sphere
sharded by rows, each expert of a batched weight sharded by experts) need no
collective. Under DDP parameters are replicated plain tensors and none of
this is used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .layouts import matrix_dim, to_matrix
from .sphere import sphere_dims, sphere_norm

__all__ = ["is_sharded", "local_radius", "norms_are_global", "reduce_plan", "sharded_norms"]


def is_sharded(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _sharded_dims(d: Tensor) -> list[tuple[int, int]]:
    """(mesh dim, storage dim) for every Shard placement of a DTensor."""
    return [(m, p.dim % d.ndim) for m, p in enumerate(d.placements) if p.is_shard()]


def _reduce_groups(d: Tensor, sphere: str, layout: str) -> list:
    """Process groups over which this direction's local norms are partial sums."""
    reduced = set(sphere_dims(sphere))
    return [
        d.device_mesh.get_group(mesh_dim)
        for mesh_dim, storage_dim in _sharded_dims(d)
        if matrix_dim(layout, d.ndim, storage_dim) in reduced
    ]


def norms_are_global(d: Tensor, sphere: str, layout: str) -> bool:
    """Whether every rank sees all of this direction's norms (after the all-reduce)."""
    reduced = set(sphere_dims(sphere))
    return all(matrix_dim(layout, d.ndim, sd) in reduced for _, sd in _sharded_dims(d))


def local_radius(d: Tensor, layout: str, radius: float | Tensor) -> float | Tensor:
    """The part of a radius tensor (``radius="init"``) that belongs to this rank's shard."""
    if not isinstance(radius, Tensor):
        return radius
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(
        d.shape, d.device_mesh, d.placements
    )
    out = radius
    for storage_dim, (size, start) in enumerate(zip(local_shape, offset)):
        if size == d.shape[storage_dim]:
            continue
        mdim = matrix_dim(layout, d.ndim, storage_dim)
        rdim = storage_dim if mdim is None else out.ndim + mdim  # batch dims lead in both
        if out.shape[rdim] == 1:
            continue  # the radius does not vary along this dim
        if layout == "flatten_in" and storage_dim > 0:
            raise NotImplementedError(
                "radius='init' on a convolution sharded along its kernel is not supported; "
                "use radius='shape' or shard along the output channels"
            )
        out = out.narrow(rdim, start, size)
    return out


def _all_reduce(flat: Tensor, group: object) -> None:
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)


ReducePlan = list[tuple[object, list[int]]]


def reduce_plan(
    like: Sequence[Tensor], spheres: Sequence[str], layouts: Sequence[str]
) -> ReducePlan:
    """For each process group, the indices of the DTensors ``like`` whose norms it sums.

    Depends only on placements, spheres and layouts, so a retraction computes it once.
    """
    pending: dict[int, tuple[object, list[int]]] = {}
    for i, (d, sphere, layout) in enumerate(zip(like, spheres, layouts)):
        for group in _reduce_groups(d, sphere, layout):
            pending.setdefault(id(group), (group, []))[1].append(i)
    return list(pending.values())


def sharded_norms(
    locals_: Sequence[Tensor],
    plan: ReducePlan,
    spheres: Sequence[str],
    layouts: Sequence[str],
) -> list[Tensor]:
    """Global norms per sphere unit (keepdim) of local shards, reduced as ``plan`` says.

    One all-reduce per distinct process group, whatever the number of tensors.
    """
    squares = [
        sphere_norm(to_matrix(t, layout), sphere).square_()
        for t, sphere, layout in zip(locals_, spheres, layouts)
    ]
    for group, idx in plan:
        flat = torch.cat([squares[i].reshape(-1) for i in idx])
        _all_reduce(flat, group)
        offset = 0
        for i in idx:
            n = squares[i].numel()
            squares[i] = flat[offset : offset + n].view_as(squares[i])
            offset += n
    return [s.sqrt_() for s in squares]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is True on any rank (one tiny all-reduce)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
