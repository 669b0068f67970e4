"""Putting the parametrization on a module tree, finding it again, taking it off."""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .adapters import adapter_for
from .maps import GAIN_MAPS
from .parametrization import GAINS, MagnitudeDirection, MDConfig, can_absorb
from .sphere import RADIUS_POLICIES, SPHERES, resolve_radius
from .views import matrix_shape, to_matrix

__all__ = [
    "Registered",
    "register",
    "registered",
    "reinitialize",
    "remove",
]

INITS = ("preserve", "sphere")
TIED = ("skip", "share", "error")

Selector = str | Iterable[str] | Callable[[str, nn.Module], bool] | None


@dataclass(frozen=True)
class Registered:
    """One parametrized tensor: where it lives and how it is parametrized."""

    name: str  # qualified tensor name, e.g. "blocks.0.attn.q.weight"
    module: nn.Module
    tensor_name: str
    parametrization: MagnitudeDirection

    @property
    def originals(self) -> tuple[Tensor, ...]:
        plist = self.module.parametrizations[self.tensor_name]
        return tuple(getattr(plist, f"original{i}") for i in range(plist.ntensors))

    @property
    def direction(self) -> nn.Parameter:
        return self.module.parametrizations[self.tensor_name].original0

    @property
    def gains(self) -> tuple[nn.Parameter, ...]:
        return self.originals[1:]

    @property
    def config(self) -> MDConfig:
        return self.parametrization.config


def _ours(module: nn.Module, tensor_name: str) -> MagnitudeDirection | None:
    if not parametrize.is_parametrized(module, tensor_name):
        return None
    first = module.parametrizations[tensor_name][0]
    return first if isinstance(first, MagnitudeDirection) else None


def registered(model: nn.Module) -> list[Registered]:
    """Every tensor of ``model`` that carries the MD parametrization, in module order.

    Names are qualified from ``model`` (so a compiled model's names start with
    ``_orig_mod.``). A tensor shared by several modules (``tied="share"``)
    appears once per module.
    """
    out = []
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        if not parametrize.is_parametrized(mod):
            continue
        for tensor_name in mod.parametrizations:
            p = _ours(mod, tensor_name)
            if p is not None:
                name = f"{mod_name}.{tensor_name}" if mod_name else tensor_name
                out.append(Registered(name, mod, tensor_name, p))
    return out


def unique_directions(entries: list[Registered]) -> list[Registered]:
    """``entries`` with each direction once (its first holder): tied="share" layers share one."""
    seen: set[int] = set()
    out = []
    for e in entries:
        if id(e.direction) not in seen:
            seen.add(id(e.direction))
            out.append(e)
    return out


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


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name}={value!r}; choose one of {choices}")


def _check_not_wrapped(model: nn.Module) -> None:
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise RuntimeError(
            "mdparam.register got a compiled model (torch.compile wraps it in _orig_mod). "
            "Register first, then compile: mdparam.register(model); "
            "model = torch.compile(model)"
        )
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        FSDPModule = ()  # noqa: N806
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        DTensor = ()  # noqa: N806
    for name, mod in model.named_modules():
        if (FSDPModule and isinstance(mod, FSDPModule)) or any(
            DTensor and isinstance(p, DTensor) for p in mod.parameters(recurse=False)
        ):
            raise RuntimeError(
                f"mdparam.register: module {name or '<root>'!r} is already sharded by FSDP2 "
                "(fully_shard). The supported order is register -> fully_shard -> optimizer "
                "-> Retraction: call mdparam.register on the model before fully_shard"
            )
        if getattr(mod, "_compiled_call_impl", None) is not None:
            raise RuntimeError(
                f"mdparam.register: module {name or '<root>'!r} was compiled in place "
                "(module.compile()). Register first, then compile"
            )


def _tie_map(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """Parameter id -> its holders (qualified name, module, attribute), one per module.

    A module that appears twice in the tree (reused) holds its weight once: that
    is not a tie. Two modules holding one Parameter are.
    """
    holders: dict[int, dict[tuple[int, str], tuple[str, nn.Module, str]]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for tname, p in mod._parameters.items():
            if p is not None:
                qual = f"{mod_name}.{tname}" if mod_name else tname
                holders.setdefault(id(p), {}).setdefault((id(mod), tname), (qual, mod, tname))
    return {k: list(v.values()) for k, v in holders.items()}


class _Default(str):
    """A default option value: a layer kind's own default may replace it."""


class _DefaultNumber(float):
    """A default numeric option value (see :class:`_Default`)."""


def _is_default(value: object) -> bool:
    return isinstance(value, _Default | _DefaultNumber)


def _plain(value: object) -> object:
    if isinstance(value, _Default):
        return str(value)
    return float(value) if isinstance(value, _DefaultNumber) else value


LayerKinds = str | type | Iterable[type | str]


def _kind_matcher(kinds: LayerKinds, what: str) -> Callable[[str, nn.Module], bool]:
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


def _options_for(
    name: str,
    mod: nn.Module,
    defaults: Mapping[str, object],
    explicit: dict[str, object],
    overrides: list,
) -> dict[str, object]:
    opts = dict(explicit)
    for match, values in overrides:  # later entries win
        if match(name, mod):
            opts.update({k: v for k, v in values.items() if _is_default(explicit.get(k))})
    for k, v in defaults.items():
        if _is_default(opts[k]):
            opts[k] = v
    return {k: _plain(v) for k, v in opts.items()}


def _check_values(opts: dict[str, object]) -> None:
    """Each option on its own: a known choice, or a valid radius number."""
    _check_choice(opts["gains"], "gains", GAINS)
    _check_choice(opts["sphere"], "sphere", SPHERES)
    _check_choice(opts["gain_map"], "gain_map", GAIN_MAPS)
    _check_choice(opts["init"], "init", INITS)
    radius = opts["radius"]
    if isinstance(radius, str):
        _check_choice(radius, "radius", RADIUS_POLICIES)
    else:
        resolve_radius(
            radius, torch.empty(1, 1, device="meta"), opts["sphere"]
        )  # validates the number
    scale = opts["radius_scale"]
    if isinstance(scale, bool) or not (
        isinstance(scale, int | float) and math.isfinite(scale) and scale > 0
    ):
        raise ValueError(f"radius_scale must be a positive finite number, got {scale!r}")


def _check_options(opts: dict[str, object], where: str) -> None:
    """One layer's resolved options: each valid, and together able to preserve the function."""
    _check_values(opts)
    radius = opts["radius"]
    if (
        opts["init"] == "preserve"
        and radius != "init"
        and not can_absorb(opts["gains"], opts["sphere"])
    ):
        raise ValueError(
            f"init='preserve' keeps the model's function, but gains={opts['gains']!r} cannot take "
            f"up the norm that the {opts['sphere']!r} sphere removes{where}. Use gains that cover "
            "the sphere's units (flat: any but 'none'; row: 'rowcol' or 'row'; col: 'rowcol' or "
            "'col'), radius='init' (D keeps the weight's own norm), or init='sphere' (the paper's start)"
        )


def register(
    model: nn.Module,
    *,
    gains: str = _Default("rowcol"),
    sphere: str = _Default("flat"),
    radius: str | float = _Default("shape"),
    radius_scale: float = _DefaultNumber(1.0),
    gain_map: str = _Default("softplus"),
    include: Selector = None,
    exclude: Selector = None,
    init: str = _Default("preserve"),
    tied: str = "skip",
    layers: LayerKinds = (nn.Linear,),
    overrides: Mapping[type | str, Mapping[str, object]] | None = None,
) -> list[str]:
    """Parametrize every nn.Linear of ``model`` as W = diag(phi(r)) . D . diag(phi(c)), in place.

    Register before building the optimizer (the originals are new Parameters),
    before ``torch.compile`` and before FSDP2's ``fully_shard``.

    Args:
        model: any nn.Module tree.
        gains: ``"rowcol"`` (per-row and per-column gains, the paper's best),
            ``"row"``, ``"col"``, ``"scalar"`` (one per matrix) or ``"none"``
            (a pure sphere, as Hyperball/HyperP).
        sphere: ``"flat"`` (||D||_F = R), ``"row"`` or ``"col"`` (each row or
            column on its own sphere).
        radius: ``"shape"``, ``"init"`` or a positive number; see
            :mod:`mdparam.sphere` for what each means on each sphere.
        radius_scale: a factor on the radius ``radius`` gives. Mostly set
            per layer through ``overrides``: the authors put residual output
            projections on a sphere 1/sqrt(2 * n_layers) the usual size.
            :func:`mdparam.param_groups` and :func:`mdparam.muon_param_groups`
            scale those directions' learning rates by the same factor, so
            that one LR is still the same relative step.
        gain_map: phi, the map from raw gain to magnitude: ``"softplus"``,
            ``"identity"`` or ``"exp"``.
        include: which layers to take among the supported ones: a glob on the
            module's or the tensor's qualified name (``"blocks.*.attn.*"``), a
            list of globs, or a predicate ``(name, module) -> bool``.
            None takes them all.
        exclude: same forms; matched layers are left plain.
        init: ``"preserve"`` (the model computes the same function right
            after registration: D is the projected weight and the gains take
            up its norm) or ``"sphere"`` (the paper's start: D is the
            projected weight, every phi(gain) = 1).
        tied: what to do with a weight that is the same Parameter as another
            one (an output head tied to the embedding). ``"skip"`` (default)
            leaves it plain and warns; ``"share"`` parametrizes every holder
            with the same direction and gains, so the tie survives (the
            embedding then also uses the fused matrix); ``"error"`` raises.
        layers: which layer kinds to decouple: module types (subclasses
            match) and/or globs on module names, or ``"all"`` for every kind
            mdparam knows (see :mod:`mdparam.adapters`: Embedding, Conv1d/2d/3d,
            GPT-2's Conv1D, fused MoE experts; add your own with
            :func:`mdparam.register_adapter`). Default: nn.Linear only.
        overrides: options per layer kind, ``{type or name glob: {option:
            value}}``, for the options this call leaves at their defaults.
            Kinds bring their own defaults too (embeddings: row sphere and row
            gains); options passed to this call apply to every layer.

    Returns:
        The qualified names of the tensors now parametrized.

    Example:
        >>> import torch, mdparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        >>> x = torch.randn(3, 8)
        >>> before = model(x)
        >>> mdparam.register(model)
        ['0.weight', '2.weight']
        >>> torch.allclose(model(x), before, atol=1e-6)
        True
    """
    explicit = {
        "gains": gains,
        "sphere": sphere,
        "radius": radius,
        "radius_scale": radius_scale,
        "gain_map": gain_map,
        "init": init,
    }
    _check_choice(tied, "tied", TIED)
    if not isinstance(model, nn.Module):
        raise TypeError(f"mdparam.register needs an nn.Module, got {type(model).__name__}")
    take = _kind_matcher(layers, "layers")
    override_list = []
    for kind, values in (overrides or {}).items():
        bad = [k for k in values if k not in explicit]
        if bad:
            raise ValueError(
                f"overrides for {kind!r}: unknown options {bad}; choose from {list(explicit)}"
            )
        override_list.append((_kind_matcher(kind, "overrides"), values))
    # The call's own values fail fast here; combinations are checked per layer below,
    # once each kind's defaults and the overrides are in.
    _check_values({k: _plain(v) for k, v in explicit.items()})
    _check_not_wrapped(model)
    include_fn = _as_matcher(include, "include")
    exclude_fn = _as_matcher(exclude, "exclude")

    # 1. Select: (qualified tensor name, module, tensor name, layout, options).
    supported, selected = [], []
    for mod_name, mod in model.named_modules():
        adapter = adapter_for(mod)
        if adapter is None or not take(mod_name, mod):
            continue
        opts = _options_for(mod_name, mod, adapter.defaults, explicit, override_list)
        _check_options(opts, f" of {mod_name or '<root>'!r} ({type(mod).__name__})")
        for tensor_name, layout in adapter.tensors:
            qual = f"{mod_name}.{tensor_name}" if mod_name else tensor_name
            supported.append(qual)
            if include_fn is not None and not include_fn(mod_name, qual, mod):
                continue
            if exclude_fn is not None and exclude_fn(mod_name, qual, mod):
                continue
            selected.append((qual, mod, tensor_name, layout, opts))
    if not selected:
        if not supported:
            raise ValueError(
                f"mdparam.register found no layer of the kinds asked for (layers={layers!r}) in "
                f"{type(model).__name__}; nothing to parametrize. Other kinds: layers='all', or "
                "mdparam.register_adapter for your own"
            )
        shown = ", ".join(supported[:6]) + (", ..." if len(supported) > 6 else "")
        raise ValueError(
            f"mdparam.register: no layer matched include={include!r} exclude={exclude!r}. "
            f"Patterns are globs on qualified names; supported layers here: {shown}"
        )

    # 2. Check every selected tensor before touching anything.
    for qual, mod, tensor_name, _, _ in selected:
        if _ours(mod, tensor_name) is not None:
            raise RuntimeError(
                f"mdparam.register: {qual!r} is already registered. Call mdparam.remove(model) "
                "first to start over, or exclude it"
            )
        if parametrize.is_parametrized(mod, tensor_name):
            raise RuntimeError(
                f"mdparam.register: {qual!r} already carries another parametrization "
                f"({type(mod.parametrizations[tensor_name][0]).__name__}); remove it first "
                "or exclude this layer"
            )
        t = getattr(mod, tensor_name)
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(
                f"mdparam.register: {qual!r} has dtype {getattr(t, 'dtype', type(t))}, not a "
                "floating-point tensor (quantized layer?); exclude it"
            )
        if t.numel() == 0:
            raise ValueError(
                f"mdparam.register: {qual!r} is empty (shape {tuple(t.shape)}); exclude it"
            )
    for qual, mod, tensor_name, layout, _ in selected:
        t = getattr(mod, tensor_name)
        try:
            matrix_shape(t.shape, layout)
        except ValueError as e:
            raise ValueError(
                f"mdparam.register: {qual!r} has shape {tuple(t.shape)}, not a matrix as "
                f"layout {layout!r} needs ({e}); exclude it"
            ) from None

    # 3. Tied weights.
    holders = _tie_map(model)
    plan: list[tuple[str, nn.Module, str, str, dict]] = []
    skipped: list[str] = []
    planned_ids: set[int] = set()
    for qual, mod, tensor_name, layout, opts in selected:
        t = getattr(mod, tensor_name)
        others = [h for h in holders.get(id(t), []) if h[1] is not mod or h[2] != tensor_name]
        names = [qual] + [h[0] for h in others]
        if not others:
            plan.append((qual, mod, tensor_name, layout, opts))
            continue
        if tied == "error":
            raise RuntimeError(
                f"mdparam.register: {qual!r} is tied to {[n for n in names if n != qual]} "
                "(same Parameter). Pass tied='skip' to leave it plain or tied='share' to "
                "parametrize all holders together"
            )
        if tied == "skip":
            skipped.append(f"{qual} (tied to {', '.join(n for n in names if n != qual)})")
            continue
        if id(t) in planned_ids:
            continue
        planned_ids.add(id(t))
        for holder, hmod, tname in [(qual, mod, tensor_name), *others]:
            if parametrize.is_parametrized(hmod, tname):
                raise RuntimeError(
                    f"mdparam.register: tied holder {holder!r} already carries a parametrization; "
                    "remove it first, or pass tied='skip'"
                )
            plan.append((holder, hmod, tname, layout, opts))
    if skipped:
        warnings.warn(
            "mdparam.register left out tied weights, which stay plain and tied: "
            + "; ".join(skipped)
            + ". To decouple them too, pass tied='share' (every holder then uses one "
            "direction and one set of gains)",
            stacklevel=2,
        )
    if not plan:
        raise ValueError(
            "mdparam.register: every matched layer is tied to another tensor and was left out; "
            "pass tied='share' to parametrize tied weights"
        )

    # 4. Register; on any failure put back what was already done.
    done: list[tuple[nn.Module, str, nn.Parameter]] = []
    first_holder: dict[int, tuple[nn.Module, str]] = {}
    try:
        for qual, mod, tensor_name, layout, opts in plan:
            original = getattr(mod, tensor_name)
            lead = first_holder.get(id(original))
            try:
                _register_one(mod, tensor_name, layout, **opts)
            except ValueError as e:
                raise ValueError(f"mdparam.register: {qual!r}: {e}") from None
            done.append((mod, tensor_name, original))
            if lead is None:
                first_holder[id(original)] = (mod, tensor_name)
            else:  # tied="share": point this holder at the first holder's originals
                lead_list = lead[0].parametrizations[lead[1]]
                this_list = mod.parametrizations[tensor_name]
                for i in range(lead_list.ntensors):
                    setattr(this_list, f"original{i}", getattr(lead_list, f"original{i}"))
    except BaseException:
        for mod, tensor_name, original in reversed(done):
            _unparametrize(mod, tensor_name, original)
        raise
    return [qual for qual, *_ in plan]


def _register_one(
    mod: nn.Module,
    tensor_name: str,
    layout: str,
    gains: str,
    sphere: str,
    radius: str | float,
    radius_scale: float,
    gain_map: str,
    init: str,
) -> None:
    weight = getattr(mod, tensor_name)
    matrix = to_matrix(weight.detach(), layout)
    r = resolve_radius(radius, matrix, sphere)
    if radius_scale != 1.0:
        r = r * radius_scale
    config = MDConfig(
        gains=gains,
        sphere=sphere,
        gain_map=gain_map,
        layout=layout,
        shape=tuple(weight.shape),
        radius=r if isinstance(r, float) else None,
    )
    param = MagnitudeDirection(config, None if isinstance(r, float) else r)
    param.init = init
    param.radius_scale = float(radius_scale)
    param.start_on_sphere = init == "sphere"
    try:
        parametrize.register_parametrization(mod, tensor_name, param)
    finally:
        param.start_on_sphere = False


def _unparametrize(mod: nn.Module, tensor_name: str, value: Tensor) -> None:
    """Replace a parametrized tensor by ``value`` without editing the injected class.

    torch's remove_parametrizations deletes the property from the class that
    parametrize injected, which a deepcopy shares with its original (the
    original then loses the attribute). Here the instance moves to a class of
    its own: its base class, or, when other tensors stay parametrized, a fresh
    copy of the injected class without this property.
    """
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

    Example:
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
            shared = nn.Parameter(value, requires_grad=direction.requires_grad)
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

    Example:
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
            e.parametrization.start_on_sphere = e.parametrization.init == "sphere"
            try:
                setattr(e.module, e.tensor_name, value)
            finally:
                e.parametrization.start_on_sphere = False
    return [e.name for e in entries]
