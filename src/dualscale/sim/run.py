"""Run policies over a scenario's workload: the entry point behind ``dualscale simulate``."""

from __future__ import annotations

from collections.abc import Sequence

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from dualscale.profile import Profile
from dualscale.sim.engine import RunResult, Simulation
from dualscale.sim.metrics import Summary, summarize
from dualscale.sim.policies import make_policy
from dualscale.sim.scenario import Scenario, TraceSpec
from dualscale.sim.traces import Trace, downsample, gamma_trace, load_trace, time_scale, window


def build_trace(spec: TraceSpec) -> Trace:
    """The requests a scenario's trace section describes (window first, then the rate)."""
    if spec.name == "gamma":
        return gamma_trace(spec.rate_per_s, spec.cv, spec.duration_s, load_trace(spec.lengths), spec.seed)
    trace = load_trace(spec.name)
    if spec.start_s > 0 or spec.duration_s > 0:
        # 0 means to the end: one second past the last arrival includes it
        duration = spec.duration_s if spec.duration_s > 0 else max(0.0, trace.duration_s - spec.start_s) + 1.0
        trace = window(trace, spec.start_s, duration)
    return rescale(trace, spec.rate_per_s, spec.scaling) if spec.rate_per_s > 0 else trace


def rescale(trace: Trace, rate_per_s: float, scaling: str) -> Trace:
    """``trace`` at ``rate_per_s`` by keeping evenly spaced requests ("downsample") or by rescaling time."""
    return downsample(trace, rate_per_s) if scaling == "downsample" else time_scale(trace, rate_per_s)


def simulate(scenario: Scenario, policies: Sequence[str], trace: Trace | None = None,
             show_progress: bool = True) -> list[tuple[RunResult, Summary]]:
    """Run each policy over the same trace (the scenario's unless given); one result per policy."""
    profile = Profile.load(scenario.profile)
    trace = trace if trace is not None else build_trace(scenario.trace)
    built = [make_policy(p, profile, scenario) for p in policies]  # fail on a bad name before any run
    results = []
    span = max(trace.duration_s, 1e-9)
    with Progress(TextColumn("{task.description:<16}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), disable=not show_progress, transient=True) as bar:
        for policy in built:
            task = bar.add_task(policy.name, total=span, info="")
            sim = Simulation(scenario, profile, trace, policy)
            run = sim.run(progress=lambda t, task=task: bar.update(
                task, completed=min(t, span), info=f"{t:,.0f} / {span:,.0f} s simulated"))
            results.append((run, summarize(run)))
    return results
