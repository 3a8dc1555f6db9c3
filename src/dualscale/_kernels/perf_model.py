"""Latency and power of one batch over a whole clock grid, in one call.

Array layouts (all float64, contiguous):

``coef`` (8,): per (phase, TP) coefficients, indices below (``C_*``).
``table`` (5, F): per-clock curves for one (phase, TP), rows ``T_*``; column k is clock k of the grid.
``out`` (2, F): written by the kernels; row ``O_TIME_S`` is seconds, row ``O_POWER_W`` is W per GPU.

Public wrappers (``dualscale.profile.model.Profile``) validate every input; kernels trust them.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from dualscale._kernels import CACHE, FASTMATH

C_BASE_S = 0
C_PER_REQUEST_S = 1
C_PER_CONTEXT_TOKEN_S = 2
C_PER_TOKEN_S = 3
C_ATTN_TOKEN_EQUIV = 4
C_POWER_CAP_W = 5
C_TP = 6  # GPUs of the instance: instance energy = tp x power per GPU x time
N_COEF = 8

T_MEM_SLOWDOWN = 0
T_COMP_SLOWDOWN = 1
T_IDLE_W = 2
T_MEM_POWER_W = 3
T_COMP_POWER_W = 4
N_TABLE_ROWS = 5

O_TIME_S = 0
O_POWER_W = 1


@njit(cache=CACHE, fastmath=FASTMATH)
def eval_clock(mem_s, comp_s, coef, table, k):
    """(time s, power W per GPU) of work (``mem_s``, ``comp_s`` at the reference clock) at table clock ``k``.

    Time is the soft roofline ``hypot(a, b)`` of the clock-scaled terms; power is the idle floor
    plus each unit's busy power times its busy fraction (``a / time``, ``b / time``), clamped to
    ``[idle, cap]``.
    """
    a = mem_s * table[T_MEM_SLOWDOWN, k]
    b = comp_s * table[T_COMP_SLOWDOWN, k]
    idle = table[T_IDLE_W, k]
    m = max(a, b)
    if m <= 0.0:
        return 0.0, idle
    # soft roofline: the two kinds of work overlap as the Euclidean norm, scaled by the larger
    # term so tiny or huge values neither underflow nor overflow (one sqrt per clock)
    ra = a / m
    rb = b / m
    r = np.sqrt(ra * ra + rb * rb)
    # each unit draws its busy power for the fraction of the iteration it is busy:
    # a / time = ra / r (memory), b / time = rb / r (tensor cores)
    busy_w = (ra * table[T_MEM_POWER_W, k] + rb * table[T_COMP_POWER_W, k]) / r
    return m * r, min(coef[C_POWER_CAP_W], max(idle, idle + busy_w))


@njit(cache=CACHE, fastmath=FASTMATH)
def eval_clocks(mem_s, comp_s, coef, table, out):
    """:func:`eval_clock` at every table clock, into ``out``."""
    for k in range(table.shape[1]):
        out[O_TIME_S, k], out[O_POWER_W, k] = eval_clock(mem_s, comp_s, coef, table, k)


@njit(cache=CACHE, fastmath=FASTMATH)
def work_s(n_requests, context_tokens, new_tokens, attention_pairs, coef):
    """Memory-bound and compute-bound seconds of one iteration at the reference clock."""
    mem = (
        coef[C_BASE_S]
        + coef[C_PER_REQUEST_S] * n_requests
        + coef[C_PER_CONTEXT_TOKEN_S] * context_tokens
    )
    comp = coef[C_PER_TOKEN_S] * (new_tokens + coef[C_ATTN_TOKEN_EQUIV] * attention_pairs)
    return mem, comp


@njit(cache=CACHE, fastmath=FASTMATH)
def prefill_work_s(chunk_tokens, prefix_tokens, coef):
    """(memory-bound s, compute-bound s) of a prefill batch of chunks (``chunk_tokens[i]`` new
    tokens after ``prefix_tokens[i]``) at the reference clock."""
    new = 0.0
    prefix = 0.0
    pairs = 0.0
    for i in range(chunk_tokens.shape[0]):
        l = float(chunk_tokens[i])
        p = float(prefix_tokens[i])
        new += l
        prefix += p
        # causal attention: query j of the chunk sees the prefix and j earlier chunk tokens + itself
        pairs += l * p + 0.5 * l * (l + 1.0)
    return work_s(chunk_tokens.shape[0], prefix, new, pairs, coef)


@njit(cache=CACHE, fastmath=FASTMATH)
def prefill_grid(chunk_tokens, prefix_tokens, coef, table, out):
    """Prefill batch on the grid (see :func:`prefill_work_s`)."""
    mem, comp = prefill_work_s(chunk_tokens, prefix_tokens, coef)
    eval_clocks(mem, comp, coef, table, out)


@njit(cache=CACHE, fastmath=FASTMATH)
def decode_work_s(context_tokens, coef):
    """(memory-bound s, compute-bound s) of a decode step of the batch (one new token per
    request, ``context_tokens[i]`` already cached) at the reference clock."""
    ctx = 0.0
    for i in range(context_tokens.shape[0]):
        ctx += float(context_tokens[i])
    n = context_tokens.shape[0]
    return work_s(n, ctx, float(n), ctx, coef)


@njit(cache=CACHE, fastmath=FASTMATH)
def decode_grid(context_tokens, coef, table, out):
    """Decode step of a batch on the grid (see :func:`decode_work_s`)."""
    mem, comp = decode_work_s(context_tokens, coef)
    eval_clocks(mem, comp, coef, table, out)


@njit(cache=CACHE, fastmath=FASTMATH)
def bench_prefill_loop(chunk_tokens, prefix_tokens, coef, table, out, repeats):
    """Call :func:`prefill_grid` ``repeats`` times from compiled code (bench/ measures in-kernel cost)."""
    for _ in range(repeats):
        prefill_grid(chunk_tokens, prefix_tokens, coef, table, out)


@njit(cache=CACHE, fastmath=FASTMATH)
def bench_decode_loop(context_tokens, coef, table, out, repeats):
    """Call :func:`decode_grid` ``repeats`` times from compiled code (bench/ measures in-kernel cost)."""
    for _ in range(repeats):
        decode_grid(context_tokens, coef, table, out)


def warm_up() -> None:
    """Compile (or load from cache) every kernel with the production argument types."""
    coef = np.ones(N_COEF)
    table = np.ones((N_TABLE_ROWS, 2))
    out = np.empty((2, 2))
    toks = np.ones(1, dtype=np.int64)
    prefill_grid(toks, toks, coef, table, out)
    decode_grid(toks, coef, table, out)
