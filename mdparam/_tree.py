"""Finding things in a module tree: parametrized tensors, tied weights, wrappers.

Every other module asks here: which tensors carry the MD parametrization
(``registered``), which Parameters are shared between modules
(``tie_map``), what model sits inside torch.compile / DDP wrappers
(``unwrap``), whether FSDP2 or torch.compile already wrapped a model
(``check_not_wrapped``), the whole value of a possibly sharded
tensor (``full_tensor``), and the tensors a parametrized layer keeps
(``original_name``, ``originals``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._parametrization import MagnitudeDirection, MDConfig

__all__ = [
    "Registered",
    "check_not_wrapped",
    "clean_key",
    "full_tensor",
    "md_parametrization",
    "original_name",
    "originals",
    "registered",
    "tie_map",
    "unique_directions",
    "unwrap",
]


def original_name(i: int) -> str:
    """The attribute under which torch.nn.utils.parametrize keeps a layer's ``i``-th tensor
    (0: the direction; then the raw gains, in the order of ``MDConfig.roles``)."""
    return f"original{i}"


def originals(plist: nn.Module) -> tuple[Tensor, ...]:
    """The tensors a parametrization list keeps: the direction, then the raw gains."""
    return tuple(getattr(plist, original_name(i)) for i in range(plist.ntensors))


@dataclass(frozen=True)
class Registered:
    """One parametrized tensor: where it lives and how it is parametrized.

    Examples:
        >>> import torch, mdparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
        >>> _ = mdparam.register(model)
        >>> (entry,) = mdparam.registered(model)
        >>> entry.name, tuple(entry.direction.shape), [tuple(g.shape) for g in entry.gains]
        ('0.weight', (3, 4), [(3,), (4,)])
    """

    name: str  # qualified tensor name, e.g. "blocks.0.attn.q.weight"
    module: nn.Module
    tensor_name: str
    parametrization: MagnitudeDirection

    @property
    def originals(self) -> tuple[Tensor, ...]:
        return originals(self.module.parametrizations[self.tensor_name])

    @property
    def direction(self) -> nn.Parameter:
        return self.module.parametrizations[self.tensor_name].original0

    @property
    def gains(self) -> tuple[nn.Parameter, ...]:
        return self.originals[1:]

    @property
    def config(self) -> MDConfig:
        return self.parametrization.config

    @property
    def module_name(self) -> str:
        return self.name[: -len(self.tensor_name) - 1] if "." in self.name else ""


def md_parametrization(module: nn.Module, tensor_name: str) -> MagnitudeDirection | None:
    """The MD parametrization of ``module.<tensor_name>``, or None."""
    if not parametrize.is_parametrized(module, tensor_name):
        return None
    first = module.parametrizations[tensor_name][0]
    return first if isinstance(first, MagnitudeDirection) else None


def registered(model: nn.Module) -> list[Registered]:
    """Every tensor of ``model`` that carries the MD parametrization, in module order.

    Names are qualified from ``model`` (so a compiled model's names start with
    ``_orig_mod.``). A tensor shared by several modules (``tied="share"``)
    appears once per module.

    Examples:
        >>> import torch, mdparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> _ = mdparam.register(model)
        >>> print(*(e.name for e in mdparam.registered(model)))
        0.weight 2.weight
    """
    out = []
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        if not parametrize.is_parametrized(mod):
            continue
        for tensor_name in mod.parametrizations:
            p = md_parametrization(mod, tensor_name)
            if p is not None:
                name = f"{mod_name}.{tensor_name}" if mod_name else tensor_name
                out.append(Registered(name, mod, tensor_name, p))
    return out


def unique_directions(entries: list[Registered]) -> list[Registered]:
    """``entries`` with each direction once (its first holder): tied="share" layers share one."""
    seen: set[int] = set()
    out = []
    for e in entries:
        if id(e.direction) not in seen:
            seen.add(id(e.direction))
            out.append(e)
    return out


Holder = tuple[str, nn.Module, str]  # (qualified name, module, attribute)


def tie_map(model: nn.Module) -> dict[int, list[Holder]]:
    """Parameter id -> its holders, one per module.

    A module that appears twice in the tree (reused) holds its weight once: that
    is not a tie. Two modules holding one Parameter are.
    """
    holders: dict[int, dict[tuple[int, str], Holder]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for tname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            qual = f"{mod_name}.{tname}" if mod_name else tname
            holders.setdefault(id(p), {}).setdefault((id(mod), tname), (qual, mod, tname))
    return {k: list(v.values()) for k, v in holders.items()}


def _compiled_module_type() -> type:
    from torch._dynamo.eval_frame import OptimizedModule  # torch.compile's wrapper class

    return OptimizedModule


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside torch.compile / DDP / DataParallel wrappers."""
    compiled = _compiled_module_type()
    while True:
        if isinstance(model, compiled):
            model = model._orig_mod  # torch internal: the compiled wrapper's module
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        else:
            return model


def clean_key(key: str) -> str:
    """A state key without torch.compile's ``_orig_mod`` segments (per-block compile)."""
    return ".".join(p for p in key.split(".") if p != "_orig_mod")


def full_tensor(t: Tensor) -> Tensor:
    """A whole local tensor: DTensor shards are gathered (a collective on every rank)."""
    gather = getattr(t, "full_tensor", None)
    return gather() if callable(gather) else t


def _is_fsdp_or_sharded(mod: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(mod, FSDPModule) or any(
        isinstance(p, DTensor) for p in mod.parameters(recurse=False)
    )


def check_not_wrapped(model: nn.Module, what: str = "mdparam.register") -> None:
    """Raise if torch.compile or FSDP2 already wrapped ``model``: register comes first."""
    if isinstance(model, _compiled_module_type()):
        raise RuntimeError(
            f"{what} got a compiled model (torch.compile wraps it in _orig_mod). "
            "Register first, then compile: mdparam.register(model); "
            "model = torch.compile(model)"
        )
    for name, mod in model.named_modules():
        if _is_fsdp_or_sharded(mod):
            raise RuntimeError(
                f"{what}: module {name or '<root>'!r} is already sharded (FSDP2's fully_shard "
                "or tensor parallel). The supported order is register -> fully_shard -> "
                "optimizer -> Retraction (with tensor parallel: register -> "
                "mdparam.parallelize_module -> fully_shard -> ...): call mdparam.register on the "
                "model before fully_shard or parallelize_module"
            )
        if (
            getattr(mod, "_compiled_call_impl", None) is not None
        ):  # torch internal: module.compile()
            raise RuntimeError(
                f"{what}: module {name or '<root>'!r} was compiled in place "
                "(module.compile()). Register first, then compile"
            )
