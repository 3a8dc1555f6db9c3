"""Latency and power profiles of (GPU, model) pairs: loading, fitting and validation."""

from __future__ import annotations

from dualscale.profile.model import Profile, builtin_profiles
from dualscale.profile.schema import ProfileConfig

__all__ = ["Profile", "ProfileConfig", "builtin_profiles"]
