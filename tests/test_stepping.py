"""Compiled decode macro-steps (``DecodeStepper``, ``_kernels/stepping.py``) against their twins:
the online correction against ``Correction.observe`` itself, and whole runs of one decode instance
against a per-step loop over the public controller (tests/reference.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
from hypothesis import given
from hypothesis import strategies as st_

from dualscale._kernels import stepping as st
from dualscale.control import Correction, DecodeController, DecodeStepper
from dualscale.control import correction as corr
from dualscale.sim.scenario import Truth
from dualscale.sim.truth import GroundTruth

positive = st_.floats(1e-4, 1.0)
# power: unknown (0) or a GPU's range; subnormal watts would overflow the ratio, which NumPy scalars
# (the kernels without JIT) report as a warning
power_w = st_.one_of(st_.just(0.0), st_.floats(1.0, 900.0))


@given(st_.lists(st_.tuples(positive, positive, power_w, power_w), min_size=1,
                 max_size=40), st_.sampled_from([corr.Z, corr.Z_DECODE]))
def test_correction_kernel_agrees_with_correction(obs, z):
    c = Correction(z)
    cv = np.zeros(st.N_CV)
    cv[st.C_VAR], cv[st.C_TIME_FACTOR], cv[st.C_POWER_FACTOR], cv[st.C_Z] = c.var, 1.0, 1.0, z
    cv[st.C_ALPHA], cv[st.C_TRIGGER_Z], cv[st.C_HOLD] = corr.ALPHA, corr.TRIGGER_Z, corr.HOLD
    cv[st.C_LOG_TOL], cv[st.C_LOG_LIMIT] = math.log1p(corr.TOL), math.log(corr.FACTOR_LIMIT)
    for measured_s, model_s, measured_w, model_w in obs:
        assert st.correction_observe(cv, measured_s, model_s, measured_w, model_w) == \
            c.observe(measured_s, model_s, measured_w, model_w)
        got = [cv[st.C_MU], cv[st.C_VAR], cv[st.C_TIME_FACTOR], cv[st.C_POWER_FACTOR], cv[st.C_OBSERVATIONS],
               cv[st.C_TRIGGERS], cv[st.C_HOLD_LEFT]]
        want = [c.mu, c.var, c.time_factor, c.power_factor, c.observations, c.triggers, c.hold_left]
        assert got == pytest.approx(want, rel=1e-12, abs=1e-300, nan_ok=True)


truths = st_.builds(
    Truth, latency_bias_decode=st_.floats(-0.3, 0.5), power_bias_decode=st_.floats(-0.2, 0.3),
    clock_shape_error=st_.sampled_from([0.0, 0.15, -0.1]), latency_noise=st_.sampled_from([0.0, 0.05]),
    power_cap_w=st_.sampled_from([0.0, 450.0, 600.0]), switch_jitter=st_.sampled_from([0.0, 0.5]))


@given(truths, st_.lists(st_.tuples(st_.integers(1, 3000), st_.integers(2, 60)), min_size=1, max_size=24),
       st_.sampled_from(["slack", "tbt", 705, 1980]), st_.sampled_from([0.0, 0.02]), st_.integers(2, 8),
       st_.integers(0, 2**31))
def test_stepper_agrees_with_per_step_controller(profile, truth, lengths, control, delay_s, max_batch, seed):
    """The compiled steps equal decide/observe per step on GroundTruth's NumPy truth, draws included."""
    tp = 4
    block = int(profile.config.model.kv_block_tokens)
    reqs = [(0.0, p, o, -(-(p + o) // block) * block) for p, o in lengths]
    kv_capacity = max(r[3] for r in reqs) * 3  # some requests wait for KV

    def make():
        if isinstance(control, int):
            return control
        return DecodeController(profile, tp, 0.1, slack="request" if control == "slack" else "tbt")

    idle = 345
    c_ref = make()
    finish, busy_j, idle_j, segs = ref.decode_steps(
        profile, tp, c_ref, idle, reqs, GroundTruth(truth, "decode", tp, np.random.default_rng(seed)), delay_s,
        kv_capacity, max_batch)
    plant = GroundTruth(truth, "decode", tp, np.random.default_rng(0)).plant()
    prompt = np.array([r[1] for r in reqs], dtype=np.int64)
    output = np.array([r[2] for r in reqs], dtype=np.int64)
    need = np.array([r[3] for r in reqs], dtype=np.int64)
    req_i, req_f = DecodeStepper.request_arrays(np.zeros(len(reqs)), prompt, output, need)
    req_f[DecodeStepper.REQ_FIRST_TOKEN_S] = 0.0
    req_f[DecodeStepper.REQ_READY_S] = 0.0
    c_new = make()
    s = DecodeStepper(profile, tp, c_new, idle_freq_mhz=idle, requests=(req_i, req_f), plant=plant,
                      switch_delay_s=delay_s, kv_capacity_tokens=kv_capacity, max_batch_requests=max_batch,
                      rng=np.random.default_rng(seed))
    for r in range(len(reqs)):
        s.enqueue(r)
    code, _ = s.advance(0.0, math.inf, boundary=False)
    assert code == DecodeStepper.IDLE
    s.sync()
    assert sorted(finish) == list(range(len(reqs)))
    for r, (t_fin, tokens) in finish.items():
        assert req_f[DecodeStepper.REQ_FINISH_S, r] == pytest.approx(t_fin, rel=1e-12)
        assert req_i[DecodeStepper.REQ_TOKENS_OUT, r] == tokens
    assert s.energy_busy_j == pytest.approx(busy_j, rel=1e-9)
    assert s.energy_idle_j == pytest.approx(idle_j, rel=1e-9, abs=1e-9)
    f, i = s.segments()
    assert f.shape[1] == len(segs)
    assert f[0].tolist() == pytest.approx([x[0] for x in segs], rel=1e-12)
    assert i[0].tolist() == [x[2] for x in segs]
    assert f[2].tolist() == pytest.approx([x[3] for x in segs], rel=1e-12)
    assert i[2].astype(bool).tolist() == [x[4] for x in segs]
    if not isinstance(control, int):
        assert c_new.correction.time_factor == pytest.approx(c_ref.correction.time_factor, rel=1e-12)
        assert c_new.correction.hold_left == c_ref.correction.hold_left
