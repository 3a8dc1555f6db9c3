"""The fault suite: kill -9 of each role at random moments of a running simulated node, over rounds.

Real processes on loopback ipc:// with CURVE keys: the actuator (sim backend), the controller, one
emulated prefill/decode pair (whose report relay is a process of its own). Each round kills the
actuator, hangs one (SIGSTOP: a second actuator started meanwhile must be refused by the node lock
without touching a GPU) and replaces it once killed, kills the controller and the relay (SIGKILL, at
random moments) and restarts the first two;
after each, every GPU must be reset or re-taken and decisions must flow again. At the end the
energy the controller counted over the whole run must be within 1 % of the simulated GPUs' true
energy (no window lost to an outage, none counted twice after a restart).

Recovery times are printed (``pytest -s``), not asserted (speed is measured, not tested); every
wait is bounded. ``DUALSCALE_FAULT_ROUNDS`` sets the rounds (default 1).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import tomli_w
from rt_helpers import make_keys
from test_e2e import free_port, scrape, total, wait_for

from dualscale.device.sim import SimBackend

GPUS = 4
STATUS_PERIOD_S = 0.1
ROUNDS = int(os.environ.get("DUALSCALE_FAULT_ROUNDS", "1"))


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def relay_of(pid: int) -> int | None:
    for c in children(pid):
        try:
            if b"dualscale.runtime.relay" in Path(f"/proc/{c}/cmdline").read_bytes():
                return c
        except OSError:
            pass
    return None


def test_kill_every_role_at_random_moments_energy_counted_once(tmp_path: Path, profile):
    rng = random.Random(13)
    state = tmp_path / "node.state"
    keys = make_keys(tmp_path / "keys", instances=("p0", "d0"))
    port = free_port()
    cfg = {
        "security": {"mechanism": "curve", "keys_dir": str(keys)},
        "instances": [{"name": "p0", "phase": "prefill", "tp": 2, "gpus": [0, 1]},
                      {"name": "d0", "phase": "decode", "tp": 2, "gpus": [2, 3]}],
        "controller": {"report_address": f"ipc://{tmp_path}/r", "actuator_address": f"ipc://{tmp_path}/a",
                       "heartbeat_s": 0.1, "metrics_port": port, "state_file": str(tmp_path / "controller.state")},
        "actuator": {"controller_address": f"ipc://{tmp_path}/a", "deadman_s": 1.0, "status_period_s": STATUS_PERIOD_S,
                     "sim": {"gpus": GPUS, "switch_delay_s": 0.02, "state_file": str(state)}},
    }
    path = tmp_path / "runtime.toml"
    path.write_bytes(tomli_w.dumps(cfg).encode())
    path.chmod(0o644)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs: dict[str, subprocess.Popen] = {}
    n = 0

    def start(role: str, *args: str) -> subprocess.Popen:
        nonlocal n
        n += 1
        with open(tmp_path / f"{role}-{n}.log", "w") as log:
            procs[role] = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                                           cwd=tmp_path)
        return procs[role]

    def actuator() -> subprocess.Popen:
        return start("actuator", "-m", "dualscale.cli", "actuator", "--config", str(path))

    def controller() -> subprocess.Popen:
        return start("controller", "-m", "dualscale.cli", "serve", "--config", str(path))

    def decisions() -> float:
        return total(scrape(port), "dualscale_decisions_total")

    def counted_j() -> float:
        return total(scrape(port), "dualscale_energy_joules_total")

    def truth_and_counted() -> tuple[float, float]:
        """The true energy, and the counted one half a status period later: the count reflects a
        counter reading up to one status period old, so on average from when the truth was read."""
        true_j = sum(truth.total_energy_j(g) for g in range(GPUS))
        time.sleep(STATUS_PERIOD_S / 2)
        return true_j, counted_j()

    def kill(role: str) -> None:
        p = procs[role]
        p.send_signal(signal.SIGKILL)
        p.wait(30)

    alive = lambda: list(procs.values())
    recovery: dict[str, list[float]] = {"actuator reset": [], "actuator re-locked": [],
                                        "hung actuator replaced": [], "controller": [], "relay": []}
    try:
        actuator()
        wait_for("the simulated node", state.exists, procs=alive())
        truth = SimBackend(profile, gpus=GPUS, state_file=state)
        controller()
        start("worker", "-m", "dualscale.runtime.emulate", "--config", str(path), "--prefill", "p0", "--decode", "d0",
              "--state-file", str(state), "--rate", "4", "--duration", "600")
        locked = lambda: all(truth.state.locked_mhz(g) > 0 for g in range(GPUS))
        wait_for("decisions", lambda: decisions() > 20, procs=alive())
        wait_for("every GPU locked", locked, procs=alive())
        time.sleep(0.5)
        true0, counted0 = truth_and_counted()
        assert counted0 > 0
        for rnd in range(ROUNDS):
            # the actuator: a new one resets every GPU at start, then the controller re-takes them
            time.sleep(rng.uniform(0.2, 1.5))
            writes = truth.state.snapshot()["writes"].copy()
            kill("actuator")
            t0 = time.monotonic()
            actuator()
            wait_for("the new actuator's resets", lambda w=writes: all(truth.state.snapshot()["writes"] > w),
                     timeout_s=60, procs=alive())
            recovery["actuator reset"].append(time.monotonic() - t0)
            wait_for("GPUs re-taken", locked, timeout_s=60, procs=alive())
            recovery["actuator re-locked"].append(time.monotonic() - t0)
            # a hung actuator (SIGSTOP): a second one started meanwhile is refused by the node lock and
            # touches no GPU (the hung one's connection is meanwhile dropped by the ZMTP heartbeat);
            # once the hung one is killed, a replacement takes the lock, resets and is commanded at once
            time.sleep(rng.uniform(0.2, 1.5))
            hung = procs["actuator"]
            hung.send_signal(signal.SIGSTOP)
            writes = truth.state.snapshot()["writes"].copy()
            second = start("second-actuator", "-m", "dualscale.cli", "actuator", "--config", str(path))
            assert second.wait(120) == 75  # EXIT_NODE_LOCKED, before touching any GPU
            procs.pop("second-actuator")
            assert (truth.state.snapshot()["writes"] == writes).all() and locked()
            kill("actuator")
            t0 = time.monotonic()
            actuator()
            wait_for("the replacement resets and re-locks every GPU",
                     lambda w=writes: all(truth.state.snapshot()["writes"] >= w + 2) and locked(), timeout_s=60,
                     procs=alive())
            recovery["hung actuator replaced"].append(time.monotonic() - t0)
            # the controller: a new one resumes decisions and its energy count from its state file
            time.sleep(rng.uniform(0.2, 1.5))
            kill("controller")
            t0 = time.monotonic()
            controller()
            wait_for("decisions after the controller restart", lambda: decisions() > 0 and locked(),
                     timeout_s=90, procs=alive())
            recovery["controller"].append(time.monotonic() - t0)
            # the relay: the engine's agent replaces it
            time.sleep(rng.uniform(0.2, 1.5))
            old = relay_of(procs["worker"].pid)
            assert old is not None
            os.kill(old, signal.SIGKILL)
            t0 = time.monotonic()
            d0 = decisions()
            wait_for("a new relay", lambda o=old: relay_of(procs["worker"].pid) not in (None, o), timeout_s=30,
                     procs=alive())
            wait_for("reports through the new relay", lambda d=d0: decisions() > d + 5, timeout_s=30, procs=alive())
            recovery["relay"].append(time.monotonic() - t0)
        # quiesce (the engine stops; the GPUs idle), then compare the counted energy with the truth
        kill("worker")
        procs.pop("worker")
        time.sleep(0.5)
        true1, counted1 = truth_and_counted()
        err = (counted1 - counted0) / (true1 - true0) - 1
        print(f"\n{ROUNDS} round(s) of kill -9 (actuator, controller, relay): energy counted "
              f"{counted1 - counted0:.0f} J vs true {true1 - true0:.0f} J, error {err * 100:+.2f} %")
        for role, ts in recovery.items():
            print(f"  recovery, {role}: " + ", ".join(f"{t:.2f} s" for t in ts))
        assert abs(err) < 0.01
        truth.close()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait(30)
