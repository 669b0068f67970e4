import pytest
import torch
from torch import nn

import mdparam
from mdparam._maps import gain_map_of


def trained_step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    model(torch.randn(8, 6, generator=g)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def test_stats_match_a_direct_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))
    mdparam.register(model, gain_map="exp")
    opt = torch.optim.AdamW(mdparam.param_groups(model, lr=0.05, gain_lr=0.05))
    mdparam.Retraction(model).attach(opt)
    first = mdparam.stats(model, exact=True)
    assert "mdparam/direction_step" not in first
    before = [e.direction.detach().clone() for e in mdparam.registered(model)]
    trained_step(model, opt, 1)
    s = mdparam.stats(model, exact=True)
    steps = []
    for e, old in zip(mdparam.registered(model), before):
        r = gain_map_of("exp")(e.gains[0].detach())
        c = gain_map_of("exp")(e.gains[1].detach())
        assert s[f"mdparam/{e.name}/row_gain_mean"] == pytest.approx(float(r.mean()))
        assert s[f"mdparam/{e.name}/row_gain_min"] == pytest.approx(float(r.min()))
        assert s[f"mdparam/{e.name}/col_gain_max"] == pytest.approx(float(c.max()))
        d = e.direction.detach()
        step = float((d - old).norm() / d.norm())
        assert s[f"mdparam/{e.name}/direction_step"] == pytest.approx(step, rel=1e-5)
        steps.append(step)
    assert s["mdparam/direction_step"] == pytest.approx(sum(steps) / 2)
    assert s["mdparam/direction_step_max"] == pytest.approx(max(steps))
    assert s["mdparam/row_gain_min"] == pytest.approx(
        min(float(gain_map_of("exp")(e.gains[0].detach()).min()) for e in mdparam.registered(model))
    )


def test_sketched_direction_step_is_close_to_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 48))
    mdparam.register(model)
    opt = torch.optim.AdamW(mdparam.param_groups(model, lr=0.02))
    mdparam.Retraction(model).attach(opt)
    twin_exact = mdparam.stats(model, exact=True)
    sketch = mdparam.stats(model)  # both records taken at the same point
    assert twin_exact.keys() == sketch.keys()
    before = [e.direction.detach().clone() for e in mdparam.registered(model)]
    trained_step(model, opt, 2)
    sketched = mdparam.stats(model)
    for e, old in zip(mdparam.registered(model), before):
        exact = float((e.direction.detach() - old).norm() / e.direction.detach().norm())
        assert sketched[f"mdparam/{e.name}/direction_step"] == pytest.approx(exact, rel=0.35)


def test_relative_step_mode_is_confirmed_by_stats():
    # In relative-step mode the step before the retraction is lr x R; stats sees
    # the step after it, lr to first order (see test_relative_step for the identity).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 48))
    mdparam.register(model)
    lr = 0.01
    opt = torch.optim.AdamW(mdparam.param_groups(model, lr=lr))
    mdparam.Retraction(model, relative_step=True).attach(opt)
    mdparam.stats(model, exact=True)
    trained_step(model, opt, 3)
    s = mdparam.stats(model, exact=True)
    assert s["mdparam/direction_step_max"] <= lr * 1.001
    assert s["mdparam/direction_step_min"] >= lr * 0.5
