"""Helpers of the engine-hook tests (a module of its own: ``conftest`` is a name tests/runtime has too,
so ``from conftest import`` finds the wrong one when both folders run in one session)."""

from __future__ import annotations

import time

import zmq

from dualscale.runtime.messages import MsgType
from dualscale.runtime.serial import FrameDecoder


def wait_until(cond, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def connect(sched) -> int:
    """Idle steps of a dualscale vLLM scheduler until its relay has delivered a report (the relay's
    PUSH is connected, so later reports are not dropped for want of a peer); the seq reached."""
    from vllm_harness import fake_output

    agent = sched.dualscale.agent

    def idle_step() -> bool:
        out = sched.schedule()
        sched.update_from_output(out, fake_output(sched, out, set()))
        return agent.sent >= 1

    assert wait_until(idle_step), "the report relay never reached the controller's socket"
    return agent.seq


class Pull:
    """A plain PULL socket standing in for the controller daemon: every report, decoded."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.bind(address)
        self.address = address
        self.dec = FrameDecoder((MsgType.PREFILL_REPORT, MsgType.DECODE_REPORT))

    def received(self, timeout_ms: int = 200) -> list:
        got = []
        while self.sock.poll(timeout_ms):
            got.append(self.dec.decode(self.sock.recv()))
        return got

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()
