from __future__ import annotations

import threading
import time

import msgspec
import numpy as np
import pytest
import zmq
from rt_helpers import security

from dualscale.runtime.daemon import ControllerDaemon, DaemonState
from dualscale.runtime.messages import (
    PROTOCOL_VERSION,
    ClockCommand,
    DecodeReport,
    GpuStatus,
    Heartbeat,
    MsgType,
    NodeStatus,
    PlanUpdate,
    PrefillReport,
)
from dualscale.runtime.serial import FrameDecoder, FrameEncoder

ENC = FrameEncoder()


def f64(*x):
    return np.array(x, dtype="<f8").tobytes()


def i64(*x):
    return np.array(x, dtype="<i8").tobytes()


def decode_report(seq=1, epoch=5, instance="d0", **kw):
    fields = dict(first_token_s=f64(9.0, 9.8), tokens_out=i64(12, 4), context_tokens=i64(1200, 700)) | kw
    return bytes(ENC.encode(MsgType.DECODE_REPORT, DecodeReport(instance, epoch, seq, 111, 10.0, 0.1, 0.02, 1980,
                                                                **fields)))


def prefill_report(seq=1, epoch=5, instance="p0"):
    return bytes(ENC.encode(MsgType.PREFILL_REPORT, PrefillReport(instance, epoch, seq, 222, 10.0, 0.0, 0.1, 1980,
                                                                  f64(9.7, 9.9), i64(3000, 800), i64(2048, 0))))


@pytest.fixture(scope="module")
def built(tmp_path_factory, profile, make_config):
    return make_config(tmp_path_factory.mktemp("d")), profile


@pytest.fixture
def daemon(built):
    config, profile = built
    return ControllerDaemon(config, profile=profile)


def test_a_valid_report_becomes_one_command(daemon):
    daemon.handle_report(decode_report(), 1)
    daemon.handle_report(prefill_report(), 1)
    daemon._decide()
    cmds = {c.instance: c for _, c in daemon._outbox}
    assert set(cmds) == {"d0", "p0"}
    d = cmds["d0"]
    assert d.gpus == [2, 3] and d.seq == 1 and d.origin_ns == 111 and d.controller_epoch == daemon.epoch
    assert d.freq_mhz in daemon.profile.clocks_mhz
    ref = daemon.slots["d0"].ctl.decide(10.0, [9.0, 9.8], [12, 4], [1200, 700], 0.1)
    assert d.freq_mhz == ref.freq_mhz
    assert daemon.dropped == {}


@pytest.mark.parametrize(("frame", "reason"), [
    (b"\xff" * 40, "version"),
    (b"", "malformed"),
    (bytes([PROTOCOL_VERSION, MsgType.DECODE_REPORT]) + b"\x93\x01\x02", "malformed"),
    (bytes([PROTOCOL_VERSION + 1]) + decode_report()[1:], "version"),
    (bytes(ENC.encode(MsgType.HEARTBEAT, Heartbeat(1, 2))), "type"),  # not a report
    (decode_report(instance="nobody"), "unknown_instance"),
    (decode_report(instance="p0"), "invalid"),  # a decode report for a prefill instance
    (decode_report(tokens_out=i64(12)), "invalid"),  # lengths differ
    (decode_report(first_token_s=f64(float("nan"), 9.0)), "invalid"),
    (decode_report(first_token_s=b"\x00" * 7), "invalid"),  # not a whole float64
])
def test_bad_reports_are_counted_and_dropped(daemon, frame, reason):
    daemon.handle_report(frame, 1)
    daemon._decide()
    assert daemon.dropped == {reason: 1}
    assert not daemon._outbox
    assert daemon.metrics.registry.get_sample_value("dualscale_dropped_messages_total", {"reason": reason}) == 1


def test_out_of_order_and_old_epoch_reports_are_dropped(daemon):
    daemon.handle_report(decode_report(seq=5, epoch=10), 1)
    daemon.handle_report(decode_report(seq=5, epoch=10), 1)  # duplicate
    daemon.handle_report(decode_report(seq=3, epoch=10), 1)  # older
    daemon.handle_report(decode_report(seq=99, epoch=9), 1)  # a previous incarnation
    assert daemon.dropped == {"out_of_order": 3}
    daemon.handle_report(decode_report(seq=1, epoch=11), 1)  # the worker restarted: a new epoch
    assert daemon.slots["d0"].pending.epoch == 11 and daemon.dropped == {"out_of_order": 3}


def test_newest_report_supersedes_an_undecided_one(daemon):
    for seq in (1, 2, 3):
        daemon.handle_report(decode_report(seq=seq), 1)
    daemon._decide()
    assert len(daemon._outbox) == 1 and daemon.slots["d0"].last_seq == 3
    assert daemon.metrics.registry.get_sample_value("dualscale_superseded_reports_total") == 2


def test_status_updates_clock_and_per_phase_power_energy_metrics(daemon):
    def status(epoch, e):
        return bytes(ENC.encode(MsgType.NODE_STATUS, NodeStatus("node0", epoch, 1, [
            GpuStatus(0, 1380, 1290, 4, 300.0, e), GpuStatus(2, 1005, 1005, 0, 200.0, 2 * e)])))

    daemon.handle_status(status(1, 10.0))  # first sight: a baseline (an earlier controller counted it)
    daemon.handle_status(status(1, 25.0))
    daemon.handle_status(status(2, 5.0))  # actuator restarted: its meters start again
    get = daemon.metrics.registry.get_sample_value
    assert get("dualscale_gpu_clock_mhz", {"node": "node0", "gpu": "0"}) == 1290
    assert get("dualscale_gpu_clock_event_reasons", {"node": "node0", "gpu": "0"}) == 4
    assert get("dualscale_energy_joules_total", {"phase": "prefill"}) == pytest.approx(20.0)
    assert get("dualscale_energy_joules_total", {"phase": "decode"}) == pytest.approx(40.0)
    assert get("dualscale_power_watts", {"phase": "decode"}) == 200.0
    daemon.handle_status(b"junk")  # "j" is no protocol version
    assert daemon.dropped == {"version": 1}


def test_no_instances_is_an_error(built):
    config, profile = built
    with pytest.raises(ValueError, match="no \\[\\[instances\\]\\]"):
        ControllerDaemon(msgspec.structs.replace(config, instances=[]), profile=profile)


def test_over_real_sockets_commands_heartbeats_plan_and_garbage(tmp_path, profile, make_config):
    config = make_config(tmp_path, plan_address=f"ipc://{tmp_path}/plan")
    daemon = ControllerDaemon(config, profile=profile)
    ready = threading.Event()
    t = threading.Thread(target=daemon.run, kwargs={"ready": ready.set})
    t.start()
    ctx = zmq.Context()
    act = ctx.socket(zmq.DEALER)
    security(config, "actuator-node0").client(act)
    push = ctx.socket(zmq.PUSH)
    security(config, "engine-d0").client(push)
    sub = ctx.socket(zmq.SUB)
    security(config, "engine-p0").client(sub)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    dec = FrameDecoder((MsgType.CLOCK_COMMAND, MsgType.HEARTBEAT))
    try:
        assert ready.wait(30)
        act.connect(config.controller.actuator_address)
        act.send(bytes(ENC.encode(MsgType.NODE_STATUS, NodeStatus("node0", 1, 1, []))))  # routes node0 here
        push.connect(config.controller.report_address)
        sub.connect(config.controller.plan_address)
        for frame in (b"garbage", b"\x01", b"\x07\x01" + b"x" * 10):
            push.send(frame)
        seen: dict[MsgType, list] = {MsgType.CLOCK_COMMAND: [], MsgType.HEARTBEAT: []}
        deadline = time.monotonic() + 30
        seq = 0
        while time.monotonic() < deadline and not (seen[MsgType.CLOCK_COMMAND] and seen[MsgType.HEARTBEAT]):
            seq += 1
            push.send(decode_report(seq=seq))
            if act.poll(20):
                mtype, msg = dec.decode(act.recv())
                seen[mtype].append(msg)
        cmd = seen[MsgType.CLOCK_COMMAND][0]
        assert isinstance(cmd, ClockCommand) and cmd.instance == "d0" and cmd.gpus == [2, 3]
        assert seen[MsgType.HEARTBEAT][0].controller_epoch == daemon.epoch
        assert sub.poll(5000)
        plan = FrameDecoder((MsgType.PLAN_UPDATE,)).decode(sub.recv())[1]
        assert isinstance(plan, PlanUpdate) and [i.name for i in plan.instances] == ["p0", "d0"]
        assert plan.instances[0].base_freq_mhz == 1980
        assert daemon.dropped.get("malformed", 0) + daemon.dropped.get("version", 0) == 3
        assert daemon.state is DaemonState.RUNNING  # garbage survived
    finally:
        daemon.stop()
        t.join(30)
        for s in (act, push, sub):
            s.close(0)
        ctx.term()
    assert daemon.state is DaemonState.STOPPED


def _decode_at(seq, freq_mhz, iteration_s, ctx=(1200, 700), fresh=False):
    """Decode report ``seq`` of one agent; ``fresh``: requests that just emitted their first token
    (time to spare: a low clock), else requests behind their TPOT pace (top clock)."""
    now = 10.0 + seq
    first, out = (f64(now - 0.01, now - 0.01), i64(1, 1)) if fresh else (f64(9.0, 9.8), i64(12 + seq, 4 + seq))
    return bytes(ENC.encode(MsgType.DECODE_REPORT, DecodeReport(
        "d0", 5, seq, 111, now, 0.1, iteration_s, freq_mhz, first_token_s=first, tokens_out=out,
        context_tokens=i64(*ctx))))


def test_the_next_report_feeds_back_the_iteration_decided_on(daemon):
    """Report k+1 carries iteration k's measured time; the clock read at its start and at its end
    (reports k and k+1) agree, so the daemon tells the controller, which learns the 30 % bias."""
    ctl = daemon.slots["d0"].ctl
    prof = daemon.profile
    daemon.handle_report(_decode_at(1, 1200, 0.0), 1)
    daemon._decide()
    assert ctl.correction.observations == 0  # the first report has nothing to feed back
    model_s = float(prof.decode_time_s(2, [1200, 700], 1200))
    daemon.handle_report(_decode_at(2, 1200, 1.3 * model_s), 2)
    daemon._decide()
    assert ctl.correction.observations == 1
    assert ctl.correction.last_model_error == pytest.approx(0.3, rel=1e-6)
    assert daemon.metrics.prediction_error.labels("d0", "model")._value.get() == pytest.approx(0.3, rel=1e-6)
    assert daemon.metrics.correction.labels("d0")._value.get() > 1.3
    assert daemon.metrics.safety.labels("d0")._value.get() == 1  # 30 % over the prediction: top clock for a while
    assert daemon._outbox[-1][1].freq_mhz == 1980


def test_no_feedback_when_the_clock_changed_or_a_report_was_skipped(daemon):
    ctl = daemon.slots["d0"].ctl
    daemon.handle_report(_decode_at(1, 1200, 0.0), 1)
    daemon._decide()
    daemon.handle_report(_decode_at(2, 1500, 0.05), 2)  # clock changed during iteration 1: unknown
    daemon._decide()
    daemon.handle_report(_decode_at(4, 1500, 0.05), 3)  # report 3 never decided on: no match
    daemon._decide()
    assert ctl.correction.observations == 0
    daemon.handle_report(_decode_at(5, 1500, 0.05), 4)  # follows 4, same clock: learnt
    daemon._decide()
    assert ctl.correction.observations == 1


def test_shadow_accounting_predicted_energy_and_would_be_misses(daemon):
    """With the GPUs at the top clock (shadow mode), the daemon still decides and counts the predicted
    energy at its clock and at the top one, and whether the measured error would have broken the
    decided clock's deadline."""
    m = daemon.metrics
    ctl = daemon.slots["d0"].ctl
    model_top = float(daemon.profile.decode_time_s(2, [1200, 700], 1980))
    daemon.handle_report(_decode_at(1, 1980, 0.0, fresh=True), 1)
    daemon._decide()
    decided, top = (m.shadow_energy.labels("d0", p)._value.get() for p in ("decided", "top"))
    assert 0 < decided < top  # a lower clock than the top one was decided, and it costs less
    daemon.handle_report(_decode_at(2, 1980, model_top, fresh=True), 2)  # the prediction was right
    daemon._decide()
    assert ctl.correction.observations == 1 and m.predicted_misses.labels("d0")._value.get() == 0
    d = daemon.slots["d0"].decided
    slow = (d.budget_s / d.time_s) * 1.5  # the decided clock would have overrun its budget by half
    daemon.handle_report(_decode_at(3, 1980, slow * model_top, fresh=True), 3)
    daemon._decide()
    assert m.predicted_misses.labels("d0")._value.get() == 1
