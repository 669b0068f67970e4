import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest
import torch

from examples.gpt import GPT, GPTConfig


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: relative to the output's scale, not per element."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


class FusedExperts(torch.nn.Module):
    """Experts stored as (experts, out, in) tensors, as transformers' fused MoE layers do."""

    def __init__(self, experts=3, hidden=8, inner=12):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.randn(experts, 2 * inner, hidden) * 0.2)
        self.down_proj = torch.nn.Parameter(torch.randn(experts, hidden, inner) * 0.2)

    def forward(self, x):  # every token through every expert, averaged: enough to test the weights
        outs = []
        for e in range(self.gate_up_proj.shape[0]):
            gate, up = (x @ self.gate_up_proj[e].T).chunk(2, dim=-1)
            outs.append((torch.nn.functional.silu(gate) * up) @ self.down_proj[e].T)
        return torch.stack(outs).mean(0)


def sphere_error(model: torch.nn.Module) -> float:
    """Worst relative distance of any registered direction's norms from its radius.

    Sharded (DTensor) directions are gathered first, so this checks the global sphere.
    """
    import mdparam
    from mdparam._distributed import is_sharded

    assert mdparam.registered(model), "sphere_error: the model has no registered layers"
    worst = 0.0
    for e in mdparam.registered(model):
        d = e.direction.detach()
        d = d.full_tensor() if is_sharded(d) else d
        geo = e.config.geometry
        norms = geo.sphere.norm(geo.layout.to_matrix(d))
        radius = e.parametrization.sphere_radius()
        err = ((norms - radius) / radius).abs().nan_to_num(nan=float("inf")).max()
        worst = max(worst, float(err))  # a NaN norm counts as infinitely far
    return worst


def tiny_gpt(tie_head: bool = False, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, tie_head=tie_head)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


def byte_batches(n_batches: int, batch: int, block: int, seed: int = 0):
    """Byte-level batches from a Python standard-library source file (a real text task)."""
    import inspect
    import json.decoder as src

    data = torch.tensor(list(inspect.getsource(src).encode()), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        ix = torch.randint(len(data) - block - 1, (batch,), generator=g)
        x = torch.stack([data[i : i + block] for i in ix])
        y = torch.stack([data[i + 1 : i + block + 1] for i in ix])
        yield x, y


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(items: list) -> None:
    """Slow tests first (a stable sort), so that two workers start on the long ones and
    finish together instead of one running the compiled tests alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
