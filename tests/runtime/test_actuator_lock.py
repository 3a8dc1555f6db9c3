"""Issue 13, two actuators for one node: the node lock keeps a second one from touching any GPU.

Real actuator processes (sim backend, a state file shared with this test) and this process as the
controller (a ROUTER with the controller's key) on ipc://; every wait bounded.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
from pathlib import Path

import msgspec
import pytest
import tomli_w
import zmq
from rt_helpers import make_keys
from test_e2e import wait_for

from dualscale.device.sim import SimNodeState
from dualscale.errors import ConfigError
from dualscale.runtime.actuator import EXIT_NODE_LOCKED, NodeLocked, lock_node
from dualscale.runtime.config import DEFAULT_LOCK_FILE, ActuatorSettings
from dualscale.runtime.keys import Security
from dualscale.runtime.messages import ClockCommand, MsgType
from dualscale.runtime.serial import FrameDecoder, FrameEncoder

ENC, DEC = FrameEncoder(), FrameDecoder((MsgType.NODE_STATUS,))


class Controller:
    """This process as the node's controller: takes statuses, sends commands to the newest connection."""

    def __init__(self, keys: Path, address: str) -> None:
        self.ctx = zmq.Context()
        self.sec = Security("curve", keys, "controller")
        self.sec.authenticate(self.ctx, {"actuators": ["actuator-node0"]})
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.sec.server("actuators")(self.router)
        self.router.bind(address)
        self.route = b""
        self.seq = 0

    def pump(self) -> bool:
        """Take the waiting statuses (note the sender); true when there was one."""
        got = False
        while self.router.poll(20):
            self.route, frame = self.router.recv_multipart()
            DEC.decode(frame)
            got = True
        return got

    def command(self, instance: str, gpus: list[int], freq_mhz: int) -> None:
        self.seq += 1
        self.router.send_multipart([self.route, bytes(ENC.encode(MsgType.CLOCK_COMMAND,
                                                                 ClockCommand(instance, gpus, freq_mhz, self.seq)))])

    def close(self) -> None:
        self.router.close(0)
        self.sec.close()
        self.ctx.term()


def test_a_second_actuator_leaves_the_first_ones_locks_alone_until_it_dies(tmp_path: Path, processes):
    keys = make_keys(tmp_path / "keys", instances=("p0", "d0"))
    state, address = tmp_path / "node.state", f"ipc://{tmp_path}/a"
    path = tmp_path / "runtime.toml"
    path.write_bytes(tomli_w.dumps({
        "security": {"mechanism": "curve", "keys_dir": str(keys)},
        "instances": [{"name": "p0", "phase": "prefill", "tp": 2, "gpus": [0, 1]},
                      {"name": "d0", "phase": "decode", "tp": 2, "gpus": [2, 3]}],
        "actuator": {"controller_address": address, "deadman_s": 60.0, "status_period_s": 0.05,
                     "sim": {"gpus": 4, "switch_delay_s": 0.0, "state_file": str(state)}},
    }).encode())
    path.chmod(0o644)
    lock = Path(f"{state}.lock")
    ctl = Controller(keys, address)

    def actuator(name: str, *extra: str) -> subprocess.Popen:
        return processes.start(name, "-m", "dualscale.cli", "actuator", "--config", str(path), *extra)

    def lock_d0(p: subprocess.Popen, freq_mhz: int) -> None:
        old = ctl.route
        wait_for("a status from a new connection", lambda: ctl.pump() and ctl.route != old, timeout_s=60, procs=[p])
        ctl.command("d0", [2, 3], freq_mhz)
        wait_for("d0's GPUs locked", lambda: node.locked_mhz(2) == node.locked_mhz(3) == freq_mhz, timeout_s=30,
                 procs=[p])

    try:
        a = actuator("a")
        wait_for("the simulated node", state.exists, procs=[a])
        node = SimNodeState.attach(state)
        lock_d0(a, 1200)
        assert lock.read_text().strip() == str(a.pid)
        writes = node.snapshot()["writes"].copy()

        # B for the same node: refused by the lock before touching any GPU; A's locks are intact
        b = actuator("b")
        assert b.wait(120) == EXIT_NODE_LOCKED
        assert f"another actuator (pid {a.pid}) holds the node lock {lock}" in processes.log("b")
        assert (node.snapshot()["writes"] == writes).all()
        assert node.locked_mhz(2) == node.locked_mhz(3) == 1200 and a.poll() is None

        # A dies (kill -9): the kernel releases its lock; B starts, resets every GPU, takes commands
        a.send_signal(signal.SIGKILL)
        a.wait(30)
        b2 = actuator("b2")
        wait_for("B's start-up reset", lambda: all(node.snapshot()["writes"] > writes) and node.locked_mhz(2) == 0,
                 timeout_s=60, procs=[b2])
        assert lock.read_text().strip() == str(b2.pid)
        lock_d0(b2, 1500)

        # shadow mode takes no lock (it never writes a clock): it runs beside B and leaves its locks alone
        writes = node.snapshot()["writes"].copy()
        shadow = actuator("shadow", "--observe")
        wait_for("the shadow actuator running", lambda: "OBSERVE mode" in processes.log("shadow"), timeout_s=60,
                 procs=[shadow, b2])
        shadow.send_signal(signal.SIGTERM)
        assert shadow.wait(60) == 0
        assert (node.snapshot()["writes"] == writes).all() and node.locked_mhz(2) == 1500

        b2.send_signal(signal.SIGTERM)
        assert b2.wait(60) == 0 and node.locked_mhz(2) == 0
        node.close()
    finally:
        ctl.close()


# ---- lock_node ----------------------------------------------------------------------------------
def test_the_lock_is_exclusive_names_its_holder_and_is_free_once_closed(tmp_path: Path):
    path = tmp_path / "run" / "actuator.lock"
    fd = lock_node(path, "node0")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == f"{os.getpid()}\n"
    with pytest.raises(NodeLocked, match=rf"another actuator \(pid {os.getpid()}\) holds the node lock {path}"):
        lock_node(path, "node0")  # a second open file description: refused like a second process
    os.close(fd)
    os.close(lock_node(path, "node0"))


def test_a_lock_file_others_may_open_or_a_symlink_is_refused(tmp_path: Path):
    f = tmp_path / "actuator.lock"
    f.write_bytes(b"")
    f.chmod(0o644)  # anyone could open it and hold the lock, keeping the actuator from starting
    with pytest.raises(ConfigError, match="actuator lock .*mode 0644 lets group or others read"):
        lock_node(f, "node0")
    f.unlink()
    (tmp_path / "elsewhere").write_bytes(b"")
    f.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="symbolic link"):
        lock_node(f, "node0")


def test_which_lock_an_actuator_takes():
    def settings(**kw) -> ActuatorSettings:
        return msgspec.convert(kw, ActuatorSettings)

    assert settings(backend="nvml").lock_path() == DEFAULT_LOCK_FILE == "/run/dualscale/actuator.lock"
    assert settings(backend="nvml", lock_file="/run/x/a.lock").lock_path() == "/run/x/a.lock"
    assert settings(backend="sim", sim={"state_file": "node/n.state"}).lock_path() == "node/n.state.lock"
    assert settings(backend="sim").lock_path() == ""  # the simulated GPUs live in the process
    assert settings(backend="nvml", observe=True).lock_path() == ""
