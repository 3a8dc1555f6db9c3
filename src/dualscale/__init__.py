"""dualscale: cut the energy of prefill/decode-disaggregated LLM serving without breaking its SLOs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dualscale._lazy import lazy_getattr
from dualscale._version import __version__

if TYPE_CHECKING:
    from dualscale.control import DecodeController, DecodeDecision, PrefillController, PrefillDecision
    from dualscale.errors import ConfigError, DataError, DualscaleError, SolverError
    from dualscale.profile import Profile

# Names are imported on first use, so a serving engine that only imports the worker agent
# (dualscale.runtime.worker) does not load Numba and the controllers.
_LAZY = {
    "ConfigError": "dualscale.errors",
    "DataError": "dualscale.errors",
    "DecodeController": "dualscale.control",
    "DecodeDecision": "dualscale.control",
    "DualscaleError": "dualscale.errors",
    "PrefillController": "dualscale.control",
    "PrefillDecision": "dualscale.control",
    "Profile": "dualscale.profile",
    "SolverError": "dualscale.errors",
}

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


__getattr__ = lazy_getattr(__name__, _LAZY)
