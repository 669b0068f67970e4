"""Gain layouts: which magnitudes a parametrized matrix learns.

- ``rowcol``: one gain per row and one per column (the paper's best);
- ``row`` / ``col``: per row / per column only;
- ``scalar``: one gain per matrix;
- ``none``: no gains, a pure sphere (as Hyperball / HyperP).

Each is a ``GainKind``: its raw gain tensors (roles, in storage order),
their shapes, and their magnitudes shaped to broadcast against the matrix.
"""

from __future__ import annotations

from torch import Tensor

from ._kinds import Kinds
from ._maps import GainMap

__all__ = ["GAINS", "GainKind", "gain_kind_of"]

# Where each role's magnitude goes: (.., d_out, 1) for rows, (.., 1, d_in) for columns.
_AXIS = {"row_gain": -1, "col_gain": -2, "scalar_gain": -1}


class GainKind:
    """The raw gains of one layout: ``roles`` names them in storage order."""

    def __init__(self, name: str, roles: tuple[str, ...]) -> None:
        self.name = name
        self.roles = roles

    def shape(self, role: str, mshape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the raw gain ``role`` of a matrix of shape (*batch, d_out, d_in)."""
        *batch, d_out, d_in = mshape
        return (*batch, {"row_gain": d_out, "col_gain": d_in, "scalar_gain": 1}[role])

    def magnitudes(
        self, raw_gains: tuple[Tensor, ...], gain_map: GainMap, *, traced: bool = False
    ) -> tuple[Tensor, ...]:
        """phi of each raw gain, shaped to broadcast against the matrix, row factor first.

        ``traced=True`` gives inductor phi's own ops even where the map is
        otherwise one opaque op under torch.compile (the fused step, where
        they join its kernels instead of costing a dispatch each).
        """
        phi = gain_map.phi if traced else gain_map
        return tuple(phi(raw).unsqueeze(_AXIS[role]) for role, raw in zip(self.roles, raw_gains))

    def __repr__(self) -> str:
        return f"GainKind({self.name!r})"


gain_kind_of: Kinds[GainKind] = Kinds("gains", GainKind)
for _name, _roles in (
    ("rowcol", ("row_gain", "col_gain")),
    ("row", ("row_gain",)),
    ("col", ("col_gain",)),
    ("scalar", ("scalar_gain",)),
    ("none", ()),
):
    gain_kind_of.add(GainKind(_name, _roles))
GAINS = gain_kind_of.names
