"""A byte ring in shared memory: how a worker agent hands reports to its relay without a system call.

Handing a frame to a ZeroMQ socket wakes ZeroMQ's I/O thread, and on a loaded or virtualised host
that wake-up (an inter-processor interrupt, often a preemption of the caller) costs the engine's
thread tens of microseconds. Writing into shared memory that another process polls costs a copy.

Layout (one shared mapping; positions are byte counts that only grow, the index is ``pos % capacity``)::

    0      magic "DSRING01", capacity (u64), tags (u64), checked (u64)
    64     head (u64)     written only by the producer: end of the last published record
    128    tail (u64)     written only by the consumer: start of the first unread record
    192    closing (u64)  producer -> consumer: drain and exit
    200    discarded (u64) bytes the consumer skipped over (records that never became whole)
    256    per tag: sent (u64), dropped (u64)   written only by the consumer (the relay)
    DATA   records: header (u32 check, u32 length, u32 tag, u32 position) + payload, padded to
           16 bytes; check = CRC-32 of the record with the check field zero (0 when unchecked). A
           header never straddles the end (positions are multiples of 16); a payload may, and
           continues at the start, so any record up to the capacity fits in an empty ring.

There is one producer at a time (:class:`RingProducer` serialises threads with a lock) and one
consumer. Python gives no memory barriers. On x86-64 none is needed (stores become visible in
program order, loads are not reordered with loads, and glibc fences its non-temporal copies). Weakly
ordered CPUs (Arm, e.g. Grace Hopper) may make the head visible before the record it publishes, so
there the ring is *checked*: every record carries a CRC-32 of its header and payload, and a consumer
that reads a record not yet fully visible sees a mismatch and retries on its next poll instead of
delivering garbage (the CRC costs the producer ~0.5 us per KB, more with cold caches, hence not
everywhere). Every record also carries its position, so a header left from the previous lap is never
taken for a new one, and the consumer publishes the tail only after reading a record, so the producer
never overwrites one still being read.
"""

from __future__ import annotations

import mmap
import os
import platform
import struct
import threading
import zlib

MAGIC = b"DSRING01"
#: Default capacity: ~1,000 reports of 32 requests, ~170 of 256.
DEFAULT_CAPACITY_BYTES = 1 << 20
#: Tags (one per worker agent sharing the ring) with their own counters.
DEFAULT_TAGS = 1024
#: Whether records carry a CRC by default: only where the CPU may reorder stores (see above; 32-bit
#: x86 is checked too: its 8-byte head and tail stores are not atomic).
CHECKED_DEFAULT = platform.machine().lower() not in ("x86_64", "amd64")

_HEAD, _TAIL, _CLOSING, _DISCARDED, _COUNTERS = 64, 128, 192, 200, 256
#: Bytes a producer reserves in front of each payload for the record header.
HEADER_BYTES = 16
_REC = struct.Struct("<IIII")  # check, length, tag, position (low 32 bits)
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_MASK32 = 0xFFFFFFFF
_ZERO_CHECK = zlib.crc32(bytes(4))  # CRC state after a zeroed check field: the consumer resumes from it


def _data_offset(tags: int) -> int:
    return -(-(_COUNTERS + 16 * tags) // 4096) * 4096


class _Ring:
    """The shared mapping and its geometry (both ends)."""

    def __init__(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        if size < 4096:
            raise ValueError(f"ring fd {fd}: {size} bytes is not a ring (too small)")
        self.fd = fd
        # populate the page tables now: no report pays a first-touch page fault
        self.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        magic = self.mm[:8]
        if magic != MAGIC:
            self.mm.close()
            raise ValueError(f"ring fd {fd}: bad magic {magic!r}, not a dualscale ring")
        self.capacity, self.tags, checked = struct.unpack_from("<QQQ", self.mm, 8)
        self.checked = bool(checked)
        self.data = _data_offset(self.tags)
        self._counts: mmap.mmap | bytes = self.mm  # where the counters are read: a copy once closed

    def counters(self, tag: int) -> tuple[int, int]:
        """(sent, dropped) the consumer counted for ``tag`` (the last values once closed)."""
        return struct.unpack_from("<QQ", self._counts, _COUNTERS + 16 * tag)

    @property
    def discarded_bytes(self) -> int:
        """Bytes the consumer skipped over (see :meth:`RingConsumer.discard_stuck`)."""
        return _U64.unpack_from(self._counts, _DISCARDED)[0]

    @property
    def closed(self) -> bool:
        return self.mm.closed

    def close(self) -> None:
        """Unmap and close the descriptor; the counters stay readable."""
        if not self.mm.closed:
            self._counts = self.mm[:self.data]
            self.mm.close()
            os.close(self.fd)


def create_ring_fd(capacity_bytes: int = DEFAULT_CAPACITY_BYTES, tags: int = DEFAULT_TAGS,
                   checked: bool = CHECKED_DEFAULT) -> int:
    """A new, zeroed ring in anonymous shared memory; returns its file descriptor (inheritable by a
    child through ``pass_fds``; nothing is left on disk when both ends close it)."""
    if capacity_bytes < 4096 or capacity_bytes & (capacity_bytes - 1):
        raise ValueError(f"capacity_bytes = {capacity_bytes}: must be a power of two >= 4096")
    if not 1 <= tags <= 65536:
        raise ValueError(f"tags = {tags}: must be in [1, 65536]")
    fd = os.memfd_create("dualscale-ring") if hasattr(os, "memfd_create") else _unlinked_file()
    try:
        size = _data_offset(tags) + capacity_bytes
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as mm:
            mm[:8] = MAGIC
            struct.pack_into("<QQQ", mm, 8, capacity_bytes, tags, int(checked))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unlinked_file() -> int:
    import tempfile

    with tempfile.TemporaryFile() as f:  # unlinked at creation: nothing is left behind
        return os.dup(f.fileno())


class RingProducer(_Ring):
    """The writing end. :meth:`push` never blocks beyond a lock held only by other pushes."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self._head = _U64.unpack_from(self.mm, _HEAD)[0]
        self._free = 0  # bytes known free after head (re-read from the tail only when short)
        self._lock = threading.Lock()

    def push(self, record: bytearray, tag: int) -> bool:
        """Append one record: ``record`` is :data:`HEADER_BYTES` reserved bytes (overwritten here)
        followed by the payload. False (nothing written) when the ring has no room for it now (or
        ever: larger than the capacity, or a tag out of range)."""
        n = len(record) - HEADER_BYTES
        size = HEADER_BYTES + ((n + 15) & ~15)
        cap = self.capacity
        if n < 0 or size > cap or not 0 <= tag < self.tags:
            return False
        mm = self.mm
        lock = self._lock
        lock.acquire()
        try:
            head = self._head
            if size > self._free:
                # reading the consumer's cache line costs a transfer between cores: only when short
                self._free = cap - (head - _U64.unpack_from(mm, _TAIL)[0])
                if size > self._free:
                    return False
            _REC.pack_into(record, 0, 0, n, tag, head & _MASK32)
            if self.checked:
                _U32.pack_into(record, 0, zlib.crc32(record))
            idx = head & (cap - 1)
            at = self.data + idx
            first = cap - idx  # bytes before the end (>= 16: the header always fits)
            if len(record) <= first:
                mm[at:at + len(record)] = record
            else:
                mm[at:at + first] = memoryview(record)[:first]
                mm[self.data:self.data + len(record) - first] = memoryview(record)[first:]
            self._head = head + size
            self._free -= size
            _U64.pack_into(mm, _HEAD, head + size)
        finally:
            lock.release()
        return True

    def close_consumer(self) -> None:
        """Ask the consumer to drain what is there and exit."""
        _U64.pack_into(self.mm, _CLOSING, 1)


class RingConsumer(_Ring):
    """The reading end (the relay)."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self._tail = _U64.unpack_from(self.mm, _TAIL)[0]

    @property
    def closing(self) -> bool:
        return bool(_U64.unpack_from(self.mm, _CLOSING)[0])

    def drain(self, limit: int = 1 << 30) -> list[tuple[int, memoryview]]:
        """Up to ``limit`` complete records as (tag, payload), oldest first, and free their space.

        Stops early at a record that is not fully visible yet (it is read on a later call).
        """
        head = _U64.unpack_from(self.mm, _HEAD)[0]
        tail = self._tail
        out: list[tuple[int, memoryview]] = []
        while tail < head and len(out) < limit:
            got = self._read(tail, head)
            if got is None:
                break
            out.append(got[:2])
            tail = got[2]
        self._publish(tail)
        return out

    def _header(self, tail: int, head: int) -> tuple[int, int, int, int] | None:
        """(check, length, tag, size) of the record at ``tail``, or None while its header is not
        visible yet (or is one left from an earlier lap)."""
        check, n, tag, pos32 = _REC.unpack_from(self.mm, self.data + (tail & (self.capacity - 1)))
        size = HEADER_BYTES + ((n + 15) & ~15)
        if pos32 != tail & _MASK32 or tag >= self.tags or size > head - tail:
            return None
        return check, n, tag, size

    def _read(self, tail: int, head: int) -> tuple[int, memoryview, int] | None:
        """(tag, payload, next position) of the record at ``tail``, or None while it is not whole."""
        header = self._header(tail, head)
        if header is None:
            return None
        check, n, tag, size = header
        mm, cap, data = self.mm, self.capacity, self.data
        idx = tail & (cap - 1)
        at = data + idx
        first = cap - idx - 4  # the record's bytes after the check field, before the end
        body = mm[at + 4:at + HEADER_BYTES + n]  # a copy: the space is freed once read
        if len(body) < HEADER_BYTES - 4 + n:  # wraps: the rest is at the start
            body += mm[data:data + HEADER_BYTES - 4 + n - first]
        if self.checked and zlib.crc32(body, _ZERO_CHECK) != check:
            return None  # payload not visible yet
        return tag, memoryview(body)[HEADER_BYTES - 4:], tail + size

    def _publish(self, tail: int) -> None:
        if tail != self._tail:
            self._tail = tail
            _U64.pack_into(self.mm, _TAIL, tail)

    @property
    def backlog_bytes(self) -> int:
        """Bytes published and not yet drained."""
        return _U64.unpack_from(self.mm, _HEAD)[0] - self._tail

    def discard_stuck(self) -> int | None:
        """Skip the first unread record, which never became whole (only a bug or outside
        interference can cause that; stores become visible in nanoseconds). Returns its tag, to
        count it as dropped, or None when its header is unreadable too: then everything published
        so far is skipped (the next record cannot be found). Skipped bytes are counted."""
        head = _U64.unpack_from(self.mm, _HEAD)[0]
        tail = self._tail
        if tail >= head:
            return None
        header = self._header(tail, head)
        nxt = head if header is None else tail + header[3]
        _U64.pack_into(self.mm, _DISCARDED, _U64.unpack_from(self.mm, _DISCARDED)[0] + nxt - tail)
        self._publish(nxt)
        return None if header is None else header[2]

    def count(self, tag: int, sent: int, dropped: int) -> None:
        """Add to ``tag``'s counters (read by the producer's side)."""
        at = _COUNTERS + 16 * tag
        s, d = struct.unpack_from("<QQ", self.mm, at)
        struct.pack_into("<QQ", self.mm, at, s + sent, d + dropped)
