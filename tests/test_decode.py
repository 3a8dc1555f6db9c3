"""DecodeController and its slack kernel: DESIGN.md, "Decode decision"."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import dualscale
import reference as ref
from dualscale._kernels import slack as sk
from dualscale.testing import check_decode_decision, decode_batches

PAPER_CLOCKS = [360, 570, 780, 1080, 1380, 1680, 1830]


@pytest.fixture(scope="module")
def controllers(profile):
    ctls = {
        (mode, name): dualscale.DecodeController(profile, tp=4, tpot_slo_s=0.1, slack=mode, clocks_mhz=clocks)
        for mode in ("request", "tbt")
        for name, clocks in (("paper", PAPER_CLOCKS), ("full", None))
    }
    ctls[("energy", "full")] = dualscale.DecodeController(profile, tp=4, tpot_slo_s=0.1, objective="energy")
    return ctls


@pytest.mark.parametrize("case", [("request", "paper"), ("request", "full"), ("tbt", "paper"), ("tbt", "full"),
                                  ("energy", "full")])
@given(b=decode_batches(), kv=st.sampled_from([0.0, 0.89, 0.9, 1.0]))
def test_decisions_keep_the_guarantees(controllers, case, b, kv):
    ctl = controllers[case]
    d = ctl.decide(b.now_s, b.first_token_s, b.tokens_out, b.context_tokens, kv_util=kv)
    check_decode_decision(ctl, b, d, kv_util=kv)


@given(b=decode_batches(max_requests=32), tp=st.sampled_from([2, 4, 8]), slo=st.floats(0.005, 0.3),
       margin=st.floats(0.0, 0.5), request=st.booleans(), by_power=st.booleans())
def test_kernel_matches_twin(profile, b, tp, slo, margin, request, by_power):
    if b.first_token_s.size == 0:
        return
    coef = profile.coefficients("decode", tp)
    table = np.ascontiguousarray(profile.clock_table("decode", tp))
    params = np.array([b.now_s, slo, margin, 1.0 if request else 0.0, 1.0 if by_power else 0.0])
    j, budget = sk.choose(b.first_token_s, b.tokens_out, b.context_tokens, params, coef, table,
                          np.empty((2, table.shape[1])))
    want_j, want_budget = ref.decode_choose(b.now_s, b.first_token_s, b.tokens_out, b.context_tokens,
                                            slo, margin, request, coef, table, by_power)
    assert j == want_j
    assert budget == pytest.approx(want_budget, rel=1e-12, abs=1e-12)


@given(b=decode_batches(max_requests=32), slo=st.floats(0.01, 0.3), shrink=st.floats(0.0, 1.0),
       later_s=st.floats(0.0, 0.5), objective=st.sampled_from(["energy", "power"]))
def test_a_smaller_budget_never_lowers_the_clock(profile, b, slo, shrink, later_s, objective):
    if b.first_token_s.size == 0:
        return
    # "tbt": the budget is the target itself, so a smaller SLO is a smaller budget
    big = dualscale.DecodeController(profile, tp=4, tpot_slo_s=slo, slack="tbt", objective=objective)
    # never above ``slo`` (slo * shrink + 1e-4 was, for shrink near 1: hypothesis found it)
    small = dualscale.DecodeController(profile, tp=4, tpot_slo_s=max(1e-4, slo * shrink), slack="tbt",
                                       objective=objective)
    args = (b.now_s, b.first_token_s, b.tokens_out, b.context_tokens)
    assert small.decide(*args).freq_mhz >= big.decide(*args).freq_mhz
    # "request": time passing only eats slack
    req = dualscale.DecodeController(profile, tp=4, tpot_slo_s=slo, objective=objective)
    now = req.decide(*args)
    later = req.decide(b.now_s + later_s, *args[1:])
    assert later.budget_s <= now.budget_s
    assert later.freq_mhz >= now.freq_mhz


def test_picks_least_energy_not_lowest_feasible(profile):
    """With a loose budget the least-energy clock sits above the lowest clock (the U-shaped curve)."""
    ctl = dualscale.DecodeController(profile, tp=4, tpot_slo_s=10.0, slack="tbt", objective="energy")
    ctx = np.full(32, 1000)
    d = ctl.decide(100.0, np.full(32, 99.0), np.full(32, 10), ctx)
    t, w = profile.decode(4, ctx, ctl.clocks_mhz.astype(float))
    assert d.freq_mhz == ctl.clocks_mhz[np.argmin(w * t)]
    assert d.freq_mhz > ctl.clocks_mhz[0]
    assert d.energy_j == pytest.approx(4 * np.min(w * t), rel=1e-12)


def test_infeasible_and_empty_batches(profile):
    ctl = dualscale.DecodeController(profile, tp=4, tpot_slo_s=0.1, idle_freq_mhz=600)
    late = ctl.decide(100.0, [50.0], [10], [500])  # 50 s for 10 tokens: hopelessly behind
    assert (late.freq_mhz, late.feasible) == (1980, False)
    assert late.budget_s < 0
    idle = ctl.decide(100.0, [], [], [])
    assert (idle.freq_mhz, idle.step_time_s, idle.energy_j) == (600, 0.0, 0.0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda c: c.decide(float("inf"), [1.0], [2], [10]), "now_s"),
        (lambda c: c.decide(5.0, [np.nan], [2], [10]), r"first_token_s\[0\]"),
        (lambda c: c.decide(5.0, [6.0], [2], [10]), r"first_token_s\[0\] = 6.0: after now_s"),
        (lambda c: c.decide(5.0, [1.0], [0], [10]), r"tokens_out\[0\] = 0"),
        (lambda c: c.decide(5.0, [1.0], [2], [0]), r"context_tokens\[0\] = 0"),
        (lambda c: c.decide(5.0, [1.0], [-2], [10]), r"tokens_out\[0\] = -2"),
        (lambda c: c.decide(5.0, [1.0, 2.0], [2], [10, 10]), "tokens_out: length 1 does not match first_token_s length 2"),
        (lambda c: c.decide(5.0, [1.0], [2], [10.5]), "context_tokens"),
        (lambda c: c.decide(5.0, [1.0], [2], [10], kv_util=-0.1), "kv_util"),
    ],
)
def test_bad_input_names_the_argument(controllers, call, match):
    with pytest.raises(ValueError, match=match):
        call(controllers[("request", "full")])


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(tp=16), "tp = 16"), (dict(tpot_slo_s=-1.0), "tpot_slo_s"), (dict(slack="slo"), "slack = 'slo'"),
     (dict(margin=-0.1), "margin"), (dict(clocks_mhz=[2100]), "clocks_mhz contains 2100"),
     (dict(objective="speed"), "objective = 'speed'")],
)
def test_bad_construction_names_the_argument(profile, kwargs, match):
    with pytest.raises(ValueError, match=match):
        dualscale.DecodeController(profile, **(dict(tp=4, tpot_slo_s=0.1) | kwargs))
