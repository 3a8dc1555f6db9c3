"""The simulated NVML library (``native/nvml_sim.c``): find or build it, create a node, flip switches.

The library is a stand-in ``libnvidia-ml.so.1`` that the real nvidia-ml-py bindings load, so the
NVML backend is tested through the same Python code that runs on a GPU node, down to the C ABI.
The package build compiles it into ``dualscale/_native/``; when that is absent (an editable install
without a compiler at build time, a source checkout), :func:`library_path` compiles it with the
system C compiler into a cache folder. Two ways to make pynvml use it:

- another process: put :func:`library_dir` first on ``LD_LIBRARY_PATH`` and name the state file in
  ``DUALSCALE_NVML_SIM_STATE`` (:meth:`SimNvml.env`);
- this process: ``NvmlBackend(library=path)`` loads it by path before pynvml asks the dynamic loader
  for ``libnvidia-ml.so.1``; the loader then returns the already-loaded object (same SONAME).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from dualscale.errors import DeviceError

LIBRARY_NAME = "libnvidia-ml.so.1"
#: Environment variable the simulated library reads at nvmlInit to find its state file.
STATE_ENV = "DUALSCALE_NVML_SIM_STATE"
CFLAGS = ("-O2", "-shared", "-fPIC", "-fvisibility=hidden", f"-Wl,-soname,{LIBRARY_NAME}")


def _checkout_source() -> Path | None:
    p = Path(__file__).resolve().parents[3] / "native" / "nvml_sim.c"
    return p if p.is_file() else None


def _source() -> Path | None:
    packaged = Path(str(resources.files("dualscale"))) / "_native" / "nvml_sim.c"
    return _checkout_source() or (packaged if packaged.is_file() else None)


def build(out_dir: str | Path, source: str | Path | None = None, compiler: str = "cc") -> Path:
    """Compile the simulated NVML into ``out_dir/libnvidia-ml.so.1`` with the system C compiler."""
    src = Path(source) if source is not None else _source()
    if src is None or not src.is_file():
        raise DeviceError("simulated NVML: source nvml_sim.c not found (neither packaged nor in native/)")
    if shutil.which(compiler) is None:
        raise DeviceError(f"simulated NVML: C compiler {compiler!r} not found; install one (e.g. apt-get install gcc)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{LIBRARY_NAME}.{os.getpid()}"
    r = subprocess.run([compiler, *CFLAGS, "-o", str(tmp), str(src)], capture_output=True, text=True)
    if r.returncode != 0:
        raise DeviceError(f"simulated NVML: {compiler} failed:\n{r.stderr.strip()}")
    tmp.replace(out / LIBRARY_NAME)
    return out / LIBRARY_NAME


def library_path() -> Path:
    """The simulated library: the packaged build if present, else a cached build of the source."""
    packaged = Path(str(resources.files("dualscale"))) / "_native" / LIBRARY_NAME
    checkout = _checkout_source()  # an edited checkout source outdates an editable install's build
    if packaged.is_file() and (checkout is None or checkout.stat().st_mtime <= packaged.stat().st_mtime):
        return packaged
    src = _source()
    if src is None:
        raise DeviceError("simulated NVML: neither a packaged library nor the nvml_sim.c source was found")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    cached = Path(tempfile.gettempdir()) / f"dualscale-nvml-sim-{os.getuid()}-{digest}" / LIBRARY_NAME
    return cached if cached.is_file() else build(cached.parent, src)


def library_dir() -> Path:
    """Folder holding the simulated ``libnvidia-ml.so.1`` (for ``LD_LIBRARY_PATH``)."""
    return library_path().parent


class SimNvml:
    """One simulated node behind the simulated NVML: create its state file and flip its switches.

    Args:
        state_file: where the node lives (created, replacing any previous node there).
        gpus: GPUs on the node (1..16).
        clock_min_mhz, clock_max_mhz, step_mhz: supported SM clocks (H100 SXM: 345..1980 by 15).
        mem_mhz: the one supported memory clock.
        switch_delay_s: time from a lock to the clock being reached.
        power_min_w, power_max_w: power at the lowest and highest clock (linear between).
    """

    def __init__(self, state_file: str | Path, gpus: int = 8, clock_min_mhz: int = 345, clock_max_mhz: int = 1980,
                 step_mhz: int = 15, mem_mhz: int = 2619, switch_delay_s: float = 0.0,
                 power_min_w: float = 90.0, power_max_w: float = 300.0) -> None:
        self.state_file = Path(state_file)
        self.lib = ctypes.CDLL(str(library_path()))
        self.lib.dsim_create.argtypes = [ctypes.c_char_p, *[ctypes.c_uint] * 6, ctypes.c_double, ctypes.c_double]
        self.lib.dsim_attach.argtypes = [ctypes.c_char_p]
        self.lib.dsim_set_throttle.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_ulonglong]
        self.lib.dsim_locked_mhz.restype = ctypes.c_long
        self.lib.dsim_writes.restype = ctypes.c_long
        path = os.fsencode(self.state_file)
        rc = self.lib.dsim_create(path, gpus, clock_min_mhz, clock_max_mhz, step_mhz, mem_mhz,
                                  int(switch_delay_s * 1e6), power_min_w, power_max_w)
        if rc != 0 or self.lib.dsim_attach(path) != 0:
            raise DeviceError(f"simulated NVML: cannot create node state {self.state_file} (error {rc})")
        self.gpus = gpus

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a child process whose pynvml should load this node."""
        env = dict(os.environ if base is None else base)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(library_dir()), env.get("LD_LIBRARY_PATH", "")) if p)
        env[STATE_ENV] = str(self.state_file)
        return env

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise ValueError(f"simulated NVML: {what} failed (error {rc})")

    def set_error(self, gpu: int, on_set: int = 0, on_query: int = 0) -> None:
        """Make GPU ``gpu``'s clock setters return NVML error ``on_set`` (e.g. 4 = NO_PERMISSION,
        3 = NOT_SUPPORTED) and its supported-clock queries return ``on_query``; 0 clears."""
        self._check(self.lib.dsim_set_error(gpu, on_set, on_query), f"set_error({gpu})")

    def set_throttle(self, gpu: int, cap_mhz: int, reasons: int = 0x4) -> None:
        """Hold GPU ``gpu``'s clock at or below ``cap_mhz`` with clock-event ``reasons``; 0 lifts it."""
        self._check(self.lib.dsim_set_throttle(gpu, cap_mhz, reasons), f"set_throttle({gpu})")

    def set_call_delay_s(self, delay_s: float) -> None:
        """Make every clock write take ``delay_s`` (emulates NVML calls inside busy applications)."""
        self._check(self.lib.dsim_set_call_delay_us(int(delay_s * 1e6)), "set_call_delay")

    def locked_mhz(self, gpu: int) -> int:
        """Locked SM clock of GPU ``gpu`` (MHz), 0 when not locked."""
        return int(self.lib.dsim_locked_mhz(gpu))

    def writes(self, gpu: int) -> int:
        """Successful clock writes (locks and resets) GPU ``gpu`` received."""
        return int(self.lib.dsim_writes(gpu))
