"""The clock set a controller chooses from, checked against the profile's supported clocks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from dualscale.profile import Profile


def resolve_clocks(profile: Profile, clocks_mhz: Sequence[int] | NDArray[np.integer] | None,
                   idle_freq_mhz: int | None) -> tuple[NDArray[np.int64], int]:
    """(ascending clock set, idle clock). ``None`` means the profile's whole supported grid and,
    for idle, the lowest clock of the set. Every clock must be one the profile supports."""
    supported = profile.clocks_mhz
    if clocks_mhz is None:
        clocks = supported.copy()
    else:
        raw = np.asarray(clocks_mhz)
        if raw.ndim != 1 or raw.size == 0:
            raise ValueError(f"clocks_mhz: expected a non-empty list of clocks in MHz, got {clocks_mhz!r}")
        if raw.dtype.kind not in "iuf" or not np.all(np.isfinite(raw)) or np.any(raw != np.round(raw)):
            raise ValueError(f"clocks_mhz = {clocks_mhz!r}: clocks must be whole MHz")
        clocks = np.unique(raw.astype(np.int64))
        bad = clocks[~np.isin(clocks, supported)]
        if bad.size:
            raise ValueError(
                f"clocks_mhz contains {int(bad[0])}: not a supported clock of profile {profile.name!r} "
                f"({supported[0]}..{supported[-1]} MHz in steps of {profile.config.gpu.clock_step_mhz})"
            )
    if idle_freq_mhz is None:
        idle = int(clocks[0])
    else:
        if isinstance(idle_freq_mhz, bool) or not isinstance(idle_freq_mhz, (int, np.integer)):
            raise TypeError(f"idle_freq_mhz = {idle_freq_mhz!r}: expected an integer clock in MHz")
        idle = int(idle_freq_mhz)
        if idle not in supported:
            raise ValueError(
                f"idle_freq_mhz = {idle}: not a supported clock of profile {profile.name!r} "
                f"({supported[0]}..{supported[-1]} MHz in steps of {profile.config.gpu.clock_step_mhz})"
            )
    clocks.setflags(write=False)
    return clocks, idle
