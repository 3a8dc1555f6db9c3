"""The worker agent: embedded in a serving engine's scheduler loop, it reports every iteration.

Call :meth:`WorkerAgent.report_prefill` (prefill instances) or :meth:`WorkerAgent.report_decode`
(decode instances) once per iteration, right after scheduling it. The agent encodes the state and
writes it into a ring in shared memory: no system call, no lock shared with another process, no
thread to wake, so the engine's thread never waits; what it spends is CPU work, about 4 us per
report with warm caches (``bench/runtime.py`` measures it). A relay process beside the engine
(:mod:`dualscale.runtime.relay`, started by the first agent of the process and shared by the
others) polls the ring and forwards the reports to the controller daemon over ZeroMQ. Reporting
never raises into the engine: a report that does not fit in the ring, or that the relay cannot
hand to the controller (not connected, or not keeping up), is dropped and counted (``dropped``);
bad input is counted too (``errors``) and logged once.

The agent does not wait for an answer: the controller decides the clock for the next iteration
while this one runs and sends it to the node's actuator directly.

Create agents after the engine process has forked its workers (a forked child must not write into
its parent's ring: it gets its own relay when it creates its own agents).

Example::

    agent = WorkerAgent("tcp://controller:5600", "decode-0", "decode")
    # in the scheduler loop, after choosing the batch:
    agent.report_decode(now_s, first_token_s, tokens_out, context_tokens, kv_util=0.42,
                        iteration_s=last_step_s, freq_mhz=current_clock)
    ...
    agent.close()
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from array import array
from collections import deque
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from dualscale.errors import ConfigError
from dualscale.runtime.messages import DecodeReport, MsgType, PrefillReport
from dualscale.runtime.ring import DEFAULT_CAPACITY_BYTES, HEADER_BYTES, RingProducer, create_ring_fd
from dualscale.runtime.serial import FrameEncoder

log = logging.getLogger("dualscale.runtime.worker")

#: Seconds the first agent waits for its relay process to start (Python start-up on a busy host).
RELAY_START_TIMEOUT_S = 30.0
#: Seconds a closing relay gets to forward what is left before it is killed.
RELAY_STOP_TIMEOUT_S = 2.0
#: Seconds between checks (one ``waitpid``, from a report) that the relay process is alive.
RELAY_CHECK_S = 0.25

_SRC = str(Path(__file__).resolve().parents[2])
_F8 = np.dtype("<f8")
_I8 = np.dtype("<i8")


# An array.array of C doubles / long longs on a little-endian host already holds the wire format:
# its buffer is sent as it is (an engine hook builds one from its requests without NumPy).
_NATIVE_OK = sys.byteorder == "little"


def _f64(x: ArrayLike) -> bytes | memoryview:
    if _NATIVE_OK and type(x) is array and x.typecode == "d":
        return memoryview(x)
    return np.ascontiguousarray(x, dtype=_F8).tobytes()


def _i64(x: ArrayLike) -> bytes | memoryview:
    if _NATIVE_OK and type(x) is array and x.typecode == "q" and x.itemsize == 8:
        return memoryview(x)
    return np.ascontiguousarray(x, dtype=_I8).tobytes()


class _Relay:
    """A relay process and the ring it drains, shared by this process's agents for one address.

    The ring belongs to this process: a relay that died is replaced by a new process on the same
    ring, which carries on from where the last one stopped (its position and counters are in the
    ring).
    """

    def __init__(self, address: str, capacity_bytes: int, keys_dir: str = "", key_name: str = "") -> None:
        self.address = address
        self.keys_dir, self.key_name = keys_dir, key_name
        self.ring = RingProducer(create_ring_fd(capacity_bytes))
        try:
            self.proc = self._spawn()
        except BaseException:
            self.ring.close()
            raise
        self.tags: deque[int] = deque(range(self.ring.tags))  # free places: one per open agent
        self._respawning = threading.Lock()
        self.next_check_s = 0.0  # when an agent whose report was refused may next check on the relay

    def _spawn(self) -> subprocess.Popen[bytes]:
        """Start a relay process on the ring; raises ConfigError with its reason when it does not start."""
        fd = self.ring.fd
        status_r, status_w = os.pipe()
        # the child must import this very package, wherever this process imported it from
        boot = (f"import sys\nif {_SRC!r} not in sys.path: sys.path.insert(0, {_SRC!r})\n"
                "from dualscale.runtime.relay import main\nsys.exit(main(sys.argv[1:]))")
        proc = None
        try:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-c", boot, "--fd", str(fd), "--address", self.address,
                     "--parent-pid", str(os.getpid()), "--status-fd", str(status_w),
                     "--keys-dir", self.keys_dir, "--key-name", self.key_name],
                    pass_fds=(fd, status_w), stdin=subprocess.DEVNULL)
            finally:
                os.close(status_w)
            status = _read_status(status_r, proc)
        except BaseException:
            if proc is not None:
                proc.kill()
                proc.wait()
            raise
        finally:
            os.close(status_r)
        if status != "ok":
            proc.kill()
            proc.wait()
            raise ConfigError(f"{self.address}: the report relay did not start: {status}")
        return proc

    @property
    def users(self) -> int:
        """Agents using this relay."""
        return self.ring.tags - len(self.tags)

    def revive(self) -> None:
        """If the relay process died, start another on the same ring (call under ``_relays_lock``)."""
        if self.ring.closed or self.proc.poll() is None:
            return  # stopped on purpose, or alive
        log.warning("report relay for %s exited with code %s; starting another on the same ring",
                    self.address, self.proc.returncode)
        self.proc = self._spawn()

    def check_soon(self) -> None:
        """Called by reports at most every ``RELAY_CHECK_S``: if the relay died, start another in the
        background (the engine's thread does not wait for it; reports wait in the ring meanwhile)."""
        self.next_check_s = time.monotonic() + RELAY_CHECK_S
        if self.proc.poll() is None or not self._respawning.acquire(blocking=False):
            return
        threading.Thread(target=self._respawn, name="dualscale-relay-respawn", daemon=True).start()

    def _respawn(self) -> None:
        try:
            with _relays_lock:
                self.revive()
        except Exception as e:
            log.error("report relay for %s: could not restart it (%s); reports are dropped and counted",
                      self.address, e)
        finally:
            self._respawning.release()

    def stop(self) -> None:
        """Let the relay forward what is left, then end it."""
        self.ring.close_consumer()
        try:
            self.proc.wait(RELAY_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.ring.close()


def _read_status(fd: int, proc: subprocess.Popen[bytes]) -> str:
    """The relay's one-line start-up status ("ok" or why not)."""
    poller = select.poll()  # not select.select: an engine may hold more than 1024 descriptors
    poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + RELAY_START_TIMEOUT_S
    text = b""
    while b"\n" not in text:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"no answer within {RELAY_START_TIMEOUT_S:.0f} s"
        if poller.poll(left * 1000):
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            text += chunk
    line = text.split(b"\n", 1)[0].decode(errors="replace")
    return line or f"the relay exited with code {proc.wait()} (see its standard error)"


# One relay per (process, controller address, key); keyed by pid so a forked child never shares its parent's.
_relays: dict[tuple[int, str, str, str], _Relay] = {}
_relays_lock = threading.Lock()


def _acquire(address: str, keys_dir: str = "", key_name: str = "") -> tuple[_Relay, int]:
    with _relays_lock:
        key = (os.getpid(), address, keys_dir, key_name)
        relay = _relays.get(key)
        if relay is None:
            if not keys_dir:
                log.warning("worker agents: reports go to %s over plain ZeroMQ (no keys_dir): NOT authenticated, "
                            "NOT encrypted", address)
            relay = _relays[key] = _Relay(address, DEFAULT_CAPACITY_BYTES, keys_dir, key_name)
        else:
            relay.revive()
        if not relay.tags:
            raise ValueError(f"{address}: more than {relay.ring.tags} worker agents open at once in one process")
        return relay, relay.tags.popleft()


def _release(relay: _Relay, tag: int) -> None:
    with _relays_lock:
        relay.tags.append(tag)  # reused last: its reports still in the ring are counted before that
        if relay.users == 0:
            key = (os.getpid(), relay.address, relay.keys_dir, relay.key_name)
            if _relays.get(key) is relay:
                del _relays[key]
            relay.stop()


# Open agents, so that exit and fork can detach them from their rings.
_agents: weakref.WeakSet[WorkerAgent] = weakref.WeakSet()


@atexit.register
def _stop_relays() -> None:
    for agent in list(_agents):
        agent._detach()  # later reports (from threads still running) are counted as dropped
    with _relays_lock:
        mine = [k for k in _relays if k[0] == os.getpid()]
        for k in mine:
            _relays.pop(k).stop()


def _after_fork_in_child() -> None:
    # the parent's rings have one producer, the parent: a forked child's reports are dropped and
    # counted; agents the child creates get the child's own relay
    global _relays_lock
    _relays_lock = threading.Lock()  # another thread may have held it at the fork
    for agent in list(_agents):
        agent._detach()  # and never releases its place: that would stop the parent's relay
    _relays.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


class WorkerAgent:
    """Reports one instance's iterations to the controller daemon.

    Args:
        address: the daemon's ``report_address`` (e.g. ``tcp://10.0.0.1:5600``).
        instance: this instance's name in the runtime config.
        phase: ``"prefill"`` or ``"decode"``.
        keys_dir: CURVE key directory holding ``engine-<instance>.key_secret`` and ``controller.key``
            (the config's ``[security] keys_dir``); ``None`` = plain ZeroMQ (warned about once).

    Raises:
        ValueError: bad ``phase`` or ``instance``, or more than 1,024 agents open at once in one
            process for one address.
        ConfigError: the relay could not start (e.g. a malformed address); the first agent of a
            process for an address waits for its relay (a fraction of a second).

    Counters (reports of this agent; the relay updates ``sent`` and part of ``dropped`` as it
    forwards, so they trail the reports by up to a poll):
        sent: reports handed to the controller's socket.
        dropped: reports dropped: the ring was full or the agent closed, or the relay found the
            controller not connected or not keeping up.
        pending: reports in the ring, not yet forwarded or dropped.
        errors: reports that failed: bad input, or an unexpected error (logged once).
    """

    def __init__(self, address: str, instance: str, phase: Literal["prefill", "decode"], *,
                 keys_dir: str | Path | None = None) -> None:
        if phase not in ("prefill", "decode"):
            raise ValueError(f"phase = {phase!r}: must be 'prefill' or 'decode'")
        if not instance:
            raise ValueError("instance: must be a non-empty name")
        self.instance = instance
        self.phase = phase
        self.address = address
        self.epoch = time.monotonic_ns()  # monotonic: a stepped wall clock cannot reorder incarnations
        self.seq = 0
        self.errors = 0
        self._queued = 0  # written into the ring
        self._refused = 0  # not written: ring full, or closed
        self._warned = False
        self._enc = FrameEncoder(reserve=HEADER_BYTES)
        # with keys, one relay per instance (its connection carries the instance's key); without, one per address
        self._relay, self._tag = (_acquire(address, str(keys_dir), f"engine-{instance}") if keys_dir is not None
                                  else _acquire(address))
        self._ring: RingProducer | None = self._relay.ring
        self._base = self._relay.ring.counters(self._tag)
        self._final: tuple[int, int] | None = None  # this agent's counts once closed (its tag may be reused)
        # an agent dropped without close() still gives its place back
        self._finalizer = weakref.finalize(self, _release, self._relay, self._tag)
        _agents.add(self)

    def _relay_counts(self) -> tuple[int, int]:
        if self._final is not None:
            return self._final
        s, d = self._relay.ring.counters(self._tag)
        return s - self._base[0], d - self._base[1]

    @property
    def sent(self) -> int:
        return self._relay_counts()[0]

    @property
    def dropped(self) -> int:
        return self._refused + self._relay_counts()[1]

    @property
    def pending(self) -> int:
        return self._queued - sum(self._relay_counts())

    def report_prefill(self, now_s: float, arrival_s: ArrayLike, prompt_tokens: ArrayLike,
                       prefilled_tokens: ArrayLike, *, kv_util: float = 0.0, iteration_s: float = 0.0,
                       freq_mhz: int = 0) -> bool:
        """Report the prefill waiting queue (FCFS). Returns True when queued for the controller.

        Args:
            now_s: engine clock now (s), the clock of ``arrival_s``.
            arrival_s: arrival time of each waiting request (s), non-decreasing.
            prompt_tokens: prompt length of each waiting request.
            prefilled_tokens: tokens of each request already prefilled by earlier chunks.
            kv_util: KV-cache use in [0, 1].
            iteration_s: measured time of the previous iteration (s), 0 if unknown.
            freq_mhz: SM clock in use (MHz), 0 if unknown.
        """
        return self._report(MsgType.PREFILL_REPORT, PrefillReport, now_s, arrival_s, prompt_tokens, prefilled_tokens,
                            kv_util, iteration_s, freq_mhz)

    def report_decode(self, now_s: float, first_token_s: ArrayLike, tokens_out: ArrayLike,
                      context_tokens: ArrayLike, *, kv_util: float = 0.0, iteration_s: float = 0.0,
                      freq_mhz: int = 0) -> bool:
        """Report the running decode batch. Returns True when queued for the controller.

        Args:
            now_s: engine clock now (s), the clock of ``first_token_s``.
            first_token_s: when each running request emitted its first token (s).
            tokens_out: output tokens so far per request, the first included (>= 1).
            context_tokens: tokens in each request's KV cache.
            kv_util, iteration_s, freq_mhz: as in :meth:`report_prefill`.
        """
        return self._report(MsgType.DECODE_REPORT, DecodeReport, now_s, first_token_s, tokens_out, context_tokens,
                            kv_util, iteration_s, freq_mhz)

    def _report(self, mtype: MsgType, cls: type[PrefillReport] | type[DecodeReport], now_s: float,
                times_s: ArrayLike, tokens_a: ArrayLike, tokens_b: ArrayLike, kv_util: float, iteration_s: float,
                freq_mhz: int) -> bool:
        try:
            self.seq += 1
            msg = cls(self.instance, self.epoch, self.seq, time.monotonic_ns(), float(now_s), float(kv_util),
                      float(iteration_s), int(freq_mhz), _f64(times_s), _i64(tokens_a), _i64(tokens_b))
            record = self._enc.encode(mtype, msg)
            ring = self._ring
            relay = self._relay
            if ring is not None and time.monotonic() >= relay.next_check_s:
                relay.check_soon()  # is the relay still there? (a dead one is replaced within a second)
            if ring is not None and ring.push(record, self._tag):
                self._queued += 1
                return True
            self._refused += 1
            if ring is not None:
                relay.check_soon()  # the ring is full: is the relay still there?
            return False
        except Exception as e:  # never raise into the engine
            if self._ring is None:  # closed by another thread meanwhile
                self._refused += 1
                return False
            return self._error(e)

    def _error(self, e: Exception) -> bool:
        self.errors += 1
        if not self._warned:
            self._warned = True
            log.warning("worker agent %s: report failed (%s: %s); further failures are only counted",
                        self.instance, type(e).__name__, e)
        return False

    def close(self) -> None:
        """Stop reporting. Waits (up to a couple of seconds) until the relay has forwarded this
        agent's reports, so the counters are final; the last agent of the process for its address
        stops the relay."""
        if self._ring is None:
            return
        self._ring = None
        relay = self._relay
        if relay.users > 1:  # the relay goes on: wait for it to account for this agent's reports
            deadline = time.monotonic() + RELAY_STOP_TIMEOUT_S
            while self.pending > 0 and relay.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.001)
        self._finalizer()  # gives the place back; the last one stops the relay after it drained
        self._final = self._relay_counts()

    def _detach(self) -> None:
        """Stop reporting without touching the relay (at exit, and in a forked child)."""
        self._ring = None
        self._finalizer.detach()
        self._final = self._relay_counts()

    def __enter__(self) -> WorkerAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
