"""The from-scratch recipe and its knobs: start, per-layer radius, clipping scope, gain LR."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err, sphere_error, tiny_gpt
from torch import nn

import mdparam
from mdparam._clipping import fused_grad_norm
from mdparam._maps import gain_map_of
from mdparam._optim import muon_param_groups


def _batch(seed=0, vocab=64, t=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (4, t), generator=g)
    return x, torch.roll(x, -1, 1)


def _loss(model, seed=0):
    x, y = _batch(seed)
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


OUT = ("blocks.*.attn.o", "blocks.*.mlp.down")


# --- the start -----------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_recipe_starts_from_the_sphere_with_unit_gains(optimizer):
    model = tiny_gpt()
    train = mdparam.recipe(model, optimizer, lr=0.02, head="head")
    # Muon's recipe puts embeddings and head on unit rows too; AdamW's leaves them plain
    aux = {"tok.weight", "pos.weight", "head.weight"}
    assert (aux <= set(train.registered)) == (optimizer == "muon")
    entries = mdparam.registered(model)
    assert len(entries) == 12 + (3 if optimizer == "muon" else 0)  # 6 linears per block
    for e in entries:
        d = e.direction.detach()
        if e.name in aux:
            assert torch.allclose(d.norm(dim=1), torch.ones(d.shape[0]), atol=1e-5)
        else:
            d_out, d_in = e.config.matrix_shape
            assert float(d.norm()) == pytest.approx(math.sqrt(max(d_out, d_in)))
        for g in e.gains:
            assert torch.allclose(gain_map_of("softplus")(g.detach()), torch.ones(()))


def test_preserve_stays_exact_through_the_recipe():
    model = tiny_gpt()
    x, _ = _batch()
    before = model(x)
    mdparam.recipe(model, "adamw", lr=0.01, head="head", init="preserve")
    assert rel_err(model(x), before) < 1e-5


def test_the_paper_start_changes_the_function_preserve_keeps_it():
    plain = tiny_gpt()
    x, _ = _batch()
    sphere = copy.deepcopy(plain)
    mdparam.recipe(sphere, "adamw", lr=0.01, head="head")
    assert rel_err(sphere(x), plain(x)) > 1e-2  # the GPT-2 init is far from the sphere start


# --- per-layer radius ------------------------------------------------------------------------


def test_radius_scale_shrinks_the_sphere_of_the_matched_layers_only():
    model = tiny_gpt()
    s = 1 / math.sqrt(4)
    mdparam.register(model, init="sphere", overrides={k: {"radius_scale": s} for k in OUT})
    for e in mdparam.registered(model):
        d_out, d_in = e.config.matrix_shape
        want = math.sqrt(max(d_out, d_in)) * (
            s if e.name.endswith(("o.weight", "down.weight")) else 1
        )
        assert float(e.direction.detach().norm()) == pytest.approx(want, rel=1e-6)
        assert e.parametrization.radius_scale == (s if want < math.sqrt(max(d_out, d_in)) else 1.0)
    model(_batch()[0]).sum().backward()
    opt = torch.optim.AdamW(mdparam.param_groups(model, lr=0.1))
    mdparam.Retraction(model).attach(opt)
    opt.step()
    assert sphere_error(model) < 1e-5  # the retraction keeps the smaller radius


def test_radius_scale_keeps_preserve_exact():
    model = tiny_gpt()
    x, _ = _batch()
    before = model(x)
    mdparam.register(model, overrides={"blocks.*.mlp.down": {"radius_scale": 0.3}})
    assert rel_err(model(x), before) < 1e-5


def test_radius_scale_scales_the_adamw_lr_and_the_muon_step():
    model = tiny_gpt()
    mdparam.register(model, init="sphere", overrides={"blocks.*.attn.o": {"radius_scale": 0.5}})
    o_dirs = {id(e.direction) for e in mdparam.registered(model) if ".attn.o." in e.name}
    groups = mdparam.param_groups(model, lr=0.01)
    for g in groups:
        if g["mdparam_role"] == "direction":
            scaled = {id(p) for p in g["params"]} <= o_dirs
            assert g["lr"] == pytest.approx(0.005 if scaled else 0.01)
    # Muon: the step of a scaled layer is lr x its (smaller) radius, the relative step stays lr
    muon_groups = muon_param_groups(model, lr=0.01)
    lr_of = {id(p): g["lr"] for g in muon_groups for p in g["params"]}
    entries = {e.name: e for e in mdparam.registered(model)}
    o, q = (entries[f"blocks.0.attn.{n}.weight"].direction for n in "oq")  # same shape
    assert lr_of[id(o)] == pytest.approx(0.5 * lr_of[id(q)])
    muon = torch.optim.Muon(muon_groups)
    model(_batch()[0]).square().mean().backward()
    before = {n: e.direction.detach().clone() for n, e in entries.items()}
    muon.step()
    for name in ("blocks.0.attn.o.weight", "blocks.0.attn.q.weight"):
        step = float((entries[name].direction.detach() - before[name]).norm())
        # Newton-Schulz leaves singular values in about [0.5, 1.5]
        assert 0.5 * 0.01 < step / float(before[name].norm()) < 1.5 * 0.01


def test_radius_scale_rejects_bad_values():
    with pytest.raises(ValueError, match="radius_scale must be a positive"):
        mdparam.register(tiny_gpt(), radius_scale=0.0)
    with pytest.raises(ValueError, match="radius_scale must be a positive"):
        mdparam.register(tiny_gpt(), overrides={"blocks.*": {"radius_scale": float("nan")}})


# --- clipping scope --------------------------------------------------------------------------


def _pair():
    """A plain model and a registered copy computing the same function (gains away from 1)."""
    plain = tiny_gpt()
    md = copy.deepcopy(plain)
    mdparam.register(md, exclude="head")  # preserve: the gains take the weights' norms
    _loss(plain).backward()
    _loss(md).backward()
    return plain, md


def _implied_weight_grads(md):
    """dL/dW of each registered layer, recovered as dL/dD / (phi(r) phi(c))."""
    out = {}
    for e in mdparam.registered(md):
        r, c = (gain_map_of("softplus")(g.detach()) for g in e.gains)
        out[e.name] = e.direction.grad / (r[:, None] * c[None, :])
    return out


def test_fused_norm_is_the_plain_models_gradient_norm():
    plain, md = _pair()
    want = torch.nn.utils.get_total_norm([p.grad for p in plain.parameters()])
    assert float(fused_grad_norm(md)) == pytest.approx(float(want), rel=1e-4)
    # and not the norm over directions and gains, which is what scope="all" measures
    over_leaves = torch.nn.utils.get_total_norm([p.grad for p in md.parameters()])
    assert abs(float(over_leaves) - float(want)) / float(want) > 0.05


def test_fused_clipping_equals_clipping_the_plain_weights_first():
    plain, md = _pair()
    total = float(torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.05))
    assert total > 0.05  # the limit bites
    got = float(mdparam.clip_grad_norm_(md, 0.05, scope="fused"))
    assert got == pytest.approx(total, rel=1e-4)
    plain_grads = dict(plain.named_parameters())
    for name, dw in _implied_weight_grads(md).items():
        assert rel_err(dw, plain_grads[name].grad) < 1e-4
    assert rel_err(md.ln_f.weight.grad, plain.ln_f.weight.grad) < 1e-5
    assert float(fused_grad_norm(md)) == pytest.approx(0.05, rel=1e-4)


def test_all_scope_is_torchs_clipping_over_directions_and_gains():
    _, md = _pair()
    ref = copy.deepcopy(md)
    for p, q in zip(md.parameters(), ref.parameters()):
        q.grad = p.grad.clone()
    got = mdparam.clip_grad_norm_(md, 0.05, scope="all")
    want = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.05)
    assert float(want) > 0.05  # the limit bites
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    for p, q in zip(md.parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-6  # the same, to rounding (another summation order)


def test_clipping_rejects_bad_arguments():
    _, md = _pair()
    with pytest.raises(ValueError, match="unknown clip scope"):
        mdparam.clip_grad_norm_(md, 1.0, scope="weights")
    for bad in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="positive number"):
            mdparam.clip_grad_norm_(md, bad)


def test_clipping_at_infinity_only_measures():
    _, md = _pair()
    params = [p for p in md.parameters() if p.grad is not None]
    grads = [p.grad.clone() for p in params]
    norm = mdparam.clip_grad_norm_(md, float("inf"))
    assert float(norm) > 0
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, params))
    assert float(mdparam.clip_grad_norm_(md, float(norm) / 2)) == pytest.approx(float(norm))
    assert float(mdparam.clip_grad_norm_(md, float("inf"))) == pytest.approx(float(norm) / 2)


# --- the recipe's step -----------------------------------------------------------------------


def test_fused_recipe_sets_the_gain_lr_and_the_other_lr():
    model = tiny_gpt()
    train = mdparam.recipe(
        model, "muon", lr=0.02, gain_lr=7e-4, other_lr=2e-3, head="head", compile=False
    )
    (opt,) = train.optimizers
    by = {(g["mdparam_role"], g.get("update")): g for g in opt.param_groups}
    assert float(by["gain", None]["lr"]) == pytest.approx(7e-4)  # fp32 tensors: no recompiles
    assert float(by["other", None]["lr"]) == pytest.approx(2e-3)
    assert by["other", None]["weight_decay"] == 0.0
    hidden = {id(e.direction) for e in mdparam.registered(model) if e.name.startswith("blocks.")}
    assert {id(p) for p in by["direction", "muon"]["params"]} == hidden
    aux = by["direction", "adamw"]  # embeddings and head (unit rows): AdamW at other_lr
    assert float(aux["lr"]) == pytest.approx(2e-3) and len(aux["params"]) == 3


def test_recipe_sets_the_gain_lr_and_the_other_lr():
    model = tiny_gpt()
    train = mdparam.recipe(
        model, "muon", lr=0.02, gain_lr=7e-4, other_lr=2e-3, head="head", fused=False
    )
    adamw, muon = train.optimizers
    roles = {g["mdparam_role"]: g for g in adamw.param_groups if g["mdparam_role"] != "direction"}
    assert roles["gain"]["lr"] == 7e-4 and roles["gain"]["weight_decay"] == 0.0
    assert roles["other"]["lr"] == 2e-3 and roles["other"]["weight_decay"] == 0.0
    assert all(g["mdparam_role"] == "direction" for g in muon.param_groups)
    held = {id(p) for g in muon.param_groups for p in g["params"]}
    hidden = {id(e.direction) for e in mdparam.registered(model) if e.name.startswith("blocks.")}
    assert held == hidden  # embeddings and head (unit rows) go to AdamW at other_lr
    aux = [g for g in adamw.param_groups if g["mdparam_role"] == "direction"]
    assert len(aux) == 1 and aux[0]["lr"] == 2e-3 and len(aux[0]["params"]) == 3


@pytest.mark.parametrize("head_mode", ["sphere", "sphere-gains"])
def test_embeddings_and_head_on_a_unit_row_sphere(head_mode):
    model = tiny_gpt()
    train = mdparam.recipe(
        model, "muon", lr=0.02, steps=10, head="head", head_mode=head_mode, embeddings="sphere"
    )
    entries = {e.name: e for e in mdparam.registered(model)}
    for name in ("tok.weight", "pos.weight", "head.weight"):
        e = entries[name]
        assert e.config.sphere == "row"
        row_norms = e.direction.detach().norm(dim=1)
        assert torch.allclose(row_norms, torch.ones_like(row_norms), atol=1e-5)
    assert entries["tok.weight"].config.gains == "none"
    assert entries["head.weight"].config.gains == (
        "rowcol" if head_mode == "sphere-gains" else "none"
    )
    muon_ids = {
        id(p)
        for g in train.optimizers[-1].param_groups
        if g.get("update") == "muon"
        for p in g["params"]
    }
    for name in ("tok.weight", "pos.weight", "head.weight"):
        assert id(entries[name].direction) not in muon_ids  # Adam steps them, not Muon
    for _ in range(3):
        _loss(model).backward()
        train.step()
    # every direction, the AdamW-stepped ones included, is back on its sphere
    assert sphere_error(model) < 1e-5


def test_relative_step_applies_to_hidden_directions_only():
    model = tiny_gpt()
    train = mdparam.recipe(
        model, "adamw", lr=0.01, head="head", head_mode="sphere", embeddings="sphere"
    )
    entries = {e.name: e for e in mdparam.registered(model)}
    before = {n: e.direction.detach().clone() for n, e in entries.items()}
    _loss(model).backward()
    train.step()
    q = "blocks.0.attn.q.weight"
    step = float((entries[q].direction.detach() - before[q]).norm() / before[q].norm())
    assert step == pytest.approx(0.01, rel=1e-3)
    # the head's rows moved by AdamW's own step, not rescaled to lr per row
    head_steps = (entries["head.weight"].direction.detach() - before["head.weight"]).norm(dim=1)
    assert not torch.allclose(head_steps, torch.full_like(head_steps, 0.01), rtol=0.1)


def test_recipe_decays_the_lr_linearly_without_warmup():
    model = tiny_gpt()
    train = mdparam.recipe(model, "adamw", lr=0.01, steps=4, head="head")
    seen = []
    for _ in range(4):
        seen.append(float(train.optimizers[0].param_groups[0]["lr"]))
        _loss(model).backward()
        train.step()
    assert seen == pytest.approx([0.01, 0.0075, 0.005, 0.0025])


def test_recipe_clips_with_its_scope():
    model = tiny_gpt()
    train = mdparam.recipe(model, "adamw", lr=0.01, head="head", clip=1e-3)
    (_loss(model) * 100).backward()
    norm = train.step()
    assert float(norm) > 1e-3
    model2 = tiny_gpt()
    train2 = mdparam.recipe(model2, "adamw", lr=0.01, head="head", clip=None)
    (_loss(model2) * 100).backward()
    assert train2.step() is None


def test_recipe_resumes_from_its_state_dict(tmp_path):
    def run(steps, state=None, weights=None):
        model = tiny_gpt()
        train = mdparam.recipe(model, "muon", lr=0.02, steps=6, head="head")
        if state is not None:
            mdparam.load_training(model, weights)
            train.load_state_dict(state)
        for i in range(steps):
            _loss(model, seed=i).backward()
            train.step()
        return model, train

    full, _ = run(4)
    half, train = run(2)
    mdparam.save_training(half, tmp_path / "t.safetensors")
    state = train.state_dict()
    resumed = tiny_gpt()
    train2 = mdparam.recipe(resumed, "muon", lr=0.02, steps=6, head="head")
    mdparam.load_training(resumed, tmp_path / "t.safetensors")
    train2.load_state_dict(state)
    for i in range(2, 4):
        _loss(resumed, seed=i).backward()
        train2.step()
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n


def test_a_registered_model_keeps_its_registration():
    # register (preserve) for trained weights, or register_for_recipe then shard: the recipe
    # builds on the registration it finds instead of registering again
    model = tiny_gpt()
    x, _ = _batch()
    before = model(x)
    names = mdparam.register(model)
    train = mdparam.recipe(model, "adamw", lr=0.01, head="head")
    assert train.registered == names and rel_err(model(x), before) < 1e-5
    two_step = tiny_gpt()
    names = mdparam.register_for_recipe(two_step, "muon", head="head")
    assert mdparam.recipe(two_step, "muon", lr=0.02, head="head").registered == names
    assert {"tok.weight", "head.weight"} <= set(names)  # Muon's choice: unit rows


def test_recipe_errors_say_what_to_do():
    with pytest.raises(ValueError, match="unknown optimizer='sgd'"):
        mdparam.recipe(tiny_gpt(), "sgd", lr=0.01)
    with pytest.raises(ValueError, match="unknown head_mode"):
        mdparam.recipe(tiny_gpt(), "adamw", lr=0.01, head="head", head_mode="row")
    with pytest.raises(ValueError, match="nothing is left"):
        mdparam.recipe(
            nn.Sequential(nn.Linear(4, 4)), "adamw", lr=0.01, head="0", head_mode="sphere"
        )


def test_preserve_applies_to_the_hidden_matrices_and_unit_spheres_start_on_them():
    model = tiny_gpt()
    plain = copy.deepcopy(model)
    mdparam.recipe(model, "muon", lr=0.02, head="head", init="preserve")
    entries = {e.name: e for e in mdparam.registered(model)}
    # hidden: the same weights as before (the gains took up the norms)
    assert rel_err(model.blocks[0].mlp.up.weight, plain.blocks[0].mlp.up.weight) < 1e-5
    # embeddings and head: on their unit rows (no gains could keep their weights)
    d = entries["tok.weight"].direction.detach()
    assert torch.allclose(d.norm(dim=1), torch.ones(d.shape[0]), atol=1e-5)


def test_muon_optimizers_and_the_muon_recipe_are_built_alike_with_the_same_defaults():
    def lrs(opt, role):
        return {round(float(g["lr"]), 8) for g in opt.param_groups if g["mdparam_role"] == role}

    by_hand = tiny_gpt()
    mdparam.register(by_hand, init="sphere")
    muon, adamw = mdparam.muon_optimizers(by_hand, lr=0.02)
    train = mdparam.recipe(tiny_gpt(), "muon", lr=0.02, head="head", fused=False, compile=False)
    recipe_adamw, recipe_muon = train.optimizers
    assert lrs(adamw, "gain") == lrs(recipe_adamw, "gain") == {1e-3}
    assert lrs(adamw, "other") == lrs(recipe_adamw, "other") == {1e-2}
    # the recipe keeps the head on a row sphere in AdamW; the blocks' groups are the same
    assert lrs(recipe_muon, "direction") and lrs(recipe_muon, "direction") <= lrs(muon, "direction")
    assert recipe_muon.defaults["momentum"] == muon.defaults["momentum"]
