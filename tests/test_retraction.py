import pytest
import torch
from torch import nn

import mdparam


def test_retraction_restores_every_sphere_kind():
    for sphere in ("flat", "row", "col"):
        model = nn.Sequential(nn.Linear(12, 7), nn.Linear(7, 20))
        mdparam.register(model, sphere=sphere)
        retract = mdparam.Retraction(model, compile=False)
        with torch.no_grad():
            for d in retract.directions:
                d.mul_(torch.rand_like(d) + 0.5)
        retract()
        for e in mdparam.registered(model):
            d = e.direction.detach()
            r = e.parametrization.sphere_radius()
            if sphere == "flat":
                assert float(d.norm()) == pytest.approx(r, rel=1e-6)
            else:
                dim = 1 if sphere == "row" else 0
                assert torch.allclose(
                    d.norm(dim=dim), torch.full((d.shape[1 - dim],), r), rtol=1e-6
                )


def test_bf16_directions_are_retracted_in_fp32():
    lin = nn.Linear(256, 256).bfloat16()
    mdparam.register(lin)
    retract = mdparam.Retraction(lin)
    d = lin.parametrizations.weight.original0
    with torch.no_grad():
        d.mul_(1.37)
    expected = (
        d.detach().float() * (16.0 / d.detach().float().norm())
    ).bfloat16()  # norm and product in fp32
    retract()
    assert d.dtype == torch.bfloat16
    assert torch.equal(d.detach(), expected)


@pytest.mark.parametrize("compile", [False, True])
def test_zero_direction_stays_zero_and_bad_norms_are_named(compile):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    mdparam.register(model)
    retract = mdparam.Retraction(model, compile=compile)
    assert retract.compiled is compile
    with torch.no_grad():
        retract.directions[0].mul_(3.0)
        retract.directions[1].zero_()
        retract.directions[2][0, 0] = float("inf")
    with pytest.raises(
        mdparam.RetractionError, match=r"'1\.weight', '2\.weight'.*lower the learning rate"
    ):
        retract()
    assert float(retract.directions[0].detach().norm()) == pytest.approx(
        2.0
    )  # the good one was retracted
    assert torch.count_nonzero(retract.directions[1]) == 0  # zero, not NaN


def test_unchecked_retraction_keeps_a_zero_direction_at_zero_silently():
    lin = nn.Linear(4, 4)
    mdparam.register(lin)
    retract = mdparam.Retraction(lin, check=False)
    with torch.no_grad():
        retract.directions[0].zero_()
    retract()
    assert torch.count_nonzero(retract.directions[0]) == 0


def test_compile_auto_runs_eagerly_on_cpu_and_bad_values_are_refused():
    lin = nn.Linear(4, 4)
    mdparam.register(lin)
    assert mdparam.Retraction(lin).compiled is False
    with pytest.raises(ValueError, match="compile must be"):
        mdparam.Retraction(lin, compile="yes")


def test_attach_refuses_an_optimizer_without_directions():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    mdparam.register(model)
    opt = torch.optim.AdamW(model[1].parameters())
    with pytest.raises(ValueError, match="holds none of the model's directions"):
        mdparam.Retraction(model).attach(opt)


def test_attach_handle_detaches():
    lin = nn.Linear(4, 4)
    mdparam.register(lin)
    opt = torch.optim.SGD(mdparam.param_groups(lin, lr=1.0))
    handle = mdparam.Retraction(lin, compile=False).attach(opt)
    handle.remove()
    lin(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert float(lin.parametrizations.weight.original0.norm()) != pytest.approx(2.0)


def test_retraction_needs_a_registered_model():
    with pytest.raises(ValueError, match="call\n?.*mdparam.register"):
        mdparam.Retraction(nn.Linear(3, 3))


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
