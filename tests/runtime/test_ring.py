"""The shared-memory ring between worker agents and their relay."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dualscale.runtime.ring import HEADER_BYTES, RingConsumer, RingProducer, create_ring_fd


def make_ring(capacity_bytes: int = 1 << 12, tags: int = 4, checked: bool = True) -> tuple[RingProducer, RingConsumer]:
    fd = create_ring_fd(capacity_bytes, tags, checked)
    return RingProducer(fd), RingConsumer(os.dup(fd))


def record(payload: bytes) -> bytearray:
    return bytearray(HEADER_BYTES) + payload


def drained(c: RingConsumer, limit: int = 1 << 30) -> list[tuple[int, bytes]]:
    return [(tag, bytes(p)) for tag, p in c.drain(limit)]


ops = st.lists(st.one_of(
    st.tuples(st.just("push"), st.one_of(st.integers(0, 300), st.integers(0, 4080)), st.integers(0, 3)),
    st.tuples(st.just("drain"), st.integers(1, 5), st.just(0)),
), max_size=120)


@pytest.mark.parametrize("checked", [True, False])
@given(seq=ops)
def test_records_come_out_whole_in_order_and_a_full_ring_refuses(checked, seq):
    p, c = make_ring(checked=checked)
    expected: list[tuple[int, bytes]] = []  # pushed, not yet drained
    n = 0
    for op, a, b in seq:
        if op == "push":
            n += 1
            payload = bytes([n % 251]) * a
            if p.push(record(payload), b):
                expected.append((b, payload))
            else:
                # refused only for lack of room: once everything is drained it fits
                got = drained(c)
                assert got == expected
                expected = []
                assert p.push(record(payload), b)
                expected.append((b, payload))
        else:
            got = drained(c, a)
            assert got == expected[:a]
            expected = expected[a:]
    assert drained(c) == expected


def test_oversized_and_malformed_records_are_refused_not_written():
    p, c = make_ring(1 << 12)
    assert not p.push(record(bytes(1 << 12)), 0)
    assert not p.push(bytearray(3), 0)  # shorter than the header
    assert drained(c) == []


def test_a_record_not_fully_visible_is_left_for_the_next_drain():
    """What a weakly ordered CPU may show a checked ring's consumer: the head published before the
    record's bytes."""
    p, c = make_ring(checked=True)
    assert p.push(record(b"first"), 1) and p.push(record(b"second" * 10), 2)
    at = c.data + HEADER_BYTES + 16  # second record's header starts after the first (16 + 16 bytes)
    for offset in (at + HEADER_BYTES + 7, at + 12, at + 4):  # payload byte, position, length
        saved = c.mm[offset]
        c.mm[offset] = saved ^ 0x5A
        assert drained(c) == ([(1, b"first")] if offset == at + HEADER_BYTES + 7 else [])
        c.mm[offset] = saved
    assert drained(c) == [(2, b"second" * 10)]
    assert drained(c) == []


@pytest.mark.parametrize("checked", [True, False])
def test_records_wrap_around_the_end_and_any_size_up_to_the_capacity_fits(checked):
    cap = 1 << 12
    p, c = make_ring(cap, checked=checked)
    assert p.push(record(bytes(100)), 0) and len(drained(c)) == 1  # head mid-ring, ring empty
    for n in (cap - HEADER_BYTES, 3000, cap // 2 + 1, 2500):  # each straddles the end somewhere
        payload = os.urandom(n)
        assert p.push(record(payload), 1)
        assert drained(c) == [(1, payload)]
    assert not p.push(record(bytes(cap - HEADER_BYTES + 1)), 0)  # larger than the ring: never
    assert not p.push(record(b"x"), 4)  # no such tag


def test_a_stuck_record_is_skipped_alone_when_its_header_reads_else_everything_queued():
    p, c = make_ring(checked=True)
    for tag, payload in ((1, b"A" * 20), (2, b"B" * 20), (3, b"C" * 20)):
        assert p.push(record(payload), tag)
    c.mm[c.data + HEADER_BYTES + 3] ^= 0xFF  # A's payload: A never checks out
    assert drained(c) == []
    assert c.discard_stuck() == 1 and p.discarded_bytes == 48
    c.mm[c.data + 48 + 12] ^= 0xFF  # B's position: B's header is unreadable
    assert drained(c) == []
    assert c.discard_stuck() is None and p.discarded_bytes == 3 * 48 and c.backlog_bytes == 0
    assert c.discard_stuck() is None and drained(c) == []  # nothing left to skip
    assert p.push(record(b"D"), 0) and drained(c) == [(0, b"D")]


@pytest.mark.parametrize("checked", [True, False])
def test_threads_share_a_producer(checked):
    p, c = make_ring(1 << 16, checked=checked)
    per_thread = 400
    got: list[tuple[int, bytes]] = []

    def produce(tag: int) -> None:
        i = 0
        while i < per_thread:
            if p.push(record(struct.pack("<II", tag, i) * (1 + i % 20)), tag):
                i += 1

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) or len(got) < 4 * per_thread:
        got += drained(c)
    for t in threads:
        t.join()
    for tag in range(4):
        mine = [struct.unpack_from("<II", x) for t, x in got if t == tag]
        assert mine == [(tag, i) for i in range(per_thread)]


@pytest.mark.parametrize("checked", [True, False])
def test_another_process_produces_while_this_one_drains(checked):
    fd = create_ring_fd(1 << 14, checked=checked)
    c = RingConsumer(os.dup(fd))
    count = 3000
    code = (
        "import sys, struct\n"
        "from dualscale.runtime.ring import RingProducer, HEADER_BYTES\n"
        "p = RingProducer(int(sys.argv[1]))\n"
        "i = 0\n"
        f"while i < {count}:\n"
        "    if p.push(bytearray(HEADER_BYTES) + struct.pack('<I', i) * (1 + i % 50), i % 7):\n"
        "        i += 1\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(fd)], pass_fds=(fd,))
    os.close(fd)
    got: list[tuple[int, bytes]] = []
    while proc.poll() is None or len(got) < count:
        got += drained(c)
        if proc.poll() not in (None, 0):
            break
    assert proc.wait(60) == 0
    assert len(got) == count
    for i, (tag, payload) in enumerate(got):
        assert tag == i % 7 and payload == struct.pack("<I", i) * (1 + i % 50)


def test_bad_geometry_and_non_rings_are_named():
    with pytest.raises(ValueError, match="capacity_bytes = 5000"):
        create_ring_fd(5000)
    with pytest.raises(ValueError, match="tags = 0"):
        create_ring_fd(1 << 12, tags=0)
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(ValueError, match="not a ring"):
        RingConsumer(r)
    os.close(r)
    fd = os.memfd_create("not-a-ring")
    os.ftruncate(fd, 1 << 13)
    with pytest.raises(ValueError, match="bad magic"):
        RingProducer(fd)
    os.close(fd)


def test_checking_is_on_where_stores_may_be_reordered():
    import platform

    from dualscale.runtime.ring import CHECKED_DEFAULT

    assert CHECKED_DEFAULT == (platform.machine() not in ("x86_64", "AMD64"))
    assert make_ring(checked=False)[1].checked is False and make_ring(checked=True)[1].checked is True


def test_counters_are_written_by_the_consumer_and_read_by_the_producer():
    p, c = make_ring()
    c.count(2, 5, 1)
    c.count(2, 1, 3)
    assert p.counters(2) == (6, 4) and p.counters(1) == (0, 0)
    c.close()
    p.close()
    assert p.closed and p.counters(2) == (6, 4)  # still readable once closed


def test_the_relay_forwards_in_order_and_gets_past_a_record_that_never_becomes_whole(tmp_path, monkeypatch):
    import zmq

    from dualscale.runtime import relay as relay_mod

    monkeypatch.setattr(relay_mod, "STUCK_S", 0.05)
    p, c = make_ring(1 << 14, checked=True)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"ipc://{tmp_path}/r")
    push = relay_mod.make_socket(ctx, zmq.PUSH, f"ipc://{tmp_path}/r", bind=False, immediate=True)
    try:
        while not push.getsockopt(zmq.EVENTS) & zmq.POLLOUT:  # connected
            pull.poll(10)
        assert p.push(record(b"A" * 40), 1) and p.push(record(b"B" * 40), 2)
        bad = c.data + 2 * HEADER_BYTES + 48 + 5  # a payload byte of B: B never checks out
        c.mm[bad] ^= 0xFF
        t = threading.Thread(target=relay_mod.relay, args=(c, push, os.getppid(), 1e-3), daemon=True)
        t.start()
        assert pull.poll(5000) and pull.recv() == b"A" * 40
        assert not pull.poll(20)  # B is held back: not whole
        deadline = time.monotonic() + 5
        while p.discarded_bytes == 0 and time.monotonic() < deadline:
            pull.poll(10)
        assert p.discarded_bytes == HEADER_BYTES + 48  # B, and only B, was skipped, and counted
        assert p.push(record(b"C" * 7), 3)
        assert pull.poll(5000) and pull.recv() == b"C" * 7
        p.close_consumer()
        t.join(5)
        assert not t.is_alive()
        assert p.counters(1) == (1, 0) and p.counters(2) == (0, 1) and p.counters(3) == (1, 0)
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()
