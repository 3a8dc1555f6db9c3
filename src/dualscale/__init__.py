"""dualscale: cut the energy of prefill/decode-disaggregated LLM serving without breaking its SLOs."""

from __future__ import annotations

from dualscale._version import __version__
from dualscale.control import DecodeController, DecodeDecision, PrefillController, PrefillDecision
from dualscale.errors import ConfigError, DataError, DualscaleError, SolverError
from dualscale.profile import Profile

__all__ = [
    "ConfigError",
    "DataError",
    "DecodeController",
    "DecodeDecision",
    "DualscaleError",
    "PrefillController",
    "PrefillDecision",
    "Profile",
    "SolverError",
    "__version__",
]
