"""The worker agent: embedded in a serving engine's scheduler loop, it reports every iteration.

Call :meth:`WorkerAgent.report_prefill` (prefill instances) or :meth:`WorkerAgent.report_decode`
(decode instances) once per iteration, right after scheduling it. The agent encodes the state and
hands it to a ZeroMQ PUSH socket without waiting: it never blocks the engine beyond the encode and
an enqueue (a few microseconds), and it never raises into the engine. When the controller is not
connected or its queue is full, the report is dropped and counted (``dropped``); an unexpected
error is counted too (``errors``) and logged once.

The agent does not wait for an answer: the controller decides the clock for the next iteration
while this one runs and sends it to the node's actuator directly.

Example::

    agent = WorkerAgent("tcp://controller:5600", "decode-0", "decode")
    # in the scheduler loop, after choosing the batch:
    agent.report_decode(now_s, first_token_s, tokens_out, context_tokens, kv_util=0.42,
                        iteration_s=last_step_s, freq_mhz=current_clock)
    ...
    agent.close()
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import numpy as np
import zmq
from numpy.typing import ArrayLike

from dualscale.runtime.messages import DecodeReport, MsgType, PrefillReport
from dualscale.runtime.serial import FrameEncoder
from dualscale.runtime.transport import EVENTS, NOBLOCK, POLLOUT, make_socket

log = logging.getLogger("dualscale.runtime.worker")

#: Reports queued per agent at most: a report older than a few iterations is worthless.
WORKER_HWM = 16


def _f64(x: ArrayLike) -> bytes:
    return np.ascontiguousarray(x, dtype="<f8").tobytes()


def _i64(x: ArrayLike) -> bytes:
    return np.ascontiguousarray(x, dtype="<i8").tobytes()


class WorkerAgent:
    """Reports one instance's iterations to the controller daemon.

    Args:
        address: the daemon's ``report_address`` (e.g. ``tcp://10.0.0.1:5600``).
        instance: this instance's name in the runtime config.
        phase: ``"prefill"`` or ``"decode"``.
        hwm: reports queued at most before new ones are dropped.
        ctx: ZeroMQ context (default: a private one, terminated by :meth:`close`).

    Attributes:
        sent: reports handed to the socket.
        dropped: reports dropped because the controller is not connected or not keeping up.
        errors: reports that failed to encode (bad input) or hit an unexpected socket error.
    """

    def __init__(self, address: str, instance: str, phase: Literal["prefill", "decode"], hwm: int = WORKER_HWM,
                 ctx: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        if phase not in ("prefill", "decode"):
            raise ValueError(f"phase = {phase!r}: must be 'prefill' or 'decode'")
        if not instance:
            raise ValueError("instance: must be a non-empty name")
        self.instance = instance
        self.phase = phase
        self.epoch = time.time_ns()
        self.seq = 0
        self.sent = 0
        self.dropped = 0
        self.errors = 0
        self._warned = False
        self._own_ctx = ctx is None
        self._ctx = ctx if ctx is not None else zmq.Context(io_threads=1)
        self._sock: zmq.Socket[bytes] | None = make_socket(self._ctx, zmq.PUSH, address, bind=False, hwm=hwm,
                                                            immediate=True)
        self._enc = FrameEncoder()

    def report_prefill(self, now_s: float, arrival_s: ArrayLike, prompt_tokens: ArrayLike,
                       prefilled_tokens: ArrayLike, *, kv_util: float = 0.0, iteration_s: float = 0.0,
                       freq_mhz: int = 0) -> bool:
        """Report the prefill waiting queue (FCFS). Returns True when handed to the socket.

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
        """Report the running decode batch. Returns True when handed to the socket.

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
            return self._send(mtype, msg)
        except Exception as e:  # never raise into the engine
            return self._error(e)

    def _send(self, mtype: MsgType, msg: PrefillReport | DecodeReport) -> bool:
        sock = self._sock
        # not writable: no controller connected (IMMEDIATE) or its queue is full; asking is cheaper
        # than raising zmq.Again
        if sock is None or not sock.getsockopt(EVENTS) & POLLOUT:
            self.dropped += 1
            return False
        try:
            sock.send(self._enc.encode(mtype, msg), NOBLOCK, copy=True)
        except zmq.Again:  # became full in between
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def _error(self, e: Exception) -> bool:
        self.errors += 1
        if not self._warned:
            self._warned = True
            log.warning("worker agent %s: report failed (%s: %s); further failures are only counted",
                        self.instance, type(e).__name__, e)
        return False

    def close(self) -> None:
        """Close the socket (pending reports are discarded) and the private context."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
            if self._own_ctx:
                self._ctx.term()

    def __enter__(self) -> WorkerAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
