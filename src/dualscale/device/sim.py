"""A simulated GPU node: the backend of tests, demos and emulated clusters (``--backend sim``).

Each GPU has a lockable SM clock that is reached ``switch_delay_s`` after it is set (before that the
GPU keeps its previous clock), a power draw and a 64-bit energy counter. Power is the profile's idle
power at the clock reached, unless an emulated engine posts the busy power of the iteration it is
running and for how long (:meth:`SimNodeState.set_load_w`). Energy integrates that power over time
(piecewise: split at clock switches and at the end of a posted load).

The state lives in a small file (``state_file``) when several processes share one simulated node:
the actuator owns the clocks, emulated workers read the clock reached and post their power, and
tests look at what the GPUs were told. Access is serialised with ``flock``.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dualscale.device.base import ClockBackend
from dualscale.errors import DeviceError
from dualscale.profile import Profile
from dualscale.runtime.trust import open_trusted

#: Per-GPU record of the shared state (one row per GPU, native byte order, file = rows back to back).
STATE_DTYPE = np.dtype([
    ("locked_mhz", "<i8"),     # 0 = not locked
    ("prev_mhz", "<i8"),       # clock before the last switch
    ("target_mhz", "<i8"),     # clock reached at switch_at_ns
    ("switch_at_ns", "<i8"),   # CLOCK_MONOTONIC ns
    ("cap_mhz", "<i8"),        # throttle cap (0 = none), for tests
    ("reasons", "<i8"),        # clock-event reasons reported while capped
    ("load_w", "<f8"),         # busy power posted by an emulated engine ...
    ("load_until_ns", "<i8"),  # ... drawn until then (CLOCK_MONOTONIC ns), idle power after
    ("energy_j", "<f8"),       # integrated energy (J)
    ("energy_ns", "<i8"),      # time energy_j is integrated up to
    ("writes", "<i8"),         # clock writes (locks and resets) received
])

#: Clock-event reasons bit reported while a throttle cap holds the clock down (SW power cap).
REASON_SW_POWER_CAP = 0x4


class SimNodeState:
    """Per-GPU state of one simulated node, in memory or shared through a file.

    Args:
        gpus: number of GPUs (when creating).
        default_mhz: clock of an unlocked GPU (the driver's boost clock).
        path: state file; created (or re-initialised when its size does not match) if given.
    """

    def __init__(self, gpus: int, default_mhz: int, path: str | Path | None = None) -> None:
        if gpus < 1:
            raise ValueError(f"gpus = {gpus}: must be >= 1")
        self.path = Path(path) if path is not None else None
        self._tlock = threading.Lock()
        self._idle_w: np.ndarray | None = None
        self._f0 = self._step = 1
        self._fd = -1
        self._mm: mmap.mmap | None = None
        self.counter_id = f"sim:{uuid.uuid4().hex}"
        if self.path is None:
            self.rows = np.zeros(gpus, dtype=STATE_DTYPE)
            self._init_rows(default_mhz)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # the actuator may run as root: no symlink, owner root or this user, no one else may write
        self._fd = open_trusted(self.path, "sim state file", flags=os.O_RDWR | os.O_CREAT, mode=0o600)
        st = os.fstat(self._fd)
        self.counter_id = f"sim:{st.st_dev}:{st.st_ino}"
        with self.lock():
            fresh = st.st_size != gpus * STATE_DTYPE.itemsize
            if fresh:
                os.ftruncate(self._fd, gpus * STATE_DTYPE.itemsize)
            self._mm = mmap.mmap(self._fd, gpus * STATE_DTYPE.itemsize)  # the open file, not the path again
            self.rows = np.frombuffer(self._mm, dtype=STATE_DTYPE)
            if fresh:
                self._init_rows(default_mhz)

    @classmethod
    def attach(cls, path: str | Path) -> SimNodeState:
        """Open an existing state file (another process created it)."""
        p = Path(path)
        size = p.stat().st_size
        if size == 0 or size % STATE_DTYPE.itemsize:
            raise ValueError(f"{p}: not a simulated-node state file ({size} bytes)")
        return cls(size // STATE_DTYPE.itemsize, 0, p)

    def _init_rows(self, default_mhz: int) -> None:
        now = time.monotonic_ns()
        r = self.rows
        r[:] = 0
        r["prev_mhz"] = r["target_mhz"] = default_mhz
        r["energy_ns"] = now

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive access (threads of this process, and other processes through ``flock``)."""
        with self._tlock:
            if self._fd < 0:
                yield
                return
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd >= 0:
            if self._mm is not None:
                self.rows = np.array(self.rows)  # drop the view so the map can close
                self._mm.flush()
                self._mm.close()
            os.close(self._fd)
            self._fd = -1

    @property
    def gpus(self) -> int:
        return int(self.rows.shape[0])

    @staticmethod
    def clock_at(row: np.void, now_ns: int) -> int:
        """SM clock of one GPU row at ``now_ns`` (switch delay and throttle cap applied)."""
        f = int(row["target_mhz"]) if now_ns >= int(row["switch_at_ns"]) else int(row["prev_mhz"])
        cap = int(row["cap_mhz"])
        return min(f, cap) if cap > 0 else f

    def sm_clock_mhz(self, gpu: int) -> int:
        """SM clock GPU ``gpu`` runs at now (MHz)."""
        with self.lock():
            return self.clock_at(self.rows[gpu], time.monotonic_ns())

    def locked_mhz(self, gpu: int) -> int:
        """Clock GPU ``gpu`` is locked at (MHz), 0 when not locked."""
        with self.lock():
            return int(self.rows[gpu]["locked_mhz"])

    def set_idle_power(self, profile: Profile) -> None:
        """Take idle power per clock from ``profile`` (needed to integrate energy: see :meth:`integrate`)."""
        self._idle_w = np.asarray(profile.idle_power_w(profile.clocks_mhz.astype(np.float64)), dtype=np.float64)
        self._f0, self._step = int(profile.clocks_mhz[0]), int(profile.config.gpu.clock_step_mhz)

    def power_w(self, row: np.void, now_ns: int) -> float:
        """Power of one GPU row at ``now_ns``: the posted load while it lasts, else idle at its clock."""
        if now_ns < int(row["load_until_ns"]):
            return float(row["load_w"])
        if self._idle_w is None:
            raise RuntimeError("SimNodeState.power_w: call set_idle_power(profile) first")
        f = SimNodeState.clock_at(row, now_ns)
        return float(self._idle_w[min(max(0, (f - self._f0) // self._step), self._idle_w.size - 1)])

    def integrate(self, row: np.void, now_ns: int) -> None:
        """Bring one GPU row's energy counter up to ``now_ns`` (call with the lock held)."""
        t0 = int(row["energy_ns"])
        if now_ns <= t0:
            return
        # power is constant between a clock switch and the end of a posted load: split there
        cuts = sorted(t for t in (int(row["switch_at_ns"]), int(row["load_until_ns"])) if t0 < t < now_ns)
        energy = 0.0
        for t1 in (*cuts, now_ns):
            energy += self.power_w(row, t1 - 1) * (t1 - t0) * 1e-9
            t0 = t1
        row["energy_j"] += energy
        row["energy_ns"] = now_ns

    def set_load_w(self, gpus: list[int] | tuple[int, ...], power_w: float, duration_s: float) -> None:
        """Post the busy power (W per GPU) of the iteration now running, drawn for ``duration_s``.

        The energy drawn until now is integrated first (when the idle power is known,
        :meth:`set_idle_power`), so the new load is not counted over the time before it.
        """
        now = time.monotonic_ns()
        until = now + int(duration_s * 1e9)
        with self.lock():
            for g in gpus:
                if self._idle_w is not None:
                    self.integrate(self.rows[g], now)
                self.rows[g]["load_w"] = power_w
                self.rows[g]["load_until_ns"] = until

    def set_throttle(self, gpu: int, cap_mhz: int, reasons: int = REASON_SW_POWER_CAP) -> None:
        """Hold GPU ``gpu`` at or below ``cap_mhz`` (0 lifts it), reporting ``reasons`` meanwhile."""
        with self.lock():
            self.rows[gpu]["cap_mhz"] = cap_mhz
            self.rows[gpu]["reasons"] = reasons if cap_mhz > 0 else 0

    def snapshot(self) -> np.ndarray:
        """A copy of every GPU's record."""
        with self.lock():
            return np.array(self.rows)


class SimBackend(ClockBackend):
    """Simulated GPUs with the profile's supported clocks and idle power.

    Args:
        profile: supplies the supported clocks and the idle power curve.
        gpus: GPUs on the node.
        switch_delay_s: time from a lock to the clock being reached (s).
        state_file: share the state with other processes through this file (see module docstring).
        call_delay_s: extra latency of each clock write (s), to emulate slow NVML calls.
        energy_offset_j: initial energy counter (J); the default starts past 2**32 mJ, so a
            reader that keeps the counter in 32 bits is caught.
    """

    name = "sim"

    def __init__(self, profile: Profile, gpus: int = 8, switch_delay_s: float = 0.02,
                 state_file: str | Path | None = None, call_delay_s: float = 0.0,
                 energy_offset_j: float = 5.0e6) -> None:
        if not switch_delay_s >= 0 or not call_delay_s >= 0:
            raise ValueError(f"switch_delay_s = {switch_delay_s}, call_delay_s = {call_delay_s}: must be >= 0")
        self.clocks = tuple(int(f) for f in profile.clocks_mhz)
        self.switch_delay_ns = int(switch_delay_s * 1e9)
        self.call_delay_s = call_delay_s
        self.state = SimNodeState(gpus, self.clocks[-1], state_file)
        self.state.set_idle_power(profile)
        with self.state.lock():
            if float(self.state.rows["energy_j"].max()) == 0.0:
                self.state.rows["energy_j"] = energy_offset_j

    def close(self) -> None:
        self.state.close()

    def _gpu(self, gpu: int) -> np.void:
        if not 0 <= gpu < self.state.gpus:
            raise DeviceError(f"GPU {gpu}: no such GPU (the simulated node has {self.state.gpus})")
        return self.state.rows[gpu]

    def _switch(self, gpu: int, locked_mhz: int, target_mhz: int) -> None:
        if self.call_delay_s:
            time.sleep(self.call_delay_s)
        with self.state.lock():
            row = self._gpu(gpu)
            now = time.monotonic_ns()
            self.state.integrate(row, now)
            row["prev_mhz"] = self._uncapped(row, now)
            row["target_mhz"] = target_mhz
            row["switch_at_ns"] = now + self.switch_delay_ns
            row["locked_mhz"] = locked_mhz
            row["writes"] += 1

    @staticmethod
    def _uncapped(row: np.void, now_ns: int) -> int:
        return int(row["target_mhz"]) if now_ns >= int(row["switch_at_ns"]) else int(row["prev_mhz"])

    # ---- ClockBackend ------------------------------------------------------------------------
    def gpu_count(self) -> int:
        return self.state.gpus

    def gpu_name(self, gpu: int) -> str:
        self._gpu(gpu)
        return "simulated GPU"

    def supported_sm_clocks_mhz(self, gpu: int) -> tuple[int, ...]:
        self._gpu(gpu)
        return self.clocks

    def set_locked_sm_clock_mhz(self, gpu: int, freq_mhz: int) -> None:
        if freq_mhz not in self.clocks:
            raise DeviceError(f"GPU {gpu}: {freq_mhz} MHz is not a supported clock")
        self._switch(gpu, freq_mhz, freq_mhz)

    def reset_locked_sm_clock(self, gpu: int) -> None:
        self._switch(gpu, 0, self.clocks[-1])

    def sm_clock_mhz(self, gpu: int) -> int:
        with self.state.lock():
            return SimNodeState.clock_at(self._gpu(gpu), time.monotonic_ns())

    def clock_event_reasons(self, gpu: int) -> int:
        with self.state.lock():
            row = self._gpu(gpu)
            return int(row["reasons"]) if row["cap_mhz"] > 0 else 0

    def power_w(self, gpu: int) -> float:
        with self.state.lock():
            return self.state.power_w(self._gpu(gpu), time.monotonic_ns())

    def energy_counter_id(self, gpu: int) -> str:
        return f"{self.state.counter_id}:{gpu}"

    def total_energy_j(self, gpu: int) -> float:
        with self.state.lock():
            row = self._gpu(gpu)
            self.state.integrate(row, time.monotonic_ns())
            return float(row["energy_j"])
