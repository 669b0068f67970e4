"""Layers beyond nn.Linear: each kind registers, keeps its function, stays on its sphere, exports."""

import copy

import pytest
import torch
from conftest import FusedExperts, rel_err, sphere_error
from torch import nn

import mdparam


class Kernel(nn.Module):
    """A custom layer with its matrix under another name: taught with register_adapter."""

    def __init__(self, d_in=6, d_out=5):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(d_out, d_in))

    def forward(self, x):
        return torch.tanh(x @ self.kernel.T)


mdparam.register_adapter(Kernel, {"kernel": "linear"})


def gpt2_conv1d():
    transformers = pytest.importorskip("transformers")
    return transformers.pytorch_utils.Conv1D(7, 5), torch.randn(3, 5)


CASES = {
    "embedding": (lambda: nn.Embedding(20, 6), lambda: torch.randint(0, 20, (4, 3))),
    "conv1d": (lambda: nn.Conv1d(3, 5, 3), lambda: torch.randn(2, 3, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 4, (3, 2), groups=1), lambda: torch.randn(2, 3, 6, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), lambda: torch.randn(1, 2, 4, 4, 4)),
    "gpt2_conv1d": (lambda: gpt2_conv1d()[0], lambda: torch.randn(3, 5)),
    "experts": (FusedExperts, lambda: torch.randn(5, 8)),
    "custom": (Kernel, lambda: torch.randn(4, 6)),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_each_layer_kind(kind):
    torch.manual_seed(0)
    make, inputs = CASES[kind]
    layer = make()
    x = inputs()
    plain_twin = copy.deepcopy(layer)
    before = layer(x)
    names = mdparam.register(layer, layers="all")
    expected = {"experts": ["gate_up_proj", "down_proj"], "custom": ["kernel"]}.get(
        kind, ["weight"]
    )
    assert names == expected
    assert rel_err(layer(x), before) <= 1e-5  # function preserved

    opt = torch.optim.SGD(mdparam.param_groups(layer, lr=0.5))
    mdparam.Retraction(layer).attach(opt)
    layer(x).float().square().mean().backward()
    opt.step()
    assert sphere_error(layer) <= 1e-5  # on the sphere after a step

    plain_twin.load_state_dict(mdparam.plain_state_dict(layer), strict=True)  # export loads plainly
    assert torch.equal(plain_twin(x), layer(x))


def test_embedding_defaults_to_row_sphere_and_row_gains():
    emb = nn.Embedding(10, 4)
    mdparam.register(emb, layers=[nn.Embedding])
    cfg = mdparam.registered(emb)[0].config
    assert (cfg.sphere, cfg.gains) == ("row", "row")
    emb2 = nn.Embedding(10, 4)
    mdparam.register(
        emb2, layers=[nn.Embedding], overrides={nn.Embedding: {"gains": "none", "radius": "init"}}
    )
    cfg2 = mdparam.registered(emb2)[0].config
    assert (cfg2.sphere, cfg2.gains, cfg2.radius) == ("row", "none", None)
    emb3 = nn.Embedding(10, 4)
    mdparam.register(emb3, layers=[nn.Embedding], gains="rowcol", sphere="flat")  # explicit wins
    assert mdparam.registered(emb3)[0].config.gains == "rowcol"


def test_default_is_linear_only_and_kinds_opt_in_by_type_or_name():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Conv1d(8, 8, 1))
    assert mdparam.register(copy.deepcopy(model)) == ["1.weight"]
    assert mdparam.register(copy.deepcopy(model), layers=[nn.Linear, "2"]) == [
        "1.weight",
        "2.weight",
    ]
    assert mdparam.register(copy.deepcopy(model), layers=[nn.Embedding]) == ["0.weight"]
    assert len(mdparam.register(copy.deepcopy(model), layers="all")) == 3
    with pytest.raises(TypeError, match="nn.Module types or glob strings"):
        mdparam.register(copy.deepcopy(model), layers=[3])


def test_register_adapter_refuses_bad_layouts():
    with pytest.raises(ValueError, match="layout must be one of"):
        mdparam.register_adapter(Kernel, {"kernel": "diagonal"})
    with pytest.raises(ValueError, match="unknown adapter defaults"):
        mdparam.register_adapter(Kernel, {"kernel": "linear"}, colour="red")


def test_experts_have_one_sphere_and_one_set_of_gains_per_expert(tmp_path):
    torch.manual_seed(0)
    experts = FusedExperts(experts=4)
    mdparam.register(experts, layers="all")
    plist = experts.parametrizations.gate_up_proj
    assert plist.original1.shape == (4, 24) and plist.original2.shape == (4, 8)  # (E, out), (E, in)
    norms = plist.original0.detach().flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full((4,), 24**0.5), rtol=1e-6)
    # the converter covers batched layouts too
    from export import convert

    mdparam.save_training(experts, tmp_path / "t.safetensors")
    convert(tmp_path / "t.safetensors", tmp_path / "p.safetensors")
    import safetensors.torch

    plain = FusedExperts(experts=4)
    plain.load_state_dict(safetensors.torch.load_file(tmp_path / "p.safetensors"), strict=True)
    x = torch.randn(3, 8)
    assert torch.equal(plain(x), experts(x))
