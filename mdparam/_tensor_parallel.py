"""Tensor parallelism (DTensor) for registered layers: styles that shard D and the gains together.

torch's ``ColwiseParallel`` / ``RowwiseParallel`` shard a Linear's ``weight``
by name; on a registered Linear, ``weight`` is computed from
``parametrizations.weight.original*``, and torch's styles fail there (a
``KeyError`` about a parameter name). The styles here shard the originals
instead, consistently with the weight they make:

==============  =====================  =====================
                ColwiseParallel        RowwiseParallel
==============  =====================  =====================
W               rows split, Shard(0)   columns split, Shard(1)
direction D     Shard(0)               Shard(1)
row gains       Shard(0)               replicated
column gains    replicated             Shard(0)
bias            Shard(0)               replicated
==============  =====================  =====================

Order: ``register`` -> ``parallelize_module`` (with torch's plan; it
swaps in these styles for registered layers) -> ``fully_shard`` for 2-D ->
optimizer -> ``Retraction``. The retraction then reduces each sphere's norms
over exactly the mesh dimensions that split it.

Example (2 processes, gloo)::

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    mdparam.register(model)
    mdparam.parallelize_module(model, mesh, {"blocks.*.mlp.up": ColwiseParallel(),
                                             "blocks.*.mlp.down": RowwiseParallel()})
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

from torch import nn
from torch.distributed.tensor import DeviceMesh, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel as _TorchColwise
from torch.distributed.tensor.parallel import ParallelStyle
from torch.distributed.tensor.parallel import RowwiseParallel as _TorchRowwise
from torch.distributed.tensor.parallel import parallelize_module as _torch_parallelize

from ._tree import md_parametrization, original_name, registered

__all__ = ["ColwiseParallel", "RowwiseParallel", "parallelize_module"]

_ALIGNED_GAIN = {0: "row_gain", 1: "col_gain"}  # the gain with one entry per split unit


def _shard_originals(module: nn.Module, mesh: DeviceMesh, dim: int) -> None:
    """Shard a registered Linear's direction, gains and bias so that W is split along ``dim``."""
    param = md_parametrization(module, "weight")
    if param.config.layout != "linear":
        raise NotImplementedError(
            f"mdparam tensor parallel: layout {param.config.layout!r} is not supported; only "
            "nn.Linear weights (layout 'linear') are. Leave this layer out of the plan"
        )
    plist = module.parametrizations.weight
    for i, role in enumerate(param.config.roles):
        t = getattr(plist, original_name(i))
        if role == "direction":
            placement = Shard(dim)
        elif role == _ALIGNED_GAIN[dim]:
            placement = Shard(0)
        else:
            placement = Replicate()
        dt = distribute_tensor(t.detach(), mesh, [placement])
        plist.register_parameter(original_name(i), nn.Parameter(dt, requires_grad=t.requires_grad))
    bias = getattr(module, "bias", None)
    if bias is not None:
        placement = Shard(0) if dim == 0 else Replicate()
        dt = distribute_tensor(bias.detach(), mesh, [placement])
        module.register_parameter("bias", nn.Parameter(dt, requires_grad=bias.requires_grad))


def _partition(dim: int):
    def partition(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        if md_parametrization(module, "weight") is not None:
            _shard_originals(module, mesh, dim)
        elif name == "" and isinstance(module, nn.Linear):  # a plain Linear: as torch does
            for pname, placement in (
                ("weight", Shard(dim)),
                ("bias", Shard(0) if dim == 0 else Replicate()),
            ):
                t = getattr(module, pname)
                if t is not None:
                    dt = distribute_tensor(t.detach(), mesh, [placement])
                    module.register_parameter(
                        pname, nn.Parameter(dt, requires_grad=t.requires_grad)
                    )

    return partition


class ColwiseParallel(_TorchColwise):
    """torch's ColwiseParallel for registered Linears: W's rows (D's rows, row gains) split."""

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        _partition(0)(name, module, device_mesh)


class RowwiseParallel(_TorchRowwise):
    """torch's RowwiseParallel for registered Linears: W's columns (D's, column gains) split."""

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        _partition(1)(name, module, device_mesh)


def _ours(style: ParallelStyle) -> ParallelStyle:
    """The mdparam version of a stock torch style, with the same layouts."""
    for stock, mine in ((_TorchColwise, ColwiseParallel), (_TorchRowwise, RowwiseParallel)):
        if type(style) is stock:
            swapped = mine.__new__(mine)
            swapped.__dict__.update(style.__dict__)
            return swapped
    return style


def parallelize_module(
    module: nn.Module,
    device_mesh: DeviceMesh,
    parallelize_plan: ParallelStyle | Mapping[str, ParallelStyle],
) -> nn.Module:
    """torch's ``parallelize_module``, with mdparam's styles for the registered layers.

    The plan is torch's own (``{"blocks.*.attn.q": ColwiseParallel(), ...}``);
    where it names a registered Linear, torch's Colwise/RowwiseParallel is
    replaced by the one here, with the same input and output layouts.
    Register first, then call this, then ``fully_shard`` for 2-D.

    Example (one process here; under torchrun every rank runs the same):
        >>> import os, tempfile, torch, torch.distributed as dist, mdparam
        >>> from torch.distributed.device_mesh import init_device_mesh
        >>> from torch.distributed.tensor.parallel import ColwiseParallel
        >>> store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
        >>> dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = mdparam.register(model)
        >>> mesh = init_device_mesh("cpu", (1,))
        >>> _ = mdparam.parallelize_module(model, mesh, {"0": ColwiseParallel()})
        >>> type(model[0].parametrizations.weight.original0).__name__
        'DTensor'
        >>> dist.destroy_process_group()
    """
    if isinstance(parallelize_plan, ParallelStyle):
        return _torch_parallelize(module, device_mesh, _ours(parallelize_plan))
    plan: dict[str, ParallelStyle] = {}
    names = [n for n, _ in module.named_modules()]
    shared = _shared_directions(module)
    for key, style in parallelize_plan.items():
        targets = [n for n in names if fnmatch.fnmatchcase(n, key)]
        ours = [n for n in targets if md_parametrization(module.get_submodule(n), "weight")]
        tied = [n for n in ours if f"{n}.weight" in shared]
        if tied:
            raise NotImplementedError(
                f"mdparam.parallelize_module: {tied[0]!r} shares its direction with another "
                "layer (tied='share'); tensor parallelism cannot split one of them alone. "
                "Leave it out of the plan, or register with tied='skip'"
            )
        plan[key] = _ours(style) if ours else style
    return _torch_parallelize(module, device_mesh, plan)


def _shared_directions(module: nn.Module) -> set[str]:
    """Qualified tensor names whose direction another registered tensor uses too."""
    holders: dict[int, list[str]] = {}
    for e in registered(module):
        holders.setdefault(id(e.direction), []).append(e.name)
    return {n for names in holders.values() if len(names) > 1 for n in names}
