import copy
import itertools
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import FusedExperts, rel_err, tiny_gpt
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mdparam
from mdparam._gains import GAINS, gain_kind_of
from mdparam._maps import GAIN_MAPS
from mdparam._sphere import SPHERES, sphere_of

COMBOS = list(itertools.product(GAINS, SPHERES, GAIN_MAPS))
TOKENS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))


def radius_for(gains, sphere):
    # Where the gains cannot take up the sphere's norm, only radius="init" preserves.
    return "shape" if sphere_of(sphere).can_absorb(gain_kind_of(gains)) else "init"


@pytest.mark.parametrize("tie_head", [False, True])
@pytest.mark.parametrize(("gains", "sphere", "gain_map"), COMBOS)
def test_register_preserves_gpt_logits(tie_head, gains, sphere, gain_map):
    model = tiny_gpt(tie_head=tie_head)
    before = model(TOKENS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = mdparam.register(
            model, gains=gains, sphere=sphere, gain_map=gain_map, radius=radius_for(gains, sphere)
        )
    assert "blocks.0.attn.q.weight" in names and "blocks.1.mlp.down.weight" in names
    assert ("head.weight" in names) is (not tie_head)
    assert rel_err(model(TOKENS), before) <= 1e-5


@settings(max_examples=60, deadline=None)
@given(
    d_out=st.integers(1, 48),
    d_in=st.integers(1, 48),
    log_scale=st.floats(-6, 4),
    combo=st.sampled_from(COMBOS),
    seed=st.integers(0, 2**16),
)
def test_register_preserves_random_shapes(d_out, d_in, log_scale, combo, seed):
    gains, sphere, gain_map = combo
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.mul_(10.0**log_scale)
    w = lin.weight.detach().clone()
    mdparam.register(
        lin, gains=gains, sphere=sphere, gain_map=gain_map, radius=radius_for(gains, sphere)
    )
    assert rel_err(lin.weight.detach(), w) <= 1e-5
    d = lin.parametrizations.weight.original0
    norms = sphere_of(sphere).norm(d.detach())
    target = lin.parametrizations.weight[0].sphere_radius()
    assert torch.allclose(
        norms, torch.as_tensor(target, dtype=norms.dtype).expand_as(norms), rtol=1e-5
    )


@pytest.mark.parametrize("gain_map", GAIN_MAPS)
def test_sphere_init_starts_with_unit_gains_and_projected_direction(gain_map):
    model = tiny_gpt()
    w = model.blocks[0].mlp.up.weight.detach().clone()
    mdparam.register(model, init="sphere", gain_map=gain_map)
    plist = model.blocks[0].mlp.up.parametrizations.weight
    from mdparam._maps import gain_map_of

    for g in (plist.original1, plist.original2):
        assert torch.allclose(gain_map_of(gain_map)(g.detach()), torch.ones_like(g))
    d = plist.original0.detach()
    assert float(d.norm()) == pytest.approx((4 * 32) ** 0.5, rel=1e-6)
    assert torch.allclose(d / d.norm(), w / w.norm(), atol=1e-6)
    assert torch.allclose(model.blocks[0].mlp.up.weight, d)


def test_sphere_init_works_for_pure_sphere():
    model = tiny_gpt()
    mdparam.register(model, gains="none", init="sphere")
    d = model.blocks[0].attn.q.parametrizations.weight.original0
    assert model.blocks[0].attn.q.parametrizations.weight.ntensors == 1
    assert float(d.detach().norm()) == pytest.approx(32**0.5, rel=1e-6)


def test_include_exclude_globs_and_predicates():
    model = tiny_gpt()
    names = mdparam.register(model, include="blocks.*.attn.*", exclude=["*.o", "*.k.weight"])
    assert names == [
        "blocks.0.attn.q.weight",
        "blocks.0.attn.v.weight",
        "blocks.1.attn.q.weight",
        "blocks.1.attn.v.weight",
    ]
    model = tiny_gpt()
    names = mdparam.register(model, include=lambda name, m: m.out_features == 128)
    assert names == ["blocks.0.mlp.up.weight", "blocks.1.mlp.up.weight"]


def test_bias_is_untouched():
    lin = nn.Linear(4, 3)
    bias = lin.bias
    mdparam.register(lin)
    assert lin.bias is bias and "bias" in dict(lin.named_parameters())


# --- ties -------------------------------------------------------------------


def test_tied_head_is_left_out_with_a_warning_and_stays_tied():
    model = tiny_gpt(tie_head=True)
    with pytest.warns(UserWarning, match=r"head\.weight \(tied to tok\.weight\).*tied='share'"):
        names = mdparam.register(model)
    assert "head.weight" not in names
    assert model.head.weight is model.tok.weight
    opt = torch.optim.AdamW(mdparam.param_groups(model, lr=1e-2))
    mdparam.Retraction(model, compile=False).attach(opt)
    for _ in range(3):
        model.loss(TOKENS, TOKENS).backward()
        opt.step()
        opt.zero_grad()
    assert model.head.weight is model.tok.weight


def test_tied_share_keeps_one_direction_and_the_function():
    model = tiny_gpt(tie_head=True)
    before = model(TOKENS)
    names = mdparam.register(model, tied="share")
    assert "head.weight" in names and "tok.weight" in names
    head, tok = model.head.parametrizations.weight, model.tok.parametrizations.weight
    assert head.original0 is tok.original0 and head.original1 is tok.original1
    assert rel_err(model(TOKENS), before) <= 1e-5
    opt = torch.optim.AdamW(mdparam.param_groups(model, lr=1e-2))
    mdparam.Retraction(model, compile=False).attach(opt)
    model.loss(TOKENS, TOKENS).backward()
    opt.step()
    assert torch.equal(model.head.weight, model.tok.weight)
    mdparam.remove(model)
    assert model.head.weight is model.tok.weight


def test_tied_error_mode_raises():
    with pytest.raises(RuntimeError, match="tied to"):
        mdparam.register(tiny_gpt(tie_head=True), tied="error")


# --- state, copies, removal -------------------------------------------------


def test_state_dict_loads_into_another_registered_model():
    a, b = tiny_gpt(seed=0), tiny_gpt(seed=1)
    mdparam.register(a)
    mdparam.register(b)
    opt = torch.optim.AdamW(mdparam.param_groups(a, lr=1e-2))
    a.loss(TOKENS, TOKENS).backward()
    opt.step()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(TOKENS), b(TOKENS))


def test_deepcopy_works_and_removing_from_the_copy_leaves_the_original_intact():
    model = tiny_gpt()
    mdparam.register(model)
    before = model(TOKENS)
    twin = copy.deepcopy(model)
    assert torch.equal(twin(TOKENS), before)
    mdparam.remove(twin)
    assert type(twin.head) is nn.Linear
    assert torch.equal(model(TOKENS), before)  # the original still has its property
    assert rel_err(twin(TOKENS), before) <= 1e-6


def test_remove_gives_back_plain_modules_with_the_same_function():
    model = tiny_gpt()
    plain_names = sorted(n for n, _ in model.named_parameters())
    names = mdparam.register(model)
    opt = torch.optim.AdamW(mdparam.param_groups(model, lr=1e-2))
    model.loss(TOKENS, TOKENS).backward()
    opt.step()
    before = model(TOKENS)
    assert mdparam.remove(model) == names
    assert not any(type(m).__name__.startswith("Parametrized") for m in model.modules())
    assert sorted(n for n, _ in model.named_parameters()) == plain_names
    assert rel_err(model(TOKENS), before) <= 1e-6
    assert mdparam.register(model) == names  # and it can be registered again


def test_failed_register_leaves_the_model_as_it_was():
    model = tiny_gpt()
    with torch.no_grad():
        model.blocks[1].mlp.down.weight.zero_()  # zero weight: no direction
    params = dict(model.named_parameters())
    before = model(TOKENS)
    with pytest.raises(ValueError, match=r"'blocks\.1\.mlp\.down\.weight'.*norm zero"):
        mdparam.register(model)
    assert dict(model.named_parameters()) == params
    assert not mdparam.registered(model)
    assert torch.equal(model(TOKENS), before)


# --- meta device and initialisation -----------------------------------------


def test_meta_device_path_matches_a_plain_init():
    torch.manual_seed(3)
    plain = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    mdparam.register(model)
    model.to_empty(device="cpu")
    torch.manual_seed(3)
    mdparam.reinitialize(model)
    for i in (0, 2):
        assert rel_err(model[i].weight.detach(), plain[i].weight.detach()) <= 1e-6
        assert torch.equal(model[i].bias, plain[i].bias)
        d = model[i].parametrizations.weight.original0
        assert float(d.norm()) == pytest.approx(32**0.5, rel=1e-6)


def test_reset_parameters_on_a_registered_module_changes_nothing_but_reinitialize_does():
    lin = nn.Linear(8, 8)
    mdparam.register(lin)
    w = lin.weight.detach().clone()
    lin.reset_parameters()  # the documented trap: writes into a temporary
    assert torch.equal(lin.weight, w)
    mdparam.reinitialize(
        lin, lambda m: nn.init.constant_(m.weight, 0.5) if isinstance(m, nn.Linear) else None
    )
    assert torch.allclose(lin.weight, torch.full((8, 8), 0.5))


def test_assignment_goes_through_right_inverse():
    lin = nn.Linear(6, 4)
    mdparam.register(lin)
    target = torch.randn(4, 6) * 3
    lin.weight = target
    assert rel_err(lin.weight.detach(), target) <= 1e-6
    assert float(lin.parametrizations.weight.original0.norm()) == pytest.approx(6**0.5, rel=1e-6)


def test_radius_options():
    lin = nn.Linear(6, 4)
    mdparam.register(lin, radius=2.5)
    assert float(lin.parametrizations.weight.original0.norm()) == pytest.approx(2.5, rel=1e-6)
    lin = nn.Linear(6, 4)
    norm = float(lin.weight.norm())
    mdparam.register(lin, radius="init")
    assert lin.parametrizations.weight[0].sphere_radius() == pytest.approx(norm)


# --- errors -----------------------------------------------------------------


def test_registering_twice_is_refused():
    model = tiny_gpt()
    mdparam.register(model)
    with pytest.raises(RuntimeError, match=r"already registered.*mdparam.remove"):
        mdparam.register(model)


def test_another_parametrization_is_refused():
    lin = nn.Linear(4, 4)
    nn.utils.parametrizations.orthogonal(lin)
    with pytest.raises(RuntimeError, match="another parametrization"):
        mdparam.register(lin)


def test_no_match_is_an_error_that_lists_the_candidates():
    with pytest.raises(ValueError, match=r"no layer matched.*blocks\.0\.attn\.q\.weight"):
        mdparam.register(tiny_gpt(), include="decoder.*")
    with pytest.raises(ValueError, match="no layer of the kinds asked for"):
        mdparam.register(nn.Sequential(nn.ReLU()))


def test_non_floating_weight_is_refused():
    lin = nn.Linear(4, 4)
    lin.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="not a floating-point tensor.*exclude"):
        mdparam.register(lin)


def test_non_matrix_weight_is_refused():
    lin = nn.Linear(4, 4)
    lin.weight = nn.Parameter(torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match=r"shape \(2, 4, 4\), not a matrix"):
        mdparam.register(lin)


def test_compiled_model_is_refused():
    model = torch.compile(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(RuntimeError, match="Register first, then compile"):
        mdparam.register(model)
    inner = nn.Sequential(nn.Linear(4, 4))
    inner[0].compile()
    with pytest.raises(RuntimeError, match="compiled in place"):
        mdparam.register(inner)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gains": "diag"}, "unknown gains='diag'"),
        ({"sphere": "ball"}, "unknown sphere='ball'"),
        ({"gain_map": "sigmoid"}, "unknown gain_map='sigmoid'"),
        ({"init": "random"}, "unknown init='random'"),
        ({"tied": "maybe"}, "unknown tied='maybe'"),
        ({"radius": "wide"}, "unknown radius='wide'"),
        ({"radius": -1.0}, "positive finite"),
        ({"gains": "none"}, "cannot take up the norm.*radius='init'.*init='sphere'"),
        ({"sphere": "row", "gains": "col"}, "cannot take up the norm"),
    ],
)
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mdparam.register(nn.Linear(4, 4), **kwargs)


@pytest.mark.slow  # starts a process with a process group
def test_fsdp2_sharded_model_is_refused():
    script = textwrap.dedent(
        """
        import os, torch, torch.distributed as dist
        from torch.distributed.fsdp import fully_shard
        import mdparam
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # no port
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        fully_shard(model)
        try:
            mdparam.register(model)
        except RuntimeError as e:
            print("ERROR:", e)
        dist.destroy_process_group()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert "ERROR:" in out.stdout, out.stderr
    assert "register -> fully_shard" in out.stdout and "before fully_shard" in out.stdout


def test_overrides_can_make_a_call_level_combination_valid():
    # gains="none" cannot preserve the function, but the override asks for init="sphere".
    model = nn.Sequential(nn.Linear(4, 4))
    names = mdparam.register(model, gains="none", overrides={nn.Linear: {"init": "sphere"}})
    assert names == ["0.weight"]
    with pytest.raises(ValueError, match="init='sphere'"):
        mdparam.register(nn.Sequential(nn.Linear(4, 4)), gains="none")


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
