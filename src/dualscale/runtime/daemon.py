"""The controller daemon (``dualscale serve``): reports in, fine-tier decisions, clock commands out.

One PrefillController or DecodeController per instance of the config, fed by the instance's worker
agent. The loop is an explicit busy loop with named phases::

    _drain_inputs   take every waiting frame (blocking only when there is nothing to do): reports
                    are checked (version, type, known instance, phase, order) and kept per
                    instance, newest wins; actuator statuses update the metrics
    _decide         one decision per instance with a new report, after feeding its controller the
                    previous iteration's measured time and clock (and the GPUs' power)
    _actuate        send the clock commands to the instances' actuators (ROUTER, by node name)
    _publish        heartbeats to every actuator, the placement plan, actuator liveness

Why one thread: socket I/O threads feeding queues (vLLM's layout) help when decoding is heavy and
runs without the GIL; here a report decodes in about a microsecond and every thread would contend
for the GIL with the decisions, adding a hop to each. Instead the loop coalesces: when decisions
fall behind, older reports of an instance are superseded by its newest, so latency stays bounded
by one pass and a stale queue state is never decided on. The clock for iteration k+1 is decided
while the engine runs iteration k: the engine only pushes its report and never waits for an
answer (the command goes to the actuator, not back to the engine).

Nothing a peer sends can stop the daemon: malformed frames, other protocol versions, unknown
instances, out-of-order or invalid reports are counted (``dualscale_dropped_messages``) and dropped.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from enum import IntEnum
from typing import Any

import numpy as np
import zmq

from dualscale.control import DecodeController, PrefillController, make_controller
from dualscale.errors import ProtocolError
from dualscale.profile import Profile
from dualscale.runtime.config import InstanceSpec, RuntimeConfig
from dualscale.runtime.messages import (
    ClockCommand,
    DecodeReport,
    Heartbeat,
    MsgType,
    NodeStatus,
    Phase,
    PlanInstance,
    PlanUpdate,
    PrefillReport,
)
from dualscale.runtime.metrics import DaemonMetrics, serve_metrics
from dualscale.runtime.recorder import TelemetryRecorder
from dualscale.runtime.serial import FrameDecoder, FrameEncoder
from dualscale.runtime.transport import EVENTS, NOBLOCK, POLLIN, make_socket

log = logging.getLogger("dualscale.runtime.daemon")

#: Most frames taken in one drain, so a flood cannot starve the decisions.
MAX_DRAIN = 1024
#: Republish the plan this often (s), for subscribers that joined late.
PLAN_PERIOD_S = 1.0
#: An actuator is "up" while its last status is younger than this many of its periods (or 2 s).
ACTUATOR_UP_S = 2.0


class DaemonState(IntEnum):
    STARTING = 0
    RUNNING = 1
    STOPPING = 2
    STOPPED = 3


def f64(buf: bytes) -> np.ndarray:
    """A little-endian float64 array field of a report (raises ValueError on a bad length)."""
    return np.frombuffer(buf, dtype="<f8")


def i64(buf: bytes) -> np.ndarray:
    """A little-endian int64 array field of a report (raises ValueError on a bad length)."""
    return np.frombuffer(buf, dtype="<i8")


def _decide_prefill(ctl: PrefillController, r: PrefillReport) -> tuple[int, bool]:
    d = ctl.decide(r.now_s, f64(r.arrival_s), i64(r.prompt_tokens), i64(r.prefilled_tokens), r.kv_util)
    return d.freq_mhz, d.feasible


def _decide_decode(ctl: DecodeController, r: DecodeReport) -> tuple[int, bool]:
    d = ctl.decide(r.now_s, f64(r.first_token_s), i64(r.tokens_out), i64(r.context_tokens), r.kv_util)
    return d.freq_mhz, d.feasible


class _Slot:
    """Per-instance state: its controller, report ordering and the newest undecided report."""

    __slots__ = ("spec", "phase", "node_id", "gpus", "ctl", "decide", "epoch", "last_seq", "pending",
                 "recv_ns", "seq", "decided_epoch", "decided_seq", "decided_freq_mhz", "m_decisions", "m_latency",
                 "m_clock", "m_infeasible", "m_correction", "m_error_model", "m_error_corrected", "m_feedback",
                 "m_safety")

    def __init__(self, spec: InstanceSpec, ctl: Any, decide: Callable[[Any, Any], tuple[int, bool]],
                 metrics: DaemonMetrics) -> None:
        self.spec = spec
        self.phase = Phase.PREFILL if spec.phase == "prefill" else Phase.DECODE
        self.node_id = spec.node.encode()
        self.gpus = list(spec.gpus)
        self.ctl = ctl
        self.decide = decide
        self.epoch = -1
        self.last_seq = 0
        self.pending: Any = None
        self.recv_ns = 0
        self.seq = 0
        # the report last decided on: the next report's iteration_s measures the iteration it ran
        self.decided_epoch = -1
        self.decided_seq = -1
        self.decided_freq_mhz = 0
        self.m_decisions = metrics.decisions.labels(spec.name, spec.phase)
        self.m_latency = metrics.decision_latency.labels(spec.phase)
        self.m_clock = metrics.clock.labels(spec.name)
        self.m_infeasible = metrics.infeasible.labels(spec.name)
        self.m_correction = metrics.correction.labels(spec.name)
        self.m_correction.set(1.0)
        self.m_error_model = metrics.prediction_error.labels(spec.name, "model")
        self.m_error_corrected = metrics.prediction_error.labels(spec.name, "corrected")
        self.m_feedback = metrics.feedback.labels(spec.name)
        self.m_safety = metrics.safety.labels(spec.name)


class ControllerDaemon:
    """Serves the fine tier to the workers and actuators of a runtime config.

    Args:
        config: the deployment (instances, addresses, SLOs, fine-tier settings).
        profile: the latency/power profile (default: ``config.profile``).
        metrics: where metrics go (default: a fresh registry; served over HTTP if configured).
        ctx: ZeroMQ context (default: a new one, terminated by :meth:`run` on exit).
        recorder: writes telemetry (``serve --record``); the caller closes it.
    """

    def __init__(self, config: RuntimeConfig, profile: Profile | None = None, metrics: DaemonMetrics | None = None,
                 ctx: zmq.Context[zmq.Socket[bytes]] | None = None, recorder: TelemetryRecorder | None = None) -> None:
        if not config.instances:
            raise ValueError("runtime config has no [[instances]]: nothing to control")
        self.config = config
        self.profile = profile if profile is not None else Profile.load(config.profile)
        self.metrics = metrics if metrics is not None else DaemonMetrics()
        self.state = DaemonState.STARTING
        self.epoch = time.time_ns()
        self.slots: dict[str, _Slot] = {}
        for spec in config.instances:
            self.slots[spec.name] = self._slot(spec)
        self.nodes = sorted({s.node_id for s in self.slots.values()})
        self.gpu_phase = {(s.spec.node, g): s.spec.phase for s in self.slots.values() for g in s.gpus}
        self.plan = PlanUpdate(self.epoch, 1, [
            PlanInstance(s.name, Phase.PREFILL if s.phase == "prefill" else Phase.DECODE, s.tp, s.node, list(s.gpus),
                         s.base_freq_mhz or int(self.profile.clocks_mhz[-1]), s.weight) for s in config.instances])
        self._outbox: list[tuple[_Slot, ClockCommand]] = []
        self._dirty: list[_Slot] = []  # slots with an undecided report, oldest first
        self._enc = FrameEncoder()
        self._report_dec = FrameDecoder((MsgType.PREFILL_REPORT, MsgType.DECODE_REPORT))
        self._status_dec = FrameDecoder((MsgType.NODE_STATUS,))
        self._ctx = ctx
        self._reports: zmq.Socket[bytes] | None = None
        self._actuators: zmq.Socket[bytes] | None = None
        self._plan_pub: zmq.Socket[bytes] | None = None
        self._poller = zmq.Poller()
        self._next_heartbeat_s = 0.0
        self._next_plan_s = 0.0
        self._plan_sent_seq = 0
        self._node_seen_s: dict[str, float] = {}
        self._gpu_energy: dict[tuple[str, int], tuple[int, float]] = {}
        self._gpu_power: dict[tuple[str, int], float] = {}
        #: frames dropped, by reason (mirrors the Prometheus counter, for tests and logs)
        self.dropped: dict[str, int] = {}
        self.decisions = 0
        self.recorder = recorder

    def _slot(self, spec: InstanceSpec) -> _Slot:
        ctl: Any = make_controller(self.profile, self.config.control, self.config.slo, phase=spec.phase, tp=spec.tp,
                                   max_batch_tokens=spec.max_batch_tokens)
        if spec.phase == "prefill":
            slot = _Slot(spec, ctl, _decide_prefill, self.metrics)
            warm: Any = PrefillReport(spec.name, 0, 0, 0, 1.0, 0.0, 0.0, 0, np.array([0.5]).tobytes(),
                                      np.array([300]).tobytes(), np.array([0]).tobytes())
        else:
            slot = _Slot(spec, ctl, _decide_decode, self.metrics)
            warm = DecodeReport(spec.name, 0, 0, 0, 1.0, 0.0, 0.0, 0, np.array([0.5]).tobytes(),
                                np.array([3]).tobytes(), np.array([100]).tobytes())
        slot.decide(ctl, warm)  # arrays from a wire buffer are read-only: compile that variant now
        return slot

    # ---- life cycle ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to stop (safe from a signal handler: it only flips the state)."""
        if self.state < DaemonState.STOPPING:
            self.state = DaemonState.STOPPING

    def run(self, ready: Callable[[], None] | None = None) -> None:
        """Bind the sockets, serve metrics, and loop until :meth:`stop`. ``ready`` runs once bound."""
        cs = self.config.controller
        with ExitStack() as stack:
            ctx = self._ctx if self._ctx is not None else zmq.Context()
            if self._ctx is None:
                stack.callback(ctx.term)
            self._reports = make_socket(ctx, zmq.PULL, cs.report_address, bind=True, hwm=cs.hwm)
            stack.callback(self._reports.close, 0)
            self._actuators = make_socket(ctx, zmq.ROUTER, cs.actuator_address, bind=True, hwm=cs.hwm,
                                          router_mandatory=True)
            stack.callback(self._actuators.close, 0)
            if cs.plan_address:
                self._plan_pub = make_socket(ctx, zmq.PUB, cs.plan_address, bind=True, hwm=cs.hwm)
                stack.callback(self._plan_pub.close, 0)
            if cs.metrics_port:
                server = serve_metrics(self.metrics, cs.metrics_host, cs.metrics_port)
                stack.callback(server.server_close)
                stack.callback(server.shutdown)
            self._poller.register(self._reports, zmq.POLLIN)
            self._poller.register(self._actuators, zmq.POLLIN)
            log.info("controller: %d instances on %d node(s); reports at %s, actuators at %s%s",
                     len(self.slots), len(self.nodes), cs.report_address, cs.actuator_address,
                     f", metrics on http://{cs.metrics_host}:{cs.metrics_port}/metrics" if cs.metrics_port else "")
            gc.freeze()  # the controllers and profile live for the whole run: keep them out of GC passes
            if self.state == DaemonState.STARTING:
                self.state = DaemonState.RUNNING
            if ready is not None:
                ready()
            try:
                while self.state == DaemonState.RUNNING:
                    self.step()
            finally:
                self.state = DaemonState.STOPPED
                log.info("controller: stopped after %d decisions", self.decisions)

    def step(self) -> None:
        """One pass of the loop."""
        self._drain_inputs(block=not self.has_work())
        self._decide()
        self._actuate()
        self._publish(time.monotonic())

    def has_work(self) -> bool:
        """True when a report waits for a decision or a command waits to be sent."""
        return bool(self._outbox) or bool(self._dirty)

    def set_plan(self, instances: list[PlanInstance]) -> None:
        """Publish a new placement (from the coarse tier) to the plan subscribers."""
        self.plan = PlanUpdate(self.epoch, self.plan.seq + 1, list(instances))

    # ---- phases --------------------------------------------------------------------------------
    def _drain_inputs(self, block: bool) -> None:
        if block:
            wait_s = max(0.0, min(self._next_heartbeat_s, self._next_plan_s) - time.monotonic())
            if not self._poller.poll(min(50, int(wait_s * 1000) + 1)):
                return
        reports, actuators = self._reports, self._actuators
        assert reports is not None and actuators is not None  # internal: run() opened them
        # ask the socket whether a frame waits instead of catching zmq.Again (an exception per drain)
        n = 0
        while n < MAX_DRAIN and reports.getsockopt(EVENTS) & POLLIN:
            self.handle_report(reports.recv(copy=True), time.perf_counter_ns())
            n += 1
        n = 0
        while n < MAX_DRAIN and actuators.getsockopt(EVENTS) & POLLIN:
            self.handle_status(actuators.recv_multipart(copy=True)[-1])
            n += 1

    def _drop(self, reason: str, detail: object) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.metrics.dropped.labels(reason).inc()
        log.debug("controller: dropped a message (%s): %s", reason, detail)

    def handle_report(self, frame: bytes, recv_ns: int) -> None:
        """Check one report frame and keep it as its instance's newest (or count why not)."""
        try:
            mtype, r = self._report_dec.decode(frame)
        except ProtocolError as e:
            self._drop(e.reason, e)
            return
        slot = self.slots.get(r.instance)
        if slot is None:
            self._drop("unknown_instance", r.instance)
            return
        if (mtype is MsgType.PREFILL_REPORT) != (slot.phase is Phase.PREFILL):
            self._drop("invalid", f"{r.instance}: {mtype.name} for a {slot.spec.phase} instance")
            return
        if r.epoch < slot.epoch or (r.epoch == slot.epoch and r.seq <= slot.last_seq):
            self._drop("out_of_order", f"{r.instance}: epoch {r.epoch} seq {r.seq} after {slot.epoch}/{slot.last_seq}")
            return
        slot.epoch, slot.last_seq = r.epoch, r.seq
        if slot.pending is not None:
            self.metrics.superseded.inc()
        else:
            self._dirty.append(slot)
        slot.pending = r
        slot.recv_ns = recv_ns

    def handle_status(self, frame: bytes) -> None:
        """Fold one actuator status into the metrics (clocks, reasons, per-phase power and energy)."""
        try:
            st: NodeStatus = self._status_dec.decode(frame)[1]
        except ProtocolError as e:
            self._drop(e.reason, e)
            return
        if self.recorder is not None:
            self.recorder.status(st)
        m = self.metrics
        self._node_seen_s[st.node] = time.monotonic()
        m.actuator_up.labels(st.node).set(1)
        m.deadman_resets.labels(st.node).set(st.deadman_resets)
        for g in st.gpus:
            key = (st.node, g.index)
            gpu = str(g.index)
            m.gpu_clock.labels(st.node, gpu).set(g.sm_mhz)
            m.gpu_locked.labels(st.node, gpu).set(g.locked_mhz)
            m.gpu_reasons.labels(st.node, gpu).set(g.reasons)
            phase = self.gpu_phase.get(key)
            if phase is None:
                continue
            prev = self._gpu_energy.get(key)
            # a new actuator epoch restarts its meters from 0
            delta = g.energy_j - prev[1] if prev is not None and prev[0] == st.epoch else g.energy_j
            self._gpu_energy[key] = (st.epoch, g.energy_j)
            if delta > 0:
                m.energy.labels(phase).inc(delta)
            self._gpu_power[key] = g.power_w
        for phase in ("prefill", "decode"):
            m.power.labels(phase).set(sum(p for k, p in self._gpu_power.items() if self.gpu_phase.get(k) == phase))

    def _feedback(self, slot: _Slot, r: Any) -> None:
        """Tell the controller what the iteration it last decided on measured, when ``r`` (the next
        report of the same agent) describes exactly that iteration."""
        if r.epoch != slot.decided_epoch or r.seq != slot.decided_seq + 1 or not r.iteration_s > 0:
            return
        # the engine reads the clock at each iteration's start: the same reading at its end means
        # it ran at that clock throughout; otherwise (a switch landed mid-iteration) nothing is learnt
        freq = r.freq_mhz if r.freq_mhz == slot.decided_freq_mhz else 0
        if self.recorder is not None:
            self.recorder.iteration(slot.spec.name, r, freq)
        ctl, cor = slot.ctl, slot.ctl.correction
        seen, triggers = cor.observations, cor.triggers
        ctl.observe(r.iteration_s, freq, self._instance_power_w(slot))
        if cor.observations != seen:
            slot.m_feedback.inc()
            slot.m_correction.set(cor.time_factor)
            slot.m_error_model.set(cor.last_model_error)
            slot.m_error_corrected.set(cor.last_error)
            if cor.triggers != triggers:
                slot.m_safety.inc()

    def _instance_power_w(self, slot: _Slot) -> float:
        """Mean power per GPU of the instance from its actuator's last status, 0 when unknown or
        older than a status period (NVML power is itself a ~100 ms average)."""
        node = slot.spec.node
        seen = self._node_seen_s.get(node)
        if seen is None or time.monotonic() - seen > self.config.actuator.status_period_s:
            return 0.0
        power = [self._gpu_power.get((node, g), 0.0) for g in slot.gpus]
        return sum(power) / len(power) if all(p > 0 for p in power) else 0.0

    def _decide(self) -> None:
        dirty, self._dirty = self._dirty, []
        for slot in dirty:  # in the order their reports arrived
            r = slot.pending
            slot.pending = None
            self._feedback(slot, r)
            slot.decided_epoch, slot.decided_seq, slot.decided_freq_mhz = r.epoch, r.seq, r.freq_mhz
            if self.recorder is not None:
                self.recorder.decided(slot.spec.name, r)
            try:
                freq_mhz, feasible = slot.decide(slot.ctl, r)
            except ValueError as e:  # bad array lengths or contents: the controller names the field
                self._drop("invalid", f"{r.instance}: {e}")
                slot.decided_seq = -1  # no decision on r: the next report's measurement matches none
                continue
            slot.seq += 1
            self._outbox.append((slot, ClockCommand(r.instance, slot.gpus, freq_mhz, slot.seq, r.sent_ns, self.epoch)))
            if not feasible:
                slot.m_infeasible.inc()

    def _actuate(self) -> None:
        sock = self._actuators
        assert sock is not None  # internal: run() opened it
        for slot, cmd in self._outbox:
            try:
                sock.send_multipart([slot.node_id, self._enc.encode(MsgType.CLOCK_COMMAND, cmd)], NOBLOCK)
            except (zmq.Again, zmq.ZMQError):  # EHOSTUNREACH: that actuator is not connected
                self.metrics.unroutable.labels(slot.spec.node).inc()
                continue
            finally:
                slot.m_latency.observe((time.perf_counter_ns() - slot.recv_ns) * 1e-9)
            self.decisions += 1
            slot.m_decisions.inc()
            slot.m_clock.set(cmd.freq_mhz)
        self._outbox.clear()

    def _publish(self, now_s: float) -> None:
        if now_s >= self._next_heartbeat_s:
            self._next_heartbeat_s = now_s + self.config.controller.heartbeat_s
            sock = self._actuators
            assert sock is not None  # internal: run() opened it
            hb = self._enc.encode(MsgType.HEARTBEAT, Heartbeat(self.epoch, time.monotonic_ns()))
            for node in self.nodes:
                try:
                    sock.send_multipart([node, hb], zmq.NOBLOCK)
                except (zmq.Again, zmq.ZMQError):
                    pass  # not connected (yet): its dead-man switch is the safety net
            for node, seen in self._node_seen_s.items():
                if now_s - seen > ACTUATOR_UP_S:
                    self.metrics.actuator_up.labels(node).set(0)
        if self._plan_pub is not None and (now_s >= self._next_plan_s or self.plan.seq != self._plan_sent_seq):
            self._next_plan_s = now_s + PLAN_PERIOD_S
            self._plan_sent_seq = self.plan.seq
            try:
                self._plan_pub.send(self._enc.encode(MsgType.PLAN_UPDATE, self.plan), zmq.NOBLOCK)
            except zmq.Again:
                pass
