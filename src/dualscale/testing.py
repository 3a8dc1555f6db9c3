"""Property-testing helpers: hypothesis strategies for realistic controller inputs, and checks of
the guarantees a decision must keep (DESIGN.md, "Invariants"), written independently of the
controllers' compiled kernels so they can judge them.

Use them to property-test your own profile and SLOs::

    from hypothesis import given
    from dualscale import Profile, PrefillController
    from dualscale.testing import check_prefill_decision, prefill_queues

    ctl = PrefillController(Profile.load("my-gpu-my-model.toml"), tp=4, ttft_slo_s=0.5)

    @given(prefill_queues())
    def test_never_worse_than_top(q):
        d = ctl.decide(q.now_s, q.arrival_s, q.prompt_tokens, q.prefilled_tokens)
        check_prefill_decision(ctl, q, d)

Requires hypothesis (``pip install 'dualscale[test]'``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

try:
    from hypothesis import strategies as st
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("dualscale.testing needs hypothesis: pip install 'dualscale[test]'") from e

from dualscale.control.decode import DecodeController, DecodeDecision
from dualscale.control.prefill import PrefillController, PrefillDecision

__all__ = [
    "DecodeBatch",
    "PrefillQueue",
    "check_decode_decision",
    "check_prefill_decision",
    "decode_batches",
    "plan_completions_s",
    "prefill_queues",
    "project_queue",
]

#: Deadlines and budgets are compared with the controllers' 1 ns tolerance.
TOL_S = 1e-9


@dataclass(frozen=True)
class PrefillQueue:
    """A prefill waiting queue at time ``now_s`` (FCFS order)."""

    now_s: float
    arrival_s: NDArray[np.float64]
    prompt_tokens: NDArray[np.int64]
    prefilled_tokens: NDArray[np.int64]


@dataclass(frozen=True)
class DecodeBatch:
    """A running decode batch at time ``now_s``."""

    now_s: float
    first_token_s: NDArray[np.float64]
    tokens_out: NDArray[np.int64]
    context_tokens: NDArray[np.int64]


@st.composite
def prefill_queues(draw: st.DrawFn, max_requests: int = 24, max_prompt_tokens: int = 8192,
                   max_wait_s: float = 1.0) -> PrefillQueue:
    """Waiting queues: 0..``max_requests`` requests that arrived within ``max_wait_s`` before now,
    prompt lengths log-uniform up to ``max_prompt_tokens``, the head possibly partly prefilled."""
    n = draw(st.integers(0, max_requests))
    now_s = draw(st.floats(0.0, 1e5, allow_nan=False, allow_infinity=False))
    waits = sorted(draw(st.lists(st.floats(0.0, max_wait_s), min_size=n, max_size=n)), reverse=True)
    arrival = np.array([now_s - w for w in waits], dtype=np.float64)
    # rounding of now - wait can reorder equal waits or pass now: clamp to keep the queue valid
    arrival = np.minimum(np.maximum.accumulate(arrival), now_s) if n else arrival
    logs = draw(st.lists(st.floats(0.0, np.log2(max_prompt_tokens)), min_size=n, max_size=n))
    prompt = np.array([max(1, int(2.0**x)) for x in logs], dtype=np.int64)
    done = np.zeros(n, dtype=np.int64)
    if n and prompt[0] > 1 and draw(st.booleans()):
        done[0] = draw(st.integers(1, int(prompt[0]) - 1))
    return PrefillQueue(now_s, arrival, prompt, done)


@st.composite
def decode_batches(draw: st.DrawFn, max_requests: int = 64, max_context_tokens: int = 16384,
                   tpot_s: float = 0.1) -> DecodeBatch:
    """Running batches: per request, output so far and a first-token time consistent with a TPOT
    around ``tpot_s`` (some ahead of it, some behind)."""
    n = draw(st.integers(0, max_requests))
    now_s = draw(st.floats(10.0, 1e5, allow_nan=False, allow_infinity=False))
    out = np.array(draw(st.lists(st.integers(1, 2000), min_size=n, max_size=n)), dtype=np.int64)
    pace = np.array(draw(st.lists(st.floats(0.3, 1.3), min_size=n, max_size=n)), dtype=np.float64)
    first = np.minimum(now_s - (out - 1) * tpot_s * pace, now_s) if n else np.zeros(0)
    prompt = np.array(draw(st.lists(st.integers(1, max_context_tokens), min_size=n, max_size=n)), dtype=np.int64)
    ctx = np.minimum(prompt + out, max_context_tokens + 2000)
    return DecodeBatch(now_s, first, out, ctx)


def project_queue(prompt_tokens: NDArray[np.int64], prefilled_tokens: NDArray[np.int64],
                  max_batch_tokens: int, horizon: int) -> tuple[list[list[tuple[int, int]]], list[int]]:
    """FCFS chunked batching, written plainly: (batches of (chunk, prefix) pairs, the batch in which
    each request completes or -1 beyond the horizon)."""
    batches: list[list[tuple[int, int]]] = []
    completes = [-1] * len(prompt_tokens)
    current: list[tuple[int, int]] = []
    room = max_batch_tokens
    for i, (prompt, done) in enumerate(zip(prompt_tokens.tolist(), prefilled_tokens.tolist())):
        while done < prompt and len(batches) < horizon:
            take = min(prompt - done, room)
            current.append((take, done))
            done += take
            room -= take
            if done == prompt:
                completes[i] = len(batches)
            if room == 0:
                batches.append(current)
                current, room = [], max_batch_tokens
        if len(batches) == horizon:
            break
    if current and len(batches) < horizon:
        batches.append(current)
    return batches, completes


def plan_completions_s(ctl: PrefillController, batches: list[list[tuple[int, int]]],
                       plan_mhz: list[int] | tuple[int, ...]) -> tuple[list[float], float]:
    """(seconds from now at which each batch ends, plan energy in J) under the profile."""
    cum = 0.0
    ends = []
    energy_j = 0.0
    for batch, f in zip(batches, plan_mhz):
        chunks = np.array([c for c, _ in batch])
        prefix = np.array([p for _, p in batch])
        t, w = ctl.profile.prefill(ctl.tp, chunks, float(f), prefix)
        cum += t
        ends.append(cum)
        energy_j += ctl.tp * w * t
    return ends, energy_j


def check_prefill_decision(ctl: PrefillController, q: PrefillQueue, d: PrefillDecision) -> None:
    """Assert the prefill guarantees: supported clocks, one clock per projected batch, the plan's
    energy as reported, and never worse than the top clock (every deadline the all-top plan
    meets, the plan meets). Raises AssertionError saying which guarantee broke."""
    supported = set(ctl.clocks_mhz.tolist())
    assert d.freq_mhz in supported or (not d.plan_mhz and d.freq_mhz == ctl.idle_freq_mhz), (
        f"freq_mhz {d.freq_mhz} is not in the controller's clock set")
    assert all(f in supported for f in d.plan_mhz), f"plan {d.plan_mhz} has an unsupported clock"
    batches, completes = project_queue(q.prompt_tokens, q.prefilled_tokens, ctl.max_batch_tokens, ctl.horizon)
    assert len(d.plan_mhz) == len(batches), f"plan has {len(d.plan_mhz)} clocks for {len(batches)} batches"
    if not batches:
        assert d.freq_mhz == ctl.idle_freq_mhz, "an empty queue must get the idle clock"
        return
    assert d.freq_mhz == d.plan_mhz[0], "freq_mhz must be the plan's first clock"
    assert list(d.batch_tokens) == [sum(c for c, _ in b) for b in batches], "batch_tokens differ from the projection"
    ends, energy_j = plan_completions_s(ctl, batches, d.plan_mhz)
    top_ends, _ = plan_completions_s(ctl, batches, [int(ctl.clocks_mhz[-1])] * len(batches))
    assert np.isclose(energy_j, d.energy_j, rtol=1e-9), f"reported energy {d.energy_j} J, plan costs {energy_j} J"
    allow = (1.0 - ctl.margin) * ctl.ttft_slo_s
    all_met = True
    for i, k in enumerate(completes):
        if k < 0:
            continue
        deadline = q.arrival_s[i] + allow - q.now_s
        met_by_top = top_ends[k] <= deadline + TOL_S
        all_met &= met_by_top
        if met_by_top:
            assert ends[k] <= deadline + TOL_S, (
                f"request {i} completes {ends[k] - deadline:.3e} s after its deadline, which the all-top "
                f"plan meets (plan {d.plan_mhz})")
        else:
            assert ends[k] <= top_ends[k] + TOL_S, f"request {i} is later than the all-top plan makes it"
    assert d.feasible == all_met, f"feasible = {d.feasible}, but all deadlines met by top = {all_met}"


def check_decode_decision(ctl: DecodeController, b: DecodeBatch, d: DecodeDecision, kv_util: float = 0.0) -> None:
    """Assert the decode guarantees: a supported clock; the least-energy (with objective="power":
    least-power) clock whose step fits the budget, or the top clock when none fits or KV use is at
    the guard."""
    clocks = ctl.clocks_mhz
    assert d.freq_mhz in set(clocks.tolist()), f"freq_mhz {d.freq_mhz} is not in the controller's clock set"
    if b.first_token_s.size == 0:
        assert d.freq_mhz == ctl.idle_freq_mhz, "an empty batch must get the idle clock"
        return
    target = (1.0 - ctl.margin) * ctl.tpot_slo_s
    if ctl.slack == "tbt":
        budget = target
    else:
        budget = float(np.min(target * b.tokens_out - (b.now_s - b.first_token_s)))
    t, w = ctl.profile.decode(ctl.tp, b.context_tokens, clocks.astype(float))
    fits = t <= budget + TOL_S
    assert d.feasible == bool(fits.any()), f"feasible = {d.feasible}, but a clock fits: {bool(fits.any())}"
    if not fits.any() or kv_util >= ctl.kv_guard:
        assert d.freq_mhz == clocks[-1], "top clock expected (nothing fits or KV at the guard)"
        return
    energy = np.where(fits, w if ctl.objective == "power" else w * t, np.inf)
    best = energy.min()
    j = int(np.searchsorted(clocks, d.freq_mhz))
    assert fits[j], f"{d.freq_mhz} MHz takes {t[j]:.6f} s, over the budget {budget:.6f} s"
    assert energy[j] <= best * (1 + 1e-12), f"{d.freq_mhz} MHz costs {energy[j]} J/GPU, {clocks[np.argmin(energy)]} MHz costs {best}"
