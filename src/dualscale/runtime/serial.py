"""Encoding and decoding of wire frames (see :mod:`dualscale.runtime.messages` for the framing).

One :class:`FrameEncoder` per socket owner (it reuses one buffer) and one :class:`FrameDecoder` per
receiving endpoint, accepting only the message types that endpoint handles. msgpack only: there is
no pickle path, and an unknown type is rejected, not guessed at.
"""

from __future__ import annotations

from typing import Any

import msgspec

from dualscale.errors import ProtocolError
from dualscale.runtime.messages import BODY, PROTOCOL_VERSION, MsgType

HEADER_BYTES = 2

#: Why a frame was rejected: the ``reason`` of the ProtocolError, and the label of the drop counters.
REASONS = ("malformed", "version", "type", "unknown_instance", "out_of_order", "invalid", "identity", "conflict")


class FrameEncoder:
    """Encodes messages into frames, reusing one buffer (the caller sends it before the next encode).

    Args:
        reserve: bytes left free in front of each frame, for a caller's own header (the worker
            agent's ring record header).
    """

    def __init__(self, reserve: int = 0) -> None:
        self._enc = msgspec.msgpack.Encoder()
        self._buf = bytearray(256)
        self._at = reserve

    def encode(self, mtype: MsgType, msg: msgspec.Struct) -> bytearray:
        """``reserve`` bytes, then the frame of ``msg`` (valid until the next call: ZeroMQ copies it
        on send)."""
        buf, at = self._buf, self._at
        self._enc.encode_into(msg, buf, at + HEADER_BYTES)
        buf[at] = PROTOCOL_VERSION
        buf[at + 1] = mtype
        return buf


class FrameDecoder:
    """Decodes frames of the accepted message types; anything else raises :class:`ProtocolError`."""

    def __init__(self, accept: tuple[MsgType, ...]) -> None:
        self._dec: dict[int, msgspec.msgpack.Decoder[Any]] = {
            int(t): msgspec.msgpack.Decoder(BODY[t]) for t in accept}

    def decode(self, frame: bytes | memoryview) -> tuple[MsgType, Any]:
        """(type, Struct) of one frame.

        Raises:
            ProtocolError: ``reason`` is ``"version"`` (other major version), ``"type"`` (a type
                this endpoint does not accept) or ``"malformed"`` (too short or a bad body).
        """
        if len(frame) < HEADER_BYTES:
            raise ProtocolError("malformed", f"frame of {len(frame)} bytes is shorter than the header")
        if frame[0] != PROTOCOL_VERSION:
            raise ProtocolError("version", f"protocol version {frame[0]}, this end speaks {PROTOCOL_VERSION}")
        dec = self._dec.get(frame[1])
        if dec is None:
            raise ProtocolError("type", f"message type {frame[1]} not accepted here")
        try:
            return MsgType(frame[1]), dec.decode(memoryview(frame)[HEADER_BYTES:])
        except msgspec.DecodeError as e:  # ValidationError is a DecodeError
            raise ProtocolError("malformed", str(e)) from e
