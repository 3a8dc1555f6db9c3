"""Hostile-message fuzzer (hypothesis) against the controller daemon and the actuator, counted per category.

Each example is one frame from a peer holding a valid key (an authenticated peer is the strongest
attacker that gets past the handshake): random bytes, a valid frame truncated or with bits flipped,
another protocol version or message type, NaN/inf/negative values, structurally typed garbage, an
unknown instance, oversized lists. Never an exception; the actuator never locks a clock outside the
supported set or a GPU outside its policy; the daemon's energy stays finite and its label set fixed.
``pytest -s`` prints how many frames each category tried; ``DUALSCALE_FUZZ_EXAMPLES`` sets the frames
per target (default 450).
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter

import msgspec
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rt_helpers import policy

from dualscale.device.sim import SimBackend
from dualscale.runtime.actuator import Actuator
from dualscale.runtime.daemon import ControllerDaemon
from dualscale.runtime.messages import (
    PROTOCOL_VERSION,
    ClockCommand,
    DecodeReport,
    GpuStatus,
    Heartbeat,
    MsgType,
    NodeStatus,
    PrefillReport,
)
from dualscale.runtime.serial import FrameEncoder

CATEGORIES = ("random", "truncated", "bitflip", "version", "type", "nonfinite", "typed", "unknown_instance",
              "oversized")
FUZZ = settings(max_examples=int(os.environ.get("DUALSCALE_FUZZ_EXAMPLES", "450")), deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ENC = FrameEncoder()
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf,
                                                                                     -1.0, 0.0, 1e308]))
ints = st.one_of(st.integers(-2**63, 2**64 - 1), st.sampled_from([0, -1, 2**63 - 1, 2**64 - 1]))


def enc(mtype, msg) -> bytes:
    return bytes(ENC.encode(mtype, msg))


def arr(draw, dtype, n):
    return np.asarray(draw(st.lists(st.floats(allow_nan=True) if dtype == "<f8" else st.integers(-2**63, 2**63 - 1),
                                    max_size=n)), dtype=dtype).tobytes()


@st.composite
def report(draw, names=("p0", "d0")):
    mtype = draw(st.sampled_from([MsgType.PREFILL_REPORT, MsgType.DECODE_REPORT]))
    cls = PrefillReport if mtype is MsgType.PREFILL_REPORT else DecodeReport
    now = time.monotonic_ns()
    n = draw(st.integers(0, 8))
    return mtype, cls(draw(st.sampled_from(names)), now - 1, draw(st.integers(1, 10**6)), now,
                      draw(st.floats(0, 1e4)), draw(st.floats(0, 1)), 0.01, 1980,
                      np.sort(np.asarray(draw(st.lists(st.floats(0, 1e4), min_size=n, max_size=n)))).tobytes(),
                      np.asarray(draw(st.lists(st.integers(1, 4096), min_size=n, max_size=n)), "<i8").tobytes(),
                      np.zeros(n, "<i8").tobytes())


@st.composite
def node_status(draw, gpus=range(4)):
    return MsgType.NODE_STATUS, NodeStatus("node0", 1, 1, [
        GpuStatus(g, 1005, 1005, 0, draw(st.floats(0, 1000)), 0.0, "", draw(st.floats(0, 1e9)), "boot:fuzz")
        for g in draw(st.lists(st.sampled_from(list(gpus)), max_size=4, unique=True))])


@st.composite
def command(draw):
    inst = draw(st.sampled_from(["p0", "d0"]))
    gpus = [0, 1] if inst == "p0" else [2, 3]
    return MsgType.CLOCK_COMMAND, ClockCommand(inst, gpus, draw(st.integers(1, 3000)), draw(st.integers(1, 10**6)))


@st.composite
def hostile(draw, valid, typed, mtypes):
    """(category, frame) from a strategy of valid (type, Struct) pairs."""
    cat = draw(st.sampled_from(CATEGORIES))
    mtype, msg = draw(valid)
    good = enc(mtype, msg)
    if cat == "random":
        return cat, draw(st.binary(max_size=512))
    if cat == "truncated":
        return cat, good[:draw(st.integers(0, max(0, len(good) - 1)))]
    if cat == "bitflip":
        b = bytearray(good)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(b) * 8 - 1))
            b[i // 8] ^= 1 << (i % 8)
        return cat, bytes(b)
    if cat == "version":
        return cat, bytes([draw(st.integers(0, 255).filter(lambda v: v != PROTOCOL_VERSION))]) + good[1:]
    if cat == "type":
        return cat, good[:1] + bytes([draw(st.integers(0, 255))]) + good[2:]
    if cat == "nonfinite":  # every float field of the message replaced by a hostile value
        raw = msgspec.msgpack.decode(good[2:])
        raw = [draw(floats) if isinstance(v, float) else v for v in raw]
        if mtype is MsgType.NODE_STATUS:
            raw[3] = [[g[0], g[1], g[2], g[3], draw(floats), draw(floats), "", draw(floats), "boot:fuzz"]
                      for g in raw[3]]
        return cat, good[:2] + msgspec.msgpack.encode(raw)
    if cat == "typed":  # any msgpack array of plausible element types under a valid header
        return cat, good[:2] + msgspec.msgpack.encode(draw(typed))
    if cat == "unknown_instance":
        raw = msgspec.msgpack.decode(good[2:])
        raw[0] = draw(st.text(max_size=300))
        return cat, good[:2] + msgspec.msgpack.encode(raw)
    # oversized: long lists and strings where short ones belong
    raw = msgspec.msgpack.decode(good[2:])
    for i, v in enumerate(raw):
        if isinstance(v, list):
            raw[i] = v * 0 + [draw(ints)] * draw(st.integers(65, 5000))
        elif isinstance(v, str):
            raw[i] = "x" * draw(st.integers(129, 100_000))
    return cat, good[:2] + msgspec.msgpack.encode(raw)


typed_values = st.lists(st.one_of(ints, floats, st.text(max_size=40), st.binary(max_size=64),
                                  st.lists(ints, max_size=8), st.none()), max_size=14)


def test_fuzz_the_daemon(tmp_path, profile, make_config):
    daemon = ControllerDaemon(make_config(tmp_path), profile=profile)
    reg = daemon.metrics.registry
    counts: Counter[str] = Counter()
    labels_before = sum(len(m.samples) for m in reg.collect())

    @FUZZ
    @given(st.one_of(hostile(report(), typed_values, ()), hostile(node_status(range(64)), typed_values, ())))
    def one(case):
        cat, frame = case
        counts[cat] += 1
        daemon.handle_report(frame, 1, user="engine-d0" if b"d0" in frame[:8] else "engine-p0")
        daemon.handle_status(frame, b"route", user="actuator-node0")
        daemon._decide()
        daemon._outbox.clear()
        assert all(math.isfinite(e) and e >= 0 for e in daemon.energy_j.values())

    one()
    labels_after = sum(len(m.samples) for m in reg.collect())
    print(f"\ndaemon: {sum(counts.values())} hostile frames, per category {dict(sorted(counts.items()))}; "
          f"dropped by reason {daemon.dropped}")
    assert set(counts) == set(CATEGORIES)
    # GPU labels exist only for the configured GPUs: at most the GPU gauges of 4 GPUs and per-reason drops
    assert labels_after - labels_before <= 4 * 3 + 10


def test_fuzz_the_actuator(profile, config):
    backend = SimBackend(profile, gpus=4, switch_delay_s=0.0)
    act = Actuator(backend, config.actuator, policy(config))
    act.start()
    supported = set(backend.supported_sm_clocks_mhz(0))
    owned = {g for p in policy(config).instances for g in p.gpus}
    counts: Counter[str] = Counter()
    hb = st.builds(lambda e, s: (MsgType.HEARTBEAT, Heartbeat(e, s)), ints.filter(lambda v: 0 <= v < 2**63),
                   ints.filter(lambda v: 0 <= v < 2**63))

    @FUZZ
    @given(st.one_of(hostile(command(), typed_values, ()), hostile(hb, typed_values, ())))
    def one(case):
        cat, frame = case
        counts[cat] += 1
        act.handle(frame)
        act._apply()
        for g in range(4):
            locked = backend.state.locked_mhz(g)
            assert locked == 0 or (locked in supported and g in owned)
        assert set(act.applied) <= {"p0", "d0"}

    try:
        one()
    finally:
        act.close()
    print(f"\nactuator: {sum(counts.values())} hostile frames, per category {dict(sorted(counts.items()))}; "
          f"dropped {act.dropped}, refused {act.refused}, applied {act.commands}")
    assert set(counts) == set(CATEGORIES)
    assert [backend.state.locked_mhz(g) for g in range(4)] == [0] * 4
