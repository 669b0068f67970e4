"""Optimizer parameter groups for directions, gains and everything else."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._tree import registered

__all__ = [
    "GAIN_LR",
    "MUON_OTHER_LR",
    "ROLES",
    "muon_optimizers",
    "muon_pair",
    "muon_param_groups",
    "param_groups",
    "split_params",
]

ROLES = ("direction", "gain", "other")
GAIN_LR = 1e-3  # AdamW's LR for the raw gains: the authors' value (see the recipe ablation)


def split_params(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The trainable parameters of ``model`` by role, each listed once, in model order."""
    role_of: dict[int, str] = {}
    for entry in registered(model):
        role_of[id(entry.direction)] = "direction"
        for g in entry.gains:
            role_of[id(g)] = "gain"
    if not role_of:
        raise ValueError(
            "mdparam: the model has no MD-parametrized tensor, so there are no directions or "
            "gains to group; call mdparam.register(model) before building the optimizer"
        )
    if any(e.parametrization.fused is not None for e in registered(model)):
        raise ValueError(
            "mdparam: the model is set up for the fused step (mdparam.recipe with fused=True), "
            "whose directions and gains take no gradient of their own; train it with that "
            "recipe's step, or build the recipe with fused=False to use another optimizer"
        )
    out: dict[str, list[nn.Parameter]] = {r: [] for r in ROLES}
    for p in model.parameters():
        if p.requires_grad:
            out[role_of.get(id(p), "other")].append(p)
    return out


def param_groups(
    model: nn.Module,
    lr: float,
    gain_lr: float = GAIN_LR,
    other_lr: float | None = None,
    *,
    other_weight_decay: float | None = None,
    roles: Sequence[str] = ROLES,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Parameter groups for any torch.optim optimizer: directions, gains, the rest.

    Every group is tagged ``"mdparam_role"`` (``"direction"``, ``"gain"`` or
    ``"other"``). Directions and gains get ``weight_decay=0`` (on a sphere,
    decay is a first-order no-op; on gains it would pull magnitudes to
    phi(0)). Empty groups are left out.

    Args:
        model: a registered model.
        lr: learning rate of the directions.
        gain_lr: learning rate of the raw gains (the authors use 1e-3).
        other_lr: learning rate of everything else (embeddings, norms,
            biases, unregistered layers); defaults to ``lr``.
        other_weight_decay: weight decay of the other group; None leaves the
            optimizer's default.
        roles: which groups to build (e.g. ``("gain", "other")`` for the
            AdamW half of a Muon setup).
        **group_options: extra keys put in every group (e.g. ``betas``).

    Examples:
        >>> import torch, mdparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> _ = mdparam.register(model)
        >>> opt = torch.optim.AdamW(mdparam.param_groups(model, lr=1e-2, gain_lr=1e-3))
        >>> for g in opt.param_groups:
        ...     print(g["mdparam_role"], g["lr"], g["weight_decay"])
        direction 0.01 0.0
        gain 0.001 0.0
        other 0.01 0.01
    """
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise ValueError(f"unknown roles {unknown}; choose from {ROLES}")
    split = split_params(model)
    settings: dict[str, dict[str, Any]] = {
        "direction": {"lr": lr, "weight_decay": 0.0},
        "gain": {"lr": gain_lr, "weight_decay": 0.0},
        "other": {"lr": lr if other_lr is None else other_lr},
    }
    if other_weight_decay is not None:
        settings["other"]["weight_decay"] = other_weight_decay
    groups = []
    for role in ROLES:
        if role not in roles or not split[role]:
            continue
        if role != "direction":
            groups.append(
                {"params": split[role], **group_options, **settings[role], "mdparam_role": role}
            )
            continue
        for scale, params in _by_radius_scale(model, split[role]).items():
            group = {"params": params, **group_options, **settings[role], "mdparam_role": role}
            if scale != 1.0:  # register(radius_scale=...): the same relative step
                group.update(lr=lr * scale, mdparam_lr_scale=scale)
            groups.append(group)
    return groups


def _radius_scales(model: nn.Module) -> dict[int, float]:
    """Each direction's ``radius_scale`` (see ``mdparam.register``), by parameter id."""
    return {id(e.direction): e.parametrization.radius_scale for e in registered(model)}


def _by_radius_scale(
    model: nn.Module, directions: list[nn.Parameter]
) -> dict[float, list[nn.Parameter]]:
    scales = _radius_scales(model)
    out: dict[float, list[nn.Parameter]] = {}
    for p in directions:
        out.setdefault(scales.get(id(p), 1.0), []).append(p)
    return out


def muon_step_scale(d_out: int, d_in: int, radius_scale: float = 1.0) -> float:
    """The paper's Muon step per unit LR: sqrt(max/min) x radius_scale, so that
    ||lr x U||_F = lr x R on the default flat sphere (see ``muon_param_groups``)."""
    return math.sqrt(max(d_out, d_in) / min(d_out, d_in)) * radius_scale


def _muon_default_factor(d_out: int, d_in: int) -> float:
    # torch.optim.Muon's adjust_lr_fn=None ("original") multiplies lr by this.
    return math.sqrt(max(1.0, d_out / d_in))


def muon_param_groups(
    model: nn.Module,
    lr: float,
    directions: Sequence[nn.Parameter] | None = None,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Groups for ``torch.optim.Muon`` over the directions, with the paper's step size.

    Muon's orthogonalised update U has ||U||_F = sqrt(min(d_out, d_in)); the
    paper scales it by sqrt(max/min) so that ||lr * U||_F = lr * R on the
    default flat sphere with ``radius="shape"`` (R = sqrt(max)): ``lr`` is then
    the relative step of the direction, whatever the shape. torch's Muon always applies its own
    factor sqrt(max(1, d_out/d_in)), so each group's lr is set to
    ``lr * sqrt(max/min) / that factor``; one group per shape, tagged
    ``"mdparam_role": "direction"`` and ``"mdparam_lr_scale"``. A direction
    registered with ``radius_scale`` s has a sphere s times the size, and its
    step is scaled by s too, so ``lr`` stays its relative step.
    Weight decay is 0. Use with ``torch.optim.Muon(groups)`` (default
    ``adjust_lr_fn``). ``directions`` limits the groups to those parameters
    (the rest going to another optimizer); None takes every direction.
    """
    if directions is None:
        directions = split_params(model)["direction"]
    radius_scales = _radius_scales(model)
    by_shape: dict[tuple[int, int, float], list[nn.Parameter]] = {}
    for p in directions:
        if p.ndim != 2:
            raise ValueError(
                f"torch.optim.Muon takes only 2-D tensors, but a direction has shape "
                f"{tuple(p.shape)}; exclude that layer from Muon (give it to AdamW)"
            )
        by_shape.setdefault((*p.shape, radius_scales.get(id(p), 1.0)), []).append(p)
    groups = []
    for (d_out, d_in, radius_scale), params in by_shape.items():
        scale = muon_step_scale(d_out, d_in, radius_scale) / _muon_default_factor(d_out, d_in)
        groups.append(
            {
                "params": params,
                **group_options,
                "lr": lr * scale,
                "weight_decay": 0.0,
                "mdparam_role": "direction",
                "mdparam_lr_scale": scale,
            }
        )
    return groups


# AdamW's LR for embeddings, head and norms beside Muon: the recipe's default (a row of
# benchmarks/ablation.py), shared by muon_optimizers
MUON_OTHER_LR = 1e-2


def muon_optimizers(
    model: nn.Module,
    lr: float,
    gain_lr: float = GAIN_LR,
    other_lr: float = MUON_OTHER_LR,
    *,
    other_weight_decay: float | None = 0.0,
    muon_options: dict[str, Any] | None = None,
    adamw_options: dict[str, Any] | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """The paper's Muon recipe: Muon on directions, AdamW on gains and the rest.

    Returns ``(muon, adamw)``; attach the retraction to ``muon`` and step both.
    ``mdparam.recipe(model, "muon", ...)`` builds its optimizers with the same
    code and defaults (and keeps embeddings and head on row spheres besides).

    Examples:
        >>> import torch, mdparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 2))
        >>> _ = mdparam.register(model)
        >>> muon, adamw = mdparam.muon_optimizers(model, lr=0.05)
        >>> _ = mdparam.Retraction(model).attach(muon)
        >>> model(torch.randn(4, 8)).square().mean().backward()
        >>> muon.step(); adamw.step()
    """
    return muon_pair(
        model,
        lr,
        gain_lr,
        other_lr,
        other_weight_decay=other_weight_decay,
        muon_options=muon_options,
        adamw_options=adamw_options,
    )


def muon_pair(
    model: nn.Module,
    lr: float,
    gain_lr: float,
    other_lr: float,
    *,
    other_weight_decay: float | None,
    muon_options: dict[str, Any] | None,
    adamw_options: dict[str, Any] | None,
    directions: list[nn.Parameter] | None = None,
    extra_groups: Sequence[dict[str, Any]] = (),
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """(Muon on ``directions`` (None: all), AdamW on gains, the rest and ``extra_groups``)."""
    if not hasattr(torch.optim, "Muon"):
        raise RuntimeError("torch.optim.Muon needs torch >= 2.9; upgrade torch or use AdamW")
    muon = torch.optim.Muon(muon_param_groups(model, lr, directions), **(muon_options or {}))
    rest = param_groups(
        model,
        lr=other_lr,
        gain_lr=gain_lr,
        other_lr=other_lr,
        other_weight_decay=other_weight_decay,
        roles=("gain", "other"),
    )
    adamw = torch.optim.AdamW(list(extra_groups) + rest, **(adamw_options or {}))
    return muon, adamw
