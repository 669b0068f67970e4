import pytest
import torch
from torch import nn

import mdparam
from mdparam._layouts import layout_of
from mdparam._retraction import RetractionGroups, retract_
from mdparam._sphere import sphere_of


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


def _mixed_model() -> tuple[nn.Module, mdparam.Retraction]:
    """Whole-tensor directions (fp32, bf16, a conv, an 'init' radius) next to row/col spheres."""
    model = nn.Sequential(
        nn.Embedding(10, 8),  # row sphere: per-tensor path
        nn.Linear(8, 12),
        nn.Linear(12, 8),  # col sphere (override): per-tensor path
        nn.Linear(8, 8).bfloat16(),
        nn.Conv1d(8, 6, 3),
        nn.Linear(6, 5),
    )
    mdparam.register(
        model, layers="all", overrides={"2": {"sphere": "col"}, "5": {"radius": "init"}}
    )
    return model, mdparam.Retraction(model)


def test_retraction_groups_whole_tensors_by_dtype_and_leaves_row_and_col_spheres_alone():
    _, retract = _mixed_model()
    chunked = [retract.names[i] for c in retract.groups.chunks for i in c]
    rest = [retract.names[i] for i in retract.groups.rest]
    assert sorted(chunked) == ["1.weight", "3.weight", "4.weight", "5.weight"]
    assert sorted(rest) == ["0.weight", "2.weight"]
    for chunk in retract.groups.chunks:  # one dtype per chunk
        assert len({retract.directions[i].dtype for i in chunk}) == 1
    batched = RetractionGroups([torch.randn(2, 4, 5)], [sphere_of("flat")], [layout_of("batched")])
    assert batched.chunks == [] and batched.rest == [0]  # one norm per matrix, not per tensor
    small = torch.randn(4, 4)
    split = RetractionGroups(
        [small] * 3, [sphere_of("flat")] * 3, [layout_of("linear")] * 3, chunk_bytes=128
    )
    assert split.chunks == [[0, 1], [2]]


def test_grouped_retraction_matches_the_per_tensor_loop():
    _, retract = _mixed_model()
    torch.manual_seed(0)
    with torch.no_grad():
        for d in retract.directions:
            d.mul_(torch.rand_like(d) + 0.5)
    before = [d.detach().clone() for d in retract.directions]
    expected_norms = retract_(before, retract.spheres, retract.layouts, retract.radii())
    with torch.no_grad():
        norms = retract.retract_tensors()
    for name, d, want in zip(retract.names, retract.directions, before):
        tol = 1e-2 if d.dtype == torch.bfloat16 else 1e-6
        assert torch.allclose(d.detach().float(), want.float(), rtol=tol, atol=tol * 1e-2), name
    for n, want in zip(norms, expected_norms):
        assert torch.allclose(n.float().reshape(-1), want.float().reshape(-1), rtol=1e-5)
    retract()  # on the sphere already: the check passes and nothing moves
    for d, want in zip(retract.directions, before):
        assert torch.allclose(d.detach().float(), want.float(), rtol=1e-2, atol=1e-4)
