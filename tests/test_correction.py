"""Online model correction: learns a biased truth, plans conservatively, falls back to the top
clock when a measurement beats its prediction, and never causes a miss the top clock avoids."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import dualscale
from dualscale.control import correction as cr
from dualscale.testing import decode_batches, prefill_queues, project_queue


def test_a_bias_is_learnt_from_one_iteration_and_settles():
    c = cr.Correction()
    assert c.time_factor == 1.0
    c.observe(1.2, 1.0)
    # first observation: the mean is the observed log-ratio; the spread starts at SIGMA0
    assert c.time_factor == pytest.approx(1.2 * math.exp(cr.Z * cr.SIGMA0))
    for _ in range(200):
        c.observe(1.2, 1.0)
    assert c.time_factor == pytest.approx(1.2, rel=1e-3)
    assert c.last_model_error == pytest.approx(0.2)


def test_noise_makes_the_plan_slower_not_faster(rng):
    """With 5 % lognormal noise the factor sits above the typical ratio, so few measurements exceed
    the prediction planned with (the side on which deadlines are missed)."""
    c = cr.Correction()
    above, n = 0, 2000
    for _ in range(n):
        ratio = 1.1 * math.exp(0.05 * rng.standard_normal())
        above += ratio > c.time_factor
        c.observe(ratio, 1.0)
    assert c.time_factor > 1.1
    assert above / n < 0.06  # z = 2 on a Gaussian log-ratio: about 2.3 %, plus the learning transient
    # the mean factor (what the coarse tier plans with) is the bias itself, without the margin:
    # the EW mean of ~1/ALPHA = 10 draws of sd 0.05 has sd ~0.012, so 4 sd is 5 %
    assert c.mean_time_factor == pytest.approx(1.1, rel=0.05)
    assert c.mean_time_factor < c.time_factor


def test_outliers_and_bad_values_are_not_learnt():
    c = cr.Correction()
    for measured, model in ((0.0, 1.0), (1.0, 0.0), (math.nan, 1.0), (math.inf, 1.0), (100.0, 1.0), (0.01, 1.0)):
        assert not c.observe(measured, model)
    assert c.observations == 0 and c.time_factor == 1.0


def test_the_safety_rule_holds_the_top_clock(profile):
    ctl = dualscale.DecodeController(profile, tp=4, tpot_slo_s=0.1)
    batch = ([9.0, 9.8], [12, 4], [1200, 700])
    first = ctl.decide(10.0, *batch)
    assert first.freq_mhz < 1980
    model_s = float(profile.decode_time_s(4, batch[2], first.freq_mhz))
    ctl.observe(1.5 * model_s, first.freq_mhz)
    assert ctl.correction.triggers == 1
    clocks = [ctl.decide(10.0, *batch).freq_mhz for _ in range(cr.HOLD + 1)]
    assert clocks[: cr.HOLD] == [1980] * cr.HOLD
    # once the hold is over the controller plans with the corrected (slower) model, not at the top
    assert clocks[-1] < 1980 and clocks[-1] >= first.freq_mhz


def test_the_prediction_is_taken_at_the_clock_read_back(profile):
    """A power cap made the GPU run at 1200 MHz instead of the clock asked: the measurement must be
    compared with the model at 1200 MHz (then there is no error to learn)."""
    ctl = dualscale.DecodeController(profile, tp=4, tpot_slo_s=0.1)
    ctx = [1200, 700]
    ctl.decide(10.0, [9.0, 9.8], [12, 4], ctx)
    ctl.observe(float(profile.decode_time_s(4, ctx, 1200)), 1200)
    assert ctl.correction.observations == 1 and ctl.correction.last_model_error == pytest.approx(0.0, abs=1e-9)
    assert ctl.correction.triggers == 0


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_off_switch_and_unknown_clock_learn_nothing(profile, phase):
    def make(on):
        if phase == "prefill":
            return dualscale.PrefillController(profile, tp=2, ttft_slo_s=0.6, online_correction=on)
        return dualscale.DecodeController(profile, tp=4, tpot_slo_s=0.1, online_correction=on)

    def decide(ctl):
        if phase == "prefill":
            return ctl.decide(10.0, [9.7, 9.9], [3000, 800])
        return ctl.decide(10.0, [9.0, 9.8], [12, 4], [1200, 700])

    off, on = make(False), make(True)
    for ctl in (off, on):
        d = decide(ctl)
        ctl.observe(10.0, d.freq_mhz if ctl is off else 0)  # off: ignored; on: clock unknown
    assert off.correction.observations == 0 and on.correction.observations == 0
    d = decide(on)
    on.observe(2.0 * d.batch_time_s if phase == "prefill" else 2.0 * d.step_time_s, d.freq_mhz, 500.0)
    assert on.correction.observations == 1 and on.correction.time_factor > 2.0
    assert on.correction.power_factor > 0


@pytest.fixture(scope="module")
def learners(profile):
    return {"decode": dualscale.DecodeController(profile, tp=4, tpot_slo_s=0.1),
            "prefill": dualscale.PrefillController(profile, tp=2, ttft_slo_s=0.6, solver="exact")}


def _learn(ctl, bias, decide, model_time, n=3):
    ctl.correction.reset()
    ctl._coef[:] = ctl._model_coef  # the learnt factor of the previous example is forgotten too
    for _ in range(n):
        d = decide()
        ctl.observe((1.0 + bias) * model_time(d), d.freq_mhz)
    # judge the corrected plan itself, not the safety rule's top clock (which would pass trivially)
    ctl.correction.hold_left = 0


@given(b=decode_batches(max_requests=32), bias=st.floats(-0.3, 0.6))
def test_decode_with_a_biased_truth_misses_only_what_the_top_clock_misses(learners, profile, b, bias):
    """Once the estimate has seen 3 iterations of a truth (1 + bias) x the profile, the chosen
    clock's true step fits the budget whenever the top clock's does."""
    ctl = learners["decode"]
    warm = ([9.0, 9.8], [12, 4], [1200, 700])
    _learn(ctl, bias, lambda: ctl.decide(10.0, *warm),
           lambda d: float(profile.decode_time_s(4, warm[2], d.freq_mhz)))
    d = ctl.decide(b.now_s, b.first_token_s, b.tokens_out, b.context_tokens)
    if b.first_token_s.size == 0:
        return
    budget = float(np.min(0.95 * 0.1 * b.tokens_out - (b.now_s - b.first_token_s)))
    true_s = (1.0 + bias) * np.asarray(profile.decode_time_s(4, b.context_tokens, [d.freq_mhz, 1980]))
    if true_s[1] <= budget:
        assert true_s[0] <= budget + 1e-9, (d.freq_mhz, true_s, budget)


@given(q=prefill_queues(max_requests=12), bias=st.floats(-0.3, 0.6))
def test_prefill_with_a_biased_truth_misses_only_what_the_top_clock_misses(learners, profile, q, bias):
    """The same for the requests completing in the batch about to run (later batches are re-planned)."""
    ctl = learners["prefill"]
    _learn(ctl, bias, lambda: ctl.decide(10.0, [9.7, 9.9], [3000, 800]),
           lambda d: float(profile.prefill_time_s(2, [2048], d.freq_mhz, [0])))
    d = ctl.decide(q.now_s, q.arrival_s, q.prompt_tokens, q.prefilled_tokens)
    batches, completes = project_queue(q.prompt_tokens, q.prefilled_tokens, ctl.max_batch_tokens, ctl.horizon)
    if not batches:
        return
    chunks = np.array([c for c, _ in batches[0]])
    prefix = np.array([p for _, p in batches[0]])
    true_s = (1.0 + bias) * np.asarray(profile.prefill_time_s(2, chunks, [d.freq_mhz, 1980], prefix))
    for i, k in enumerate(completes):
        if k == 0:
            deadline = q.arrival_s[i] + 0.95 * 0.6 - q.now_s
            if true_s[1] <= deadline:
                assert true_s[0] <= deadline + 1e-9, (i, d.freq_mhz, true_s, deadline)


def test_without_correction_a_slower_truth_misses_deadlines_the_top_clock_meets(profile):
    """The property above is not vacuous: the uncorrected controller fails it on a 30 % slower truth."""
    ctl = dualscale.DecodeController(profile, tp=4, tpot_slo_s=0.1, online_correction=False)
    ctx, out = np.full(64, 1500), np.full(64, 50)
    top_s = float(profile.decode_time_s(4, ctx, 1980))
    misses = 0
    for budget in np.linspace(1.3 * top_s, 2.5 * top_s, 8):
        first = np.full(64, 100.0 - (0.95 * 0.1 * 50 - budget))  # leaves exactly `budget` for the next step
        d = ctl.decide(100.0, first, out, ctx)
        true_s = 1.3 * np.asarray(profile.decode_time_s(4, ctx, [d.freq_mhz, 1980]))
        misses += bool(true_s[1] <= budget < true_s[0])
    assert misses > 0
