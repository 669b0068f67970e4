"""The post-step retraction: put every direction back on its sphere."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .distributed import (
    any_rank,
    is_sharded,
    local_radius,
    norms_are_global,
    reduce_plan,
    sharded_norms,
)
from .layouts import to_matrix, write_back
from .sphere import sphere_norm
from .tree import registered, unique_directions

__all__ = ["Retraction", "RetractionError", "retract_"]


Selector = str | Iterable[str] | Callable[[str], bool]


def _relative_indices(selector: bool | Selector, names: list[str]) -> list[int]:
    """Indices of the directions that take the relative step (``relative_step=``)."""
    if selector is True or selector is False:
        return list(range(len(names))) if selector else []
    if callable(selector):
        return [i for i, n in enumerate(names) if selector(n)]
    patterns = [selector] if isinstance(selector, str) else list(selector)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            "relative_step must be True/False, a glob on direction names (e.g. 'blocks.*'), "
            f"a list of globs or a predicate name -> bool, got {selector!r}"
        )
    chosen = [i for i, n in enumerate(names) if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise ValueError(
            f"mdparam.Retraction: relative_step={selector!r} matches no direction; names look "
            f"like {names[:3]}"
        )
    return chosen


class RetractionError(FloatingPointError):
    """A direction had a zero or non-finite norm, so it could not be rescaled."""


def retract_(
    directions: Sequence[Tensor],
    spheres: Sequence[str],
    layouts: Sequence[str],
    radii: Sequence[float | Tensor],
    norms: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """Rescale each direction in place to its sphere's radius; return the norms used.

    Each tensor is normed and rescaled in turn, so the second pass reads it
    while it is still in cache. ``norms`` (keepdim, per sphere unit) replaces
    the local norms, as the sharded path does with global ones. A direction of
    norm zero stays zero (the norm is clamped before dividing), not NaN; the
    caller checks the returned norms for zeros and non-finite values.
    """
    used = []
    for i, (d, sphere, layout, radius) in enumerate(zip(directions, spheres, layouts, radii)):
        m = to_matrix(d, layout)
        n = sphere_norm(m, sphere) if norms is None else norms[i]  # fp32 for bf16/fp16
        m.mul_(radius / n.clamp_min(_TINY))
        write_back(m, d, layout)
        used.append(n)
    return used


_TINY = 1e-30


def relative_step_(
    directions: Sequence[Tensor],
    previous: Sequence[Tensor],
    spheres: Sequence[str],
    layouts: Sequence[str],
    radii: Sequence[float | Tensor],
    lrs: Sequence[Tensor | float],
    norm_fn: Callable[[list[Tensor]], list[Tensor]] | None = None,
) -> None:
    """Rescale each direction's last step to length lr x radius, in place.

    With U = D - D_prev (whatever the base optimizer did), sets
    D = D_prev + lr * R * U / ||U||, the norm taken per unit of the sphere
    (by ``norm_fn`` if given, e.g. global norms of shards). ``previous`` is
    overwritten with U. A unit with U = 0 (no gradient) stays where it was.
    """
    for d, prev in zip(directions, previous):
        torch.sub(d, prev, out=prev)  # prev := U
    if norm_fn is None:
        norms = [
            sphere_norm(to_matrix(u, layout), sphere)
            for u, sphere, layout in zip(previous, spheres, layouts)
        ]
    else:
        norms = norm_fn(list(previous))
    for d, u, layout, radius, lr, n in zip(directions, previous, layouts, radii, lrs, norms):
        m = to_matrix(d, layout)
        # D_prev + s U = D + (s - 1) U: one pass over D and U
        m.addcmul_(to_matrix(u, layout), lr * radius / n.clamp_min(_TINY) - 1)
        write_back(m, d, layout)


class Retraction:
    """Callable that puts every direction of a registered model back on its sphere.

    The work is one pass over the direction tensors: each is normed and
    rescaled while still in cache. ``compile=True`` captures that pass with
    ``torch.compile(fullgraph=True, dynamic=False)``, once, on first call.
    ``compile="auto"`` (default) compiles on accelerators, where one graph
    saves a kernel launch per tensor, and runs eagerly on the CPU, where
    inductor's single fused kernel norms every tensor before rescaling any and
    so re-reads them from memory: measured on the benchmark GPT, eager runs at
    1.05x a plain copy of the same bytes and the compiled graph at 1.3x, after
    2-5 s of compiling (``benchmarks/speed.py``, default allocator). bf16/fp16 directions are
    normed and rescaled in fp32.

    Build it after :func:`mdparam.register` and call it after every optimizer
    step, or let :meth:`attach` do that.

    ``relative_step=True`` makes the direction's learning rate the relative
    step for any base optimizer: after each step, the step the optimizer took
    is rescaled to length ``lr x R`` (per row or column for row/col spheres)
    before the retraction, D <- retract(D_prev + lr R U / ||U||). This is the
    Hyperball-style normalised update; Muon with :func:`muon_param_groups`
    is already relative and does not need it. It costs one copy of the
    directions in memory and three more passes over them per step. A glob
    on direction names, a list of globs or a predicate ``name -> bool``
    instead of True limits it to those directions (say, the hidden matrices
    but not an embedding on a row sphere, whose rows mostly get no
    gradient and would all be moved by ``lr`` anyway); the rest are only
    retracted.

    A direction of zero norm stays zero (not NaN). With ``check=True``
    (default) a zero or non-finite norm (a diverged step) raises
    :class:`RetractionError` naming the layers; the check reads one flag back
    from the device per call, which ``check=False`` avoids on a GPU.

    Example:
        >>> import torch, mdparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = mdparam.register(model)
        >>> opt = torch.optim.AdamW(mdparam.param_groups(model, lr=0.1))
        >>> retract = mdparam.Retraction(model)
        >>> _ = retract.attach(opt)
        >>> model(torch.randn(4, 8)).sum().backward(); opt.step()
        >>> D = model[0].parametrizations.weight.original0
        >>> round(float(D.norm()), 4)  # sqrt(max(8, 8))
        2.8284
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        compile: bool | str = "auto",
        check: bool = True,
        relative_step: bool | Selector = False,
    ) -> None:
        entries = registered(model)
        if not entries:
            raise ValueError(
                "mdparam.Retraction: the model has no MD-parametrized tensor; call "
                "mdparam.register(model) first"
            )
        self.names: list[str] = []
        self.directions: list[nn.Parameter] = []
        self._params: list[nn.Module] = []  # radii are read from these at every call
        self._spheres: list[str] = []
        self._layouts: list[str] = []
        for e in unique_directions(entries):
            self.names.append(e.name)
            self.directions.append(e.direction)
            self._params.append(e.parametrization)
            self._spheres.append(e.config.sphere)
            self._layouts.append(e.config.layout)
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
        self.sharded = any(is_sharded(d) for d in self.directions)
        if compile == "auto":
            compile = self.directions[0].device.type != "cpu" and not self.sharded
        self.compiled = bool(compile)
        self.check = check
        self._rel = _relative_indices(relative_step, self.names)
        self.relative_step = bool(self._rel)
        self.relative_all = len(self._rel) == len(self.directions)
        self._fn: Callable[..., list[Tensor]] = retract_
        self._step_fn: Callable[..., None] = relative_step_
        self._global_norms = True
        if self.sharded:
            if not all(is_sharded(d) for d in self.directions):
                raise ValueError(
                    "mdparam.Retraction: some directions are FSDP2-sharded and some are not; "
                    "shard the whole registered model (fully_shard on its blocks and root)"
                )
            if self.compiled:
                raise ValueError(
                    "mdparam.Retraction: compile=True is not supported for FSDP2-sharded "
                    "directions; use compile=False (or 'auto')"
                )
            self._global_norms = all(
                norms_are_global(d, s, lay)
                for d, s, lay in zip(self.directions, self._spheres, self._layouts)
            )
            self._plan = reduce_plan(self.directions, self._spheres, self._layouts)
            self._rel_plan = reduce_plan(*self._relative(self.directions))
        elif self.compiled:
            self._fn = torch.compile(retract_, fullgraph=True, dynamic=False)
            self._step_fn = torch.compile(relative_step_, fullgraph=True, dynamic=False)
        self._previous: list[Tensor] | None = None  # relative step: D before the step
        self._pending = False  # relative step: a step was taken since D was recorded
        self._groups: list[dict] = []  # relative step: each direction's param group
        self._lr_sources: list[tuple[dict, Tensor]] = []  # (param group, its lr as a tensor)
        self._lrs: list[Tensor] = []
        self._attached = 0

    @property
    def attached(self) -> bool:
        """Whether an optimizer hook runs this retraction (see :meth:`attach`)."""
        return self._attached > 0

    def radii(self) -> list[float | Tensor]:
        """Each direction's radius now (a float, or this rank's part of a radius tensor)."""
        radii = [p.sphere_radius() for p in self._params]
        if self.sharded:
            radii = [
                local_radius(d, lay, r) for d, lay, r in zip(self.directions, self._layouts, radii)
            ]
        return radii

    @torch.no_grad()
    def __call__(self) -> None:
        radii = self.radii()
        if self.sharded:
            local = [d.to_local() for d in self.directions]

            def norm_fn(tensors: list[Tensor]) -> list[Tensor]:
                return sharded_norms(tensors, self._plan, self._spheres, self._layouts)

        else:
            local, norm_fn = self.directions, None
        if self.relative_step:
            if self._previous is None:
                raise RuntimeError(
                    "mdparam.Retraction(relative_step=True) needs the directions from before "
                    "the step: use retract.attach(optimizer), which records them"
                )
            if self._pending:  # once per recorded step: a second call only retracts
                for group, lr in self._lr_sources:
                    lr.fill_(group["lr"] / group.get("mdparam_lr_scale", 1.0))
                moved, spheres, layouts = self._relative(local)
                args = (moved, self._previous, spheres, layouts, self._relative_only(radii))
                if self.sharded:
                    self._step_fn(*args, self._lrs, self._relative_norm_fn)
                else:
                    self._step_fn(*args, self._lrs)
                self._pending = False
        if self.sharded:
            norms = self._fn(local, self._spheres, self._layouts, radii, norm_fn(local))
        else:
            norms = self._fn(local, self._spheres, self._layouts, radii)
        if self.check:
            self.check_norms(norms)

    def _relative_only(self, items: Sequence[Any]) -> list[Any]:
        return [items[i] for i in self._rel]

    def _relative(self, tensors: Sequence[Tensor]) -> tuple[list[Tensor], list[str], list[str]]:
        """The relative-step directions among ``tensors``, with their spheres and layouts."""
        return (
            self._relative_only(tensors),
            self._relative_only(self._spheres),
            self._relative_only(self._layouts),
        )

    def _relative_norm_fn(self, tensors: list[Tensor]) -> list[Tensor]:
        _, spheres, layouts = self._relative(self.directions)
        return sharded_norms(tensors, self._rel_plan, spheres, layouts)

    def check_norms(self, norms: list[Tensor]) -> None:
        """Raise :class:`RetractionError` if any norm the retraction saw was zero or not finite.

        Sharded directions whose norms are local to a rank (row spheres split by
        rows) agree on the outcome through one small all-reduce, so that every
        rank raises together rather than one rank leaving the others waiting.
        """
        flat = torch.cat([n.reshape(-1) for n in norms])
        bad_here = not bool(torch.isfinite(flat).all() & (flat > 0).all())
        if self.sharded and not self._global_norms:
            bad_anywhere = any_rank(bad_here, flat.device)
            if bad_anywhere and not bad_here:
                raise RetractionError(
                    "mdparam.Retraction: another rank found a direction with a zero or non-finite "
                    "norm after the optimizer step; see that rank's error for the layer. Lower "
                    "the learning rate, clip gradients, or check the data for inf/NaN"
                )
        if bad_here:
            bad = [
                name
                for name, n in zip(self.names, norms)
                if not bool(torch.isfinite(n).all() & (n > 0).all())
            ]
            raise RetractionError(
                f"mdparam.Retraction: the direction of {', '.join(map(repr, bad))} has a zero "
                "or non-finite norm after the optimizer step (a zero direction is kept at "
                "zero rather than turned into NaN). The step diverged: lower the learning "
                "rate, clip gradients, or check the data for inf/NaN"
            )

    def _groups_of(self, optimizer: torch.optim.Optimizer) -> tuple[dict[int, dict], list[str]]:
        """``optimizer``'s param group of each parameter (by id), and the directions it lacks."""
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, d in zip(self.names, self.directions) if id(d) not in group_of]
        return group_of, missing

    def bind_lrs(self, optimizer: torch.optim.Optimizer) -> None:
        """Relative-step mode: read each direction's learning rate from ``optimizer``'s groups."""
        group_of, _ = self._groups_of(optimizer)
        moved = self._relative_only(self.directions)
        missing = [
            n for n, d in zip(self._relative_only(self.names), moved) if id(d) not in group_of
        ]
        if missing:
            raise ValueError(
                f"mdparam.Retraction(relative_step=...): the optimizer does not hold the "
                f"directions of {missing[:3]}; in relative-step mode one optimizer must step "
                "every direction that takes the relative step"
            )
        self._groups = [group_of[id(d)] for d in moved]
        lr_of_group: dict[int, Tensor] = {}
        self._lr_sources, self._lrs = [], []
        for d, g in zip(moved, self._groups):
            if id(g) not in lr_of_group:
                lr_of_group[id(g)] = torch.zeros((), dtype=torch.float32, device=d.device)
                self._lr_sources.append((g, lr_of_group[id(g)]))
            self._lrs.append(lr_of_group[id(g)])

    def current_lrs(self) -> list[Tensor | float]:
        """Each direction's relative step now: its group's lr over any ``mdparam_lr_scale``."""
        return [g["lr"] / g.get("mdparam_lr_scale", 1.0) for g in self._groups]

    def _prepare_relative(self, optimizer: torch.optim.Optimizer) -> list[Tensor]:
        """Relative-step mode: bind the LRs and allocate the record of D before each step."""
        self.bind_lrs(optimizer)
        local = [d.to_local() if self.sharded else d for d in self._relative_only(self.directions)]
        self._previous = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in local]
        return self._previous

    def _after_step(self) -> None:
        """Finish an optimizer step whose directions were recorded: relative step, then retract."""
        self._pending = self.relative_step
        self()

    def attach(self, optimizer: torch.optim.Optimizer) -> _Handles:
        """Run the retraction after every ``optimizer.step()``.

        ``optimizer`` must hold the directions (with Muon's recipe, attach to
        the Muon optimizer). Returns a handle whose ``remove()`` detaches it.

        With ``relative_step=True`` this also records every direction before
        each step (one extra copy of the directions in memory) and, after it,
        rescales the step to ``lr x R`` with ``lr`` read from each
        direction's param group at that step (divided by
        ``"mdparam_lr_scale"`` where :func:`muon_param_groups` set one).
        """
        _, missing = self._groups_of(optimizer)
        if len(missing) == len(self.directions):
            raise ValueError(
                "mdparam.Retraction.attach: this optimizer holds none of the model's directions. "
                "Build it from mdparam.param_groups(model, ...) after mdparam.register(model) "
                "(and after fully_shard/DDP), build the Retraction after that too, and attach it "
                "to the optimizer that steps the directions"
            )
        if not self.relative_step:

            def post(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
                self()

            return _Handles(self, [optimizer.register_step_post_hook(post)])

        self._prepare_relative(optimizer)

        def pre(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            with torch.no_grad():
                for prev, d in zip(self._previous, self._relative_only(self.directions)):
                    prev.copy_(d.to_local() if self.sharded else d)

        def post(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._after_step()

        handles = [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]
        return _Handles(self, handles)


class _Handles:
    """Removes the hooks :meth:`Retraction.attach` added, like a RemovableHandle."""

    def __init__(self, owner: Retraction, handles: list[RemovableHandle]) -> None:
        self.owner = owner
        self.handles = handles
        owner._attached += 1

    def remove(self) -> None:
        if self.handles:
            for h in self.handles:
                h.remove()
            self.handles = []
            self.owner._attached -= 1
