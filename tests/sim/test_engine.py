"""The simulator: hand-computed cases, conservation (hypothesis), determinism, baselines."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualscale.sim.engine import Simulation
from dualscale.sim.metrics import summarize
from dualscale.sim.policies import PrefillControl, Static, make_policy
from dualscale.sim.scenario import Scenario
from dualscale.sim.traces import Trace


def scenario(**changes) -> Scenario:
    raw = {"name": "test", "prefill": {"tp": 4, "instances": 1}, "decode": {"tp": 4, "instances": 1},
           "cluster": {"gpus": 8, "clock_switch_delay_s": 0.0}}
    for key, value in changes.items():
        raw[key] = raw.get(key, {}) | value if isinstance(value, dict) else value
    return msgspec.convert(raw, Scenario)


def trace(arrival_s, input_tokens, output_tokens) -> Trace:
    return Trace("test", np.asarray(arrival_s, float), np.asarray(input_tokens), np.asarray(output_tokens), "test")


def run(sc, tr, policy="distserve", profile=None):
    from dualscale import Profile

    prof = profile or Profile.load(sc.profile)
    return Simulation(sc, prof, tr, make_policy(policy, prof, sc)).run()


def test_one_request_by_hand(profile):
    sc = scenario()
    tp, f = 4, 1980.0
    res = run(sc, trace([0.0], [1000], [3]), profile=profile)
    t_pre, w_pre = profile.prefill(tp, [1000], f)
    transfer = 1000 * profile.config.model.kv_bytes_per_token * 8 / (400e9)
    t1, w1 = profile.decode(tp, [1001], f)
    t2, w2 = profile.decode(tp, [1002], f)
    ft = t_pre
    end = ft + transfer + t1 + t2
    assert res.first_token_s[0] == pytest.approx(ft, rel=1e-12)
    assert res.finish_s[0] == pytest.approx(end, rel=1e-12)
    assert res.end_s == pytest.approx(end, rel=1e-12)
    idle = profile.idle_power_w(f)
    assert res.prefill[0].energy_busy_j == pytest.approx(tp * w_pre * t_pre, rel=1e-12)
    assert res.prefill[0].energy_idle_j == pytest.approx(tp * idle * (end - t_pre), rel=1e-12)
    assert res.decode[0].energy_busy_j == pytest.approx(tp * (w1 * t1 + w2 * t2), rel=1e-12)
    assert res.decode[0].energy_idle_j == pytest.approx(tp * idle * (ft + transfer), rel=1e-12)
    s = summarize(res)
    assert s.tpot_s.p50 == pytest.approx((end - ft) / 2, rel=1e-12)
    assert s.ttft_s.p99 == pytest.approx(ft, rel=1e-12)


def test_long_prompt_is_chunked_and_a_second_request_waits(profile):
    sc = scenario()
    res = run(sc, trace([0.0, 0.001], [5000, 100], [1, 1]), profile=profile)
    f = 1980.0
    b1 = profile.prefill_time_s(4, [2048], f)
    b2 = profile.prefill_time_s(4, [2048], f, [2048])
    b3 = profile.prefill_time_s(4, [904, 100], f, [4096, 0])  # the last chunk shares a batch
    assert res.first_token_s[0] == pytest.approx(b1 + b2 + b3, rel=1e-12)
    assert res.first_token_s[1] == pytest.approx(b1 + b2 + b3, rel=1e-12)
    assert res.finish_s.tolist() == res.first_token_s.tolist()  # one output token: done at prefill


class _SwitchTo(PrefillControl):
    """Idles at one clock, asks for another before every batch."""

    def __init__(self, idle_mhz: int, busy_mhz: int) -> None:
        self.idle_mhz = idle_mhz
        self.busy = busy_mhz

    def clock(self, *args):
        return self.busy


def test_clock_switch_takes_effect_after_the_delay_mid_batch(profile):
    sc = scenario(cluster={"clock_switch_delay_s": 0.02})
    pol = Static(profile, sc, 1980, "switch")
    pol.prefill = lambda tp, base=None: _SwitchTo(345, 1980)  # type: ignore[method-assign]
    res = Simulation(sc, profile, trace([1.0], [2048], [1]), pol).run()
    t_slow, w_slow = profile.prefill(4, [2048], 345.0)
    t_fast, w_fast = profile.prefill(4, [2048], 1980.0)
    # 20 ms at 345 MHz do 0.02 / t_slow of the work; the rest runs at 1980 MHz
    want = 1.0 + 0.02 + (1 - 0.02 / t_slow) * t_fast
    assert res.first_token_s[0] == pytest.approx(want, rel=1e-12)
    busy = 4 * (w_slow * 0.02 + w_fast * (want - 1.02))
    assert res.prefill[0].energy_busy_j == pytest.approx(busy, rel=1e-12)
    tl = res.prefill[0].timeline
    assert tl.freq_mhz[:3].tolist() == [345, 345, 1980]  # idle, first part of the batch, rest of it


def test_kv_memory_holds_requests_back_and_oversized_ones_are_rejected(profile):
    sc = scenario(decode={"tp": 2, "instances": 1}, prefill={"tp": 2, "instances": 1}, cluster={"gpus": 4})
    cap = profile.kv_capacity_tokens(2)
    big = cap // 2 + 1000  # two of these do not fit together
    # the first decodes long enough for the second to arrive while it holds its KV
    res = run(sc, trace([0.0, 0.0, 0.0], [big - 10, big - 10, cap + 10], [2000, 5, 5]), profile=profile)
    assert np.isfinite(res.finish_s[:2]).all()
    assert res.kv_blocked[1] and not res.kv_blocked[0]
    assert res.finish_s[1] > res.finish_s[0]  # admitted only once the first one freed its KV
    assert res.rejected.tolist() == [False, False, True] and np.isnan(res.finish_s[2])
    s = summarize(res)
    assert (s.completed, s.rejected, s.kv_blocked) == (2, 1, 1)
    assert not s.slo.met


@st.composite
def small_traces(draw):
    n = draw(st.integers(1, 25))
    gaps = draw(st.lists(st.floats(0.0, 0.5), min_size=n, max_size=n))
    inputs = draw(st.lists(st.integers(1, 6000), min_size=n, max_size=n))
    outputs = draw(st.lists(st.integers(1, 60), min_size=n, max_size=n))
    return trace(np.cumsum(gaps) - gaps[0], inputs, outputs)


@settings(max_examples=25)
@given(tr=small_traces(), policy=st.sampled_from(["distserve", "dualscale", "lowest-feasible", "rules", "static:900"]),
       delay=st.sampled_from([0.0, 0.03]), pools=st.sampled_from([(1, 1), (2, 1), (1, 2)]))
def test_conservation(profile, tr, policy, delay, pools):
    sc = scenario(prefill={"tp": 2, "instances": pools[0]}, decode={"tp": 4, "instances": pools[1]},
                  cluster={"gpus": 16, "clock_switch_delay_s": delay})
    res = run(sc, tr, policy, profile)
    # every request finishes exactly once, after its first token, with all its output tokens
    assert np.isfinite(res.finish_s).all()
    assert np.all(res.first_token_s >= tr.arrival_s) and np.all(res.finish_s >= res.first_token_s)
    assert res.tokens_out.tolist() == tr.output_tokens.tolist()
    assert res.end_s == pytest.approx(res.finish_s.max(), abs=0)
    for inst in (*res.prefill, *res.decode):
        tl = inst.timeline
        t0, t1 = np.asarray(tl.t0_s), np.asarray(tl.t1_s)
        # contiguous segments from 0 to the end, and energy = integral of power over them
        assert t0[0] == 0.0 and t1[-1] == pytest.approx(res.end_s, rel=1e-12)
        np.testing.assert_allclose(t0[1:], t1[:-1], rtol=0, atol=1e-12)
        integral = inst.tp * float(np.sum(np.asarray(tl.power_w) * (t1 - t0)))
        assert integral == pytest.approx(inst.energy_busy_j + inst.energy_idle_j, rel=1e-9)
        assert set(tl.freq_mhz) <= set(profile.clocks_mhz.tolist())


def test_same_inputs_same_results(profile):
    sc = scenario(prefill={"tp": 2, "instances": 2}, cluster={"gpus": 8, "clock_switch_delay_s": 0.02})
    rng = np.random.default_rng(0)
    tr = trace(np.cumsum(rng.exponential(0.2, 80)), rng.integers(10, 3000, 80), rng.integers(1, 80, 80))
    a, b = (summarize(run(sc, tr, "dualscale", profile)) for _ in range(2))
    strip = lambda s: msgspec.structs.replace(s, sim_wall_s=0.0)  # noqa: E731
    assert strip(a) == strip(b)


def test_a_policy_always_at_the_top_clock_reproduces_distserve(profile):
    sc = scenario(prefill={"tp": 2, "instances": 2}, cluster={"gpus": 8, "clock_switch_delay_s": 0.02})
    rng = np.random.default_rng(1)
    tr = trace(np.cumsum(rng.exponential(0.1, 120)), rng.integers(10, 4000, 120), rng.integers(1, 100, 120))
    top = int(profile.clocks_mhz[-1])
    a = summarize(run(sc, tr, "distserve", profile))
    b = summarize(run(sc, tr, f"static:{top}", profile))
    strip = lambda s: msgspec.structs.replace(s, sim_wall_s=0.0, policy="")  # noqa: E731
    assert strip(a) == strip(b)
