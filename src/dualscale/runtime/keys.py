"""CURVE identities of the runtime's roles: key files, allow-lists, and the sockets' security settings.

Every runtime socket is authenticated and encrypted with ZeroMQ CURVE unless a config asks for plain
ZeroMQ (``[security] mechanism = "none"``, warned about at start). Each role has a key pair, named::

    controller          the controller daemon (the CURVE server of every socket)
    actuator-<node>     the actuator of one node
    engine-<instance>   the worker agent (its report relay) of one instance

``dualscale keys`` writes them into a directory: ``<name>.key`` holds the public key (mode 0644),
``<name>.key_secret`` the pair (mode 0600), in pyzmq's certificate format. A host gets the secret
file of its own role only, and the public files of the roles it must recognise: every host needs
``controller.key``; the controller needs every ``actuator-*.key`` and ``engine-*.key``.

Identity binding: the controller's authenticator (ZAP) accepts, per socket, only the public keys of
the roles allowed there (reports: the configured instances' engines; actuator socket: the configured
nodes' actuators) and names each connection by its role (the ZeroMQ ``User-Id`` of every message it
sends). The daemon then takes a report only for the instance its key names and a status only for the
node its key names. Clients pin the controller's public key, so an actuator takes commands only from
the holder of ``controller.key_secret``.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from dualscale._files import write_atomic
from dualscale.errors import ConfigError
from dualscale.runtime.trust import read_trusted

log = logging.getLogger("dualscale.runtime.keys")

CONTROLLER = "controller"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_KEY_RE = re.compile(rb'^\s*(public|secret)-key\s*=\s*"([^"]{40})"\s*$', re.MULTILINE)


def actuator_name(node: str) -> str:
    return f"actuator-{node}"


def engine_name(instance: str) -> str:
    return f"engine-{instance}"


def role_names(nodes: Iterable[str], instances: Iterable[str]) -> list[str]:
    """Every key name a deployment needs: the controller, one actuator per node, one engine per instance."""
    return [CONTROLLER, *sorted({actuator_name(n) for n in nodes}), *(engine_name(i) for i in instances)]


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise ValueError(f"key name {name!r}: letters, digits, '.', '_' and '-' only, at most 128 characters")


def write_keypair(directory: str | Path, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """Make a CURVE key pair ``name`` in ``directory`` (created 0700 if missing); returns (public, secret).

    Raises:
        FileExistsError: the pair exists and ``force`` is false.
        ConfigError: ``directory`` is not a directory owned by this user and closed to others.
    """
    _check_name(name)
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"key directory {d}: must be a real directory owned by uid {os.geteuid()} "
                          f"and not writable by group or others")
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    if not force and (public.exists() or secret.exists()):
        raise FileExistsError(f"{secret}: a key pair {name!r} exists already (--force replaces it)")
    pub, sec = zmq.curve_keypair()
    head = f"#   dualscale CURVE key pair {name!r} (dualscale keys)\nmetadata\n    name = \"{name}\"\ncurve\n"
    # private from the start, never through a planted symlink, durable before it appears
    write_atomic(secret, (head + f'    public-key = "{pub.decode()}"\n    secret-key = "{sec.decode()}"\n').encode(),
                 mode=0o600, fsync=True)
    write_atomic(public, (head + f'    public-key = "{pub.decode()}"\n').encode(), mode=0o644, fsync=True)
    return public, secret


def _parse(data: bytes, path: Path) -> dict[str, bytes]:
    keys = {m.group(1).decode(): m.group(2) for m in _KEY_RE.finditer(data)}
    if "public" not in keys:
        raise ConfigError(f"key file {path}: no public-key line (make keys with `dualscale keys`)")
    return keys


def load_public(directory: str | Path, name: str) -> bytes:
    """The z85 public key ``name`` from ``directory`` (the file checked like every file a privileged role reads)."""
    p = Path(directory) / f"{name}.key"
    return _parse(read_trusted(p, "public key", max_bytes=4096), p)["public"]


def load_secret(directory: str | Path, name: str) -> tuple[bytes, bytes]:
    """The z85 (public, secret) pair ``name``; the secret file must be closed to group and others."""
    p = Path(directory) / f"{name}.key_secret"
    keys = _parse(read_trusted(p, "secret key", secret=True, max_bytes=4096), p)
    if "secret" not in keys:
        raise ConfigError(f"secret key file {p}: no secret-key line")
    return keys["public"], keys["secret"]


class Security:
    """One process's side of CURVE (or plain ZeroMQ when ``mechanism = "none"``).

    Args:
        mechanism: ``"curve"`` or ``"none"``.
        keys_dir: the key directory (see the module docstring).
        name: this process's own key name (e.g. ``"controller"``, ``"actuator-node0"``).
    """

    def __init__(self, mechanism: str, keys_dir: str | Path, name: str) -> None:
        self.curve = mechanism == "curve"
        self.keys_dir = Path(keys_dir)
        self.name = name
        self.public = self.secret = self.server_public = b""
        self._auth: _Authenticator | None = None
        if not self.curve:
            log.warning("%s: plain ZeroMQ ([security] mechanism = \"none\"): peers are NOT authenticated and "
                        "traffic is NOT encrypted; anyone who reaches the sockets can command or impersonate "
                        "this role. Use only on a single-user host.", name)
            return
        self.public, self.secret = load_secret(self.keys_dir, name)
        if name != CONTROLLER:
            self.server_public = load_public(self.keys_dir, CONTROLLER)

    def client(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE client that talks only to the controller's key (before connect)."""
        if self.curve:
            sock.curve_serverkey = self.server_public
            sock.curve_publickey = self.public
            sock.curve_secretkey = self.secret

    def server(self, domain: str) -> Any:
        """A hook making a socket a CURVE server whose peers are checked against ``domain``'s allow-list."""
        def setup(sock: zmq.Socket[Any]) -> None:
            if self.curve:
                sock.curve_server = True
                sock.curve_secretkey = self.secret
                sock.zap_domain = domain.encode()
        return setup

    def authenticate(self, ctx: zmq.Context[Any], allow: dict[str, list[str]]) -> None:
        """Start the authenticator of ``ctx``: per domain, the key names allowed to connect. A name whose
        public key is missing is logged and left out (that peer cannot connect)."""
        if not self.curve:
            return
        by_key: dict[bytes, str] = {}
        domains: dict[str, set[bytes]] = {}
        for domain, names in allow.items():
            domains[domain] = set()
            for n in names:
                try:
                    k = load_public(self.keys_dir, n)
                except ConfigError as e:
                    log.warning("%s: %s: %s cannot connect", self.name, e, n)
                    continue
                by_key[k] = n
                domains[domain].add(k)
        self._auth = _Authenticator(ctx, by_key, domains)
        self._auth.start()

    @property
    def denied(self) -> dict[str, int]:
        """Connections refused by the authenticator, per domain."""
        return dict(self._auth.denied) if self._auth is not None else {}

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


class _Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler with per-domain allow-lists and the role name as User-Id."""

    def __init__(self, ctx: zmq.Context[Any], by_key: dict[bytes, str], domains: dict[str, set[bytes]]) -> None:
        super().__init__(ctx, log=logging.getLogger("dualscale.runtime.zap"))
        self._names = by_key
        self._domains = domains
        self._lock = threading.Lock()
        self.denied: dict[str, int] = dict.fromkeys(domains, 0)
        for domain in domains:
            self.configure_curve_callback(domain, self)

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self._domains.get(domain, ())
        if not ok:
            with self._lock:
                self.denied[domain] = self.denied.get(domain, 0) + 1
        return ok

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self._names[zmq.utils.z85.encode(client_public_key)]
