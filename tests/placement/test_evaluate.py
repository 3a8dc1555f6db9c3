"""The evaluation's window cache: a repeated evaluation simulates nothing, and a changed input misses."""

from __future__ import annotations

import msgspec
import pytest

from dualscale.placement import GoodputSettings, PlacementGroup, PlacementPlan
from dualscale.placement import evaluate as ev
from dualscale.profile import Profile
from dualscale.sim.engine import Simulation
from dualscale.sim.policies import make_policy
from dualscale.sim.scenario import Truth, load_scenario
from dualscale.sim.traces import Trace, gamma_trace, load_trace


def _plan(prefill_instances: int) -> PlacementPlan:
    groups = [PlacementGroup("prefill", 4, 1065, prefill_instances, 3.0, 2.0, 1000.0),
              PlacementGroup("decode", 4, 1980, 1, 9.0, 5.0, 2000.0)]
    return PlacementPlan(5.0, 0.05, 16, 4 * (prefill_instances + 1), groups, 3000.0, 30.0, 9e4, True, "", "load")

SMALL = ev.EvalSettings(
    window_s=30.0, table_window_s=30.0,
    goodput=GoodputSettings(tp_degrees=[4], clocks_mhz=[1065, 1980], tolerance_per_s=0.5),
    gamma_loads=[0.5], gamma_duration_s=60.0, trace_loads=[], trace_duration_s=60.0)


def test_second_evaluation_is_pooled_from_cached_windows(tmp_path, monkeypatch):
    scenario = load_scenario("paper")
    seen = []
    first, _, _ = ev.evaluate(scenario, SMALL, workers=1, cache_dir=tmp_path,
                              progress=lambda stage, i, n: seen.append((stage, i, n)))
    assert ("windows", 6, 6) in seen  # 3 policies x 2 windows, progress counted to the end
    windows = sorted((tmp_path / "windows").glob("*.msgpack"))
    assert len(windows) == 6
    monkeypatch.setattr(ev, "simulate_window", lambda *a: pytest.fail("simulated despite the cache"))
    again, _, _ = ev.evaluate(scenario, SMALL, workers=1, cache_dir=tmp_path)
    assert again == first
    # a damaged entry is simulated again, not fatal
    monkeypatch.undo()
    windows[0].write_bytes(b"\x00garbage")
    assert ev.evaluate(scenario, SMALL, workers=1, cache_dir=tmp_path)[0] == first


def test_window_key_covers_its_inputs(profile):
    scenario = load_scenario("paper")
    tr = gamma_trace(5.0, 1.41, 30.0, load_trace("azure-conv"), seed=1)
    a = _plan(2)
    key = ev.window_key(scenario, profile, "dualscale", tr, a)
    assert key == ev.window_key(scenario, profile, "dualscale", tr, _plan(2))
    strict = msgspec.structs.replace(scenario, slo=msgspec.structs.replace(scenario.slo, tpot_s=0.09))
    other_trace = Trace("x", tr.arrival_s, tr.input_tokens + 1, tr.output_tokens, "x")
    keys = {ev.window_key(strict, profile, "dualscale", tr, a), ev.window_key(scenario, profile, "placeonly", tr, a),
            ev.window_key(scenario, profile, "dualscale", other_trace, a),
            ev.window_key(scenario, profile, "dualscale", tr, _plan(3))}
    assert key not in keys and len(keys) == 4


def test_no_cache_simulates_again(tmp_path, monkeypatch):
    scenario = load_scenario("paper")
    ev.evaluate(scenario, SMALL, workers=1, cache_dir=tmp_path)
    calls = []
    real = ev.simulate_window
    monkeypatch.setattr(ev, "simulate_window", lambda *a: calls.append(1) or real(*a))
    ev.evaluate(scenario, SMALL, workers=1, cache_dir=tmp_path, use_cache=False)
    assert len(calls) == 6


def test_each_window_is_planned_on_what_the_fine_tier_learnt_before(profile):
    """The coarse-tier feedback: window i's placement comes from the goodput table at the factors
    learnt in window i - 1 (the first at 1), and on the profile scaled by them."""
    asked: list[tuple[float, float]] = []
    planned_on: list[Profile] = []
    learnt = [(1.2, 1.1), (1.3, 1.0)]
    wins = [gamma_trace(2.0, 1.0, 30.0, load_trace("azure-conv"), seed) for seed in range(3)]

    def table_for(factors):
        asked.append(factors)
        return factors

    def place(table, prof, rate, gpus, **kw):
        planned_on.append(prof)
        return _plan(1)

    import dualscale.placement.evaluate as mod
    orig = mod.place
    mod.place = place
    try:
        plans = ev._plans(wins, table_for, profile, SMALL, lambda i, plan: learnt[i] if i < 2 else (9.0, 9.0))
    finally:
        mod.place = orig
    assert len(plans) == 3
    assert asked == [(1.0, 1.0), (1.2, 1.1), (1.3, 1.0)]
    assert planned_on[0] is profile
    assert planned_on[1].prefill_time_s(4, [1000], 1980) == pytest.approx(1.2 * profile.prefill_time_s(4, [1000], 1980))
    assert planned_on[2].decode_time_s(4, [1000], 1980) == pytest.approx(profile.decode_time_s(4, [1000], 1980))


def test_learnt_factors_are_rounded_to_a_few_tables():
    assert ev._round_factor(1.0004) == 1.0
    assert ev._round_factor(1.2) == pytest.approx(ev.FACTOR_STEP ** 7)
    assert ev._round_factor(0.8) == pytest.approx(ev.FACTOR_STEP ** -9)
    assert ev._round_factor(float("nan")) == 1.0


def test_a_biased_truth_is_learnt_by_the_simulated_controllers(profile):
    """What the coarse tier is fed: the controllers' learnt measured / model time (no noise: the bias)."""
    scenario = msgspec.structs.replace(load_scenario("default"),
                                       truth=Truth(latency_bias_prefill=0.2, latency_bias_decode=-0.1))
    tr = gamma_trace(3.0, 1.0, 30.0, load_trace("azure-conv"), 0)
    run = Simulation(scenario, profile, tr, make_policy("dualscale", profile, scenario)).run()
    # measurements taken while a clock switch landed mid-iteration are not learnt; every other
    # one is the bias exactly, so the EW mean is it to rounding
    assert run.learnt_latency_factor("prefill") == pytest.approx(1.2, rel=1e-9)
    assert run.learnt_latency_factor("decode") == pytest.approx(0.9, rel=1e-9)
    static = Simulation(scenario, profile, tr, make_policy("distserve", profile, scenario)).run()
    assert static.learnt_latency_factor("decode") == 1.0
