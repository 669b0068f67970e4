import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mdparam._maps import GAIN_MAPS, gain_map_of
from mdparam._sphere import resolve_radius, sphere_of


@pytest.mark.parametrize(
    "gain_map,neutral", [("softplus", math.log(math.e - 1.0)), ("exp", 0.0), ("identity", 1.0)]
)
def test_the_neutral_raw_gain_is_the_closed_form(gain_map, neutral):
    raw = gain_map_of(gain_map).inverse(torch.tensor(1.0, dtype=torch.float64))
    assert float(raw) == pytest.approx(neutral, rel=1e-12, abs=1e-15)
    assert float(gain_map_of(gain_map)(raw)) == pytest.approx(1.0, rel=1e-12)


@settings(max_examples=200, deadline=None)
@given(y=st.floats(min_value=1e-6, max_value=1e4), gain_map=st.sampled_from(GAIN_MAPS))
def test_gain_map_inverse_round_trip(y, gain_map):
    t = torch.tensor([y], dtype=torch.float64)
    phi = gain_map_of(gain_map)
    back = phi(phi.inverse(t))
    assert float(back) == pytest.approx(y, rel=1e-9)


def test_softplus_inverse_is_stable_at_the_extremes():
    t = torch.tensor([1e-30, 1e-8, 30.0, 1e6])
    raw = gain_map_of("softplus").inverse(t)
    assert torch.isfinite(raw).all()
    assert torch.allclose(gain_map_of("softplus")(raw), t, rtol=1e-5)


def test_shape_radius_gives_every_sphere_the_same_frobenius_norm():
    d_out, d_in = 6, 24
    w = torch.randn(d_out, d_in)
    for sphere in ("flat", "row", "col"):
        kind = sphere_of(sphere)
        d = kind.project(w, kind.shape_radius(d_out, d_in))
        assert float(d.norm()) == pytest.approx(math.sqrt(max(d_out, d_in)), rel=1e-5)


def test_row_and_col_spheres_norm_each_unit():
    w = torch.randn(5, 7)
    assert torch.allclose(
        sphere_of("row").norm(sphere_of("row").project(w, 2.0)), torch.full((5, 1), 2.0)
    )
    assert torch.allclose(
        sphere_of("col").norm(sphere_of("col").project(w, 0.5)), torch.full((1, 7), 0.5)
    )


def test_init_radius_is_the_weights_own_norm():
    w = torch.randn(4, 3)
    assert resolve_radius("init", w, sphere_of("flat")) == pytest.approx(float(w.norm()))
    assert torch.allclose(resolve_radius("init", w, sphere_of("row")), w.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "wide", True])
def test_bad_radius_values_are_refused(bad):
    with pytest.raises(ValueError, match="radius"):
        resolve_radius(bad, torch.randn(2, 2), sphere_of("flat"))


def test_bf16_norms_accumulate_in_fp32():
    w = torch.randn(64, 64).bfloat16()
    assert sphere_of("flat").norm(w).dtype == torch.float32
