"""Which layer kinds mdparam can decouple: the tensor(s) of each, their layout, their defaults.

An adapter maps a module type to the tensors it decouples and the layout of
each (see ``mdparam._layouts``), plus options that suit that kind of layer.
Built in:

==============================  ===============================  ==========================
layer                           tensors (layout)                 defaults
==============================  ===============================  ==========================
nn.Linear                       weight (linear)                  (the global options)
nn.Embedding                    weight (linear: rows = tokens)   sphere="row", gains="row"
nn.Conv1d / Conv2d / Conv3d     weight (flatten_in)              (the global options)
transformers' Conv1D (GPT-2)    weight (transposed)              (the global options)
fused MoE experts               gate_up_proj, down_proj          (the global options)
                                (batched: one matrix per expert)
==============================  ===============================  ==========================

"Fused MoE experts" are modules whose class name ends in ``Experts`` and
that hold 3-D parameters ``gate_up_proj`` and ``down_proj`` of shape
(experts, out, in), as transformers' Mixtral and Qwen-MoE layers do.

``mdparam.register`` decouples only nn.Linear unless asked
(``layers=[...]``). Add your own layer kind with ``register_adapter``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from torch import nn

from ._layouts import layout_of
from ._options import OPTION_NAMES, Options

__all__ = ["Adapter", "adapter_for", "register_adapter"]


@dataclass(frozen=True)
class Adapter:
    """The tensors of one layer kind, ``((tensor_name, layout), ...)``, and its default options.

    ``mdparam.register_adapter`` makes one and returns it.

    Examples:
        >>> import torch, mdparam
        >>> class Gate(torch.nn.Module):  # keeps its matrix as "kernel"
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.kernel = torch.nn.Parameter(torch.randn(4, 4))
        >>> adapter = mdparam.register_adapter(Gate, {"kernel": "linear"})
        >>> adapter.tensors
        (('kernel', 'linear'),)
    """

    tensors: tuple[tuple[str, str], ...]
    defaults: Options = field(default_factory=Options)


_BY_TYPE: dict[type, Adapter] = {}
_BY_NAME: dict[str, Adapter] = {}  # "module.QualName" of classes this package does not import
_RULES: list[tuple[Callable[[nn.Module], bool], Adapter]] = []


def _make(
    tensors: Mapping[str, str] | Iterable[tuple[str, str]], defaults: Mapping[str, object]
) -> Adapter:
    pairs = tuple(tensors.items()) if isinstance(tensors, Mapping) else tuple(tensors)
    if not pairs:
        raise ValueError(
            "an adapter needs at least one (tensor name, layout) pair, e.g. {'weight': 'linear'}"
        )
    for name, layout in pairs:
        if not isinstance(name, str) or layout not in layout_of:
            raise ValueError(
                f"adapter tensor {name!r}: layout must be one of {layout_of.names}, got {layout!r}"
            )
    unknown = [k for k in defaults if k not in OPTION_NAMES]
    if unknown:
        raise ValueError(f"unknown adapter defaults {unknown}; choose from {OPTION_NAMES}")
    options = Options(**defaults)
    options.check_values()
    return Adapter(pairs, options)


def register_adapter(
    layer_type: type | str,
    tensors: Mapping[str, str] | Iterable[tuple[str, str]],
    **defaults: object,
) -> Adapter:
    """Teach mdparam a layer kind: which tensors to decouple and in which layout.

    Args:
        layer_type: the module class (its subclasses match too), or its
            qualified name ``"package.module.ClassName"`` to avoid importing it.
        tensors: ``{tensor_name: layout}``; layouts are ``"linear"`` (out, in),
            ``"transposed"`` (in, out), ``"flatten_in"`` (out, in, *kernel),
            ``"batched"`` (*batch, out, in).
        **defaults: options of ``mdparam.register`` (``gains``, ``sphere``,
            ``radius``, ...) for this kind, used unless the call to
            ``mdparam.register`` sets them.

    Examples:
        >>> import torch, mdparam
        >>> class Scaled(torch.nn.Module):  # a custom layer keeping its matrix as "kernel"
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.kernel = torch.nn.Parameter(torch.randn(3, 5))
        ...     def forward(self, x):
        ...         return x @ self.kernel.T
        >>> _ = mdparam.register_adapter(Scaled, {"kernel": "linear"})
        >>> mdparam.register(torch.nn.Sequential(Scaled()), layers=[Scaled])
        ['0.kernel']
    """
    adapter = _make(tensors, defaults)
    if isinstance(layer_type, str):
        _BY_NAME[layer_type] = adapter
    elif isinstance(layer_type, type) and issubclass(layer_type, nn.Module):
        _BY_TYPE[layer_type] = adapter
    else:
        raise TypeError(
            f"layer_type must be an nn.Module subclass or its qualified name, got {layer_type!r}"
        )
    return adapter


def _is_fused_experts(module: nn.Module) -> bool:
    if not type(module).__name__.endswith("Experts"):
        return False
    params = dict(module.named_parameters(recurse=False))
    return all(n in params and params[n].ndim == 3 for n in ("gate_up_proj", "down_proj"))


def adapter_for(module: nn.Module) -> Adapter | None:
    """The adapter of the most specific known type in ``module``'s class hierarchy."""
    for cls in type(module).__mro__:
        if cls in _BY_TYPE:
            return _BY_TYPE[cls]
        qual = f"{cls.__module__}.{cls.__qualname__}"
        if qual in _BY_NAME:
            return _BY_NAME[qual]
    for predicate, adapter in _RULES:
        if predicate(module):
            return adapter
    return None


register_adapter(nn.Linear, {"weight": "linear"})
register_adapter(nn.Embedding, {"weight": "linear"}, sphere="row", gains="row")
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_adapter(_conv, {"weight": "flatten_in"})
register_adapter("transformers.pytorch_utils.Conv1D", {"weight": "transposed"})
_RULES.append((_is_fused_experts, _make({"gate_up_proj": "batched", "down_proj": "batched"}, {})))
