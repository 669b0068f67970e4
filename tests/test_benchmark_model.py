"""The speed benchmark's GPT under torch.compile: no graph breaks, no recompiles."""

from dataclasses import replace

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from benchmarks.workloads import BENCH_GPT, build_pair


@pytest.mark.slow
def test_benchmark_gpt_compiles_once_with_a_changing_lr():
    torch._dynamo.reset()
    counters.clear()
    _, md = build_pair(replace(BENCH_GPT, n_layer=1), compiled=True, sched=True, batch=2, seq=32)
    md.step()  # warm-up compiles forward and backward
    graphs = counters["stats"]["unique_graphs"]
    lrs = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(4):
            md.step()
            lrs.append(md.opt.param_groups[0]["lr"])
    assert graphs >= 1
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(set(lrs)) == 4
