"""The node actuator (``dualscale actuator``): the only privileged process, one per GPU node.

It connects to the controller daemon (DEALER, routing id = node name), receives clock commands and
heartbeats, and applies locked SM clocks. Its loop, with named phases::

    _drain_inputs   wait (bounded) for messages; keep the newest command per instance (latest wins)
    _check_deadman  no command or heartbeat for ``deadman_s`` -> reset every GPU it locked
    _apply          lock the GPUs of every pending command, all GPUs in parallel (thread pool),
                    rounding up to a supported clock and skipping GPUs already at that clock
    _publish        every ``status_period_s``: read back clock reached, clock-event reasons, power
                    and the energy counter of every managed GPU (in parallel) and send NodeStatus

Guarantees: at start every managed GPU is reset (a clean slate, and the privilege check: without
root the first NVML write fails and the actuator exits naming the fix); on exit, SIGTERM/SIGINT
(the handlers only flip the state) and any error, a ``finally`` resets every GPU it locked. A
SIGKILL cannot be caught: the next start resets. Device errors while running are reported in the
status and retried with the next command, never fatal.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from enum import IntEnum
from typing import Any, TypeVar

import msgspec
import zmq

from dualscale.device.base import ClockBackend
from dualscale.errors import DeviceError, ProtocolError
from dualscale.runtime.config import ActuatorSettings
from dualscale.runtime.messages import ClockCommand, GpuStatus, InstanceClock, MsgType, NodeStatus
from dualscale.runtime.serial import FrameDecoder, FrameEncoder
from dualscale.runtime.transport import make_socket

log = logging.getLogger("dualscale.runtime.actuator")
T = TypeVar("T")

#: Longest single wait of the loop (s), so a stop request is seen promptly.
MAX_WAIT_S = 0.05


class ActuatorState(IntEnum):
    RUNNING = 0
    STOPPING = 1
    STOPPED = 2


class EnergyMeter:
    """Energy of one GPU since the meter started (J), from a coarse 64-bit counter plus power samples.

    The device counter (J) is exact but updates only every ~100 ms; between its updates the meter
    adds the trapezoid integral of the power samples since the counter last moved. The reading never
    decreases. A counter that goes backwards (driver reload) starts a new segment instead of
    subtracting. Everything is float64 of a 64-bit mJ counter: no 32-bit wrap.
    """

    def __init__(self, counter_j: float, t_s: float, power_w: float = 0.0) -> None:
        self._done_j = 0.0  # energy of earlier counter segments
        self._origin_j = counter_j
        self._counter_j = counter_j
        self._extra_j = 0.0
        self._t_s = t_s
        self._power_w = power_w
        self.energy_j = 0.0

    def sample(self, counter_j: float, power_w: float, t_s: float) -> float:
        """Add one reading (counter J, power W, monotonic s); returns the energy so far (J)."""
        if counter_j < self._counter_j:  # counter reset: close the segment
            self._done_j += self._counter_j - self._origin_j
            self._origin_j = counter_j
            self._extra_j = 0.0
        elif counter_j > self._counter_j:
            self._extra_j = 0.0
        else:
            self._extra_j += 0.5 * (power_w + self._power_w) * max(0.0, t_s - self._t_s)
        self._counter_j = counter_j
        self._t_s, self._power_w = t_s, power_w
        self.energy_j = max(self.energy_j, self._done_j + counter_j - self._origin_j + self._extra_j)
        return self.energy_j


class Actuator:
    """Applies clock commands to the GPUs of one node (see the module docstring).

    Args:
        backend: the node's GPUs.
        settings: node name, controller address, dead-man time, status period, managed GPUs.
        ctx: ZeroMQ context (default: a new one, closed with the actuator).
    """

    def __init__(self, backend: ClockBackend, settings: ActuatorSettings,
                 ctx: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        self.backend = backend
        self.settings = settings
        self.node = settings.node
        count = backend.gpu_count()
        gpus = list(settings.gpus) or list(range(count))
        bad = [g for g in gpus if not 0 <= g < count]
        if bad:
            raise ValueError(f"actuator.gpus = {settings.gpus}: GPU {bad[0]} does not exist "
                             f"(the {backend.name} backend sees {count} GPUs)")
        self.gpus = gpus
        self.clocks = {g: backend.supported_sm_clocks_mhz(g) for g in gpus}
        self.locked: dict[int, int] = dict.fromkeys(gpus, 0)
        #: last failed clock write per GPU ("" after a successful one); read-back failures separately
        self.errors: dict[int, str] = dict.fromkeys(gpus, "")
        self.read_errors: dict[int, str] = dict.fromkeys(gpus, "")
        self.pending: dict[str, ClockCommand] = {}
        self.applied: dict[str, InstanceClock] = {}
        self.state = ActuatorState.RUNNING
        self.epoch = time.time_ns()
        self.commands = 0
        self.writes = 0
        self.noop_skips = 0
        self.deadman_resets = 0
        self.dropped = 0
        self.last_heard_s = time.monotonic()
        self._next_status_s = 0.0
        self._meters: dict[int, EnergyMeter] = {}
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(gpus)), thread_name_prefix="dualscale-gpu")
        self._ctx = ctx
        self._own_ctx = ctx is None
        self._sock: zmq.Socket[bytes] | None = None
        self._enc = FrameEncoder()
        self._dec = FrameDecoder((MsgType.CLOCK_COMMAND, MsgType.HEARTBEAT))

    # ---- life cycle ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to stop (safe from a signal handler: it only flips the state)."""
        self.state = ActuatorState.STOPPING

    def start(self) -> None:
        """Reset every managed GPU (clean slate and privilege check) and start the energy meters.

        Raises:
            PermissionDenied: the process may not change clocks; the message names the fix.
        """
        self._parallel(self.backend.reset_locked_sm_clock, self.gpus, raise_first=True)
        self.writes += len(self.gpus)
        now = time.monotonic()
        for g in self.gpus:
            self._meters[g] = EnergyMeter(self.backend.total_energy_j(g), now, self.backend.power_w(g))
        log.info("actuator %s: %s backend, GPUs %s, clocks %d..%d MHz, dead-man %.2f s", self.node,
                 self.backend.name, self.gpus, self.clocks[self.gpus[0]][0], self.clocks[self.gpus[0]][-1],
                 self.settings.deadman_s)

    def run(self) -> None:
        """Start, then loop until :meth:`stop`; every GPU it locked is reset on the way out."""
        with ExitStack() as stack:
            stack.callback(self._shutdown)
            self.start()
            ctx = self._ctx if self._ctx is not None else zmq.Context()
            if self._own_ctx:
                stack.callback(ctx.term)
            self._sock = make_socket(ctx, zmq.DEALER, self.settings.controller_address, bind=False,
                                     hwm=self.settings.hwm, routing_id=self.node.encode(), immediate=True)
            stack.callback(self._sock.close, 0)
            self.last_heard_s = time.monotonic()
            while self.state == ActuatorState.RUNNING:
                self.step()

    def step(self) -> None:
        """One pass of the loop (public so tests can drive it)."""
        self._drain_inputs()
        now = time.monotonic()
        self._check_deadman(now)
        self._apply()
        self._publish(now)

    def _shutdown(self) -> None:
        try:
            self.release_all()
        finally:
            self._pool.shutdown(wait=True)
            self.state = ActuatorState.STOPPED
            log.info("actuator %s: stopped, clocks reset", self.node)

    def release_all(self) -> None:
        """Reset every GPU this actuator has locked (errors are logged; every GPU is tried)."""
        locked = [g for g in self.gpus if self.locked[g]]
        self._parallel(self.backend.reset_locked_sm_clock, locked)
        self.writes += len(locked)
        for g in locked:
            if not self.errors[g]:
                self.locked[g] = 0
        self.applied.clear()

    # ---- phases --------------------------------------------------------------------------------
    def _drain_inputs(self) -> None:
        sock = self._sock
        if sock is None:
            return
        now = time.monotonic()
        wait_s = min(MAX_WAIT_S, max(0.0, self._next_status_s - now),
                     max(0.0, self.last_heard_s + self.settings.deadman_s - now) if any(self.locked.values())
                     else MAX_WAIT_S)
        if not self.pending and not sock.poll(int(wait_s * 1000) + 1):
            return
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self.handle(frame)

    def handle(self, frame: bytes) -> None:
        """Take one frame from the controller: keep a command (newest per instance), note a heartbeat."""
        try:
            mtype, msg = self._dec.decode(frame)
        except ProtocolError as e:
            self.dropped += 1
            log.debug("actuator %s: dropped a message (%s): %s", self.node, e.reason, e)
            return
        self.last_heard_s = time.monotonic()
        if mtype is MsgType.CLOCK_COMMAND:
            cmd: ClockCommand = msg
            if not cmd.gpus or any(g not in self.locked for g in cmd.gpus) or cmd.freq_mhz <= 0:
                self.dropped += 1
                log.warning("actuator %s: command for %s names GPUs %s / %d MHz: not managed here, dropped",
                            self.node, cmd.instance, cmd.gpus, cmd.freq_mhz)
                return
            self.commands += 1
            self.pending[cmd.instance] = cmd
        # a Heartbeat needs nothing beyond last_heard_s

    def _check_deadman(self, now_s: float) -> None:
        if now_s - self.last_heard_s > self.settings.deadman_s and any(self.locked.values()):
            log.warning("actuator %s: no word from the controller for %.2f s (dead-man %.2f s): resetting clocks",
                        self.node, now_s - self.last_heard_s, self.settings.deadman_s)
            self.pending.clear()
            self.release_all()
            self.deadman_resets += 1

    def clamp_mhz(self, gpu: int, freq_mhz: int) -> int:
        """The smallest supported clock of ``gpu`` at or above ``freq_mhz`` (the top one if none)."""
        clocks = self.clocks[gpu]
        i = bisect.bisect_left(clocks, freq_mhz)
        return clocks[min(i, len(clocks) - 1)]

    def _apply(self) -> None:
        if not self.pending:
            return
        writes: list[tuple[int, int]] = []
        for cmd in self.pending.values():
            applied = 0
            for g in cmd.gpus:
                target = self.clamp_mhz(g, cmd.freq_mhz)
                applied = max(applied, target)
                if self.locked[g] == target and not self.errors[g]:
                    self.noop_skips += 1
                else:
                    writes.append((g, target))
            self.applied[cmd.instance] = InstanceClock(cmd.instance, cmd.seq, cmd.freq_mhz, applied)
        self.pending.clear()
        if writes:
            done = self._parallel(lambda w: self._lock(*w), writes)
            self.writes += sum(1 for d in done if d)

    def _lock(self, gpu: int, freq_mhz: int) -> bool:
        self.backend.set_locked_sm_clock_mhz(gpu, freq_mhz)
        self.locked[gpu] = freq_mhz
        return True

    def _publish(self, now_s: float) -> None:
        if now_s < self._next_status_s:
            return
        self._next_status_s = now_s + self.settings.status_period_s
        status = self.status()
        if self._sock is not None:
            try:
                self._sock.send(self._enc.encode(MsgType.NODE_STATUS, status), zmq.NOBLOCK, copy=True)
            except zmq.Again:
                pass  # controller gone or slow: the next status supersedes this one

    def status(self) -> NodeStatus:
        """Read back every managed GPU (in parallel) and build the node's status."""
        reads = self._parallel(self._read, self.gpus, errors=self.read_errors)
        gpus = [GpuStatus(g, self.locked[g], 0, 0, 0.0, self._meters[g].energy_j if g in self._meters else 0.0,
                          self.read_errors[g]) if r is None
                else msgspec.structs.replace(r, error=self.errors[g]) if self.errors[g] else r
                for g, r in zip(self.gpus, reads)]
        return NodeStatus(self.node, self.epoch, time.monotonic_ns(), gpus,
                          list(self.applied.values()), self.commands, self.writes, self.noop_skips,
                          self.deadman_resets, self.dropped)

    def _read(self, gpu: int) -> GpuStatus:
        b = self.backend
        sm, reasons, power = b.sm_clock_mhz(gpu), b.clock_event_reasons(gpu), b.power_w(gpu)
        meter = self._meters.get(gpu)
        energy = meter.sample(b.total_energy_j(gpu), power, time.monotonic()) if meter is not None else 0.0
        return GpuStatus(gpu, self.locked[gpu], sm, reasons, power, energy)

    # ---- helpers -------------------------------------------------------------------------------
    def _parallel(self, fn: Callable[[Any], T], items: list[Any], raise_first: bool = False,
                  errors: dict[int, str] | None = None) -> list[T | None]:
        """``fn`` over ``items`` on the GPU pool; a DeviceError is recorded against its GPU in
        ``errors`` (default: the write errors) and re-raised when ``raise_first``; a success clears
        it. One item runs inline (no thread hop)."""
        record = self.errors if errors is None else errors

        def one(item: Any) -> T | None:
            gpu = item[0] if isinstance(item, tuple) else item
            try:
                out = fn(item)
            except DeviceError as e:
                if record[gpu] != str(e):
                    log.error("actuator %s: %s", self.node, e)
                record[gpu] = str(e)
                if raise_first:
                    raise
                return None
            record[gpu] = ""
            return out

        if len(items) <= 1:
            return [one(i) for i in items]
        return list(self._pool.map(one, items))
