"""Relative-step mode: the direction LR is the length of D's step, lr x R, for any optimizer.

The identity tested: with D_old on its sphere and U the step the base
optimizer proposed (D_base - D_old), the new direction is

    D_new = retract(D_old + lr * R * U / ||U||)           (norms per unit of the sphere)

so the step before the retraction has length exactly lr * R. The retraction
then moves D back onto the sphere; for a flat sphere the achieved angle theta
between D_old and D_new satisfies tan(theta) = lr sin(phi) / (1 + lr cos(phi)),
phi being the angle between U and D_old, and ||D_new - D_old|| / R = 2 sin(theta / 2)
(lr (1 - 3 lr^2 / 8 + ...) for a tangent step).
"""

import copy
import math

import pytest
import torch
from torch import nn

import mdparam
from mdparam._layouts import layout_of
from mdparam._retraction import relative_step_
from mdparam._sphere import sphere_of

FLAT, LINEAR = sphere_of("flat"), layout_of("linear")


def two_layer(d_in=24, d_hidden=40, d_out=8, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out))


def directions(model):
    return [e.direction.detach().clone() for e in mdparam.registered(model)]


def loss_of(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, model[0].in_features, generator=g)
    return model(x).square().mean()


OPTIMIZERS = {
    "adamw": lambda model, lr: torch.optim.AdamW(mdparam.param_groups(model, lr=lr)),
    "sgd": lambda model, lr: torch.optim.SGD(mdparam.param_groups(model, lr=lr), momentum=0.9),
    # muon_param_groups scales each group's lr by sqrt(max/min) / torch's factor; the
    # relative step divides that back out, so the step is lr x R as for AdamW.
    "muon": lambda model, lr: mdparam.muon_optimizers(model, lr=lr)[0],
}


def one_step_with_and_without(model, opt_name, lr):
    """One step in relative-step mode, and one of the base optimizer alone on a copy.

    Returns the directions before the step and the base optimizer's directions after
    it, from which the tests read the proposal U = D_base - D_old.
    """
    base = copy.deepcopy(model)
    old = directions(model)
    opt = OPTIMIZERS[opt_name](model, lr)
    mdparam.Retraction(model, relative_step=True).attach(opt)
    base_opt = OPTIMIZERS[opt_name](base, lr)
    for m, o in ((model, opt), (base, base_opt)):
        loss_of(m).backward()
        o.step()
    return old, directions(base)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("sphere", ["flat", "row"])
def test_step_is_lr_times_radius_then_retracted(opt_name, sphere):
    lr = 0.05
    model = two_layer()
    mdparam.register(model, sphere=sphere)
    old, based = one_step_with_and_without(model, opt_name, lr)
    for e, d_old, d_base in zip(mdparam.registered(model), old, based):
        radius = e.parametrization.sphere_radius()
        u = d_base - d_old
        step = lr * radius * u / sphere_of(sphere).norm(u)  # length lr * R per unit
        expected = sphere_of(sphere).project(d_old + step, radius)
        assert torch.allclose(e.direction.detach(), expected, rtol=1e-5, atol=1e-6)


def test_achieved_angle_follows_the_retraction_formula():
    lr = 0.1
    model = two_layer(d_in=64, d_hidden=16, d_out=4)
    mdparam.register(model)
    old, based = one_step_with_and_without(model, "adamw", lr)
    for e, d_old, d_base in zip(mdparam.registered(model), old, based):
        radius = e.parametrization.sphere_radius()
        u = (d_base - d_old).flatten().double()
        cos_phi = float(u @ d_old.flatten().double() / (u.norm() * radius))
        sin_phi = math.sqrt(max(0.0, 1 - cos_phi**2))
        theta = math.atan2(lr * sin_phi, 1 + lr * cos_phi)
        achieved = float((e.direction.detach() - d_old).norm()) / radius
        assert achieved == pytest.approx(2 * math.sin(theta / 2), rel=1e-4)
        assert (
            abs(achieved - lr) <= lr * abs(cos_phi) + lr**2
        )  # first order: lr, less the radial part


@pytest.mark.parametrize("width", [16, 64, 256])
def test_the_relative_step_does_not_depend_on_width(width):
    lr = 0.02
    prev = [torch.randn(width, width), torch.randn(width, 4 * width)]
    ds = [p + 0.3 * torch.randn_like(p) for p in prev]  # any proposed steps
    radii = [math.sqrt(width), math.sqrt(4 * width)]
    before = [p.clone() for p in prev]
    lrs = [torch.tensor(lr)] * 2
    relative_step_(ds, prev, [FLAT] * 2, [LINEAR] * 2, radii, lrs)
    for d, p, r in zip(ds, before, radii):
        assert float((d - p).norm()) / r == pytest.approx(lr, rel=1e-5)


def test_a_direction_without_gradient_stays_put():
    prev = [torch.randn(4, 4)]
    d = [prev[0].clone()]
    relative_step_(d, [prev[0].clone()], [FLAT], [LINEAR], [2.0], [torch.tensor(0.1)])
    assert torch.equal(d[0], prev[0])


def test_relative_step_needs_attach_and_all_directions():
    model = two_layer()
    mdparam.register(model)
    retract = mdparam.Retraction(model, relative_step=True)
    with pytest.raises(RuntimeError, match=r"attach\(optimizer\)"):
        retract()
    first_only = torch.optim.SGD([mdparam.registered(model)[0].direction], lr=0.1)
    with pytest.raises(ValueError, match=r"does not hold the directions of \['2.weight'\]"):
        retract.attach(first_only)


def test_handle_removes_both_hooks():
    model = two_layer()
    mdparam.register(model)
    opt = torch.optim.SGD(mdparam.param_groups(model, lr=0.5))
    retract = mdparam.Retraction(model, relative_step=True)
    handle = retract.attach(opt)
    assert retract.attached and opt._optimizer_step_pre_hooks and opt._optimizer_step_post_hooks
    handle.remove()
    assert not retract.attached
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    loss_of(model).backward()
    opt.step()  # a plain SGD step now: D leaves its sphere
    e = mdparam.registered(model)[0]
    assert abs(float(e.direction.detach().norm()) - e.parametrization.sphere_radius()) > 1e-3


@pytest.mark.slow
def test_compiled_relative_step_matches_eager():
    results = []
    for compile in (False, True):
        model = two_layer()
        mdparam.register(model)
        opt = torch.optim.AdamW(mdparam.param_groups(model, lr=0.03))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        mdparam.Retraction(model, relative_step=True, compile=compile).attach(opt)
        for i in range(4):
            loss_of(model, seed=i).backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        results.append(directions(model))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_relative_step_on_a_channels_last_convolution():
    x = torch.randn(2, 4, 8, 8)
    directions = []
    for channels_last in (False, True):  # the same step, written back into either layout
        torch.manual_seed(0)
        conv = nn.Conv2d(4, 6, 3)
        mdparam.register(conv, layers=[nn.Conv2d])
        if channels_last:
            conv.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(mdparam.param_groups(conv, lr=0.05))
        mdparam.Retraction(conv, relative_step=True).attach(opt)
        conv(x).square().mean().backward()
        opt.step()
        directions.append(conv.parametrizations.weight.original0.detach())
    assert not directions[1].is_contiguous()
    assert float(directions[1].norm()) == pytest.approx(36**0.5, rel=1e-6)
    assert torch.allclose(directions[1], directions[0], rtol=1e-5, atol=1e-6)


def test_sphere_norms_after_relative_retract_called_twice():
    lin = nn.Linear(16, 16)
    mdparam.register(lin)
    opt = torch.optim.SGD(mdparam.param_groups(lin, lr=0.1))
    retract = mdparam.Retraction(lin, relative_step=True)
    retract.attach(opt)
    lin(torch.randn(4, 16)).square().mean().backward()
    opt.step()
    after_step = lin.parametrizations.weight.original0.detach().clone()
    retract()  # a second call must not treat the stored step as D_prev
    d = lin.parametrizations.weight.original0.detach()
    assert torch.allclose(d, after_step, atol=1e-6)
    norms = sphere_of("flat").norm(layout_of("linear").to_matrix(d))
    assert float(norms) == pytest.approx(4.0, rel=1e-6)


def test_resuming_the_optimizer_keeps_the_relative_step_on_the_scheduled_lr():
    # optimizer.load_state_dict replaces the param-group dicts; the relative step must read
    # its LR from the live groups (the scheduler's), not from the ones it saw at attach time.
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
        mdparam.register(model, init="sphere")
        opt = torch.optim.AdamW(mdparam.param_groups(model, lr=0.05))
        mdparam.Retraction(model, relative_step=True).attach(opt)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return model, opt, sched

    def steps(model, opt, sched, seeds):
        for seed in seeds:
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))
            model(x).square().mean().backward()
            opt.step()
            sched.step()
            opt.zero_grad()

    full = build()
    steps(*full, range(4))
    half = build()
    steps(*half, range(2))
    resumed = build()
    resumed[0].load_state_dict(half[0].state_dict())
    resumed[1].load_state_dict(half[1].state_dict())
    resumed[2].load_state_dict(half[2].state_dict())
    steps(*resumed, range(2, 4))
    for a, b in zip(full[0].parameters(), resumed[0].parameters()):
        assert torch.equal(a, b)
