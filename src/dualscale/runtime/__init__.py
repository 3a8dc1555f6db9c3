"""Runtime: the controller daemon, the worker agent and the node actuator, over ZeroMQ/msgspec.

``WorkerAgent`` is embedded in a serving engine; ``ControllerDaemon`` (``dualscale serve``) runs the
fine-tier controllers; ``Actuator`` (``dualscale actuator``) locks the GPU clocks of one node. The
wire protocol is in :mod:`dualscale.runtime.messages`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dualscale._lazy import lazy_getattr

if TYPE_CHECKING:
    from dualscale.runtime.actuator import Actuator, ActuatorState, EnergyMeter
    from dualscale.runtime.config import RuntimeConfig, load_runtime_config
    from dualscale.runtime.daemon import ControllerDaemon, DaemonState
    from dualscale.runtime.messages import PROTOCOL_VERSION
    from dualscale.runtime.worker import WorkerAgent

# Imported on first use: the worker agent (in the engine) and its relay must not pull in the
# controllers (Numba) that only the daemon needs.
_LAZY = {
    "Actuator": "dualscale.runtime.actuator",
    "ActuatorState": "dualscale.runtime.actuator",
    "ControllerDaemon": "dualscale.runtime.daemon",
    "DaemonState": "dualscale.runtime.daemon",
    "EnergyMeter": "dualscale.runtime.actuator",
    "PROTOCOL_VERSION": "dualscale.runtime.messages",
    "RuntimeConfig": "dualscale.runtime.config",
    "WorkerAgent": "dualscale.runtime.worker",
    "load_runtime_config": "dualscale.runtime.config",
}

__all__ = [
    "Actuator",
    "ActuatorState",
    "ControllerDaemon",
    "DaemonState",
    "EnergyMeter",
    "PROTOCOL_VERSION",
    "RuntimeConfig",
    "WorkerAgent",
    "load_runtime_config",
]


__getattr__ = lazy_getattr(__name__, _LAZY)
