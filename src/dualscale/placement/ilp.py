"""Placement: how many instances of which (phase, TP, baseline clock) to run, as a mixed-integer
program over the goodput table, solved with scipy.optimize.milp (HiGHS).

Variables: n_c, instances of configuration c (integer), and x_c, the request rate routed to them
(req/s, continuous, x_c <= n_c x goodput_c). Constraints: GPUs sum(n_c tp_c) <= budget, and each
phase's routed rate >= (1 + alpha) x predicted rate. Objectives:

``"load"`` (default, ours): the cluster's power at the predicted load. An instance of c draws its
    idle power whenever it runs plus, per request it serves, its energy per request at goodput
    less the idle share: sum_c n_c P_idle_c + x_c e_c. Extra instances cost their idle power,
    lightly loaded ones are not charged as if they ran at goodput.
``"paper"``: the paper's sum_c n_c E_c R_c, every instance charged as if it ran at its goodput.

Routing weights are the rate routed per instance of each configuration. When the budget cannot
carry the load, the plan is the one that maximises the rate served at top clocks, flagged
infeasible with the shortfall.
"""

from __future__ import annotations

from typing import Literal

import msgspec
import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from dualscale.placement.goodput import GoodputEntry, GoodputTable
from dualscale.profile import Profile

Objective = Literal["load", "paper"]


class PlacementGroup(msgspec.Struct, frozen=True):
    """``instances`` instances of one configuration, each routed ``rate_per_s`` (its weight)."""

    phase: str
    tp: int
    freq_mhz: int
    instances: int
    goodput_per_s: float
    rate_per_s: float
    power_w: float  # predicted, all instances of the group


class PlacementPlan(msgspec.Struct, frozen=True):
    """What the coarse tier decided for one window."""

    predicted_rate_per_s: float
    alpha: float
    gpus: int
    gpus_used: int
    groups: list[PlacementGroup]
    predicted_power_w: float
    window_s: float
    predicted_energy_j: float
    feasible: bool
    message: str
    objective: str

    def instances(self, phase: str) -> list[tuple[int, int, float]]:
        """(tp, freq_mhz, routing weight) per instance of ``phase``."""
        out = []
        for g in self.groups:
            if g.phase == phase:
                w = g.rate_per_s if g.rate_per_s > 0 else 1e-6
                out.extend([(g.tp, g.freq_mhz, w)] * g.instances)
        return out


def _usable(table: GoodputTable, clocks: list[int] | None) -> list[GoodputEntry]:
    return [e for e in table.entries
            if e.goodput_per_s > 0 and e.energy_per_request_j is not None and (clocks is None or e.freq_mhz in clocks)]


def _costs(entries: list[GoodputEntry], profile: Profile) -> tuple[np.ndarray, np.ndarray]:
    """(idle power W per instance, energy J per request above idle) of each configuration."""
    idle = np.array([e.tp * float(profile.idle_power_w(e.freq_mhz)) for e in entries])
    per_req = np.array([max(0.0, e.energy_per_request_j - p / e.goodput_per_s)  # type: ignore[operator]
                        for e, p in zip(entries, idle)])
    return idle, per_req


def _solve(entries: list[GoodputEntry], gpus: int, demand: float, cost_n: np.ndarray,
           cost_x: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """min cost_n.n + cost_x.x s.t. GPUs <= gpus, sum x per phase >= demand, x <= n R; None if infeasible."""
    c_count = len(entries)
    tp = np.array([e.tp for e in entries], dtype=float)
    rate = np.array([e.goodput_per_s for e in entries])
    pre = np.array([e.phase == "prefill" for e in entries], dtype=float)
    dec = 1.0 - pre
    z = np.zeros(c_count)
    rows = [np.concatenate([tp, z]), np.concatenate([z, pre]), np.concatenate([z, dec])]
    lo = [0.0, demand, demand]
    hi = [float(gpus), np.inf, np.inf]
    link = np.hstack([-np.diag(rate), np.eye(c_count)])  # x_c - R_c n_c <= 0
    a = np.vstack([np.array(rows), link])
    lo += [-np.inf] * c_count
    hi += [0.0] * c_count
    n_max = np.floor(gpus / tp)
    res = milp(c=np.concatenate([cost_n, cost_x]), constraints=LinearConstraint(a, lo, hi),
               integrality=np.concatenate([np.ones(c_count), np.zeros(c_count)]),
               bounds=Bounds(np.zeros(2 * c_count), np.concatenate([n_max, rate * n_max])))
    if res.status != 0 or res.x is None:
        return None
    n = np.round(res.x[:c_count]).astype(int)
    return n, np.clip(res.x[c_count:], 0.0, None)


def max_rate(table: GoodputTable, profile: Profile, gpus: int, clocks: list[int] | None = None) -> tuple[float, np.ndarray, list[GoodputEntry]]:
    """The highest rate ``gpus`` GPUs serve within the SLOs (both phases), with the instance counts.

    Ties go to the placement using fewer GPUs. ``clocks`` restricts the baseline clocks.
    """
    entries = _usable(table, clocks)
    if not entries:
        return 0.0, np.zeros(0, dtype=int), entries
    c_count = len(entries)
    tp = np.array([e.tp for e in entries], dtype=float)
    rate = np.array([e.goodput_per_s for e in entries])
    pre = np.array([e.phase == "prefill" for e in entries], dtype=float)
    # variables: n (integer), lam; maximise lam - eps * GPUs used
    a = np.vstack([np.concatenate([tp, [0.0]]),
                   np.concatenate([pre * rate, [-1.0]]),
                   np.concatenate([(1 - pre) * rate, [-1.0]])])
    cost = np.concatenate([1e-6 * tp, [-1.0]])
    res = milp(c=cost, constraints=LinearConstraint(a, [0.0, 0.0, 0.0], [float(gpus), np.inf, np.inf]),
               integrality=np.concatenate([np.ones(c_count), [0]]),
               bounds=Bounds(np.zeros(c_count + 1), np.concatenate([np.floor(gpus / tp), [np.inf]])))
    if res.status != 0 or res.x is None:
        return 0.0, np.zeros(c_count, dtype=int), entries
    return float(res.x[-1]), np.round(res.x[:c_count]).astype(int), entries


def _plan(entries: list[GoodputEntry], n: np.ndarray, x: np.ndarray, idle: np.ndarray, per_req: np.ndarray,
          rate: float, alpha: float, gpus: int, window_s: float, feasible: bool, message: str,
          objective: str) -> PlacementPlan:
    groups = []
    # the routed rate is spread evenly over a group's instances; the plan carries it per instance
    for e, k, xi, p, q in zip(entries, n, x, idle, per_req):
        if k > 0:
            served = xi / (1.0 + alpha)  # the headroom is capacity, not load
            groups.append(PlacementGroup(e.phase, e.tp, e.freq_mhz, int(k), e.goodput_per_s, float(xi / k),
                                         float(k * p + served * q)))
    power = float(sum(g.power_w for g in groups))
    return PlacementPlan(float(rate), alpha, gpus, int(sum(g.tp * g.instances for g in groups)), groups, power,
                         window_s, power * window_s, feasible, message, objective)


def place(table: GoodputTable, profile: Profile, rate_per_s: float, gpus: int, *, alpha: float = 0.05,
          objective: Objective = "load", clocks_mhz: list[int] | None = None,
          window_s: float = 300.0) -> PlacementPlan:
    """The least-energy placement serving ``rate_per_s`` x (1 + alpha) on ``gpus`` GPUs.

    Args:
        clocks_mhz: restrict baseline clocks (e.g. only the top clock: DistServe's setting).
        window_s: length of the window the plan covers (for the predicted energy).
    """
    if not (np.isfinite(rate_per_s) and rate_per_s >= 0):
        raise ValueError(f"rate_per_s = {rate_per_s!r}: must be finite and >= 0")
    if gpus < 1:
        raise ValueError(f"gpus = {gpus!r}: must be >= 1")
    if not 0 <= alpha < 10:
        raise ValueError(f"alpha = {alpha!r}: must be in [0, 10)")
    if objective not in ("load", "paper"):
        raise ValueError(f"objective = {objective!r}: must be 'load' or 'paper'")
    entries = _usable(table, clocks_mhz)
    idle, per_req = _costs(entries, profile)
    demand = (1.0 + alpha) * rate_per_s
    if objective == "load":
        cost_n, cost_x = idle, per_req
    else:
        cost_n = np.array([e.energy_per_request_j * e.goodput_per_s for e in entries])  # type: ignore[operator]
        cost_x = np.zeros(len(entries))
    sol = _solve(entries, gpus, demand, cost_n, cost_x) if entries else None
    if sol is not None:
        n, x = sol
        return _plan(entries, n, x, idle, per_req, rate_per_s, alpha, gpus, window_s, True, "", objective)
    # best effort: the most rate the budget serves at the top clock of each configuration
    best = max_goodput_plan(table, profile, gpus, rate_per_s=rate_per_s, alpha=alpha, window_s=window_s)
    top = max(e.freq_mhz for e in table.entries)
    capacity = max_rate(table, profile, gpus, [top])[0]
    msg = (f"{gpus} GPUs cannot serve {rate_per_s:.2f} req/s x (1 + {alpha:g}) = {demand:.2f} req/s within the SLOs: "
           f"at most {capacity:.2f} req/s at the top clock (short by {demand - capacity:.2f} req/s); "
           "best-effort plan at the top clock")
    return msgspec.structs.replace(best, feasible=False, message=msg, objective=objective)


def max_goodput_plan(table: GoodputTable, profile: Profile, gpus: int, *, rate_per_s: float | None = None,
                     alpha: float = 0.05, window_s: float = 300.0) -> PlacementPlan:
    """DistServe's placement: the most rate ``gpus`` GPUs serve at the top clock (fewest GPUs on
    ties), routing in proportion to goodput. ``rate_per_s`` (default: that capacity) only sets the
    predicted power and energy."""
    top = max(e.freq_mhz for e in table.entries)
    capacity, n, entries = max_rate(table, profile, gpus, [top])
    idle, per_req = _costs(entries, profile)
    x = n * np.array([e.goodput_per_s for e in entries])
    load = capacity if rate_per_s is None else rate_per_s
    # predicted power at the given load: each phase's capacity shares it pro rata
    for phase in ("prefill", "decode"):
        mask = np.array([e.phase == phase for e in entries])
        total = x[mask].sum()
        if total > 0:
            x[mask] = x[mask] * (1.0 + alpha) * load / total
    return _plan(entries, n, x, idle, per_req, load, alpha, gpus, window_s, True, "", "max-goodput")
