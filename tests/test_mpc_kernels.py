"""The prefill MPC kernels against their plain twins in tests/reference.py and dualscale.testing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import reference as ref
from dualscale._kernels import mpc
from dualscale.testing import prefill_queues, project_queue


def _project(q, max_batch_tokens, horizon):
    n = q.prompt_tokens.size
    tokens = np.ascontiguousarray(np.stack([q.prompt_tokens, q.prefilled_tokens]).astype(np.int64))
    ch_t = np.empty(n + horizon, dtype=np.int64)
    ch_p = np.empty(n + horizon, dtype=np.int64)
    bounds = np.empty(horizon + 1, dtype=np.int64)
    done = np.empty(n, dtype=np.int64)
    bt = np.empty(horizon, dtype=np.int64)
    k = mpc.project(tokens, max_batch_tokens, horizon, ch_t, ch_p, bounds, done, bt)
    batches = [list(zip(ch_t[bounds[i]:bounds[i + 1]].tolist(), ch_p[bounds[i]:bounds[i + 1]].tolist()))
               for i in range(k)]
    return batches, done.tolist(), bt[:k].tolist()


@given(prefill_queues(max_requests=30), st.integers(1, 4096), st.integers(1, 12))
def test_project_matches_plain_batching(q, max_batch_tokens, horizon):
    batches, done, batch_tokens = _project(q, max_batch_tokens, horizon)
    want_batches, want_done = project_queue(q.prompt_tokens, q.prefilled_tokens, max_batch_tokens, horizon)
    assert batches == want_batches
    assert done == want_done
    assert batch_tokens == [sum(c for c, _ in b) for b in want_batches]
    assert all(t <= max_batch_tokens for t in batch_tokens)


@given(prefill_queues(max_requests=20), st.sampled_from([2, 4, 8]), st.floats(0.05, 2.0), st.floats(0.0, 0.5))
def test_tabulate_and_budgets_match_twins(profile, q, tp, slo_s, margin):
    horizon = 6
    batches, done, _ = _project(q, 2048, horizon)
    n = len(batches)
    clocks = np.array([345.0, 780.0, 1380.0, 1980.0])
    coef = profile.coefficients("prefill", tp)
    table = np.ascontiguousarray(profile.clock_table("prefill", tp, clocks))
    ch_t = np.array([c for b in batches for c, _ in b] + [0], dtype=np.int64)
    ch_p = np.array([p for b in batches for _, p in b] + [0], dtype=np.int64)
    bounds = np.cumsum([0] + [len(b) for b in batches] + [0] * (horizon - n)).astype(np.int64)
    tables = np.zeros((2, horizon, clocks.size))
    mpc.tabulate(ch_t, ch_p, bounds, n, coef, table, tables, np.empty((2, clocks.size)))
    want = ref.tabulate(batches, coef, table)
    np.testing.assert_allclose(tables[:, :n], want, rtol=1e-12)

    params = np.array([q.now_s, slo_s, margin])
    budget = np.empty(horizon)
    relaxed = mpc.budgets(q.arrival_s, np.array(done, dtype=np.int64), params, tables, n, budget)
    want_b, want_relaxed = ref.budgets(q.now_s, q.arrival_s, done, slo_s, margin, tables[0, :n])
    np.testing.assert_allclose(budget[:n], want_b, rtol=1e-12, atol=1e-12)
    assert relaxed == want_relaxed


@st.composite
def problems(draw, max_batches=4, max_clocks=5):
    """Random plans to choose: per batch, times falling with the clock index (mostly) and energies
    of any shape; budgets somewhere between the all-fast and all-slow plans."""
    n = draw(st.integers(1, max_batches))
    f = draw(st.integers(1, max_clocks))
    base = draw(hnp.arrays(float, n, elements=st.floats(0.01, 0.5)))
    slow = draw(hnp.arrays(float, (n, f), elements=st.floats(1.0, 4.0)))
    slow = -np.sort(-slow, axis=1) if draw(st.booleans()) else slow
    times = base[:, None] * slow
    energies = draw(hnp.arrays(float, (n, f), elements=st.floats(1.0, 1000.0)))
    lo = np.cumsum(times[:, -1])
    hi = np.cumsum(times.max(axis=1))
    frac = draw(hnp.arrays(float, n, elements=st.floats(-0.1, 1.2)))
    budget = lo + frac * (hi - lo)
    budget = np.maximum(budget, lo)  # what budgets() guarantees: the all-top plan fits
    if draw(st.booleans()):
        budget[draw(st.integers(0, n - 1))] = np.inf
    tables = np.ascontiguousarray(np.stack([times, energies]))
    return tables, np.ascontiguousarray(budget)


def _front(tables, n):
    order = np.empty((n, tables.shape[2]), dtype=np.int64)
    n_front = np.empty(n, dtype=np.int64)
    mpc.frontier(tables, n, order, n_front)
    return order, n_front


@given(problems(max_batches=5, max_clocks=8))
def test_frontier_matches_twin(p):
    tables, _ = p
    n = tables.shape[1]
    order, n_front = _front(tables, n)
    for k in range(n):
        assert order[k, : n_front[k]].tolist() == ref.frontier(tables[0, k], tables[1, k])


@given(problems())
def test_exact_is_optimal_against_brute_force(p):
    tables, budget = p
    n = tables.shape[1]
    order, n_front = _front(tables, n)
    best = ref.brute_force(tables[0], tables[1], budget)
    top = np.full(n, tables.shape[2] - 1, dtype=np.int64)
    # no bound, the all-top plan's energy, and the optimum itself as the bound: all exact
    for upper in (np.inf, mpc.plan_cost(tables, budget, n, top)[0], best):
        plan = np.empty(n, dtype=np.int64)
        energy = mpc.solve_exact(tables, budget, n, order, n_front, plan, upper)
        cost, ok = mpc.plan_cost(tables, budget, n, plan)
        assert ok
        assert cost == pytest.approx(energy, rel=1e-12)
        assert energy == pytest.approx(best, rel=1e-12)


@given(problems(max_batches=5))
def test_greedy_matches_twin(p):
    tables, budget = p
    n = tables.shape[1]
    plan = np.empty(n, dtype=np.int64)
    energy = mpc.solve_greedy(tables, budget, n, plan)
    assert mpc.plan_cost(tables, budget, n, plan)[1]
    assert energy == pytest.approx(ref.greedy(tables[0], tables[1], budget), rel=1e-12)


@given(problems(max_batches=4, max_clocks=6))
def test_plan_cost_and_cheapest_plan_match_twin(p):
    tables, budget = p
    n = tables.shape[1]
    order, n_front = _front(tables, n)
    plan = np.empty(n, dtype=np.int64)
    energy, ok = mpc.cheapest_plan(tables, budget, n, order, n_front, plan)
    assert plan.tolist() == [ref.frontier(tables[0, k], tables[1, k])[-1] for k in range(n)]
    want_e, want_ok = ref.plan_cost(tables[0], tables[1], budget, plan.tolist())
    assert (energy, ok) == (pytest.approx(want_e, rel=1e-12), want_ok)
    if ok:  # every batch at its cheapest clock is optimal when it fits
        assert energy == pytest.approx(ref.brute_force(tables[0], tables[1], budget), rel=1e-12)


def _hull(tables, n, order, n_front):
    hpos = np.zeros((n, tables.shape[2]), dtype=np.int64)
    n_hull = np.zeros(n, dtype=np.int64)
    mpc.hull(tables, n, order, n_front, hpos, n_hull)
    return hpos, n_hull


@given(problems(max_batches=4, max_clocks=8))
def test_hull_matches_twin(p):
    tables, _ = p
    n = tables.shape[1]
    order, n_front = _front(tables, n)
    hpos, n_hull = _hull(tables, n, order, n_front)
    for k in range(n):
        front = order[k, : n_front[k]].tolist()
        assert hpos[k, : n_hull[k]].tolist() == ref.hull(tables[0, k], tables[1, k], front)


@given(problems(max_batches=5, max_clocks=8))
def test_water_fill_solves_the_relaxation(p):
    """Its energy is the LP optimum over hull segments (scipy), its slowdowns meet every budget
    and cost that energy on the hull, and no plan is below it."""
    tables, budget = p
    n = tables.shape[1]
    order, n_front = _front(tables, n)
    hpos, n_hull = _hull(tables, n, order, n_front)
    u = np.empty(n)
    energy = mpc.water_fill(tables, budget, n, order, hpos, n_hull, u, np.empty(2 * n + 3 * n * tables.shape[2]))
    fronts = [order[k, : n_front[k]].tolist() for k in range(n)]
    assert energy == pytest.approx(ref.relaxation(tables[0], tables[1], budget, fronts), rel=1e-9, abs=1e-9)
    t = np.array([tables[0, k, order[k, 0]] * u[k] for k in range(n)])
    assert np.all(np.cumsum(t) <= budget + 1e-9 * (1 + np.cumsum(t)))
    on_hull = 0.0
    for k in range(n):
        hx = [tables[0, k, order[k, q]] for q in hpos[k, : n_hull[k]]]
        hy = [tables[1, k, order[k, q]] for q in hpos[k, : n_hull[k]]]
        assert hx[0] * (1 - 1e-12) <= t[k] <= hx[-1] * (1 + 1e-12)
        on_hull += np.interp(t[k], hx, hy)
    assert on_hull == pytest.approx(energy, rel=1e-9)
    assert energy <= ref.brute_force(tables[0], tables[1], budget) * (1 + 1e-9)


@given(problems(max_batches=4, max_clocks=6), st.data())
def test_solve_window_matches_brute_force(p, data):
    tables, budget = p
    n, n_clocks = tables.shape[1], tables.shape[2]
    order, n_front = _front(tables, n)
    cand = np.zeros((n, n_clocks), dtype=np.int64)
    n_cand = np.zeros(n, dtype=np.int64)
    for k in range(n):
        # any subset of positions that keeps the fastest (so a feasible plan stays possible)
        keep = [0] + [q for q in range(1, n_front[k]) if data.draw(st.booleans())]
        cand[k, : len(keep)] = keep
        n_cand[k] = len(keep)
    cols = [[int(order[k, q]) for q in cand[k, : n_cand[k]]] for k in range(n)]
    best, best_plan = ref.window(tables[0], tables[1], budget, cols, np.inf)
    cap = data.draw(st.sampled_from([1, 2, 64]))
    upper = data.draw(st.sampled_from([np.inf, best, best * 0.9]))
    wf, wi = mpc.window_workspace(n, n_clocks, cap)
    plan = np.full(n, -1, dtype=np.int64)
    energy, status = mpc.solve_window(tables, budget, n, order, cand, n_cand, plan, upper, cap, np.zeros(wf),
                                      np.zeros(wi, dtype=np.int64))
    if status == 0:
        assert energy == pytest.approx(best, rel=1e-12)
        assert mpc.plan_cost(tables, budget, n, plan) == (pytest.approx(best, rel=1e-12), True)
        assert all(plan[k] in cols[k] for k in range(n))
    elif status == 2:  # nothing at or below the bound
        assert best > upper * (1 + 1e-12) or upper == best * 0.9
        assert np.all(plan == -1)
    else:  # the cap: only a small one can be reached on these sizes
        assert status == 1 and cap < 64 and np.all(plan == -1)
    if cap == 64 and upper == np.inf:
        assert status == 0


@pytest.fixture(scope="module")
def c_api():
    from dualscale.control import _osqp_c
    from dualscale.control.qp import QpSettings

    solvers = {}

    def get(horizon):
        if horizon not in solvers:
            s, reason = _osqp_c.open_solver(horizon, QpSettings())
            assert s is not None, reason
            solvers[horizon] = s
        return solvers[horizon]
    return get


@given(problems(max_batches=5, max_clocks=8))
def test_solve_qp_is_feasible_and_near_brute_force(c_api, p):
    """The whole compiled qp plan (relaxation, OSQP through its C API, rounding, search): feasible,
    and never below the optimum; on these small instances the search makes it the optimum."""
    from dualscale._kernels import osqp_c

    tables, budget = p
    n, n_clocks = tables.shape[1], tables.shape[2]
    order = np.zeros((n, n_clocks), dtype=np.int64)
    n_front = np.zeros(n, dtype=np.int64)
    hpos, n_hull = np.zeros((n, n_clocks), dtype=np.int64), np.zeros(n, dtype=np.int64)
    n_fw, n_iw = mpc.qp_workspace(n, n_clocks)
    plan = np.empty(n, dtype=np.int64)
    stats = np.zeros(mpc.N_STATS, dtype=np.int64)
    energy = osqp_c.solve_qp(tables, budget, n, order, n_front, hpos, n_hull, plan, np.zeros(n_fw),
                             np.zeros(n_iw, dtype=np.int64), c_api(n).at, stats)
    cost, ok = mpc.plan_cost(tables, budget, n, plan)
    assert ok and cost == pytest.approx(energy, rel=1e-12)
    best = ref.brute_force(tables[0], tables[1], budget)
    assert energy >= best * (1 - 1e-12)
    assert energy == pytest.approx(best, rel=1e-9)


@given(problems(max_batches=5, max_clocks=6), st.integers(6, 8))
def test_qp_data_matches_numpy_fit(p, horizon):
    tables, budget = p
    n = tables.shape[1]
    order, n_front = _front(tables, n)
    hpos, n_hull = _hull(tables, n, order, n_front)
    full = np.zeros((2, horizon, tables.shape[2]))
    full[:, :n] = tables
    b = np.full(horizon, np.inf)
    b[:n] = budget
    qp_vec = np.empty((4, horizon))
    px = np.empty(horizon)
    ax = np.empty(horizon * (horizon + 1) // 2 + horizon)
    order_h = np.zeros((horizon, tables.shape[2]), dtype=np.int64)
    order_h[:n] = order
    hpos_h = np.zeros((horizon, tables.shape[2]), dtype=np.int64)
    hpos_h[:n] = hpos
    nh_h = np.zeros(horizon, dtype=np.int64)
    nh_h[:n] = n_hull
    mpc.qp_data(full, b, n, order_h, hpos_h, nh_h, qp_vec, px, ax)
    scale = sum(tables[1, k, order[k, 0]] for k in range(n))
    for k in range(n):
        a, lin, umax = ref.qp_fit(tables[0, k], tables[1, k], order[k, hpos[k, : n_hull[k]]], scale)
        assert px[k] / 2 == pytest.approx(a, rel=1e-6, abs=1e-9)
        assert qp_vec[0, k] == pytest.approx(lin, rel=1e-6, abs=1e-9)
        assert qp_vec[2, k] == pytest.approx(umax, rel=1e-12)
        assert qp_vec[3, k] == tables[0, k, order[k, 0]]
    assert np.all(qp_vec[2, n:] == 1.0) and np.all(qp_vec[3, n:] == 0.0) and np.all(np.isinf(qp_vec[1, n:]))
    # A in CSC order: column k carries t0_k in rows k..K-1, then the bound row's 1
    cols = np.split(ax, np.cumsum([horizon - k + 1 for k in range(horizon)])[:-1])
    for k, col in enumerate(cols):
        assert np.all(col[:-1] == qp_vec[3, k]) and col[-1] == 1.0


@given(problems(max_batches=5, max_clocks=8), st.data())
def test_round_repair_improve_matches_twin_and_is_feasible(p, data):
    tables, budget = p
    n = tables.shape[1]
    order, n_front = _front(tables, n)
    u = np.array(data.draw(st.lists(st.floats(0.5, 5.0), min_size=n, max_size=n)))
    plan = np.empty(n, dtype=np.int64)
    energy = mpc.round_repair_improve(tables, budget, n, order, n_front, u, plan, np.empty(n))
    fronts = [order[k, : n_front[k]].tolist() for k in range(n)]
    want_e, want_plan = ref.round_repair_improve(tables[0], tables[1], budget, fronts, u)
    assert mpc.plan_cost(tables, budget, n, plan)[1]
    assert plan.tolist() == want_plan
    assert energy == pytest.approx(want_e, rel=1e-12)


@given(st.integers(1, 16), st.data())
def test_shift_warm_start_matches_numpy(k, data):
    x = np.array(data.draw(st.lists(st.floats(-10, 10), min_size=k, max_size=k)))
    y = np.array(data.draw(st.lists(st.floats(-10, 10), min_size=2 * k, max_size=2 * k)))
    xs, ys = np.empty(k), np.empty(2 * k)
    mpc.shift_warm_start(x, y, xs, ys)
    shift = np.minimum(np.arange(k) + 1, k - 1)
    assert xs.tolist() == x[shift].tolist()
    assert ys.tolist() == np.concatenate([y[:k][shift], y[k:][shift]]).tolist()
