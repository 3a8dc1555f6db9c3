from __future__ import annotations

import msgspec
import numpy as np
import pytest

from dualscale.errors import ProtocolError
from dualscale.runtime import messages as m
from dualscale.runtime.serial import FrameDecoder, FrameEncoder

SAMPLES = [
    (m.MsgType.PREFILL_REPORT, m.PrefillReport("p0", 7, 1, 123, 10.5, 0.25, 0.08, 1380, np.array([9.0, 9.5]).tobytes(),
                                              np.array([3000, 800]).tobytes(), np.array([2048, 0]).tobytes())),
    (m.MsgType.DECODE_REPORT, m.DecodeReport("d0", 7, 2, 124, 10.5, 0.5, 0.02, 1980, np.array([9.0]).tobytes(),
                                             np.array([12]).tobytes(), np.array([1200]).tobytes())),
    (m.MsgType.CLOCK_COMMAND, m.ClockCommand("d0", [2, 3], 1380, 5, 124, 99)),
    (m.MsgType.HEARTBEAT, m.Heartbeat(99, 125)),
    (m.MsgType.NODE_STATUS, m.NodeStatus("node0", 3, 126, [m.GpuStatus(0, 1380, 1290, 4, 350.5, 1e7, "")],
                                         [m.InstanceClock("d0", 5, 1000, 1005)], 10, 4, 6, 1, 2)),
    (m.MsgType.PLAN_UPDATE, m.PlanUpdate(99, 2, [m.PlanInstance("p0", m.Phase.PREFILL, 2, "node0", [0, 1], 1980)])),
]


@pytest.mark.parametrize(("mtype", "msg"), SAMPLES, ids=[s[0].name for s in SAMPLES])
def test_every_message_round_trips(mtype, msg):
    frame = bytes(FrameEncoder().encode(mtype, msg))
    assert frame[0] == m.PROTOCOL_VERSION and frame[1] == mtype
    got_type, got = FrameDecoder(tuple(m.MsgType)).decode(frame)
    assert got_type is mtype and got == msg


def test_every_type_has_a_body_and_bodies_are_positional():
    assert set(m.BODY) == set(m.MsgType)
    for t in m.BODY.values():
        assert t.__struct_config__.array_like


# An older peer's ClockCommand (before origin_ns and controller_epoch were appended) and a newer one's
class ClockCommandV0(msgspec.Struct, array_like=True):
    instance: str
    gpus: list[int]
    freq_mhz: int
    seq: int


class ClockCommandNext(msgspec.Struct, array_like=True):
    instance: str
    gpus: list[int]
    freq_mhz: int
    seq: int
    origin_ns: int = 0
    controller_epoch: int = 0
    reason: str = ""  # a field a later release might append


def test_old_sender_new_receiver_fills_defaults():
    body = msgspec.msgpack.encode(ClockCommandV0("d0", [0], 1005, 3))
    frame = bytes([m.PROTOCOL_VERSION, m.MsgType.CLOCK_COMMAND]) + body
    _, cmd = FrameDecoder((m.MsgType.CLOCK_COMMAND,)).decode(frame)
    assert cmd == m.ClockCommand("d0", [0], 1005, 3, 0, 0)


def test_new_sender_old_receiver_ignores_appended_fields():
    body = msgspec.msgpack.encode(ClockCommandNext("d0", [0], 1005, 3, 11, 12, "slack"))
    frame = bytes([m.PROTOCOL_VERSION, m.MsgType.CLOCK_COMMAND]) + body
    _, cmd = FrameDecoder((m.MsgType.CLOCK_COMMAND,)).decode(frame)
    assert cmd == m.ClockCommand("d0", [0], 1005, 3, 11, 12)


@pytest.mark.parametrize(("frame", "reason"), [
    (b"", "malformed"),
    (b"\x01", "malformed"),
    (bytes([m.PROTOCOL_VERSION + 1, m.MsgType.HEARTBEAT]) + msgspec.msgpack.encode([1, 2]), "version"),
    (bytes([m.PROTOCOL_VERSION, 200]) + msgspec.msgpack.encode([1, 2]), "type"),
    (bytes([m.PROTOCOL_VERSION, m.MsgType.CLOCK_COMMAND]) + msgspec.msgpack.encode([1, 2]), "type"),
    (bytes([m.PROTOCOL_VERSION, m.MsgType.HEARTBEAT]) + b"\xc1garbage", "malformed"),
    (bytes([m.PROTOCOL_VERSION, m.MsgType.HEARTBEAT]) + msgspec.msgpack.encode(["x", 2]), "malformed"),
])
def test_bad_frames_raise_protocol_error_with_a_reason(frame, reason):
    with pytest.raises(ProtocolError) as e:
        FrameDecoder((m.MsgType.HEARTBEAT,)).decode(frame)
    assert e.value.reason == reason


def test_encoder_reuses_its_buffer():
    enc = FrameEncoder()
    a = enc.encode(m.MsgType.HEARTBEAT, m.Heartbeat(1, 2))
    b = enc.encode(m.MsgType.HEARTBEAT, m.Heartbeat(3, 4))
    assert a is b
