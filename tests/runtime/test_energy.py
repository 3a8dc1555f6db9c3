"""Energy accounting from per-GPU device counters: counted once across restarts, resets and wraps."""

from __future__ import annotations

import logging

import msgspec
import pytest

from dualscale.errors import ConfigError
from dualscale.runtime.daemon import ControllerDaemon
from dualscale.runtime.keys import Security
from dualscale.runtime.messages import GpuStatus, MsgType, NodeStatus
from dualscale.runtime.serial import FrameEncoder

ENC = FrameEncoder()


def status(readings: dict[int, tuple[str, float]], epoch: int = 1) -> bytes:
    return bytes(ENC.encode(MsgType.NODE_STATUS, NodeStatus("node0", epoch, 1, [
        GpuStatus(g, 1005, 1005, 0, 100.0, 0.0, "", c, cid) for g, (cid, c) in readings.items()])))


@pytest.fixture
def config(tmp_path, make_config):
    cfg = make_config(tmp_path)
    return msgspec.structs.replace(cfg, controller=msgspec.structs.replace(
        cfg.controller, state_file=str(tmp_path / "controller.state")))


def test_counter_deltas_resets_and_new_identities(config, profile):
    d = ControllerDaemon(config, profile=profile)
    d.handle_status(status({0: ("b1:0", 5e6), 2: ("b1:2", 7e6)}))  # first sight: baseline only
    d.handle_status(status({0: ("b1:0", 5e6 + 300), 2: ("b1:2", 7e6 + 100)}))
    assert d.energy_j == {"prefill": pytest.approx(300), "decode": pytest.approx(100)}
    d.handle_status(status({0: ("b1:0", 50.0)}))  # the counter went back (driver reload): from zero
    d.handle_status(status({0: ("b2:0", 20.0)}, epoch=2))  # another boot: from zero
    d.handle_status(status({0: ("b2:0", 80.0)}, epoch=3))  # a restarted actuator: the same counter
    assert d.energy_j["prefill"] == pytest.approx(300 + 50 + 20 + 60) and d.counter_resets == 2


def test_a_restarted_controller_neither_re_adds_nor_loses_a_window(config, profile):
    d = ControllerDaemon(config, profile=profile)
    d.handle_status(status({0: ("b1:0", 1000.0)}))
    d.handle_status(status({0: ("b1:0", 1400.0)}))
    d._save_state()
    # the controller dies here; the GPU goes on drawing power meanwhile
    d2 = ControllerDaemon(config, profile=profile)
    assert d2.energy_j["prefill"] == pytest.approx(400)
    d2.handle_status(status({0: ("b1:0", 2000.0)}))  # the window of the outage is counted, once
    assert d2.energy_j["prefill"] == pytest.approx(1000)
    reg = d2.metrics.registry
    assert reg.get_sample_value("dualscale_energy_joules_total", {"phase": "prefill"}) == pytest.approx(1000)


def test_plain_zeromq_only_when_asked_and_then_warned(caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="dualscale.runtime.keys"):
        Security("none", tmp_path / "no-keys", "controller")
    assert "NOT authenticated" in caplog.text
    with pytest.raises(ConfigError, match="no-keys"):  # the default, curve, needs its keys
        Security("curve", tmp_path / "no-keys", "controller")
