"""Which layer types mdparam parametrizes, and which of their tensors, in which layout.

An adapter maps a module type to the tensors it decouples and the layout of
each (see :mod:`mdparam.views`). By default only nn.Linear (and subclasses)
has one.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["Adapter", "adapter_for", "default_adapters"]


@dataclass(frozen=True)
class Adapter:
    """The tensors of one layer type: ``((tensor_name, layout), ...)``."""

    tensors: tuple[tuple[str, str], ...]


def default_adapters() -> dict[type, Adapter]:
    return {nn.Linear: Adapter((("weight", "linear"),))}


def adapter_for(module: nn.Module, adapters: dict[type, Adapter] | None = None) -> Adapter | None:
    """The adapter of the most specific registered type in ``module``'s MRO."""
    table = default_adapters() if adapters is None else adapters
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls]
    return None
