"""The simulated GPUs' ground truth: the profile's time and power of an iteration, made wrong the
way a user's hardware makes it wrong (``[truth]`` of a scenario, see :class:`Truth`). The
controllers never see it; they see only what a real engine would measure."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from dualscale.control import Plant
from dualscale.sim.scenario import Truth


class GroundTruth:
    """Turns one instance's model grid (time and power on every clock) into the truth's.

    The simulator runs this truth compiled (:meth:`plant` hands it to the instance's stepper, which
    draws from the same ``rng`` in the same order); :meth:`apply` and :meth:`switch_delay_s` state
    it in NumPy, and tests/test_stepping.py checks that the two agree.

    Args:
        truth: the scenario's ``[truth]``.
        phase: ``"prefill"`` or ``"decode"``.
        tp: GPUs of the instance (ranks whose clock switches are drawn).
        rng: the run's generator (seeded from ``truth.seed``; one per run keeps runs reproducible).
    """

    def __init__(self, truth: Truth, phase: str, tp: int, rng: np.random.Generator) -> None:
        self.time_factor = 1.0 + (truth.latency_bias_prefill if phase == "prefill" else truth.latency_bias_decode)
        self.power_factor = 1.0 + (truth.power_bias_prefill if phase == "prefill" else truth.power_bias_decode)
        self.shape = truth.clock_shape_error
        self.sigma = truth.latency_noise
        self.cap_w = truth.power_cap_w
        self.jitter = truth.switch_jitter
        self.tp = tp
        self.rng = rng

    def apply(self, out: NDArray[np.float64]) -> NDArray[np.int64] | None:
        """Rewrite ``out`` (row 0 time s, row 1 power W per GPU, one column per clock) in place;
        returns, per clock asked, the index of the clock that actually runs (None: the same)."""
        t, p = out[0], out[1]
        if self.shape != 0.0:
            top = t[-1]
            t[:] = top + (1.0 + self.shape) * (t - top)
        f = self.time_factor
        if self.sigma > 0.0:
            f *= float(np.exp(self.sigma * self.rng.standard_normal() - 0.5 * self.sigma * self.sigma))
        t *= f
        p *= self.power_factor
        if self.cap_w <= 0.0 or p[-1] <= self.cap_w:
            return None
        # a capped GPU runs at the highest clock whose power fits (the lowest clock if none does)
        idx = np.where(p <= self.cap_w, np.arange(p.size), -1)
        eff = np.maximum.accumulate(idx)
        eff[eff < 0] = 0
        t[:] = t[eff]
        p[:] = np.minimum(p[eff], self.cap_w)
        return eff

    def switch_delay_s(self, delay_s: float) -> float:
        """The slowest of the instance's ranks' switch delays around ``delay_s``."""
        if self.jitter == 0.0 or delay_s == 0.0:
            return delay_s
        return delay_s * float((1.0 + self.jitter * self.rng.uniform(-1.0, 1.0, self.tp)).max())

    def plant(self) -> Plant:
        """The same truth for the simulator's compiled iterations (which draw from the same ``rng``)."""
        return Plant(time_factor=self.time_factor, power_factor=self.power_factor,
                           clock_shape_error=self.shape, latency_noise=self.sigma, power_cap_w=self.cap_w,
                           switch_jitter=self.jitter)
