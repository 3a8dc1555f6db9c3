"""The clock backend interface: the few GPU calls the actuator needs, in SI units.

Every backend speaks MHz, W and J; vendor units (NVML's mW and mJ) stay inside the backend. GPU
arguments are node-local indices (NVML order). Calls may take tens of milliseconds on a busy GPU
(peers.md), so the actuator calls them from a thread pool, one GPU per thread.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from pathlib import Path


@functools.cache
def boot_id() -> str:
    """This boot's identity (Linux ``boot_id``), "" where there is none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:36]
    except OSError:
        return ""


class ClockBackend(ABC):
    """SM clock control and power/energy readings of the GPUs of one node."""

    #: short name of the backend (``"nvml"``, ``"sim"``)
    name: str = ""
    #: True when ``set_locked_sm_clock_mhz`` returns before the clock is reached (all known backends):
    #: read ``sm_clock_mhz`` later to see the clock actually reached.
    supports_nonblocking: bool = True

    @abstractmethod
    def gpu_count(self) -> int:
        """Number of GPUs on the node."""

    @abstractmethod
    def gpu_name(self, gpu: int) -> str:
        """Product name of GPU ``gpu``."""

    @abstractmethod
    def supported_sm_clocks_mhz(self, gpu: int) -> tuple[int, ...]:
        """Supported SM clocks of GPU ``gpu`` at its highest memory clock (MHz), ascending."""

    @abstractmethod
    def set_locked_sm_clock_mhz(self, gpu: int, freq_mhz: int) -> None:
        """Lock GPU ``gpu``'s SM clock at ``freq_mhz`` (min = max = ``freq_mhz``; a supported clock)."""

    @abstractmethod
    def reset_locked_sm_clock(self, gpu: int) -> None:
        """Release GPU ``gpu``'s SM clock lock (the driver's default policy again)."""

    @abstractmethod
    def sm_clock_mhz(self, gpu: int) -> int:
        """SM clock GPU ``gpu`` runs at now (MHz): may differ from the lock when throttled."""

    @abstractmethod
    def clock_event_reasons(self, gpu: int) -> int:
        """Why the clock is held below its target now (bitmask, NVML ``nvmlClocksEventReason*`` bits)."""

    @abstractmethod
    def power_w(self, gpu: int) -> float:
        """Power draw of GPU ``gpu`` (W); NVML averages over about a second on Ampere and newer."""

    @abstractmethod
    def total_energy_j(self, gpu: int) -> float:
        """GPU ``gpu``'s energy counter (J) since some fixed origin: 64-bit, monotonic, coarse in time
        (NVML updates it about every 100 ms)."""

    def energy_counter_id(self, gpu: int) -> str:
        """Identity of GPU ``gpu``'s energy counter: while it stays the same, the counter never goes
        back. Default: this boot and the GPU index (a driver reload shows as a counter reset)."""
        return f"{boot_id()}:{gpu}"

    def close(self) -> None:
        """Release the backend's resources (does not touch clocks)."""

    def __enter__(self) -> ClockBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
