"""Exceptions raised by dualscale, grouped by what the caller can do about them.

::

    DualscaleError
    ├── ConfigError      a config or profile file is malformed (also a ValueError)
    ├── DataError        a public measurement file needed by fit/validate is missing or malformed
    └── SolverError      the QP solver could not be set up (a controller cannot be built)

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
