"""The per-event engine dualscale.sim.engine replaced (as of commit b2a20ec), frozen here only so
that bench/simulate.py can time it side by side with the current one and check that both give the
same results. tests/sim/test_identity.py compared the two on several traces, truths and policies
before the old engine left src/ (see that commit's history). Do not use it for anything else.

Discrete-event simulation of a prefill/decode-disaggregated cluster with per-iteration clocks.

What is modelled (and what is not) — every number comes from the profile or the scenario:

- Prefill instances: FCFS queue, batches of at most ``max_batch_tokens`` prompt tokens, a request
  split into chunks across batches when needed (the same rule the prefill controller projects);
  the first token is emitted when a request's last chunk ends (TTFT = that time - arrival).
- KV transfer: the prompt's KV bytes (model geometry) over ``kv_link_gbps``; the request reaches
  its decode instance that much later, and the wait counts in its TPOT.
- Decode instances: continuous batching; a request is admitted at a step boundary when fewer than
  ``max_batch_requests`` run and its whole KV footprint (prompt + output, rounded up to KV blocks)
  fits beside the others' (a reservation, so no preemption is modelled; output lengths are
  known from the trace); otherwise it waits, FCFS, and the run reports it. Every running request
  emits one token per step; TPOT = (finish - first token) / (output tokens - 1).
- Truth: the simulated GPUs follow the scenario's ``[truth]`` (sim/truth.py): by default the
  profile itself; otherwise biased, noisy, clock-shape-distorted, power-capped time and power that
  the controllers do not see. After every iteration the policy is told what a real engine would
  measure: the iteration's time, the clock in effect as read back (0 when it changed during the
  iteration) and the power per GPU.
- Clocks: before every iteration the instance's policy picks a clock; a change takes effect
  ``clock_switch_delay_s`` after it is asked for. Work progresses at rate 1 / time(f): a batch
  whose clock changes midway finishes the rest of its work at the new clock's pace. A request
  made while a switch is still in flight supersedes it and restarts the delay (the earlier clock
  is never reached; about 1 switch in 400 at 20 ms, 6 in 400 at 50 ms). An instance
  with nothing to do draws the profile's idle power at its clock (and asks for its idle clock).
- Energy: power x time of every segment, per instance, busy and idle, all GPUs of the instance,
  from time 0 to the last request's completion. Routing: weighted least-load (prefill: queued
  prompt tokens; decode: reserved KV tokens), weights from the scenario.

Not modelled: prefix caching, preemption/recomputation, network contention between transfers,
CPU overheads outside the profile's per-iteration time, and the prefill instance's own KV memory.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from dualscale.control import BatchFormer
from dualscale.profile import Profile
from dualscale.sim.policies import DecodeControl, Policy, PrefillControl
from dualscale.sim.scenario import Scenario
from dualscale.sim.traces import Trace
from dualscale.sim.truth import GroundTruth

_ARRIVAL, _PREFILL_DONE, _DECODE_READY, _DECODE_DONE = 0, 1, 2, 3


@dataclass
class Timeline:
    """Segments of one instance's life: [t0_s, t1_s) at ``freq_mhz`` drawing ``power_w`` per GPU,
    with ``queue`` requests waiting (prefill) or running (decode) when the segment began."""

    t0_s: list[float] = field(default_factory=list)
    t1_s: list[float] = field(default_factory=list)
    freq_mhz: list[int] = field(default_factory=list)
    power_w: list[float] = field(default_factory=list)
    queue: list[int] = field(default_factory=list)
    busy: list[bool] = field(default_factory=list)


class _Instance:
    """Clock state and energy accounting shared by prefill and decode instances."""

    def __init__(self, index: int, phase: str, tp: int, profile: Profile, delay_s: float, weight: float,
                 start_mhz: int, truth: GroundTruth | None) -> None:
        self.index = index
        self.phase = phase
        self.tp = tp
        self.weight = weight
        self.delay_s = delay_s
        self.clocks = profile.clocks_mhz
        self.f0 = int(self.clocks[0])
        self.step = int(profile.config.gpu.clock_step_mhz)
        self.idle_w = np.asarray(profile.idle_power_w(self.clocks.astype(np.float64)), dtype=np.float64)
        self.grid = profile.evaluator(phase, tp)  # type: ignore[arg-type]
        self.out = self.grid.out  # the running iteration's time and power on every clock (the truth's)
        self.truth = truth
        self.eff: NDArray[np.int64] | None = None  # clock that runs per clock asked (None: the same)
        self.iter_j = -1  # clock the last iteration ran at throughout, -1 if it changed midway
        self.step_started_s = 0.0
        self.j = self._idx(start_mhz)  # clock in effect (grid index)
        self.pending_j = -1
        self.pending_at_s = 0.0
        self.t_acct_s = 0.0  # energy is accounted up to here
        self.busy = False
        self.energy_busy_j = 0.0
        self.energy_idle_j = 0.0
        self.timeline = Timeline()
        self.queue_len = 0

    def _idx(self, freq_mhz: int) -> int:
        return (int(freq_mhz) - self.f0) // self.step

    def request_clock(self, freq_mhz: int, now_s: float) -> None:
        j = self._idx(freq_mhz)
        target = self.pending_j if self.pending_j >= 0 else self.j
        if j == target:
            return
        if j == self.j:  # asking for the clock in effect again cancels the switch under way
            self.pending_j = -1
        elif self.delay_s == 0.0:
            self.j = j
            self.pending_j = -1
        else:
            self.pending_j = j
            self.pending_at_s = now_s + (self.delay_s if self.truth is None else self.truth.switch_delay_s(self.delay_s))

    def _segment(self, t0: float, t1: float, j: int, power_w: float, busy: bool) -> None:
        if t1 <= t0:
            return
        power_w = float(power_w)
        e = self.tp * power_w * (t1 - t0)
        if busy:
            self.energy_busy_j += e
        else:
            self.energy_idle_j += e
        tl = self.timeline
        tl.t0_s.append(t0)
        tl.t1_s.append(t1)
        tl.freq_mhz.append(self.read_back_mhz(j))
        tl.power_w.append(power_w)
        tl.queue.append(self.queue_len)
        tl.busy.append(busy)

    def idle_until(self, t_s: float) -> None:
        """Account idle power from the last accounted time to ``t_s`` (splitting at a clock switch)."""
        t0 = self.t_acct_s
        if t_s <= t0:
            return
        if self.pending_j >= 0 and self.pending_at_s < t_s:
            mid = max(t0, self.pending_at_s)
            self._segment(t0, mid, self.j, self.idle_w[self.j], False)
            self.j = self.pending_j
            self.pending_j = -1
            t0 = mid
        self._segment(t0, t_s, self.j, self.idle_w[self.j], False)
        self.t_acct_s = t_s

    def read_back_mhz(self, j: int) -> int:
        """The clock that runs (and reads back) when column ``j`` is asked for: a capped GPU runs lower."""
        return int(self.clocks[j if self.eff is None else self.eff[j]])

    def evaluate(self, out: NDArray[np.float64]) -> None:
        """The model's grid for the iteration about to run is in ``out``: make it the truth's."""
        if self.truth is not None:
            self.eff = self.truth.apply(out)

    def run(self, t0: float) -> float:
        """Run the iteration whose grid evaluation is in ``self.out`` from ``t0``; returns its end."""
        times = self.out[0]
        power = self.out[1]
        j = self.j
        t_old = float(times[j])
        self.step_started_s = t0
        if self.pending_j < 0 or self.pending_at_s >= t0 + t_old:
            t1 = t0 + t_old
            self._segment(t0, t1, j, power[j], True)
            self.iter_j = j
        else:
            self.iter_j = -1
            s1 = max(0.0, self.pending_at_s - t0)
            jn = self.pending_j
            mid = t0 + s1
            t1 = mid + (1.0 - s1 / t_old) * float(times[jn])
            self._segment(t0, mid, j, power[j], True)
            self._segment(mid, t1, jn, power[jn], True)
            self.j = jn
            self.pending_j = -1
        self.t_acct_s = t1
        return t1

    def measured(self, t: float) -> tuple[float, int, float]:
        """What an engine measures of the iteration that just ended at ``t``: (time s, clock in
        effect MHz as read back or 0 if it changed midway, power per GPU W or 0)."""
        j = self.iter_j
        if j < 0:
            return t - self.step_started_s, 0, 0.0
        return t - self.step_started_s, self.read_back_mhz(j), float(self.out[1, j])


class _Prefill(_Instance):
    def __init__(self, control: PrefillControl, **kw: object) -> None:
        super().__init__(phase="prefill", start_mhz=control.idle_mhz, **kw)  # type: ignore[arg-type]
        self.control = control
        self.queue: deque[int] = deque()
        self.load_tokens = 0  # prompt tokens queued, not yet prefilled (routing load)
        self.batch: list[tuple[int, int]] = []  # (request, tokens) of the batch running


class _Decode(_Instance):
    def __init__(self, control: DecodeControl, kv_capacity_tokens: int, max_batch: int, **kw: object) -> None:
        super().__init__(phase="decode", start_mhz=control.idle_mhz, **kw)  # type: ignore[arg-type]
        self.control = control
        self.kv_capacity_tokens = kv_capacity_tokens
        self.max_batch = max_batch
        self.waiting: deque[int] = deque()
        self.reserved_tokens = 0  # KV reserved by running requests
        self.routed_tokens = 0  # reserved + on the way (routing load)
        cap = 64
        self.rid = np.empty(cap, dtype=np.int64)
        self.ctx = np.empty(cap, dtype=np.int64)
        self.out_done = np.empty(cap, dtype=np.int64)
        self.out_target = np.empty(cap, dtype=np.int64)
        self.first_s = np.empty(cap)
        self.need = np.empty(cap, dtype=np.int64)
        self.n = 0

    def grow(self) -> None:
        for name in ("rid", "ctx", "out_done", "out_target", "first_s", "need"):
            a = getattr(self, name)
            b = np.empty(2 * a.size, dtype=a.dtype)
            b[: self.n] = a[: self.n]
            setattr(self, name, b)


@dataclass(frozen=True)
class Placement:
    """Instances per phase: (TP degree, baseline clock MHz or None, routing weight) each."""

    prefill: list[tuple[int, int | None, float]]
    decode: list[tuple[int, int | None, float]]


@dataclass
class RunResult:
    """Everything one run produced: per-request times, per-instance energy and timelines."""

    policy: str
    trace: Trace
    scenario: Scenario
    first_token_s: NDArray[np.float64]
    finish_s: NDArray[np.float64]
    admit_wait_s: NDArray[np.float64]  # from reaching the decode instance to joining its batch
    kv_blocked: NDArray[np.bool_]  # held back at admission because the decode KV cache was full
    rejected: NDArray[np.bool_]  # needs more KV than a decode instance has
    tokens_out: NDArray[np.int64]  # output tokens each request emitted (first token included)
    prefill: list[_Prefill]
    decode: list[_Decode]
    end_s: float
    events: int
    wall_s: float

    def latencies_s(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(TTFT of every request that got its first token, TPOT of every finished request with
        more than one output token), seconds."""
        tr = self.trace
        got = np.isfinite(self.first_token_s)
        ttft = (self.first_token_s - tr.arrival_s)[got]
        multi = np.isfinite(self.finish_s) & (tr.output_tokens > 1)
        tpot = (self.finish_s[multi] - self.first_token_s[multi]) / (tr.output_tokens[multi] - 1)
        return ttft, tpot

    def energy_j(self, phase: str) -> float:
        """Energy of every instance of ``phase`` ("prefill" or "decode"), busy and idle, J."""
        insts = self.prefill if phase == "prefill" else self.decode
        return float(sum(i.energy_busy_j + i.energy_idle_j for i in insts))


class Simulation:
    """One run of ``trace`` through the cluster of ``scenario`` under ``policy``.

    ``only="prefill"`` or ``"decode"`` runs one phase alone (the coarse tier's goodput probes):
    prefill-only requests finish with their first token; decode-only requests reach a decode
    instance at their arrival time, as if their first token had just been emitted there.

    ``placement`` replaces the scenario's pools with the coarse tier's instances: per phase, one
    (tp, baseline clock MHz, routing weight) per instance (e.g. ``PlacementPlan.instances``).
    """

    def __init__(self, scenario: Scenario, profile: Profile, trace: Trace, policy: Policy,
                 only: Literal["prefill", "decode"] | None = None, placement: Placement | None = None) -> None:
        if only not in (None, "prefill", "decode"):
            raise ValueError(f"only = {only!r}: must be None, 'prefill' or 'decode'")
        self.only = only
        self.scenario = scenario
        self.profile = profile
        self.trace = trace
        self.policy = policy
        c = scenario.cluster
        model = profile.config.model
        self.block = int(model.kv_block_tokens)
        self.transfer_s_per_token = model.kv_bytes_per_token * 8.0 / (c.kv_link_gbps * 1e9)
        self.former = BatchFormer(scenario.prefill.max_batch_tokens)
        truth = scenario.truth
        rng = np.random.default_rng(truth.seed)

        def ground(phase: str, tp: int) -> GroundTruth | None:
            return None if truth.is_model else GroundTruth(truth, phase, tp, rng)

        if placement is None:
            pw = scenario.prefill.weights or [1.0] * scenario.prefill.instances
            dw = scenario.decode.weights or [1.0] * scenario.decode.instances
            placement = Placement(prefill=[(scenario.prefill.tp, None, w) for w in pw],
                                  decode=[(scenario.decode.tp, None, w) for w in dw])
        if not placement.prefill or not placement.decode:
            raise ValueError("placement: needs at least one prefill and one decode instance")
        self.prefill = [
            _Prefill(policy.prefill(tp, base), index=i, tp=tp, profile=profile, delay_s=c.clock_switch_delay_s,
                     weight=w, truth=ground("prefill", tp))
            for i, (tp, base, w) in enumerate(placement.prefill)
        ]
        self.decode = [
            _Decode(policy.decode(tp, base), profile.kv_capacity_tokens(tp), scenario.decode.max_batch_requests,
                    index=i, tp=tp, profile=profile, delay_s=c.clock_switch_delay_s, weight=w,
                    truth=ground("decode", tp))
            for i, (tp, base, w) in enumerate(placement.decode)
        ]
        kv_cap = max(d.kv_capacity_tokens for d in self.decode)
        n = len(trace)
        self.arrival_s = trace.arrival_s
        self.prompt = trace.input_tokens
        self.output = trace.output_tokens
        self.prefilled = np.zeros(n, dtype=np.int64)
        self.first_token_s = np.full(n, np.nan)
        self.finish_s = np.full(n, np.nan)
        self.ready_s = np.full(n, np.nan)
        self.admit_wait_s = np.zeros(n)
        self.kv_blocked = np.zeros(n, dtype=np.bool_)
        self.tokens_out = np.zeros(n, dtype=np.int64)  # output tokens emitted, recorded at finish
        self.decode_of = np.full(n, -1, dtype=np.int64)
        need = -(-(self.prompt + self.output) // self.block) * self.block
        self.need = need
        self.rejected = (need > kv_cap) & (self.output > 1) & (only != "prefill")
        self._heap: list[tuple[float, int, int, int]] = []
        self._seq = 0

    def _push(self, t: float, kind: int, a: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (float(t), self._seq, kind, a))

    # ---- prefill ------------------------------------------------------------------------------
    def _arrive(self, r: int, t: float) -> None:
        inst = min(self.prefill, key=lambda p: p.load_tokens / p.weight)
        inst.queue.append(r)
        inst.load_tokens += int(self.prompt[r])
        if not inst.busy:
            self._start_prefill(inst, t)

    def _start_prefill(self, inst: _Prefill, t: float) -> None:
        inst.idle_until(t)
        q = np.fromiter(inst.queue, dtype=np.int64, count=len(inst.queue))
        inst.queue_len = q.size
        f = inst.control.clock(t, self.arrival_s[q], self.prompt[q], self.prefilled[q], 0.0)
        inst.request_clock(f, t)
        # the next batch by the very rule the prefill controller projects
        chunk_tokens, chunk_prefix = self.former.next_batch(self.prompt[q], self.prefilled[q])
        n_chunks = chunk_tokens.shape[0]  # one chunk per request, in queue order
        inst.evaluate(inst.grid.prefill(chunk_tokens, chunk_prefix))
        batch = list(zip(q[:n_chunks].tolist(), chunk_tokens.tolist()))
        inst.batch = batch
        inst.busy = True
        self._push(inst.run(t), _PREFILL_DONE, inst.index)

    def _prefill_done(self, inst: _Prefill, t: float) -> None:
        inst.control.observe(*inst.measured(t))
        for r, take in inst.batch:
            self.prefilled[r] += take
            inst.load_tokens -= take
            if self.prefilled[r] == self.prompt[r]:
                inst.queue.popleft()
                self.first_token_s[r] = t
                if self.output[r] <= 1 or self.only == "prefill":
                    self.finish_s[r] = t
                    self.tokens_out[r] = 1
                elif self.rejected[r]:
                    pass  # can never fit a decode instance: reported, never finishes
                else:
                    self._route_decode(r, t, t + self.prompt[r] * self.transfer_s_per_token)
        inst.batch = []
        inst.busy = False
        if inst.queue:
            self._start_prefill(inst, t)
        else:
            inst.queue_len = 0
            inst.request_clock(inst.control.idle_mhz, t)

    # ---- decode -------------------------------------------------------------------------------
    def _route_decode(self, r: int, t: float, ready_s: float) -> None:
        need = self.need[r]
        d = min((x for x in self.decode if x.kv_capacity_tokens >= need), key=lambda x: x.routed_tokens / x.weight)
        d.routed_tokens += int(self.need[r])
        self.decode_of[r] = d.index
        self.ready_s[r] = ready_s
        self._push(ready_s, _DECODE_READY, r)

    def _arrive_decode_only(self, r: int, t: float) -> None:
        self.first_token_s[r] = t
        if self.output[r] <= 1:
            self.finish_s[r] = t
            self.tokens_out[r] = 1
        elif not self.rejected[r]:
            self._route_decode(r, t, t)

    def _decode_ready(self, r: int, t: float) -> None:
        d = self.decode[self.decode_of[r]]
        d.waiting.append(r)
        if not d.busy:
            self._start_decode(d, t)

    def _start_decode(self, d: _Decode, t: float) -> None:
        while d.waiting and d.n < d.max_batch:
            r = d.waiting[0]
            need = int(self.need[r])
            if d.reserved_tokens + need > d.kv_capacity_tokens:
                self.kv_blocked[r] = True
                break
            d.waiting.popleft()
            if d.n == d.rid.size:
                d.grow()
            i = d.n
            d.rid[i] = r
            d.ctx[i] = self.prompt[r] + 1
            d.out_done[i] = 1
            d.out_target[i] = self.output[r]
            d.first_s[i] = self.first_token_s[r]
            d.need[i] = need
            d.n += 1
            d.reserved_tokens += need
            self.admit_wait_s[r] = t - self.ready_s[r]
        n = d.n
        if n == 0:
            d.busy = False
            d.queue_len = 0
            d.idle_until(t)
            d.request_clock(d.control.idle_mhz, t)
            return
        d.idle_until(t)
        d.queue_len = n
        ctx = d.ctx[:n]
        kv_util = min(1.0, float(ctx.sum()) / d.kv_capacity_tokens)
        f = d.control.clock(t, d.first_s[:n], d.out_done[:n], ctx, kv_util)
        d.request_clock(f, t)
        d.evaluate(d.grid.decode(ctx))
        d.busy = True
        self._push(d.run(t), _DECODE_DONE, d.index)

    def _decode_done(self, d: _Decode, t: float) -> None:
        n = d.n
        d.control.observe(*d.measured(t))
        d.out_done[:n] += 1
        d.ctx[:n] += 1
        done = d.out_done[:n] >= d.out_target[:n]
        if done.any():
            fin = d.rid[:n][done]
            self.finish_s[fin] = t
            self.tokens_out[fin] = d.out_done[:n][done]
            released = int(d.need[:n][done].sum())
            d.reserved_tokens -= released
            d.routed_tokens -= released
            keep = ~done
            m = int(keep.sum())
            for name in ("rid", "ctx", "out_done", "out_target", "first_s", "need"):
                a = getattr(d, name)
                a[:m] = a[:n][keep]
            d.n = m
        d.busy = False
        self._start_decode(d, t)

    # ---- the loop -----------------------------------------------------------------------------
    def run(self, progress: Callable[[float], None] | None = None) -> RunResult:
        """Simulate every request to completion. ``progress`` gets the simulated time now and then."""
        wall0 = time.perf_counter()
        arrivals = self.arrival_s
        n = arrivals.size
        heap = self._heap
        next_r = 0
        events = 0
        t = 0.0
        report_every = max(1, n // 200)
        arrive = self._arrive_decode_only if self.only == "decode" else self._arrive
        while next_r < n or heap:
            if next_r < n and (not heap or arrivals[next_r] <= heap[0][0]):
                t = float(arrivals[next_r])
                arrive(next_r, t)
                next_r += 1
                if progress is not None and next_r % report_every == 0:
                    progress(t)
            else:
                t, _, kind, a = heapq.heappop(heap)
                if kind == _PREFILL_DONE:
                    self._prefill_done(self.prefill[a], t)
                elif kind == _DECODE_DONE:
                    self._decode_done(self.decode[a], t)
                else:
                    self._decode_ready(a, t)
            events += 1
        end_s = float(t)
        for inst in (*self.prefill, *self.decode):
            inst.idle_until(end_s)
        if progress is not None:
            progress(end_s)
        return RunResult(
            policy=self.policy.name, trace=self.trace, scenario=self.scenario,
            first_token_s=self.first_token_s, finish_s=self.finish_s, admit_wait_s=self.admit_wait_s,
            kv_blocked=self.kv_blocked,
            rejected=self.rejected, tokens_out=self.tokens_out, prefill=self.prefill, decode=self.decode, end_s=end_s, events=events,
            wall_s=time.perf_counter() - wall0,
        )
