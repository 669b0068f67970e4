"""The fused MD optimizer: the whole MD step from dL/dW, one compiled graph per dtype and device.

:func:`mdparam.recipe` builds it (``fused=True``, the default); the maths is
in :mod:`mdparam.fused_math`, the kept weights in :mod:`mdparam.fused_weights`.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .compiled_step import tensor_lrs
from .fused_math import (
    AdamHyper,
    MatrixSpec,
    MuonHyper,
    adam_,
    clip_coefficient,
    early_sums,
    matrix_step,
)
from .fused_weights import FusedEntry, FusedWeights
from .optim import muon_step_scale
from .retraction import RetractionError

__all__ = ["UPDATES", "FusedMDOptimizer"]

UPDATES = ("adamw", "muon")  # what a direction group's "update" key may say


class FusedMDOptimizer(torch.optim.Optimizer):
    """Clip by ||dL/dW||, chain rule, AdamW or Muon on d, AdamW on gains and the rest,
    relative step, retraction, w written back: one step, compiled.

    ``params`` are groups as for any torch.optim optimizer, each tagged
    ``"mdparam_role"``: ``"direction"`` groups hold directions of ``weights``
    and say ``"update"`` (``"adamw"`` or ``"muon"``) and ``"relative"``
    (AdamW: the step rescaled to lr x R); one ``"gain"`` group holds every
    gain; ``"other"`` groups take AdamW with their ``"weight_decay"``.
    :meth:`step` returns the loss of ``closure`` (if given), and keeps the
    gradient norm before clipping in :attr:`last_norm`.

    Build it through :func:`mdparam.recipe`; by hand it looks like this.

    Example:
        >>> import torch, mdparam
        >>> from mdparam.fused_weights import FusedWeights
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        >>> _ = mdparam.register(model, init="sphere")
        >>> kept = FusedWeights(model)
        >>> e = kept.entries[0]
        >>> from mdparam.fused_optim import FusedMDOptimizer
        >>> opt = FusedMDOptimizer(kept, [
        ...     {"params": [e.direction], "lr": 0.05, "mdparam_role": "direction",
        ...      "update": "adamw", "relative": True},
        ...     {"params": list(e.gains), "lr": 1e-3, "mdparam_role": "gain"},
        ...     {"params": list(model[1].parameters()), "lr": 1e-2, "mdparam_role": "other"},
        ... ], max_norm=1.0, compile=False)
        >>> model(torch.randn(4, 8)).square().mean().backward()
        >>> _ = opt.step(); opt.zero_grad()
        >>> round(float(e.direction.norm()), 4)  # back on its sphere, sqrt(8)
        2.8284
    """

    def __init__(
        self,
        weights: FusedWeights,
        params: list[dict[str, Any]],
        *,
        max_norm: float | None = 1.0,
        adam: AdamHyper | None = None,
        muon: MuonHyper | None = None,
        compile: bool = True,
        check: bool = True,
    ) -> None:
        # capturable: each step count lives on its parameter's device, also after a load
        super().__init__(params, {"lr": 1e-3, "weight_decay": 0.0, "capturable": True})
        self.weights, self.max_norm, self.check = weights, max_norm, check
        self.adam, self.muon = adam or AdamHyper(), muon or MuonHyper()
        self._entries, self._specs, self._gain_group = _plan(weights, self.param_groups)
        tensor_lrs(self)
        self._fn: Callable = (
            torch.compile(_own_copy(_batch_step), fullgraph=True, dynamic=False)
            if compile
            else _batch_step
        )
        self.last_norm: Tensor | None = None
        self._ranks_checked = False

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.weights.check()
        batches = self._batches()
        if not self._ranks_checked:
            _check_reduced(batches)
            self._ranks_checked = True
        extra = _squares_by_batch(batches) if len(batches) > 1 else None
        totals, stepped = [], []
        for key, (mats, others, entries) in batches.items():
            rest = _zero_like_key(key) if extra is None else _others_total(extra, key)
            total, ok, norms = self._fn(mats, others, rest, self.max_norm, self.adam, self.muon)
            totals.append(total)
            if self.check and not bool(ok):
                _raise_diverged(entries, norms)
            stepped += entries
        for e in stepped:
            if e.weight is not None:
                e.weight.record(e.direction, e.gains)
        self.last_norm = totals[0] if totals and self.max_norm is not None else None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also the kept W's gradients, which the optimizer reads but does not hold."""
        super().zero_grad(set_to_none)
        for w in self.weights.weights():
            if w.grad is not None:
                if set_to_none:
                    w.grad = None
                else:
                    w.grad.zero_()

    def _state(self, p: Tensor, keys: tuple[str, ...]) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            for k in keys:
                state[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _batches(self) -> dict[tuple, tuple[list, list, list[FusedEntry]]]:
        """This step's work per (dtype, device): matrices with a gradient, and the rest."""
        out: dict[tuple, tuple[list, list, list]] = {}
        gain_lr = (
            self.param_groups[self._gain_group]["lr"] if self._gain_group is not None else None
        )
        for group in self.param_groups:
            role = group["mdparam_role"]
            for p in group["params"]:
                if role == "gain":
                    continue
                if role == "direction":
                    e = self._entries[id(p)]
                    if e.grad is None:
                        continue
                    mats, _, stepped = out.setdefault((p.dtype, p.device), ([], [], []))
                    mats.append(self._matrix_args(e, group["lr"], gain_lr))
                    stepped.append(e)
                elif p.grad is not None:
                    st = self._state(p, ("exp_avg", "exp_avg_sq"))
                    item = (p, p.grad, st["exp_avg"], st["exp_avg_sq"], group["lr"], st["step"])
                    out.setdefault((p.dtype, p.device), ([], [], []))[1].append(
                        (*item, float(group.get("weight_decay", 0.0)))
                    )
        return out

    def _matrix_args(self, e: FusedEntry, lr: Tensor, gain_lr: Tensor | None) -> tuple:
        spec = self._specs[id(e.direction)]
        keys = ("momentum_buffer",) if spec.update == "muon" else ("exp_avg", "exp_avg_sq")
        st = self._state(e.direction, keys)
        gstates = tuple(
            (s["exp_avg"], s["exp_avg_sq"])
            for s in (self._state(g, ("exp_avg", "exp_avg_sq")) for g in e.gains)
        )
        w = e.weight.weight if e.weight is not None else None
        radius = e.parametrization.sphere_radius()
        dstate = tuple(st[k] for k in keys)
        return (
            w,
            e.grad,
            e.direction,
            e.gains,
            dstate,
            gstates,
            lr,
            gain_lr,
            st["step"],
            radius,
            spec,
        )


def _plan(weights: FusedWeights, groups: list[dict]) -> tuple[dict, dict, int | None]:
    """Check the groups against the kept weights; each direction's entry and spec."""
    entries = {id(e.direction): e for e in weights.entries}
    specs: dict[int, MatrixSpec] = {}
    gain_groups = [i for i, g in enumerate(groups) if g.get("mdparam_role") == "gain"]
    if len(gain_groups) > 1:
        raise ValueError("mdparam.FusedMDOptimizer: give every gain in one 'gain' group")
    held_gains = {id(p) for i in gain_groups for p in groups[i]["params"]}
    for g in groups:
        role = g.get("mdparam_role")
        if role not in ("direction", "gain", "other"):
            raise ValueError(
                "mdparam.FusedMDOptimizer: every group needs 'mdparam_role' set to 'direction', "
                f"'gain' or 'other', got {role!r}"
            )
        if role != "direction":
            continue
        update = g.get("update", "adamw")
        if update not in UPDATES:
            raise ValueError(
                f"mdparam.FusedMDOptimizer: unknown update={update!r}; choose one of {UPDATES}"
            )
        for p in g["params"]:
            e = entries.get(id(p))
            if e is None:
                raise ValueError(
                    "mdparam.FusedMDOptimizer: a 'direction' group holds a tensor that is not a "
                    "direction of the FusedWeights given; build both from the same model"
                )
            if any(id(t) not in held_gains for t in e.gains):
                raise ValueError(
                    f"mdparam.FusedMDOptimizer: the gains of {e.name!r} are in no 'gain' group"
                )
            specs[id(p)] = _spec(e, update, bool(g.get("relative", False)))
    return entries, specs, (gain_groups[0] if gain_groups else None)


def _spec(e: FusedEntry, update: str, relative: bool) -> MatrixSpec:
    cfg, rs = e.parametrization.config, e.parametrization.radius_scale
    if update == "muon":
        if len(cfg.matrix_shape) != 2:
            raise ValueError(
                f"mdparam.FusedMDOptimizer: Muon takes only 2-d matrices, but {e.name!r} has the "
                f"matrix shape {cfg.matrix_shape}; give it to AdamW"
            )
        return MatrixSpec(
            cfg, update, muon_step_scale(*cfg.matrix_shape, rs), False, e.weight is not None
        )
    return MatrixSpec(cfg, update, rs, relative, e.weight is not None)


def _batch_step(
    mats: list[tuple],
    others: list[tuple],
    rest: Tensor,
    max_norm: float | None,
    adam: AdamHyper,
    muon: MuonHyper,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """One (dtype, device) batch: clip, step every matrix, then everything else.

    ``rest`` is the sum of squared gradients of the other batches.
    """
    squares, early = rest, []
    for _w, g, d, gains, *_state, spec in mats:
        sq, sums = early_sums(g, d, gains, spec)
        squares = squares + sq
        early.append(sums)
    for _p, grad, *_ in others:
        squares = squares + grad.float().square().sum()
    total, coef = clip_coefficient(squares, max_norm)
    norms = []
    for (w, g, d, gains, dstate, gstates, lr, gain_lr, step, radius, spec), sums in zip(
        mats, early
    ):
        step.add_(1)
        norms.append(
            matrix_step(
                w,
                g,
                d,
                gains,
                sums,
                dstate,
                gstates,
                coef,
                lr,
                gain_lr,
                step,
                radius,
                spec,
                adam,
                muon,
            )
        )
    for p, g, m, v, lr, step, wd in others:
        step.add_(1)
        adam_(p, g * coef.to(g.dtype), m, v, lr, step, adam, wd)
    ok = (
        torch.stack([((n > 0) & n.isfinite()).all() for n in norms]).all()
        if norms
        else total.isfinite()
    )
    return total, ok, norms


def _own_copy(fn: Callable) -> Callable:
    """``fn`` with a code object of its own.

    Dynamo keeps compiled graphs per code object, and every optimizer's
    matrices and specs differ, so optimizers sharing one code object would
    each add a recompile until the limit (8) refuses the next: a sweep of
    recipes in one process. A copy per optimizer keeps each graph cache apart.
    """
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _squares_by_batch(batches: dict) -> dict[tuple, Tensor]:
    out = {}
    for key, (mats, others, _) in batches.items():
        grads = [m[1] for m in mats] + [o[1] for o in others]
        out[key] = torch.stack([g.float().square().sum() for g in grads]).sum().cpu()
    return out


def _others_total(extra: dict[tuple, Tensor], key: tuple) -> Tensor:
    return sum((v for k, v in extra.items() if k != key), _zero_like_key(key)).to(key[1])


_ZEROS: dict[tuple, Tensor] = {}


def _zero_like_key(key: tuple) -> Tensor:
    if key not in _ZEROS:
        _ZEROS[key] = torch.zeros((), dtype=torch.float32, device=key[1])
    return _ZEROS[key]


def _check_reduced(batches: dict) -> None:
    """With several ranks, once: the kept weights' gradients must agree (DDP reduced them).

    DDP reduces the Parameters it saw when it was built; a model wrapped before
    the recipe made its kept weights would train each rank on its own gradient.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    grads = [m[1] for b in batches.values() for m in b[0]]
    if not grads:
        return
    total = torch.stack([g.float().square().sum() for g in grads]).sum().reshape(1)
    low, high = total.clone(), total.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.allclose(low, high, rtol=1e-5):
        raise RuntimeError(
            "mdparam.recipe: the kept weights' gradients differ between ranks, so nothing "
            "reduced them: the model was wrapped in DDP before mdparam.recipe made them. "
            "Build the recipe first, then wrap: recipe -> DDP -> torch.compile (or use "
            "fused=False)"
        )


def _raise_diverged(entries: list[FusedEntry], norms: list[Tensor]) -> None:
    bad = [e.name for e, n in zip(entries, norms) if not bool(((n > 0) & n.isfinite()).all())]
    raise RetractionError(
        f"mdparam.FusedMDOptimizer: the direction of {', '.join(map(repr, bad or ['?']))} has a "
        "zero or non-finite norm after the step. The step diverged: lower the learning rate, "
        "clip gradients, or check the data for inf/NaN"
    )
