"""The paper's comparison in the simulator: DistServe, PlaceOnly and DualScale, window by window.

- DistServe: the max-goodput placement at the top clock (the most rate the GPU budget serves,
  fewest GPUs on ties), every GPU at the top clock, the same placement in every window.
- PlaceOnly: the coarse tier alone. Every window, the placement ILP sizes the cluster for the
  previous window's rate (the first window uses its own) with headroom alpha; every instance is
  locked at its baseline clock.
- DualScale: the same placements, with the fine tier (prefill MPC, decode slack control) choosing
  every instance's clock every iteration.

Loads are fractions of the DistServe placement's capacity (its max-goodput rate). Windows are
simulated one by one, each starting empty, as in the paper (which does not model transitions);
latencies are pooled over windows for the percentiles, energies summed. Only GPUs a placement uses
are charged: GPUs left out are assumed powered down or lent to other work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec
import numpy as np

from dualscale.placement.goodput import GoodputSettings, GoodputTable, at_rate, goodput_table
from dualscale.placement.ilp import PlacementPlan, max_goodput_plan, max_rate, place
from dualscale.profile import Profile
from dualscale.sim.engine import Placement, RunResult, Simulation
from dualscale.sim.policies import make_policy
from dualscale.sim.scenario import Scenario
from dualscale.sim.traces import Trace, gamma_trace, load_trace, window

POLICIES = ("distserve", "placeonly", "dualscale")


class EvalSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    gpus: int = 16
    alpha: float = 0.05
    window_s: float = 300.0
    #: the goodput table is measured on this many seconds of the lengths trace
    table_window_s: float = 300.0
    goodput: GoodputSettings = msgspec.field(default_factory=lambda: GoodputSettings(
        tp_degrees=[2, 4, 8], clocks_mhz=[345, 525, 705, 885, 1065, 1245, 1425, 1605, 1785, 1980]))
    lengths_trace: str = "azure-conv"
    gamma_loads: list[float] = msgspec.field(default_factory=lambda: [0.1, 0.25, 0.4, 0.55, 0.7, 0.85])
    gamma_cv: float = 1.41
    gamma_duration_s: float = 300.0
    trace_loads: list[float] = msgspec.field(default_factory=lambda: [0.67, 0.85])
    trace_duration_s: float = 3600.0
    objective: str = "load"
    seed: int = 0


QUICK = EvalSettings(
    window_s=60.0, table_window_s=60.0,
    goodput=GoodputSettings(tp_degrees=[2, 4], clocks_mhz=[705, 1065, 1425, 1980], tolerance_per_s=0.2),
    gamma_loads=[0.4, 0.85], gamma_duration_s=60.0, trace_loads=[0.67], trace_duration_s=120.0)


class EvalRow(msgspec.Struct, frozen=True):
    workload: str
    load: float
    rate_per_s: float
    policy: str
    requests: int
    completed: int
    energy_j: dict[str, float]
    j_per_token: dict[str, float]
    saving_vs_distserve: dict[str, float]
    ttft_p99_s: float
    tpot_p99_s: float
    slo_met: bool
    gpus_mean: float
    infeasible_windows: int
    windows: int


def _placement(plan: PlacementPlan) -> Placement:
    return Placement(prefill=[(tp, f, w) for tp, f, w in plan.instances("prefill")],
                     decode=[(tp, f, w) for tp, f, w in plan.instances("decode")])


def _windows(trace: Trace, window_s: float) -> list[Trace]:
    out = []
    t = 0.0
    while t <= trace.duration_s:
        mask = (trace.arrival_s >= t) & (trace.arrival_s < t + window_s)
        if mask.any():  # every request is simulated, even alone in its window
            out.append(window(trace, t, window_s))
        t += window_s
    return out


def _pool(runs: Sequence[RunResult], scenario: Scenario) -> dict[str, float]:
    ttft, tpot, served, n, e_pre, e_dec, tok_in, tok_out = [], [], 0, 0, 0.0, 0.0, 0, 0
    for r in runs:
        tr = r.trace
        a, b = r.latencies_s()
        ttft.append(a)
        tpot.append(b)
        served += int(np.isfinite(r.finish_s).sum())
        n += len(tr)
        e_pre += r.energy_j("prefill")
        e_dec += r.energy_j("decode")
        tok_in += int(tr.input_tokens.sum())
        tok_out += int(tr.output_tokens.sum())
    q = scenario.slo.percentile
    a = np.concatenate(ttft)
    b = np.concatenate(tpot)
    t99 = float(np.percentile(a, q)) if a.size else math.inf
    p99 = float(np.percentile(b, q)) if b.size else 0.0
    return {"requests": n, "completed": served, "prefill_j": e_pre, "decode_j": e_dec,
            "prefill_j_per_token": e_pre / max(1, tok_in), "decode_j_per_token": e_dec / max(1, tok_out),
            "ttft_p99_s": t99, "tpot_p99_s": p99,
            "met": served == n and t99 <= scenario.slo.ttft_s and p99 <= scenario.slo.tpot_s}


def run_workload(name: str, load: float, trace: Trace, scenario: Scenario, profile: Profile,
                 table: GoodputTable, settings: EvalSettings, distserve: PlacementPlan,
                 policies: Sequence[str] = POLICIES) -> list[EvalRow]:
    """Each of ``policies`` (default: every one) over ``trace``, planned window by window. Savings
    are against DistServe when it is among them."""
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"policies: {unknown} not among {POLICIES}")
    wins = _windows(trace, settings.window_s)
    plans = []
    prev_rate = None
    for w in wins:
        observed = len(w) / settings.window_s
        predicted = observed if prev_rate is None else prev_rate
        plans.append(place(table, profile, predicted, settings.gpus, alpha=settings.alpha,
                           objective=settings.objective, window_s=settings.window_s))  # type: ignore[arg-type]
        prev_rate = observed
    rows = []
    pooled = {}
    for policy in policies:
        runs = []
        for w, plan in zip(wins, plans):
            use = distserve if policy == "distserve" else plan
            pol = make_policy({"distserve": "distserve", "placeonly": "baseline", "dualscale": "dualscale"}[policy],
                              profile, scenario)
            runs.append(Simulation(scenario, profile, w, pol, placement=_placement(use)).run())
        pooled[policy] = (_pool(runs, scenario), [distserve] * len(wins) if policy == "distserve" else plans)
    base = pooled["distserve"][0] if "distserve" in pooled else None
    for policy in policies:
        p, used = pooled[policy]
        rows.append(EvalRow(
            workload=name, load=load, rate_per_s=len(trace) / max(trace.duration_s, 1e-9), policy=policy,
            requests=p["requests"], completed=p["completed"],
            energy_j={"prefill": p["prefill_j"], "decode": p["decode_j"], "total": p["prefill_j"] + p["decode_j"]},
            j_per_token={"prefill": p["prefill_j_per_token"], "decode": p["decode_j_per_token"]},
            saving_vs_distserve={} if base is None else {"prefill": 1 - p["prefill_j"] / base["prefill_j"],
                                                         "decode": 1 - p["decode_j"] / base["decode_j"]},
            ttft_p99_s=p["ttft_p99_s"], tpot_p99_s=p["tpot_p99_s"], slo_met=p["met"],
            gpus_mean=float(np.mean([u.gpus_used for u in used])),
            infeasible_windows=sum(not u.feasible for u in used), windows=len(used)))
    return rows


def evaluate(scenario: Scenario, settings: EvalSettings = EvalSettings(), *, workers: int | None = None,
             cache_dir: Path | None = None, progress: Callable[[str], None] | None = None) -> tuple[list[EvalRow], GoodputTable, PlacementPlan]:
    """Run the comparison; returns the rows, the trace's goodput table and the DistServe placement
    (sized on the trace's table; Gamma workloads are planned on a table of Gamma arrivals)."""
    profile = Profile.load(scenario.profile)
    lengths = load_trace(settings.lengths_trace)
    say = progress or (lambda msg: None)
    # goodput depends on the arrival process, not only the rate: one table per kind of workload,
    # measured on that workload's arrivals (probes rescale the rate from there)
    say("goodput table (trace arrivals)")
    table = goodput_table(scenario, window(lengths, 0.0, settings.table_window_s), settings.goodput,
                          workers=workers, cache_dir=cache_dir)
    say("goodput table (gamma arrivals)")
    gamma_settings = msgspec.structs.replace(settings.goodput, arrivals="gamma", gamma_cv=settings.gamma_cv,
                                             gamma_seed=settings.seed)
    gamma_table = goodput_table(scenario, window(lengths, 0.0, settings.table_window_s), gamma_settings,
                                workers=workers, cache_dir=cache_dir)
    top = max(settings.goodput.clocks_mhz)
    capacity, _, _ = max_rate(table, profile, settings.gpus, [top])
    if capacity <= 0:
        raise ValueError(f"{settings.gpus} GPUs cannot serve any rate within the SLOs at {top} MHz")
    distserve = max_goodput_plan(table, profile, settings.gpus, alpha=settings.alpha, window_s=settings.window_s)
    rows: list[EvalRow] = []
    for load in settings.gamma_loads:
        rate = load * capacity
        say(f"gamma {rate:.2f} req/s ({load:.0%} of capacity)")
        tr = gamma_trace(rate, settings.gamma_cv, settings.gamma_duration_s, lengths, settings.seed)
        rows += run_workload("gamma", load, tr, scenario, profile, gamma_table, settings, distserve)
    for load in settings.trace_loads:
        base = window(lengths, 0.0, settings.trace_duration_s)
        rate = load * capacity
        say(f"{settings.lengths_trace} at {load:.0%} of capacity ({rate:.2f} req/s)")
        tr = at_rate(base, rate)
        rows += run_workload(settings.lengths_trace, load, tr, scenario, profile, table, settings, distserve)
    return rows, table, distserve
