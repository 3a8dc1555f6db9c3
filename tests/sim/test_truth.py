"""The simulated GPUs' ground truth ([truth]): each kind of model error does what it says, the
controllers only see it through measurements, and the default truth is the profile itself."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from dualscale.errors import ConfigError
from dualscale.sim.engine import Simulation
from dualscale.sim.policies import make_policy
from dualscale.sim.scenario import Scenario, Truth
from dualscale.sim.traces import Trace
from dualscale.sim.truth import GroundTruth


def scenario(truth=None, **changes) -> Scenario:
    raw = {"name": "test", "prefill": {"tp": 4, "instances": 1}, "decode": {"tp": 4, "instances": 1},
           "cluster": {"gpus": 8, "clock_switch_delay_s": 0.0}, "truth": truth or {}} | changes
    return msgspec.convert(raw, Scenario)


def sparse_trace(n=6) -> Trace:
    """Requests 20 s apart: no queueing, so every iteration runs alone and its time is the truth's."""
    return Trace("sparse", np.arange(n) * 20.0, np.full(n, 1500), np.full(n, 40), "test")


def run(sc, profile, policy="distserve", tr=None):
    return Simulation(sc, profile, tr or sparse_trace(), make_policy(policy, profile, sc)).run()


def grid(profile, phase="decode"):
    out = np.array(profile.decode(4, np.full(32, 1000), profile.clocks_mhz.astype(float))) if phase == "decode" \
        else np.array(profile.prefill(4, [2048], profile.clocks_mhz.astype(float)))
    return out.copy()


def test_bias_shape_and_power_bias(profile):
    rng = np.random.default_rng(0)
    model = grid(profile)
    g = model.copy()
    assert GroundTruth(Truth(latency_bias_decode=0.2, power_bias_decode=-0.1), "decode", 4, rng).apply(g) is None
    np.testing.assert_allclose(g[0], 1.2 * model[0], rtol=1e-12)
    np.testing.assert_allclose(g[1], 0.9 * model[1], rtol=1e-12)
    g = model.copy()
    GroundTruth(Truth(latency_bias_prefill=0.5), "decode", 4, rng).apply(g)  # the other phase's bias
    np.testing.assert_array_equal(g, model)
    g = model.copy()
    GroundTruth(Truth(clock_shape_error=0.1), "decode", 4, rng).apply(g)
    slow_model, slow_truth = model[0] / model[0, -1] - 1, g[0] / g[0, -1] - 1
    assert g[0, -1] == model[0, -1]  # the top clock is where the shape is anchored
    np.testing.assert_allclose(slow_truth, 1.1 * slow_model, rtol=1e-9, atol=1e-15)


def test_noise_is_seeded_lognormal_with_mean_one(profile):
    model = grid(profile)
    ratios = []
    truth = GroundTruth(Truth(latency_noise=0.05), "decode", 4, np.random.default_rng(1))
    for _ in range(4000):
        g = model.copy()
        truth.apply(g)
        r = g[0] / model[0]
        assert np.ptp(r) < 1e-12  # one draw per iteration, the same at every clock
        ratios.append(r[0])
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.005)
    assert np.std(np.log(ratios)) == pytest.approx(0.05, rel=0.05)


def test_a_power_cap_runs_the_highest_clock_that_fits(profile):
    model = grid(profile, "prefill")
    cap = float(np.median(model[1]))
    g = model.copy()
    eff = GroundTruth(Truth(power_cap_w=cap), "prefill", 4, np.random.default_rng(0)).apply(g)
    assert eff is not None
    fits = np.flatnonzero(model[1] <= cap)
    top_fit = fits[-1]
    assert eff[-1] == top_fit and eff[0] == 0
    assert np.all(g[1] <= cap) and g[0, -1] == model[0, top_fit]


def test_switch_delay_is_the_slowest_ranks(profile):
    t = GroundTruth(Truth(switch_jitter=0.5), "decode", 8, np.random.default_rng(3))
    draws = [t.switch_delay_s(0.02) for _ in range(2000)]
    assert min(draws) >= 0.01 and max(draws) <= 0.03
    assert np.mean(draws) > 0.02  # the max of 8 ranks sits above the mean delay
    assert GroundTruth(Truth(), "decode", 8, np.random.default_rng(3)).switch_delay_s(0.02) == 0.02


def test_default_truth_is_the_model(profile):
    assert Truth().is_model and Truth(seed=5).is_model and not Truth(latency_noise=0.01).is_model
    sc = scenario()
    a, b = run(sc, profile), run(scenario({"seed": 9}), profile)
    np.testing.assert_array_equal(a.first_token_s, b.first_token_s)


def test_a_slower_truth_slows_every_iteration(profile):
    base = run(scenario(), profile)
    slow = run(scenario({"latency_bias_prefill": 0.25, "latency_bias_decode": 0.25}), profile)
    ttft_base = base.first_token_s - base.trace.arrival_s
    ttft_slow = slow.first_token_s - slow.trace.arrival_s
    np.testing.assert_allclose(ttft_slow, 1.25 * ttft_base, rtol=1e-9)
    # every decode step 25 % longer: the busy time of the decode instance
    busy = [sum(t1 - t0 for t0, t1, b in zip(r.decode[0].timeline.t0_s, r.decode[0].timeline.t1_s,
                                              r.decode[0].timeline.busy) if b) for r in (base, slow)]
    assert busy[1] == pytest.approx(1.25 * busy[0], rel=1e-9)


class _Recorder:
    """Wraps a control and records what the engine feeds back."""

    def __init__(self, inner):
        self.inner = inner
        self.idle_mhz = inner.idle_mhz
        self.asked: list[int] = []
        self.seen: list[tuple[float, int, float]] = []

    def clock(self, *args):
        f = self.inner.clock(*args)
        self.asked.append(f)
        return f

    def observe(self, iteration_s, freq_mhz, power_w):
        self.seen.append((iteration_s, freq_mhz, power_w))
        self.inner.observe(iteration_s, freq_mhz, power_w)


def test_measurements_fed_back_are_the_truths_with_the_clock_read_back(profile):
    """Under a power cap the clock read back is below the one asked, and the engine reports it."""
    sc = scenario({"power_cap_w": 350.0})
    pol = make_policy("distserve", profile, sc)
    rec = {}
    orig_p, orig_d = pol.prefill, pol.decode
    pol.prefill = lambda tp, base=None: rec.setdefault("p", _Recorder(orig_p(tp, base)))  # type: ignore[method-assign]
    pol.decode = lambda tp, base=None: rec.setdefault("d", _Recorder(orig_d(tp, base)))  # type: ignore[method-assign]
    res = Simulation(sc, profile, sparse_trace(3), pol).run()
    for r in rec.values():
        assert r.seen and set(r.asked) == {1980}
        clocks = {f for _, f, _ in r.seen}
        assert clocks and max(clocks) < 1980, clocks  # throttled below the clock asked
        assert all(p <= 350.0 + 1e-9 for _, _, p in r.seen)
    pre = rec["p"].seen[0]
    t, w = profile.prefill(4, [1500], float(pre[1]))
    assert pre[0] == pytest.approx(t, rel=1e-12) and pre[2] == pytest.approx(min(w, 350.0), rel=1e-12)
    busy = [f for f, b in zip(res.prefill[0].timeline.freq_mhz, res.prefill[0].timeline.busy) if b]
    assert set(busy) == {pre[1]}  # the timeline records the clock that ran


def test_bad_truth_is_named():
    with pytest.raises((ConfigError, ValueError), match="latency_noise"):
        msgspec.convert({"latency_noise": -1.0}, Truth)
