"""Edge cases: memory formats, low precision, reused modules, copies, re-initialisation."""

import copy

import pytest
import torch
from conftest import FusedExperts, rel_err
from torch import nn

import mdparam
from mdparam.layouts import to_matrix
from mdparam.sphere import sphere_norm


def test_retraction_writes_back_into_a_channels_last_convolution():
    conv = nn.Conv2d(4, 6, 3)
    mdparam.register(conv, layers=[nn.Conv2d])
    conv.to(memory_format=torch.channels_last)  # D is no longer contiguous: its matrix is a copy
    d = conv.parametrizations.weight.original0
    assert not d.is_contiguous()
    with torch.no_grad():
        d.mul_(3.0)
    mdparam.Retraction(conv)()
    assert float(d.detach().norm()) == pytest.approx(36**0.5, rel=1e-6)


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


def test_bf16_radius_from_init_is_kept_in_fp32():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).bfloat16()
    w = lin.weight.detach().clone()
    mdparam.register(
        lin, sphere="row", radius="init", gains="none"
    )  # no gains: the radius must be exact
    radius = lin.parametrizations.weight[0].radius
    assert radius.dtype == torch.float32
    assert torch.allclose(radius, w.float().norm(dim=1, keepdim=True))
    assert torch.equal(lin.weight, w)


def test_reinitialize_keeps_the_sphere_init_of_a_pure_sphere():
    lin = nn.Linear(8, 8)
    mdparam.register(lin, gains="none", init="sphere")
    mdparam.reinitialize(lin)  # would need gains to take up the norm if it absorbed
    assert float(lin.parametrizations.weight.original0.detach().norm()) == pytest.approx(
        8**0.5, rel=1e-6
    )


def test_training_checkpoint_keeps_the_radius_taken_at_init(tmp_path):
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 6))
    mdparam.register(a, radius="init")
    mdparam.save_training(a, tmp_path / "ckpt.safetensors")
    torch.manual_seed(1)
    b = nn.Sequential(nn.Linear(6, 6))  # a different init norm
    mdparam.register(b, radius="init")
    mdparam.load_training(b, tmp_path / "ckpt.safetensors")
    assert torch.equal(
        b[0].parametrizations.weight[0].radius, a[0].parametrizations.weight[0].radius
    )
    x = torch.randn(3, 6)
    assert torch.equal(a(x), b(x))


def test_removing_from_a_deepcopy_with_two_parametrized_tensors_leaves_the_original():
    experts = FusedExperts()
    mdparam.register(experts, layers="all")
    x = torch.randn(4, 8)
    before = experts(x)
    twin = copy.deepcopy(experts)
    mdparam.remove(twin)
    assert torch.equal(experts(x), before)  # the original still has both properties
    assert rel_err(twin(x), before) <= 1e-6
    assert set(dict(twin.named_parameters())) == {"gate_up_proj", "down_proj"}


def test_a_module_used_twice_is_not_a_tie():
    lin = nn.Linear(5, 5)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    x = torch.randn(2, 5)
    before = model(x)
    assert mdparam.register(model) == ["0.weight"]
    assert rel_err(model(x), before) <= 1e-5


def test_fuse_works_under_torch_func():
    lin = nn.Linear(6, 4)
    mdparam.register(lin)
    params = dict(lin.named_parameters())
    x = torch.randn(3, 6)

    def loss(p, xi):
        return torch.func.functional_call(lin, p, (xi,)).square().sum()

    grads = torch.func.grad(loss)(params, x)
    reference = torch.autograd.grad(loss(params, x), list(params.values()))
    for g, r in zip(grads.values(), reference):
        assert torch.allclose(g, r, atol=1e-6)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(
        params, x
    )  # per-sample gradients
    assert per_sample["parametrizations.weight.original0"].shape == (3, 4, 6)
    for k, g in grads.items():  # the loss is a sum over samples
        assert torch.allclose(per_sample[k].sum(0), g, atol=1e-5)


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
    norms = sphere_norm(to_matrix(d, "linear"), "flat")
    assert float(norms) == pytest.approx(4.0, rel=1e-6)
