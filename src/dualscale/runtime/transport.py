"""ZeroMQ sockets with control-loop defaults: every runtime socket is made here.

Defaults: ``LINGER`` 0 (a closing process never waits on a dead peer), *bounded* high-water marks
(a stale report or clock is worth less than a fresh one, so excess is dropped, not queued), and
``IMMEDIATE`` on connecting senders (nothing is queued for a peer that is not connected, so a
missing controller turns into a counted drop at once).

``CONFLATE`` is not used on the command channel although it carries "latest value" data: it keeps
one message per *socket*, and one socket carries the clocks of many instances. The actuator instead
keeps the newest command per instance when it drains its socket (latest wins, per key).

Trust: ``secure`` configures CURVE (see :mod:`dualscale.runtime.keys`) before the socket binds or
connects; ``max_bytes`` sets ``MAXMSGSIZE`` (a peer sending a larger frame is disconnected before the
frame is buffered); ROUTER and DEALER sockets exchange ZMTP heartbeats, so a hung or vanished peer's
connection is closed within ``HEARTBEAT_TIMEOUT_MS`` instead of holding its place for minutes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import zmq

from dualscale.errors import ConfigError

#: High-water mark (messages) of every runtime socket unless a caller asks otherwise.
DEFAULT_HWM = 1000
#: Plain-int socket constants for hot paths (pyzmq's enum operators cost microseconds).
EVENTS, POLLIN, POLLOUT, NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.NOBLOCK)
#: ZMTP heartbeat of ROUTER/DEALER connections: ping every interval, drop after the timeout.
HEARTBEAT_IVL_MS = 250
HEARTBEAT_TIMEOUT_MS = 1000


def make_socket(ctx: zmq.Context[zmq.Socket[bytes]], kind: int, address: str, *, bind: bool,
                hwm: int = DEFAULT_HWM, routing_id: bytes | None = None, immediate: bool = False,
                router_mandatory: bool = False, subscribe: bytes | None = None,
                secure: Callable[[zmq.Socket[Any]], None] | None = None, max_bytes: int = -1) -> zmq.Socket[bytes]:
    """Create, configure, and bind or connect one socket.

    Args:
        ctx: the ZeroMQ context.
        kind: ``zmq.PUSH``, ``zmq.PULL``, ``zmq.ROUTER``, ``zmq.DEALER``, ``zmq.PUB`` or ``zmq.SUB``.
        address: ``tcp://host:port`` or ``ipc:///path``.
        bind: bind (the stable end) or connect.
        hwm: send and receive high-water mark (messages), >= 1.
        routing_id: identity of a DEALER as the ROUTER sees it.
        immediate: queue only on completed connections (connecting senders).
        router_mandatory: a ROUTER raises on an unknown peer instead of silently dropping.
        subscribe: SUB prefix to subscribe to (``b""`` for everything).
        secure: configures the socket's security (CURVE server or client) before bind/connect.
        max_bytes: largest frame accepted (-1 = no limit).

    Raises:
        ConfigError: the address is malformed or cannot be bound (e.g. already in use).
    """
    if hwm < 1:
        raise ValueError(f"hwm = {hwm}: must be >= 1 (bounded queues; 0 would mean unbounded)")
    sock = ctx.socket(kind)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        if routing_id is not None:
            sock.setsockopt(zmq.ROUTING_ID, routing_id)
        if immediate:
            sock.setsockopt(zmq.IMMEDIATE, 1)
        if router_mandatory:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if subscribe is not None:
            sock.setsockopt(zmq.SUBSCRIBE, subscribe)
        if max_bytes >= 0:
            sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
        if kind in (zmq.ROUTER, zmq.DEALER):
            sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        if secure is not None:
            secure(sock)
        if kind in (zmq.PUSH, zmq.DEALER) and not bind:
            # reconnect quickly after a controller restart, but back off up to 1 s
            sock.setsockopt(zmq.RECONNECT_IVL, 50)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if bind:
            sock.bind(address)
        else:
            sock.connect(address)
    except zmq.ZMQError as e:
        sock.close(linger=0)
        hint = " (is another daemon running there?)" if e.errno == zmq.EADDRINUSE else ""
        raise ConfigError(f"{address}: cannot {'bind' if bind else 'connect'}: {e}{hint}") from e
    except BaseException:
        sock.close(linger=0)
        raise
    return sock
