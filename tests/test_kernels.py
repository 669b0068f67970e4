"""The hand-written pieces of the fuse: eager autograd function and the gain-map ops."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mdparam
from mdparam._maps import GAIN_MAPS, gain_map_of, gain_map_op
from mdparam._parametrization import MDConfig, ScaleRowsCols, fuse


def test_scale_rows_cols_gradients_match_autograd():
    torch.manual_seed(0)
    d = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)  # batched: (E, out, in)
    a = torch.rand(2, 5, 1, dtype=torch.float64, requires_grad=True) + 0.5
    b = torch.rand(2, 1, 7, dtype=torch.float64, requires_grad=True) + 0.5
    assert torch.autograd.gradcheck(ScaleRowsCols.apply, (d, a, b))
    g = torch.randn(2, 5, 7, dtype=torch.float64)
    ours = torch.autograd.grad(ScaleRowsCols.apply(d, a, b), (d, a, b), g)
    reference = torch.autograd.grad(d * a * b, (d, a, b), g)
    for x, y in zip(ours, reference):
        assert torch.allclose(x, y)


def test_eager_fuse_equals_the_plain_formula_bitwise():
    cfg = MDConfig("rowcol", "flat", "softplus", "linear", (64, 48), 8.0)
    d = torch.randn(64, 48, requires_grad=True)
    r, c = torch.randn(64, requires_grad=True), torch.randn(48, requires_grad=True)
    w = fuse(d, (r, c), cfg)  # grad enabled: the autograd function
    with torch.no_grad():
        formula = (d * F.softplus(r)[:, None]) * F.softplus(c)[None, :]
        in_place = fuse(d.clone(), (r, c), cfg, inplace=True)  # the export path
    assert torch.equal(w, formula)
    assert torch.equal(w, in_place)


@pytest.mark.parametrize("gain_map", [m for m in GAIN_MAPS if m != "identity"])
def test_gain_map_op_matches_eager_and_passes_opcheck(gain_map):
    raw = torch.tensor(
        [-30.0, -1.0, 0.0, 0.5, 19.0, 21.0, 40.0], dtype=torch.float64, requires_grad=True
    )
    torch.library.opcheck(gain_map_op, (raw, gain_map))
    assert torch.equal(gain_map_op(raw, gain_map), gain_map_of(gain_map)(raw))
    g = torch.randn_like(raw)
    ours = torch.autograd.grad(gain_map_op(raw, gain_map), raw, g)[0]
    reference = torch.autograd.grad(gain_map_of(gain_map)(raw), raw, g)[0]
    assert torch.allclose(ours, reference)


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
