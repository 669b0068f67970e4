import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mdparam.maps import GAIN_MAPS, apply_gain_map, invert_gain_map
from mdparam.sphere import project, resolve_radius, shape_radius, sphere_norm


@pytest.mark.parametrize(
    "gain_map,neutral", [("softplus", math.log(math.e - 1.0)), ("exp", 0.0), ("identity", 1.0)]
)
def test_the_neutral_raw_gain_is_the_closed_form(gain_map, neutral):
    raw = invert_gain_map(torch.tensor(1.0, dtype=torch.float64), gain_map)
    assert float(raw) == pytest.approx(neutral, rel=1e-12, abs=1e-15)
    assert float(apply_gain_map(raw, gain_map)) == pytest.approx(1.0, rel=1e-12)


@settings(max_examples=200, deadline=None)
@given(y=st.floats(min_value=1e-6, max_value=1e4), gain_map=st.sampled_from(GAIN_MAPS))
def test_gain_map_inverse_round_trip(y, gain_map):
    t = torch.tensor([y], dtype=torch.float64)
    back = apply_gain_map(invert_gain_map(t, gain_map), gain_map)
    assert float(back) == pytest.approx(y, rel=1e-9)


def test_softplus_inverse_is_stable_at_the_extremes():
    t = torch.tensor([1e-30, 1e-8, 30.0, 1e6])
    raw = invert_gain_map(t, "softplus")
    assert torch.isfinite(raw).all()
    assert torch.allclose(apply_gain_map(raw, "softplus"), t, rtol=1e-5)


def test_shape_radius_gives_every_sphere_the_same_frobenius_norm():
    d_out, d_in = 6, 24
    w = torch.randn(d_out, d_in)
    for sphere in ("flat", "row", "col"):
        d = project(w, sphere, shape_radius(d_out, d_in, sphere))
        assert float(d.norm()) == pytest.approx(math.sqrt(max(d_out, d_in)), rel=1e-5)


def test_row_and_col_spheres_norm_each_unit():
    w = torch.randn(5, 7)
    assert torch.allclose(sphere_norm(project(w, "row", 2.0), "row"), torch.full((5, 1), 2.0))
    assert torch.allclose(sphere_norm(project(w, "col", 0.5), "col"), torch.full((1, 7), 0.5))


def test_init_radius_is_the_weights_own_norm():
    w = torch.randn(4, 3)
    assert resolve_radius("init", w, "flat") == pytest.approx(float(w.norm()))
    assert torch.allclose(resolve_radius("init", w, "row"), w.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "wide", True])
def test_bad_radius_values_are_refused(bad):
    with pytest.raises(ValueError, match="radius"):
        resolve_radius(bad, torch.randn(2, 2), "flat")


def test_bf16_norms_accumulate_in_fp32():
    w = torch.randn(64, 64).bfloat16()
    assert sphere_norm(w, "flat").dtype == torch.float32
