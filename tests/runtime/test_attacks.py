"""The attack suite: each finding of issue 13 as a test (loopback ipc:// only, every wait bounded).

An attacker here is a local process that can reach the sockets: with no key, with its own key, or
with a key of another role; and a peer that sends hostile content with a valid key.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
import zmq
from rt_helpers import policy, security

import dualscale.runtime.daemon as daemon_mod
from dualscale.device.sim import SimBackend
from dualscale.errors import DeviceError
from dualscale.runtime.actuator import Actuator
from dualscale.runtime.daemon import ControllerDaemon
from dualscale.runtime.messages import (
    ClockCommand,
    DecodeReport,
    GpuStatus,
    MsgType,
    NodeStatus,
    PrefillReport,
)
from dualscale.runtime.serial import FrameDecoder, FrameEncoder

ENC = FrameEncoder()
CMD_DEC = FrameDecoder((MsgType.CLOCK_COMMAND, MsgType.HEARTBEAT))
TIMEOUT_S = 30.0


def wait_until(cond, timeout_s=TIMEOUT_S, step_s=0.01):
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(step_s)
    return True


def frame(mtype, msg) -> bytes:
    return bytes(ENC.encode(mtype, msg))


def decode_report(instance="d0", epoch=None, seq=1, sent_ns=None):
    now = time.monotonic_ns()
    return frame(MsgType.DECODE_REPORT, DecodeReport(
        instance, epoch if epoch is not None else now - 1, seq, sent_ns if sent_ns is not None else now, 10.0, 0.1,
        0.02, 1980, np.array([9.0, 9.8]).tobytes(), np.array([12, 4]).tobytes(), np.array([1200, 700]).tobytes()))


def prefill_report(instance="p0", seq=1):
    now = time.monotonic_ns()
    return frame(MsgType.PREFILL_REPORT, PrefillReport(instance, now - 1, seq, now, 10.0, 0.0, 0.1, 1980,
                                                       np.array([9.7]).tobytes(), np.array([800]).tobytes(),
                                                       np.array([0]).tobytes()))


def status(node="node0", epoch=1, gpus=(), **kw):
    return frame(MsgType.NODE_STATUS, NodeStatus(node, epoch, 1, list(gpus), **kw))


class Running:
    """A controller daemon on a thread, plus client sockets made with the test deployment's keys."""

    def __init__(self, config, profile):
        self.config = config
        self.daemon = ControllerDaemon(config, profile=profile)
        self.ctx = zmq.Context()
        self.socks: list[zmq.Socket] = []
        ready = threading.Event()
        self.thread = threading.Thread(target=self.daemon.run, kwargs={"ready": ready.set})
        self.thread.start()
        assert ready.wait(TIMEOUT_S)

    def client(self, kind, address, key: str | None):
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        if key is not None:
            security(self.config, key).client(s)
        s.connect(address)
        self.socks.append(s)
        return s

    def actuator_peer(self, key):
        return self.client(zmq.DEALER, self.config.controller.actuator_address, key)

    def engine(self, key):
        return self.client(zmq.PUSH, self.config.controller.report_address, key)

    def close(self):
        self.daemon.stop()
        self.thread.join(TIMEOUT_S)
        for s in self.socks:
            s.close(0)
        self.ctx.term()


@pytest.fixture
def running(tmp_path, profile, make_config):
    r = Running(make_config(tmp_path), profile)
    yield r
    r.close()


def commands(sock, timeout_s=0.2) -> list[ClockCommand]:
    out = []
    while sock.poll(int(timeout_s * 1000)):
        mtype, msg = CMD_DEC.decode(sock.recv())
        if mtype is MsgType.CLOCK_COMMAND:
            out.append(msg)
        timeout_s = 0.01
    return out


# ---- anyone can command the root actuator ------------------------------------------------------
@pytest.mark.parametrize("attacker", ["plain", "own-key"])
def test_a_fake_controller_never_reaches_the_actuator(tmp_path, profile, config, attacker):
    """The attacker binds the controller's address (the controller is down): the actuator, pinned to
    the controller's key, never completes a handshake, so it never sends a status nor takes a command."""
    ctx = zmq.Context()
    evil = ctx.socket(zmq.ROUTER)
    evil.setsockopt(zmq.LINGER, 0)
    if attacker == "own-key":
        _pub, sec = zmq.curve_keypair()
        evil.curve_server, evil.curve_secretkey = True, sec
    evil.bind(config.actuator.controller_address)
    backend = SimBackend(profile, gpus=4, switch_delay_s=0.0)
    act = Actuator(backend, config.actuator, policy(config), security(config, "actuator-node0"))
    t = threading.Thread(target=act.run)
    t.start()
    heard = 0
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            if evil.poll(50):
                route = evil.recv_multipart()[0]
                heard += 1
                evil.send_multipart([route, frame(MsgType.CLOCK_COMMAND, ClockCommand("d0", [2, 3], 345, 1))])
    finally:
        act.stop()
        t.join(TIMEOUT_S)
        evil.close(0)
        ctx.term()
    assert heard == 0 and act.commands == 0
    assert [backend.state.locked_mhz(g) for g in range(4)] == [0] * 4


# ---- identity: first come, first served; spoofed statuses; reports for other instances ---------
def test_other_roles_keys_and_unknown_keys_are_refused_at_the_handshake(running):
    engine_on_actuator_socket = running.actuator_peer("engine-d0")
    unknown = running.ctx.socket(zmq.DEALER)
    unknown.setsockopt(zmq.LINGER, 0)
    unknown.curve_serverkey = security(running.config, "engine-d0").server_public
    unknown.curve_publickey, unknown.curve_secretkey = zmq.curve_keypair()
    unknown.connect(running.config.controller.actuator_address)
    running.socks.append(unknown)
    plain = running.engine(None)
    for s in (engine_on_actuator_socket, unknown):
        s.send(status())
    plain.send(decode_report())
    assert wait_until(lambda: running.daemon.security.denied.get("actuators", 0) >= 2)
    time.sleep(0.2)
    assert not running.daemon.routes and not running.daemon.slots["d0"].epoch > 0


def test_a_report_is_taken_only_for_the_instance_its_key_names(running):
    d = running.daemon
    d.handle_report(decode_report("d0"), 1, user="engine-p0")
    d.handle_report(decode_report("d0"), 1, user="engine-d0")
    assert d.dropped == {"identity": 1} and d.slots["d0"].pending is not None
    p0 = running.engine("engine-p0")  # over the socket: p0's key may not report for d0
    p0.send(decode_report("d0", seq=2))
    assert wait_until(lambda: d.dropped.get("identity", 0) == 2)


def test_a_status_is_taken_only_for_the_node_its_key_names(running):
    d = running.daemon
    d.handle_status(status("node0"), b"r1", user="actuator-node1")
    d.handle_status(status("node1"), b"r1", user="actuator-node0")
    assert d.dropped == {"identity": 2} and not d.routes


def test_a_second_live_actuator_for_a_node_is_refused_and_reported(running, monkeypatch):
    monkeypatch.setattr(daemon_mod, "ACTUATOR_UP_S", 0.5)
    d = running.daemon
    first = running.actuator_peer("actuator-node0")
    second = running.actuator_peer("actuator-node0")  # a stolen key, or a replacement while the first lives
    engine = running.engine("engine-d0")
    first.send(status())
    assert wait_until(lambda: "node0" in d.routes)
    route = d.routes["node0"][0]
    seq = 0

    def exchange() -> tuple[list, list]:
        nonlocal seq
        seq += 1
        first.send(status())
        second.send(status())
        engine.send(decode_report(seq=seq, epoch=1))
        return commands(first, 0.05), commands(second, 0.01)

    got_first, got_second = [], []
    for _ in range(20):
        a, b = exchange()
        got_first += a
        got_second += b
    assert got_first and not got_second
    assert d.routes["node0"][0] == route and d.conflicts["node0"] >= 10
    assert d.metrics.registry.get_sample_value("dualscale_actuator_conflicts_total", {"node": "node0"}) >= 10

    # handover: the first one hangs (no more statuses); once it is stale the second takes over and is
    # sent the latest clock of its instances at once, without waiting for the next report
    def taken_over() -> bool:
        second.send(status())
        time.sleep(0.05)
        return d.routes["node0"][0] != route

    assert wait_until(taken_over)
    t0 = time.monotonic()
    cmds = commands(second, 2.0)
    print(f"handover: the new actuator got its first command {time.monotonic() - t0:.3f} s after being routed")
    assert cmds and cmds[0].instance == "d0"


# ---- one forged report blinds an instance -------------------------------------------------------
def test_a_forged_epoch_or_seq_locks_out_the_real_engine_for_at_most_the_stale_time(running):
    d = running.daemon
    slot = d.slots["d0"]
    real_epoch = time.monotonic_ns() - 10
    d.handle_report(decode_report(epoch=real_epoch, seq=1), 1)
    d.handle_report(decode_report(epoch=2**64 - 2, seq=1, sent_ns=2**63 - 1), 1)  # implausible: after sent_ns
    assert d.dropped == {"invalid": 1}
    d.handle_report(decode_report(epoch=2**63 - 2, seq=1, sent_ns=2**63 - 1), 1)  # forged but plausible
    d.handle_report(decode_report(epoch=real_epoch, seq=2), 1)
    assert d.dropped == {"invalid": 1, "out_of_order": 1}  # blinded for now...
    slot.heard_s -= daemon_mod.EPOCH_STALE_S  # ...but once the forged stream is quiet for EPOCH_STALE_S
    d.handle_report(decode_report(epoch=real_epoch, seq=3), 1)
    assert slot.epoch == real_epoch and slot.last_seq == 3
    d.handle_report(decode_report(epoch=real_epoch, seq=2**62), 1)  # a bit flip in seq: same healing
    d.handle_report(decode_report(epoch=real_epoch, seq=4), 1)
    assert slot.last_seq == 2**62
    slot.heard_s -= daemon_mod.EPOCH_STALE_S
    d.handle_report(decode_report(epoch=real_epoch, seq=5), 1)
    assert slot.last_seq == 5


def test_a_restarted_engine_with_a_smaller_monotonic_epoch_is_taken_after_the_stale_time(running):
    """A host reboot restarts CLOCK_MONOTONIC: the new agent's epoch is smaller than the old one's."""
    d = running.daemon
    e = running.engine("engine-d0")
    e.send(decode_report(epoch=10**15, seq=1, sent_ns=10**15 + 5))
    assert wait_until(lambda: d.slots["d0"].epoch == 10**15)
    t0 = time.monotonic()
    seq = 0

    def taken() -> bool:
        nonlocal seq
        seq += 1
        e.send(decode_report(epoch=1000, seq=seq, sent_ns=2000))
        time.sleep(0.02)
        return d.slots["d0"].epoch == 1000

    assert wait_until(taken)
    assert time.monotonic() - t0 >= daemon_mod.EPOCH_STALE_S * 0.9


# ---- status content: inf energy, invented labels, replayed counters -----------------------------
def test_hostile_statuses_cannot_inflate_energy_or_labels(running):
    d = running.daemon
    reg = d.metrics.registry

    def gpu(i, counter_j, power_w=100.0, energy_j=0.0):
        return GpuStatus(i, 0, 1980, 0, power_w, energy_j, "", counter_j, "boot:x")

    d.handle_status(status(gpus=[gpu(0, 1000.0)]), b"r", "actuator-node0")
    for _ in range(3):  # the same reading again (replayed): nothing more to count
        d.handle_status(status(gpus=[gpu(0, 1500.0)]), b"r", "actuator-node0")
    assert d.energy_j["prefill"] == pytest.approx(500.0)
    d.handle_status(status(gpus=[gpu(0, float("inf"))]), b"r", "actuator-node0")
    d.handle_status(status(gpus=[gpu(0, 1600.0, power_w=float("nan"))]), b"r", "actuator-node0")
    d.handle_status(status(gpus=[gpu(0, 1600.0, energy_j=-1.0)]), b"r", "actuator-node0")
    assert d.dropped == {"invalid": 3} and d.energy_j["prefill"] == pytest.approx(500.0)
    before = sum(len(m.samples) for m in reg.collect())
    d.handle_status(status(gpus=[gpu(i, 1.0) for i in range(4, 64)]), b"r", "actuator-node0")  # GPUs nobody uses
    assert sum(len(m.samples) for m in reg.collect()) == before


# ---- the actuator: policy, bounded input, rate-limited logs --------------------------------------
@pytest.fixture
def act(profile, config):
    a = Actuator(SimBackend(profile, gpus=4, switch_delay_s=0.0), config.actuator, policy(config))
    a.start()
    yield a
    a.close()


def test_the_actuator_refuses_commands_outside_its_policy_and_counts_them(act):
    act.handle(frame(MsgType.CLOCK_COMMAND, ClockCommand("intruder", [0], 345, 1)))
    act.handle(frame(MsgType.CLOCK_COMMAND, ClockCommand("d0", [0, 1, 2, 3], 345, 1)))  # more GPUs than its own
    act.handle(frame(MsgType.CLOCK_COMMAND, ClockCommand("d0", [2, 3], 0, 1)))
    act._apply()
    assert act.refused == {"instance": 1, "gpus": 1, "clock": 1}
    assert [act.locked[g] for g in range(4)] == [0] * 4
    for i in range(1000):  # invented instance names are not remembered
        act.handle(frame(MsgType.CLOCK_COMMAND, ClockCommand(f"x{i}", [0], 1005, 1)))
    act.handle(frame(MsgType.CLOCK_COMMAND, ClockCommand("p0", [0, 1], 1005, 1)))
    act._apply()
    assert set(act.applied) == {"p0"} and act.status().refused == 1003


def test_a_command_repeating_a_gpu_a_million_times_is_dropped_at_decode(act):
    big = frame(MsgType.CLOCK_COMMAND, ClockCommand("d0", [0] * 1_000_000, 1005, 1))
    t0 = time.perf_counter()
    act.handle(big)
    assert time.perf_counter() - t0 < 5.0  # generous: it must not take the 49 s the finding saw
    assert act.dropped == 1 and act.commands == 0


def test_refused_commands_are_logged_at_a_bounded_rate(act, caplog):
    with caplog.at_level(logging.WARNING, logger="dualscale.runtime.actuator"):
        for _ in range(5000):
            act.handle(frame(MsgType.CLOCK_COMMAND, ClockCommand("x" * 128, [0], 1005, 1)))
            act.handle(b"\x01\x03\xff\xff")
    assert act.refused["instance"] == 5000 and act.dropped == 5000
    assert len(caplog.records) <= 4
    assert all(len(r.getMessage()) < 400 for r in caplog.records)  # never the whole message


def test_oversized_frames_are_cut_off_by_the_socket_and_the_daemon_goes_on(running):
    d = running.daemon
    big = running.engine("engine-d0")
    big.send(b"\x01\x02" + b"\x00" * (daemon_mod.MAX_REPORT_BYTES + 16))
    engine = running.engine("engine-p0")
    seq = 0

    def decided() -> bool:
        nonlocal seq
        seq += 1
        engine.send(prefill_report(seq=seq))
        time.sleep(0.02)
        return d.slots["p0"].seq > 0

    assert wait_until(decided)
    assert d.dropped.get("malformed", 0) == 0  # never buffered, never decoded


# ---- the actuator's own failures ----------------------------------------------------------------
class Faulty(SimBackend):
    """A simulated node whose GPUs can refuse resets, fail clock queries, or hang in a call."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.refuse_reset: set[int] = set()
        self.bad_clocks: set[int] = set()
        self.hang: dict[int, threading.Event] = {}

    def reset_locked_sm_clock(self, gpu):
        if gpu in self.hang:
            self.hang[gpu].wait(30)
        if gpu in self.refuse_reset:
            raise DeviceError(f"GPU {gpu}: reset refused")
        super().reset_locked_sm_clock(gpu)

    def set_locked_sm_clock_mhz(self, gpu, freq_mhz):
        if gpu in self.hang:
            self.hang[gpu].wait(30)
        super().set_locked_sm_clock_mhz(gpu, freq_mhz)

    def supported_sm_clocks_mhz(self, gpu):
        if gpu in self.bad_clocks:
            raise DeviceError(f"GPU {gpu}: clock query failed")
        return super().supported_sm_clocks_mhz(gpu)


def test_a_start_that_fails_on_one_gpu_still_resets_every_gpu_first(profile, config):
    b = Faulty(profile, gpus=4, switch_delay_s=0.0)
    for g in range(4):
        b.set_locked_sm_clock_mhz(g, 345)  # left locked by an actuator that was killed
    b.bad_clocks.add(2)
    a = Actuator(b, config.actuator, policy(config))
    with pytest.raises(DeviceError, match="clock query failed"):
        a.start()
    a.close()
    assert [b.state.locked_mhz(g) for g in range(4)] == [0] * 4


def locked_faulty(profile, config, **kw) -> tuple[Faulty, Actuator]:
    """A started actuator on a Faulty node with d0 (GPUs 2, 3) locked at 1005 MHz."""
    b = Faulty(profile, gpus=4, switch_delay_s=0.0)
    a = Actuator(b, config.actuator, policy(config), **kw)
    a.start()
    a.handle(frame(MsgType.CLOCK_COMMAND, ClockCommand("d0", [2, 3], 1005, 1)))
    a._apply()
    return b, a


def test_a_reset_refused_at_exit_is_retried_logged_once_and_exits_non_zero(profile, config, caplog):
    b, a = locked_faulty(profile, config)
    b.refuse_reset.add(3)
    with caplog.at_level(logging.INFO, logger="dualscale.runtime.actuator"):
        a.close()
    assert a.exit_code == 1 and b.state.locked_mhz(2) == 0 and b.state.locked_mhz(3) == 1005
    text = caplog.text
    # the error once (not once per attempt), then the summary naming the GPU left locked
    assert text.count("reset refused") == 2 and "still LOCKED" in text and "clocks reset" not in text


def test_a_reset_refused_under_the_dead_man_is_warned_about_once(profile, config, caplog):
    b, a = locked_faulty(profile, config)
    b.refuse_reset.add(3)
    a.last_heard_s -= 100.0
    with caplog.at_level(logging.WARNING, logger="dualscale.runtime.actuator"):
        for _ in range(2000):
            a._check_deadman(time.monotonic())
    assert a.deadman_resets == 1 and len(caplog.records) <= 2
    b.refuse_reset.clear()
    a._next_deadman_retry_s = 0.0
    a._check_deadman(time.monotonic())  # the owed reset is retried and succeeds
    assert b.state.locked_mhz(3) == 0 and not a.unreset
    a.close()
    assert a.exit_code == 0


def test_a_hung_device_call_stalls_neither_the_loop_nor_the_dead_man_nor_the_exit(profile, config):
    b, a = locked_faulty(profile, config, call_timeout_s=0.2)
    release = b.hang[3] = threading.Event()
    try:
        a.handle(frame(MsgType.CLOCK_COMMAND, ClockCommand("d0", [2, 3], 1200, 2)))
        t0 = time.monotonic()
        a._apply()  # GPU 3's write hangs
        assert time.monotonic() - t0 < 5.0 and "did not return" in a.errors[3]
        assert b.state.locked_mhz(2) == 1200
        a.last_heard_s -= 100.0
        t0 = time.monotonic()
        a._check_deadman(time.monotonic())
        assert time.monotonic() - t0 < 5.0 and a.deadman_resets == 1 and b.state.locked_mhz(2) == 0
        t0 = time.monotonic()
        a.close()
        assert time.monotonic() - t0 < 10.0 and a.exit_code == 1  # GPU 3 could not be reset: said so
    finally:
        release.set()
