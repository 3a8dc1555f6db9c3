"""Issue 13, port squatting: the controller's TCP ports held across restarts (socket activation).

A "supervisor" (this test process, standing in for systemd's socket unit) binds the controller's
ports once and hands them to each controller process the systemd way (descriptors 3.., LISTEN_PID,
LISTEN_FDS, LISTEN_FDNAMES). While it holds them, no other process can bind them, even while the
controller is down; a controller killed with SIGKILL is replaced by one that adopts the same sockets
and commands the actuator again. Without a supervisor, a controller whose port is taken refuses to
start and names the holder. Loopback only; every wait bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import zmq
from rt_helpers import make_keys, small_config
from test_attacks import decode_report
from test_e2e import scrape, total, wait_for

from dualscale.device.sim import SimNodeState
from dualscale.errors import ConfigError
from dualscale.runtime.keys import Security
from dualscale.runtime.transport import Listeners, make_socket, port_holder

#: Moves the descriptors of argv[1] to 3, 4, ... and execs the rest with the sd_listen_fds variables
#: (what systemd does between fork and exec; LISTEN_PID must be the pid of the process that execs).
SHIM = """
import fcntl, os, sys
fds = [int(f) for f in sys.argv[1].split(",")]
high = [fcntl.fcntl(f, fcntl.F_DUPFD, 100) for f in fds]
for f in fds:
    os.close(f)
for i, h in enumerate(high):
    os.dup2(h, 3 + i)
    os.close(h)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=sys.argv[2])
os.execv(sys.executable, [sys.executable, *sys.argv[3:]])
"""


def listening(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.bind((host, 0))
    s.listen(128)
    return s


def start_with_sockets(tmp_path: Path, name: str, socks: dict[str, socket.socket], *argv: str) -> subprocess.Popen:
    fds = [s.fileno() for s in socks.values()]
    with open(tmp_path / f"{name}.log", "w") as log:
        return subprocess.Popen([sys.executable, "-c", SHIM, ",".join(map(str, fds)), ":".join(socks), *argv],
                                pass_fds=fds, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))


#: A squatter, as an attacker's process would try: a ZeroMQ bind, then a raw bind with SO_REUSEADDR, of
#: each address of argv; prints one line per address: "" when it got the port, else the errors.
SQUATTER = """
import socket, sys, zmq
ctx = zmq.Context()
for address in sys.argv[1:]:
    s = ctx.socket(zmq.ROUTER)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.bind(address)
        print("")
        continue
    except zmq.ZMQError as e:
        err = str(e)
    finally:
        s.close(0)
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        raw.bind((host, int(port)))
        raw.listen(1)
        print("")
    except OSError as e:
        print(f"{err}; {e}")
    finally:
        raw.close()
ctx.term()
"""


def squat(*addresses: str) -> list[str]:
    """Run the squatter in a process of its own; what it got, per address."""
    out = subprocess.run([sys.executable, "-c", SQUATTER, *addresses], capture_output=True, text=True, timeout=120,
                         check=True)
    return out.stdout.splitlines()


def test_held_ports_survive_a_killed_controller_and_keep_squatters_off(tmp_path: Path, processes):
    keys = make_keys(tmp_path / "keys", instances=("p0", "d0"))
    held = {"reports": listening(), "actuators": listening(), "metrics": listening()}
    port = {k: s.getsockname()[1] for k, s in held.items()}
    addr = {k: f"tcp://127.0.0.1:{port[k]}" for k in ("reports", "actuators")}
    state = tmp_path / "node.state"
    cfg = {
        "security": {"mechanism": "curve", "keys_dir": str(keys)},
        "instances": [{"name": "p0", "phase": "prefill", "tp": 2, "gpus": [0, 1]},
                      {"name": "d0", "phase": "decode", "tp": 2, "gpus": [2, 3]}],
        "controller": {"report_address": addr["reports"], "actuator_address": addr["actuators"],
                       "heartbeat_s": 0.1, "metrics_port": port["metrics"]},
        "actuator": {"controller_address": addr["actuators"], "deadman_s": 1.0, "status_period_s": 0.1,
                     "sim": {"gpus": 4, "switch_delay_s": 0.0, "state_file": str(state)}},
    }
    path = tmp_path / "runtime.toml"
    path.write_bytes(tomli_w.dumps(cfg).encode())
    path.chmod(0o644)
    ctx = zmq.Context()
    engine = ctx.socket(zmq.PUSH)
    engine.setsockopt(zmq.LINGER, 0)
    Security("curve", keys, "engine-d0").client(engine)
    engine.connect(addr["reports"])
    seq = 0

    def serve(n: int) -> subprocess.Popen:
        p = start_with_sockets(tmp_path, f"serve-{n}", held, "-m", "dualscale.cli", "serve", "--config", str(path))
        processes.procs.append(p)
        return p

    def commanded(p: subprocess.Popen) -> bool:
        """Report for d0; true once the controller decided and the actuator locked d0's GPUs."""
        nonlocal seq
        seq += 1
        engine.send(decode_report("d0", epoch=1, seq=seq), zmq.NOBLOCK)
        return (total(scrape(port["metrics"]), "dualscale_decisions_total", instance="d0") > 0
                and node.locked_mhz(2) > 0 and node.locked_mhz(3) > 0)

    try:
        actuator = processes.start("actuator", "-m", "dualscale.cli", "actuator", "--config", str(path))
        wait_for("the simulated node", state.exists, procs=[actuator])
        node = SimNodeState.attach(state)
        first = serve(1)
        wait_for("decisions and d0's GPUs locked", lambda: commanded(first), procs=[actuator, first])
        assert "3 of 3 listening sockets inherited" in processes.log("serve-1")

        first.send_signal(signal.SIGKILL)
        first.wait(30)
        # the controller is down: the ports stay held, so nobody else can take them
        tried = squat(*addr.values(), f"tcp://127.0.0.1:{port['metrics']}")
        assert len(tried) == 3 and all("Address already in use" in t for t in tried), tried
        wait_for("the dead-man reset", lambda: node.locked_mhz(2) == 0, timeout_s=30, procs=[actuator])

        second = serve(2)  # adopts the same sockets: starts, decides and commands again
        wait_for("decisions and d0's GPUs locked again", lambda: commanded(second), procs=[actuator, second])
        assert second.poll() is None and "in use" not in processes.log("serve-2")
        node.close()
    finally:
        engine.close(0)
        ctx.term()
        for s in held.values():
            s.close()


def test_without_a_supervisor_a_taken_port_stops_the_controller_naming_the_holder(tmp_path: Path, processes):
    keys = make_keys(tmp_path / "keys", instances=("p0", "d0"))
    squatter = listening()  # this process takes the port while the controller is down
    cfg = {"security": {"mechanism": "curve", "keys_dir": str(keys)},
           "instances": [{"name": "d0", "phase": "decode", "tp": 2, "gpus": [2, 3]}],
           "controller": {"report_address": f"ipc://{tmp_path}/r",
                          "actuator_address": f"tcp://127.0.0.1:{squatter.getsockname()[1]}"}}
    path = tmp_path / "runtime.toml"
    path.write_bytes(tomli_w.dumps(cfg).encode())
    try:
        p = processes.start("serve", "-m", "dualscale.cli", "serve", "--config", str(path))
        assert p.wait(120) != 0
        out = processes.log("serve")
        assert f"port {squatter.getsockname()[1]} is held by pid {os.getpid()}" in out, out
        assert "dualscale-controller.socket" in out
    finally:
        squatter.close()


def test_a_taken_metrics_port_names_the_holder(tmp_path: Path):
    from dualscale.runtime.metrics import DaemonMetrics, serve_metrics

    squatter = listening()
    try:
        with pytest.raises(ConfigError, match=f"is held by pid {os.getpid()}"):
            serve_metrics(DaemonMetrics(), "127.0.0.1", squatter.getsockname()[1])
    finally:
        squatter.close()


# ---- Listeners: matching inherited sockets to addresses ----------------------------------------
def own(s: socket.socket) -> int:
    """A descriptor of ``s`` for a Listeners (which hands it on to an owner that closes it)."""
    return os.dup(s.fileno())


def test_listeners_match_by_bound_address_and_zeromq_binds_through_them_with_curve(tmp_path: Path):
    v4, wild = listening(), listening("::")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "a.sock"))
    unix.listen(8)
    held = Listeners({own(v4): "reports", own(wild): "actuators", own(unix): "plan"})
    try:
        assert held.take("tcp://127.0.0.1:1") is None  # no such port: bind as usual
        named = held.take(f"tcp://localhost:{v4.getsockname()[1]}")  # a name resolving to the address
        assert named is not None
        os.close(named)
        fd = held.take(f"tcp://*:{wild.getsockname()[1]}")
        assert fd is not None and held.take(f"tcp://*:{wild.getsockname()[1]}") is None  # taken once
        assert held.left() == [f"plan (ipc://{tmp_path}/a.sock)"]
        path_fd = held.take(f"ipc://{tmp_path}/a.sock")
        assert path_fd is not None and held.left() == []
        os.close(path_fd)
        # a CURVE server bound through the inherited socket talks to a CURVE client
        config = small_config(tmp_path)
        ctx = zmq.Context()
        ctl, eng = (Security("curve", config.security.keys_dir, n) for n in ("controller", "engine-d0"))
        ctl.authenticate(ctx, {"reports": ["engine-d0"]})
        pull = make_socket(ctx, zmq.PULL, f"tcp://*:{wild.getsockname()[1]}", bind=True, secure=ctl.server("reports"),
                           fd=fd)
        push = make_socket(ctx, zmq.PUSH, f"tcp://127.0.0.1:{wild.getsockname()[1]}", bind=False, secure=eng.client)
        push.send(b"over the inherited socket")
        assert pull.poll(10_000) and pull.recv() == b"over the inherited socket"
        assert not any(ctl.denied.values())
        push.close(0)
        pull.close(0)
        ctl.close()
        ctx.term()
    finally:
        for s in (v4, wild, unix):
            s.close()


def test_an_inherited_socket_on_the_port_but_another_host_is_a_config_error():
    s = listening()
    held = Listeners({own(s): "reports"})
    try:
        with pytest.raises(ConfigError, match=r"listens on 127.0.0.1:\d+, another address"):
            held.take(f"tcp://10.255.255.1:{s.getsockname()[1]}")
    finally:
        s.close()


def test_listeners_are_taken_only_by_the_process_they_were_passed_to(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert Listeners.from_environment().names == {}
    assert "LISTEN_FDS" not in os.environ  # never passed on to a child
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "two")
    with pytest.raises(ConfigError, match="LISTEN_FDS"):
        Listeners.from_environment()


def test_a_non_listening_descriptor_is_refused(tmp_path: Path):
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR)
    try:
        with pytest.raises(ConfigError, match="not a listening stream socket"):
            Listeners({fd: "reports"})
    finally:
        os.close(fd)


def test_port_holder_names_this_process():
    s = listening()
    port = s.getsockname()[1]
    try:
        assert port_holder(port).startswith(f"pid {os.getpid()} (")
    finally:
        s.close()
    assert port_holder(port) == ""  # nothing holds it any more
