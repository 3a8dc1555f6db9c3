"""Exceptions raised by dualscale, grouped by what the caller can do about them.

::

    DualscaleError
    ├── ConfigError      a config or profile file is malformed (also a ValueError)
    ├── DataError        a public measurement file needed by fit/validate is missing or malformed
    ├── SolverError      the QP solver could not be set up (a controller cannot be built)
    ├── DeviceError      a GPU call failed (NVML or the simulated backend); the actuator reports it
    │   ├── PermissionDenied   clock control needs root / CAP_SYS_ADMIN: fix the deployment, not the call
    │   └── NotSupported       the GPU or driver cannot do this (e.g. locked clocks): degrade or stop
    ├── ProtocolError    a wire message was malformed, of another protocol version, or out of order:
    │                    counted and dropped by the runtime, never fatal
    └── WorkerLost       a runtime peer (controller, actuator, worker) stopped answering

Invalid arguments to public functions raise plain ``ValueError``/``TypeError`` naming the argument.
"""

from __future__ import annotations


class DualscaleError(Exception):
    """Root of every error dualscale raises on purpose."""


class ConfigError(DualscaleError, ValueError):
    """A configuration file could not be loaded: the message names file, field, value and what is allowed."""


class DataError(DualscaleError):
    """A measurement file used by ``profile fit`` or ``profile validate`` is missing or malformed."""


class SolverError(DualscaleError):
    """The QP solver could not be set up; per-decision solver failures are repaired, not raised."""


class DeviceError(DualscaleError):
    """A GPU backend call failed; the message names the call, the GPU and the vendor's reason."""


class PermissionDenied(DeviceError):
    """The process may not change GPU clocks (NVML_ERROR_NO_PERMISSION): run the actuator as root."""


class NotSupported(DeviceError):
    """The GPU or driver does not support the call (e.g. locked clocks on an old GPU)."""


class ProtocolError(DualscaleError):
    """A wire message was rejected; ``reason`` is a short key (``"version"``, ``"malformed"``, ...)."""

    @property
    def reason(self) -> str:
        return str(self.args[0]) if self.args else "malformed"


class WorkerLost(DualscaleError):
    """A runtime peer stopped answering within its liveness limit."""
