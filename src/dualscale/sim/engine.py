"""Discrete-event simulation of a prefill/decode-disaggregated cluster with per-iteration clocks.

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

How it runs: one event heap (arrivals, prefill iterations ending, requests reaching a decode
instance, decode steps ending). Decode steps, most of the events, run in compiled macro-steps
(``dualscale.control.DecodeStepper``): a decode instance is advanced step after step, its
controller deciding and learning at every step, until a step ends at or after the next event that
could touch it (an arrival, a prefill iteration ending, since either may route a request to it,
or a request reaching it); with a ground truth that draws random numbers, until the next event of
any kind, so the draws keep their order. Results equal the per-event engine's (tests/sim).

Not modelled: prefix caching, preemption/recomputation, network contention between transfers,
CPU overheads outside the profile's per-iteration time, and the prefill instance's own KV memory.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from dualscale.control import DecodeController, DecodeStepper, Plant, PrefillStepper
from dualscale.profile import Profile
from dualscale.sim.policies import DecodeControl, Policy, PrefillControl
from dualscale.sim.scenario import Scenario
from dualscale.sim.traces import Trace
from dualscale.sim.truth import GroundTruth

_ARRIVAL, _PREFILL_DONE, _DECODE_READY, _DECODE_DONE = 0, 1, 2, 3


class Timeline:
    """Segments of one instance's life: [t0_s, t1_s) at ``freq_mhz`` drawing ``power_w`` per GPU,
    with ``queue`` requests waiting (prefill) or running (decode) when the segment began (arrays)."""

    def __init__(self, t0_s: ArrayLike, t1_s: ArrayLike, freq_mhz: ArrayLike, power_w: ArrayLike, queue: ArrayLike,
                 busy: ArrayLike) -> None:
        self.t0_s = np.asarray(t0_s, dtype=np.float64)
        self.t1_s = np.asarray(t1_s, dtype=np.float64)
        self.freq_mhz = np.asarray(freq_mhz, dtype=np.int64)
        self.power_w = np.asarray(power_w, dtype=np.float64)
        self.queue = np.asarray(queue, dtype=np.int64)
        self.busy = np.asarray(busy, dtype=np.bool_)

    def __len__(self) -> int:
        return self.t0_s.shape[0]

    @classmethod
    def of_segments(cls, f: NDArray[np.float64], i: NDArray[np.int64]) -> Timeline:
        """From rows (t0, t1, power) and (clock, queue, busy), as preallocated buffers hold them."""
        return cls(f[0], f[1], i[0], f[2], i[1], i[2].astype(np.bool_))


class _Served:
    """An instance of either phase: its compiled stepper (clock, energy, timeline) and its control."""

    def __init__(self, control: PrefillControl | DecodeControl, stepper: PrefillStepper | DecodeStepper, index: int,
                 tp: int, weight: float) -> None:
        self.control = control
        self.stepper = stepper
        self.index = index
        self.tp = tp
        self.weight = weight
        self.asks = stepper.asks  # the control decides and learns in Python, one iteration per call

    @property
    def timeline(self) -> Timeline:
        return Timeline.of_segments(*self.stepper.segments())

    @property
    def energy_busy_j(self) -> float:
        return self.stepper.energy_busy_j

    @property
    def energy_idle_j(self) -> float:
        return self.stepper.energy_idle_j


class _Prefill(_Served):
    """A prefill instance (queue and batches in its stepper)."""

    control: PrefillControl
    stepper: PrefillStepper

    def __init__(self, control: PrefillControl, stepper: PrefillStepper, index: int, tp: int, weight: float) -> None:
        super().__init__(control, stepper, index, tp, weight)
        self.done_at_s = math.inf  # end of the batch running (inf when idle)


class _Decode(_Served):
    """A decode instance (running batch and waiting requests in its stepper)."""

    control: DecodeControl
    stepper: DecodeStepper

    def __init__(self, control: DecodeControl, stepper: DecodeStepper, index: int, tp: int, weight: float,
                 kv_capacity_tokens: int) -> None:
        super().__init__(control, stepper, index, tp, weight)
        self.kv_capacity_tokens = kv_capacity_tokens
        self.ready_s: list[float] = []  # heap of the times requests routed here reach it


def _shortest_batch_s(profile: Profile, tp: int, plant: Plant) -> float:
    """A lower bound on any prefill batch's time on ``plant`` (s): one token at the fastest clock.
    Time grows with every term of a batch's work, and the truth scales it (or reshapes it around
    the top clock's time) without going under the faster of the two shapes; a power cap only
    runs slower clocks. Trimmed by 1e-9 so rounding never lifts it above a real batch."""
    t = np.asarray(profile.prefill_time_s(tp, [1], profile.clocks_mhz.astype(np.float64)), dtype=np.float64)
    shaped = t[-1] + (1.0 + plant.clock_shape_error) * (t - t[-1])
    return float(min(t.min(), shaped.min())) * plant.time_factor * (1.0 - 1e-9)


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

    def learnt_latency_factor(self, phase: str) -> float:
        """What the controllers of ``phase`` learnt of measured / model time: the geometric mean
        of their learnt factors weighted by the iterations each learnt from (1 when none learnt)."""
        insts = self.prefill if phase == "prefill" else self.decode
        learnt = [i.control.learnt() for i in insts]
        n = sum(k for _, k in learnt)
        return math.exp(sum(k * math.log(f) for f, k in learnt) / n) if n else 1.0


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
        truth = scenario.truth
        rng = np.random.default_rng(truth.seed)

        def plant(phase: str, tp: int) -> Plant:
            return Plant() if truth.is_model else GroundTruth(truth, phase, tp, rng).plant()

        def stepping(control: PrefillControl | DecodeControl) -> DecodeController | int | None:
            # a control without ``stepping`` (duck-typed, as tests and recorders write them) is asked every time
            fast = getattr(control, "stepping", None)
            return fast() if fast is not None else None

        if placement is None:
            pw = scenario.prefill.weights or [1.0] * scenario.prefill.instances
            dw = scenario.decode.weights or [1.0] * scenario.decode.instances
            placement = Placement(prefill=[(scenario.prefill.tp, None, w) for w in pw],
                                  decode=[(scenario.decode.tp, None, w) for w in dw])
        if not placement.prefill or not placement.decode:
            raise ValueError("placement: needs at least one prefill and one decode instance")
        n = len(trace)
        self.arrival_s = trace.arrival_s
        self.prompt = trace.input_tokens
        self.output = trace.output_tokens
        need = -(-(self.prompt + self.output) // self.block) * self.block
        self.need = need
        # per-request records, shared with the steppers (which write prefill progress, first
        # tokens, admission and finish)
        req = DecodeStepper.request_arrays(self.arrival_s, self.prompt, self.output, need)
        self._req_i, self._req_f = req
        S = DecodeStepper
        self.first_token_s = self._req_f[S.REQ_FIRST_TOKEN_S]
        self.ready_s = self._req_f[S.REQ_READY_S]
        self.admit_wait_s = self._req_f[S.REQ_ADMIT_WAIT_S]
        self.finish_s = self._req_f[S.REQ_FINISH_S]
        self.tokens_out = self._req_i[S.REQ_TOKENS_OUT]  # output tokens emitted, recorded at finish
        self.prefilled = self._req_i[S.REQ_PREFILLED]
        delay = c.clock_switch_delay_s
        self.prefill = []
        for i, (tp, base, w) in enumerate(placement.prefill):
            pc = policy.prefill(tp, base)
            stepper = PrefillStepper(profile, tp, stepping(pc), idle_freq_mhz=pc.idle_mhz, requests=req,
                                     plant=plant("prefill", tp), switch_delay_s=delay,
                                     max_batch_tokens=scenario.prefill.max_batch_tokens, prefill_only=only == "prefill",
                                     rng=rng)
            self.prefill.append(_Prefill(pc, stepper, i, tp, w))
        self.decode = []
        for i, (tp, base, w) in enumerate(placement.decode):
            dc = policy.decode(tp, base)
            kv = profile.kv_capacity_tokens(tp)
            dstep = DecodeStepper(profile, tp, stepping(dc), idle_freq_mhz=dc.idle_mhz, requests=req,
                                  plant=plant("decode", tp), switch_delay_s=delay, kv_capacity_tokens=kv,
                                  max_batch_requests=scenario.decode.max_batch_requests, rng=rng)
            self.decode.append(_Decode(dc, dstep, i, tp, w, kv))
        # a draw anywhere must keep its place in the run's order: then macro-steps stop at the next
        # event of any kind
        self._draws = not truth.is_model and (truth.latency_noise > 0.0 or truth.switch_jitter != 0.0)
        # an arrival reaches decode no sooner than the shortest prefill batch after it (decode alone: at once)
        self._arrival_lead_s = 0.0 if only == "decode" else min(
            _shortest_batch_s(profile, tp, plant("prefill", tp)) for tp, _, _ in placement.prefill)
        kv_cap = max(d.kv_capacity_tokens for d in self.decode)
        self.decode_of = np.full(n, -1, dtype=np.int64)
        self.rejected = (need > kv_cap) & (self.output > 1) & (only != "prefill")
        self._req_i[S.REQ_REJECTED] = self.rejected
        self._heap: list[tuple[float, int, int, int]] = []
        self._seq = 0
        self._next_r = 0
        self._last_s = 0.0  # latest event time processed, macro-steps included

    def _push(self, t: float, kind: int, a: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (float(t), self._seq, kind, a))

    # ---- prefill ------------------------------------------------------------------------------
    def _arrive(self, r: int, t: float) -> None:
        inst = min(self.prefill, key=lambda p: p.stepper.load_tokens / p.weight)
        inst.stepper.enqueue(r)
        if not inst.stepper.busy:
            self._advance_prefill(inst, t, boundary=False)

    def _advance_prefill(self, inst: _Prefill, t: float, boundary: bool) -> None:
        """Run ``inst``'s batches from ``t`` (``boundary``: its batch in flight ended at ``t``) up
        to the next arrival (which the router may send to it), or one batch when its control
        decides in Python; requests whose prompt completed at ``t`` go on to decode."""
        stepper = inst.stepper
        if inst.asks:
            if boundary:
                inst.control.observe(*stepper.measured(t))
            code, t1 = stepper.advance(t, t, boundary=boundary)
            self._route_all(stepper.routed(), t)
            if code == PrefillStepper.NEED_DECISION:
                q, prompt, prefilled = stepper.queue_views()
                t1 = stepper.run_decided(t1, inst.control.clock(t1, self.arrival_s[q], prompt, prefilled, 0.0))
                code = PrefillStepper.RUNNING
        else:
            h = float(self.arrival_s[self._next_r]) if self._next_r < self.arrival_s.size else math.inf
            if self._draws and self._heap:
                h = min(h, self._heap[0][0])
            code, t1 = stepper.advance(t, h, boundary=boundary)
            self._route_all(stepper.routed(), t)
        if code == PrefillStepper.RUNNING:
            inst.done_at_s = t1
            self._push(t1, _PREFILL_DONE, inst.index)
        else:
            inst.done_at_s = math.inf
            self._last_s = max(self._last_s, t1)

    def _route_all(self, requests: NDArray[np.int64], t: float) -> None:
        for r in requests.tolist():
            self._route_decode(r, t, t + self.prompt[r] * self.transfer_s_per_token)

    # ---- decode -------------------------------------------------------------------------------
    def _route_decode(self, r: int, t: float, ready_s: float) -> None:
        need = int(self.need[r])
        d = min((x for x in self.decode if x.kv_capacity_tokens >= need),
                key=lambda x: x.stepper.routed_tokens / x.weight)
        d.stepper.route(need)
        self.decode_of[r] = d.index
        self.ready_s[r] = ready_s
        heapq.heappush(d.ready_s, float(ready_s))
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
        heapq.heappop(d.ready_s)
        d.stepper.enqueue(r)
        if not d.stepper.busy:
            self._advance_decode(d, t, boundary=False)

    def _horizon(self, d: _Decode) -> float:
        """The earliest time another event could touch ``d`` (its steps ending before it are safe
        to run now): a prefill batch ending (it may route a request to it; one an arrival starts
        ends at least the shortest batch after it), a request reaching it; with random draws, the
        next event of any kind."""
        h = float(self.arrival_s[self._next_r]) if self._next_r < self.arrival_s.size else math.inf
        if self._draws:
            return min(h, self._heap[0][0]) if self._heap else h
        h += self._arrival_lead_s
        if d.ready_s:
            h = min(h, d.ready_s[0])
        for p in self.prefill:
            h = min(h, p.done_at_s)
        return h

    def _advance_decode(self, d: _Decode, t: float, boundary: bool) -> None:
        """Run ``d``'s steps from ``t`` up to the horizon (``boundary``: its step in flight ended at ``t``)."""
        stepper = d.stepper
        if d.asks:  # the policy's control decides and learns in Python: one step per call
            if boundary:
                d.control.observe(*stepper.measured(t))
            code, t1 = stepper.advance(t, t, boundary=boundary)
            if code == DecodeStepper.NEED_DECISION:
                first, out, ctx, kv = stepper.batch_views()
                t1 = stepper.run_decided(t1, d.control.clock(t1, first, out, ctx, kv))
                code = DecodeStepper.RUNNING
        else:
            code, t1 = stepper.advance(t, self._horizon(d), boundary=boundary)
        if code == DecodeStepper.RUNNING:
            self._push(t1, _DECODE_DONE, d.index)
        elif t1 > self._last_s:  # the batch emptied at a step boundary run inside the macro-step
            self._last_s = t1

    # ---- the loop -----------------------------------------------------------------------------
    def run(self, progress: Callable[[float], None] | None = None) -> RunResult:
        """Simulate every request to completion. ``progress`` gets the simulated time now and then."""
        wall0 = time.perf_counter()
        arrivals = self.arrival_s
        n = arrivals.size
        heap = self._heap
        events = 0  # iterations are counted by their steppers
        t = 0.0
        report_every = max(1, n // 200)
        arrive = self._arrive_decode_only if self.only == "decode" else self._arrive
        while self._next_r < n or heap:
            r = self._next_r
            if r < n and (not heap or arrivals[r] <= heap[0][0]):
                t = float(arrivals[r])
                self._next_r = r + 1
                arrive(r, t)
                events += 1
                if progress is not None and self._next_r % report_every == 0:
                    progress(t)
            else:
                t, _, kind, a = heapq.heappop(heap)
                if kind == _PREFILL_DONE:
                    self._advance_prefill(self.prefill[a], t, boundary=True)
                elif kind == _DECODE_DONE:
                    self._advance_decode(self.decode[a], t, boundary=True)
                else:
                    self._decode_ready(a, t)
                    events += 1
        end_s = max(float(t), self._last_s)
        for p in self.prefill:
            p.stepper.idle_until(end_s)
            events += p.stepper.steps
        for d in self.decode:
            d.stepper.idle_until(end_s)
            d.stepper.sync()
            events += d.stepper.steps
        if progress is not None:
            progress(end_s)
        return RunResult(
            policy=self.policy.name, trace=self.trace, scenario=self.scenario,
            first_token_s=self.first_token_s, finish_s=self.finish_s, admit_wait_s=self.admit_wait_s,
            kv_blocked=self._req_i[DecodeStepper.REQ_KV_BLOCKED].astype(np.bool_),
            rejected=self.rejected, tokens_out=self.tokens_out, prefill=self.prefill, decode=self.decode, end_s=end_s,
            events=events, wall_s=time.perf_counter() - wall0,
        )
