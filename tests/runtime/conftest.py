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
