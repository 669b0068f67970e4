"""The fused step (recipe(fused=True)): the same trajectory as the step that forms w, no stale w.

Trajectories run from one start on fresh batches of a learnable task, the
fused step eager (``compile=False``; one test compiles it). After one step
every d, gain and parameter agrees to 1e-6. Over 50 steps, AdamW with the
relative step agrees to a few 1e-5. Two things amplify last-bit differences
beyond that, in both steps alike: AdamW's per-element step divides by
sqrt(v), so a tiny gradient entry whose last bits differ can move by up to
the LR (as in the distributed tests), and Muon's Newton-Schulz runs in bf16,
where a last-bit difference in its input flips a bf16 rounding. Those cases
get 5e-3 (AdamW without the relative step) and 2e-2 (Muon, whose embeddings
take AdamW at 1e-2) over 50 steps. A real mistake (a radius_scale applied
twice) measured 0.16 over 50 steps and 1e-3 after one.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt

import mdparam
from mdparam._fused_weights import StaleWeightError
from mdparam._parametrization import fuse


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny steps on two threads per pytest worker, two workers on two cores: OpenMP's
    # waiting threads made this file 10x slower than serial. One thread each instead.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batches(n, seed=1, micro=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, 64, (4 * micro, 16), generator=g)
        yield x, (x * 7 + 3) % 64  # learnable: the loss falls from log(64)


def _train(model, train, steps=50, micro=1, autocast=False):
    losses = []
    for x, y in _batches(steps, micro=micro):
        total = 0.0
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(model(xs).flatten(0, 1), ys.flatten()) / micro
            loss.backward()
            total += float(loss.detach())
        train.step()
        losses.append(total)
    return losses


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _both(optimizer="adamw", steps=50, micro=1, autocast=False, **kw):
    out = []
    for fused in (False, True):
        model = tiny_gpt()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback here
            train = mdparam.recipe(
                model,
                optimizer,
                lr=0.02,
                steps=steps,
                head="head",
                fused=fused,
                compile=False,
                **kw,
            )
        assert (train.fused is not None) == fused
        out.append((_train(model, train, steps, micro, autocast), _state(model)))
    return out


CASES = {  # optimizer, recipe options, bound on every state entry after 50 steps
    "adamw": ("adamw", {}, 5e-5),
    "adamw-not-relative": ("adamw", {"relative_step": False}, 5e-3),
    "muon": ("muon", {}, 2e-2),  # embeddings and head on unit row spheres, head with gains
    "clip-active": ("adamw", {"clip": 0.01}, 2e-4),
    "rows-adamw": ("adamw", {"embeddings": "sphere", "head_mode": "sphere-gains"}, 5e-5),
    "radius-scale": ("adamw", {"radius_scale": {"blocks.*.mlp.down": 0.5}}, 1e-4),
    "radius-scale-muon": ("muon", {"radius_scale": {"blocks.*.attn.o": 0.5}}, 2e-2),
}


def _compare(case, steps, tol, **extra):
    optimizer, kw, _ = CASES[case]
    (l0, s0), (l1, s1) = _both(optimizer, steps=steps, **kw, **extra)
    assert s0.keys() == s1.keys()  # no kept w in the state_dict
    loss_diff = max(abs(a - b) for a, b in zip(l0, l1))
    worst = max(float((s0[k] - s1[k]).abs().max()) for k in s0)
    print(f"{case}, {steps} steps: max loss diff {loss_diff:.2e}, state {worst:.2e}")
    assert worst <= tol
    assert loss_diff <= max(tol, 1e-5) / 2
    return l1


@pytest.mark.parametrize("case", list(CASES))
def test_one_fused_step_is_the_formed_step(case):
    _compare(case, 1, 1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_step_follows_the_formed_step_for_50_steps(case):
    losses = _compare(case, 50, CASES[case][2])
    assert losses[-1] < 0.5 * losses[0]  # it learned


@pytest.mark.parametrize("case", ["adamw", "muon"])
def test_fused_step_with_bf16_autocast_and_micro_batches(case):
    # Each matmul reads a bf16 copy of w: a last-bit difference in w flips some of its
    # roundings, so after one step (1e-6) the two runs drift apart at bf16's precision.
    _compare(case, 1, 1e-6, micro=2, autocast=True)
    _compare(case, 50, 5e-2, micro=2, autocast=True)


def _fresh(model):
    """Worst |w - fuse(d, gains)| over the kept weights."""
    worst = 0.0
    for e in mdparam.registered(model):
        if e.parametrization.fused is None:
            continue
        w = e.parametrization.fused.weight
        worst = max(worst, float((w - fuse(e.direction, e.gains, e.config)).abs().max()))
    return worst


def _fused_recipe(seed=0, **kw):
    model = tiny_gpt(seed=seed)
    train = mdparam.recipe(model, "adamw", lr=0.05, head="head", compile=False, **kw)
    _train(model, train, steps=3)
    return model, train


def _grads_without_forward(model):
    """What a compiled forward leaves: dL/dW, with no eager forward that could look at d."""
    for e in mdparam.registered(model):
        if e.parametrization.fused is not None:
            e.parametrization.fused.weight.grad = torch.ones_like(e.parametrization.fused.weight)


def test_a_hand_written_direction_is_refreshed_by_an_eager_forward():
    model, _ = _fused_recipe()
    d = mdparam.registered(model)[0].direction
    before = model.blocks[0].attn.q.weight.detach().clone()
    with torch.no_grad():
        d.mul_(-1)
    x, _ = next(_batches(1))
    model(x)
    assert _fresh(model) == 0.0
    assert torch.allclose(model.blocks[0].attn.q.weight, -before, atol=1e-6)


def test_a_hand_written_gain_is_refused_at_the_step_when_the_forward_could_not_look():
    model, train = _fused_recipe()
    gain = mdparam.registered(model)[1].gains[0]
    with torch.no_grad():
        gain.add_(1.0)
    _grads_without_forward(model)
    d_before = mdparam.registered(model)[1].direction.clone()
    with pytest.raises(StaleWeightError, match="recipe.refresh"):
        train.step()
    assert torch.equal(mdparam.registered(model)[1].direction, d_before)  # no step taken
    assert _fresh(model) == 0.0  # and w is right again


def test_refresh_after_a_hand_write_lets_the_step_go_on():
    model, train = _fused_recipe()
    with torch.no_grad():
        mdparam.registered(model)[2].direction.mul_(2)
    train.refresh()
    _grads_without_forward(model)
    train.step()
    assert _fresh(model) < 1e-6


def test_load_state_dict_recomputes_w_and_its_key_is_neither_saved_nor_missing():
    model, _ = _fused_recipe(seed=0)
    other, _ = _fused_recipe(seed=1)
    state = other.state_dict()
    assert not any("fused_weight" in k for k in state)
    model.load_state_dict(state)  # strict: no missing key
    assert _fresh(model) == 0.0
    assert torch.equal(model.blocks[0].mlp.up.weight, other.blocks[0].mlp.up.weight)


def test_load_training_load_plain_reinitialize_and_remove_leave_no_stale_w(tmp_path):
    model, _ = _fused_recipe(seed=0)
    other, _ = _fused_recipe(seed=1)
    path = mdparam.save_training(other, tmp_path / "t.safetensors")
    mdparam.load_training(model, path)
    assert _fresh(model) == 0.0
    assert torch.equal(model.blocks[1].attn.v.weight, other.blocks[1].attn.v.weight)

    plain = tiny_gpt(seed=2)
    mdparam.load_plain(model, plain.state_dict())
    assert _fresh(model) < 1e-6
    assert torch.allclose(model.blocks[0].attn.k.weight, plain.blocks[0].attn.k.weight, atol=1e-5)

    mdparam.reinitialize(
        model,
        lambda m: torch.nn.init.zeros_(m.bias) if getattr(m, "bias", None) is not None else None,
    )
    assert _fresh(model) < 1e-6

    expected = fuse(*(lambda e: (e.direction, e.gains, e.config))(mdparam.registered(model)[3]))
    name = mdparam.registered(model)[3].name
    mdparam.remove(model)
    assert torch.allclose(model.get_parameter(name), expected)
    assert not any("fused_weight" in n for n, _ in model.named_parameters())


def test_recipe_state_restore_keeps_w_and_continues_the_same_trajectory():
    model, train = _fused_recipe(seed=0)
    saved_model, saved_train = _state(model), copy.deepcopy(train.state_dict())
    after = [*_train(model, train, steps=2)]
    twin, twin_train = _fused_recipe(seed=3)
    twin.load_state_dict(saved_model)
    twin_train.load_state_dict(saved_train)
    assert _fresh(twin) == 0.0
    again = _train(twin, twin_train, steps=2)
    assert again == pytest.approx(after, rel=1e-6)


def test_fallbacks_warn_once_and_say_why_in_the_repr():
    model = tiny_gpt()
    with pytest.warns(UserWarning, match="clip_scope='all'") as caught:
        train = mdparam.recipe(model, "adamw", lr=0.01, head="head", clip_scope="all")
    assert len(caught) == 1
    assert train.fused is None and "fallback" in repr(train) and "clip_scope" in repr(train)
    train2 = mdparam.recipe(tiny_gpt(), "adamw", lr=0.01, head="head", fused=False)
    assert train2.fallback is None and "step='formed'" in repr(train2)


def test_a_second_fused_recipe_on_one_model_says_what_to_do():
    model = tiny_gpt()
    mdparam.recipe(model, "adamw", lr=0.01, head="head", compile=False)
    with pytest.raises(ValueError, match="leave"):
        mdparam.recipe(model, "adamw", lr=0.01, head="head", compile=False)


def test_compiled_fused_step_matches_the_eager_one_and_blocks_share_a_graph():
    models, trains = [], []
    for compile in (False, True):
        model = tiny_gpt(n_layer=3)
        models.append(model)
        trains.append(
            mdparam.recipe(model, "adamw", lr=0.02, steps=8, head="head", compile=compile)
        )
    compiled = torch.compile(models[1], fullgraph=True)
    from torch._dynamo.utils import counters

    counters.clear()
    l0 = _train(models[0], trains[0], steps=8)
    l1 = _train(compiled, trains[1], steps=8)
    assert l1 == pytest.approx(l0, rel=1e-4)
    s0, s1 = _state(models[0]), _state(models[1])
    # inductor rounds otherwise (fused multiply-adds, its order of summing)
    assert max(float((s0[k] - s1[k]).abs().max()) for k in s0) < 5e-4
    assert sum(counters["graph_break"].values()) == 0
    # the step's graphs: a block's sums before clipping and its step (each called for all
    # three identical blocks), the same two for the rest; plus the model's forward and backward
    assert counters["stats"]["unique_graphs"] == 4 + 1
    assert _fresh(models[1]) < 1e-6
