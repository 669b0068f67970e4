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

from .layouts import Layout, matrix_dim, to_matrix
from .sphere import Sphere, sphere_dims, sphere_norm

__all__ = [
    "LocalNorms",
    "ShardedNorms",
    "any_rank",
    "is_sharded",
    "local_radius",
    "norm_strategy",
    "norms_are_global",
    "reduce_plan",
    "sharded_norms",
]


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
    # torch internal: DTensor's own rule for which slice of a dim each rank holds
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
    spheres: Sequence[str | Sphere],
    layouts: Sequence[str | Layout],
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
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for i in idx:
            n = squares[i].numel()
            squares[i] = flat[offset : offset + n].view_as(squares[i])
            offset += n
    return [s.sqrt_() for s in squares]


class LocalNorms:
    """Norms of directions held whole by this process: each taken in turn, in cache."""

    sharded = False
    all_reduces = 0  # collectives this strategy issued (none)

    def local(self, d: Tensor) -> Tensor:
        return d

    def radius(self, d: Tensor, layout: str | Layout, radius: float | Tensor) -> float | Tensor:
        return radius

    def norms(self, tensors: Sequence[Tensor]) -> list[Tensor] | None:
        """None: the retraction norms each tensor itself, right before rescaling it."""
        return None

    def agree(self, bad_here: bool, device: torch.device) -> bool:
        return bad_here


class ShardedNorms:
    """Norms of FSDP2-sharded directions: local squares, one all-reduce per process group.

    ``all_reduces`` counts the collectives issued (a public seam for tests and logs).
    """

    sharded = True

    def __init__(
        self,
        directions: Sequence[Tensor],
        spheres: Sequence[str | Sphere],
        layouts: Sequence[str | Layout],
    ) -> None:
        self.spheres, self.layouts = list(spheres), list(layouts)
        self.plan = reduce_plan(directions, self.spheres, self.layouts)
        self.norms_are_global = all(
            norms_are_global(d, s, lay) for d, s, lay in zip(directions, spheres, layouts)
        )
        self.all_reduces = 0

    def local(self, d: Tensor) -> Tensor:
        return d.to_local()

    def radius(self, d: Tensor, layout: str | Layout, radius: float | Tensor) -> float | Tensor:
        return local_radius(d, layout, radius)

    def norms(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        self.all_reduces += len(self.plan)
        return sharded_norms(tensors, self.plan, self.spheres, self.layouts)

    def agree(self, bad_here: bool, device: torch.device) -> bool:
        """Whether any rank saw a bad norm (every rank then raises together)."""
        return bad_here if self.norms_are_global else any_rank(bad_here, device)


def norm_strategy(
    directions: Sequence[Tensor],
    spheres: Sequence[str | Sphere],
    layouts: Sequence[str | Layout],
) -> LocalNorms | ShardedNorms:
    """How the norms of these directions are taken: locally, or across the ranks that shard them."""
    sharded = [is_sharded(d) for d in directions]
    if not any(sharded):
        return LocalNorms()
    if not all(sharded):
        raise ValueError(
            "mdparam.Retraction: some directions are FSDP2-sharded and some are not; "
            "shard the whole registered model (fully_shard on its blocks and root)"
        )
    return ShardedNorms(directions, spheres, layouts)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is True on any rank (one tiny all-reduce)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
