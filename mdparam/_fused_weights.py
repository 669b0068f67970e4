"""Fused-weight mode: each parametrized tensor's w kept as a Parameter that the forward reads.

In this mode (what ``mdparam.recipe`` sets up for its fused step), the
model's forward and backward are the plain model's: w is read, not formed
from d and the gains, and autograd produces dL/dW. d and the gains stay the
parametrization's tensors (checkpoints, export, ``stats`` see them as
always) but take no gradient; ``mdparam.FusedMDOptimizer`` steps them
from dL/dW and writes w back.

w is not part of the model's ``state_dict`` (it follows from d and the
gains), and is recomputed after ``load_state_dict``. A tensor without gains
(an embedding on a row sphere) needs no w: its forward reads d itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._parametrization import FusedWeight, MagnitudeDirection, fuse
from ._tree import Registered, originals, registered, unique_directions, unwrap

__all__ = ["FusedEntry", "FusedWeights", "StaleWeightError", "refresh_kept"]

_ATTR = "fused_weight"  # the Parameter's name on the parametrization module


class StaleWeightError(RuntimeError):
    """A direction or gain changed outside the fused step, so the w the forward read is stale."""


@dataclass
class FusedEntry:
    """One direction (once, however many modules share it) and its kept w (None: no gains)."""

    name: str
    direction: nn.Parameter
    gains: tuple[nn.Parameter, ...]
    parametrization: MagnitudeDirection
    weight: FusedWeight | None

    @property
    def grad(self) -> Tensor | None:
        """dL/dW (dL/dD when the forward reads d)."""
        return self.direction.grad if self.weight is None else self.weight.weight.grad


class FusedWeights:
    """Put a registered model in fused-weight mode; ``leave`` puts it back.

    Examples:
        >>> import torch, mdparam
        >>> from mdparam._fused_weights import FusedWeights
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
        >>> _ = mdparam.register(model)
        >>> fused = FusedWeights(model)
        >>> w = fused.entries[0].weight.weight
        >>> model[0].weight is w  # the forward reads the kept w
        True
        >>> model(torch.randn(2, 4)).sum().backward()
        >>> w.grad.shape, model[0].parametrizations.weight.original0.grad
        (torch.Size([3, 4]), None)
        >>> fused.leave()
    """

    def __init__(self, model: nn.Module) -> None:
        found = registered(model)
        if not found:
            raise ValueError(
                "mdparam (the recipe's fused step): the model has no MD-parametrized tensor; call "
                "mdparam.register(model) first"
            )
        if any(e.parametrization.fused is not None for e in found):
            raise ValueError(
                "mdparam (the recipe's fused step): the model is in fused-weight mode already (a recipe "
                "built with fused=True); call .leave() on the first before making another"
            )
        self.entries: list[FusedEntry] = []
        # every parameter's name, by id: the fused step groups its work by block
        self.names = {id(p): n for n, p in model.named_parameters()}
        self._handles: list = []
        self._modules: list[MagnitudeDirection] = []  # every holder's parametrization
        for lead in unique_directions(found):
            holders = [e for e in found if e.direction is lead.direction]
            self.entries.append(self._enter(lead, holders))
        self.names.update({id(e.direction): e.name for e in self.entries})

    def _enter(self, lead: Registered, holders: list[Registered]) -> FusedEntry:
        d, gains = lead.direction, lead.gains
        if not gains:  # w = d: the forward reads d, which keeps its gradient
            return FusedEntry(lead.name, d, gains, lead.parametrization, None)
        with torch.no_grad():
            value = fuse(d.detach(), tuple(g.detach() for g in gains), lead.config)
        w = nn.Parameter(value.clone(memory_format=torch.contiguous_format))
        kept = FusedWeight(w, lead.config)
        for e in holders:
            e.parametrization.register_parameter(_ATTR, w)
            e.parametrization.fused = kept
            self._modules.append(e.parametrization)
            plist = e.module.parametrizations[e.tensor_name]
            self._handles.append(e.parametrization.register_state_dict_post_hook(_drop_weight))
            self._handles.append(plist.register_load_state_dict_post_hook(_after_load))
        for t in (d, *gains):
            t.requires_grad_(False)
            t.grad = None
        kept.record(d, gains)
        return FusedEntry(lead.name, d, gains, lead.parametrization, kept)

    def weights(self) -> list[nn.Parameter]:
        """The kept w Parameters (what the forward reads, and DDP reduces)."""
        return [e.weight.weight for e in self.entries if e.weight is not None]

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute every w from its d and gains (after writing into them by hand)."""
        for e in self.entries:
            if e.weight is not None:
                e.weight.refresh(e.direction, e.gains)

    @torch.no_grad()
    def check(self) -> None:
        """Make sure every w the forward read equals fuse(d, gains); raise if one did not.

        Only tensors whose version counters moved since w was written are
        looked at. One that moved but whose w still matches (a DDP broadcast of
        the same values, rounding) is refreshed silently.
        """
        for e in self.entries:
            kept = e.weight
            if kept is None or not kept.stale(e.direction, e.gains):
                continue
            expected = fuse(e.direction, e.gains, kept.config)
            if not torch.allclose(kept.weight, expected, rtol=1e-5, atol=1e-6):
                kept.refresh(e.direction, e.gains)
                raise StaleWeightError(
                    f"mdparam: the direction or gains of {e.name!r} were written outside the "
                    "fused step since it last ran, so the forward read a stale weight and this "
                    "step's gradient is not theirs; the step was not taken (w is now fixed). "
                    "After writing into directions or gains by hand (under torch.no_grad()), "
                    "call recipe.refresh() before the next forward"
                )
            kept.record(e.direction, e.gains)

    def leave(self) -> None:
        """Back to forming w in the forward: d and the gains take gradients again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for e in self.entries:
            for t in (e.direction, *e.gains):
                t.requires_grad_(True)
        for module in self._modules:
            module.fused = None
            delattr(module, _ATTR)
        self._modules.clear()
        self.entries.clear()


@torch.no_grad()
def refresh_kept(model: nn.Module) -> None:
    """Recompute each kept w whose d or gains changed since it was written.

    Nothing to do outside fused-weight mode. The loaders and ``reinitialize``
    call it, so that a compiled forward, which cannot look, reads no stale w.
    """
    for e in registered(unwrap(model)):
        kept = e.parametrization.fused
        if kept is not None and kept.stale(e.direction, e.gains):
            kept.refresh(e.direction, e.gains)


def _drop_weight(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    state_dict.pop(prefix + _ATTR, None)


def _after_load(plist: nn.Module, incompatible) -> None:
    """w follows the loaded d and gains; its own key was never saved, so it is not missing."""
    md = plist[0]
    incompatible.missing_keys[:] = [
        k for k in incompatible.missing_keys if not k.endswith(f".0.{_ATTR}")
    ]
    kept = originals(plist)
    md.fused.refresh(kept[0], kept[1:])
