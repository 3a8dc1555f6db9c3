"""Online model correction: what a controller learns from the iterations it sees run.

The profile is transferred from public measurements; on a user's GPU, driver, engine and power cap
it is wrong by some factor, and a little noisy from one iteration to the next. After every
iteration the caller tells the controller the measured time, the clock actually in effect (read
back, which a power cap or a slow rank can make differ from the clock asked for) and, where known,
the measured power. The controller keeps, per instance:

* an exponentially weighted mean ``mu`` and variance of ``log(measured / predicted)`` time, over
  about ``1 / alpha`` recent iterations (the first observation sets ``mu`` at once, so a large
  bias is learnt in one iteration, not twenty);
* the time factor it plans with, ``exp(mu + z * sd)``: the upper side of the recent ratios, so
  noise makes it plan slower, never faster (a deadline is missed by under-predicting time; over-
  predicting it only costs energy). How far up depends on what the deadline sees: a TTFT is one
  or a few prefill iterations, so prefill plans with ``z = 2`` (about the 98th percentile of the
  noise); a TPOT is the mean of a request's many decode steps, and a step over its budget is
  absorbed by the request's slack at the next one, so decode plans near the mean (``z = 0.5``):
  its bias must be learnt, its noise averages out;
* the paper's safety rule: a measurement beyond the spread the estimate expects (above
  ``exp(mu + 3 sd) * (1 + tol)``: the estimate was wrong, e.g. the GPU started throttling) puts the
  instance on the top clock for the next ``hold`` decisions while the estimate settles;
* a power factor (mean of measured / predicted power), which rescales the reported energy only:
  multiplying every clock's power by one factor changes no decision.

The factor scales every time coefficient of the model, so the decision's hot path is unchanged
(``apply`` rewrites a copy of four coefficients when the factor moves).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from dualscale._kernels import perf_model as pm

#: EW weight of one observation (about 10 iterations of memory).
ALPHA = 0.1
#: Standard deviations above the mean log-ratio that the controller plans with (prefill; decode: Z_DECODE).
Z = 2.0
Z_DECODE = 0.5
#: A measurement this many standard deviations above the mean (and TOL more) triggers the safety rule.
TRIGGER_Z = 3.0
#: Spread assumed before the data says otherwise (log units: 5 %), so the first factors are cautious.
SIGMA0 = 0.05
#: Relative excess, beyond TRIGGER_Z standard deviations, that triggers the top clock.
TOL = 0.05
#: Decisions at the top clock after the safety rule fires.
HOLD = 8
#: The factor stays within [1/FACTOR_LIMIT, FACTOR_LIMIT]: a measurement off by more is a fault
#: (a stalled engine, a mis-matched report), not a model error to learn.
FACTOR_LIMIT = 4.0
_LOG_LIMIT = math.log(FACTOR_LIMIT)
_LOG_TOL = math.log1p(TOL)
# the time terms of a coefficient vector, contiguous by the kernels' layout
_TIME_SLICE = slice(pm.C_BASE_S, pm.C_PER_TOKEN_S + 1)
assert (pm.C_BASE_S, pm.C_PER_REQUEST_S, pm.C_PER_CONTEXT_TOKEN_S, pm.C_PER_TOKEN_S) == tuple(range(4))


class Correction:
    """Per-instance latency and power correction (see the module docstring).

    Args:
        z: standard deviations of the log-ratio above its mean that the planned factor carries.

    Attributes:
        time_factor: factor on the model's time the controller plans with (1 before any observation).
        power_factor: measured / predicted power, EW mean (1 before any power observation).
        observations: iterations learnt from.
        triggers: times the safety rule fired.
        hold_left: decisions still forced to the top clock.
        last_error: measured / corrected prediction - 1 of the last observation (0 before any).
        last_model_error: measured / uncorrected model prediction - 1 of the last observation.
    """

    __slots__ = ("z", "mu", "var", "time_factor", "power_factor", "observations", "power_observations", "triggers",
                 "hold_left", "last_error", "last_model_error")

    def __init__(self, z: float = Z) -> None:
        self.z = float(z)
        self.reset()

    def reset(self) -> None:
        """Forget everything learnt (e.g. after the instance moved to other GPUs)."""
        self.mu = 0.0
        self.var = SIGMA0 * SIGMA0
        self.time_factor = 1.0
        self.power_factor = 1.0
        self.observations = 0
        self.power_observations = 0
        self.triggers = 0
        self.hold_left = 0
        self.last_error = 0.0
        self.last_model_error = 0.0

    def observe(self, measured_s: float, model_s: float, measured_w: float = 0.0, model_w: float = 0.0) -> bool:
        """Learn from one iteration: ``model_s`` is the uncorrected model's time for the batch that
        ran at the clock in effect; power is learnt when both powers are > 0. Returns True when
        ``time_factor`` changed (the caller then re-applies it)."""
        if not (measured_s > 0.0 and model_s > 0.0 and math.isfinite(measured_s) and math.isfinite(model_s)):
            return False
        x = math.log(measured_s / model_s)
        if abs(x) > _LOG_LIMIT:
            return False
        corrected_s = model_s * self.time_factor
        self.last_error = measured_s / corrected_s - 1.0
        self.last_model_error = measured_s / model_s - 1.0
        # before any observation there is no spread to expect: the paper's rule as it stands
        spread = TRIGGER_Z * math.sqrt(self.var) if self.observations else 0.0
        if x > self.mu + spread + _LOG_TOL:
            self.triggers += 1
            self.hold_left = HOLD
        if self.observations == 0:
            self.mu = x
        else:
            d = x - self.mu
            self.mu += ALPHA * d
            self.var = (1.0 - ALPHA) * (self.var + ALPHA * d * d)
        self.observations += 1
        if measured_w > 0.0 and model_w > 0.0 and math.isfinite(measured_w) and math.isfinite(model_w):
            r = measured_w / model_w
            self.power_factor = r if self.power_observations == 0 else self.power_factor + ALPHA * (r - self.power_factor)
            self.power_observations += 1
        old = self.time_factor
        self.time_factor = math.exp(min(_LOG_LIMIT, max(-_LOG_LIMIT, self.mu + self.z * math.sqrt(self.var))))
        return self.time_factor != old

    @property
    def mean_time_factor(self) -> float:
        """measured / model time, EW geometric mean (1 before any observation): the bias without the
        safety margin ``time_factor`` carries (what a planner that averages over many iterations,
        such as the coarse tier, should use)."""
        return math.exp(min(_LOG_LIMIT, max(-_LOG_LIMIT, self.mu)))

    def take_hold(self) -> bool:
        """True when this decision must use the top clock (counts the hold down)."""
        if self.hold_left > 0:
            self.hold_left -= 1
            return True
        return False

    def apply(self, base_coef: NDArray[np.float64], coef: NDArray[np.float64]) -> None:
        """Scale the time terms of ``base_coef`` by ``time_factor`` into ``coef`` (whose other
        entries are ``base_coef``'s already)."""
        np.multiply(base_coef[_TIME_SLICE], self.time_factor, out=coef[_TIME_SLICE])


class ClockIndex:
    """Column of a read-back clock in a controller's clock set: a dict lookup when it is one of the
    set (the usual case, and 10x cheaper than interpolating), else interpolation between columns."""

    def __init__(self, clocks_mhz: NDArray[np.int64]) -> None:
        self.clocks_mhz = clocks_mhz
        self._col = {int(f): j for j, f in enumerate(clocks_mhz.tolist())}

    def value_at(self, row: NDArray[np.float64], freq_mhz: float) -> float:
        """``row`` (one value per clock of the set) at ``freq_mhz``; held flat outside the set."""
        j = self._col.get(freq_mhz)  # 1200, 1200.0 and np.int64(1200) hash alike
        if j is not None:
            return float(row[j])
        return float(np.interp(freq_mhz, self.clocks_mhz, row))


class Learner:
    """What a controller needs to learn from :meth:`observe` (both controllers derive from it):
    the model's coefficients and the corrected copy its kernels read, the :class:`Correction`, and
    the time factor its last decision was made with (0: nothing to learn from)."""

    _coef: NDArray[np.float64]

    def _init_learning(self, model_coef: NDArray[np.float64], clocks_mhz: NDArray[np.int64],
                       online_correction: bool, z: float) -> None:
        self._model_coef = model_coef
        self._coef = model_coef.copy()  # the model's, time terms scaled by the correction
        self.online_correction = bool(online_correction)
        #: what the controller has learnt from :meth:`observe`
        self.correction = Correction(z)
        self._decided_factor = 0.0
        self._clock_index = ClockIndex(clocks_mhz)

    def _last_model(self, freq_mhz: float, factor: float, with_power: bool) -> tuple[float, float]:
        """(uncorrected model time s, model power per GPU W or 0) of the last decision's batch at
        ``freq_mhz``; its grid was computed with time factor ``factor``."""
        raise NotImplementedError

    def observe(self, iteration_s: float, freq_mhz: float, power_w: float = 0.0) -> None:
        """Feed back the iteration that ran the batch of the last ``decide``.

        Args:
            iteration_s: its measured time (s).
            freq_mhz: the SM clock in effect while it ran, as read back (MHz); 0 when unknown or
                when the clock changed during the iteration (then nothing is learnt).
            power_w: its measured power per GPU (W); 0 when unknown.
        """
        factor, self._decided_factor = self._decided_factor, 0.0
        if not self.online_correction or factor == 0.0 or not freq_mhz > 0:
            return
        model_s, model_w = self._last_model(freq_mhz, factor, power_w > 0)
        if self.correction.observe(float(iteration_s), model_s, float(power_w), model_w):
            self.correction.apply(self._model_coef, self._coef)
