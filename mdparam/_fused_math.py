"""The maths of the fused MD step, one matrix at a time: tensor work only, compiled as one graph.

With W = diag(phi(r)) . D . diag(phi(c)) read by the forward, autograd gives
G = dL/dW. The chain rule gives

    dL/dD = G * a * b,   dL/dr = phi'(r) * sum_j G D b,   dL/dc = phi'(c) * sum_i a G D

(a = phi(r) as a column, b = phi(c) as a row). The base optimizer steps D,
the relative step rescales that step to lr x R, the retraction puts D back
on its sphere, and W is written from the new D and gains.

Written so that inductor reads each large tensor as few times as it can:

- every sum over the columns (dL/dc, the squares for clipping) is taken
  before the clipping factor is known, which scales them afterwards;
- the retraction's norm ||D - s U|| is not a pass of its own: it follows
  from ||D||^2, <D, U> and ||U||^2, summed in the same pass as dL/dr;
- the new moments are computed twice, once for those sums and once where
  they are written, instead of stored in between.

``mdparam._fused_optim`` holds the optimizer around these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._parametrization import MDConfig, gain_magnitudes

__all__ = ["AdamHyper", "MatrixSpec", "MuonHyper", "adam_", "clip_coefficient", "matrix_step"]

_TINY = 1e-30  # as the retraction: a zero norm stays zero instead of turning into NaN


@dataclass(frozen=True)
class AdamHyper:
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass(frozen=True)
class MuonHyper:
    momentum: float = 0.95
    nesterov: bool = True
    ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315)
    ns_steps: int = 5
    eps: float = 1e-7


@dataclass(frozen=True)
class MatrixSpec:
    """What the step needs to know of one parametrized tensor, fixed for the run.

    ``update`` is ``"adamw"`` or ``"muon"``; ``lr_scale`` multiplies the
    group's LR (radius_scale, and Muon's shape factor) where the step is not
    relative; ``relative`` makes the step lr x R long per unit of the sphere. ``fused``: the forward reads a
    separate w (False when there are no gains: the forward reads d itself).
    """

    config: MDConfig
    update: str
    lr_scale: float
    relative: bool
    fused: bool


def clip_coefficient(squares: Tensor, max_norm: float | None) -> tuple[Tensor, Tensor]:
    """(total norm, the factor every gradient is scaled by), as torch.nn.utils.clip_grad_norm_."""
    total = squares.sqrt()
    if max_norm is None:
        return total, torch.ones_like(total)
    return total, torch.clamp(max_norm / (total + 1e-6), max=1.0)


def adam_(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, lr: Tensor, step: Tensor, h: AdamHyper, wd: float
) -> None:
    """One AdamW step in place, with torch.optim.AdamW's formula (bias-corrected, eps outside)."""
    b1, b2 = h.betas
    if wd:
        p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (v.sqrt() / (1 - b2**step).sqrt()).add_(h.eps)
    p.sub_(lr / (1 - b1**step) * m / denom)


def newton_schulz(x: Tensor, h: MuonHyper) -> Tensor:
    """torch.optim.Muon's quintic Newton-Schulz orthogonalisation, in bf16."""
    a, b, c = h.ns_coefficients
    y = x.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:
        y = y.T
    y = y / y.norm().clamp(min=h.eps)
    for _ in range(h.ns_steps):
        gram = y @ y.T
        y = torch.addmm(y, torch.addmm(gram, gram, gram, beta=b, alpha=c), y, beta=a)
    return y.T if tall else y


def _unit_sum(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Sum over the sphere's unit dims, keepdim; the rows first, so inductor takes it in the
    pass that also sums each row."""
    for d in sorted(dims, reverse=True):
        x = x.sum(d, keepdim=True)
    return x


def _gain_sums(g: Tensor, d: Tensor, mags: tuple[Tensor, ...]) -> list[Tensor]:
    """sum over each magnitude's broadcast dims of g * d * (the other magnitudes)."""
    out = []
    for k, mag in enumerate(mags):
        prod = g * d
        for j, other in enumerate(mags):
            if j != k:
                prod = prod * other
        dims = [d for d in range(-1, -prod.ndim - 1, -1) if mag.shape[d] == 1]
        out.append(_unit_sum(prod, tuple(dims)))
    return out


def early_sums(g: Tensor, d: Tensor, gains: tuple[Tensor, ...], spec: MatrixSpec):
    """Before the clipping factor is known: the sum of g^2 and every gain's sum (the factor
    scales them after)."""
    lay = spec.config.geometry.layout
    gm, dm = lay.to_matrix(g), lay.to_matrix(d)
    squares = (gm * gm).sum(-2).sum()
    if not gains:
        return squares, []
    return squares, _gain_sums(gm, dm, gain_magnitudes(gains, spec.config, traced=True))


def matrix_step(
    w: Tensor | None,
    g: Tensor,
    d: Tensor,
    gains: tuple[Tensor, ...],
    sums: list[Tensor],
    dstate: tuple[Tensor, ...],
    gstates: tuple[tuple[Tensor, Tensor], ...],
    coef: Tensor,
    lr: Tensor,
    gain_lr: Tensor,
    step: Tensor,
    radius: float | Tensor,
    spec: MatrixSpec,
    adam: AdamHyper,
    muon: MuonHyper,
) -> Tensor:
    """Step D (AdamW or Muon, relative or not), its gains (AdamW), retract D, write W.

    ``sums`` are ``early_sums``' gain sums; ``dstate`` is (exp_avg,
    exp_avg_sq) or (momentum_buffer,). Returns the norms the retraction
    divided by (per unit), for the caller's finiteness check.
    """
    cfg = spec.config
    geo = cfg.geometry
    lay, dims = geo.layout, geo.sphere.dims
    gm, dm = lay.to_matrix(g), lay.to_matrix(d)
    # one factor per entry (coef x a x b): multiplying G by a, b and coef in turn, as
    # autograd and clipping do, measured 1.45x slower for the whole step at 384x4
    scale = coef
    for mag in gain_magnitudes(gains, cfg, traced=True):
        scale = scale * mag
    grad_d = gm * scale
    muon_step = spec.update == "muon"  # its update is a matmul's output: stored, computed once
    u = _direction_update(grad_d, dstate, lay, spec, step, adam, muon, write=muon_step)
    # ||d - s u||^2 per unit, from three sums over the pass that also takes dL/dr
    dd, du, uu = _unit_sum(dm * dm, dims), _unit_sum(dm * u, dims), _unit_sum(u * u, dims)
    if spec.relative:  # lr x R per unit; R carries any radius_scale already
        s = lr * radius / uu.sqrt().clamp_min(_TINY)
    elif muon_step:
        s = lr * spec.lr_scale
    else:
        s = lr * spec.lr_scale / (1 - adam.betas[0] ** step)
    norm = (dd - 2 * s * du + s * s * uu).clamp_min(0).sqrt()
    for raw, total, (m, v) in zip(gains, sums, gstates):
        grad = geo.gain_map.phi_backward(raw, (coef * total).reshape(raw.shape))
        adam_(raw, grad, m, v, gain_lr, step, adam, 0.0)
    if not muon_step:  # the second evaluation, where it is written (see the module's docstring)
        u = _direction_update(grad_d, dstate, lay, spec, step, adam, muon, write=True)
    new = (dm - s * u) * (radius / norm.clamp_min(_TINY))
    d.copy_(lay.from_matrix(new, cfg.shape))
    if w is not None:
        for mag in gain_magnitudes(gains, cfg, traced=True):
            new = new * mag
        w.copy_(lay.from_matrix(new, cfg.shape))
    return norm


def _direction_update(
    grad_d: Tensor,
    dstate: tuple[Tensor, ...],
    lay,
    spec: MatrixSpec,
    step: Tensor,
    adam: AdamHyper,
    muon: MuonHyper,
    write: bool = False,
) -> Tensor:
    """The base optimizer's update direction for D (before its LR), in the matrix view.

    AdamW: m_hat / (sqrt(v_hat) + eps) without 1/(1 - beta1^t), which the step
    size carries. Muon: the orthogonalised (Nesterov) momentum. ``write``
    stores the new moments.
    """
    if spec.update == "muon":
        (buf,) = dstate
        bm = lay.to_matrix(buf)
        new_buf = torch.lerp(bm, grad_d, 1 - muon.momentum)
        if write:
            buf.copy_(lay.from_matrix(new_buf, spec.config.shape))
        upd = torch.lerp(grad_d, new_buf, muon.momentum) if muon.nesterov else new_buf
        return newton_schulz(upd, muon).to(grad_d.dtype)  # bf16 out; its sums and step in fp32
    b1, b2 = adam.betas
    m, v = (lay.to_matrix(t) for t in dstate)
    # the write spells out lerp's formula, so that it is not merged with the first evaluation
    new_m = m + (grad_d - m) * (1 - b1) if write else torch.lerp(m, grad_d, 1 - b1)
    new_v = v * b2 + (1 - b2) * (grad_d * grad_d)
    if write:
        dstate[0].copy_(lay.from_matrix(new_m, spec.config.shape))
        dstate[1].copy_(lay.from_matrix(new_v, spec.config.shape))
    return new_m / ((new_v.sqrt() / (1 - b2**step).sqrt()) + adam.eps)
