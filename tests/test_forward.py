"""The factored forward y = phi(r) * ((x * phi(c)) @ D^T) against W formed, and the auto rule."""

import copy

import pytest
import torch
import torch._dynamo
from conftest import rel_err
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import mdparam
from mdparam._forward import factored_is_cheaper
from mdparam._gains import GAINS
from mdparam._maps import GAIN_MAPS


def _layer(bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40, bias=bias), nn.GELU(), nn.Linear(40, 16, bias=bias))


def _grads(model, x):
    model.zero_grad()
    out = model(x)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("gains", GAINS)
@pytest.mark.parametrize("sphere", ["flat", "row", "col"])
@pytest.mark.parametrize("gain_map", GAIN_MAPS)
def test_factored_equals_formed_values_and_gradients(gains, sphere, gain_map):
    formed = _layer()
    mdparam.register(formed, gains=gains, sphere=sphere, gain_map=gain_map, init="sphere")
    with torch.no_grad():  # gains away from 1, so that every factor matters
        for e in mdparam.registered(formed):
            for g in e.gains:
                g.add_(torch.rand_like(g) * 0.5)
    factored = copy.deepcopy(formed)
    for e in mdparam.registered(factored):
        mdparam._forward.install_forward(e.module, "factored")
    x = torch.randn(3, 5, 24)
    y1, g1 = _grads(formed, x)
    y2, g2 = _grads(factored, x)
    assert rel_err(y2, y1) <= 1e-5
    for a, b in zip(g1, g2):
        assert rel_err(b, a) <= 1e-5


def test_auto_takes_the_factored_form_for_few_tokens_only(monkeypatch):
    assert factored_is_cheaper(8, 512, 512) and not factored_is_cheaper(1024, 512, 512)
    model = _layer()
    mdparam.register(model, forward="auto")
    directions = {id(e.direction) for e in mdparam.registered(model)}
    used = []  # per call of F.linear: was the weight D itself (factored) or a formed W?
    real = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        used.append("factored" if id(weight) in directions else "formed")
        return real(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    model(torch.randn(2, 24))  # 2 tokens: the factored form is cheaper for both layers
    model(torch.randn(100, 24))  # 100 x (24 + 40) > 24 x 40: W formed
    assert used == ["factored", "factored", "formed", "formed"]


def test_the_choice_adds_no_graph_break_and_no_recompile_for_one_shape():
    torch._dynamo.reset()
    model = _layer()
    mdparam.register(model, forward="auto")
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for tokens in (2, 2, 2):
        compiled(torch.randn(tokens, 24)).sum().backward()
    assert counter.frame_count == 1  # one graph, traced once
    eager = copy.deepcopy(model)
    x = torch.randn(2, 24)
    assert rel_err(compiled(x), eager(x)) <= 1e-6


def test_forward_option_round_trips_through_remove_and_refuses_bad_values():
    model = _layer()
    mdparam.register(model, forward="factored")
    assert "forward" in vars(model[0])
    mdparam.remove(model)
    assert "forward" not in vars(model[0])  # the plain Linear's own forward again
    with pytest.raises(ValueError, match="unknown forward='fast'"):
        mdparam.register(_layer(), forward="fast")
    with pytest.raises(ValueError, match="forward='factored' is for nn.Linear"):
        mdparam.register(nn.Sequential(nn.Embedding(5, 4)), layers="all", forward="factored")
