"""The post-step retraction: put every direction back on its sphere."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._distributed import norm_strategy
from ._layouts import Layout
from ._sphere import Sphere, norm_dtype
from ._tree import registered, unique_directions

__all__ = [
    "RelativeStep",
    "Retraction",
    "RetractionError",
    "RetractionGroups",
    "relative_step_",
    "retract_",
    "retract_grouped_",
]


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
    """A direction had a zero or non-finite norm, so it could not be rescaled.

    Examples:
        >>> import torch, mdparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = mdparam.register(model)
        >>> with torch.no_grad():
        ...     _ = model[0].parametrizations.weight.original0.fill_(float("nan"))
        >>> try:
        ...     mdparam.Retraction(model)()
        ... except mdparam.RetractionError:
        ...     print("refused")
        refused
    """


def retract_(
    directions: Sequence[Tensor],
    spheres: Sequence[Sphere],
    layouts: Sequence[Layout],
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
        m = layout.to_matrix(d)
        n = sphere.norm(m) if norms is None else norms[i]  # fp32 for bf16/fp16
        m.mul_(radius / n.clamp_min(_TINY))
        layout.write_back(m, d)
        used.append(n)
    return used


_TINY = 1e-30


class RetractionGroups:
    """Which directions the eager retraction rescales together, and which one by one.

    A direction that is one unit of its sphere (a flat sphere on a single
    matrix) is normed as a whole tensor. Neighbours of one dtype and device go
    in chunks of up to ``chunk_bytes`` (None: no limit, the default); each chunk
    takes its norms (a BLAS dot per fp32/fp64 tensor, else one
    ``_foreach_norm``), a few ops on the vector of norms and one
    ``_foreach_mul_``, instead of the four small ops per tensor, with Python in
    between, of the loop in ``retract_``. Row and column spheres, and
    batched matrices, keep the per-tensor path.

    Examples:
        >>> import torch
        >>> from mdparam._layouts import layout_of
        >>> from mdparam._retraction import RetractionGroups
        >>> from mdparam._sphere import sphere_of
        >>> ts = [torch.randn(4, 4), torch.randn(2, 3, 3), torch.randn(4, 4)]
        >>> spheres = [sphere_of(s) for s in ("flat", "flat", "row")]
        >>> layouts = [layout_of(n) for n in ("linear", "batched", "linear")]
        >>> g = RetractionGroups(ts, spheres, layouts)
        >>> g.chunks, g.rest  # batched: one norm per matrix; row: one per row
        ([[0]], [1, 2])
    """

    def __init__(
        self,
        directions: Sequence[Tensor],
        spheres: Sequence[Sphere],
        layouts: Sequence[Layout],
        chunk_bytes: int | None = None,
    ) -> None:
        self.chunks: list[list[int]] = []
        self.rest: list[int] = []
        size, key = 0, None
        for i, (d, sphere, layout) in enumerate(zip(directions, spheres, layouts)):
            if not sphere.whole_tensor(layout.matrix_shape(d.shape)):
                self.rest.append(i)
                continue
            nbytes = d.numel() * d.element_size()
            full = chunk_bytes is not None and size + nbytes > chunk_bytes
            if key != (d.dtype, d.device) or full:
                self.chunks.append([])
                size, key = 0, (d.dtype, d.device)
            self.chunks[-1].append(i)
            size += nbytes
        self._radii: dict[tuple, Tensor] = {}

    def radius_vector(self, radii: list[float | Tensor], like: Tensor) -> Tensor:
        """The radii of one chunk as a vector like its norms (cached while they are floats)."""
        if not all(isinstance(r, float) for r in radii):
            return torch.stack([torch.as_tensor(r).to(like).reshape(()) for r in radii])
        key = (tuple(radii), like.dtype, like.device)
        if key not in self._radii:
            self._radii[key] = torch.tensor(radii, dtype=like.dtype, device=like.device)
        return self._radii[key]


def retract_grouped_(
    directions: Sequence[Tensor],
    spheres: Sequence[Sphere],
    layouts: Sequence[Layout],
    radii: Sequence[float | Tensor],
    groups: RetractionGroups,
) -> list[Tensor]:
    """``retract_`` chunk by chunk (see ``RetractionGroups``): the same result up
    to rounding, the norms in the same order (0-d for whole-tensor directions)."""
    used: list[Tensor | None] = [None] * len(directions)
    for idx in groups.chunks:
        tensors = [directions[i] for i in idx]
        norms = _whole_norms(tensors)
        scales = groups.radius_vector([radii[i] for i in idx], norms) / norms.clamp_min(_TINY)
        torch._foreach_mul_(tensors, list(scales.unbind()))
        for i, n in zip(idx, norms.unbind()):
            used[i] = n
    if groups.rest:
        pick = groups.rest
        rest = retract_(
            [directions[i] for i in pick],
            [spheres[i] for i in pick],
            [layouts[i] for i in pick],
            [radii[i] for i in pick],
        )
        for i, n in zip(pick, rest):
            used[i] = n
    return used


def _whole_norms(tensors: list[Tensor]) -> Tensor:
    """Frobenius norm of each tensor (one dtype), as one vector.

    fp32/fp64 take a BLAS dot per tensor rather than ``_foreach_norm``: on two
    threads the dot splits the data between threads as the rescale that follows
    does, while the norm's reduction splits it otherwise, and writing lines the
    other core has just read cost 4-7x in some processes here
    (docs/guides/trained-weights.md, "Retraction"). Other dtypes are normed in fp32.
    """
    if tensors[0].dtype in (torch.float32, torch.float64):
        return torch.stack([_squared_norm(t) for t in tensors]).sqrt()
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=norm_dtype(tensors[0].dtype)))


def _squared_norm(t: Tensor) -> Tensor:
    """Sum of squares: a dot on the flat view, or (no flat view) the norm squared."""
    if t.is_contiguous():
        flat = t.view(-1)
        return torch.dot(flat, flat)
    return torch.linalg.vector_norm(t).square()  # no temporary the size of t


def relative_step_(
    directions: Sequence[Tensor],
    previous: Sequence[Tensor],
    spheres: Sequence[Sphere],
    layouts: Sequence[Layout],
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
            sphere.norm(layout.to_matrix(u))
            for u, sphere, layout in zip(previous, spheres, layouts)
        ]
    else:
        norms = norm_fn(list(previous))
    for d, u, layout, radius, lr, n in zip(directions, previous, layouts, radii, lrs, norms):
        m = layout.to_matrix(d)
        # D_prev + s U = D + (s - 1) U: one pass over D and U
        m.addcmul_(layout.to_matrix(u), lr * radius / n.clamp_min(_TINY) - 1)
        layout.write_back(m, d)


class Retraction:
    """Callable that puts every direction of a registered model back on its sphere.

    Eagerly, the directions that are one unit of their sphere (flat spheres)
    are normed together and rescaled by one ``_foreach_mul_`` per dtype;
    row and column spheres are normed and
    rescaled one tensor at a time. ``compile=True`` captures the per-tensor pass with
    ``torch.compile(fullgraph=True, dynamic=False)``, once, on first call.
    ``compile="auto"`` (default) compiles on accelerators, where one graph
    saves a kernel launch per tensor, and runs eagerly on the CPU, where
    inductor's single fused kernel norms every tensor before rescaling any and
    so re-reads them from memory (docs/guides/trained-weights.md, "Retraction", has the
    measurements). bf16/fp16 directions are normed and rescaled in fp32.
    Under FSDP2 the norms of sharded directions are reduced across ranks.

    Build it after ``mdparam.register`` and call it after every optimizer
    step, or let ``attach`` do that.

    ``relative_step=True`` makes the direction's learning rate the relative
    step for any base optimizer: after each step, the step the optimizer took
    is rescaled to length ``lr x R`` (per row or column for row/col spheres)
    before the retraction, D <- retract(D_prev + lr R U / ||U||). This is the
    Hyperball-style normalised update; Muon (``mdparam.muon_optimizers``)
    is already relative and does not need it. It costs one copy of the
    directions in memory and three more passes over them per step. A glob
    on direction names, a list of globs or a predicate ``name -> bool``
    instead of True limits it to those directions (say, the hidden matrices
    but not an embedding on a row sphere, whose rows mostly get no
    gradient and would all be moved by ``lr`` anyway); the rest are only
    retracted.

    A direction of zero norm stays zero (not NaN). With ``check=True``
    (default) a zero or non-finite norm (a diverged step) raises
    ``RetractionError`` naming the layers; the check reads one flag back
    from the device per call, which ``check=False`` avoids on a GPU.

    Examples:
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
        entries = unique_directions(registered(model))
        if not entries:
            raise ValueError(
                "mdparam.Retraction: the model has no MD-parametrized tensor; call "
                "mdparam.register(model) first"
            )
        self.names = [e.name for e in entries]
        self.directions: list[nn.Parameter] = [e.direction for e in entries]
        self.spheres = [e.config.geometry.sphere for e in entries]
        self.layouts = [e.config.geometry.layout for e in entries]
        self._params = [e.parametrization for e in entries]  # radii are read at every call
        self.norms = norm_strategy(self.directions, self.spheres, self.layouts)
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
        if compile == "auto":
            compile = self.directions[0].device.type != "cpu" and not self.norms.sharded
        if compile and self.norms.sharded:
            raise ValueError(
                "mdparam.Retraction: compile=True is not supported for sharded (FSDP2 or "
                "tensor-parallel) directions; use compile=False (or 'auto')"
            )
        self.compiled = bool(compile)
        self.check = check
        self._fn = torch.compile(retract_, fullgraph=True, dynamic=False) if compile else retract_
        self.groups = RetractionGroups(self.directions, self.spheres, self.layouts)
        chosen = _relative_indices(relative_step, self.names)
        self.relative = RelativeStep(self, chosen, compile=self.compiled) if chosen else None
        self.calls = 0  # retractions run (a public seam for tests and logs)
        self.handles: list[_Handles] = []  # one per attach() not yet removed

    @property
    def sharded(self) -> bool:
        return self.norms.sharded

    @property
    def relative_step(self) -> bool:
        """Whether any direction takes the relative step."""
        return self.relative is not None

    @property
    def all_reduces(self) -> int:
        """Collectives issued for sharded norms so far (0 when nothing is sharded)."""
        rel = self.relative.norms.all_reduces if self.relative is not None else 0
        return self.norms.all_reduces + rel

    @property
    def attached(self) -> bool:
        """Whether an optimizer hook runs this retraction (see ``attach``)."""
        return bool(self.handles)

    def radii(self) -> list[float | Tensor]:
        """Each direction's radius now (a float, or this rank's part of a radius tensor)."""
        return [
            self.norms.radius(d, lay, p.sphere_radius())
            for d, lay, p in zip(self.directions, self.layouts, self._params)
        ]

    def local(self) -> list[Tensor]:
        """This rank's part of every direction (the directions themselves when unsharded)."""
        return [self.norms.local(d) for d in self.directions]

    def retract_tensors(self, relative_lrs: Sequence[Tensor | float] | None = None) -> list[Tensor]:
        """The retraction's tensor work, with no checks and no Python-side state.

        With ``relative_lrs`` (one per relative-step direction: its group's LR at
        this step), the recorded step is rescaled first.
        Returns the norms used, for ``check_norms``. This is what a
        compiled optimizer step captures (``mdparam.compile_step``).
        """
        local, radii = self.local(), self.radii()
        if relative_lrs is not None and self.relative is not None:
            self.relative.apply(local, radii, relative_lrs)
        if torch.compiler.is_compiling():  # inside a traced step: one fused graph
            return retract_(local, self.spheres, self.layouts, radii, self.norms.norms(local))
        if not self.compiled and not self.norms.sharded:
            return retract_grouped_(local, self.spheres, self.layouts, radii, self.groups)
        return self._fn(local, self.spheres, self.layouts, radii, self.norms.norms(local))

    @torch.no_grad()
    def __call__(self) -> None:
        """Retract every direction (after the relative step, if one was recorded); check norms."""
        lrs = None
        if self.relative is not None:
            lrs = self.relative.take_recorded()
        norms = self.retract_tensors(lrs)
        self.calls += 1
        if self.check:
            self.check_norms(norms)

    def check_norms(self, norms: list[Tensor]) -> None:
        """Raise ``RetractionError`` if any norm the retraction saw was zero or not finite.

        Sharded directions whose norms are local to a rank (row spheres split by
        rows) agree on the outcome through one small all-reduce, so that every
        rank raises together rather than one rank leaving the others waiting.
        """
        bad_here = not _all_positive_finite(norms)
        if self.norms.agree(bad_here, norms[0].device) and not bad_here:
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

    def missing(self, optimizer: torch.optim.Optimizer) -> list[str]:
        """Names of the directions ``optimizer`` does not hold."""
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        return [n for n, d in zip(self.names, self.directions) if id(d) not in held]

    def attach(self, optimizer: torch.optim.Optimizer) -> _Handles:
        """Run the retraction after every ``optimizer.step()``.

        ``optimizer`` must hold the directions (with Muon's recipe, attach to
        the Muon optimizer). Returns a handle whose ``remove()`` detaches it.

        With ``relative_step`` this also records those directions before
        each step (one extra copy of them in memory) and, after it, rescales
        the step to ``lr x R`` with ``lr`` read from each direction's param
        group at that step (divided by ``"mdparam_lr_scale"`` where
        ``mdparam.muon_optimizers`` or ``mdparam.param_groups`` set one).
        """
        if len(self.missing(optimizer)) == len(self.directions):
            raise ValueError(
                "mdparam.Retraction.attach: this optimizer holds none of the model's directions. "
                "Build it from mdparam.param_groups(model, ...) after mdparam.register(model) "
                "(and after fully_shard/DDP), build the Retraction after that too, and attach it "
                "to the optimizer that steps the directions"
            )

        def post(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self()

        if self.relative is None:
            return _Handles(self, [optimizer.register_step_post_hook(post)])
        self.relative.bind(optimizer)

        def pre(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.relative.record()

        handles = [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]
        return _Handles(self, handles)


class RelativeStep:
    """The relative step of some directions: D <- D_prev + lr R U / ||U||, U = D - D_prev.

    ``bind`` reads each direction's learning rate from the optimizer's
    groups; ``record`` keeps D before a step; the owning
    ``Retraction`` then applies the rescaled step before it retracts.
    """

    def __init__(self, owner: Retraction, indices: list[int], *, compile: bool = False) -> None:
        self.indices = indices
        self.names = [owner.names[i] for i in indices]
        self.directions = [owner.directions[i] for i in indices]
        self.spheres = [owner.spheres[i] for i in indices]
        self.layouts = [owner.layouts[i] for i in indices]
        self.norms = norm_strategy(self.directions, self.spheres, self.layouts)
        self.covers_all = len(indices) == len(owner.directions)
        self.previous: list[Tensor] | None = None
        self.recorded = False
        # The optimizer and each direction's group index, not the group dicts:
        # optimizer.load_state_dict replaces the dicts (a resume), the indices stay.
        self._optimizer: torch.optim.Optimizer | None = None
        self._group_index: list[int] = []
        self._lrs: list[Tensor] = []  # one 0-d tensor per group, filled from it before a step
        self._lr_sources: list[tuple[int, Tensor]] = []
        self._fn = (
            torch.compile(relative_step_, fullgraph=True, dynamic=False)
            if compile
            else relative_step_
        )

    def bind(self, optimizer: torch.optim.Optimizer) -> list[Tensor]:
        """Read the learning rates from ``optimizer``; allocate the record of D. Returns it."""
        group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        missing = [n for n, d in zip(self.names, self.directions) if id(d) not in group_of]
        if missing:
            raise ValueError(
                f"mdparam.Retraction(relative_step=...): the optimizer does not hold the "
                f"directions of {missing[:3]}; in relative-step mode one optimizer must step "
                "every direction that takes the relative step"
            )
        self._optimizer = optimizer
        self._group_index = [group_of[id(d)] for d in self.directions]
        by_group: dict[int, Tensor] = {}
        self._lr_sources, self._lrs = [], []
        for d, i in zip(self.directions, self._group_index):
            if i not in by_group:
                by_group[i] = torch.zeros((), dtype=torch.float32, device=d.device)
                self._lr_sources.append((i, by_group[i]))
            self._lrs.append(by_group[i])
        local = [self.norms.local(d) for d in self.directions]
        self.previous = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in local]
        return self.previous

    def copy_previous(self) -> None:
        """D into the record (tensor work only: a compiled step captures it)."""
        for prev, d in zip(self.previous, self.directions):
            prev.copy_(self.norms.local(d))

    @torch.no_grad()
    def record(self) -> None:
        """Keep D before the step the optimizer is about to take."""
        if self.previous is None:
            raise RuntimeError(
                "mdparam.Retraction(relative_step=...) needs the directions from before "
                "the step: use retract.attach(optimizer), which records them"
            )
        self.copy_previous()
        self.recorded = True

    def mark_recorded(self) -> None:
        """Say that ``copy_previous`` ran (inside a compiled step)."""
        self.recorded = True

    def current_lrs(self) -> list[Tensor | float]:
        """Each direction's relative step now: its group's lr over any ``mdparam_lr_scale``."""
        return [_relative_lr(self._optimizer.param_groups[i]) for i in self._group_index]

    def take_recorded(self) -> list[Tensor] | None:
        """The learning rates for the recorded step (once per step), or None if none was."""
        if self.previous is None:
            raise RuntimeError(
                "mdparam.Retraction(relative_step=...) needs the directions from before "
                "the step: use retract.attach(optimizer), which records them"
            )
        if not self.recorded:
            return None
        self.recorded = False
        for i, lr in self._lr_sources:
            lr.fill_(_relative_lr(self._optimizer.param_groups[i]))
        return self._lrs

    def apply(
        self, local: list[Tensor], radii: list[float | Tensor], lrs: Sequence[Tensor | float]
    ) -> None:
        """Rescale the recorded step of the chosen directions (``local``, ``radii``: all)."""
        pick = self.indices
        norm_fn = self.norms.norms if self.norms.sharded else None
        fn = relative_step_ if torch.compiler.is_compiling() else self._fn
        fn(
            [local[i] for i in pick],
            self.previous,
            self.spheres,
            self.layouts,
            [radii[i] for i in pick],
            list(lrs),
            norm_fn,
        )


def _all_positive_finite(norms: list[Tensor]) -> bool:
    """Whether every norm is > 0 and finite (one read back from the device)."""
    scalars = [n for n in norms if n.dim() == 0]  # stacked in one call, not reshaped one by one
    parts = [torch.stack(scalars)] if scalars else []
    flat = torch.cat(parts + [n.reshape(-1) for n in norms if n.dim() > 0])
    return bool(flat.log().isfinite().all())  # log: 0 -> -inf, inf -> inf, NaN -> NaN


def _relative_lr(group: dict) -> Tensor | float:
    """A group's LR as a relative step: over the ``mdparam_lr_scale`` the helpers set."""
    return group["lr"] / group.get("mdparam_lr_scale", 1.0)


class _Handles:
    """Removes the hooks ``Retraction.attach`` added, like a RemovableHandle."""

    def __init__(self, owner: Retraction, handles: list[RemovableHandle]) -> None:
        self.owner = owner
        self.handles = handles
        owner.handles.append(self)

    def remove(self) -> None:
        if self.handles:
            for h in self.handles:
                h.remove()
            self.handles = []
            self.owner.handles.remove(self)
