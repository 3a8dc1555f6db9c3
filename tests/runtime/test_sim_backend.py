from __future__ import annotations

import pytest

from dualscale.device.sim import REASON_SW_POWER_CAP, SimBackend, SimNodeState
from dualscale.errors import DeviceError


def test_clock_is_reached_after_the_switch_delay(profile):
    slow = SimBackend(profile, gpus=2, switch_delay_s=3600.0)
    slow.set_locked_sm_clock_mhz(0, 1005)
    assert slow.sm_clock_mhz(0) == 1980  # still switching
    assert slow.state.locked_mhz(0) == 1005
    fast = SimBackend(profile, gpus=2, switch_delay_s=0.0)
    fast.set_locked_sm_clock_mhz(0, 1005)
    assert fast.sm_clock_mhz(0) == 1005
    fast.reset_locked_sm_clock(0)
    assert fast.sm_clock_mhz(0) == 1980 and fast.state.locked_mhz(0) == 0


def test_unsupported_clock_and_gpu_are_device_errors(profile):
    b = SimBackend(profile, gpus=2)
    with pytest.raises(DeviceError, match="not a supported clock"):
        b.set_locked_sm_clock_mhz(0, 1000)
    with pytest.raises(DeviceError, match="no such GPU"):
        b.sm_clock_mhz(2)


def test_power_from_the_profile_and_energy_counts_up(profile):
    b = SimBackend(profile, gpus=1, switch_delay_s=0.0)
    b.set_locked_sm_clock_mhz(0, 345)
    assert b.power_w(0) == pytest.approx(profile.idle_power_w(345))
    e0 = b.total_energy_j(0)
    assert e0 >= 5.0e6
    b.state.set_load_w([0], 500.0, 3600.0)
    assert b.power_w(0) == 500.0
    assert b.total_energy_j(0) > e0


def test_throttle_caps_the_clock_and_sets_reasons(profile):
    b = SimBackend(profile, gpus=1, switch_delay_s=0.0)
    b.set_locked_sm_clock_mhz(0, 1980)
    b.state.set_throttle(0, 1575)
    assert b.sm_clock_mhz(0) == 1575 and b.clock_event_reasons(0) == REASON_SW_POWER_CAP
    b.state.set_throttle(0, 0)
    assert b.sm_clock_mhz(0) == 1980 and b.clock_event_reasons(0) == 0


def test_state_file_is_shared_between_processes_views(profile, tmp_path):
    path = tmp_path / "node.state"
    owner = SimBackend(profile, gpus=4, switch_delay_s=0.0, state_file=path)
    owner.set_locked_sm_clock_mhz(3, 1200)
    reader = SimNodeState.attach(path)
    assert reader.gpus == 4 and reader.locked_mhz(3) == 1200 and reader.sm_clock_mhz(3) == 1200
    reader.set_load_w([3], 650.0, 3600.0)
    assert owner.power_w(3) == 650.0
    reader.close()
    owner.close()


def test_attach_rejects_a_foreign_file(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"abc")
    with pytest.raises(ValueError, match="not a simulated-node state file"):
        SimNodeState.attach(p)


def test_a_new_load_is_not_counted_over_the_idle_time_before_it(profile, tmp_path, monkeypatch):
    """An emulated engine posts each iteration's power; the energy of the idle gap before it must stay
    idle energy (it was counted at the new load's power when the counter was read after the post)."""
    from dualscale.device import sim

    now = [10**12]
    monkeypatch.setattr(sim.time, "monotonic_ns", lambda: now[0])
    b = SimBackend(profile, gpus=1, switch_delay_s=0.0, state_file=tmp_path / "s")
    engine = SimNodeState.attach(tmp_path / "s")
    engine.set_idle_power(profile)
    idle_w = float(profile.idle_power_w(1980))
    e0 = b.total_energy_j(0)
    now[0] += 100_000_000  # 0.1 s idle, nobody reads the counter
    engine.set_load_w([0], 500.0, 0.02)
    now[0] += 50_000_000  # 0.02 s busy, 0.03 s idle
    assert b.total_energy_j(0) - e0 == pytest.approx(idle_w * 0.13 + 500.0 * 0.02, rel=1e-9)
