"""The evaluation's window cache: a repeated evaluation simulates nothing, and a changed input misses."""

from __future__ import annotations

import msgspec
import pytest

from dualscale.placement import GoodputSettings, PlacementGroup, PlacementPlan
from dualscale.placement import evaluate as ev
from dualscale.sim.scenario import load_scenario
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
