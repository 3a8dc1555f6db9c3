"""What a run is judged by: energy per phase, latency percentiles, SLO attainment (msgspec, JSON).

TTFT = first token - arrival; TPOT = (finish - first token) / (output tokens - 1), for requests with
more than one output token. Energy per token: prefill energy per prompt token, decode energy per
output token. Energies include idle power and every GPU of every instance.
"""

from __future__ import annotations

import msgspec
import numpy as np
from numpy.typing import NDArray

from dualscale.sim.engine import RunResult


class Phases(msgspec.Struct, frozen=True):
    prefill: float
    decode: float


class EnergyJ(msgspec.Struct, frozen=True):
    prefill: float
    decode: float
    total: float


class Percentiles(msgspec.Struct, frozen=True):
    p50: float
    p90: float
    p99: float


class SloReport(msgspec.Struct, frozen=True):
    ttft_s: float
    tpot_s: float
    percentile: float
    ttft_attainment: float
    tpot_attainment: float
    met: bool


class GpuCount(msgspec.Struct, frozen=True):
    prefill: int
    decode: int


class Summary(msgspec.Struct, frozen=True):
    """One policy's outcome on one trace (the ``--json`` record)."""

    policy: str
    trace: str
    requests: int
    completed: int
    energy_j: EnergyJ
    j_per_token: Phases
    ttft_s: Percentiles
    tpot_s: Percentiles
    slo: SloReport
    gpus: GpuCount
    sim_wall_s: float
    simulated_s: float
    events: int
    #: requests held back because a decode instance's KV cache was full
    kv_blocked: int
    #: longest wait from reaching a decode instance to joining its batch (step boundary or memory)
    admit_wait_max_s: float
    #: requests needing more KV than a decode instance holds (never served)
    rejected: int
    mean_power_w: Phases


def _percentiles(x: NDArray[np.float64]) -> Percentiles:
    if x.size == 0:
        return Percentiles(float("nan"), float("nan"), float("nan"))
    p = np.percentile(x, [50, 90, 99])
    return Percentiles(float(p[0]), float(p[1]), float(p[2]))


def summarize(run: RunResult) -> Summary:
    """The :class:`Summary` of a finished run."""
    tr, sc = run.trace, run.scenario
    done = np.isfinite(run.finish_s)
    ttft, tpot = run.latencies_s()
    e_pre, e_dec = run.energy_j("prefill"), run.energy_j("decode")
    slo = sc.slo
    q = slo.percentile
    # requests never served count as misses in attainment
    ttft_ok = float(np.sum(ttft <= slo.ttft_s)) / max(1, len(tr))
    tpot_ok = float(np.sum(tpot <= slo.tpot_s)) / max(1, int(np.sum(tr.output_tokens > 1)))
    ttft_q = float(np.percentile(ttft, q)) if ttft.size else float("inf")
    tpot_q = float(np.percentile(tpot, q)) if tpot.size else 0.0
    all_served = bool(done.all())
    gpus = GpuCount(sum(i.tp for i in run.prefill), sum(i.tp for i in run.decode))
    span = max(run.end_s, 1e-12)
    return Summary(
        policy=run.policy,
        trace=tr.name,
        requests=len(tr),
        completed=int(done.sum()),
        energy_j=EnergyJ(e_pre, e_dec, e_pre + e_dec),
        j_per_token=Phases(e_pre / max(1, int(tr.input_tokens.sum())), e_dec / max(1, int(tr.output_tokens.sum()))),
        ttft_s=_percentiles(ttft),
        tpot_s=_percentiles(tpot),
        slo=SloReport(slo.ttft_s, slo.tpot_s, q, ttft_ok, tpot_ok,
                      all_served and ttft_q <= slo.ttft_s and tpot_q <= slo.tpot_s),
        gpus=gpus,
        sim_wall_s=run.wall_s,
        simulated_s=run.end_s,
        events=run.events,
        kv_blocked=int(run.kv_blocked.sum()),
        admit_wait_max_s=float(run.admit_wait_s.max()) if run.admit_wait_s.size else 0.0,
        rejected=int(run.rejected.sum()),
        mean_power_w=Phases(e_pre / span / gpus.prefill, e_dec / span / gpus.decode),
    )
