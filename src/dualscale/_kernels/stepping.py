"""Closed-loop decode steps of one simulated decode instance, many per call.

A simulator spends most of its events on decode steps: decide a clock, run the step on the
simulated GPUs (the plant), account its energy, feed the measurement back to the controller, emit
one token per request, retire finished requests, admit waiting ones. :func:`advance` does all of
that for as many consecutive steps as end before ``horizon_s`` (the next event that could touch
this instance), so the caller's event loop sees one event per macro-step instead of one per step.
It is the exact sequence of one step after another, in the same floating-point order as the
per-step code it replaced (``tests/reference.py`` keeps that code as its twin).

Array layouts (every index constant below; all arrays contiguous):

``si`` int64 (N_SI,) and ``sf`` float64 (N_SF,): the instance's state (``S_*``, ``F_*``).
``batch`` int64 (N_B, cap): the running requests, one column each (``B_*``); ``first_s`` float64
(cap,): their first-token times. Columns ``[0, si[S_N])`` are live, in admission order.
``wait`` int64 (capw,): requests that reached the instance and wait to join, FIFO in
``[si[S_W_HEAD], si[S_W_TAIL])``.
``req_i`` int64 (N_R, requests) and ``req_f`` float64 (N_Q, requests): per request of the run
(``R_*``, ``Q_*``); the kernel reads lengths and writes admission and finish records.
``pv`` float64: the plant's model coefficients (``pm`` layout, first ``pm.N_COEF``) then its
parameters (``P_*``, offset ``pm.N_COEF``). ``p_rows`` float64 (N_PROWS, F): the model's clock
table (``pm`` rows), the idle power per clock, then the step's time and power on every clock (the
plant's, written here). ``p_int`` int64 (2, F): the supported clocks (MHz) and, per clock asked,
the column of the clock that runs (a power cap runs lower).
``cv`` float64: the controller: its parameters and online-correction state (``C_*``), then the
slack kernel's parameters (``sk`` layout, offset ``CV_PARAMS``), its corrected coefficients
(``CV_COEF``) and the model's (``CV_MODEL_COEF``). ``c_rows`` float64 (8, Fc): the controller's
clock table (``pm`` rows), its last grid (time, power: rows ``CR_OUT_*``) and its clocks (MHz,
row ``CR_CLOCKS``).
``tl_f`` float64 (3, capt) and ``tl_i`` int64 (3, capt): timeline segments (``TL_*``), count in
``si[S_TL_N]``; the kernel returns ``TIMELINE_FULL`` before it could overflow.
``rng``: the run's ``numpy.random.Generator`` when the plant draws noise or switch jitter, else
None (a Generator argument costs ~10 us per call to dispatch).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from dualscale._kernels import CACHE, FASTMATH, mpc
from dualscale._kernels import perf_model as pm
from dualscale._kernels import slack as sk

# ---- si: integer state ----
S_J = 0  # clock column in effect
S_PENDING_J = 1  # column of a switch under way, -1 if none
S_ITER_J = 2  # column the last step ran at throughout, -1 if it changed midway
S_N = 3  # running requests
S_RESERVED = 4  # KV tokens reserved by running requests
S_ROUTED = 5  # reserved + on the way (the router's load)
S_QUEUE = 6  # running requests when the current segment began
S_W_HEAD = 7
S_W_TAIL = 8
S_TL_N = 9  # timeline segments written
S_BUSY = 10  # 1 while a step runs
S_STEPS = 11  # steps completed (events of the per-step engine)
S_RESUME = 12  # after TIMELINE_FULL: the entry to call again with
S_LOAD = 13  # prefill: prompt tokens queued, not yet prefilled (the router's load)
S_ROUTE_N = 14  # prefill: requests in ``routed`` whose prompt completed and go on to decode
S_ONLY = 15  # prefill: 1 when prefill runs alone (requests finish with their first token)
N_SI = 16

# ---- sf: float state ----
F_T_ACCT = 0  # energy is accounted up to here (s)
F_STEP_STARTED = 1  # start of the running step (s)
F_PENDING_AT = 2  # when the switch under way lands (s)
F_ENERGY_BUSY = 3  # J, all GPUs
F_ENERGY_IDLE = 4
F_KV_UTIL = 5  # KV use the last decision saw (for an external controller)
N_SF = 6

# ---- batch rows ----
B_RID = 0
B_CTX = 1
B_OUT_DONE = 2
B_OUT_TARGET = 3
B_NEED = 4
N_B = 5

# ---- per request ----
R_PROMPT = 0
R_OUTPUT = 1
R_NEED = 2  # KV tokens reserved while it runs (prompt + output, whole blocks)
R_TOKENS_OUT = 3  # written at finish
R_KV_BLOCKED = 4  # 1 if it was held back because the KV cache was full
R_PREFILLED = 5  # prompt tokens prefilled so far
R_REJECTED = 6  # 1 if no decode instance can ever hold it
N_R = 7
Q_FIRST_TOKEN = 0
Q_READY = 1  # reached its decode instance
Q_ADMIT_WAIT = 2  # written at admission
Q_FINISH = 3  # written at finish
Q_ARRIVAL = 4
N_Q = 5

# ---- plant parameters (pv[pm.N_COEF + P_*]) ----
P_TIME_FACTOR = 0
P_POWER_FACTOR = 1
P_SHAPE = 2  # clock-shape error: slowdown below the top clock scaled by 1 + shape
P_SIGMA = 3  # lognormal noise of the step time (sigma of log)
P_CAP_W = 4  # per-GPU power cap, 0 = none
P_JITTER = 5  # each rank's switch delay in delay x (1 +/- jitter)
P_DELAY_S = 6  # clock switch delay
P_TP = 7
P_KV_CAPACITY = 8
P_MAX_BATCH = 9
P_IDLE_MHZ = 10  # clock asked for when the batch empties
P_MAX_BATCH_TOKENS = 11  # prefill chunking budget
N_P = 12
N_PV = pm.N_COEF + N_P

# ---- p_rows ----
PR_IDLE_W = pm.N_TABLE_ROWS
PR_TIME_S = PR_IDLE_W + 1
PR_POWER_W = PR_IDLE_W + 2
N_PROWS = PR_IDLE_W + 3
PI_CLOCKS = 0
PI_EFF = 1

# ---- controller (cv) ----
C_MODE = 0  # MODE_*
C_FIXED_MHZ = 1  # MODE_FIXED: the clock; MODE_EXTERNAL: the clock decided by the caller
C_KV_GUARD = 2
C_ONLINE = 3  # 1: learn from each step
C_MU = 4  # online correction (dualscale.control.correction.Correction), same names
C_VAR = 5
C_TIME_FACTOR = 6
C_POWER_FACTOR = 7
C_OBSERVATIONS = 8
C_POWER_OBSERVATIONS = 9
C_TRIGGERS = 10
C_HOLD_LEFT = 11
C_LAST_ERROR = 12
C_LAST_MODEL_ERROR = 13
C_Z = 14
C_DECIDED_FACTOR = 15  # time factor the last decision was made with, 0: nothing to learn from
C_ALPHA = 16  # correction constants
C_TRIGGER_Z = 17
C_LOG_TOL = 18
C_HOLD = 19
C_LOG_LIMIT = 20
N_C = 21
CV_PARAMS = N_C
CV_COEF = CV_PARAMS + sk.N_PARAMS
CV_MODEL_COEF = CV_COEF + pm.N_COEF
N_CV = CV_MODEL_COEF + pm.N_COEF
CR_OUT_TIME_S = pm.N_TABLE_ROWS
CR_OUT_POWER_W = pm.N_TABLE_ROWS + 1
CR_CLOCKS = pm.N_TABLE_ROWS + 2
N_CROWS = pm.N_TABLE_ROWS + 3

MODE_FIXED = 0  # one clock, nothing learnt
MODE_SLACK = 1  # the decode slack controller with its online correction
MODE_EXTERNAL = 2  # the caller decides and observes: one step per call

# ---- timeline ----
TL_T0 = 0
TL_T1 = 1
TL_POWER = 2
TL_FREQ = 0
TL_QUEUE = 1
TL_BUSY = 2

# ---- entries and results ----
AT_BOUNDARY = 0  # the running step ended at t_s: learn, emit tokens, retire, admit, decide
AT_START = 1  # the instance is idle at t_s: admit, decide
RUN_DECIDED = 2  # MODE_EXTERNAL: run the step the caller decided (cv[C_FIXED_MHZ]) from t_s
IDLE_TO = 3  # account idle power up to t_s only

RUNNING = 0  # a step runs until the returned time: call again at AT_BOUNDARY then
IDLE = 1  # nothing to run: the instance asked for its idle clock at the returned time
NEED_DECISION = 2  # MODE_EXTERNAL: decide for the batch as it stands (sf[F_KV_UTIL]), then RUN_DECIDED
TIMELINE_FULL = 3  # grow the timeline and call again at the returned time with entry si[S_RESUME]
SEGMENTS_PER_STEP = 4  # at most: an idle split at a switch, a step split at a switch


@njit(cache=CACHE, fastmath=FASTMATH)
def _segment(t0, t1, j, power_w, busy, si, sf, pv, p_int, tl_f, tl_i):
    if t1 <= t0:
        return
    e = pv[pm.N_COEF + P_TP] * power_w * (t1 - t0)
    if busy:
        sf[F_ENERGY_BUSY] += e
    else:
        sf[F_ENERGY_IDLE] += e
    k = si[S_TL_N]
    tl_f[TL_T0, k] = t0
    tl_f[TL_T1, k] = t1
    tl_f[TL_POWER, k] = power_w
    tl_i[TL_FREQ, k] = p_int[PI_CLOCKS, p_int[PI_EFF, j]]
    tl_i[TL_QUEUE, k] = si[S_QUEUE]
    tl_i[TL_BUSY, k] = 1 if busy else 0
    si[S_TL_N] = k + 1


@njit(cache=CACHE, fastmath=FASTMATH)
def idle_until(t_s, si, sf, pv, p_rows, p_int, tl_f, tl_i):
    """Account idle power from the last accounted time to ``t_s``, splitting at a switch that lands."""
    t0 = sf[F_T_ACCT]
    if t_s <= t0:
        return
    if si[S_PENDING_J] >= 0 and sf[F_PENDING_AT] < t_s:
        mid = max(t0, sf[F_PENDING_AT])
        j = si[S_J]
        _segment(t0, mid, j, p_rows[PR_IDLE_W, j], False, si, sf, pv, p_int, tl_f, tl_i)
        si[S_J] = si[S_PENDING_J]
        si[S_PENDING_J] = -1
        t0 = mid
    j = si[S_J]
    _segment(t0, t_s, j, p_rows[PR_IDLE_W, j], False, si, sf, pv, p_int, tl_f, tl_i)
    sf[F_T_ACCT] = t_s


@njit(cache=CACHE, fastmath=FASTMATH)
def _switch_delay_s(pv, rng):
    delay = pv[pm.N_COEF + P_DELAY_S]
    jitter = pv[pm.N_COEF + P_JITTER]
    if rng is None or jitter == 0.0 or delay == 0.0:
        return delay
    u = rng.uniform(-1.0, 1.0, int(pv[pm.N_COEF + P_TP]))
    worst = -np.inf
    for i in range(u.shape[0]):
        x = 1.0 + jitter * u[i]
        worst = max(worst, x)
    return delay * worst


@njit(cache=CACHE, fastmath=FASTMATH)
def request_clock(freq_mhz, now_s, si, sf, pv, p_int, rng):
    """Ask for ``freq_mhz``: it lands after the switch delay; asking again for the clock in effect
    cancels a switch under way, and a new request supersedes one in flight."""
    clocks = p_int[PI_CLOCKS]
    j = (freq_mhz - clocks[0]) // (clocks[1] - clocks[0]) if clocks.shape[0] > 1 else 0
    target = si[S_PENDING_J] if si[S_PENDING_J] >= 0 else si[S_J]
    if j == target:
        return
    if j == si[S_J]:
        si[S_PENDING_J] = -1
    elif pv[pm.N_COEF + P_DELAY_S] == 0.0:
        si[S_J] = j
        si[S_PENDING_J] = -1
    else:
        si[S_PENDING_J] = j
        sf[F_PENDING_AT] = now_s + _switch_delay_s(pv, rng)


@njit(cache=CACHE, fastmath=FASTMATH)
def _plant_col(k, mem, comp, top_s, f, pv, p_rows):
    """Column ``k`` of the plant's grid: the model's time and power there, made the truth's."""
    t, p = pm.eval_clock(mem, comp, pv[:pm.N_COEF], p_rows, k)
    shape = pv[pm.N_COEF + P_SHAPE]
    if shape != 0.0:
        t = top_s + (1.0 + shape) * (t - top_s)
    p_rows[PR_TIME_S, k] = t * f
    p_rows[PR_POWER_W, k] = p * pv[pm.N_COEF + P_POWER_FACTOR]


@njit(cache=CACHE, fastmath=FASTMATH)
def _plant_step(mem, comp, si, pv, p_rows, p_int, rng):
    """The iteration about to run (work ``mem``, ``comp`` at the reference clock) as the plant runs
    it (rows PR_TIME_S, PR_POWER_W of p_rows): the columns of the clock in effect and of a switch
    under way only, unless a power cap binds (then every clock, to find the ones that fit).
    Columns are independent, so this equals evaluating the whole grid."""
    coef = pv[:pm.N_COEF]
    base = pm.N_COEF
    f_n = p_rows.shape[1]
    top = f_n - 1
    top_s = pm.eval_clock(mem, comp, coef, p_rows, top)[0] if pv[base + P_SHAPE] != 0.0 else 0.0
    f = pv[base + P_TIME_FACTOR]
    sigma = pv[base + P_SIGMA]
    if rng is not None and sigma > 0.0:
        f *= math.exp(sigma * rng.standard_normal() - 0.5 * sigma * sigma)
    eff = p_int[PI_EFF]
    cap = pv[base + P_CAP_W]
    if cap > 0.0:
        _plant_col(top, mem, comp, top_s, f, pv, p_rows)
    if cap <= 0.0 or p_rows[PR_POWER_W, top] <= cap:
        if eff[top] != top:  # a capped step ran before: every clock runs as asked again
            for k in range(f_n):
                eff[k] = k
        _plant_col(si[S_J], mem, comp, top_s, f, pv, p_rows)
        if si[S_PENDING_J] >= 0:
            _plant_col(si[S_PENDING_J], mem, comp, top_s, f, pv, p_rows)
        return
    # a capped GPU runs at the highest clock whose power fits (the lowest clock if none does)
    t = p_rows[PR_TIME_S]
    p = p_rows[PR_POWER_W]
    for k in range(f_n):
        _plant_col(k, mem, comp, top_s, f, pv, p_rows)
    best = -1
    for k in range(f_n):
        if p[k] <= cap:
            best = k
        eff[k] = max(best, 0)
    for k in range(f_n):
        t[k] = t[eff[k]]
        p[k] = min(p[eff[k]], cap)


@njit(cache=CACHE, fastmath=FASTMATH)
def _run(t0, si, sf, pv, p_rows, p_int, tl_f, tl_i):
    """Run the step whose plant grid is in p_rows from ``t0``; returns its end (s)."""
    j = si[S_J]
    t_old = p_rows[PR_TIME_S, j]
    sf[F_STEP_STARTED] = t0
    if si[S_PENDING_J] < 0 or sf[F_PENDING_AT] >= t0 + t_old:
        t1 = t0 + t_old
        _segment(t0, t1, j, p_rows[PR_POWER_W, j], True, si, sf, pv, p_int, tl_f, tl_i)
        si[S_ITER_J] = j
    else:
        si[S_ITER_J] = -1
        s1 = max(0.0, sf[F_PENDING_AT] - t0)
        jn = si[S_PENDING_J]
        mid = t0 + s1
        t1 = mid + (1.0 - s1 / t_old) * p_rows[PR_TIME_S, jn]
        _segment(t0, mid, j, p_rows[PR_POWER_W, j], True, si, sf, pv, p_int, tl_f, tl_i)
        _segment(mid, t1, jn, p_rows[PR_POWER_W, jn], True, si, sf, pv, p_int, tl_f, tl_i)
        si[S_J] = jn
        si[S_PENDING_J] = -1
    sf[F_T_ACCT] = t1
    return t1


@njit(cache=CACHE, fastmath=FASTMATH)
def correction_observe(cv, measured_s, model_s, measured_w, model_w):
    """One observation of the online correction (``Correction.observe``); True when the time factor changed."""
    if not (measured_s > 0.0 and model_s > 0.0 and math.isfinite(measured_s) and math.isfinite(model_s)):
        return False
    x = math.log(measured_s / model_s)
    log_limit = cv[C_LOG_LIMIT]
    if abs(x) > log_limit:
        return False
    corrected_s = model_s * cv[C_TIME_FACTOR]
    cv[C_LAST_ERROR] = measured_s / corrected_s - 1.0
    cv[C_LAST_MODEL_ERROR] = measured_s / model_s - 1.0
    spread = cv[C_TRIGGER_Z] * math.sqrt(cv[C_VAR]) if cv[C_OBSERVATIONS] != 0.0 else 0.0
    if x > cv[C_MU] + spread + cv[C_LOG_TOL]:
        cv[C_TRIGGERS] += 1.0
        cv[C_HOLD_LEFT] = cv[C_HOLD]
    alpha = cv[C_ALPHA]
    if cv[C_OBSERVATIONS] == 0.0:
        cv[C_MU] = x
    else:
        d = x - cv[C_MU]
        cv[C_MU] += alpha * d
        cv[C_VAR] = (1.0 - alpha) * (cv[C_VAR] + alpha * d * d)
    cv[C_OBSERVATIONS] += 1.0
    if measured_w > 0.0 and model_w > 0.0 and math.isfinite(measured_w) and math.isfinite(model_w):
        r = measured_w / model_w
        if cv[C_POWER_OBSERVATIONS] == 0.0:
            cv[C_POWER_FACTOR] = r
        else:
            cv[C_POWER_FACTOR] = cv[C_POWER_FACTOR] + alpha * (r - cv[C_POWER_FACTOR])
        cv[C_POWER_OBSERVATIONS] += 1.0
    old = cv[C_TIME_FACTOR]
    cv[C_TIME_FACTOR] = math.exp(min(log_limit, max(-log_limit, cv[C_MU] + cv[C_Z] * math.sqrt(cv[C_VAR]))))
    return cv[C_TIME_FACTOR] != old


@njit(cache=CACHE, fastmath=FASTMATH)
def _column_value(c_rows, row, freq_mhz):
    """``c_rows[row]`` at ``freq_mhz``: its column when it is one of the controller's clocks, else
    interpolated (held flat outside)."""
    clocks = c_rows[CR_CLOCKS]
    for k in range(clocks.shape[0]):
        if clocks[k] == freq_mhz:
            return c_rows[row, k]
    return np.interp(freq_mhz, clocks, c_rows[row])


@njit(cache=CACHE, fastmath=FASTMATH)
def _observe(iteration_s, freq_mhz, power_w, cv, c_rows):
    """The slack controller's feedback (``Learner.observe``) on the step that just ran."""
    factor = cv[C_DECIDED_FACTOR]
    cv[C_DECIDED_FACTOR] = 0.0
    if cv[C_ONLINE] == 0.0 or factor == 0.0 or not freq_mhz > 0:
        return
    model_s = _column_value(c_rows, CR_OUT_TIME_S, freq_mhz) / factor
    model_w = _column_value(c_rows, CR_OUT_POWER_W, freq_mhz) if power_w > 0 else 0.0
    if correction_observe(cv, iteration_s, model_s, power_w, model_w):
        f = cv[C_TIME_FACTOR]
        for i in range(pm.C_PER_TOKEN_S + 1):  # the time terms, as Correction.apply
            cv[CV_COEF + i] = cv[CV_MODEL_COEF + i] * f


@njit(cache=CACHE, fastmath=FASTMATH)
def decide_trusted(now_s, first_s, tokens_out, ctx, kv_util, cv, c_rows):
    """The slack controller's clock (MHz) for the batch, inputs trusted (``DecodeController.decide``
    without its checks and its record)."""
    cv[CV_PARAMS + sk.D_NOW_S] = now_s
    j, _ = sk.choose(first_s, tokens_out, ctx, cv[CV_PARAMS:CV_COEF], cv[CV_COEF:CV_MODEL_COEF],
                     c_rows[:pm.N_TABLE_ROWS], c_rows[CR_OUT_TIME_S:CR_OUT_POWER_W + 1])
    hold = cv[C_HOLD_LEFT] > 0.0
    if hold:
        cv[C_HOLD_LEFT] -= 1.0
    if hold or j < 0 or kv_util >= cv[C_KV_GUARD]:
        j = c_rows.shape[1] - 1
    cv[C_DECIDED_FACTOR] = cv[C_TIME_FACTOR]
    return int(c_rows[CR_CLOCKS, j])


@njit(cache=CACHE, fastmath=FASTMATH)
def _finish_step(t_s, si, batch, first_s, req_i, req_f):
    """Every running request emits a token; the finished leave (columns kept in order)."""
    n = si[S_N]
    m = 0
    released = 0
    for i in range(n):
        out_done = batch[B_OUT_DONE, i] + 1
        ctx = batch[B_CTX, i] + 1
        if out_done >= batch[B_OUT_TARGET, i]:
            r = batch[B_RID, i]
            req_f[Q_FINISH, r] = t_s
            req_i[R_TOKENS_OUT, r] = out_done
            released += batch[B_NEED, i]
            continue
        if m != i:
            for row in range(N_B):
                batch[row, m] = batch[row, i]
            first_s[m] = first_s[i]
        batch[B_OUT_DONE, m] = out_done
        batch[B_CTX, m] = ctx
        m += 1
    si[S_N] = m
    si[S_RESERVED] -= released
    si[S_ROUTED] -= released


@njit(cache=CACHE, fastmath=FASTMATH)
def _admit(t_s, si, pv, batch, first_s, wait, req_i, req_f):
    """Waiting requests join, FCFS, while the batch has room and their KV fits."""
    max_batch = pv[pm.N_COEF + P_MAX_BATCH]
    kv_cap = pv[pm.N_COEF + P_KV_CAPACITY]
    while si[S_W_HEAD] < si[S_W_TAIL] and si[S_N] < max_batch:
        r = wait[si[S_W_HEAD]]
        need = req_i[R_NEED, r]
        if si[S_RESERVED] + need > kv_cap:
            req_i[R_KV_BLOCKED, r] = 1
            break
        si[S_W_HEAD] += 1
        i = si[S_N]
        batch[B_RID, i] = r
        batch[B_CTX, i] = req_i[R_PROMPT, r] + 1
        batch[B_OUT_DONE, i] = 1
        batch[B_OUT_TARGET, i] = req_i[R_OUTPUT, r]
        batch[B_NEED, i] = need
        first_s[i] = req_f[Q_FIRST_TOKEN, r]
        si[S_N] = i + 1
        si[S_RESERVED] += need
        req_f[Q_ADMIT_WAIT, r] = t_s - req_f[Q_READY, r]


@njit(cache=CACHE, fastmath=FASTMATH)
def _timeline_full(entry, si, tl_f):
    """True (and ``entry`` kept to resume with) when one more iteration might not fit the timeline."""
    if si[S_TL_N] + SEGMENTS_PER_STEP > tl_f.shape[1]:
        si[S_RESUME] = entry
        return True
    return False


@njit(cache=CACHE, fastmath=FASTMATH)
def _count_boundary(si):
    """An iteration ended: one more event of the per-iteration engine; nothing runs now."""
    si[S_STEPS] += 1
    si[S_BUSY] = 0


@njit(cache=CACHE, fastmath=FASTMATH)
def advance(t_s, horizon_s, entry, si, sf, batch, first_s, wait, req_i, req_f, pv, p_rows, p_int, cv, c_rows,
            tl_f, tl_i, rng):
    """Run the instance's steps from ``t_s`` (see ``entry``) while they end before ``horizon_s``.

    Returns (code, time s): RUNNING with the end of the step in flight (at or after the horizon,
    or after one step under MODE_EXTERNAL), IDLE with the time the batch emptied, NEED_DECISION
    or TIMELINE_FULL with the time to resume at.
    """
    if entry == IDLE_TO:
        idle_until(t_s, si, sf, pv, p_rows, p_int, tl_f, tl_i)
        return IDLE, t_s
    mode = int(cv[C_MODE])
    while True:
        if _timeline_full(entry, si, tl_f):
            return TIMELINE_FULL, t_s
        if entry == AT_BOUNDARY:
            _count_boundary(si)
            if mode == MODE_SLACK:
                j = si[S_ITER_J]
                if j < 0:
                    _observe(t_s - sf[F_STEP_STARTED], 0, 0.0, cv, c_rows)
                else:
                    _observe(t_s - sf[F_STEP_STARTED], p_int[PI_CLOCKS, p_int[PI_EFF, j]],
                             p_rows[PR_POWER_W, j], cv, c_rows)
            _finish_step(t_s, si, batch, first_s, req_i, req_f)
            entry = AT_START
        n = si[S_N]
        if entry == AT_START:
            _admit(t_s, si, pv, batch, first_s, wait, req_i, req_f)
            n = si[S_N]
            if n == 0:
                si[S_BUSY] = 0
                si[S_QUEUE] = 0
                idle_until(t_s, si, sf, pv, p_rows, p_int, tl_f, tl_i)
                request_clock(int(pv[pm.N_COEF + P_IDLE_MHZ]), t_s, si, sf, pv, p_int, rng)
                return IDLE, t_s
            idle_until(t_s, si, sf, pv, p_rows, p_int, tl_f, tl_i)
            si[S_QUEUE] = n
            ctx = batch[B_CTX, :n]
            total = 0
            for i in range(n):
                total += ctx[i]
            kv_util = min(1.0, float(total) / pv[pm.N_COEF + P_KV_CAPACITY])
            sf[F_KV_UTIL] = kv_util
            if mode == MODE_EXTERNAL:
                return NEED_DECISION, t_s
            if mode == MODE_SLACK:
                f = decide_trusted(t_s, first_s[:n], batch[B_OUT_DONE, :n], ctx, kv_util, cv, c_rows)
            else:
                f = int(cv[C_FIXED_MHZ])
        else:  # RUN_DECIDED
            f = int(cv[C_FIXED_MHZ])
        request_clock(f, t_s, si, sf, pv, p_int, rng)
        mem, comp = pm.decode_work_s(batch[B_CTX, :n], pv[:pm.N_COEF])
        _plant_step(mem, comp, si, pv, p_rows, p_int, rng)
        si[S_BUSY] = 1
        t1 = _run(t_s, si, sf, pv, p_rows, p_int, tl_f, tl_i)
        if t1 >= horizon_s or mode == MODE_EXTERNAL:
            return RUNNING, t1
        t_s = t1
        entry = AT_BOUNDARY


# ---- prefill instances ----
# ``queue`` int64 (3, capq): requests waiting for prefill, FCFS in [si[S_W_HEAD], si[S_W_TAIL]),
# rows QU_RID, then QU_PROMPT and QU_DONE (prompt tokens, tokens prefilled: the two rows
# mpc.project reads, as Q_PROMPT and Q_DONE). ``work`` int64 (3, capq + 1): the projection's
# chunk tokens and prefixes and per-request batch; ``small`` int64 (3,): its bounds (2) and batch
# tokens (1). The running batch is one chunk for each of the first si[S_N] queued requests.
# ``routed`` int64 (capq,): requests whose prompt completed at the last boundary, for decode.
QU_RID = 0
QU_PROMPT = 1
QU_DONE = 2
N_QU = 3
assert (QU_PROMPT - 1, QU_DONE - 1) == (mpc.Q_PROMPT, mpc.Q_DONE)


@njit(cache=CACHE, fastmath=FASTMATH)
def _prefill_done(t_s, si, queue, work, req_i, req_f, routed):
    """The running batch's chunks are in the KV cache: requests whose prompt completed emit their
    first token, and finish (prefill alone, or one output token) or go on to decode."""
    nr = 0
    head = si[S_W_HEAD]
    for c in range(si[S_N]):
        k = head + c
        r = queue[QU_RID, k]
        take = work[0, c]
        done = queue[QU_DONE, k] + take
        queue[QU_DONE, k] = done
        req_i[R_PREFILLED, r] = done
        si[S_LOAD] -= take
        if done == queue[QU_PROMPT, k]:
            si[S_W_HEAD] += 1
            req_f[Q_FIRST_TOKEN, r] = t_s
            if req_i[R_OUTPUT, r] <= 1 or si[S_ONLY] != 0:
                req_f[Q_FINISH, r] = t_s
                req_i[R_TOKENS_OUT, r] = 1
            elif req_i[R_REJECTED, r] == 0:  # a rejected one can never fit a decode instance
                routed[nr] = r
                nr += 1
    si[S_N] = 0
    si[S_ROUTE_N] = nr


@njit(cache=CACHE, fastmath=FASTMATH)
def advance_prefill(t_s, horizon_s, entry, si, sf, queue, work, small, routed, req_i, req_f, pv, p_rows, p_int, cv,
                    tl_f, tl_i, rng):
    """Run a prefill instance's batches from ``t_s`` (see ``entry``) while they end before
    ``horizon_s``; stops after a boundary that sent requests on to decode (``si[S_ROUTE_N]`` of
    them in ``routed``: the caller routes them at that time) and before one that would. Returns
    (code, time s) as :func:`advance`."""
    if entry == IDLE_TO:
        idle_until(t_s, si, sf, pv, p_rows, p_int, tl_f, tl_i)
        return IDLE, t_s
    mode = int(cv[C_MODE])
    si[S_ROUTE_N] = 0
    while True:
        if _timeline_full(entry, si, tl_f):
            return TIMELINE_FULL, t_s
        if entry == AT_BOUNDARY:
            _count_boundary(si)
            _prefill_done(t_s, si, queue, work, req_i, req_f, routed)
            if si[S_W_HEAD] == si[S_W_TAIL]:
                si[S_QUEUE] = 0
                request_clock(int(pv[pm.N_COEF + P_IDLE_MHZ]), t_s, si, sf, pv, p_int, rng)
                return IDLE, t_s
            entry = AT_START
        head = si[S_W_HEAD]
        tail = si[S_W_TAIL]
        if entry == AT_START:
            idle_until(t_s, si, sf, pv, p_rows, p_int, tl_f, tl_i)
            si[S_QUEUE] = tail - head
            if mode == MODE_EXTERNAL:
                return NEED_DECISION, t_s
        f = int(cv[C_FIXED_MHZ])
        request_clock(f, t_s, si, sf, pv, p_int, rng)
        # the next batch by the very rule the prefill controller projects (one chunk per request)
        mpc.project(queue[QU_PROMPT:, head:tail], int(pv[pm.N_COEF + P_MAX_BATCH_TOKENS]), 1, work[0], work[1],
                    small[:2], work[2], small[2:])
        n = small[1]
        si[S_N] = n
        mem, comp = pm.prefill_work_s(work[0, :n], work[1, :n], pv[:pm.N_COEF])
        _plant_step(mem, comp, si, pv, p_rows, p_int, rng)
        si[S_BUSY] = 1
        t1 = _run(t_s, si, sf, pv, p_rows, p_int, tl_f, tl_i)
        if t1 >= horizon_s or mode == MODE_EXTERNAL or si[S_ROUTE_N] > 0:
            return RUNNING, t1
        # a boundary that sends a request on to decode is the caller's to run, at its time
        for c in range(n):
            r = queue[QU_RID, head + c]
            if (queue[QU_DONE, head + c] + work[0, c] == queue[QU_PROMPT, head + c] and req_i[R_OUTPUT, r] > 1
                    and si[S_ONLY] == 0 and req_i[R_REJECTED, r] == 0):
                return RUNNING, t1
        t_s = t1
        entry = AT_BOUNDARY


def warm_up() -> None:
    """Compile (or load from cache) :func:`advance` and :func:`advance_prefill` for a plant that
    draws nothing (the variant taking a Generator compiles on first use: only noisy truths need it)."""
    f_n = 3
    si = np.zeros(N_SI, dtype=np.int64)
    si[S_PENDING_J] = -1
    sf = np.zeros(N_SF)
    batch = np.zeros((N_B, 2), dtype=np.int64)
    req_i = np.ones((N_R, 1), dtype=np.int64)
    req_f = np.zeros((N_Q, 1))
    pv = np.zeros(N_PV)
    pv[pm.N_COEF + P_TIME_FACTOR] = pv[pm.N_COEF + P_POWER_FACTOR] = 1.0
    pv[pm.N_COEF + P_KV_CAPACITY] = pv[pm.N_COEF + P_MAX_BATCH] = 1e6
    p_rows = np.ones((N_PROWS, f_n))
    p_int = np.array([[100, 200, 300], [0, 1, 2]], dtype=np.int64)
    cv = np.zeros(N_CV)
    cv[C_FIXED_MHZ] = 100.0
    c_rows = np.ones((N_CROWS, f_n))
    tl_f = np.zeros((3, 8))
    tl_i = np.zeros((3, 8), dtype=np.int64)
    wait = np.zeros(1, dtype=np.int64)
    queue = np.ones((N_QU, 2), dtype=np.int64)
    queue[QU_RID] = 0
    queue[QU_DONE] = 0
    for rng in (None,):
        si2 = si.copy()
        si2[S_W_TAIL] = 1
        pv2 = pv.copy()
        pv2[pm.N_COEF + P_MAX_BATCH_TOKENS] = 8
        advance_prefill(0.0, 0.0, AT_START, si2, sf.copy(), queue.copy(), np.zeros((3, 3), dtype=np.int64),
                        np.zeros(3, dtype=np.int64), np.zeros(2, dtype=np.int64), req_i.copy(), req_f.copy(), pv2,
                        p_rows.copy(), p_int.copy(), cv.copy(), tl_f.copy(), tl_i.copy(), rng)
        advance(0.0, 0.0, AT_START, si.copy(), sf.copy(), batch.copy(), np.zeros(2), wait, req_i.copy(),
                req_f.copy(), pv, p_rows.copy(), p_int.copy(), cv.copy(), c_rows.copy(), tl_f.copy(), tl_i.copy(),
                rng)
