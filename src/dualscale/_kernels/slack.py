"""Decode clock choice: step-time budget from TPOT slack, then the least-power (or least-energy) clock that fits.

``first_token_s`` (B,) float64, ``tokens_out`` (B,) int64 (>= 1, the first token included) and
``context_tokens`` (B,) int64 describe the running batch. ``params`` (N_PARAMS,) float64 holds the
``D_*`` scalars. ``out`` (2, F) receives the step's time and power per GPU on every clock.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from dualscale._kernels import CACHE, FASTMATH
from dualscale._kernels import perf_model as pm

D_NOW_S = 0
D_TPOT_SLO_S = 1
D_MARGIN = 2
D_REQUEST_SLACK = 3  # 1.0: per-request TPOT slack; 0.0: the paper's per-step (TBT) target
D_POWER_OBJECTIVE = 4  # 0.0: least energy per step (tp x power x time); 1.0: least power
N_PARAMS = 5

#: Same float64 tolerance as the prefill deadlines.
TOL_S = 1e-9


BATCH_OK = 0
BATCH_FIRST_NOT_FINITE = 1
BATCH_FIRST_AFTER_NOW = 2
BATCH_TOKENS_OUT_BELOW_1 = 3
BATCH_CONTEXT_BELOW_1 = 4


@njit(cache=CACHE, fastmath=FASTMATH)
def check_batch(now_s, first_token_s, tokens_out, context_tokens):
    """(code, request index) of the first invalid entry of the running batch, (BATCH_OK, -1) if none."""
    for i in range(first_token_s.shape[0]):
        f = first_token_s[i]
        if not np.isfinite(f):
            return BATCH_FIRST_NOT_FINITE, i
        if f > now_s:
            return BATCH_FIRST_AFTER_NOW, i
        if tokens_out[i] < 1:
            return BATCH_TOKENS_OUT_BELOW_1, i
        if context_tokens[i] < 1:
            return BATCH_CONTEXT_BELOW_1, i
    return BATCH_OK, -1


@njit(cache=CACHE, fastmath=FASTMATH)
def step_budget_s(first_token_s, tokens_out, params):
    """Seconds the next step may take so that every request's TPOT stays within the target."""
    target = (1.0 - params[D_MARGIN]) * params[D_TPOT_SLO_S]
    if params[D_REQUEST_SLACK] == 0.0:
        return target
    now = params[D_NOW_S]
    budget = np.inf
    for i in range(first_token_s.shape[0]):
        # after the next step the request has tokens_out + 1 tokens: TPOT = elapsed / tokens_out
        b = target * tokens_out[i] - (now - first_token_s[i])
        if b < budget:
            budget = b
    return budget


@njit(cache=CACHE, fastmath=FASTMATH)
def choose(first_token_s, tokens_out, context_tokens, params, coef, table, out):
    """(clock column, budget_s): the least-energy (or least-power) clock whose step fits the
    budget, -1 if none does.

    Among equal costs the lowest clock wins, which keeps the choice monotone in the budget.
    """
    budget = step_budget_s(first_token_s, tokens_out, params)
    pm.decode_grid(context_tokens, coef, table, out)
    lim = budget + TOL_S
    best = -1
    best_e = np.inf
    by_power = params[D_POWER_OBJECTIVE] != 0.0
    for j in range(table.shape[1]):
        t = out[pm.O_TIME_S, j]
        if t <= lim:
            e = out[pm.O_POWER_W, j] if by_power else out[pm.O_POWER_W, j] * t
            if e < best_e:
                best_e = e
                best = j
    return best, budget


def warm_up() -> None:
    """Compile (or load from cache) the kernels with the production argument types."""
    coef = np.ones(pm.N_COEF)
    table = np.ones((pm.N_TABLE_ROWS, 2))
    check_batch(1.0, np.zeros(1), np.ones(1, dtype=np.int64), np.ones(1, dtype=np.int64))
    choose(np.zeros(1), np.ones(1, dtype=np.int64), np.ones(1, dtype=np.int64),
           np.array([1.0, 0.1, 0.05, 1.0, 0.0]), coef, table, np.empty((2, 2)))
