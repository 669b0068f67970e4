"""The fused MD optimizer: the whole MD step from dL/dW, one compiled graph per dtype and device.

``mdparam.recipe`` builds it (``fused=True``, the default); the maths is
in ``mdparam._fused_math``, the kept weights in ``mdparam._fused_weights``.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._compiled_step import tensor_lrs
from ._fused_math import (
    AdamHyper,
    MatrixSpec,
    MuonHyper,
    adam_,
    clip_coefficient,
    early_sums,
    matrix_step,
)
from ._fused_weights import FusedEntry, FusedWeights
from ._kinds import check_choice
from ._optim import muon_step_scale
from ._retraction import RetractionError

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
    ``step`` returns the loss of ``closure`` (if given), and keeps the
    gradient norm before clipping in ``last_norm``.

    Build it through ``mdparam.recipe``; by hand it looks like this.

    Examples:
        >>> import torch, mdparam
        >>> from mdparam._fused_weights import FusedWeights
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        >>> _ = mdparam.register(model, init="sphere")
        >>> kept = FusedWeights(model)
        >>> e = kept.entries[0]
        >>> from mdparam._fused_optim import FusedMDOptimizer
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
        self._compile = compile
        self._graphs: dict[tuple, Callable] = {}
        self._order: list[tuple] | None = None
        self._args: dict[int, tuple] = {}
        self._signatures: dict[tuple, int] = {}
        self._sig_ids: dict[tuple, int] = {}
        self.register_load_state_dict_post_hook(self._forget)
        self.last_norm: Tensor | None = None
        self._ranks_checked = False

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.weights.check()
        chunks = self._chunks()
        if not self._ranks_checked:
            _check_reduced([m for c in chunks for m in c.mats])
            self._ranks_checked = True
        # every chunk's sums first (clipping needs them all), each block's in its shared graph
        early = [self._compiled(_chunk_sums, c.key)(c.mats, c.others) for c in chunks]
        parts = [sq for sq, _ in early]
        squares = _total(parts)
        oks, norms = [], []
        for c, (_, sums) in zip(chunks, early):
            total = squares.to(c.device)
            fn = self._compiled(_chunk_step, c.key)
            ok, n = fn(c.mats, c.others, sums, total, self.max_norm, self.adam, self.muon)
            oks.append(ok)
            norms += n
        stepped = [e for c in chunks for e in c.entries]
        if self.check and oks and not bool(torch.stack([o.cpu() for o in oks]).all()):
            _raise_diverged(stepped, norms)
        for e in stepped:
            if e.weight is not None:
                e.weight.record(e.direction, e.gains)
        self.last_norm = squares.sqrt() if chunks and self.max_norm is not None else None
        return loss

    def _compiled(self, fn: Callable, signature: tuple) -> Callable:
        """``fn`` compiled once per chunk signature: identical blocks share one graph."""
        if not self._compile:
            return fn
        key = (fn.__name__, signature, self.max_norm, self.adam, self.muon)
        if key not in self._graphs:
            self._graphs[key] = torch.compile(
                _own_copy(fn),
                fullgraph=True,
                dynamic=False,
                options={"guard_filter_fn": _tensor_guards, "size_asserts": False},
            )
        return self._graphs[key]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also the kept W's gradients, which the optimizer reads but does not hold."""
        super().zero_grad(set_to_none)
        for w in self.weights.weights():
            if w.grad is not None:
                if set_to_none:
                    w.grad = None
                else:
                    w.grad.zero_()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "_order"):  # the groups were checked against the kept weights once
            raise RuntimeError(
                "mdparam (the recipe's fused step): its groups are fixed when it is built; build a new "
                "one (mdparam.recipe) with every group instead of adding one"
            )
        super().add_param_group(param_group)

    def _state(self, p: Tensor, keys: tuple[str, ...]) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            for k in keys:
                state[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _chunks(self) -> list[_Chunk]:
        """This step's work, in chunks of one block each (see ``_block_of``)."""
        if self._order is None:
            self._order = self._lay_out()
        out: dict[tuple, _Chunk] = {}
        for key, obj, group in self._order:
            grad = obj.grad
            if grad is None:
                continue
            args = self._args.get(id(obj))
            if args is None:
                args = self._args[id(obj)] = self._static_args(obj, group)
            chunk = out.get(key)
            if chunk is None:
                chunk = out[key] = _Chunk(key[2])
            chunk.add(obj, (args[0], grad, *args[1:]))
        for key, chunk in out.items():
            ids = (key, *(id(m[2]) for m in chunk.mats), *(id(o[0]) for o in chunk.others))
            if ids not in self._signatures:
                sig = chunk.signature()
                self._signatures[ids] = self._sig_ids.setdefault(sig, len(self._sig_ids))
            chunk.key = self._signatures[ids]
        return list(out.values())

    def _lay_out(self) -> list[tuple]:
        """(block, entry or parameter, group) for everything the step may touch, in order."""
        names, order = self.weights.names, []
        for group in self.param_groups:
            role = group["mdparam_role"]
            for p in group["params"] if role != "gain" else ():
                obj = self._entries[id(p)] if role == "direction" else p
                order.append(((_block_of(names.get(id(p), "")), p.dtype, p.device), obj, group))
        return order

    def _static_args(self, obj: FusedEntry | Tensor, group: dict) -> tuple:
        """The step's arguments for one tensor but its gradient, which is new every step."""
        if isinstance(obj, FusedEntry):
            gain_lr = (
                self.param_groups[self._gain_group]["lr"] if self._gain_group is not None else None
            )
            return self._matrix_args(obj, group["lr"], gain_lr)
        st = self._state(obj, ("exp_avg", "exp_avg_sq"))
        wd = float(group.get("weight_decay", 0.0))
        return (obj, st["exp_avg"], st["exp_avg_sq"], group["lr"], st["step"], wd)

    def _forget(self, *_: Any) -> None:
        """After a state load, the cached arguments point at the replaced state tensors."""
        self._order, self._args = None, {}

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
    interned: dict[MatrixSpec, MatrixSpec] = {}
    gain_groups = [i for i, g in enumerate(groups) if g.get("mdparam_role") == "gain"]
    if len(gain_groups) > 1:
        raise ValueError("mdparam (the recipe's fused step): give every gain in one 'gain' group")
    held_gains = {id(p) for i in gain_groups for p in groups[i]["params"]}
    for g in groups:
        role = g.get("mdparam_role")
        if role not in ("direction", "gain", "other"):
            raise ValueError(
                "mdparam (the recipe's fused step): every group needs 'mdparam_role' set to 'direction', "
                f"'gain' or 'other', got {role!r}"
            )
        if role != "direction":
            continue
        update = g.get("update", "adamw")
        check_choice("update", update, UPDATES, where="mdparam (the recipe's fused step)")
        for p in g["params"]:
            e = entries.get(id(p))
            if e is None:
                raise ValueError(
                    "mdparam (the recipe's fused step): a 'direction' group holds a tensor that is not a "
                    "direction of the FusedWeights given; build both from the same model"
                )
            if any(id(t) not in held_gains for t in e.gains):
                raise ValueError(
                    f"mdparam (the recipe's fused step): the gains of {e.name!r} are in no 'gain' group"
                )
            spec = _spec(e, update, bool(g.get("relative", False)))
            specs[id(p)] = interned.setdefault(spec, spec)  # equal blocks: one object, one graph
    return entries, specs, (gain_groups[0] if gain_groups else None)


def _spec(e: FusedEntry, update: str, relative: bool) -> MatrixSpec:
    cfg, rs = e.parametrization.config, e.parametrization.radius_scale
    if update == "muon":
        if len(cfg.matrix_shape) != 2:
            raise ValueError(
                f"mdparam (the recipe's fused step): Muon takes only 2-d matrices, but {e.name!r} has the "
                f"matrix shape {cfg.matrix_shape}; give it to AdamW"
            )
        return MatrixSpec(
            cfg, update, muon_step_scale(*cfg.matrix_shape, rs), False, e.weight is not None
        )
    return MatrixSpec(cfg, update, rs, relative, e.weight is not None)


class _Chunk:
    """One block's matrices and other parameters on one device, in one dtype."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mats: list[tuple] = []
        self.others: list[tuple] = []
        self.entries: list[FusedEntry] = []
        self.key = 0  # its signature's number (see FusedMDOptimizer._chunks)

    def add(self, obj: FusedEntry | Tensor, args: tuple) -> None:
        if isinstance(obj, FusedEntry):
            self.mats.append(args)
            self.entries.append(obj)
        else:
            self.others.append(args)

    def signature(self) -> tuple:
        """What the compiled graph depends on: equal for identical blocks."""
        mats = tuple((m[-1], _radius_key(m[-2]), m[0] is not None) for m in self.mats)
        others = tuple((tuple(o[0].shape), o[0].dtype, o[-1]) for o in self.others)
        return (self.device, mats, others)


def _radius_key(radius: float | Tensor) -> object:
    return ("tensor", tuple(radius.shape)) if isinstance(radius, Tensor) else radius


def _block_of(name: str) -> str:
    """The block a parameter belongs to: its name up to the first index (``blocks.3``).

    Blocks of a ModuleList have equal shapes, so their chunks compile to one
    graph called once per block; compiling every matrix into one graph took
    longer and held more memory than the model's own compile.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ""


def _chunk_sums(mats: list[tuple], others: list[tuple]) -> tuple[Tensor, list[list[Tensor]]]:
    """Before the clipping factor is known: the chunk's sum of squared gradients, and each
    matrix's gain sums (``mdparam._fused_math.early_sums``)."""
    squares, early = torch.zeros((), dtype=torch.float32, device=_device(mats, others)), []
    for _w, g, d, gains, *_state, spec in mats:
        sq, sums = early_sums(g, d, gains, spec)
        squares = squares + sq
        early.append(sums)
    for _p, grad, *_ in others:
        squares = squares + grad.float().square().sum()
    return squares, early


def _chunk_step(
    mats: list[tuple],
    others: list[tuple],
    early: list[list[Tensor]],
    squares: Tensor,
    max_norm: float | None,
    adam: AdamHyper,
    muon: MuonHyper,
) -> tuple[Tensor, list[Tensor]]:
    """Step one chunk, given every chunk's sum of squared gradients (for the clip factor)."""
    _, coef = clip_coefficient(squares, max_norm)
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
        else squares.isfinite()
    )
    return ok, norms


# Guards on the graph's inputs as data; those on Python objects (specs, hyperparameters,
# the maths' functions) are dropped: the key a graph is kept under holds them already.
_KEPT_GUARDS = {
    "TENSOR_MATCH",
    "DUPLICATE_INPUT",
    "NO_TENSOR_ALIASING",
    "SEQUENCE_LENGTH",
    "SHAPE_ENV",
    "GLOBAL_STATE",
    "GRAD_MODE",
    "DEFAULT_DEVICE",
    "DETERMINISTIC_ALGORITHMS",
    "TORCH_FUNCTION_STATE",
    "AUTOGRAD_SAVED_TENSORS_HOOKS",
}


def _tensor_guards(entries: list) -> list[bool]:
    return [e.guard_type in _KEPT_GUARDS for e in entries]


def _device(mats: list[tuple], others: list[tuple]) -> torch.device:
    return mats[0][1].device if mats else others[0][1].device


def _total(parts: list[Tensor]) -> Tensor:
    """The sum of the chunks' squares, on the first chunk's device."""
    if not parts:
        return torch.zeros(())
    dev = parts[0].device
    return torch.stack([p.to(dev) for p in parts]).sum()


def _own_copy(fn: Callable) -> Callable:
    """``fn`` with a code object of its own.

    Dynamo keeps compiled graphs per code object, and every optimizer's
    matrices and specs differ, so optimizers sharing one code object would
    each add a recompile until the limit (8) refuses the next: a sweep of
    recipes in one process. A copy per optimizer keeps each graph cache apart.
    """
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _check_reduced(mats: list[tuple]) -> None:
    """With several ranks, once: the kept weights' gradients must agree (DDP reduced them).

    DDP reduces the Parameters it saw when it was built; a model wrapped before
    the recipe made its kept weights would train each rank on its own gradient.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    grads = [m[1] for m in mats]
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
        f"mdparam (the recipe's fused step): the direction of {', '.join(map(repr, bad or ['?']))} has a "
        "zero or non-finite norm after the step. The step diverged: lower the learning rate, "
        "clip gradients, or check the data for inf/NaN"
    )
