"""Runtime: the controller daemon, the worker agent and the node actuator, over ZeroMQ/msgspec.

``WorkerAgent`` is embedded in a serving engine; ``ControllerDaemon`` (``dualscale serve``) runs the
fine-tier controllers; ``Actuator`` (``dualscale actuator``) locks the GPU clocks of one node. The
wire protocol is in :mod:`dualscale.runtime.messages`.
"""

from __future__ import annotations

from dualscale.runtime.actuator import Actuator, ActuatorState, EnergyMeter
from dualscale.runtime.config import RuntimeConfig, load_runtime_config
from dualscale.runtime.daemon import ControllerDaemon, DaemonState
from dualscale.runtime.messages import PROTOCOL_VERSION
from dualscale.runtime.worker import WorkerAgent

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
