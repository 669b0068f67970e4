import pytest
import torch
from conftest import byte_batches, sphere_error, tiny_gpt

import mdparam
from mdparam._optim import muon_param_groups, split_params


@pytest.mark.parametrize("sphere", ["flat", "row"])
def test_adamw_md_learns_bytes_and_keeps_directions_on_the_sphere(sphere):
    model = tiny_gpt(vocab_size=256, block_size=32, n_embd=48)
    mdparam.register(model, sphere=sphere)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(mdparam.param_groups(model, lr=0.02, gain_lr=1e-2, other_lr=3e-3))
    mdparam.Retraction(model, compile=False).attach(opt)
    losses = []
    for x, y in byte_batches(120, 8, 32):
        loss = model.loss(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        assert sphere_error(model) <= 1e-5
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert first > 5.0  # about log(256) at the start
    assert last < 0.6 * first, (first, last)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    roles = split_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    for role in ("direction", "gain", "other"):
        assert all(names[id(p)] in moved for p in roles[role]), role


def test_param_groups_tags_roles_and_zero_decay():
    model = tiny_gpt()
    mdparam.register(model)
    groups = mdparam.param_groups(
        model, lr=0.1, gain_lr=0.01, other_lr=0.001, other_weight_decay=0.1, betas=(0.9, 0.95)
    )
    by_role = {g["mdparam_role"]: g for g in groups}
    assert set(by_role) == {"direction", "gain", "other"}
    assert by_role["direction"]["weight_decay"] == 0 and by_role["gain"]["weight_decay"] == 0
    assert by_role["other"]["weight_decay"] == 0.1 and by_role["other"]["lr"] == 0.001
    assert all(g["betas"] == (0.9, 0.95) for g in groups)
    n_dirs = len(mdparam.registered(model))
    assert len(by_role["direction"]["params"]) == n_dirs
    assert len(by_role["gain"]["params"]) == 2 * n_dirs
    every = [p for g in groups for p in g["params"]]
    assert len(every) == len({id(p) for p in every}) == len(list(model.parameters()))


@pytest.mark.parametrize(
    "opt_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.RMSprop, torch.optim.Adagrad]
)
def test_param_groups_work_with_any_optimizer_and_schedulers(opt_cls):
    model = tiny_gpt()
    mdparam.register(model)
    opt = opt_cls(mdparam.param_groups(model, lr=0.01))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 10)
    mdparam.Retraction(model, compile=False).attach(opt)
    for x, y in byte_batches(3, 2, 16):
        model.loss(x % 64, y % 64).backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.7)
    assert sphere_error(model) <= 1e-5


def test_param_groups_needs_a_registered_model():
    with pytest.raises(ValueError, match=r"call mdparam.register\(model\)"):
        mdparam.param_groups(tiny_gpt(), lr=0.1)


def test_muon_groups_scale_the_step_to_the_paper():
    model = tiny_gpt()
    mdparam.register(model)
    groups = muon_param_groups(model, lr=0.02)
    for g in groups:
        d_out, d_in = g["params"][0].shape
        torch_factor = max(1, d_out / d_in) ** 0.5
        assert g["lr"] * torch_factor == pytest.approx(
            0.02 * (max(d_out, d_in) / min(d_out, d_in)) ** 0.5
        )
        assert g["weight_decay"] == 0 and g["mdparam_role"] == "direction"


def test_muon_step_moves_the_direction_by_lr_times_radius():
    # One Muon step from zero momentum: the update is lr * sqrt(max/min) * U with
    # ||U||_F about sqrt(min), so ||D_new - D_old|| is about lr * R before retraction.
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16, bias=False)
    mdparam.register(lin)
    muon, _ = mdparam.muon_optimizers(lin, lr=0.01)
    d = lin.parametrizations.weight.original0
    old = d.detach().clone()
    lin(torch.randn(32, 64)).square().mean().backward()
    muon.step()
    step = float((d.detach() - old).norm() / old.norm())
    assert 0.5 * 0.01 < step < 1.5 * 0.01  # Newton-Schulz leaves singular values in ~[0.5, 1.5]


def test_muon_recipe_trains():
    model = tiny_gpt(vocab_size=256, block_size=32, n_embd=48)
    mdparam.register(model)
    muon, adamw = mdparam.muon_optimizers(model, lr=0.05, gain_lr=1e-2, other_lr=3e-3)
    mdparam.Retraction(model, compile=False).attach(muon)
    losses = []
    for x, y in byte_batches(40, 8, 32):
        loss = model.loss(x, y)
        loss.backward()
        for opt in (muon, adamw):
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5
    assert sphere_error(model) <= 1e-5
