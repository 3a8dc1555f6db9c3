"""The built-in profile: contract of the public API, physical sanity, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import dualscale
from dualscale.errors import ConfigError
from dualscale.profile import builtin_profiles

NAME = "h100-sxm-llama-3.3-70b"


def test_builtin_is_listed_and_loads_by_name(profile):
    assert NAME in builtin_profiles()
    assert profile.name == NAME
    assert set(profile.tp_degrees) >= {2, 4, 8}


def test_clock_grid_is_h100_supported_clocks(profile):
    f = profile.clocks_mhz
    assert f[0] == 345 and f[-1] == 1980 and np.all(np.diff(f) == 15)


def test_scalar_and_array_clocks_agree(profile):
    arr = profile.prefill_time_s(4, [1024], profile.clocks_mhz)
    assert arr.shape == profile.clocks_mhz.shape
    for i in (0, 50, len(arr) - 1):
        assert profile.prefill_time_s(4, [1024], int(profile.clocks_mhz[i])) == pytest.approx(arr[i], rel=1e-12)


def test_off_grid_clock_interpolates_between_neighbours(profile):
    lo = profile.decode_time_s(4, [1000] * 8, 1365)
    mid = profile.decode_time_s(4, [1000] * 8, 1372.5)
    hi = profile.decode_time_s(4, [1000] * 8, 1380)
    assert hi <= mid <= lo


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_time_never_grows_with_clock_and_power_stays_within_cap(profile, tp):
    for t, p in (profile.prefill(tp, [2048], profile.clocks_mhz), profile.decode(tp, [1500] * 64, profile.clocks_mhz)):
        assert np.all(np.diff(t) <= 1e-12)
        assert np.all(p <= profile.config.gpu.power_cap_w + 1e-9)
        assert np.all(p >= profile.idle_power_w(profile.clocks_mhz) - 1e-9)


def test_anchor_numbers_from_public_data(profile):
    """A few numbers the profile is fitted to, with generous bands (full check: `profile validate`)."""
    # authors' model: TP4 prefill 1x1024 at 1830 MHz = 77.6 ms
    assert profile.prefill_time_s(4, [1024], 1830) == pytest.approx(0.0776, rel=0.10)
    # ML.ENERGY: TP4 decode at batch 8 ~ 16.9 ms at default (max) clock
    assert profile.decode_time_s(4, [1400] * 8, 1980) == pytest.approx(0.0169, rel=0.10)
    # DistServe measured KV capacity of Llama-3.3-70B: TP2 19,392 and TP4 470,144 tokens
    assert profile.kv_capacity_tokens(2) == pytest.approx(19392, rel=0.03)
    assert profile.kv_capacity_tokens(4) == pytest.approx(470144, rel=0.03)


def test_power_per_gpu_depends_on_tp_as_measured(profile):
    """TP2 GPUs each hold twice TP4's share of the weights and draw more power (authors' LUT and
    decode model); TP8 has no power data and uses TP4's curves."""
    for f in (780, 1380, 1830):
        assert profile.prefill_power_w(2, [128], f) > profile.prefill_power_w(4, [128], f)
        assert profile.decode_power_w(2, [1000] * 8, f) > profile.decode_power_w(4, [1000] * 8, f)
    for phase in ("prefill", "decode"):
        t4, t8 = profile.clock_table(phase, 4), profile.clock_table(phase, 8)
        np.testing.assert_array_equal(t8, t4)


def test_decode_power_rises_with_batch(profile):
    """ML.ENERGY TP4 at 1980 MHz: about 450 W/GPU at batch 8, 630 W/GPU at batch 256."""
    p8 = profile.decode_power_w(4, [1200] * 8, 1980)
    p256 = profile.decode_power_w(4, [1200] * 256, 1980)
    assert p8 == pytest.approx(447, rel=0.05)
    assert p256 == pytest.approx(630, rel=0.05)


def test_longer_batches_take_longer(profile):
    t1 = profile.prefill_time_s(4, [512], 1380)
    t2 = profile.prefill_time_s(4, [512, 512], 1380)
    t3 = profile.prefill_time_s(4, [512], 1380, prefix_tokens=[4096])
    assert t2 > t1 and t3 > t1


@given(st.lists(st.integers(1, 8192), min_size=1, max_size=16), st.sampled_from([2, 4, 8]))
def test_prefill_energy_is_finite_and_positive(profile, chunks, tp):
    t, p = profile.prefill(tp, chunks, profile.clocks_mhz)
    assert np.all(np.isfinite(t)) and np.all(t > 0) and np.all(np.isfinite(p)) and np.all(p > 0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda pr: pr.prefill_time_s(3, [10], 1000), "tp = 3"),
        (lambda pr: pr.prefill_time_s(4, [], 1000), "chunk_tokens: empty"),
        (lambda pr: pr.prefill_time_s(4, [10, -1], 1000), r"chunk_tokens\[1\] = -1"),
        (lambda pr: pr.prefill_time_s(4, [10, 0], 1000), r"chunk_tokens\[1\] = 0"),
        (lambda pr: pr.prefill_time_s(4, [10.5], 1000), r"chunk_tokens\[0\] = 10.5: token counts must be finite whole"),
        (lambda pr: pr.prefill_time_s(4, [np.nan], 1000), "chunk_tokens"),
        (lambda pr: pr.prefill_time_s(4, [10, 20], 1000, prefix_tokens=[0]), "prefix_tokens: length 1"),
        (lambda pr: pr.prefill_time_s(4, [10], 1000, prefix_tokens=[-5]), r"prefix_tokens\[0\] = -5"),
        (lambda pr: pr.decode_time_s(4, [100], 2100), "freq_mhz = 2100"),
        (lambda pr: pr.decode_time_s(4, [100], float("nan")), "freq_mhz = nan"),
        (lambda pr: pr.decode_time_s(4, [100], [[1000]]), "freq_mhz: expected a scalar or 1-D"),
        (lambda pr: pr.decode_power_w(4, [[1, 2]], 1000), "context_tokens: expected a 1-D"),
        (lambda pr: pr.idle_power_w(100), "freq_mhz = 100"),
        (lambda pr: pr.clock_table("mixed", 4), "phase = 'mixed'"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(profile, call, match):
    with pytest.raises(ValueError, match=match):
        call(profile)


def test_string_tokens_are_a_type_error(profile):
    with pytest.raises(TypeError, match="chunk_tokens"):
        profile.prefill_time_s(4, np.array(["a"]), 1000)


def test_unknown_profile_names_the_builtins():
    with pytest.raises(ConfigError, match=NAME):
        dualscale.Profile.load("no-such-gpu")


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_latency_factors_scale_every_time_and_keep_power(profile, tp):
    p2 = profile.with_latency_factors(prefill=1.3, decode=0.8)
    f = profile.clocks_mhz
    t, w = profile.prefill(tp, [1500, 37], f, [0, 900])
    t2, w2 = p2.prefill(tp, [1500, 37], f, [0, 900])
    # one multiplication of each coefficient and of the sum: a few ulps, far under 1e-12
    np.testing.assert_allclose(t2, 1.3 * t, rtol=1e-12)
    np.testing.assert_allclose(w2, w, rtol=1e-12)
    t, w = profile.decode(tp, [300, 4000, 12], f)
    t2, w2 = p2.decode(tp, [300, 4000, 12], f)
    np.testing.assert_allclose(t2, 0.8 * t, rtol=1e-12)
    np.testing.assert_allclose(w2, w, rtol=1e-12)
    assert profile.with_latency_factors() is profile
    assert "learnt online" in p2.config.latency.prefill[0].source


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_latency_factor_must_be_positive_and_finite(profile, bad):
    with pytest.raises(ValueError, match="decode = "):
        profile.with_latency_factors(decode=bad)
