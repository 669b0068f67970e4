"""The paper's from-scratch training recipe in one call: register, optimizers, schedule, clip.

``recipe`` is the path for training a model from its initialisation. It
registers the model with the paper's start (``init="sphere"``: every
direction the projected initial weight, every gain phi = 1), builds the base
optimizer(s) with the learning rates of each role, attaches the retraction,
sets a linear decay with no warmup, and clips the fused-weight gradient.

For a model whose weights are already trained (fine-tuning, or plain weights
loaded with ``mdparam.load_plain``), keep its function instead:
``mdparam.register(model)`` (``init="preserve"``, the default of
``mdparam.register``) and build the optimizer with
``mdparam.param_groups``.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._clipping import CLIP_SCOPES, clip_grad_norm_
from ._distributed import is_sharded
from ._fused_math import AdamHyper, MuonHyper
from ._fused_optim import FusedMDOptimizer
from ._fused_weights import FusedWeights
from ._kinds import Kinds, check_choice
from ._optim import GAIN_LR, MUON_OTHER_LR, muon_pair, param_groups
from ._register import register, remove
from ._retraction import Retraction
from ._tree import registered

__all__ = [
    "BASE_OPTIMIZERS",
    "EMBEDDING_MODES",
    "HEAD_MODES",
    "BaseOptimizer",
    "Recipe",
    "recipe",
    "register_for_recipe",
]

EMBEDDING_MODES = ("plain", "sphere")
HEAD_MODES = ("plain", "sphere", "sphere-gains")

# The authors' unit row sphere for embedding and head (their "embed row" setup).
_ROW_SPHERE = {"sphere": "row", "radius": 1.0, "init": "sphere"}


@dataclass
class Recipe:
    """What ``recipe`` built; ``step`` runs one optimizer step of it.

    Attributes:
        model: the registered model.
        optimizers: the base optimizer(s); the last holds the hidden
            directions and carries the retraction, so it steps last.
        schedulers: one LambdaLR per optimizer (linear decay, or constant).
        retraction: the ``mdparam.Retraction``, attached to the last
            optimizer (None with the fused step, which retracts itself).
        registered: the qualified names of the parametrized tensors.
        clip: the gradient-norm limit (None: no clipping).
        clip_scope: ``"fused"`` or ``"all"`` (see ``mdparam.clip_grad_norm_``).
        steps: the length of the linear decay (None: constant LRs).
        fused: the kept weights of the fused step (None: the step forms W in
            the forward, as with any optimizer).
        fallback: why the fused step was asked for but not used (None if it was).

    Examples:
        >>> import torch, mdparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        >>> train = mdparam.recipe(model, "adamw", lr=0.01, steps=100, compile=False)
        >>> model(torch.randn(4, 8)).square().mean().backward()
        >>> norm = train.step()  # the gradient norm before clipping
        >>> train.fused is not None, train.fallback
        (True, None)
    """

    model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]
    retraction: Retraction | None
    registered: list[str] = field(default_factory=list)
    clip: float | None = 1.0
    clip_scope: str = "fused"
    steps: int | None = None
    fused: FusedWeights | None = None
    fallback: str | None = None

    def __repr__(self) -> str:
        kind = "fused" if self.fused is not None else "formed"
        why = f", fallback={self.fallback!r}" if self.fallback else ""
        opts = ", ".join(type(o).__name__ for o in self.optimizers)
        return (
            f"Recipe(step={kind!r}{why}, optimizers=[{opts}], tensors={len(self.registered)}, "
            f"clip={self.clip}, steps={self.steps})"
        )

    def refresh(self) -> None:
        """After writing into directions or gains by hand: recompute the weights the forward
        reads (fused step only; nothing to do otherwise)."""
        if self.fused is not None:
            self.fused.refresh()

    def trainable(self) -> list[Tensor]:
        """Every tensor that takes a gradient in training: the optimizers' own, and the
        kept weights of the fused step (which the fused optimizer reads but does not hold)."""
        held = [p for o in self.optimizers for g in o.param_groups for p in g["params"]]
        kept = self.fused.weights() if self.fused is not None else []
        return [p for p in held if p.requires_grad] + kept

    def schedule(self, steps: int | None) -> None:
        """Decay every LR linearly to 0 over ``steps`` from the start (None: constant).

        For when the run's length is known only after ``recipe`` (Lightning's
        ``estimated_stepping_batches``, say); call it before the first step.
        """
        decay = _linear_decay(steps)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group.get("initial_lr", group["lr"])
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, decay) for o in self.optimizers]
        self.steps = steps

    def step(self) -> Tensor | None:
        """Clip, step every optimizer (the retraction runs last), advance the schedule,
        zero the gradients. Returns the gradient norm before clipping (None without clipping)."""
        norm = None
        if self.fused is not None:
            self.optimizers[0].step()  # clips inside
            norm = self.optimizers[0].last_norm
        elif self.clip is not None:
            norm = clip_grad_norm_(self.model, self.clip, scope=self.clip_scope)
        if self.fused is None:
            for opt in self.optimizers:
                opt.step()
        for sched in self.schedulers:
            sched.step()
        self.zero_grad()
        return norm

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """Optimizer and scheduler state, to save beside ``mdparam.save_training``."""
        return {
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError(
                f"this recipe has {len(self.optimizers)} optimizer(s), the state "
                f"{len(state['optimizers'])}; build the recipe with the same base optimizer"
            )
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)
        for sch, s in zip(self.schedulers, state["schedulers"]):
            sch.load_state_dict(s)


def _register_options(
    embeddings: str,
    head: str | None,
    head_mode: str,
    radius_scale: Mapping[str, float] | None,
    init: str,
) -> dict[str, Any]:
    """register() arguments for the chosen treatment of embeddings, head and radii.

    ``init`` is how the hidden matrices start; embeddings and head on a unit
    sphere always start on it (without gains there is nothing that could keep
    their function). Later overrides win.
    """
    overrides: dict[Any, dict[str, object]] = {nn.Linear: {"init": init}}
    layers: list[Any] = [nn.Linear]
    for glob, scale in (radius_scale or {}).items():
        overrides[glob] = {"radius_scale": scale}
    if embeddings == "sphere":
        layers.append(nn.Embedding)
        overrides[nn.Embedding] = {**_ROW_SPHERE, "gains": "none"}
    kw: dict[str, Any] = {"layers": layers, "overrides": overrides}
    if head is not None:
        if head_mode == "plain":
            kw["exclude"] = head
        else:
            gains = "rowcol" if head_mode == "sphere-gains" else "none"
            overrides[head] = {**overrides.get(head, {}), **_ROW_SPHERE, "gains": gains}
    return kw


def _split_directions(
    model: nn.Module, head: str | None
) -> tuple[list[nn.Parameter], list[nn.Parameter], list[str]]:
    """(hidden directions, embedding/head directions, names of the hidden ones)."""
    hidden, aux, names = [], [], []
    seen: set[int] = set()
    for e in registered(model):
        if id(e.direction) in seen:
            continue
        seen.add(id(e.direction))
        mod_name = e.name.rsplit(".", 1)[0] if "." in e.name else ""
        is_aux = isinstance(e.module, nn.Embedding) or (
            head is not None
            and (fnmatch.fnmatchcase(mod_name, head) or fnmatch.fnmatchcase(e.name, head))
        )
        if is_aux:
            aux.append(e.direction)
        else:
            hidden.append(e.direction)
            names.append(e.name)
    return hidden, aux, names


def _linear_decay(steps: int | None):
    if steps is None:
        return lambda step: 1.0
    if steps < 1:
        raise ValueError(
            f"mdparam.recipe: steps must be >= 1 (or None for a constant LR), got {steps}"
        )
    return lambda step: max(0.0, 1.0 - step / steps)


@dataclass(frozen=True)
class BaseOptimizer:
    """A base optimizer of the recipe, with the treatment of embeddings and head that
    measured best with it (docs/reproduction.md, "What each default is worth")."""

    name: str
    head_mode: str
    embeddings: str
    other_lr: float  # AdamW's LR for embeddings, head and norms

    def build(
        self, model: nn.Module, hidden: list, aux: list, lrs: dict, relative: bool, options: dict
    ) -> list[torch.optim.Optimizer]:
        """The optimizers, the one holding the hidden directions last."""
        aux_group = [
            {"params": aux, "lr": lrs["other"], "weight_decay": 0.0, "mdparam_role": "direction"}
        ][: bool(aux)]
        if self.name == "muon":  # the code and defaults of mdparam.muon_optimizers
            muon, adamw = muon_pair(
                model,
                lrs["direction"],
                lrs["gain"],
                lrs["other"],
                other_weight_decay=0.0,
                muon_options=options.get("muon"),
                adamw_options=options.get("adamw"),
                directions=hidden,
                extra_groups=aux_group,
            )
            return [adamw, muon]
        groups = param_groups(
            model,
            lr=lrs["direction"],
            gain_lr=lrs["gain"],
            other_lr=lrs["other"],
            other_weight_decay=0.0,
        )
        aux_ids = {id(p) for p in aux}
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) not in aux_ids]
        groups = [g for g in groups if g["params"]] + aux_group
        return [torch.optim.AdamW(groups, **options.get("adamw", {}))]


base_optimizer_of: Kinds[BaseOptimizer] = Kinds("optimizer", BaseOptimizer)
# Muon: embeddings and head on a unit row sphere, the head with gains (the authors'
# "embed row" setup); AdamW: both plain. The AdamW LR of embeddings, head and norms
# per base optimizer. Each choice is a row of benchmarks/ablation.py.
base_optimizer_of.add(
    BaseOptimizer("muon", head_mode="sphere-gains", embeddings="sphere", other_lr=MUON_OTHER_LR)
)
base_optimizer_of.add(BaseOptimizer("adamw", head_mode="plain", embeddings="plain", other_lr=3e-2))
BASE_OPTIMIZERS = base_optimizer_of.names


def recipe(
    model: nn.Module,
    optimizer: str = "muon",
    *,
    lr: float,
    steps: int | None = None,
    gain_lr: float = GAIN_LR,
    other_lr: float | None = None,
    relative_step: bool = True,
    clip: float | None = 1.0,
    clip_scope: str = "fused",
    head: str | None = None,
    head_mode: str | None = None,
    embeddings: str | None = None,
    radius_scale: Mapping[str, float] | None = None,
    init: str = "sphere",
    include: Any = None,
    exclude: Any = None,
    muon_options: Mapping[str, Any] | None = None,
    adamw_options: Mapping[str, Any] | None = None,
    fused: bool = True,
    compile: bool = True,
) -> Recipe:
    """Register ``model`` with the paper's start and build its training step, in one call.

    For training from scratch. A model already registered (``mdparam.register``,
    or ``register_for_recipe`` then sharded) is used as it is; else ``model`` is
    registered with ``register_for_recipe``, which takes and documents ``head``,
    ``head_mode``, ``embeddings``, ``radius_scale``, ``init``, ``include`` and
    ``exclude``.

    Args:
        model: an nn.Module; registered here, in place, unless it already is.
        optimizer: ``"muon"`` (Muon on the hidden directions with the paper's
            step, AdamW on the rest) or ``"adamw"``.
        lr: the hidden directions' LR: their relative step per step with Muon,
            and with AdamW when ``relative_step`` (else a per-element step).
        steps: the run's length: linear decay to 0, no warmup (None: constant).
        gain_lr: AdamW's LR for the raw gains.
        other_lr: AdamW's LR for everything else (embeddings, norms, biases,
            head); None takes the base optimizer's own: 1e-2 with Muon, 3e-2
            with AdamW.
        relative_step: AdamW only: the hidden directions step by ``lr x R``.
        clip: the gradient-norm limit (None: off).
        clip_scope: what ``clip`` measures: the fused weights (``"fused"``)
            or all leaves (``"all"``).
        muon_options: more keyword arguments for Muon.
        adamw_options: more keyword arguments for AdamW.
        fused: the fused step (docs/guides/from-scratch.md). Where it cannot
            train the model, the recipe warns once, says why in ``repr`` and
            forms W in the forward.
        compile: compile the step (``False``: eager).

    Examples:
        >>> import torch, mdparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
        >>> train = mdparam.recipe(model, "adamw", lr=0.02, steps=100)
        >>> for _ in range(3):
        ...     model(torch.randn(16, 8)).square().mean().backward()
        ...     _ = train.step()  # clip, step, retract, schedule, zero grads
        >>> [round(float(mdparam.registered(model)[i].direction.norm()), 3) for i in (0, 1)]
        [5.657, 5.657]
    """
    base = base_optimizer_of(optimizer)
    choices = dict(head_mode=head_mode, embeddings=embeddings, radius_scale=radius_scale)
    where = dict(init=init, include=include, exclude=exclude)
    names = [e.name for e in registered(model)] or register_for_recipe(
        model, base.name, head=head, **choices, **where
    )
    check_choice("clip_scope", clip_scope, CLIP_SCOPES, where="mdparam.recipe")
    other_lr = base.other_lr if other_lr is None else other_lr
    lrs = {"direction": lr, "gain": gain_lr, "other": other_lr}
    options = {"muon": dict(muon_options or {}), "adamw": dict(adamw_options or {})}
    made = _step_for(
        model, base, head, lrs, relative_step, clip, clip_scope, options, fused, compile
    )
    made.registered = names
    made.schedule(steps)
    return made


def _step_for(
    model: nn.Module,
    base: BaseOptimizer,
    head: str | None,
    lrs: dict,
    relative_step: bool,
    clip: float | None,
    clip_scope: str,
    options: dict,
    fused: bool,
    compile: bool,
) -> Recipe:
    """The fused step where it can train the model as asked, else the formed step (warned)."""
    hidden, aux, hidden_names = _split_directions(model, head)
    relative = base.name == "adamw" and relative_step
    fallback = _why_not_fused(model, clip_scope, options) if fused else None
    if fused and fallback is None:
        made = _fused_recipe(model, base.name, hidden, aux, lrs, relative, options, clip, compile)
    else:
        if fallback is not None:
            warnings.warn(
                f"mdparam.recipe: the fused step is not used ({fallback}); training forms W "
                "in the forward instead, which is slower per step",
                stacklevel=3,
            )
        made = _formed_recipe(model, base, hidden, aux, hidden_names, lrs, relative_step, options)
    made.clip, made.clip_scope, made.fallback = clip, clip_scope, fallback
    return made


def _fused_recipe(
    model: nn.Module,
    update: str,
    hidden: list,
    aux: list,
    lrs: dict,
    relative: bool,
    options: dict,
    clip: float | None,
    compile: bool,
) -> Recipe:
    """The fused step: kept weights and one FusedMDOptimizer, which clips at ``clip``."""
    kept = FusedWeights(model)
    groups = _fused_groups(model, kept, update, hidden, aux, lrs, relative)
    opt = FusedMDOptimizer(kept, groups, max_norm=clip, compile=compile, **_hypers(options))
    return Recipe(model, [opt], [], None, fused=kept)


def _formed_recipe(
    model: nn.Module,
    base: BaseOptimizer,
    hidden: list,
    aux: list,
    hidden_names: list[str],
    lrs: dict,
    relative_step: bool,
    options: dict,
) -> Recipe:
    """The step that forms W in the forward: torch's optimizers and the attached Retraction."""
    optimizers = base.build(model, hidden, aux, lrs, relative_step, options)
    relative = base.name == "adamw" and relative_step
    retraction = Retraction(model, relative_step=_in(set(hidden_names)) if relative else False)
    retraction.attach(optimizers[-1])  # holds the hidden directions, steps last
    return Recipe(model, optimizers, [], retraction)


_ADAMW_KEYS = {"betas", "eps", "weight_decay"}  # weight_decay: every group sets its own
_MUON_KEYS = {"momentum", "nesterov", "ns_coefficients", "ns_steps", "eps", "weight_decay"}


def _why_not_fused(model: nn.Module, clip_scope: str, options: dict) -> str | None:
    """Why the fused step cannot train this model as asked, or None."""
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        return "the model is wrapped in DDP already: build the recipe first, then wrap it"
    if any(is_sharded(p) for p in model.parameters()):
        return "the model is sharded (FSDP2 or tensor parallel)"
    if clip_scope != "fused":
        return f"clip_scope={clip_scope!r} needs the gradients of D and the gains themselves"
    extra = set(options["adamw"]) - _ADAMW_KEYS
    extra |= set(options["muon"]) - _MUON_KEYS
    if options["muon"].get("adjust_lr_fn") not in (None, "original"):
        extra.add("adjust_lr_fn")
    if extra:
        return f"optimizer options {sorted(extra)} are not implemented in it"
    return None


def _hypers(options: dict) -> dict[str, Any]:
    adam = {k: v for k, v in options["adamw"].items() if k in ("betas", "eps")}
    muon = {k: v for k, v in options["muon"].items() if k in _MUON_KEYS - {"weight_decay"}}
    if "betas" in adam:
        adam["betas"] = tuple(adam["betas"])
    if "ns_coefficients" in muon:
        muon["ns_coefficients"] = tuple(muon["ns_coefficients"])
    return {"adam": AdamHyper(**adam), "muon": MuonHyper(**muon)}


def _fused_groups(
    model: nn.Module,
    kept: FusedWeights,
    update: str,
    hidden: list,
    aux: list,
    lrs: dict,
    relative: bool,
) -> list[dict[str, Any]]:
    """The fused optimizer's groups: the same roles and LRs as the recipe's other step."""
    gains = [g for e in kept.entries for g in e.gains]
    md = {id(t) for e in kept.entries for t in (e.direction, *e.gains)}
    md |= {id(W) for W in kept.weights()}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in md]
    groups = [
        {
            "params": hidden,
            "lr": lrs["direction"],
            "mdparam_role": "direction",
            "update": update,
            "relative": relative,
        },
        {"params": aux, "lr": lrs["other"], "mdparam_role": "direction", "update": "adamw"},
        {"params": gains, "lr": lrs["gain"], "mdparam_role": "gain"},
        {"params": rest, "lr": lrs["other"], "mdparam_role": "other", "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def register_for_recipe(
    model: nn.Module,
    optimizer: str = "muon",
    *,
    head: str | None = None,
    head_mode: str | None = None,
    embeddings: str | None = None,
    radius_scale: Mapping[str, float] | None = None,
    init: str = "sphere",
    include: Any = None,
    exclude: Any = None,
) -> list[str]:
    """The registration half of ``recipe``, for when something must come between.

    FSDP2 and tensor parallelism go after registration and before the
    optimizer: ``register_for_recipe`` -> ``fully_shard`` /
    ``mdparam.parallelize_module`` -> ``recipe`` with the same
    ``head`` (it uses the registration it finds).

    Args:
        model: an nn.Module, registered in place.
        optimizer: the base optimizer the registration is for, as in ``recipe``.
        head: a glob naming the output layer (``"lm_head"``), never given to Muon.
        head_mode: the head ``"plain"``, on a unit row sphere (``"sphere"``),
            or on one with gains (``"sphere-gains"``); None: the base optimizer's.
        embeddings: ``"plain"`` or a unit row sphere (``"sphere"``); None:
            the base optimizer's.
        radius_scale: ``{module glob: factor}``: a smaller sphere and step
            (the authors: residual output projections by 1/sqrt(2 * n_layers)).
        init: how the hidden matrices start, ``"sphere"`` (the paper's) or
            ``"preserve"``; embeddings and head on a unit sphere start on it.
        include: which layers, as in ``mdparam.register``.
        exclude: which layers not, as in ``mdparam.register``.

    Examples:
        >>> import torch, mdparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        >>> mdparam.register_for_recipe(model, "adamw")
        ['0.weight', '1.weight']
        >>> # ... shard the model here ...
        >>> train = mdparam.recipe(model, "adamw", lr=0.01)
    """
    base = base_optimizer_of(optimizer)
    head_mode = base.head_mode if head_mode is None else head_mode
    embeddings = base.embeddings if embeddings is None else embeddings
    check_choice("head_mode", head_mode, HEAD_MODES, where="mdparam.recipe")
    check_choice("embeddings", embeddings, EMBEDDING_MODES, where="mdparam.recipe")
    kw = _register_options(embeddings, head, head_mode, radius_scale, init)
    kw["exclude"] = _all_excluded(kw.get("exclude"), exclude)
    names = register(model, include=include, **kw)
    if not _split_directions(model, head)[0]:
        remove(model)  # leave the model as it was
        raise ValueError(
            "mdparam.recipe: every registered layer is an embedding or the head; nothing is "
            "left for the hidden directions' optimizer. Check head= and include="
        )
    return names


def _in(names: set[str]):
    return lambda name: name in names


def _all_excluded(ours: str | None, theirs: Any) -> Any:
    """``exclude`` for register: the head (when left plain) and the caller's own."""
    if theirs is None or ours is None:
        return ours if theirs is None else theirs
    if callable(theirs):
        return lambda name, mod: fnmatch.fnmatchcase(name, ours) or bool(theirs(name, mod))
    return [ours, *([theirs] if isinstance(theirs, str) else theirs)]
