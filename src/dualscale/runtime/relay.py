"""The report relay: a small process beside a serving engine that forwards its reports to the controller.

Worker agents write reports into a shared-memory ring (:mod:`dualscale.runtime.ring`), which costs the
engine's thread a copy and no system call; this process polls the ring and sends each frame to the
controller daemon's PULL socket. It is started by the first :class:`~dualscale.runtime.WorkerAgent` of
an engine process for a controller address, shared by the agents that follow, and stopped when the
last one closes (or when the engine process is gone). Nobody runs it by hand.

Polling costs up to ``poll_s`` (50 us) of latency per report and a little CPU; it is what keeps
wake-ups, which cost tens of microseconds on a loaded host, out of the engine. After a second
without reports the relay polls every millisecond instead (an idle relay then costs ~0.5 % of a core
instead of ~7 %), so the first report after a quiet spell may wait up to 1 ms. The controller being away is handled as before: frames it cannot take right now are dropped
and counted per agent in the ring's counters, which the agents read.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import zmq

from dualscale.runtime.keys import Security
from dualscale.runtime.ring import RingConsumer
from dualscale.runtime.transport import EVENTS, NOBLOCK, POLLOUT, make_socket

#: Seconds between polls of an empty ring: bounds the latency the relay adds.
DEFAULT_POLL_S = 50e-6
#: After this many seconds without a report, poll every IDLE_POLL_S instead.
IDLE_AFTER_S = 1.0
IDLE_POLL_S = 1e-3
#: Reports queued for the controller at most (all agents of the engine process together): a report
#: older than a few iterations is worthless, and the controller decides on each instance's newest.
DEFAULT_HWM = 256
#: Seconds a record may stay incomplete (published but not whole) before the backlog is discarded:
#: a store becomes visible in nanoseconds, so this only happens after a bug or outside interference,
#: and without it the ring would stay blocked (every later report dropped) for good.
STUCK_S = 1.0
#: Seconds between checks that the engine process is still there.
PARENT_CHECK_S = 0.2


def relay(ring: RingConsumer, sock: zmq.Socket[bytes], parent_pid: int, poll_s: float = DEFAULT_POLL_S) -> None:
    """Forward until the producer asks to close (after draining) or the parent process is gone."""
    checked = last_item = time.monotonic()
    stuck_since: float | None = None
    while True:
        items = ring.drain(256)
        for tag, frame in items:
            # not writable: no controller connected (IMMEDIATE) or its queue is full
            if sock.getsockopt(EVENTS) & POLLOUT:
                try:
                    sock.send(frame, NOBLOCK, copy=False)
                    ring.count(tag, 1, 0)
                    continue
                except zmq.Again:
                    pass
            ring.count(tag, 0, 1)
        now = time.monotonic()
        if items:
            last_item = now
            stuck_since = None
            continue
        if ring.closing:
            return
        if ring.backlog_bytes:  # published, yet nothing whole to read
            stuck_since = stuck_since or now
            if now - stuck_since > STUCK_S:
                tag = ring.discard_stuck()
                if tag is not None:
                    ring.count(tag, 0, 1)
                print(f"dualscale relay: a report in the ring stayed incomplete for {STUCK_S:g} s; skipped "
                      f"{'it' if tag is not None else 'everything queued (its header is unreadable)'}",
                      file=sys.stderr)
                stuck_since = None
        else:
            stuck_since = None
        if now - checked > PARENT_CHECK_S:
            checked = now
            if os.getppid() != parent_pid:
                return
        time.sleep(poll_s if now - last_item < IDLE_AFTER_S else max(poll_s, IDLE_POLL_S))


def _status(fd: int, text: str) -> None:
    with os.fdopen(fd, "w") as f:
        # one line: the engine stops reading at the newline (a process forked meanwhile may hold
        # the pipe open, so end of file could come much later)
        f.write(" ".join(text.split()) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dualscale.runtime.relay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fd", type=int, required=True, help="the ring's file descriptor (inherited)")
    p.add_argument("--address", required=True, help="the controller's report address")
    p.add_argument("--parent-pid", type=int, required=True, help="exit when this process is gone")
    p.add_argument("--status-fd", type=int, required=True, help="write 'ok' or the start-up error here, then close it")
    p.add_argument("--keys-dir", default="", help="CURVE key directory ('' = plain ZeroMQ)")
    p.add_argument("--key-name", default="", help="this engine's key name (engine-<instance>)")
    args = p.parse_args(argv)
    # Ctrl-C in a terminal reaches the whole process group: the engine decides when the relay stops
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # a batch task never preempts the task it wakes beside (the engine's thread, on a busy core)
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or a sandbox that refuses: run as a normal task
        pass
    try:
        ring = RingConsumer(args.fd)
        sec = Security("curve", args.keys_dir, args.key_name) if args.keys_dir else None
        ctx = zmq.Context(io_threads=1)
        sock = make_socket(ctx, zmq.PUSH, args.address, bind=False, hwm=DEFAULT_HWM, immediate=True,
                           secure=sec.client if sec is not None else None)
    except Exception as e:
        _status(args.status_fd, f"{type(e).__name__}: {e}")
        return 1
    _status(args.status_fd, "ok")
    try:
        relay(ring, sock, args.parent_pid)
    finally:
        sock.close(linger=0)
        ctx.term()
        ring.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
