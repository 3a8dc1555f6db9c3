from __future__ import annotations

import msgspec
import pytest

from dualscale.runtime.config import RuntimeConfig


def small_config(tmp_path, **controller) -> RuntimeConfig:
    """One prefill (TP2, GPUs 0-1) and one decode (TP2, GPUs 2-3) instance on node0, ipc sockets in tmp_path."""
    raw = {
        "instances": [
            {"name": "p0", "phase": "prefill", "tp": 2, "gpus": [0, 1]},
            {"name": "d0", "phase": "decode", "tp": 2, "gpus": [2, 3]},
        ],
        "controller": {"report_address": f"ipc://{tmp_path}/reports", "actuator_address": f"ipc://{tmp_path}/act",
                       "heartbeat_s": 0.05} | controller,
        "actuator": {"controller_address": f"ipc://{tmp_path}/act", "deadman_s": 1.0, "status_period_s": 0.05,
                     "sim": {"gpus": 4, "switch_delay_s": 0.0}},
    }
    return msgspec.convert(raw, RuntimeConfig)


@pytest.fixture
def config(tmp_path):
    return small_config(tmp_path)


@pytest.fixture(scope="session")
def make_config():
    return small_config


class Processes:
    """Child processes of one test (``python -m ...`` each), logs in ``tmp_path/<name>.log``; stopped at teardown."""

    def __init__(self, tmp_path) -> None:
        import os

        self.tmp_path = tmp_path
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.procs: list = []

    def start(self, name: str, *args: str):
        import subprocess
        import sys

        with open(self.tmp_path / f"{name}.log", "w") as log:  # the child keeps its own descriptor
            p = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                 cwd=self.tmp_path)
        self.procs.append(p)
        return p

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text()

    def stop_all(self) -> None:
        import signal
        import subprocess

        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


@pytest.fixture
def processes(tmp_path):
    ps = Processes(tmp_path)
    yield ps
    ps.stop_all()
