"""The post-step retraction: put every direction back on its sphere."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .register import registered
from .sphere import sphere_norm
from .views import to_matrix

__all__ = ["Retraction", "RetractionError", "retract_"]


class RetractionError(FloatingPointError):
    """A direction had a zero or non-finite norm, so it could not be rescaled."""


def retract_(
    directions: Sequence[Tensor],
    spheres: Sequence[str],
    layouts: Sequence[str],
    radii: Sequence[float | Tensor],
) -> Tensor:
    """Rescale each direction in place to its sphere's radius.

    A direction whose norm is zero or not finite is left untouched (rescaling
    would turn it into NaN). Returns a bool tensor, True where that happened.
    Each tensor is normed and rescaled in turn, so it is re-read while still in
    cache.
    """
    bad = []
    for d, sphere, layout, radius in zip(directions, spheres, layouts, radii):
        m = to_matrix(d, layout)
        norms = sphere_norm(m, sphere)
        ok = torch.isfinite(norms) & (norms > 0)
        m.mul_(torch.where(ok, radius / norms, torch.ones_like(norms)))
        bad.append(~ok.all())
    return torch.stack(bad)


class Retraction:
    """Callable that puts every direction of a registered model back on its sphere.

    The work is one pass over the direction tensors, compiled once with
    ``torch.compile(fullgraph=True, dynamic=False)`` on first call (pass
    ``compile=False`` to run eagerly). bf16/fp16 directions are normed in fp32.

    Build it after :func:`mdparam.register` and call it after every optimizer
    step, or let :meth:`attach` do that.

    A direction with zero or non-finite norm (a diverged step) is left as it
    is, and with ``check=True`` (default) a :class:`RetractionError` names the
    layers. Checking reads one flag back from the device each call; on a GPU
    ``check=False`` avoids that sync.

    Example:
        >>> import torch, mdparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = mdparam.register(model)
        >>> opt = torch.optim.AdamW(mdparam.param_groups(model, lr=0.1))
        >>> retract = mdparam.Retraction(model, compile=False)
        >>> _ = retract.attach(opt)
        >>> model(torch.randn(4, 8)).sum().backward(); opt.step()
        >>> D = model[0].parametrizations.weight.original0
        >>> round(float(D.norm()), 4)  # sqrt(max(8, 8))
        2.8284
    """

    def __init__(self, model: nn.Module, *, compile: bool = True, check: bool = True) -> None:
        entries = registered(model)
        if not entries:
            raise ValueError(
                "mdparam.Retraction: the model has no MD-parametrized tensor; call "
                "mdparam.register(model) first"
            )
        seen: set[int] = set()
        self.names: list[str] = []
        self.directions: list[nn.Parameter] = []
        self._spheres: list[str] = []
        self._layouts: list[str] = []
        self._radii: list[float | Tensor] = []
        for e in entries:
            if id(e.direction) in seen:  # tied="share": one direction, several holders
                continue
            seen.add(id(e.direction))
            self.names.append(e.name)
            self.directions.append(e.direction)
            self._spheres.append(e.config.sphere)
            self._layouts.append(e.config.layout)
            self._radii.append(e.parametrization.sphere_radius())
        self.check = check
        self._fn: Callable[..., Tensor] = retract_
        if compile:
            self._fn = torch.compile(retract_, fullgraph=True, dynamic=False)

    @torch.no_grad()
    def __call__(self) -> None:
        bad = self._fn(self.directions, self._spheres, self._layouts, self._radii)
        if self.check and bool(bad.any()):
            names = [n for n, b in zip(self.names, bad.tolist()) if b]
            raise RetractionError(
                f"mdparam.Retraction: the direction of {', '.join(map(repr, names))} has a zero "
                "or non-finite norm, so it was left as it is instead of being rescaled to NaN. "
                "The step before diverged: lower the learning rate, clip gradients, or check "
                "the data for inf/NaN"
            )

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Run the retraction after every ``optimizer.step()``.

        ``optimizer`` must hold the directions (with Muon's recipe, attach to
        the Muon optimizer). Returns a handle whose ``remove()`` detaches it.
        """
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not any(id(d) in held for d in self.directions):
            raise ValueError(
                "mdparam.Retraction.attach: this optimizer holds none of the model's directions. "
                "Build it from mdparam.param_groups(model, ...) after mdparam.register(model), "
                "and attach to the optimizer that steps the directions"
            )

        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self()

        return optimizer.register_step_post_hook(hook)
