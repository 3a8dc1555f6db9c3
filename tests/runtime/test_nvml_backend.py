"""The NVML backend through the real nvidia-ml-py bindings, against the simulated NVML library."""

from __future__ import annotations

import pynvml
import pytest

from dualscale.device import make_backend
from dualscale.device.nvml import ERROR_MAP, NvmlBackend
from dualscale.device.nvml_sim import STATE_ENV, SimNvml, library_path
from dualscale.errors import DeviceError, NotSupported, PermissionDenied


@pytest.fixture
def node(tmp_path, monkeypatch):
    monkeypatch.delenv(STATE_ENV, raising=False)
    return SimNvml(tmp_path / "node.state", gpus=4, power_min_w=90.0, power_max_w=300.0)


@pytest.fixture
def nvml(node):
    b = make_backend("nvml", nvml_library=library_path())
    yield b
    b.close()


def test_pynvml_loaded_the_simulated_library(nvml):
    assert nvml.gpu_count() == 4
    assert "simulated" in nvml.gpu_name(0)
    assert "simulated" in pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))


def test_supported_clocks_ascending_from_the_highest_memory_clock(nvml):
    clocks = nvml.supported_sm_clocks_mhz(1)
    assert clocks[0] == 345 and clocks[-1] == 1980 and len(clocks) == 110
    assert list(clocks) == sorted(clocks)


def test_lock_read_back_and_reset(nvml, node):
    nvml.set_locked_sm_clock_mhz(2, 1005)
    assert node.locked_mhz(2) == 1005
    assert nvml.sm_clock_mhz(2) == 1005
    assert nvml.clock_event_reasons(2) == 0
    nvml.reset_locked_sm_clock(2)
    assert node.locked_mhz(2) == 0
    assert nvml.sm_clock_mhz(2) == 1980


def test_throttle_shows_in_clock_and_reasons(nvml, node):
    nvml.set_locked_sm_clock_mhz(0, 1980)
    node.set_throttle(0, 1575, pynvml.nvmlClocksEventReasonSwPowerCap)
    assert nvml.sm_clock_mhz(0) == 1575
    assert nvml.clock_event_reasons(0) == pynvml.nvmlClocksEventReasonSwPowerCap


def test_power_in_watts_and_energy_in_joules_past_32_bits(nvml):
    nvml.set_locked_sm_clock_mhz(0, 345)
    assert nvml.power_w(0) == pytest.approx(90.0, abs=0.01)  # mW -> W
    e = nvml.total_energy_j(0)
    assert e >= 5.0e6  # the simulated counter starts at 5e9 mJ, past 2**32 mJ: no 32-bit wrap
    assert nvml.total_energy_j(0) >= e


@pytest.mark.parametrize(("code", "cls"), [
    (pynvml.NVML_ERROR_NO_PERMISSION, PermissionDenied),
    (pynvml.NVML_ERROR_NOT_SUPPORTED, NotSupported),
    (pynvml.NVML_ERROR_GPU_IS_LOST, DeviceError),
])
def test_nvml_errors_map_to_dualscale_errors(nvml, node, code, cls):
    node.set_error(1, on_set=code)
    with pytest.raises(cls) as e:
        nvml.set_locked_sm_clock_mhz(1, 1005)
    assert type(e.value) is cls
    assert isinstance(e.value.__cause__, pynvml.NVMLError) and e.value.__cause__.value == code
    assert "GPU 1" in str(e.value) and "set_locked_sm_clock_mhz" in str(e.value)
    assert ERROR_MAP.get(code, DeviceError) is cls


def test_permission_denied_names_the_fix(nvml, node):
    node.set_error(0, on_set=pynvml.NVML_ERROR_NO_PERMISSION)
    with pytest.raises(PermissionDenied, match="root"):
        nvml.reset_locked_sm_clock(0)


def test_unsupported_clock_query_is_not_supported(nvml, node):
    node.set_error(3, on_query=pynvml.NVML_ERROR_NOT_SUPPORTED)
    with pytest.raises(NotSupported, match="GPU 3"):
        nvml.supported_sm_clocks_mhz(3)


def test_bad_gpu_index_is_a_device_error(nvml):
    with pytest.raises(DeviceError, match="no such GPU"):
        nvml.sm_clock_mhz(9)


def test_no_driver_is_a_clear_device_error(tmp_path, monkeypatch, node):
    monkeypatch.setenv(STATE_ENV, str(tmp_path / "missing.state"))  # the library finds no node: no driver
    with pytest.raises(DeviceError, match="Driver Not Loaded"):
        NvmlBackend(library=library_path())
