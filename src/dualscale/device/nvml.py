"""NVML backend: SM clock locks, read-back and energy through nvidia-ml-py (imported as ``pynvml``).

Every NVML call goes through :func:`_nvml`, which maps ``NVMLError.value`` through one table
(:data:`ERROR_MAP`) to a dualscale error chained ``from`` the original, naming the call and the GPU;
anything not in the table becomes a plain :class:`~dualscale.errors.DeviceError`. NVML's mW and mJ
are converted to W and J here and nowhere else.

Note:
    H100 SXM facts (peers.md; not yet verified on hardware by this project): locking needs root
    (CAP_SYS_ADMIN), else NVML_ERROR_NO_PERMISSION; the energy counter updates about every
    100 ms; power is a ~1 s average; a clock call may take 10-20 ms inside a busy application.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pynvml

from dualscale.device.base import ClockBackend
from dualscale.errors import DeviceError, NotSupported, PermissionDenied

P = ParamSpec("P")
R = TypeVar("R")

#: The fix named when clock control is refused.
PERMISSION_FIX = ("locking GPU clocks needs root (CAP_SYS_ADMIN): run the actuator as root from a root-owned "
                  "install, e.g. the systemd unit of the README's Deployment section, or "
                  "`sudo /opt/dualscale/bin/dualscale actuator --backend nvml ...` (only the actuator needs it; the "
                  "controller and the workers run unprivileged)")

#: NVML error code -> dualscale error class; every other code maps to DeviceError.
ERROR_MAP: dict[int, type[DeviceError]] = {
    pynvml.NVML_ERROR_NO_PERMISSION: PermissionDenied,
    pynvml.NVML_ERROR_NOT_SUPPORTED: NotSupported,
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND: NotSupported,
}

_load_lock = threading.Lock()


def _nvml(call: Callable[P, R]) -> Callable[P, R]:
    """Re-raise NVML errors of a backend method as dualscale errors (see ERROR_MAP)."""

    @functools.wraps(call)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return call(*args, **kwargs)
        except pynvml.NVMLError as e:
            gpu = args[1] if len(args) > 1 and isinstance(args[1], int) else None
            where = f"GPU {gpu}: " if gpu is not None else ""
            cls = ERROR_MAP.get(e.value, DeviceError)
            hint = f" ({PERMISSION_FIX})" if cls is PermissionDenied else ""
            raise cls(f"{where}NVML {call.__name__}: {e} (NVML error {e.value}){hint}") from e

    return wrapper


def preload(library: str | Path) -> None:
    """Load an NVML library by path so pynvml's ``libnvidia-ml.so.1`` lookup finds it (same SONAME).

    Only before pynvml has loaded a library in this process; afterwards the first one stays. The file is
    checked like every file the actuator reads (:mod:`dualscale.runtime.trust`: owned by root or the
    running user, writable by no one else, no symlink) and loaded through the checked descriptor, so
    it cannot be swapped between the check and the load.
    """
    from dualscale.runtime.trust import open_trusted

    fd = open_trusted(library, "NVML library")
    with _load_lock:
        try:
            ctypes.CDLL(f"/proc/self/fd/{fd}", mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise DeviceError(f"NVML library {library}: cannot load: {e}") from e
        finally:
            os.close(fd)


class NvmlBackend(ClockBackend):
    """GPUs of this node through NVML.

    Args:
        library: path of an NVML library to use instead of the system's ``libnvidia-ml.so.1``
            (the simulated one in tests); ``None`` uses the system's.
    """

    name = "nvml"

    def __init__(self, library: str | Path | None = None) -> None:
        if library is not None:
            preload(library)
        self._init()
        self._open = True
        self._handles: list[Any] = []
        self._clocks: dict[int, tuple[int, ...]] = {}
        try:
            self._handles = [self._handle(i) for i in range(self._count())]
        except BaseException:
            self.close()
            raise

    @_nvml
    def _init(self) -> None:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError_LibraryNotFound as e:
            raise DeviceError("NVML library libnvidia-ml.so.1 not found: is the NVIDIA driver installed? "
                              "(use --backend sim on a machine without GPUs)") from e

    @_nvml
    def _count(self) -> int:
        return int(pynvml.nvmlDeviceGetCount())

    @_nvml
    def _handle(self, gpu: int) -> Any:
        return pynvml.nvmlDeviceGetHandleByIndex(gpu)

    def _h(self, gpu: int) -> Any:
        if not 0 <= gpu < len(self._handles):
            raise DeviceError(f"GPU {gpu}: no such GPU (NVML sees {len(self._handles)})")
        return self._handles[gpu]

    def close(self) -> None:
        if self._open:
            self._open = False
            self._handles = []
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass

    # ---- ClockBackend ------------------------------------------------------------------------
    def gpu_count(self) -> int:
        return len(self._handles)

    @_nvml
    def gpu_name(self, gpu: int) -> str:
        name = pynvml.nvmlDeviceGetName(self._h(gpu))
        return name.decode() if isinstance(name, bytes) else str(name)

    @_nvml
    def supported_sm_clocks_mhz(self, gpu: int) -> tuple[int, ...]:
        cached = self._clocks.get(gpu)
        if cached is None:  # probed once: the list does not change while the driver runs
            h = self._h(gpu)
            mem = max(pynvml.nvmlDeviceGetSupportedMemoryClocks(h))
            cached = tuple(sorted(int(f) for f in pynvml.nvmlDeviceGetSupportedGraphicsClocks(h, mem)))
            if not cached:
                raise NotSupported(f"GPU {gpu}: NVML lists no supported graphics clocks at memory clock {mem} MHz")
            self._clocks[gpu] = cached
        return cached

    @_nvml
    def set_locked_sm_clock_mhz(self, gpu: int, freq_mhz: int) -> None:
        pynvml.nvmlDeviceSetGpuLockedClocks(self._h(gpu), freq_mhz, freq_mhz)

    @_nvml
    def reset_locked_sm_clock(self, gpu: int) -> None:
        pynvml.nvmlDeviceResetGpuLockedClocks(self._h(gpu))

    @_nvml
    def sm_clock_mhz(self, gpu: int) -> int:
        return int(pynvml.nvmlDeviceGetClockInfo(self._h(gpu), pynvml.NVML_CLOCK_SM))

    @_nvml
    def clock_event_reasons(self, gpu: int) -> int:
        return int(pynvml.nvmlDeviceGetCurrentClocksEventReasons(self._h(gpu)))

    @_nvml
    def power_w(self, gpu: int) -> float:
        return pynvml.nvmlDeviceGetPowerUsage(self._h(gpu)) / 1000.0

    @_nvml
    def total_energy_j(self, gpu: int) -> float:
        # a 64-bit mJ counter: Python ints do not wrap, and float64 holds it exactly up to 2**53 mJ
        return pynvml.nvmlDeviceGetTotalEnergyConsumption(self._h(gpu)) / 1000.0
