"""Goodput table: binary search result, cache keys and reuse, any Executor."""

from __future__ import annotations

import concurrent.futures as cf

import msgspec
import numpy as np
import pytest

from dualscale.placement import GoodputSettings, goodput_table
from dualscale.placement import goodput as gp
from dualscale.sim.scenario import Truth, load_scenario
from dualscale.sim.traces import Trace, gamma_trace, load_trace, window

SETTINGS = GoodputSettings(tp_degrees=[4], clocks_mhz=[1065, 1980], tolerance_per_s=0.25)


@pytest.fixture(scope="module")
def small_trace():
    return window(load_trace("azure-conv"), 0.0, 40.0)


@pytest.fixture(scope="module")
def scenario():
    return load_scenario("paper")


def test_table_entries_meet_the_slo_at_goodput_and_miss_above(profile, scenario, small_trace, tmp_path):
    tab = goodput_table(scenario, small_trace, SETTINGS, workers=1, cache_dir=tmp_path)
    assert {(e.phase, e.freq_mhz) for e in tab.entries} == {(p, f) for p in ("prefill", "decode") for f in (1065, 1980)}
    for e in tab.entries:
        assert e.goodput_per_s > 0
        ok, energy = gp.probe(scenario, profile, small_trace, e.phase, e.tp, e.freq_mhz, e.goodput_per_s)
        assert ok and energy == pytest.approx(e.energy_per_request_j)
        too_much = e.goodput_per_s + max(SETTINGS.tolerance_per_s, 0.02 * e.goodput_per_s) * 1.01
        if too_much < 20.0 * e.tp:
            assert not gp.probe(scenario, profile, small_trace, e.phase, e.tp, e.freq_mhz, too_much)[0]
    by = {(e.phase, e.freq_mhz): e.goodput_per_s for e in tab.entries}
    assert by[("prefill", 1980)] >= by[("prefill", 1065)]


def test_cache_key_covers_its_inputs(profile, scenario, small_trace):
    key = gp.cache_key(scenario, profile, small_trace, SETTINGS)
    assert key == gp.cache_key(scenario, profile, small_trace, SETTINGS)
    other_slo = msgspec.structs.replace(scenario, slo=msgspec.structs.replace(scenario.slo, ttft_s=0.5))
    other_trace = Trace("x", small_trace.arrival_s, small_trace.input_tokens + 1, small_trace.output_tokens, "x")
    other_settings = msgspec.structs.replace(SETTINGS, clocks_mhz=[1980])
    other_cluster = msgspec.structs.replace(scenario, cluster=msgspec.structs.replace(scenario.cluster,
                                                                                    clock_switch_delay_s=0.05))
    keys = {gp.cache_key(other_slo, profile, small_trace, SETTINGS),
            gp.cache_key(scenario, profile, other_trace, SETTINGS),
            gp.cache_key(scenario, profile, small_trace, other_settings),
            gp.cache_key(other_cluster, profile, small_trace, SETTINGS)}
    assert key not in keys and len(keys) == 4


def test_second_call_is_served_from_the_cache(scenario, small_trace, tmp_path, monkeypatch):
    first = goodput_table(scenario, small_trace, SETTINGS, workers=1, cache_dir=tmp_path)
    monkeypatch.setattr(gp, "_group", lambda *a: pytest.fail("recomputed despite the cache"))
    assert goodput_table(scenario, small_trace, SETTINGS, workers=1, cache_dir=tmp_path) == first
    # a damaged entry is recomputed, not fatal
    path = next(tmp_path.glob("goodput-*.json"))
    path.write_text("{not json")
    monkeypatch.undo()
    assert goodput_table(scenario, small_trace, SETTINGS, workers=1, cache_dir=tmp_path) == first


def test_any_executor_gives_the_same_table(scenario, tmp_path):
    tr = gamma_trace(10.0, 1.41, 30.0, load_trace("azure-conv"), seed=3)
    settings = GoodputSettings(tp_degrees=[4], clocks_mhz=[1980], tolerance_per_s=0.5)
    serial = goodput_table(scenario, tr, settings, workers=1, cache_dir=tmp_path / "a")
    # a thread pool stands in for a user's Ray or Dask executor: only the Executor interface is used
    with cf.ThreadPoolExecutor(max_workers=2) as ex:
        threaded = goodput_table(scenario, tr, settings, executor=ex, cache_dir=tmp_path / "b")
    assert serial.entries == threaded.entries


def test_bad_settings_are_named(scenario, small_trace, tmp_path):
    with pytest.raises(ValueError, match="tp_degrees contains 3"):
        goodput_table(scenario, small_trace, GoodputSettings(tp_degrees=[3], clocks_mhz=[1980]), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="clocks_mhz contains 1000"):
        goodput_table(scenario, small_trace, GoodputSettings(tp_degrees=[4], clocks_mhz=[1000]), cache_dir=tmp_path)
    one = Trace("one", np.array([0.0]), np.array([10]), np.array([2]), "x")
    with pytest.raises(ValueError, match="at least 2 requests"):
        goodput_table(scenario, one, SETTINGS, cache_dir=tmp_path)


def test_a_configuration_that_never_meets_the_slo_has_goodput_zero(scenario, tmp_path):
    strict = msgspec.structs.replace(scenario, slo=msgspec.structs.replace(scenario.slo, tpot_s=0.001))
    tr = window(load_trace("azure-conv"), 0.0, 30.0)
    tab = goodput_table(strict, tr, GoodputSettings(tp_degrees=[2], clocks_mhz=[1980]), workers=1, cache_dir=tmp_path)
    dec = tab.get("decode", 2, 1980)
    assert dec.goodput_per_s == 0.0 and dec.energy_per_request_j is None


def test_the_coarse_tier_plans_on_the_model_never_on_the_truth(scenario, small_trace, tmp_path):
    """Probes leave the simulated GPUs' [truth] out (the coarse tier cannot see it), and learnt
    latency factors are planned on as a scaled profile: a table at factor 1.2 is the table of GPUs
    20 % slower, with less goodput."""
    settings = GoodputSettings(tp_degrees=[4], clocks_mhz=[1980], tolerance_per_s=0.25)
    plain = goodput_table(scenario, small_trace, settings, workers=1, cache_dir=tmp_path / "a")
    biased = msgspec.structs.replace(scenario, truth=Truth(latency_bias_prefill=0.3, latency_bias_decode=0.3))
    assert goodput_table(biased, small_trace, settings, workers=1, cache_dir=tmp_path / "b") == plain
    slower = goodput_table(scenario, small_trace, settings, workers=1, cache_dir=tmp_path / "a",
                           latency_factors=(1.2, 1.2))
    assert slower.key != plain.key
    for e in plain.entries:
        s = slower.get(e.phase, e.tp, e.freq_mhz)
        # less goodput, or (at the search's upper limit) the same rate at more energy per request
        assert s.goodput_per_s < e.goodput_per_s or (
            s.goodput_per_s == e.goodput_per_s and s.energy_per_request_j > e.energy_per_request_j)
    assert slower.get("prefill", 4, 1980).goodput_per_s < plain.get("prefill", 4, 1980).goodput_per_s
