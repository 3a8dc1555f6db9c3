"""The simulator: a P/D cluster replaying a request trace under clock policies (``dualscale simulate``)."""

from __future__ import annotations

from dualscale.sim.engine import RunResult, Simulation
from dualscale.sim.metrics import Summary, summarize
from dualscale.sim.policies import POLICIES, Policy, make_policy
from dualscale.sim.run import build_trace, simulate
from dualscale.sim.scenario import Scenario, builtin_scenarios, load_scenario
from dualscale.sim.traces import Trace, builtin_traces, downsample, gamma_trace, load_trace, time_scale, window

__all__ = [
    "POLICIES",
    "Policy",
    "RunResult",
    "Scenario",
    "Simulation",
    "Summary",
    "Trace",
    "build_trace",
    "builtin_scenarios",
    "builtin_traces",
    "downsample",
    "gamma_trace",
    "load_scenario",
    "load_trace",
    "make_policy",
    "simulate",
    "summarize",
    "time_scale",
    "window",
]
