"""A perturbed copy of a profile: a stand-in for "the user's GPU" when testing calibration.

The truth-recovery tests and ``bench/truth_recovery.py`` hide such a profile behind the simulator
(or the emulated engine), record telemetry from it and check that ``profile fit --telemetry``
recovers it. Every latency coefficient and every slowdown knot (except the reference, which is 1
by definition) is scaled by its own factor in ``[1 - spread, 1 + spread]``; the idle and busy
power curves are replaced by curves of another shape (a power law in the clock) with the base's
value at the top clock, one set shared by every TP degree (decode's compute power = prefill's,
the model form the fit assumes).
"""

from __future__ import annotations

import msgspec
import numpy as np

from dualscale.profile.schema import ClockResponse, Latency, ProfileConfig


def perturbed(base: ProfileConfig, seed: int = 0, spread: float = 0.25, power_exponent: float = 2.2) -> ProfileConfig:
    """``base`` with its latency and clock curves perturbed and power curves reshaped (see module)."""
    if not 0 <= spread < 1:
        raise ValueError(f"spread = {spread}: must be in [0, 1)")
    rng = np.random.default_rng(seed)

    def scale(x: float) -> float:
        return float(x * rng.uniform(1 - spread, 1 + spread))

    cr = base.clock_response
    knots = np.asarray(cr.knots_mhz)
    ref = knots == cr.reference_mhz

    def curve(v: list[float]) -> list[float]:
        f = rng.uniform(1 - spread, 1 + spread, len(v))
        f[ref] = 1.0
        return [float(x) for x in np.asarray(v) * f]

    shape = 0.35 + 0.65 * (knots / knots[-1]) ** power_exponent

    def reshaped(v: list[float]) -> list[float]:
        return [float(x) for x in v[-1] * shape]

    lat = Latency(
        prefill=[msgspec.structs.replace(c, base_s=scale(c.base_s), per_request_s=scale(c.per_request_s),
                                         per_context_token_s=scale(c.per_context_token_s),
                                         per_token_s=scale(c.per_token_s), source="perturbed") for c in base.latency.prefill],
        decode=[msgspec.structs.replace(c, base_s=scale(c.base_s), per_request_s=scale(c.per_request_s),
                                        per_context_token_s=scale(c.per_context_token_s),
                                        per_token_s=scale(c.per_token_s), source="perturbed") for c in base.latency.decode],
        source="perturbed")
    comp = reshaped(cr.prefill_comp_power_w)
    new_cr = ClockResponse(
        knots_mhz=list(cr.knots_mhz), reference_mhz=cr.reference_mhz, mem_slowdown=curve(cr.mem_slowdown),
        comp_slowdown=curve(cr.comp_slowdown),
        idle_power_w=[float(x) for x in cr.idle_power_w[-1] * (0.7 + 0.3 * (knots / knots[-1]) ** 3)],
        prefill_mem_power_w=reshaped(cr.prefill_mem_power_w), prefill_comp_power_w=comp,
        decode_mem_power_w=reshaped(cr.decode_mem_power_w), decode_comp_power_w=comp,
        source=f"perturbed (seed {seed}, spread {spread:g}; power x (0.35 + 0.65 (f/fmax)^{power_exponent:g}))")
    return msgspec.structs.replace(base, name=f"{base.name}-perturbed-{seed}", clock_response=new_cr, latency=lat,
                                   description="a perturbed profile (calibration tests)")
