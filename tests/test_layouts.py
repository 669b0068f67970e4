"""Layouts: the matrix view of a stored tensor, and which matrix axis each stored dim becomes."""

import pytest
import torch

from mdparam.layouts import from_matrix, matrix_dim, matrix_shape, to_matrix

CASES = [
    ("linear", (5, 3)),
    ("transposed", (3, 5)),
    ("flatten_in", (5, 3, 2, 2)),
    ("batched", (4, 5, 3)),
    ("batched", (2, 4, 5, 3)),
]


@pytest.mark.parametrize("layout,shape", CASES)
def test_matrix_dim_names_the_axis_a_stored_dim_becomes(layout, shape):
    m_shape = matrix_shape(shape, layout)
    for k in range(len(shape)):
        # A tensor that varies along stored dim k only: its matrix view varies along
        # the matrix axis matrix_dim names, and along no matrix axis for a batch dim.
        index = torch.arange(shape[k], dtype=torch.float32)
        t = index.reshape([-1 if i == k else 1 for i in range(len(shape))]).expand(shape)
        m = to_matrix(t.contiguous(), layout)
        assert tuple(m.shape) == m_shape
        varies = {ax for ax in (-2, -1) if shape[k] > 1 and (m.diff(dim=ax) != 0).any()}
        want = matrix_dim(layout, len(shape), k)
        assert varies == (set() if want is None else {want}), (layout, shape, k)


@pytest.mark.parametrize("layout,shape", CASES)
def test_from_matrix_inverts_to_matrix(layout, shape):
    t = torch.randn(shape)
    assert torch.equal(from_matrix(to_matrix(t, layout), layout, shape), t)


def test_an_unknown_layout_names_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        matrix_dim("diagonal", 2, 0)
