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

Ports: a port that is free while its controller is down can be taken by any local process, and the
controller then cannot start. :class:`Listeners` adopts listening sockets that a supervisor bound and
holds across restarts (systemd socket activation, ``sd_listen_fds(3)``): ``make_socket(fd=...)``
binds through such a socket (``ZMQ_USE_FD``) instead of making its own. Without one, a bind that
fails names the port's holder (:func:`port_holder`).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable
from pathlib import Path
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
                secure: Callable[[zmq.Socket[Any]], None] | None = None, max_bytes: int = -1,
                fd: int | None = None) -> zmq.Socket[bytes]:
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
        fd: a listening socket already bound to ``address`` (from :class:`Listeners`) to bind through;
            the ZeroMQ socket owns it from then on and closes it with itself.

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
        if fd is not None:
            sock.setsockopt(zmq.USE_FD, fd)
        if bind:
            sock.bind(address)
        else:
            sock.connect(address)
    except zmq.ZMQError as e:
        sock.close(linger=0)
        hint = in_use_hint(address) if e.errno == zmq.EADDRINUSE else ""
        raise ConfigError(f"{address}: cannot {'bind' if bind else 'connect'}: {e}{hint}") from e
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


# ---- ports held across restarts, and who holds a port ------------------------------------------
#: First descriptor a supervisor hands over (``SD_LISTEN_FDS_START`` of sd_listen_fds(3)).
LISTEN_FDS_START = 3
_WILDCARDS = frozenset({"*", "0.0.0.0", "::", ""})


def _endpoint(address: str) -> tuple[str, str, int]:
    """``tcp://host:port`` -> ("tcp", host, port); ``ipc:///path`` -> ("ipc", path, 0)."""
    scheme, _, rest = address.partition("://")
    if scheme == "ipc":
        return "ipc", rest, 0
    host, _, port = rest.rpartition(":")
    return scheme, host.strip("[]"), int(port) if port.isdigit() else -1


def _addresses_of(host: str) -> set[str]:
    """The IP addresses ``host`` (a literal or a name) stands for; empty when it resolves to none."""
    try:
        return {str(ipaddress.ip_address(host))}
    except ValueError:
        pass
    try:
        return {str(ipaddress.ip_address(i[4][0])) for i in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except (OSError, ValueError):
        return set()


class Listeners:
    """Listening sockets handed over by a supervisor (systemd socket activation, ``sd_listen_fds(3)``).

    A root-owned ``.socket`` unit binds the controller's ports at boot and keeps them while the
    controller restarts (and while it is down), so no other process can take one. Its sockets reach
    the controller as descriptors 3, 4, ... with ``LISTEN_PID`` (this process), ``LISTEN_FDS`` (how
    many) and ``LISTEN_FDNAMES`` (their names, for messages). Each is matched to a bind address by
    the address it is bound to, so the unit's order does not matter.

    Args:
        fds: inherited descriptor -> its name.
    """

    def __init__(self, fds: dict[int, str] | None = None) -> None:
        self._where: dict[int, tuple[str, str, int]] = {}
        self.names: dict[int, str] = {}
        for fd, name in (fds or {}).items():
            where = self._bound_to(fd)
            if where is None:
                raise ConfigError(f"inherited descriptor {fd} ({name}) is not a listening stream socket: "
                                  "the socket unit must use ListenStream=")
            os.set_inheritable(fd, False)  # the controller's alone, not its children's
            self._where[fd], self.names[fd] = where, name

    @classmethod
    def from_environment(cls) -> Listeners:
        """The sockets passed to this process (none unless ``LISTEN_PID`` is this process); the
        variables are removed so that no child process takes them as its own."""
        pid, count, names = (os.environ.pop(k, "") for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"))
        if not pid or pid != str(os.getpid()):
            return cls()
        if not count.isdigit():
            raise ConfigError(f"LISTEN_FDS = {count!r}: must be a count of descriptors")
        fds = range(LISTEN_FDS_START, LISTEN_FDS_START + int(count))
        labels = names.split(":") if names else []
        return cls({fd: labels[i] if i < len(labels) else f"fd {fd}" for i, fd in enumerate(fds)})

    @staticmethod
    def _bound_to(fd: int) -> tuple[str, str, int] | None:
        try:
            s = socket.socket(fileno=fd)
        except OSError:
            return None
        try:
            if s.type != socket.SOCK_STREAM or not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                return None
            if s.family == socket.AF_UNIX:
                name = s.getsockname()
                return "ipc", name.decode() if isinstance(name, bytes) else name, 0
            host, port = s.getsockname()[:2]
            return "tcp", str(ipaddress.ip_address(host)), port
        finally:
            s.detach()

    def take(self, address: str) -> int | None:
        """The inherited socket bound to ``address`` (removed from the set: the caller owns it), or
        None when there is none.

        Raises:
            ConfigError: an inherited socket has the address's port but another host (the socket
                unit and the config disagree).
        """
        kind, host, port = _endpoint(address)
        same_port = [fd for fd, (k, _h, p) in self._where.items() if k == kind and p == port]
        for fd in same_port:
            h = self._where[fd][1]
            if (os.path.abspath(h) == os.path.abspath(host) if kind == "ipc"
                    else (host in _WILDCARDS and h in ("0.0.0.0", "::")) or h in _addresses_of(host)):
                del self._where[fd]
                return fd
        if same_port and kind == "tcp":
            fd = same_port[0]
            h = self._where[fd][1]
            raise ConfigError(f"{address}: the inherited socket {self.names[fd]!r} listens on "
                              f"{'[' + h + ']' if ':' in h else h}:{port}, another address with this port: "
                              "make the socket unit's ListenStream= and the config's address the same")
        return None

    def left(self) -> list[str]:
        """Inherited sockets no address took, for a warning."""
        return [f"{self.names[fd]} ({k}://{h}:{p})" if k == "tcp" else f"{self.names[fd]} (ipc://{h})"
                for fd, (k, h, p) in self._where.items()]


def port_holder(port: int) -> str:
    """Who holds local TCP ``port`` (bound, not connected): "pid 123 (python3), uid 65534", "uid 65534"
    when its process is not visible to this user, "" when nothing is found."""
    owners: dict[str, int] = {}  # socket inode -> uid
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > 9 and int(f[1].rsplit(":", 1)[1], 16) == port and f[2].endswith(":0000"):
                owners[f[9]] = int(f[7])
    if not owners:
        return ""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            links = list((proc / "fd").iterdir())
        except OSError:  # gone, or another user's process
            continue
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:  # closed meanwhile (another thread of that process)
                continue
            if target.startswith("socket:[") and target[8:-1] in owners:
                try:
                    comm = (proc / "comm").read_text().strip()
                except OSError:
                    comm = "exited"
                return f"pid {proc.name} ({comm}), uid {owners[target[8:-1]]}"
    return ", ".join(f"uid {u}" for u in sorted(set(owners.values()))) + " (its process is not visible to this user)"


def in_use_hint(address: str) -> str:
    """What to say about an address already in use: its holder, and how to keep the port."""
    kind, _host, port = _endpoint(address)
    if kind != "tcp" or port <= 0:
        return " (is another daemon running there?)"
    holder = port_holder(port)
    return (f"; port {port} is held by {holder or 'an unknown process'}. A socket unit that holds the "
            "controller's ports across restarts (configs/deploy/dualscale-controller.socket) keeps every "
            "other process off them")
