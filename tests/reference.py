"""Plain NumPy twins of the Numba kernels: slow, obvious, and written from the formulas in
dualscale/profile/schema.py rather than from the kernel code."""

from __future__ import annotations

import numpy as np

from dualscale._kernels import mpc
from dualscale._kernels import perf_model as pm


def eval_clocks(mem_s, comp_s, coef, table):
    a = mem_s * table[pm.T_MEM_SLOWDOWN]
    b = comp_s * table[pm.T_COMP_SLOWDOWN]
    idle = table[pm.T_IDLE_W]
    with np.errstate(invalid="ignore", divide="ignore"):
        time_s = np.hypot(a, b)
        # busy fractions a / time and b / time, computed on a / max, b / max so subnormal work
        # times keep their precision
        m = np.maximum(a, b)
        norm = np.hypot(a / m, b / m)
        busy_mem = (a / m) / norm  # fraction of the iteration the memory system is busy
        busy_comp = (b / m) / norm  # ... and the tensor cores
    power = idle + busy_mem * table[pm.T_MEM_POWER_W] + busy_comp * table[pm.T_COMP_POWER_W]
    power = np.minimum(coef[pm.C_POWER_CAP_W], np.maximum(idle, power))
    zero = (a <= 0) & (b <= 0)
    time_s = np.where(zero, 0.0, time_s)
    power = np.where(zero, idle, power)
    return np.stack([time_s, power])


def prefill_grid(chunk_tokens, prefix_tokens, coef, table):
    l = np.asarray(chunk_tokens, dtype=float)
    p = np.asarray(prefix_tokens, dtype=float)
    pairs = sum(li * pi + li * (li + 1) / 2 for li, pi in zip(l, p))
    mem = coef[pm.C_BASE_S] + coef[pm.C_PER_REQUEST_S] * len(l) + coef[pm.C_PER_CONTEXT_TOKEN_S] * p.sum()
    comp = coef[pm.C_PER_TOKEN_S] * (l.sum() + coef[pm.C_ATTN_TOKEN_EQUIV] * pairs)
    return eval_clocks(mem, comp, coef, table)


def decode_grid(context_tokens, coef, table):
    c = np.asarray(context_tokens, dtype=float)
    mem = coef[pm.C_BASE_S] + coef[pm.C_PER_REQUEST_S] * len(c) + coef[pm.C_PER_CONTEXT_TOKEN_S] * c.sum()
    comp = coef[pm.C_PER_TOKEN_S] * (len(c) + coef[pm.C_ATTN_TOKEN_EQUIV] * c.sum())
    return eval_clocks(mem, comp, coef, table)


# ---- prefill MPC (dualscale/_kernels/mpc.py) ---------------------------------------------------
# project()'s twin is dualscale.testing.project_queue (public, used by the guarantee checks).
TOL_S = 1e-9


def tabulate(batches, coef, table):
    """(2, K, F): time and instance energy of each batch [(chunk, prefix), ...] on every clock."""
    out = np.empty((2, len(batches), table.shape[1]))
    for k, b in enumerate(batches):
        r = prefill_grid([c for c, _ in b], [p for _, p in b], coef, table)
        out[0, k] = r[0]
        out[1, k] = coef[pm.C_TP] * r[1] * r[0]
    return out


def budgets(now_s, arrival_s, completes, ttft_slo_s, margin, times):
    """Per-batch budgets from deadlines, relaxed to the all-top completion; (budgets, n_relaxed)."""
    n = times.shape[0]
    b = np.full(n, np.inf)
    for a, k in zip(arrival_s, completes):
        if k >= 0:
            b[k] = min(b[k], a + (1 - margin) * ttft_slo_s - now_s)
    cum_top = np.cumsum(times[:, -1])
    relaxed = b + TOL_S < cum_top
    return np.where(relaxed, cum_top, b), int(relaxed.sum())


def frontier(times, energies):
    """Efficient clock columns, fastest first: sorted by time, then energy, then faster clock; kept
    while energy strictly falls."""
    cols = sorted(range(len(times)), key=lambda j: (times[j], energies[j], -j))
    front, best = [], np.inf
    for j in cols:
        if energies[j] < best:
            front.append(j)
            best = energies[j]
    return front


def plan_cost(times, energies, budget_s, plan):
    cum = np.cumsum([times[k, j] for k, j in enumerate(plan)])
    energy = sum(energies[k, j] for k, j in enumerate(plan))
    return energy, bool(np.all(cum <= budget_s[: len(plan)] + TOL_S))


def brute_force(times, energies, budget_s):
    """Least energy over every plan of every clock (small instances only)."""
    import itertools

    n, f = times.shape
    best = np.inf
    for plan in itertools.product(range(f), repeat=n):
        e, ok = plan_cost(times, energies, budget_s, plan)
        if ok and e < best:
            best = e
    return best


def greedy(times, energies, budget_s):
    """The paper's search, from its description (paper-notes.md, "Search")."""
    import itertools

    n, f = times.shape
    plan = [f - 1] * n
    best, _ = plan_cost(times, energies, budget_s, plan)
    level = f - 1
    while level > 0:
        cand = [k for k in range(n) if plan[k] == level]
        if not cand:
            break
        sub_best, sub_plan = np.inf, None
        for r in range(1, len(cand) + 1):
            for subset in itertools.combinations(cand, r):
                trial = [level - 1 if k in subset else plan[k] for k in range(n)]
                e, ok = plan_cost(times, energies, budget_s, trial)
                if ok and e < sub_best:
                    sub_best, sub_plan = e, trial
        if sub_best < best:
            best, plan = sub_best, sub_plan
            level -= 1
        else:
            break
    return best


def qp_fit(times, energies, front, scale):
    """(a, b, umax) of batch energy / scale ~ a u^2 + b u over the clocks ``front`` (the hull's
    vertices), u = t / t_fast."""
    u = times[front] / times[front[0]]
    e = energies[front] / scale
    if len(front) < 2 or u.max() - 1.0 < mpc.MIN_SPREAD:
        return 0.0, 0.0, 1.0
    if len(front) >= 3:
        a, b, _ = np.linalg.lstsq(np.vander(u, 3), e, rcond=None)[0]
        if a > 0:
            return a, b, u.max()
    if len(front) >= 2:
        b, _ = np.linalg.lstsq(np.vander(u, 2), e, rcond=None)[0]
        return 0.0, b, u.max()
    return 0.0, 0.0, 1.0


def hull(times, energies, front):
    """Positions (into ``front``) of the lower convex hull of the efficient points, fastest first:
    a point is kept when it lies strictly below the chord between its kept neighbours."""
    pts = [(times[j], energies[j]) for j in front]
    keep = []
    for q, (t, e) in enumerate(pts):
        while len(keep) >= 2:
            (ta, ea), (tb, eb) = pts[keep[-2]], pts[keep[-1]]
            chord_at_b = ea + (e - ea) * (tb - ta) / (t - ta)
            if eb >= chord_at_b:
                keep.pop()
            else:
                break
        keep.append(q)
    return keep


def relaxation(times, energies, budget_s, fronts):
    """Least energy of the continuous relaxation (each batch anywhere on the piecewise-linear hull
    of its efficient points), as a linear program over hull segments solved by scipy (HiGHS)."""
    from scipy.optimize import linprog

    n = len(fronts)
    t0 = np.array([times[k, fr[0]] for k, fr in enumerate(fronts)])
    e0 = sum(energies[k, fr[0]] for k, fr in enumerate(fronts))
    cost, bounds, owner = [], [], []
    for k, fr in enumerate(fronts):
        h = [fr[q] for q in hull(times[k], energies[k], fr)]
        for a, b in zip(h, h[1:]):
            dt = times[k, b] - times[k, a]
            cost.append(-(energies[k, a] - energies[k, b]) / dt)
            bounds.append((0.0, dt))
            owner.append(k)
    if not cost:
        return e0
    rows, rhs = [], []
    for b in range(n):
        if np.isfinite(budget_s[b]):
            rows.append([1.0 if owner[s] <= b else 0.0 for s in range(len(cost))])
            rhs.append(budget_s[b] + TOL_S - t0[: b + 1].sum())
    res = linprog(cost, A_ub=np.array(rows) if rows else None, b_ub=np.array(rhs) if rows else None,
                  bounds=bounds, method="highs")
    assert res.status == 0, res.message
    return e0 + res.fun


def window(times, energies, budget_s, cands, upper_j):
    """Least energy over plans with batch k's clock in ``cands[k]`` (clock columns), below
    ``upper_j`` (1e-12 relative slack); (energy, plan) or (inf, None)."""
    import itertools

    best, best_plan = np.inf, None
    for plan in itertools.product(*cands):
        e, ok = plan_cost(times, energies, budget_s, plan)
        if ok and e <= upper_j * (1 + 1e-12) and e < best:
            best, best_plan = e, list(plan)
    return best, best_plan


def round_repair_improve(times, energies, budget_s, fronts, u):
    """Plan from slowdowns u: round toward faster, repair broken budgets by the cheapest speed-up
    per second saved, then take the best energy-saving move (one batch one step slower, or one
    faster and another slower) until none is feasible. Returns (energy, plan)."""
    n = len(fronts)
    pos = []
    for k, fr in enumerate(fronts):
        target = times[k, fr[0]] * u[k] * (1 + 1e-12)
        p = 0
        for q in range(1, len(fr)):
            if times[k, fr[q]] <= target:
                p = q
            else:
                break
        pos.append(p)

    def plan():
        return [fronts[k][pos[k]] for k in range(n)]

    def first_broken(pl):
        cum = np.cumsum([times[k, j] for k, j in enumerate(pl)])
        bad = np.flatnonzero(cum > budget_s[:n] + TOL_S)
        return int(bad[0]) if bad.size else -1

    while (b := first_broken(plan())) >= 0:
        def rate(k):
            jf, js = fronts[k][pos[k] - 1], fronts[k][pos[k]]
            dt = times[k, js] - times[k, jf]
            return (energies[k, jf] - energies[k, js]) / dt if dt > 0 else np.inf
        movable = [k for k in range(b + 1) if pos[k] > 0]
        k = min(movable, key=lambda k: (rate(k), k))
        pos[k] -= 1
    while True:
        base_e, _ = plan_cost(times, energies, budget_s, plan())
        best_gain, best_move = 0.0, None
        for j in range(n):
            if pos[j] + 1 >= len(fronts[j]):
                continue
            for i in [None] + [i for i in range(n) if i != j and pos[i] > 0]:
                pos[j] += 1
                if i is not None:
                    pos[i] -= 1
                e, ok = plan_cost(times, energies, budget_s, plan())
                gain = base_e - e
                if ok and gain > best_gain:
                    best_gain, best_move = gain, (j, i)
                pos[j] -= 1
                if i is not None:
                    pos[i] += 1
        if best_move is None:
            break
        j, i = best_move
        pos[j] += 1
        if i is not None:
            pos[i] -= 1
    return plan_cost(times, energies, budget_s, plan())[0], plan()


# ---- decode slack (dualscale/_kernels/slack.py) ------------------------------------------------
def decode_choose(now_s, first_token_s, tokens_out, context_tokens, slo_s, margin, request_slack, coef, table,
                  by_power=False):
    """(clock column or -1, budget_s): least-energy (or least-power) clock whose step fits, lowest on ties."""
    target = (1 - margin) * slo_s
    budget = float(np.min(target * tokens_out - (now_s - first_token_s))) if request_slack else target
    t, w = decode_grid(context_tokens, coef, table)
    energy = np.where(t <= budget + TOL_S, w if by_power else w * t, np.inf)
    if not np.isfinite(energy).any():
        return -1, budget
    return int(np.argmin(energy)), budget


# ---- decode macro-steps (dualscale/_kernels/stepping.py) ----------------------------------------
def decode_steps(profile, tp, control, idle_mhz, requests, truth, delay_s, kv_capacity, max_batch):
    """Twin of ``DecodeStepper``: one decode instance, every request waiting at t = 0, run step by
    step to the last finish with the public controller (``decide``/``observe`` per step) and the
    truth as ``dualscale.sim.truth.GroundTruth`` states it in NumPy (``apply``, ``switch_delay_s``).
    ``requests``: list of (first token s, prompt tokens, output tokens, KV need). Returns (finish
    times and tokens out by request, busy J, idle J, [(t0, t1, MHz, W, busy)])."""
    clocks = profile.clocks_mhz
    f0, step = int(clocks[0]), int(profile.config.gpu.clock_step_mhz)
    coef, table = profile.coefficients("decode", tp), profile.clock_table("decode", tp)
    state = {"j": (idle_mhz - f0) // step, "pending": -1, "at": 0.0, "acct": 0.0, "busy_j": 0.0, "idle_j": 0.0,
             "eff": np.arange(clocks.size)}
    segs = []

    def segment(t0, t1, j, w, busy):
        if t1 > t0:
            state["busy_j" if busy else "idle_j"] += tp * float(w) * (t1 - t0)
            segs.append((t0, t1, int(clocks[state["eff"][j]]), float(w), busy))

    def ask(f, now):
        j = (int(f) - f0) // step
        if j == (state["pending"] if state["pending"] >= 0 else state["j"]):
            return
        if j == state["j"]:
            state["pending"] = -1
        elif delay_s == 0.0:
            state["j"], state["pending"] = j, -1
        else:
            state["pending"], state["at"] = j, now + truth.switch_delay_s(delay_s)

    def run_truth(ctx):
        g = decode_grid(ctx, coef, table)
        eff = truth.apply(g)
        state["eff"] = np.arange(clocks.size) if eff is None else eff
        return g[0], g[1]

    waiting = list(range(len(requests)))
    run = []  # [request, tokens out, context]
    finish = {}
    reserved = 0
    t = 0.0
    fixed = isinstance(control, int)
    while True:
        while waiting and len(run) < max_batch and reserved + requests[waiting[0]][3] <= kv_capacity:
            r = waiting.pop(0)
            run.append([r, 1, requests[r][1] + 1])
            reserved += requests[r][3]
        if not run:
            break
        ctx = np.array([c for _, _, c in run], dtype=np.int64)
        kv = min(1.0, float(ctx.sum()) / kv_capacity)
        first = np.array([requests[r][0] for r, _, _ in run])
        f = control if fixed else control.decide(t, first, np.array([o for _, o, _ in run]), ctx, kv).freq_mhz
        ask(f, t)
        times, power = run_truth(ctx)
        j, t0 = state["j"], t
        if state["pending"] < 0 or state["at"] >= t0 + times[j]:
            t = t0 + times[j]
            segment(t0, t, j, power[j], True)
            seen = (t - t0, int(clocks[state["eff"][j]]), float(power[j]))
        else:
            s1 = max(0.0, state["at"] - t0)
            jn = state["pending"]
            t = t0 + s1 + (1.0 - s1 / times[j]) * times[jn]
            segment(t0, t0 + s1, j, power[j], True)
            segment(t0 + s1, t, jn, power[jn], True)
            state["j"], state["pending"] = jn, -1
            seen = (t - t0, 0, 0.0)
        if not fixed:
            control.observe(*seen)
        keep = []
        for r, o, c in run:
            if o + 1 >= requests[r][2]:
                finish[r] = (t, o + 1)
                reserved -= requests[r][3]
            else:
                keep.append([r, o + 1, c + 1])
        run = keep
    return finish, state["busy_j"], state["idle_j"], segs
