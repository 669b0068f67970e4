"""The direction-and-gain parametrization: W = diag(phi(r)) . D . diag(phi(c)).

``fuse`` is the one definition of that formula. The parametrization module
given to ``torch.nn.utils.parametrize``, the retraction, the exporters and the
file-to-file converter all call it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ._gains import GainKind, gain_kind_of
from ._kinds import check_choice
from ._layouts import Layout, layout_of
from ._maps import GainMap, gain_map_of
from ._sphere import Sphere, sphere_of

__all__ = [
    "FusedWeight",
    "Geometry",
    "MDConfig",
    "MagnitudeDirection",
    "ScaleRowsCols",
    "fuse",
    "gain_magnitudes",
]

# What right_inverse tolerates as "the gains absorbed the norm" (relative).
_PRESERVE_TOL = 1e-4


@dataclass(frozen=True)
class Geometry:
    """The objects an ``MDConfig``'s names stand for, resolved once."""

    sphere: Sphere
    gains: GainKind
    gain_map: GainMap
    layout: Layout


@dataclass(frozen=True)
class MDConfig:
    """Everything needed to fuse one parametrized tensor, JSON-serialisable.

    ``radius`` is a number, or None when the radius is a tensor kept beside
    the originals (``radius="init"``).

    Examples:
        >>> import torch, mdparam
        >>> layer = torch.nn.Linear(4, 3)
        >>> _ = mdparam.register(layer)
        >>> (entry,) = mdparam.registered(layer)
        >>> entry.config.shape, entry.config.layout
        ((3, 4), 'linear')
    """

    gains: str
    sphere: str
    gain_map: str
    layout: str
    shape: tuple[int, ...]
    radius: float | None
    geometry: Geometry = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        geometry = Geometry(
            sphere_of(self.sphere),
            gain_kind_of(self.gains),
            gain_map_of(self.gain_map),
            layout_of(self.layout),
        )
        object.__setattr__(self, "geometry", geometry)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        geometry.layout.matrix_shape(self.shape)

    @property
    def roles(self) -> tuple[str, ...]:
        """Roles of the originals, in order: the direction, then the raw gains."""
        return ("direction", *self.geometry.gains.roles)

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        return self.geometry.layout.matrix_shape(self.shape)

    def gain_shape(self, role: str) -> tuple[int, ...]:
        return self.geometry.gains.shape(role, self.matrix_shape)

    def to_dict(self) -> dict:
        """The names, for a checkpoint header (``geometry`` is derived from them)."""
        d = asdict(self)
        d.pop("geometry")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> MDConfig:
        return cls(
            gains=d["gains"],
            sphere=d["sphere"],
            gain_map=d["gain_map"],
            layout=d["layout"],
            shape=tuple(d["shape"]),
            radius=None if d["radius"] is None else float(d["radius"]),
        )


def gain_magnitudes(
    raw_gains: tuple[Tensor, ...], config: MDConfig, *, traced: bool = False
) -> tuple[Tensor, ...]:
    """phi of each raw gain, shaped to broadcast against the matrix view, row factor first
    (``traced``: see ``mdparam._gains.GainKind.magnitudes``)."""
    g = config.geometry
    return g.gains.magnitudes(tuple(raw_gains), g.gain_map, traced=traced)


def fuse(
    direction: Tensor,
    raw_gains: tuple[Tensor, ...],
    config: MDConfig,
    *,
    inplace: bool = False,
    opaque: bool = False,
) -> Tensor:
    """W = diag(phi(r)) . D . diag(phi(c)) in the tensor's stored layout.

    ``direction`` has the stored shape; ``raw_gains`` are in the order of
    ``config.roles[1:]``. ``inplace=True`` writes the result into
    ``direction`` (outside autograd, to save memory). ``opaque=True`` makes
    the row-and-column scaling one opaque op under torch.compile, with eager
    kernels, instead of operations inductor fuses: faster cold compiles,
    usually slower steps (``register(fuse="opaque")``).

    Examples:
        >>> import torch
        >>> cfg = MDConfig("rowcol", "flat", "identity", "linear", (2, 3), 1.0)
        >>> D = torch.ones(2, 3)
        >>> fuse(D, (torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0, 3.0])), cfg)
        tensor([[1., 1., 3.],
                [2., 2., 6.]])
    """
    layout = config.geometry.layout
    matrix = layout.to_matrix(direction)
    mags = gain_magnitudes(raw_gains, config)
    if len(mags) == 2 and not inplace:
        if torch.compiler.is_compiling():
            if opaque:
                return layout.from_matrix(_scale_rows_cols_op(matrix, *mags), config.shape)
        elif torch.is_grad_enabled():
            return layout.from_matrix(ScaleRowsCols.apply(matrix, *mags), config.shape)
        else:  # export, evaluation: one new tensor, scaled in place
            return layout.from_matrix(_scale_rows_cols(matrix, *mags), config.shape)
    for mag in mags:
        # Elementwise products round the same in place or not: every path agrees bitwise.
        matrix = matrix.mul_(mag) if inplace else matrix * mag
    return layout.from_matrix(matrix, config.shape)


def _scale_rows_cols(d: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """(D * a) * b with one new matrix; a: (.., o, 1), b: (.., 1, i)."""
    return torch.mul(d, a).mul_(b)


def _scale_rows_cols_grads(
    grad: Tensor, d: Tensor, a: Tensor, b: Tensor, need: tuple[bool, ...] = (True, True, True)
) -> tuple[Tensor | None, ...]:
    """Gradients of (D * a) * b for D, a and b (those in ``need``), with one matrix-sized
    temporary. Not differentiable itself (``out=``): call it with grad mode off."""
    need_d, need_a, need_b = need
    if not (need_a or need_b):
        return (torch.mul(grad, a).mul_(b) if need_d else None), None, None
    p = grad * d
    ga = p @ b.mT if need_a else None  # sum_j grad_ij d_ij b_j
    gb = a.mT @ p if need_b else None  # sum_i a_i grad_ij d_ij
    gd = torch.mul(grad, a, out=p).mul_(b) if need_d else None  # reuses p's memory
    return gd, ga, gb


class ScaleRowsCols(torch.autograd.Function):
    """(D * a) * b with a backward that makes one matrix-sized temporary, not four.

    Used in eager mode only: autograd's own chain of two broadcasts allocates a
    temporary per product and reduction, and on the CPU each large allocation
    costs page faults. Under torch.compile the plain ops are traced instead and
    inductor fuses them.
    """

    generate_vmap_rule = True  # torch.func transforms (vmap, per-sample grads) work too

    @staticmethod
    def forward(d: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return _scale_rows_cols(d, a, b)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        d, a, b = ctx.saved_tensors
        need_d, need_a, need_b = ctx.needs_input_grad
        if not torch.is_grad_enabled():
            return _scale_rows_cols_grads(grad, d, a, b, ctx.needs_input_grad)
        # This backward is itself differentiated (create_graph, torch.func): plain ops, no out=.
        p = grad * d if need_a or need_b else None
        return (
            grad * a * b if need_d else None,
            p @ b.mT if need_a else None,
            a.mT @ p if need_b else None,
        )


# Under torch.compile the fuse is normally traced, and inductor fuses its products
# and reductions with their neighbours. fuse(opaque=True) runs it as an opaque op
# instead, with the eager kernels (register(fuse="opaque")): for jobs that compile
# often and train briefly (benchmarks/speed.py, "compile" and "step" sections).
@torch.library.custom_op("mdparam::scale_rows_cols", mutates_args=())
def _scale_rows_cols_op(d: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return _scale_rows_cols(d, a, b)


@_scale_rows_cols_op.register_fake
def _(d: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.empty_like(d, memory_format=torch.contiguous_format)


@torch.library.custom_op("mdparam::scale_rows_cols_backward", mutates_args=())
def _scale_rows_cols_backward_op(
    grad: Tensor, d: Tensor, a: Tensor, b: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    return _scale_rows_cols_grads(grad, d, a, b)


@_scale_rows_cols_backward_op.register_fake
def _(grad: Tensor, d: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return (
        torch.empty_like(grad, memory_format=torch.contiguous_format),
        a.new_empty(a.shape),
        b.new_empty(b.shape),
    )


def _scale_backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    d, a, b = ctx.saved_tensors
    return _scale_rows_cols_backward_op(grad.contiguous(), d, a, b)


_scale_rows_cols_op.register_autograd(_scale_backward, setup_context=ScaleRowsCols.setup_context)


class MagnitudeDirection(nn.Module):
    """Parametrization W = diag(phi(r)) . D . diag(phi(c)) for ``parametrize``.

    The originals are, in order, the direction D (stored shape) and the raw
    gains of ``config.roles[1:]``. ``right_inverse`` splits a weight into
    them so that the fused weight equals it: D is the weight projected onto
    the sphere and the gains take up the norm the projection removed.

    Use ``mdparam.register`` rather than building this by hand.

    Examples:
        >>> import torch
        >>> from torch.nn.utils import parametrize
        >>> lin = torch.nn.Linear(4, 3)
        >>> W = lin.weight.detach().clone()
        >>> cfg = MDConfig("rowcol", "flat", "softplus", "linear", (3, 4), 2.0)
        >>> _ = parametrize.register_parametrization(lin, "weight", MagnitudeDirection(cfg))
        >>> torch.allclose(lin.weight, W, atol=1e-6)
        True
        >>> round(float(lin.parametrizations.weight.original0.norm()), 5)  # on the sphere
        2.0
    """

    radius: Tensor | None

    def __init__(self, config: MDConfig, radius: Tensor | None = None) -> None:
        super().__init__()
        if (config.radius is None) != (radius is not None):
            raise ValueError("give a radius tensor exactly when config.radius is None")
        self.config = config
        self.init = "preserve"  # the init option the layer was registered with
        # register()'s radius_scale: the optimizer helpers scale this direction's LR by it.
        self.radius_scale = 1.0
        self.opaque_fuse = False  # register(fuse="opaque"): see fuse()
        self.forward_mode = "formed"  # register(forward=...): see mdparam._forward
        self._assigning = "preserve"  # how right_inverse splits a weight; see assigning()
        # The fused step (mdparam.FusedWeights): W kept as a Parameter the forward returns.
        self.fused: FusedWeight | None = None
        if radius is not None:
            self.register_buffer("radius", radius)
        else:
            self.radius = None

    @contextmanager
    def assigning(self, init: str) -> Iterator[None]:
        """Within the block, weights assigned through the parametrization split as ``init`` says.

        ``"preserve"`` (what any assignment does outside this block, e.g.
        ``load_plain``): the gains take up the norm the sphere removes, so the
        fused weight equals the one assigned. ``"sphere"`` (the paper's start):
        D is the projected weight and every phi(gain) = 1.
        """
        check_choice("init", init, ("preserve", "sphere"))
        before, self._assigning = self._assigning, init
        try:
            yield
        finally:
            self._assigning = before

    def sphere_radius(self) -> float | Tensor:
        """Radius of each unit of the sphere: a float, or a broadcastable tensor."""
        return self.config.radius if self.radius is None else self.radius

    def forward(self, direction: Tensor, *raw_gains: Tensor) -> Tensor:
        if self.fused is not None:
            return self.fused.read(direction, raw_gains)
        return fuse(direction, raw_gains, self.config, opaque=self.opaque_fuse)

    @torch.no_grad()
    def right_inverse(self, weight: Tensor) -> tuple[Tensor, ...]:
        cfg, g = self.config, self.config.geometry
        if tuple(weight.shape) != cfg.shape:
            raise ValueError(f"expected a weight of shape {cfg.shape}, got {tuple(weight.shape)}")
        work_dtype = torch.float32 if weight.device.type == "mps" else torch.float64
        matrix = g.layout.to_matrix(weight.detach()).to(work_dtype)
        radius = self.sphere_radius()
        if isinstance(radius, Tensor):
            radius = radius.to(work_dtype)
        norms = g.sphere.norm(matrix)
        if not matrix.is_meta and not bool(torch.all(torch.isfinite(norms) & (norms > 0))):
            raise ValueError(
                f"the weight has a {'matrix' if cfg.sphere == 'flat' else cfg.sphere} of norm "
                "zero (or a non-finite value), so it has no direction to keep; initialise "
                "it to non-zero values first, or leave the layer out with exclude="
            )
        scale = norms / radius
        mags, leftover = g.sphere.absorb(scale, g.gains, cfg.matrix_shape)
        if self._assigning == "sphere":
            mags = {role: torch.ones_like(m) for role, m in mags.items()}
        elif not matrix.is_meta:
            err = float((leftover - 1).abs().max())
            if err > _PRESERVE_TOL:
                raise ValueError(
                    f"gains={cfg.gains!r} cannot take up the norm that the {cfg.sphere!r} "
                    f"sphere removes from this weight (off by {err:.2e} relative), so the "
                    f"fused weight would not equal it. {absorb_hint(g.sphere)}"
                )
        originals = [g.layout.from_matrix(matrix / scale, cfg.shape).to(weight.dtype)]
        for role in cfg.roles[1:]:
            originals.append(g.gain_map.inverse(mags[role]).to(weight.dtype))
        return tuple(t.to(weight.device).contiguous() for t in originals)

    def extra_repr(self) -> str:
        cfg = self.config
        radius = "from init" if cfg.radius is None else f"{cfg.radius:.4g}"
        return (
            f"gains={cfg.gains}, sphere={cfg.sphere}, radius={radius}, "
            f"gain_map={cfg.gain_map}, layout={cfg.layout}"
        )


class FusedWeight:
    """W = fuse(D, gains) kept as a Parameter, for a forward that reads W instead of forming it.

    The fused step (``mdparam.FusedMDOptimizer``) writes W after every
    update of D and the gains, so the model's forward and backward are the
    plain model's. ``versions`` are the version counters of D, the gains and
    W when W was last written: an in-place write since then (a user's
    ``D.mul_(2)`` under ``torch.no_grad()``, a ``load_state_dict``) changes
    them. An eager forward then recomputes W (``read``); a compiled one
    cannot look, so the optimizer checks before its step.
    """

    def __init__(self, weight: nn.Parameter, config: MDConfig) -> None:
        self.weight = weight
        self.config = config
        self.versions: tuple[int, ...] = ()

    def read(self, direction: Tensor, raw_gains: tuple[Tensor, ...]) -> Tensor:
        if not torch.compiler.is_compiling() and self.stale(direction, raw_gains):
            self.refresh(direction, raw_gains)
        return self.weight

    def stale(self, direction: Tensor, raw_gains: tuple[Tensor, ...]) -> bool:
        return self.versions != _versions(direction, raw_gains, self.weight)

    @torch.no_grad()
    def refresh(self, direction: Tensor, raw_gains: tuple[Tensor, ...]) -> None:
        """W <- fuse(D, gains), and remember the versions that W now reflects."""
        self.weight.copy_(fuse(direction, raw_gains, self.config))
        self.record(direction, raw_gains)

    def record(self, direction: Tensor, raw_gains: tuple[Tensor, ...]) -> None:
        self.versions = _versions(direction, raw_gains, self.weight)


def _versions(direction: Tensor, raw_gains: tuple[Tensor, ...], weight: Tensor) -> tuple[int, ...]:
    return (direction._version, *(g._version for g in raw_gains), weight._version)


def absorb_hint(sphere: Sphere) -> str:
    """What to do when the gains cannot take up what ``sphere`` removes (for error messages)."""
    return (
        f"Use gains that cover the {sphere.name!r} sphere's units "
        f"({', '.join(map(repr, sphere.absorbing_gains()))}), radius='init' (D keeps the "
        "weight's own norm), or init='sphere' (the paper's start: the projected weight, "
        "gains 1)"
    )
