"""The macro-step engine against the per-event engine it replaced (frozen in bench/previous_engine.py
for the benchmark's side-by-side timing), run side by side on the same inputs: every request's TTFT
and TPOT, every instance's energy and timeline. A deliberate change of the simulator's semantics
retires this test together with bench/previous_engine.py.

Tolerances: energies to 1e-9 relative (the issue's bound); times to 1e-12 relative, since both
engines perform the same floating-point operations in the same order and agree bit for bit in
practice (the bound leaves room for a libm that rounds exp/log differently inside Numba)."""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest

from dualscale.sim import engine as v2
from dualscale.sim.policies import make_policy
from dualscale.sim.scenario import load_scenario
from dualscale.sim.traces import gamma_trace, load_trace, window

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import previous_engine as v1


def _scenario(**changes):
    sc = load_scenario("default")
    return msgspec.convert(msgspec.to_builtins(sc) | changes, type(sc))


NOISY = {"latency_bias_prefill": 0.2, "latency_bias_decode": 0.15, "latency_noise": 0.05, "power_bias_decode": 0.1,
         "switch_jitter": 0.5, "seed": 3}
CAPPED = {"latency_bias_decode": -0.1, "clock_shape_error": 0.1, "power_cap_w": 520.0, "power_bias_decode": 0.2}

CASES = [
    # (id, truth, trace kind, policies, only)
    ("model", {}, "conv", ["distserve", "dualscale", "lowest-feasible", "rules", "static:1065"], None),
    ("noisy", NOISY, "conv", ["distserve", "dualscale", "rules"], None),
    ("capped", CAPPED, "gamma", ["dualscale", "lowest-feasible", "distserve"], None),
    ("decode-only", {}, "gamma", ["static:705", "dualscale"], "decode"),
    ("prefill-only", NOISY, "conv", ["dualscale"], "prefill"),
]


def _trace(kind):
    conv = load_trace("azure-conv")
    if kind == "conv":
        return window(conv, 600.0, 120.0)
    return gamma_trace(9.0, 1.41, 90.0, conv, 7)


def _same(a, b, rel):
    assert a.shape == b.shape
    fa, fb = np.isfinite(a), np.isfinite(b)
    assert (fa == fb).all()
    np.testing.assert_allclose(a[fa], b[fb], rtol=rel, atol=0.0)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_macro_steps_match_the_per_event_engine(case, profile):
    _, truth, kind, policies, only = case
    sc = _scenario(truth=truth)
    tr = _trace(kind)
    for name in policies:
        old = v1.Simulation(sc, profile, tr, make_policy(name, profile, sc), only=only).run()
        new = v2.Simulation(sc, profile, tr, make_policy(name, profile, sc), only=only).run()
        assert new.events == old.events, name
        assert new.end_s == pytest.approx(old.end_s, rel=1e-12)
        _same(new.first_token_s, old.first_token_s, 1e-12)
        _same(new.finish_s, old.finish_s, 1e-12)
        _same(new.admit_wait_s, old.admit_wait_s, 1e-9)
        assert (new.tokens_out == old.tokens_out).all()
        assert (new.kv_blocked == old.kv_blocked).all()
        for (a, b), (c, d) in zip(zip(new.latencies_s(), old.latencies_s()), [(0, 0), (1, 1)]):
            _same(a, b, 1e-12)
        for phase in ("prefill", "decode"):
            assert new.energy_j(phase) == pytest.approx(old.energy_j(phase), rel=1e-9, abs=0.0), (name, phase)
        for ni, oi in zip(new.decode, old.decode):
            assert ni.energy_busy_j == pytest.approx(oi.energy_busy_j, rel=1e-9)
            assert ni.energy_idle_j == pytest.approx(oi.energy_idle_j, rel=1e-9)
            tn, to = ni.timeline, oi.timeline
            assert len(tn) == len(to.t0_s)
            np.testing.assert_allclose(tn.t0_s, to.t0_s, rtol=1e-12)
            np.testing.assert_allclose(tn.power_w, to.power_w, rtol=1e-12)
            assert tn.freq_mhz.tolist() == list(to.freq_mhz)
            assert tn.queue.tolist() == list(to.queue)
            assert tn.busy.tolist() == list(to.busy)


def test_controllers_learn_the_same(profile):
    """What the decode controllers learnt during a run is written back into them."""
    sc = _scenario(truth=NOISY)
    tr = _trace("conv")
    ctls = []
    for mod in (v1, v2):
        pol = make_policy("dualscale", profile, sc)
        sim = mod.Simulation(sc, profile, tr, pol)
        sim.run()
        ctls.append([d.control.ctl for d in sim.decode])
    for a, b in zip(*ctls):
        for attr in ("mu", "var", "time_factor", "power_factor", "observations", "triggers", "hold_left"):
            assert getattr(a.correction, attr) == pytest.approx(getattr(b.correction, attr), rel=1e-12), attr
        assert a.correction.observations > 100
        np.testing.assert_allclose(a._coef, b._coef, rtol=1e-12)
