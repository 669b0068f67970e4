"""The options of ``mdparam.register``, one frozen object per layer.

A field left at None means "not set here": per layer, the call's own values
win, then ``overrides=`` (later entries first), then the layer kind's
defaults (``mdparam._adapters``), then ``DEFAULTS``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

import torch

from ._forward import FORWARDS
from ._gains import gain_kind_of
from ._kinds import check_choice
from ._maps import gain_map_of
from ._sphere import RADIUS_POLICIES, resolve_radius, sphere_of

__all__ = ["DEFAULTS", "FUSES", "INITS", "OPTION_NAMES", "Options"]

INITS = ("preserve", "sphere")
FUSES = ("traced", "opaque")


@dataclass(frozen=True, kw_only=True)  # by keyword: a reorder cannot swap two options
class Options:
    """How one layer is parametrized.

    - ``gains``: ``"rowcol"``, ``"row"``, ``"col"``, ``"scalar"`` or ``"none"``.
    - ``sphere``: ``"flat"`` (||D||_F = R), ``"row"`` or ``"col"`` (each row or
      column on its own sphere).
    - ``radius``: ``"shape"``, ``"init"`` or a positive number (see
      ``mdparam._sphere``).
    - ``radius_scale``: a factor on that radius; the optimizer helpers scale
      the direction's learning rate by it too.
    - ``gain_map``: phi, ``"softplus"``, ``"identity"`` or ``"exp"``.
    - ``init``: ``"preserve"`` (same function after registration) or
      ``"sphere"`` (the paper's start: the projected weight, every phi = 1).
    - ``fuse``: ``"traced"`` (torch.compile traces the fuse and inductor fuses
      it with its neighbours) or ``"opaque"`` (one opaque op with eager
      kernels: faster cold compiles, slower steps).
    - ``forward`` (nn.Linear): ``"formed"`` (W formed, then torch's linear),
      ``"factored"`` (y = phi(r) * ((x * phi(c)) @ D^T), W never formed) or
      ``"auto"`` (the cheaper of the two for the tokens of each call; see
      ``mdparam._forward``).
    """

    gains: str | None = None
    sphere: str | None = None
    radius: str | float | None = None
    radius_scale: float | None = None
    gain_map: str | None = None
    init: str | None = None
    fuse: str | None = None
    forward: str | None = None

    def set_values(self) -> dict[str, object]:
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }

    def fill(self, other: Options | Mapping[str, object]) -> Options:
        """These options, with the fields left at None taken from ``other``."""
        values = other.set_values() if isinstance(other, Options) else dict(other)
        missing = {k: v for k, v in values.items() if getattr(self, k) is None}
        return replace(self, **missing)

    def check_values(self) -> None:
        """Each set option on its own: a known choice, or a valid number."""
        if self.gains is not None:
            gain_kind_of(self.gains)
        if self.sphere is not None:
            sphere_of(self.sphere)
        if self.gain_map is not None:
            gain_map_of(self.gain_map)
        for name, value, choices in (
            ("init", self.init, INITS),
            ("fuse", self.fuse, FUSES),
            ("forward", self.forward, FORWARDS),
        ):
            if value is not None:
                check_choice(name, value, choices)
        if isinstance(self.radius, str):
            check_choice("radius", self.radius, RADIUS_POLICIES, extra=" or a positive number")
        if self.radius is not None and not isinstance(self.radius, str):
            resolve_radius(self.radius, torch.empty(1, 1, device="meta"), sphere_of("flat"))
        s = self.radius_scale
        if s is not None and (
            isinstance(s, bool)
            or not isinstance(s, int | float)
            or not (math.isfinite(s) and s > 0)
        ):
            raise ValueError(f"radius_scale must be a positive finite number, got {s!r}")


OPTION_NAMES = tuple(f.name for f in fields(Options))

DEFAULTS = Options(
    gains="rowcol",
    sphere="flat",
    radius="shape",
    radius_scale=1.0,
    gain_map="softplus",
    init="preserve",
    fuse="traced",
    forward="formed",
)
