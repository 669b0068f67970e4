"""The optimizer step and the retraction captured together by torch.compile."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

from ._retraction import Retraction
from ._torch_optim import mark_stepped, undecorated_step, with_step_hooks

__all__ = ["CompiledStep", "compile_step", "tensor_lrs"]


def tensor_lrs(optimizer: torch.optim.Optimizer) -> None:
    """Float learning rates become 0-d tensors, so a scheduler changing them is not a recompile.

    Schedulers write into tensor LRs in place (``fill_``). The optimizer's
    state_dict still holds float LRs, so it loads into an optimizer that was
    never compiled (torch.distributed.checkpoint refuses a tensor where the
    fresh optimizer has a float), and loading a state_dict fills the existing
    LR tensors in place, so the compiled step keeps its inputs.
    """
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], Tensor):
            device = group["params"][0].device if group["params"] else "cpu"
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
    if optimizer in _HOOKED:
        return
    _HOOKED.add(optimizer)
    kept: list[Tensor | None] = []

    def floats_out(opt: torch.optim.Optimizer, state: dict) -> dict:
        for group in state["param_groups"]:  # copies of the live groups
            for key in ("lr", "initial_lr"):  # a scheduler made later copies the tensor
                if isinstance(group.get(key), Tensor):
                    group[key] = float(group[key])
        return state

    def keep(opt: torch.optim.Optimizer, state: dict) -> None:
        kept[:] = [g["lr"] if isinstance(g["lr"], Tensor) else None for g in opt.param_groups]

    def fill_in(opt: torch.optim.Optimizer) -> None:
        for group, lr in zip(opt.param_groups, kept):
            if lr is not None and not isinstance(group["lr"], Tensor):
                lr.fill_(float(group["lr"]))
                group["lr"] = lr
        kept.clear()

    optimizer.register_state_dict_post_hook(floats_out)
    optimizer.register_load_state_dict_pre_hook(keep)
    optimizer.register_load_state_dict_post_hook(fill_in)


_HOOKED: weakref.WeakSet = weakref.WeakSet()  # optimizers whose state_dict hooks are in
_LR_FLOOR = torch.finfo(torch.float32).tiny


class CompiledStep:
    """``optimizer.step()`` and the retraction as one compiled function; see ``compile_step``."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        retraction: Retraction | None = None,
        *,
        compile: bool = True,
        **compile_options: Any,
    ) -> None:
        if retraction is not None:
            if retraction.attached:
                raise ValueError(
                    "mdparam.compile_step: this Retraction is attached to an optimizer, so it would run "
                    "twice. Build it without attach() (or remove the handle attach returned): the "
                    "compiled step runs it"
                )
            missing = retraction.missing(optimizer)
            if missing:
                raise ValueError(
                    f"mdparam.compile_step: the optimizer does not step the directions of {missing[:3]}; "
                    "give it the optimizer that holds all directions"
                )
            if retraction.relative is not None and not retraction.relative.covers_all:
                raise NotImplementedError(
                    "mdparam.compile_step: a Retraction whose relative step covers only some "
                    "directions (relative_step=<glob>) is not supported; use relative_step=True, "
                    "or attach the Retraction and call optimizer.step() yourself"
                )
            if retraction.relative is not None:
                retraction.relative.bind(optimizer)
        if optimizer.defaults.get("differentiable"):
            raise ValueError(
                "mdparam.compile_step: differentiable optimizers are not supported; build the "
                "optimizer with differentiable=False or call optimizer.step() yourself"
            )
        tensor_lrs(optimizer)
        # torch.optim's step() graph-breaks around its body to switch grad mode off;
        # calling the undecorated body inside our own no_grad keeps step and
        # retraction in one graph. Its hooks are run around it, outside the graph.
        self._raw_step = undecorated_step(optimizer)
        self.optimizer = optimizer
        self.retraction = retraction
        # The retraction joins the graph only where it is compiled itself (Retraction(
        # compile=True), the default on accelerators); on the CPU, one graph measured no
        # faster than the eager retraction after the compiled step (benchmarks/speed.py optstep).
        self.retraction_in_graph = retraction is not None and retraction.compiled
        self._fn = torch.compile(self._step, **compile_options) if compile else self._step
        self._hooked = with_step_hooks(self._body)

    def _step(self) -> list[Tensor] | None:
        r = self.retraction
        if r is not None and r.relative is not None:
            r.relative.copy_previous()
        # Compiled Adam(W) with a tensor LR of exactly 0 (a warmup's first step, a decay's
        # end) divides eps by it and writes NaN where the second moment is 0
        # (pytorch#126514). For the step alone, the LR is held at the smallest normal
        # float: finite, and a step of at most ~1e-37, which only a weight of exactly 0
        # can show; the groups hold their own LR again right after.
        lrs = self._floored_lrs
        kept = [lr.clone() for lr in lrs]
        if lrs:
            torch._foreach_clamp_min_(lrs, _LR_FLOOR)
        self._raw_step(self.optimizer)
        if lrs:
            torch._foreach_copy_(lrs, kept)
        if r is None or not self.retraction_in_graph:
            return None
        lrs = r.relative.current_lrs() if r.relative is not None else None
        return r.retract_tensors(lrs)

    @property
    def _floored_lrs(self) -> list[Tensor]:
        """The LR tensors the step holds above 0: Adam and AdamW's (pytorch#126514)."""
        if not isinstance(self.optimizer, torch.optim.Adam | torch.optim.AdamW):
            return []
        return [g["lr"] for g in self.optimizer.param_groups if isinstance(g["lr"], Tensor)]

    def _body(self, optimizer: torch.optim.Optimizer) -> list[Tensor] | None:
        with torch.no_grad():
            norms = self._fn()
        r = self.retraction
        if r is not None and not self.retraction_in_graph:
            if r.relative is not None:
                r.relative.mark_recorded()  # D was recorded in the graph
            r()  # eager, per tensor; checks norms
        return norms

    def __call__(self) -> None:
        norms = self._hooked(self.optimizer)
        mark_stepped(self.optimizer)
        if norms is not None and self.retraction.check:
            self.retraction.check_norms(norms)


def compile_step(
    optimizer: torch.optim.Optimizer,
    retraction: Retraction | None = None,
    *,
    compile: bool = True,
    **compile_options: Any,
) -> CompiledStep:
    """One compiled callable for ``optimizer.step()`` followed by the retraction.

    Call the result where you would call ``optimizer.step()``. The optimizer
    stays a normal torch.optim object: its state_dict, param groups and LR
    schedulers work as before. Its float learning rates are turned into 0-d
    tensors (schedulers update those in place), so a changing LR does not
    recompile; the optimizer's state_dict still holds floats, but a
    scheduler's ``get_last_lr()`` and state_dict then hold 0-d tensors (save
    ``float`` copies where a checkpoint format wants plain numbers). An LR of
    exactly 0 is safe with Adam(W) (see the step). The retraction must not also
    be attached. Works with AdamW,
    SGD and the other torch.optim optimizers that torch.compile supports, with
    a compiled or an eager model, and under FSDP2 (the step compiles over the
    DTensor shards; the sharded retraction runs eagerly after it).
    ``compile_options`` go to ``torch.compile``.

    Where the retraction runs follows its own ``compile`` setting: a compiled
    ``Retraction`` (``compile=True``, the default on accelerators) is
    captured in the same graph as the optimizer step; an eager one (the
    default on the CPU, where that graph measured slower) runs right after
    the compiled step, before the optimizer's post-step hooks.

    Examples:
        >>> import torch, mdparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = mdparam.register(model)
        >>> opt = torch.optim.AdamW(mdparam.param_groups(model, lr=0.01))
        >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 100)
        >>> step = mdparam.compile_step(opt, mdparam.Retraction(model))
        >>> for _ in range(2):
        ...     model(torch.randn(4, 8)).square().mean().backward()
        ...     step(); sched.step(); opt.zero_grad()
        >>> round(float(model[0].parametrizations.weight.original0.detach().norm()), 4)
        2.8284
    """
    return CompiledStep(optimizer, retraction, compile=compile, **compile_options)
