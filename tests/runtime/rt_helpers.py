"""Shared helpers of the runtime tests (configs with keys, policies, security objects)."""

from __future__ import annotations

from pathlib import Path

import msgspec

from dualscale.runtime.config import NodePolicy, RuntimeConfig
from dualscale.runtime.keys import Security, role_names, write_keypair


def make_keys(keys_dir: Path, nodes=("node0",), instances=("p0", "d0")) -> Path:
    """Key pairs of every role of a test deployment (skips pairs that exist)."""
    for name in role_names(nodes, instances):
        if not (keys_dir / f"{name}.key_secret").exists():
            write_keypair(keys_dir, name)
    return keys_dir


def small_config(tmp_path, mechanism: str = "curve", **controller) -> RuntimeConfig:
    """One prefill (TP2, GPUs 0-1) and one decode (TP2, GPUs 2-3) instance on node0, ipc sockets in tmp_path,
    CURVE keys in tmp_path/keys (or plain ZeroMQ with ``mechanism="none"``)."""
    keys = make_keys(Path(tmp_path) / "keys") if mechanism == "curve" else Path(tmp_path) / "keys"
    raw = {
        "instances": [
            {"name": "p0", "phase": "prefill", "tp": 2, "gpus": [0, 1]},
            {"name": "d0", "phase": "decode", "tp": 2, "gpus": [2, 3]},
        ],
        "controller": {"report_address": f"ipc://{tmp_path}/reports", "actuator_address": f"ipc://{tmp_path}/act",
                       "heartbeat_s": 0.05} | controller,
        "actuator": {"controller_address": f"ipc://{tmp_path}/act", "deadman_s": 1.0, "status_period_s": 0.05,
                     "sim": {"gpus": 4, "switch_delay_s": 0.0}},
        "security": {"mechanism": mechanism, "keys_dir": str(keys)},
    }
    return msgspec.convert(raw, RuntimeConfig)


def policy(config: RuntimeConfig, node: str = "node0") -> NodePolicy:
    return NodePolicy.of_node(config, node)


def security(config: RuntimeConfig, name: str) -> Security:
    return Security(config.security.mechanism, config.security.keys_dir, name)
