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

Trust (see :mod:`dualscale.runtime.keys`): with CURVE, a report is taken only for the instance its
sender's key names and a status only for the node its key names (``identity`` drops). Report order is
kept per instance and sender incarnation (``epoch``, the sender's monotonic clock at its start): a
new epoch replaces the current one when it is larger (a restart on the same host) or when the
current one has been silent for ``EPOCH_STALE_S`` (a move, a reboot, or a forged epoch), so no
report can lock out the real sender for longer than that. Actuators are routed by the node their key
names, not by a name they choose: the first live connection of a node gets its commands; a second
one while the first is connected and reports is refused and counted (``dualscale_actuator_conflicts``);
an actuator that (re)connects is sent its instances' latest commands at once.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from enum import IntEnum
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import numpy as np
import zmq

from dualscale._files import write_atomic
from dualscale.control import DecodeController, PrefillController, make_controller
from dualscale.errors import ProtocolError
from dualscale.profile import Profile
from dualscale.runtime.config import InstanceSpec, RuntimeConfig
from dualscale.runtime.keys import CONTROLLER, Security, actuator_name, engine_name, role_names
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
from dualscale.runtime.ratelog import RateLimitedLog
from dualscale.runtime.recorder import TelemetryRecorder
from dualscale.runtime.serial import FrameDecoder, FrameEncoder
from dualscale.runtime.transport import EVENTS, NOBLOCK, POLLIN, Listeners, make_socket
from dualscale.runtime.trust import read_trusted

log = logging.getLogger("dualscale.runtime.daemon")

#: Most frames taken in one drain, so a flood cannot starve the decisions.
MAX_DRAIN = 1024
#: Republish the plan this often (s), for subscribers that joined late.
PLAN_PERIOD_S = 1.0
#: An actuator is "up" while its last status is younger than this (s); a second connection claiming
#: the node is refused while the first is up.
ACTUATOR_UP_S = 2.0
#: A report epoch other than the current one's is taken once the current one is silent this long (s).
EPOCH_STALE_S = 0.5
#: Write the energy state file at most this often (s).
STATE_PERIOD_S = 1.0
#: Largest frame taken on each socket (bytes): reports carry per-request arrays (a 256-request report
#: is ~6 KB); a status carries at most MAX_GPUS GPUs and MAX_INSTANCES instances.
MAX_REPORT_BYTES = 4 << 20
MAX_STATUS_BYTES = 256 << 10


class EnergyState(msgspec.Struct, forbid_unknown_fields=True):
    """What the energy accounting carries across a controller restart (``controller.state_file``)."""

    #: "node/gpu" -> (counter identity, last counter reading J)
    counters: dict[str, tuple[str, float]] = {}
    #: energy counted so far per phase (J)
    energy_j: dict[str, float] = {}


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


class _Decided(NamedTuple):
    """What the daemon keeps of a decision: the clock, and the shadow accounting of the iteration."""

    freq_mhz: int
    feasible: bool
    time_s: float  # predicted time of the iteration about to run at freq_mhz
    budget_s: float  # the time it may take without a deadline missed
    energy_j: float  # its predicted energy at freq_mhz
    top_energy_j: float  # and at the top clock


def _decide_prefill(ctl: PrefillController, r: PrefillReport) -> _Decided:
    d = ctl.decide(r.now_s, f64(r.arrival_s), i64(r.prompt_tokens), i64(r.prefilled_tokens), r.kv_util)
    return _Decided(d.freq_mhz, d.feasible, d.batch_time_s, d.budget_s, d.batch_energy_j, d.top_energy_j)


def _decide_decode(ctl: DecodeController, r: DecodeReport) -> _Decided:
    d = ctl.decide(r.now_s, f64(r.first_token_s), i64(r.tokens_out), i64(r.context_tokens), r.kv_util)
    return _Decided(d.freq_mhz, d.feasible, d.step_time_s, d.budget_s, d.energy_j, d.top_energy_j)


class _Slot:
    """Per-instance state: its controller, report ordering and the newest undecided report."""

    __slots__ = ("spec", "phase", "node_id", "gpus", "ctl", "decide", "epoch", "last_seq", "pending",
                 "recv_ns", "seq", "decided_report", "m_decisions", "m_latency",
                 "m_clock", "m_infeasible", "m_correction", "m_error_model", "m_error_corrected", "m_feedback",
                 "m_safety", "user", "heard_s", "last_cmd", "decided", "m_shadow_plan", "m_shadow_top",
                 "m_predicted_misses", "m_energy")

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
        self.decided_report: Any = None
        self.user = engine_name(spec.name)  # the key name allowed to report for this instance
        self.heard_s = 0.0  # monotonic time of the last report taken
        self.last_cmd: ClockCommand | None = None  # re-sent to an actuator that (re)connects
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
        self.decided: Any = None  # the last decision (_Decided), for the shadow accounting
        self.m_shadow_plan = metrics.shadow_energy.labels(spec.name, "decided")
        self.m_shadow_top = metrics.shadow_energy.labels(spec.name, "top")
        self.m_predicted_misses = metrics.predicted_misses.labels(spec.name)
        self.m_energy = metrics.instance_energy.labels(spec.name)


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
        self.nodes = sorted({s.spec.node for s in self.slots.values()})
        self._node_of_user = {actuator_name(n): n for n in self.nodes}
        #: node -> (routing id of its actuator's connection, monotonic time last heard, actuator epoch)
        self.routes: dict[str, tuple[bytes, float, int]] = {}
        self.conflicts: dict[str, int] = dict.fromkeys(self.nodes, 0)
        self._warn = RateLimitedLog(log)
        self.gpu_phase = {(s.spec.node, g): s.spec.phase for s in self.slots.values() for g in s.gpus}
        self.gpu_slot = {(s.spec.node, g): s for s in self.slots.values() for g in s.gpus}
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
        self._node_seen_s: dict[str, float] = {}  # node -> when its routed actuator last reported
        self._gpu_energy: dict[tuple[str, int], tuple[int, float]] = {}
        #: (node, gpu) -> (counter identity, last counter reading J): energy is counted from these deltas
        self._gpu_counter: dict[tuple[str, int], tuple[str, float]] = {}
        self.energy_j: dict[str, float] = {"prefill": 0.0, "decode": 0.0}
        self.counter_resets = 0
        self.security: Security | None = None
        self._curve = config.security.mechanism == "curve"
        self._next_state_s = 0.0
        self._load_state()
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
            sec = self.security = Security(self.config.security.mechanism, self.config.security.keys_dir, CONTROLLER)
            stack.callback(sec.close)
            roles = role_names(self.nodes, self.slots)
            sec.authenticate(ctx, {"reports": [s.user for s in self.slots.values()],
                                   "actuators": list(self._node_of_user), "plan": roles[1:]})
            # ports a socket unit holds across restarts (none when started otherwise): bound through
            held = Listeners.from_environment()
            self._reports = make_socket(ctx, zmq.PULL, cs.report_address, bind=True, hwm=cs.hwm,
                                        secure=sec.server("reports"), max_bytes=MAX_REPORT_BYTES,
                                        fd=held.take(cs.report_address))
            stack.callback(self._reports.close, 0)
            self._actuators = make_socket(ctx, zmq.ROUTER, cs.actuator_address, bind=True, hwm=cs.hwm,
                                          router_mandatory=True, secure=sec.server("actuators"),
                                          max_bytes=MAX_STATUS_BYTES, fd=held.take(cs.actuator_address))
            stack.callback(self._actuators.close, 0)
            if cs.plan_address:
                self._plan_pub = make_socket(ctx, zmq.PUB, cs.plan_address, bind=True, hwm=cs.hwm,
                                             secure=sec.server("plan"), max_bytes=1024,  # subscriptions only
                                             fd=held.take(cs.plan_address))
                stack.callback(self._plan_pub.close, 0)
            if cs.metrics_port:
                server = serve_metrics(self.metrics, cs.metrics_host, cs.metrics_port,
                                       fd=held.take(f"tcp://{cs.metrics_host}:{cs.metrics_port}"))
                stack.callback(server.server_close)
                stack.callback(server.shutdown)
            if held.names:
                log.info("controller: %d of %d listening sockets inherited from the supervisor (ports held across "
                         "restarts)", len(held.names) - len(held.left()), len(held.names))
            if held.left():
                log.warning("controller: inherited sockets no address of the config uses: %s", ", ".join(held.left()))
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
                self._save_state()
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
        curve = self._curve
        n = 0
        while n < MAX_DRAIN and reports.getsockopt(EVENTS) & POLLIN:
            if curve:  # User-Id is the sender's key name, set by our authenticator for the connection
                f = reports.recv(copy=False)
                self.handle_report(f.bytes, time.perf_counter_ns(), f.get("User-Id"))
            else:  # a plain copy is cheaper than a Frame for small messages
                self.handle_report(reports.recv(copy=True), time.perf_counter_ns())
            n += 1
        n = 0
        while n < MAX_DRAIN and actuators.getsockopt(EVENTS) & POLLIN:
            parts = actuators.recv_multipart(copy=False)
            if len(parts) != 2:
                self._drop("malformed", f"{len(parts)} frames from an actuator")
                continue
            self.handle_status(parts[1].bytes, parts[0].bytes, parts[1].get("User-Id") if curve else None)
            n += 1

    def _drop(self, reason: str, detail: object) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.metrics.dropped.labels(reason).inc()
        log.debug("controller: dropped a message (%s): %s", reason, detail)

    def handle_report(self, frame: bytes, recv_ns: int, user: str | None = None) -> None:
        """Check one report frame and keep it as its instance's newest (or count why not).

        ``user`` is the sender's authenticated key name (None without CURVE: not checked)."""
        try:
            mtype, r = self._report_dec.decode(frame)
        except ProtocolError as e:
            self._drop(e.reason, e)
            return
        slot = self.slots.get(r.instance)
        if slot is None:
            self._drop("unknown_instance", r.instance)
            return
        if user is not None and user != slot.user:
            self._drop("identity", f"{r.instance}: reported by key {user!r}")
            return
        if (mtype is MsgType.PREFILL_REPORT) != (slot.phase is Phase.PREFILL):
            self._drop("invalid", f"{r.instance}: {mtype.name} for a {slot.spec.phase} instance")
            return
        if not 0 < r.epoch <= r.sent_ns or r.seq < 1:  # both on the sender's monotonic clock
            self._drop("invalid", f"{r.instance}: epoch {r.epoch}, sent_ns {r.sent_ns}, seq {r.seq}")
            return
        now_s = time.monotonic()
        # order holds while the current stream is live; once it has been quiet (only rejected
        # reports) for EPOCH_STALE_S anything valid is taken, so a poisoned epoch or seq heals
        if (now_s - slot.heard_s < EPOCH_STALE_S and r.epoch <= slot.epoch
                and (r.epoch < slot.epoch or r.seq <= slot.last_seq)):
            self._drop("out_of_order", f"{r.instance}: epoch {r.epoch} seq {r.seq} after {slot.epoch}/{slot.last_seq}")
            return
        slot.epoch, slot.last_seq, slot.heard_s = r.epoch, r.seq, now_s
        if slot.pending is not None:
            self.metrics.superseded.inc()
        else:
            self._dirty.append(slot)
        slot.pending = r
        slot.recv_ns = recv_ns

    def handle_status(self, frame: bytes, route: bytes = b"", user: str | None = None) -> None:
        """Fold one actuator status into the metrics (clocks, reasons, per-phase power and energy).

        ``route`` is the connection's routing id on the actuator socket; ``user`` the sender's
        authenticated key name (None without CURVE: the node named in the status is believed)."""
        try:
            st: NodeStatus = self._status_dec.decode(frame)[1]
        except ProtocolError as e:
            self._drop(e.reason, e)
            return
        node = st.node if user is None else self._node_of_user.get(user)
        if node is None or node != st.node:
            self._drop("identity", f"status for node {st.node!r} from key {user!r}")
            return
        if node not in self.conflicts:
            self._drop("unknown_instance", f"status of node {node!r}, which no instance uses")
            return
        if not all(math.isfinite(v) and v >= 0 for g in st.gpus for v in (g.power_w, g.energy_j, g.counter_j)):
            self._drop("invalid", f"{node}: a negative or non-finite power or energy")
            return
        now_s = time.monotonic()
        if not self._take_route(node, route, st.epoch, now_s):
            return
        self._node_seen_s[node] = now_s
        if self.recorder is not None:
            self.recorder.status(st)
        m = self.metrics
        m.actuator_up.labels(node).set(1)
        m.deadman_resets.labels(node).set(st.deadman_resets)
        for g in st.gpus:
            key = (node, g.index)
            phase = self.gpu_phase.get(key)
            if phase is None:  # a GPU no instance uses: no label is made for it (bounded label sets)
                continue
            gpu = str(g.index)
            m.gpu_clock.labels(node, gpu).set(g.sm_mhz)
            m.gpu_locked.labels(node, gpu).set(g.locked_mhz)
            m.gpu_reasons.labels(node, gpu).set(g.reasons)
            delta = self._energy_delta(key, g, st.epoch)
            if delta > 0:
                self.energy_j[phase] += delta
                m.energy.labels(phase).inc(delta)
                self.gpu_slot[key].m_energy.inc(delta)
            self._gpu_power[key] = g.power_w
        for phase in ("prefill", "decode"):
            m.power.labels(phase).set(sum(p for k, p in self._gpu_power.items() if self.gpu_phase.get(k) == phase))

    def _feedback(self, slot: _Slot, r: Any) -> None:
        """Tell the controller what the iteration it last decided on measured, when ``r`` (the next
        report of the same agent) describes exactly that iteration."""
        prev = slot.decided_report
        if prev is None or r.epoch != prev.epoch or r.seq != prev.seq + 1 or not r.iteration_s > 0:
            return
        # the engine reads the clock at each iteration's start: the same reading at its end means
        # it ran at that clock throughout; otherwise (a switch landed mid-iteration) nothing is learnt
        freq = r.freq_mhz if r.freq_mhz == prev.freq_mhz else 0
        if self.recorder is not None:
            self.recorder.iteration(slot.spec.name, r, freq)
        ctl, cor = slot.ctl, slot.ctl.correction
        seen, triggers = cor.observations, cor.triggers
        ctl.observe(r.iteration_s, freq, self._instance_power_w(slot))
        if cor.observations != seen:
            slot.m_feedback.inc()
            d = slot.decided
            # the measured error applied to the decided clock's prediction: would that iteration
            # have overrun its deadline budget? (in shadow mode the GPUs ran another clock)
            if d is not None and (1.0 + cor.last_error) * d.time_s > d.budget_s + 1e-9:
                slot.m_predicted_misses.inc()
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

    def _take_route(self, node: str, route: bytes, epoch: int, now_s: float) -> bool:
        """Route ``node``'s commands to the connection ``route`` unless another live one holds it."""
        held = self.routes.get(node)
        if held is not None and held[0] != route and now_s - held[1] < ACTUATOR_UP_S and self._connected(held[0]):
            self.conflicts[node] += 1
            self.metrics.conflicts.labels(node).inc()
            self._drop("conflict", f"{node}: a second actuator connection while the first reports")
            self._warn(logging.WARNING, f"conflict:{node}", "controller: a second actuator claims node %s while "
                       "the first still reports: refused (no commands are sent to it)", node)
            return False
        self.routes[node] = (route, now_s, epoch)
        if held is None or held[0] != route or held[2] != epoch:
            # a new or reconnected actuator: give it its instances' clocks now, not at their next report
            if held is not None:
                log.info("controller: actuator of %s (re)connected; sending its instances' latest clocks", node)
            self._outbox.extend((s, s.last_cmd) for s in self.slots.values()
                                if s.spec.node == node and s.last_cmd is not None)
        return True

    def _connected(self, route: bytes) -> bool:
        """Whether the actuator connection ``route`` is still there (a heartbeat to it is routable): a
        killed actuator's connection is gone at once, a hung one's after the ZMTP heartbeat timeout."""
        sock = self._actuators
        if sock is None:
            return True
        try:
            sock.send_multipart([route, self._enc.encode(MsgType.HEARTBEAT, Heartbeat(self.epoch, time.monotonic_ns()))],
                                NOBLOCK)
        except zmq.Again:
            return True  # there, with a full queue
        except zmq.ZMQError:
            return False  # EHOSTUNREACH (ROUTER_MANDATORY): that connection is closed
        return True

    def _energy_delta(self, key: tuple[str, int], g: Any, epoch: int) -> float:
        """Energy of one GPU since its previous status (J), from the device counter and its identity:
        a first sight only sets the baseline (never re-adds what an earlier controller counted); a
        counter that went backwards, or a new identity (reboot, driver reload), counts from zero."""
        if not g.counter_id:  # an actuator that does not send its counter: its meter, per epoch
            prev = self._gpu_energy.get(key)
            self._gpu_energy[key] = (epoch, g.energy_j)
            if prev is None:
                return 0.0  # first sight (e.g. this controller restarted): a baseline, never a re-add
            return g.energy_j - prev[1] if prev[0] == epoch else g.energy_j  # a new actuator's meter starts at 0
        prev_c = self._gpu_counter.get(key)
        self._gpu_counter[key] = (g.counter_id, g.counter_j)
        if prev_c is None:
            return 0.0
        if prev_c[0] == g.counter_id and g.counter_j >= prev_c[1]:
            return g.counter_j - prev_c[1]
        self.counter_resets += 1
        self._warn(logging.WARNING, f"reset:{key}", "controller: energy counter of %s GPU %d was reset or replaced "
                   "(%s %.0f J -> %s %.0f J): counting from zero", key[0], key[1], prev_c[0], prev_c[1],
                   g.counter_id, g.counter_j)
        return g.counter_j

    def _load_state(self) -> None:
        path = self.config.controller.state_file
        if not path or not Path(path).exists():
            return
        st = msgspec.json.decode(read_trusted(path, "controller state file"), type=EnergyState)
        for key, (cid, c) in st.counters.items():
            node, _, gpu = key.rpartition("/")
            if (node, int(gpu)) in self.gpu_phase and math.isfinite(c):
                self._gpu_counter[(node, int(gpu))] = (cid, c)
        for phase, e in st.energy_j.items():
            if phase in self.energy_j and math.isfinite(e) and e > 0:
                self.energy_j[phase] = e
                self.metrics.energy.labels(phase).inc(e)
        log.info("controller: energy accounting resumed from %s (%d GPU counters)", path, len(self._gpu_counter))

    def _save_state(self) -> None:
        path = self.config.controller.state_file
        if path:
            st = EnergyState({f"{n}/{g}": v for (n, g), v in self._gpu_counter.items()}, dict(self.energy_j))
            write_atomic(Path(path), msgspec.json.encode(st))

    def _decide(self) -> None:
        dirty, self._dirty = self._dirty, []
        for slot in dirty:  # in the order their reports arrived
            r = slot.pending
            slot.pending = None
            self._feedback(slot, r)
            slot.decided_report = r
            if self.recorder is not None:
                self.recorder.decided(slot.spec.name, r)
            try:
                d = slot.decide(slot.ctl, r)
            except ValueError as e:  # bad array lengths or contents: the controller names the field
                self._drop("invalid", f"{r.instance}: {e}")
                slot.decided_report = slot.decided = None  # no decision on r: the next report matches none
                continue
            slot.decided = d
            if d.energy_j > 0:
                slot.m_shadow_plan.inc(d.energy_j)
                slot.m_shadow_top.inc(d.top_energy_j)
            slot.seq += 1
            slot.last_cmd = ClockCommand(r.instance, slot.gpus, d.freq_mhz, slot.seq, r.sent_ns, self.epoch)
            self._outbox.append((slot, slot.last_cmd))
            if not d.feasible:
                slot.m_infeasible.inc()

    def _actuate(self) -> None:
        sock = self._actuators
        assert sock is not None  # internal: run() opened it
        for slot, cmd in self._outbox:
            route = self.routes.get(slot.spec.node)
            try:
                if route is None:
                    raise zmq.Again()
                sock.send_multipart([route[0], self._enc.encode(MsgType.CLOCK_COMMAND, cmd)], NOBLOCK)
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
            for node, (route, seen, _epoch) in self.routes.items():
                try:
                    sock.send_multipart([route, hb], zmq.NOBLOCK)
                except (zmq.Again, zmq.ZMQError):
                    pass  # gone: its dead-man switch is the safety net
                if now_s - seen > ACTUATOR_UP_S:
                    self.metrics.actuator_up.labels(node).set(0)
            if self.security is not None:
                for domain, n in self.security.denied.items():
                    self.metrics.auth_denied.labels(domain).set(n)
        if now_s >= self._next_state_s:
            self._next_state_s = now_s + STATE_PERIOD_S
            self._save_state()
        if self._plan_pub is not None and (now_s >= self._next_plan_s or self.plan.seq != self._plan_sent_seq):
            self._next_plan_s = now_s + PLAN_PERIOD_S
            self._plan_sent_seq = self.plan.seq
            try:
                self._plan_pub.send(self._enc.encode(MsgType.PLAN_UPDATE, self.plan), zmq.NOBLOCK)
            except zmq.Again:
                pass
