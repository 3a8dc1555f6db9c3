from __future__ import annotations

import pytest
from rt_helpers import small_config


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
