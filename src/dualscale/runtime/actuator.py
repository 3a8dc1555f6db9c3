"""The node actuator (``dualscale actuator``): the only privileged process, one per GPU node.

It connects to the controller daemon (DEALER, routing id = node name), receives clock commands and
heartbeats, and applies locked SM clocks. Its loop, with named phases::

    _drain_inputs   wait (bounded) for messages; keep the newest command per instance (latest wins)
    _check_deadman  no command or heartbeat for ``deadman_s`` -> reset every GPU it locked
    _apply          lock the GPUs of every pending command, all GPUs in parallel (thread pool),
                    rounding up to a supported clock and skipping GPUs already at that clock
    _publish        every ``status_period_s``: read back clock reached, clock-event reasons, power
                    and the energy counter of every managed GPU (in parallel) and send NodeStatus

Guarantees: at start every managed GPU is reset before anything else is asked of the devices (a
previous actuator may have died with GPUs locked; also the privilege check: without root the first
NVML write fails and the actuator exits naming the fix); a reset that fails is retried, and if a GPU
still refuses the actuator exits non-zero naming it. On exit, SIGTERM/SIGINT (the handlers only flip
the state) and any error, a ``finally`` resets every GPU it locked, with the same retries; the exit
code says whether every reset succeeded. A SIGKILL cannot be caught: the next start resets (and the
systemd unit's ``ExecStopPost`` does). Device errors while running are reported in the status and
retried with the next command, never fatal.

Every device call runs on its GPU's own thread and is waited for at most ``CALL_TIMEOUT_S``: a hung
NVML call marks that GPU failed but stalls neither the loop, the dead-man switch, nor SIGTERM (the
thread is a daemon thread and does not hold up the exit).

One actuator per node: :func:`lock_node` takes an exclusive ``flock`` on the node's lock file before
any GPU is touched (the CLI does, before even opening the backend), so a second actuator started by
mistake exits naming the holder instead of resetting the GPUs the first one has locked. The kernel
releases the lock whenever its holder dies, so a SIGKILL never leaves a stale lock behind.

Trust: commands come only over the CURVE connection to the controller's pinned key; each must fit
the node policy (:class:`~dualscale.runtime.config.NodePolicy`: a known instance, exactly its GPUs,
a clock within its bounds), otherwise it is refused and counted by reason; warnings about refused or
malformed messages are rate-limited.
"""

from __future__ import annotations

import bisect
import fcntl
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import ExitStack
from enum import IntEnum
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import zmq

from dualscale.device.base import ClockBackend
from dualscale.errors import DeviceError, DualscaleError, PermissionDenied, ProtocolError
from dualscale.runtime.config import ActuatorSettings, NodePolicy
from dualscale.runtime.keys import Security
from dualscale.runtime.messages import ClockCommand, GpuStatus, InstanceClock, MsgType, NodeStatus
from dualscale.runtime.ratelog import RateLimitedLog
from dualscale.runtime.serial import FrameDecoder, FrameEncoder
from dualscale.runtime.transport import make_socket
from dualscale.runtime.trust import open_trusted

log = logging.getLogger("dualscale.runtime.actuator")
T = TypeVar("T")

#: Longest single wait of the loop (s), so a stop request is seen promptly.
MAX_WAIT_S = 0.05
#: Longest wait for one device call (s); a call still running then counts as failed.
CALL_TIMEOUT_S = 1.0
#: Attempts of a reset that fails (at start and at exit), RESET_RETRY_S apart.
RESET_ATTEMPTS = 3
RESET_RETRY_S = 0.2
#: Largest frame taken from the controller (bytes): a command names at most MAX_GPUS GPUs.
MAX_FRAME_BYTES = 64 << 10
#: While the controller is silent, retry resets that failed this often (s).
DEADMAN_RETRY_S = 1.0
#: Reasons a command is refused (the node policy), counted in ``refused``.
REFUSALS = ("instance", "gpus", "clock")
#: Exit status of an actuator that found its node's lock held by another (EX_TEMPFAIL: try again later).
EXIT_NODE_LOCKED = 75


class NodeLocked(DualscaleError):
    """Another actuator holds this node's lock; nothing was touched."""


def lock_node(path: str | Path, node: str) -> int:
    """Take the node's actuator lock: an exclusive, non-blocking ``flock`` on ``path``, with this
    process's pid written in the file for the next one's message. Returns the descriptor: the lock is
    held until it is closed or the process ends (however it ends: the kernel releases it).

    The file is checked like every file the actuator reads (no symlink, owned by root or this user,
    no directory above writable by others) and must be unreadable by others too (mode 0600): anyone
    who can open it can hold the lock and keep the actuator from starting.

    Raises:
        NodeLocked: another process holds the lock (the message names the file and its pid).
        ConfigError: the file or a directory above it fails the checks, or cannot be created.
    """
    p = Path(path)
    p.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd = open_trusted(p, "actuator lock", flags=os.O_RDWR | os.O_CREAT, mode=0o600, secret=True)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise NodeLocked(f"actuator {node}: another actuator (pid {holder or 'unknown'}) holds the node lock {p}: "
                         "this one exits without touching any GPU (one actuator per node: stop the other first; "
                         "actuators of disjoint GPUs of one host need a lock_file each)") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class _GpuThreads:
    """One daemon thread per GPU running its device calls in order; callers wait with a timeout.

    A call that hangs holds up only its own GPU's later calls (NVML serialises a device's calls
    anyway), and never the caller beyond the timeout, nor the process's exit.
    """

    def __init__(self, gpus: list[int]) -> None:
        self._q: dict[int, queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None]] = {}
        for g in gpus:
            q: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
            self._q[g] = q
            threading.Thread(target=self._serve, args=(q,), name=f"dualscale-gpu{g}", daemon=True).start()

    @staticmethod
    def _serve(q: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None]) -> None:
        while (job := q.get()) is not None:
            fn, fut = job
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - handed to the waiting caller, not swallowed
                    fut.set_exception(e)

    def submit(self, gpu: int, fn: Callable[[], T]) -> Future[T]:
        fut: Future[T] = Future()
        self._q[gpu].put((fn, fut))
        return fut

    def close(self) -> None:
        for q in self._q.values():
            q.put(None)


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
        policy: the instances this node serves, their GPUs and clock bounds.
        security: CURVE identity (needed by :meth:`run`).
        ctx: ZeroMQ context (default: a new one, closed with the actuator).
        call_timeout_s: longest wait for one device call (s).
    """

    def __init__(self, backend: ClockBackend, settings: ActuatorSettings, policy: NodePolicy,
                 security: Security | None = None, ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
                 call_timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.backend = backend
        self.settings = settings
        self.node = settings.node
        self.policy = {p.name: p for p in policy.instances}
        count = backend.gpu_count()
        gpus = list(settings.gpus) or list(range(count))
        bad = [g for g in gpus if not 0 <= g < count]
        if bad:
            raise ValueError(f"actuator.gpus = {settings.gpus}: GPU {bad[0]} does not exist "
                             f"(the {backend.name} backend sees {count} GPUs)")
        outside = [(p.name, g) for p in policy.instances for g in p.gpus if g not in gpus]
        if outside:
            raise ValueError(f"node policy: instance {outside[0][0]!r} uses GPU {outside[0][1]}, which this "
                             f"actuator does not manage (GPUs {gpus})")
        self.gpus = gpus
        self.call_timeout_s = call_timeout_s
        self.clocks: dict[int, tuple[int, ...]] = {}
        self.locked: dict[int, int] = dict.fromkeys(gpus, 0)
        #: last failed clock write per GPU ("" after a successful one); read-back failures separately
        self.errors: dict[int, str] = dict.fromkeys(gpus, "")
        self.read_errors: dict[int, str] = dict.fromkeys(gpus, "")
        #: GPUs whose reset failed and is still owed (retried while the controller is silent, and at exit)
        self.unreset: set[int] = set()
        self.pending: dict[str, ClockCommand] = {}
        self.applied: dict[str, InstanceClock] = {}
        self.state = ActuatorState.RUNNING
        self.epoch = time.monotonic_ns()
        self.commands = 0
        self.writes = 0
        self.noop_skips = 0
        self.deadman_resets = 0
        self.dropped = 0
        self.refused: dict[str, int] = dict.fromkeys(REFUSALS, 0)
        #: 0 while every GPU this actuator touched is reset or locked as asked; 1 once a final reset failed
        self.exit_code = 0
        self.last_heard_s = time.monotonic()
        self._deadman_fired = False
        self._next_deadman_retry_s = 0.0
        self._next_status_s = 0.0
        self._meters: dict[int, EnergyMeter] = {}
        self._threads = _GpuThreads(gpus)
        self._warn = RateLimitedLog(log)
        self.security = security
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
        """Reset every managed GPU first (a previous actuator may have died with GPUs locked), then
        read their clocks and start the energy meters.

        Raises:
            PermissionDenied: the process may not change clocks; the message names the fix.
            DeviceError: a GPU still refused its reset after the retries (every other GPU is reset),
                or its clocks cannot be read.
        """
        if self.settings.observe:  # shadow mode: the clocks are left as they are, no privilege needed
            failed: set[int] = set()
            log.warning("actuator %s: OBSERVE mode: clocks are read and reported, never locked or reset", self.node)
        else:
            failed = self._reset(self.gpus, raise_permission=True)
        if failed:
            raise DeviceError(f"actuator {self.node}: GPUs {sorted(failed)} could not be reset at start "
                              f"({'; '.join(self.errors[g] for g in sorted(failed))})")
        clocks = self._parallel(self.backend.supported_sm_clocks_mhz, self.gpus, raise_first=True)
        self.clocks = {g: c for g, c in zip(self.gpus, clocks) if c is not None}
        now = time.monotonic()
        for g in self.gpus:
            self._meters[g] = EnergyMeter(self.backend.total_energy_j(g), now, self.backend.power_w(g))
        log.info("actuator %s: %s backend, GPUs %s, clocks %d..%d MHz, dead-man %.2f s, %d instances in the policy",
                 self.node, self.backend.name, self.gpus, self.clocks[self.gpus[0]][0],
                 self.clocks[self.gpus[0]][-1], self.settings.deadman_s, len(self.policy))

    def run(self) -> None:
        """Start, then loop until :meth:`stop`; every GPU it locked is reset on the way out (see
        :attr:`exit_code`)."""
        if self.security is None:
            raise ValueError("Actuator.run needs a Security (Security('none', ...) for plain ZeroMQ)")
        with ExitStack() as stack:
            stack.callback(self.close)
            if not self.clocks:  # not started by the caller
                self.start()
            ctx = self._ctx if self._ctx is not None else zmq.Context()
            if self._own_ctx:
                stack.callback(ctx.term)
            # no routing id of our choosing: the controller routes by the node our key names
            self._sock = make_socket(ctx, zmq.DEALER, self.settings.controller_address, bind=False,
                                     hwm=self.settings.hwm, immediate=True, secure=self.security.client,
                                     max_bytes=MAX_FRAME_BYTES)
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

    def close(self) -> None:
        """Reset every GPU locked or owed a reset (with retries) and stop the GPU threads; sets
        :attr:`exit_code` to 1 when a GPU stays locked."""
        if self.state is ActuatorState.STOPPED:
            return
        try:
            failed = self._reset([g for g in self.gpus if self.locked[g] or g in self.unreset])
            if failed:
                self.exit_code = 1
                log.error("actuator %s: GPUs %s are still LOCKED: their reset failed %d times (%s)", self.node,
                          sorted(failed), RESET_ATTEMPTS, "; ".join(self.errors[g] for g in sorted(failed)))
        finally:
            self._threads.close()
            self.state = ActuatorState.STOPPED
            log.info("actuator %s: stopped, %s", self.node,
                     "clocks reset" if self.exit_code == 0 else "NOT every clock could be reset")

    def _reset(self, gpus: list[int], raise_permission: bool = False) -> set[int]:
        """Reset ``gpus`` (in parallel), retrying failures; returns those that still failed."""
        todo = list(gpus)
        for attempt in range(RESET_ATTEMPTS):
            if not todo:
                break
            if attempt:
                time.sleep(RESET_RETRY_S)
            done = self._parallel(self._reset_one, todo, raise_permission=raise_permission)
            todo = [g for g, ok in zip(todo, done) if not ok]
        self.unreset = set(todo)
        return set(todo)

    def _reset_one(self, gpu: int) -> bool:
        self.backend.reset_locked_sm_clock(gpu)
        self.writes += 1
        self.locked[gpu] = 0
        return True

    def release_all(self) -> None:
        """Reset every GPU this actuator has locked, or whose reset is owed (errors are logged once per
        GPU; every GPU is tried)."""
        self.unreset |= {g for g in self.gpus if self.locked[g]}
        done = self._parallel(self._reset_one, sorted(self.unreset))
        self.unreset = {g for g, ok in zip(sorted(self.unreset), done) if not ok}
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
            self._warn(logging.WARNING, e.reason, "actuator %s: dropped a message (%s): %.200s", self.node, e.reason, e.args[-1])
            return
        self.last_heard_s = time.monotonic()
        self._deadman_fired = False
        if mtype is MsgType.CLOCK_COMMAND:
            cmd: ClockCommand = msg
            why = self._refusal(cmd)
            if why:
                self.refused[why] += 1
                self._warn(logging.WARNING, why, "actuator %s: refused a command for %.64r (%s outside the node "
                           "policy)", self.node, cmd.instance, why)
                return
            self.commands += 1
            self.pending[cmd.instance] = cmd
        # a Heartbeat needs nothing beyond last_heard_s

    def _refusal(self, cmd: ClockCommand) -> str:
        """Why the node policy refuses ``cmd`` ("instance", "gpus", "clock"), "" when it allows it."""
        p = self.policy.get(cmd.instance)
        if p is None:
            return "instance"
        if sorted(set(cmd.gpus)) != sorted(p.gpus):
            return "gpus"
        if cmd.freq_mhz <= 0 or cmd.freq_mhz < p.min_mhz or (p.max_mhz and cmd.freq_mhz > p.max_mhz):
            return "clock"
        return ""

    def _check_deadman(self, now_s: float) -> None:
        if now_s - self.last_heard_s <= self.settings.deadman_s:
            return
        if not self._deadman_fired and any(self.locked.values()):
            self._deadman_fired = True
            log.warning("actuator %s: no word from the controller for %.2f s (dead-man %.2f s): resetting clocks",
                        self.node, now_s - self.last_heard_s, self.settings.deadman_s)
            self.pending.clear()
            self.release_all()
            self.deadman_resets += 1
            self._next_deadman_retry_s = now_s + DEADMAN_RETRY_S
        elif self.unreset and now_s >= self._next_deadman_retry_s:  # a reset that failed: keep trying, quietly
            self._next_deadman_retry_s = now_s + DEADMAN_RETRY_S
            self.release_all()

    def clamp_mhz(self, gpu: int, freq_mhz: int) -> int:
        """The smallest supported clock of ``gpu`` at or above ``freq_mhz`` (the top one if none)."""
        clocks = self.clocks[gpu]
        i = bisect.bisect_left(clocks, freq_mhz)
        return clocks[min(i, len(clocks) - 1)]

    def _apply(self) -> None:
        if not self.pending:
            return
        if self.settings.observe:  # shadow mode: what would have been applied is reported, nothing is written
            for cmd in self.pending.values():
                self.applied[cmd.instance] = InstanceClock(cmd.instance, cmd.seq, cmd.freq_mhz, 0)
            self.pending.clear()
            return
        writes: list[tuple[int, int]] = []
        for cmd in self.pending.values():
            applied = 0
            for g in sorted(set(cmd.gpus)):
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
        self.unreset.discard(gpu)
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
                          self.deadman_resets, self.dropped, sum(self.refused.values()))

    def _read(self, gpu: int) -> GpuStatus:
        b = self.backend
        sm, reasons, power = b.sm_clock_mhz(gpu), b.clock_event_reasons(gpu), b.power_w(gpu)
        counter = b.total_energy_j(gpu)
        if not (math.isfinite(power) and math.isfinite(counter)):
            raise DeviceError(f"GPU {gpu}: power {power} W or energy counter {counter} J is not finite")
        meter = self._meters.get(gpu)
        energy = meter.sample(counter, power, time.monotonic()) if meter is not None else 0.0
        return GpuStatus(gpu, self.locked[gpu], sm, reasons, power, energy, "", counter, b.energy_counter_id(gpu))

    # ---- helpers -------------------------------------------------------------------------------
    def _parallel(self, fn: Callable[[Any], T], items: list[Any], raise_first: bool = False,
                  errors: dict[int, str] | None = None, raise_permission: bool = False) -> list[T | None]:
        """``fn`` over ``items``, each on its GPU's thread, waiting at most ``call_timeout_s`` in all.

        A DeviceError or a timeout is recorded against its GPU in ``errors`` (default: the write
        errors) and logged when it differs from the GPU's last one; the item's result is None. It is
        re-raised when ``raise_first`` (a PermissionDenied also when ``raise_permission``). A success
        clears the GPU's error."""
        record = self.errors if errors is None else errors
        futs = [(item, self._threads.submit(item[0] if isinstance(item, tuple) else item,
                                            lambda item=item: fn(item))) for item in items]
        deadline = time.monotonic() + self.call_timeout_s
        out: list[T | None] = []
        first: BaseException | None = None
        for item, fut in futs:
            gpu = item[0] if isinstance(item, tuple) else item
            try:
                res = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except (DeviceError, FutureTimeout) as e:
                if isinstance(e, FutureTimeout):
                    fut.cancel()
                    e = DeviceError(f"GPU {gpu}: device call {getattr(fn, '__name__', 'call')} did not return "
                                    f"within {self.call_timeout_s:g} s")
                if record[gpu] != str(e):
                    log.error("actuator %s: %s", self.node, e)
                record[gpu] = str(e)
                if first is None and (raise_first or (raise_permission and isinstance(e, PermissionDenied))):
                    first = e
                out.append(None)
                continue
            record[gpu] = ""
            out.append(res)
        if first is not None:
            raise first
        return out
