"""mdparam.compile_step: optimizer step + retraction in one compiled function."""

import copy

import pytest
import torch
import torch._dynamo
from conftest import byte_batches, rel_err, sphere_error, tiny_gpt
from torch._dynamo.utils import counters
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import mdparam

OPTS = {
    "adamw": lambda groups: torch.optim.AdamW(groups),
    "sgd": lambda groups: torch.optim.SGD(groups, momentum=0.9),
}


def setup(opt_name, compiled, relative=False, model=None, in_graph=False):
    model = (
        model
        if model is not None
        else tiny_gpt(vocab_size=256, block_size=32, n_embd=32, n_layer=1)
    )
    if not mdparam.registered(model):
        mdparam.register(model)
    opt = OPTS[opt_name](mdparam.param_groups(model, lr=0.02, gain_lr=0.01))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 50)
    # Retraction(compile=True) joins the step's graph; the CPU default runs it after.
    retraction = mdparam.Retraction(model, relative_step=relative, compile=in_graph)
    step = mdparam.compile_step(opt, retraction, compile=compiled, fullgraph=True)
    assert step.retraction_in_graph == in_graph
    return model, opt, sched, step


def run(model, opt, sched, step, batches):
    for x, y in batches:
        model.loss(x, y).backward()
        step()
        sched.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("opt_name", "relative", "in_graph"),
    [
        ("adamw", False, False),
        ("sgd", False, False),
        ("adamw", True, False),
        ("adamw", False, True),
        ("sgd", True, True),
    ],
)
def test_compiled_step_equals_the_eager_step(opt_name, relative, in_graph):
    torch._dynamo.reset()
    counters.clear()
    base = tiny_gpt(vocab_size=256, block_size=32, n_embd=32, n_layer=1)
    results = []
    for compiled in (False, True):
        model, opt, sched, step = setup(
            opt_name, compiled, relative, copy.deepcopy(base), in_graph=in_graph and compiled
        )
        run(model, opt, sched, step, byte_batches(2, 4, 32))
        graphs = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            run(model, opt, sched, step, byte_batches(4, 4, 32, seed=1))  # LR changes every step
        assert counters["stats"]["unique_graphs"] == graphs
        results.append(model.state_dict())
    assert not counters["graph_break"], dict(counters["graph_break"])
    worst = max(rel_err(results[1][k], results[0][k]) for k in results[0])
    print(f"{opt_name} relative={relative} in_graph={in_graph}: compiled vs eager {worst:.2e}")
    # Inductor orders Adam's arithmetic differently; dividing by sqrt(v) amplifies the
    # last-bit differences in rarely-updated entries. torch's own compiled AdamW differs
    # from its eager AdamW by ~1e-4 (relative to each tensor's largest entry) after the
    # same 6 steps on this model; SGD has no such amplification. The relative step
    # forms U = D - D_prev, which cancels about log10(1/lr) ~ 2 digits, so a last-bit
    # difference in a fused reduction grows ~50x there.
    assert worst <= (1e-4 if opt_name == "adamw" else 5e-5 if relative else 1e-6)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)


@pytest.mark.slow
def test_resume_from_optimizer_state_dict(tmp_path):
    torch._dynamo.reset()
    base = tiny_gpt(vocab_size=256, block_size=32, n_embd=32, n_layer=1)
    model, opt, sched, step = setup("adamw", True, model=copy.deepcopy(base))
    run(model, opt, sched, step, byte_batches(3, 4, 32))
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "opt.pt")
    mdparam.save_training(model, tmp_path / "model.safetensors")

    resumed, opt2, sched2, step2 = setup("adamw", True, model=copy.deepcopy(base))
    mdparam.load_training(resumed, tmp_path / "model.safetensors")
    state = torch.load(tmp_path / "opt.pt")
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    for m, o, s, st in ((model, opt, sched, step), (resumed, opt2, sched2, step2)):
        run(m, o, s, st, byte_batches(3, 4, 32, seed=7))
    for (k, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_state_dict_has_float_lrs_and_loading_fills_the_lr_tensors():
    model = tiny_gpt(vocab_size=256, block_size=32, n_embd=32, n_layer=1)
    mdparam.register(model)
    opt = torch.optim.AdamW(mdparam.param_groups(model, lr=0.02, gain_lr=0.01))
    mdparam.compile_step(opt, mdparam.Retraction(model), compile=False)
    torch.optim.lr_scheduler.StepLR(opt, 10)  # made after compile_step: a tensor initial_lr
    assert all(isinstance(g["initial_lr"], torch.Tensor) for g in opt.param_groups)
    lrs = [g["lr"] for g in opt.param_groups]
    assert all(isinstance(lr, torch.Tensor) for lr in lrs)  # what the compiled step reads
    state = opt.state_dict()
    assert all(type(g[k]) is float for g in state["param_groups"] for k in ("lr", "initial_lr"))
    assert all(isinstance(g["lr"], torch.Tensor) for g in opt.param_groups)  # live ones stay
    # A never-compiled optimizer (as torch.distributed.checkpoint builds one) takes it as is.
    fresh = torch.optim.AdamW(mdparam.param_groups(copy.deepcopy(model), lr=0.02, gain_lr=0.01))
    fresh.load_state_dict(state)
    assert [g["lr"] for g in fresh.param_groups] == [float(lr) for lr in lrs]
    # Loading into the compiled optimizer fills its LR tensors in place: the same inputs.
    state["param_groups"][0]["lr"] = 0.5
    opt.load_state_dict(state)
    assert all(g["lr"] is lr for g, lr in zip(opt.param_groups, lrs))
    assert float(lrs[0]) == 0.5


@pytest.mark.slow
def test_compiled_step_with_a_compiled_model():
    torch._dynamo.reset()
    model, opt, sched, step = setup("adamw", True)
    fwd = torch.compile(model, fullgraph=True)
    for x, y in byte_batches(3, 4, 32):
        torch.nn.functional.cross_entropy(fwd(x).flatten(0, 1), y.flatten()).backward()
        step()
        sched.step()
        opt.zero_grad()
    assert sphere_error(model) <= 1e-5


def test_an_attached_retraction_is_refused():
    model = tiny_gpt()
    mdparam.register(model)
    opt = torch.optim.AdamW(mdparam.param_groups(model, lr=0.01))
    retract = mdparam.Retraction(model)
    handle = retract.attach(opt)
    with pytest.raises(ValueError, match="would run twice"):
        mdparam.compile_step(opt, retract)
    handle.remove()
    step = mdparam.compile_step(opt, retract, compile=False)  # detached: accepted
    x = torch.randint(0, 64, (2, 16))
    model.loss(x, x).backward()
    step()
    assert retract.calls == 1 and sphere_error(model) <= 1e-5


# --- what compile_step relies on in torch.optim (mdparam/_torch_optim.py) ---------------------


def test_compile_step_runs_every_step_hook_once_in_torchs_order():
    model = tiny_gpt()
    mdparam.register(model)
    opt = torch.optim.AdamW(mdparam.param_groups(model, lr=0.01))
    seen = []
    handles = [
        register_optimizer_step_pre_hook(lambda *a: seen.append("global pre")),
        opt.register_step_pre_hook(lambda *a: seen.append("pre")),
        opt.register_step_post_hook(lambda *a: seen.append("post")),
        register_optimizer_step_post_hook(lambda *a: seen.append("global post")),
    ]
    try:
        opt.step()  # torch's own order, for reference
        torchs_order, seen[:] = list(seen), []
        step = mdparam.compile_step(opt, mdparam.Retraction(model), compile=False)
        step()
    finally:
        for h in handles:
            h.remove()
    assert torchs_order == ["global pre", "pre", "post", "global post"]
    assert seen == torchs_order


def test_the_undecorated_step_runs_no_hooks_and_schedulers_see_the_step():
    import warnings

    from mdparam._torch_optim import undecorated_step

    model = tiny_gpt()
    mdparam.register(model)
    opt = torch.optim.AdamW(mdparam.param_groups(model, lr=0.01))
    seen = []
    opt.register_step_pre_hook(lambda *a: seen.append("pre"))
    with torch.no_grad():
        undecorated_step(opt)(opt)
    assert seen == []  # torch's wrapper, not the body, runs the hooks
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    step = mdparam.compile_step(opt, mdparam.Retraction(model), compile=False)
    x = torch.randint(0, 64, (2, 16))
    model.loss(x, x).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" would raise
        step()
        sched.step()


def test_a_zero_learning_rate_moves_nothing_and_writes_no_nan():
    # compiled AdamW with a tensor LR of 0 divides eps by it: NaN wherever the second
    # moment is 0 (pytorch#126514), as in an embedding's rows no batch has used yet
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 8))
    mdparam.register(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    step = mdparam.compile_step(opt, mdparam.Retraction(model))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: float(t > 0))  # 0 at the start
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.tensor([[1, 2, 3]])).square().mean().backward()  # rows 0, 4.. get no gradient
    step()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=1e-30)
    # the step's floor is not what the groups, the state_dict or a checkpoint see
    assert [float(g["lr"]) for g in opt.param_groups] == [0.0]
    assert [g["lr"] for g in opt.state_dict()["param_groups"]] == [0.0]
    sched.step()  # the LR is back: the next step moves the weights
    model(torch.tensor([[1, 2, 3]])).square().mean().backward()
    step()
    assert not torch.equal(
        model[1].parametrizations.weight.original0, before["1.parametrizations.weight.original0"]
    )
