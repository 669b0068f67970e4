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

from ._layouts import Layout
from ._sphere import Sphere

__all__ = [
    "LocalNorms",
    "ShardedNorms",
    "any_rank",
    "is_sharded",
    "local_radius",
    "norm_strategy",
    "norms_are_global",
    "pieces",
    "reduce_plan",
    "sharded_norms",
]


def is_sharded(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _split_dim(placement: object) -> int | None:
    """The tensor dim a placement splits, or None (replicated, partial).

    FSDP2 on top of tensor parallel shards a dim that TP already split with a
    strided shard, which is not a ``Shard`` (``is_shard()`` is False) but splits
    its ``dim`` all the same.
    """
    if placement.is_shard():
        return placement.dim
    if placement.is_replicate() or placement.is_partial():
        return None
    return getattr(placement, "dim", None)


def _sharded_dims(d: Tensor) -> list[tuple[int, int]]:
    """(mesh dim, storage dim) for every placement that splits a DTensor (none for a tensor)."""
    if not is_sharded(d):
        return []
    dims = [(m, _split_dim(p)) for m, p in enumerate(d.placements)]
    return [(m, sd % d.ndim) for m, sd in dims if sd is not None]


def _reduced_mesh_dims(d: Tensor, sphere: Sphere, layout: Layout) -> list[int]:
    """The mesh dims that split one of the matrix dims this direction's sphere norms over."""
    reduced = set(sphere.dims)
    return sorted({m for m, sd in _sharded_dims(d) if layout.matrix_dim(d.ndim, sd) in reduced})


def norms_are_global(d: Tensor, sphere: Sphere, layout: Layout) -> bool:
    """Whether every rank sees all of this direction's norms (after the all-reduce)."""
    reduced = set(sphere.dims)
    return all(layout.matrix_dim(d.ndim, sd) in reduced for _, sd in _sharded_dims(d))


def local_radius(d: Tensor, layout: Layout, radius: float | Tensor) -> float | Tensor:
    """The part of a radius tensor (``radius="init"``) that belongs to this rank's shard."""
    if is_sharded(radius):  # tensor parallel replicates the parametrization's buffers
        radius = radius.full_tensor()
    if not isinstance(radius, Tensor) or not is_sharded(d):
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
        mdim = layout.matrix_dim(d.ndim, storage_dim)
        rdim = storage_dim if mdim is None else out.ndim + mdim  # batch dims lead in both
        if out.shape[rdim] == 1:
            continue  # the radius does not vary along this dim
        if layout.merges(storage_dim):
            raise NotImplementedError(
                "radius='init' on a convolution sharded along its kernel is not supported; "
                "use radius='shape' or shard along the output channels"
            )
        out = out.narrow(rdim, start, size)
    return out


# One collective: a process group, the directions it reduces, and the weight each direction's
# local squares get before the sum (None: 1 for all).
ReducePlan = list[tuple[object, list[int], list[float] | None]]


def pieces(d: Tensor) -> int:
    """How many distinct pieces a DTensor is split into across its mesh (1 for a tensor)."""
    n = 1
    for m, _ in _sharded_dims(d):
        n *= d.device_mesh.size(m)
    return n


def _world_weight(d: Tensor, sphere: Sphere, layout: Layout) -> float | None:
    """The weight that makes a sum over every rank of the job this direction's norm, or None.

    A direction split only along dims its sphere norms over (any flat sphere; FSDP2,
    tensor parallel, or both) has ``pieces`` distinct pieces, each held by
    ``world / pieces`` ranks: summing ``local squares x pieces / world`` over all
    ranks counts each piece once. So one all-reduce over the job serves every such
    direction, whatever its mesh. A direction also split along another dim (a row
    sphere with its rows split) has norms that differ between ranks: None.
    """
    reduced = _reduced_mesh_dims(d, sphere, layout)
    if not reduced or len(reduced) != len(_sharded_dims(d)):
        return None
    return pieces(d) / dist.get_world_size()


def reduce_plan(
    like: Sequence[Tensor], spheres: Sequence[Sphere], layouts: Sequence[Layout]
) -> ReducePlan:
    """The collectives that make local squared norms global, and which directions each serves.

    Directions whose norms are global (see ``_world_weight``) share one all-reduce
    over the whole job; the others get one per process group they are split over.
    Every rank must hold every direction (SPMD). Depends only on placements, spheres
    and layouts, so a retraction computes it once.
    """
    world: list[int] = []
    weights: list[float] = []
    pending: dict[int, tuple[object, list[int], None]] = {}
    for i, (d, sphere, layout) in enumerate(zip(like, spheres, layouts)):
        weight = _world_weight(d, sphere, layout) if is_sharded(d) else None
        if weight is not None:
            world.append(i)
            weights.append(weight)
            continue
        for m in _reduced_mesh_dims(d, sphere, layout):
            group = d.device_mesh.get_group(m)
            pending.setdefault(id(group), (group, [], None))[1].append(i)
    plan: ReducePlan = list(pending.values())
    if world:
        exact = all(w == 1.0 for w in weights)
        plan.insert(0, (dist.group.WORLD, world, None if exact else weights))
    return plan


def sharded_norms(
    locals_: Sequence[Tensor],
    plan: ReducePlan,
    spheres: Sequence[Sphere],
    layouts: Sequence[Layout],
) -> list[Tensor]:
    """Global norms per sphere unit (keepdim) of local shards, reduced as ``plan`` says.

    One all-reduce per entry of the plan, whatever the number of tensors.
    """
    squares = [
        sphere.norm(layout.to_matrix(t)).square_()
        for t, sphere, layout in zip(locals_, spheres, layouts)
    ]
    for group, idx, weights in plan:
        parts = [squares[i].reshape(-1) for i in idx]
        if weights is not None:
            parts = [p * w for p, w in zip(parts, weights)]
        flat = torch.cat(parts)
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

    def radius(self, d: Tensor, layout: Layout, radius: float | Tensor) -> float | Tensor:
        return radius

    def norms(self, tensors: Sequence[Tensor]) -> list[Tensor] | None:
        """None: the retraction norms each tensor itself, right before rescaling it."""
        return None

    def agree(self, bad_here: bool, device: torch.device) -> bool:
        return bad_here


class ShardedNorms:
    """Norms of sharded directions (FSDP2, tensor parallel, both): local squares, then one
    all-reduce per process group for all of them. Directions held whole are normed locally.

    ``all_reduces`` counts the collectives issued (a public seam for tests and logs).
    """

    sharded = True

    def __init__(
        self,
        directions: Sequence[Tensor],
        spheres: Sequence[Sphere],
        layouts: Sequence[Layout],
    ) -> None:
        self.spheres, self.layouts = list(spheres), list(layouts)
        self.plan = reduce_plan(directions, self.spheres, self.layouts)
        self.norms_are_global = all(
            norms_are_global(d, s, lay) for d, s, lay in zip(directions, spheres, layouts)
        )
        self.all_reduces = 0

    def local(self, d: Tensor) -> Tensor:
        return d.to_local() if is_sharded(d) else d

    def radius(self, d: Tensor, layout: Layout, radius: float | Tensor) -> float | Tensor:
        return local_radius(d, layout, radius)

    def norms(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        self.all_reduces += len(self.plan)
        return sharded_norms(tensors, self.plan, self.spheres, self.layouts)

    def agree(self, bad_here: bool, device: torch.device) -> bool:
        """Whether any rank saw a bad norm (every rank then raises together)."""
        return bad_here if self.norms_are_global else any_rank(bad_here, device)


def norm_strategy(
    directions: Sequence[Tensor],
    spheres: Sequence[Sphere],
    layouts: Sequence[Layout],
) -> LocalNorms | ShardedNorms:
    """How the norms of these directions are taken: locally, or across the ranks that shard them."""
    if not any(is_sharded(d) for d in directions):
        return LocalNorms()
    return ShardedNorms(directions, spheres, layouts)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is True on any rank (one tiny all-reduce)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
