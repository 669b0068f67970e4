"""Layouts: the matrix view of a stored tensor (einops patterns), and which matrix axis each
stored dim becomes."""

import pytest
import torch

from mdparam._layouts import LAYOUTS, layout_of

CASES = [
    ("linear", (5, 3)),
    ("transposed", (3, 5)),
    ("flatten_in", (5, 3)),
    ("flatten_in", (5, 3, 2)),
    ("flatten_in", (5, 3, 2, 2)),
    ("flatten_in", (5, 3, 2, 2, 2)),
    ("batched", (4, 5, 3)),
    ("batched", (2, 4, 5, 3)),
]


@pytest.mark.parametrize("name,shape", CASES)
def test_matrix_dim_names_the_axis_a_stored_dim_becomes(name, shape):
    layout = layout_of(name)
    m_shape = layout.matrix_shape(shape)
    for k in range(len(shape)):
        # A tensor that varies along stored dim k only: its matrix view varies along
        # the matrix axis matrix_dim names, and along no matrix axis for a batch dim.
        index = torch.arange(shape[k], dtype=torch.float32)
        t = index.reshape([-1 if i == k else 1 for i in range(len(shape))]).expand(shape)
        m = layout.to_matrix(t.contiguous())
        assert tuple(m.shape) == m_shape
        varies = {ax for ax in (-2, -1) if shape[k] > 1 and (m.diff(dim=ax) != 0).any()}
        want = layout.matrix_dim(len(shape), k)
        assert varies == (set() if want is None else {want}), (name, shape, k)


@pytest.mark.parametrize("name,shape", CASES)
def test_from_matrix_inverts_to_matrix_and_the_view_shares_storage(name, shape):
    layout = layout_of(name)
    t = torch.randn(shape)
    m = layout.to_matrix(t)
    assert torch.equal(layout.from_matrix(m, shape), t)
    assert layout.is_view(t) and m.data_ptr() == t.data_ptr()  # in-place work reaches t
    m.mul_(2.0)
    layout.write_back(m, t)
    assert torch.equal(layout.to_matrix(t), m)


def test_a_channels_last_kernel_is_copied_and_written_back():
    layout = layout_of("flatten_in")
    t = torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last)
    m = layout.to_matrix(t)
    assert not layout.is_view(t) and m.data_ptr() != t.data_ptr()
    assert torch.equal(m, t.reshape(4, 12))
    m.mul_(3.0)
    layout.write_back(m, t)
    assert torch.equal(t.reshape(4, 12), m)


def test_layouts_compile_with_no_graph_break():
    def roundtrip(ts):
        out = []
        for name, t in ts:
            layout = layout_of(name)
            m = layout.to_matrix(t) * 2.0
            out.append(layout.from_matrix(m, t.shape))
        return out

    ts = [(name, torch.randn(shape)) for name, shape in CASES]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(roundtrip)(ts)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    got = torch.compile(roundtrip, fullgraph=True, backend="eager")(ts)
    for (_, t), g in zip(ts, got):
        assert torch.equal(g, t * 2.0)


def test_an_unknown_layout_names_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        layout_of("diagonal")
    assert set(LAYOUTS) == {"linear", "transposed", "flatten_in", "batched"}


@pytest.mark.slow  # compiles two small models
def test_compiled_layouts_leave_no_einops_call_in_the_step():
    # einops runs while torch.compile traces the layouts, never in the compiled step
    from benchmarks.layouts_cost import compiled_calls

    for model in ("conv (flatten_in)", "mlp (transposed)"):
        calls = compiled_calls(model, steps=2)
        assert calls["while_compiling"] > 0, model  # the counter sees the traced calls
        assert calls["per_step_after"] == 0, (model, calls)
