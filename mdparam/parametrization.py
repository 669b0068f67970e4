"""The direction-and-gain parametrization: W = diag(phi(r)) . D . diag(phi(c)).

:func:`fuse` is the one definition of that formula. The parametrization module
given to ``torch.nn.utils.parametrize``, the retraction, the exporters and the
file-to-file converter all call it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .maps import GAIN_MAPS, apply_gain_map, invert_gain_map
from .sphere import SPHERES, sphere_norm
from .views import LAYOUTS, from_matrix, matrix_shape, to_matrix

__all__ = [
    "GAINS",
    "MDConfig",
    "MagnitudeDirection",
    "fuse",
    "gain_magnitudes",
    "gain_roles",
]

GAINS = ("rowcol", "row", "col", "scalar", "none")

# What right_inverse tolerates as "the gains absorbed the norm" (relative).
_PRESERVE_TOL = 1e-4


def gain_roles(gains: str) -> tuple[str, ...]:
    """Names of the raw gain tensors a ``gains`` layout has, in storage order."""
    roles = {
        "rowcol": ("row_gain", "col_gain"),
        "row": ("row_gain",),
        "col": ("col_gain",),
        "scalar": ("scalar_gain",),
        "none": (),
    }
    if gains not in roles:
        raise ValueError(f"unknown gains {gains!r}; choose one of {GAINS}")
    return roles[gains]


def _gain_shape(role: str, mshape: tuple[int, ...]) -> tuple[int, ...]:
    *batch, d_out, d_in = mshape
    size = {"row_gain": d_out, "col_gain": d_in, "scalar_gain": 1}[role]
    return (*batch, size)


@dataclass(frozen=True)
class MDConfig:
    """Everything needed to fuse one parametrized tensor, JSON-serialisable.

    ``radius`` is a number, or None when the radius is a tensor kept beside
    the originals (``radius="init"``).
    """

    gains: str
    sphere: str
    gain_map: str
    layout: str
    shape: tuple[int, ...]
    radius: float | None

    def __post_init__(self) -> None:
        gain_roles(self.gains)
        if self.sphere not in SPHERES:
            raise ValueError(f"unknown sphere {self.sphere!r}; choose one of {SPHERES}")
        if self.gain_map not in GAIN_MAPS:
            raise ValueError(f"unknown gain_map {self.gain_map!r}; choose one of {GAIN_MAPS}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; choose one of {LAYOUTS}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        matrix_shape(self.shape, self.layout)

    @property
    def roles(self) -> tuple[str, ...]:
        """Roles of the originals, in order: the direction, then the raw gains."""
        return ("direction", *gain_roles(self.gains))

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        return matrix_shape(self.shape, self.layout)

    def gain_shape(self, role: str) -> tuple[int, ...]:
        return _gain_shape(role, self.matrix_shape)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

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


def gain_magnitudes(raw_gains: tuple[Tensor, ...], config: MDConfig) -> tuple[Tensor, ...]:
    """phi of each raw gain, shaped to broadcast against the matrix view, row factor first."""
    return _magnitudes(tuple(raw_gains), config.gains, config.gain_map)


def _magnitudes(raw_gains: tuple[Tensor, ...], gains: str, gain_map: str) -> tuple[Tensor, ...]:
    """Gain magnitudes shaped to broadcast against the matrix, row factor first."""
    if gains == "none":
        return ()
    if gains == "rowcol":
        row, col = raw_gains
        return apply_gain_map(row, gain_map).unsqueeze(-1), apply_gain_map(col, gain_map).unsqueeze(
            -2
        )
    (raw,) = raw_gains
    mag = apply_gain_map(raw, gain_map)
    # col: (.., 1, d_in); row: (.., d_out, 1); scalar: (.., 1, 1)
    return (mag.unsqueeze(-2),) if gains == "col" else (mag.unsqueeze(-1),)


def fuse(
    direction: Tensor, raw_gains: tuple[Tensor, ...], config: MDConfig, *, inplace: bool = False
) -> Tensor:
    """W = diag(phi(r)) . D . diag(phi(c)) in the tensor's stored layout.

    ``direction`` has the stored shape; ``raw_gains`` are in the order of
    ``config.roles[1:]``. ``inplace=True`` writes the result into
    ``direction`` (outside autograd, to save memory).

    Example:
        >>> import torch
        >>> cfg = MDConfig("rowcol", "flat", "identity", "linear", (2, 3), 1.0)
        >>> D = torch.ones(2, 3)
        >>> fuse(D, (torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0, 3.0])), cfg)
        tensor([[1., 1., 3.],
                [2., 2., 6.]])
    """
    matrix = to_matrix(direction, config.layout)
    mags = _magnitudes(tuple(raw_gains), config.gains, config.gain_map)
    if len(mags) == 2 and not inplace:
        if torch.compiler.is_compiling():
            if _OPAQUE_FUSE:
                return from_matrix(_scale_rows_cols_op(matrix, *mags), config.layout, config.shape)
        elif torch.is_grad_enabled():
            return from_matrix(_ScaleRowsCols.apply(matrix, *mags), config.layout, config.shape)
        else:  # export, evaluation: one new tensor, scaled in place
            return from_matrix(_scale_rows_cols(matrix, *mags), config.layout, config.shape)
    for mag in mags:
        # Elementwise products round the same in place or not: every path agrees bitwise.
        matrix = matrix.mul_(mag) if inplace else matrix * mag
    return from_matrix(matrix, config.layout, config.shape)


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


class _ScaleRowsCols(torch.autograd.Function):
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
# and reductions with their neighbours. MDPARAM_OPAQUE_FUSE=1 (read at import) runs
# it as an opaque op instead, with the eager kernels: measured on the benchmark GPT,
# cold compiles get faster and steps slower (benchmarks/speed.py, "compile" and
# "step" sections). For jobs that compile often and train briefly.
_OPAQUE_FUSE = os.environ.get("MDPARAM_OPAQUE_FUSE", "0") == "1"


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


_scale_rows_cols_op.register_autograd(_scale_backward, setup_context=_ScaleRowsCols.setup_context)


def _absorb(
    scale: Tensor, gains: str, sphere: str, mshape: tuple[int, ...]
) -> tuple[dict[str, Tensor], Tensor]:
    """Split the per-unit ``scale`` removed by the sphere into gain magnitudes.

    Returns the magnitudes per gain role and what the gains could not take
    (ones when everything was absorbed).
    """
    *batch, d_out, d_in = mshape
    ones = torch.ones((), dtype=scale.dtype, device=scale.device)
    roles = gain_roles(gains)
    mags: dict[str, Tensor] = {r: ones.expand(_gain_shape(r, mshape)) for r in roles}
    if sphere == "flat":  # scale: (*batch, 1, 1)
        s = scale.squeeze(-1)  # (*batch, 1)
        if gains == "rowcol":
            mags["row_gain"] = s.sqrt().expand(*batch, d_out)
            mags["col_gain"] = s.sqrt().expand(*batch, d_in)
        elif gains in ("row", "col", "scalar"):
            mags[roles[0]] = s.expand(_gain_shape(roles[0], mshape))
        else:
            return mags, scale
    elif sphere == "row" and gains in ("rowcol", "row"):  # scale: (*batch, d_out, 1)
        mags["row_gain"] = scale.squeeze(-1)
    elif sphere == "col" and gains in ("rowcol", "col"):  # scale: (*batch, 1, d_in)
        mags["col_gain"] = scale.squeeze(-2)
    else:
        return mags, scale
    return mags, ones.expand_as(scale)


def can_absorb(gains: str, sphere: str) -> bool:
    """Whether ``gains`` can take up any norm the ``sphere`` removes."""
    if gains == "none":
        return False
    if sphere == "flat":
        return True
    if sphere == "row":
        return gains in ("rowcol", "row")
    return gains in ("rowcol", "col")


class MagnitudeDirection(nn.Module):
    """Parametrization W = diag(phi(r)) . D . diag(phi(c)) for ``parametrize``.

    The originals are, in order, the direction D (stored shape) and the raw
    gains of ``config.roles[1:]``. :meth:`right_inverse` splits a weight into
    them so that the fused weight equals it: D is the weight projected onto
    the sphere and the gains take up the norm the projection removed.

    Use :func:`mdparam.register` rather than building this by hand.

    Example:
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
        # register() sets this while it registers with init="sphere" (and
        # reinitialize() for such layers): right_inverse then returns the projected
        # weight and neutral gains instead of absorbing the norm.
        self.start_on_sphere = False
        self.init = "preserve"  # the init option the layer was registered with
        # register()'s radius_scale: the optimizer helpers scale this direction's LR by it.
        self.radius_scale = 1.0
        if radius is not None:
            self.register_buffer("radius", radius)
        else:
            self.radius = None

    def sphere_radius(self) -> float | Tensor:
        """Radius of each unit of the sphere: a float, or a broadcastable tensor."""
        return self.config.radius if self.radius is None else self.radius

    def forward(self, direction: Tensor, *raw_gains: Tensor) -> Tensor:
        return fuse(direction, raw_gains, self.config)

    @torch.no_grad()
    def right_inverse(self, weight: Tensor) -> tuple[Tensor, ...]:
        cfg = self.config
        if tuple(weight.shape) != cfg.shape:
            raise ValueError(f"expected a weight of shape {cfg.shape}, got {tuple(weight.shape)}")
        work_dtype = torch.float32 if weight.device.type == "mps" else torch.float64
        matrix = to_matrix(weight.detach(), cfg.layout).to(work_dtype)
        radius = self.sphere_radius()
        if isinstance(radius, Tensor):
            radius = radius.to(work_dtype)
        norms = sphere_norm(matrix, cfg.sphere)
        if not matrix.is_meta and not bool(torch.all(torch.isfinite(norms) & (norms > 0))):
            raise ValueError(
                f"the weight has a {'matrix' if cfg.sphere == 'flat' else cfg.sphere} of norm "
                "zero (or a non-finite value), so it has no direction to keep; initialise "
                "it to non-zero values first, or leave the layer out with exclude="
            )
        scale = norms / radius
        direction = matrix / scale
        mags, leftover = _absorb(scale, cfg.gains, cfg.sphere, cfg.matrix_shape)
        if self.start_on_sphere:
            mags = {role: torch.ones_like(m) for role, m in mags.items()}
        elif not matrix.is_meta:
            err = float((leftover - 1).abs().max())
            if err > _PRESERVE_TOL:
                raise ValueError(
                    f"gains={cfg.gains!r} cannot take up the norm that the {cfg.sphere!r} "
                    f"sphere removes from this weight (off by {err:.2e} relative), so the "
                    "fused weight would not equal it. Register with gains that cover the "
                    "sphere's units (flat: any but 'none'; row: 'rowcol' or 'row'; col: "
                    "'rowcol' or 'col'); at registration, radius='init' (D keeps the "
                    "weight's own norm) or init='sphere' (start from the projected weight) "
                    "also avoid this"
                )
        dtype, device = weight.dtype, weight.device
        originals = [from_matrix(direction, cfg.layout, cfg.shape).to(dtype)]
        for role in cfg.roles[1:]:
            originals.append(invert_gain_map(mags[role], cfg.gain_map).to(dtype).contiguous())
        return tuple(t.to(device).contiguous() for t in originals)

    def extra_repr(self) -> str:
        cfg = self.config
        radius = "from init" if cfg.radius is None else f"{cfg.radius:.4g}"
        return (
            f"gains={cfg.gains}, sphere={cfg.sphere}, radius={radius}, "
            f"gain_map={cfg.gain_map}, layout={cfg.layout}"
        )
