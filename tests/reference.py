"""Plain NumPy twins of the Numba kernels: slow, obvious, and written from the formulas in
dualscale/profile/schema.py rather than from the kernel code."""

from __future__ import annotations

import numpy as np

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
