"""torch.compile on a registered model: one graph, no breaks, no recompiles.

Cold compiles cost seconds on 2 cores, so this file compiles one tiny GPT once.
"""

import pytest
import torch
import torch._dynamo
from conftest import byte_batches, rel_err, tiny_gpt
from torch._dynamo.testing import AotEagerAndRecordGraphs
from torch._dynamo.utils import counters

import mdparam
from examples.gpt import GPT
from mdparam._sphere import sphere_of


@pytest.mark.slow
def test_compiled_training_has_no_graph_breaks_and_no_recompiles():
    torch._dynamo.reset()
    counters.clear()
    model = tiny_gpt(vocab_size=256, block_size=32, n_embd=32, n_layer=1)
    mdparam.register(model)
    opt = torch.optim.AdamW(mdparam.param_groups(model, lr=0.02, gain_lr=1e-2, other_lr=3e-3))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 40)
    retract = mdparam.Retraction(model, compile=True)  # the compiled path
    retract.attach(opt)
    compiled = torch.compile(model, fullgraph=True)

    losses, lrs = [], []
    batches = byte_batches(24, 4, 32)

    def step():
        x, y = next(batches)
        loss = torch.nn.functional.cross_entropy(compiled(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        lrs.append(opt.param_groups[0]["lr"])

    for _ in range(2):  # warm-up: forward+backward graph and the retraction graph
        step()
    frames_after_warmup = counters["stats"]["unique_graphs"]
    assert frames_after_warmup >= 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(22):
            step()
            for d, sphere, radius in zip(retract.directions, retract.spheres, retract.radii()):
                assert (
                    float((sphere_of(sphere).norm(d.detach()) - radius).abs().max())
                    <= 1e-5 * radius
                )
    assert counters["stats"]["unique_graphs"] == frames_after_warmup
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(set(lrs)) == len(lrs)  # the LR really changed every step
    assert sum(losses[-5:]) < sum(losses[:5])
    # The compiled model computes what the eager one does.
    x, _ = next(byte_batches(1, 2, 32, seed=5))
    with torch.no_grad():
        logits = compiled(x)
    assert rel_err(logits, model(x)) <= 1e-6
    # Export from the compiled model: plain names, strict load, same logits. The
    # compiled graph fuses W inside other kernels, so agreement is to rounding.
    plain = GPT(model.cfg)
    plain.load_state_dict(mdparam.plain_state_dict(compiled), strict=True)
    assert rel_err(plain(x), logits) <= 1e-6


def test_opaque_fuse_matches_the_traced_fuse():
    """register(fuse="opaque"): the fuse is one opaque op in the graph, same values and grads."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    mdparam.register(model)
    x = torch.randn(5, 16)
    results = []
    for opaque in (False, True):
        for e in mdparam.registered(model):  # what register(fuse="opaque") sets
            e.parametrization.opaque_fuse = opaque
        torch._dynamo.reset()
        model.zero_grad()
        backend = AotEagerAndRecordGraphs()  # AOT autograd: fake kernels and backward op too
        out = torch.compile(model, fullgraph=True, backend=backend)(x)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
        fw = "".join(str(g.graph) for g in backend.fw_graphs)
        bw = "".join(str(g.graph) for g in backend.bw_graphs)
        assert ("scale_rows_cols." in fw) == opaque
        assert ("scale_rows_cols_backward" in bw) == opaque
    (a, ga), (b, gb) = results
    assert rel_err(b, a) <= 1e-6
    assert all(rel_err(q, p) <= 1e-6 for p, q in zip(ga, gb))
