"""GPU clock backends behind one interface: NVML on a GPU node, a simulated node everywhere else.

``make_backend`` is the one factory; there is no module-level backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from dualscale.device.base import ClockBackend

BackendName = Literal["nvml", "sim"]
BACKENDS: tuple[BackendName, ...] = ("nvml", "sim")


def make_backend(name: str, *, profile: str | Path = "h100-sxm-llama-3.3-70b", gpus: int = 8,
                 switch_delay_s: float = 0.02, state_file: str | Path | None = None,
                 nvml_library: str | Path | None = None) -> ClockBackend:
    """The backend called ``name``.

    Args:
        name: ``"nvml"`` (real GPUs, or the simulated NVML library given as ``nvml_library``) or
            ``"sim"`` (a simulated node; the other arguments describe it).
        profile: profile whose clocks and idle power the simulated GPUs have (``sim``).
        gpus: GPUs of the simulated node (``sim``).
        switch_delay_s: simulated clock switch delay, s (``sim``).
        state_file: share the simulated node with other processes through this file (``sim``).
        nvml_library: NVML library path instead of the system's (``nvml``).
    """
    if name == "nvml":
        from dualscale.device.nvml import NvmlBackend

        return NvmlBackend(library=nvml_library)
    if name == "sim":
        from dualscale.device.sim import SimBackend
        from dualscale.profile import Profile

        return SimBackend(Profile.load(profile), gpus=gpus, switch_delay_s=switch_delay_s, state_file=state_file)
    raise ValueError(f"backend {name!r}: must be one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "ClockBackend", "make_backend"]
