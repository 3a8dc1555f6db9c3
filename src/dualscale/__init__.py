"""dualscale: cut the energy of prefill/decode-disaggregated LLM serving without breaking its SLOs."""

from __future__ import annotations

from dualscale._version import __version__
from dualscale.errors import ConfigError, DataError, DualscaleError
from dualscale.profile import Profile

__all__ = ["ConfigError", "DataError", "DualscaleError", "Profile", "__version__"]
