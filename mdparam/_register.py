"""Putting the parametrization on a module tree, taking it off, re-initialising it.

``register`` runs in three steps: *plan* (walk the tree, pick the layers,
resolve each layer's ``mdparam._options.Options``, decide what to do with tied
weights), *validate* (every planned tensor, before anything changes) and
*apply* (parametrize each, undoing all of it if one fails).
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._adapters import adapter_for
from ._forward import install_forward, uninstall_forward
from ._fused_weights import refresh_kept
from ._gains import gain_kind_of
from ._kinds import check_choice
from ._layouts import layout_of
from ._options import DEFAULTS, OPTION_NAMES, Options
from ._parametrization import MagnitudeDirection, MDConfig, absorb_hint
from ._sphere import resolve_radius, sphere_of
from ._tree import (
    check_not_wrapped,
    md_parametrization,
    original_name,
    registered,
    tie_map,
)

__all__ = ["register", "reinitialize", "remove"]

TIED = ("skip", "share", "error")

Selector = str | Iterable[str] | Callable[[str, nn.Module], bool] | None
LayerKinds = str | type | Iterable[type | str]
Matcher = Callable[[str, nn.Module], bool]


@dataclass
class Planned:
    """One tensor register will parametrize, with its resolved options."""

    name: str  # qualified tensor name
    module: nn.Module
    tensor_name: str
    layout: str
    options: Options
    share_with: Planned | None = None  # tied="share": use this holder's originals


# --- plan ----------------------------------------------------------------------------------


def _as_matcher(selector: Selector, what: str) -> Callable[[str, str, nn.Module], bool] | None:
    if selector is None:
        return None
    if callable(selector):
        return lambda mod_name, tensor_qualname, mod: bool(selector(mod_name, mod))
    patterns = [selector] if isinstance(selector, str) else list(selector)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"{what} must be a glob string, a list of glob strings or a predicate "
            f"(name, module) -> bool, got {selector!r}"
        )
    return lambda mod_name, tensor_qualname, mod: any(
        fnmatch.fnmatchcase(mod_name, p) or fnmatch.fnmatchcase(tensor_qualname, p)
        for p in patterns
    )


def _kind_matcher(kinds: LayerKinds, what: str) -> Matcher:
    if kinds == "all":
        return lambda name, mod: True
    items = [kinds] if isinstance(kinds, str | type) else list(kinds)
    for k in items:
        if not (isinstance(k, str) or (isinstance(k, type) and issubclass(k, nn.Module))):
            raise TypeError(
                f"{what} takes nn.Module types or glob strings on module names, got {k!r}"
            )
    types = tuple(k for k in items if isinstance(k, type))
    globs = [k for k in items if isinstance(k, str)]
    return lambda name, mod: (
        isinstance(mod, types) or any(fnmatch.fnmatchcase(name, g) for g in globs)
    )


def _overrides(
    overrides: Mapping[type | str, Mapping[str, object]] | None,
) -> list[tuple[Matcher, Options]]:
    out = []
    for kind, values in (overrides or {}).items():
        bad = [k for k in values if k not in OPTION_NAMES]
        if bad:
            raise ValueError(
                f"overrides for {kind!r}: unknown options {bad}; choose from {list(OPTION_NAMES)}"
            )
        options = Options(**values)
        options.check_values()
        out.append((_kind_matcher(kind, "overrides"), options))
    return out


def _layer_options(
    name: str, mod: nn.Module, call: Options, overrides: list, kind_defaults: Options
) -> Options:
    """The call's options, then overrides (later first), the kind's defaults, the globals."""
    opts = call
    for match, values in reversed(overrides):
        if match(name, mod):
            opts = opts.fill(values)
    return opts.fill(kind_defaults).fill(DEFAULTS)


def _check_combination(opts: Options, where: str) -> None:
    """One layer's options together: preserve needs gains that take up the sphere's norm."""
    sphere = sphere_of(opts.sphere)
    if (
        opts.init == "preserve"
        and opts.radius != "init"
        and not sphere.can_absorb(gain_kind_of(opts.gains))
    ):
        raise ValueError(
            f"init='preserve' keeps the model's function, but gains={opts.gains!r} cannot take "
            f"up the norm that the {opts.sphere!r} sphere removes{where}. {absorb_hint(sphere)}"
        )


def _select(
    model: nn.Module,
    call: Options,
    take: Matcher,
    overrides: list,
    include: Selector,
    exclude: Selector,
) -> tuple[list[Planned], list[str]]:
    """(the tensors chosen, every supported tensor's name) with per-layer options."""
    include_fn = _as_matcher(include, "include")
    exclude_fn = _as_matcher(exclude, "exclude")
    supported, selected = [], []
    for mod_name, mod in model.named_modules():
        adapter = adapter_for(mod)
        if adapter is None or not take(mod_name, mod):
            continue
        opts = _layer_options(mod_name, mod, call, overrides, adapter.defaults)
        for tensor_name, layout in adapter.tensors:
            qual = f"{mod_name}.{tensor_name}" if mod_name else tensor_name
            supported.append(qual)
            if include_fn is not None and not include_fn(mod_name, qual, mod):
                continue
            if exclude_fn is not None and exclude_fn(mod_name, qual, mod):
                continue
            _check_combination(opts, f" of {mod_name or '<root>'!r} ({type(mod).__name__})")
            selected.append(Planned(qual, mod, tensor_name, layout, opts))
    return selected, supported


def _nothing_selected(layers: object, include: Selector, exclude: Selector, supported, model):
    if not supported:
        return ValueError(
            f"mdparam.register found no layer of the kinds asked for (layers={layers!r}) in "
            f"{type(model).__name__}; nothing to parametrize. Other kinds: layers='all', or "
            "mdparam.register_adapter for your own"
        )
    shown = ", ".join(supported[:6]) + (", ..." if len(supported) > 6 else "")
    return ValueError(
        f"mdparam.register: no layer matched include={include!r} exclude={exclude!r}. "
        f"Patterns are globs on qualified names; supported layers here: {shown}"
    )


def _resolve_ties(model: nn.Module, selected: list[Planned], tied: str) -> list[Planned]:
    """Apply the ``tied`` policy: skip (and warn), share one set of originals, or raise."""
    holders = tie_map(model)
    plan: list[Planned] = []
    skipped: list[str] = []
    planned: set[int] = set()
    for item in selected:
        t = getattr(item.module, item.tensor_name)
        others = [
            h for h in holders.get(id(t), []) if h[1] is not item.module or h[2] != item.tensor_name
        ]
        if not others:
            plan.append(item)
            continue
        names = ", ".join(h[0] for h in others)
        if tied == "error":
            raise RuntimeError(
                f"mdparam.register: {item.name!r} is tied to [{names}] (same Parameter). Pass "
                "tied='skip' to leave it plain or tied='share' to parametrize all holders together"
            )
        if tied == "skip":
            skipped.append(f"{item.name} (tied to {names})")
        elif id(t) not in planned:
            planned.add(id(t))
            plan.append(item)
            for qual, mod, tname in others:
                plan.append(Planned(qual, mod, tname, item.layout, item.options, share_with=item))
    if skipped:
        warnings.warn(
            "mdparam.register left out tied weights, which stay plain and tied: "
            + "; ".join(skipped)
            + ". To decouple them too, pass tied='share' (every holder then uses one "
            "direction and one set of gains)",
            stacklevel=3,
        )
    if not plan:
        raise ValueError(
            "mdparam.register: every matched layer is tied to another tensor and was left out; "
            "pass tied='share' to parametrize tied weights"
        )
    return plan


# --- validate ------------------------------------------------------------------------------


def _validate(plan: list[Planned]) -> None:
    """Check every planned tensor before anything changes."""
    for item in plan:
        mod, tname, qual = item.module, item.tensor_name, item.name
        if md_parametrization(mod, tname) is not None:
            raise RuntimeError(
                f"mdparam.register: {qual!r} is already registered. Call mdparam.remove(model) "
                "first to start over, or exclude it"
            )
        if parametrize.is_parametrized(mod, tname):
            other = type(mod.parametrizations[tname][0]).__name__
            raise RuntimeError(
                f"mdparam.register: {qual!r} already carries another parametrization "
                f"({other}); remove it first or exclude this layer"
            )
        t = getattr(mod, tname)
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(
                f"mdparam.register: {qual!r} has dtype {getattr(t, 'dtype', type(t))}, not a "
                "floating-point tensor (quantized layer?); exclude it"
            )
        if t.numel() == 0:
            raise ValueError(
                f"mdparam.register: {qual!r} is empty (shape {tuple(t.shape)}); exclude it"
            )
        try:
            layout_of(item.layout).matrix_shape(t.shape)
        except ValueError as e:
            raise ValueError(
                f"mdparam.register: {qual!r} has shape {tuple(t.shape)}, not a matrix as "
                f"layout {item.layout!r} needs ({e}); exclude it"
            ) from None


# --- apply ---------------------------------------------------------------------------------


def _apply(plan: list[Planned]) -> None:
    """Parametrize every planned tensor; on any failure put back what was already done."""
    done: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for item in plan:
            original = getattr(item.module, item.tensor_name)
            try:
                _register_one(item)
            except ValueError as e:
                raise ValueError(f"mdparam.register: {item.name!r}: {e}") from None
            done.append((item.module, item.tensor_name, original))
            if item.share_with is not None:  # point this holder at the first holder's originals
                lead = item.share_with.module.parametrizations[item.share_with.tensor_name]
                this = item.module.parametrizations[item.tensor_name]
                for i in range(lead.ntensors):
                    setattr(this, original_name(i), getattr(lead, original_name(i)))
    except BaseException:
        for mod, tensor_name, original in reversed(done):
            _unparametrize(mod, tensor_name, original)
        raise


def _register_one(item: Planned) -> None:
    opts = item.options
    weight = getattr(item.module, item.tensor_name)
    matrix = layout_of(item.layout).to_matrix(weight.detach())
    r = resolve_radius(opts.radius, matrix, sphere_of(opts.sphere))
    if opts.radius_scale != 1.0:
        r = r * opts.radius_scale
    config = MDConfig(
        gains=opts.gains,
        sphere=opts.sphere,
        gain_map=opts.gain_map,
        layout=item.layout,
        shape=tuple(weight.shape),
        radius=r if isinstance(r, float) else None,
    )
    param = MagnitudeDirection(config, None if isinstance(r, float) else r)
    param.init = opts.init
    param.radius_scale = float(opts.radius_scale)
    param.opaque_fuse = opts.fuse == "opaque"
    with param.assigning(opts.init):
        parametrize.register_parametrization(item.module, item.tensor_name, param)
    if item.tensor_name == "weight":
        install_forward(item.module, opts.forward)


# --- the public entry points ---------------------------------------------------------------


def register(
    model: nn.Module,
    *,
    gains: str | None = None,
    sphere: str | None = None,
    radius: str | float | None = None,
    radius_scale: float | None = None,
    gain_map: str | None = None,
    init: str | None = None,
    fuse: str | None = None,
    forward: str | None = None,
    include: Selector = None,
    exclude: Selector = None,
    tied: str = "skip",
    layers: LayerKinds = (nn.Linear,),
    overrides: Mapping[type | str, Mapping[str, object]] | None = None,
) -> list[str]:
    """Parametrize every nn.Linear of ``model`` as W = diag(phi(r)) . D . diag(phi(c)), in place.

    Register before building the optimizer (the originals are new Parameters),
    before ``torch.compile`` and before FSDP2's ``fully_shard``. Everything is
    checked before anything changes: on an error the model is as it was.

    Args:
        model: any nn.Module tree.
        gains: ``"rowcol"``, ``"row"``, ``"col"``, ``"scalar"`` or ``"none"``.
        sphere: ``"flat"`` (||D||_F = R), ``"row"`` or ``"col"``.
        radius: ``"shape"``, ``"init"`` or a positive number.
        radius_scale: a factor on the radius and on the direction's LR.
        gain_map: phi: ``"softplus"``, ``"identity"`` or ``"exp"``.
        init: ``"preserve"`` (the same function) or ``"sphere"`` (the paper's start).
        fuse: ``"traced"`` or ``"opaque"`` (faster cold compiles, slower steps).
        forward: for nn.Linear, ``"formed"``, ``"factored"`` or ``"auto"``.
            Each option above: the first value is the default; None leaves a
            layer kind's own (embeddings: row sphere, row gains); the guide
            docs/guides/trained-weights.md has a table of what each means.
        include: which layers, among the supported ones: a glob on the
            module's or the tensor's qualified name (``"blocks.*.attn.*"``), a
            list of globs, or a predicate ``(name, module) -> bool``.
        exclude: which layers not, in the same forms as ``include``.
        tied: a weight that is the same Parameter as another (a head tied to
            the embedding): ``"skip"`` leaves it plain and warns; ``"share"``
            parametrizes every holder with one direction and one set of gains;
            ``"error"`` raises.
        layers: module types and/or globs on module names, or ``"all"`` for
            every kind mdparam knows (docs/guides/layers.md lists them).
        overrides: ``{type or name glob: {option: value}}`` for the options
            this call leaves at None (e.g. ``{"*.attn.o": {"radius_scale": 0.2}}``).

    Returns:
        The qualified names of the tensors now parametrized.

    Examples:
        >>> import torch, mdparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        >>> x = torch.randn(3, 8)
        >>> before = model(x)
        >>> mdparam.register(model)
        ['0.weight', '2.weight']
        >>> torch.allclose(model(x), before, atol=1e-6)
        True
    """
    call = Options(
        gains=gains,
        sphere=sphere,
        radius=radius,
        radius_scale=radius_scale,
        gain_map=gain_map,
        init=init,
        fuse=fuse,
        forward=forward,
    )
    plan = _plan(model, call, include, exclude, tied, layers, overrides)
    _apply(plan)
    return [p.name for p in plan]


def _plan(
    model: nn.Module,
    call: Options,
    include: Selector,
    exclude: Selector,
    tied: str,
    layers: LayerKinds,
    overrides: Mapping[type | str, Mapping[str, object]] | None,
) -> list[Planned]:
    """What ``register`` will apply, every tensor validated; nothing changed yet."""
    check_choice("tied", tied, TIED)
    if not isinstance(model, nn.Module):
        raise TypeError(f"mdparam.register needs an nn.Module, got {type(model).__name__}")
    take = _kind_matcher(layers, "layers")
    override_list = _overrides(overrides)
    call.check_values()  # each value on its own fails fast; combinations per layer
    check_not_wrapped(model)
    selected, supported = _select(model, call, take, override_list, include, exclude)
    if not selected:
        raise _nothing_selected(layers, include, exclude, supported, model)
    _validate(selected)
    plan = _resolve_ties(model, selected, tied)
    _validate([p for p in plan if p.share_with is not None])
    return plan


def _unparametrize(mod: nn.Module, tensor_name: str, value: Tensor) -> None:
    """Replace a parametrized tensor by ``value`` without editing the injected class.

    torch's remove_parametrizations deletes the property from the class that
    parametrize injected, which a deepcopy shares with its original (the
    original then loses the attribute). Here the instance moves to a class of
    its own: its base class, or, when other tensors stay parametrized, a fresh
    copy of the injected class without this property.
    """
    if tensor_name == "weight":
        uninstall_forward(mod)
    cls = mod.__class__
    if len(mod.parametrizations) == 1:
        delattr(mod, "parametrizations")
        mod.__class__ = cls.__bases__[0]
    else:
        body = {
            k: v
            for k, v in cls.__dict__.items()
            if k not in (tensor_name, "__dict__", "__weakref__")
        }
        mod.__class__ = type(cls.__name__, cls.__bases__, body)
        del mod.parametrizations[tensor_name]
    if isinstance(value, nn.Parameter):
        mod.register_parameter(tensor_name, value)
    else:
        mod.register_buffer(tensor_name, value)


def remove(model: nn.Module) -> list[str]:
    """Fuse every MD-parametrized tensor back into a plain Parameter, in place.

    Tensors tied with ``tied="share"`` become one shared plain Parameter again.
    The new Parameters are not in any existing optimizer: call this after
    training, or rebuild the optimizer.

    Returns:
        The qualified names of the tensors that were fused.

    Examples:
        >>> import torch, mdparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = mdparam.register(model)
        >>> mdparam.remove(model)
        ['0.weight']
        >>> type(model[0]).__name__, sorted(n for n, _ in model.named_parameters())
        ('Linear', ['0.bias', '0.weight'])
    """
    entries = registered(model)
    plain_for: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        fused = [
            (e, e.direction, getattr(e.module, e.tensor_name).detach().clone()) for e in entries
        ]
    for e, direction, value in fused:
        shared = plain_for.get(id(direction))
        if shared is None:
            # under the fused step D takes no gradient itself, but the weight trains
            trains = direction.requires_grad or e.parametrization.fused is not None
            shared = nn.Parameter(value, requires_grad=trains)
            plain_for[id(direction)] = shared
        _unparametrize(e.module, e.tensor_name, shared)
    return [e.name for e in entries]


def reinitialize(model: nn.Module, fn: Callable[[nn.Module], None] | None = None) -> list[str]:
    """Run an initialisation on a registered model so that it takes effect.

    ``nn.Linear.reset_parameters()`` (and any ``init.normal_(m.weight)``) on a
    parametrized module writes into a freshly computed temporary and changes
    nothing. This runs the initialisation against the fused weights held in
    ``parametrize.cached()``, then assigns each result back through the
    parametrization as at registration: D projected, and the gains taking up
    the norm (``init="preserve"``) or set to 1 (``init="sphere"``).

    Args:
        model: a registered model.
        fn: called as ``model.apply(fn)``; None calls ``reset_parameters()``
            on every module that has one.

    This is also the meta-device path: build on ``"meta"``, ``register``,
    ``model.to_empty(device=...)``, then ``reinitialize(model)``.

    Examples:
        >>> import torch, mdparam
        >>> with torch.device("meta"):
        ...     model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = mdparam.register(model)
        >>> _ = model.to_empty(device="cpu")
        >>> _ = mdparam.reinitialize(model)
        >>> bool(torch.isfinite(model(torch.randn(2, 8))).all())
        True
    """
    entries = registered(model)
    with torch.no_grad(), parametrize.cached():
        if fn is None:
            for mod in model.modules():
                reset = getattr(mod, "reset_parameters", None)
                if callable(reset):
                    reset()
        else:
            model.apply(fn)
        values = [getattr(e.module, e.tensor_name).detach().clone() for e in entries]
    with torch.no_grad():
        for e, value in zip(entries, values):
            with e.parametrization.assigning(e.parametrization.init):
                setattr(e.module, e.tensor_name, value)
    refresh_kept(model)
    return [e.name for e in entries]
