"""Simulator speed: one simulated hour of Azure conv (19,366 requests) on the default 16-GPU scenario.

Prints, per policy, the wall time, events per second and simulated seconds per wall second, then
(second pass, under cProfile, which slows everything down by a similar factor) where the time goes:
the share of wall time in the controllers, the model kernels, the engine's own bookkeeping, and
the rest (NumPy calls, heap operations, Python built-ins).

Target (issue 4): <= 120 s wall for dualscale on this 2-core machine (goal 30 s).

    python bench/simulate.py [--policy dualscale --policy distserve] [--duration 3600] [--json out.json]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import sys
from pathlib import Path

import msgspec

import dualscale
from dualscale.profile import Profile
from dualscale.sim.engine import Simulation
from dualscale.sim.metrics import summarize
from dualscale.sim.policies import make_policy
from dualscale.sim.run import build_trace
from dualscale.sim.scenario import load_scenario

CATEGORIES = (
    ("controllers", ("dualscale/control/", "dualscale/_kernels/mpc.py", "dualscale/_kernels/slack.py",
                     "dualscale/sim/policies.py", "osqp")),
    ("model kernels", ("dualscale/_kernels/perf_model.py",)),
    ("engine", ("dualscale/sim/engine.py",)),
)


def categorise(stats: pstats.Stats) -> dict[str, float]:
    """Seconds of own time (tottime) per category, from a cProfile run."""
    out = {name: 0.0 for name, _ in CATEGORIES} | {"other (numpy, heapq, builtins)": 0.0}
    for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        for name, keys in CATEGORIES:
            if any(k in filename for k in keys):
                out[name] += tottime
                break
        else:
            out["other (numpy, heapq, builtins)"] += tottime
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", action="append", help="policies to time (default: dualscale, distserve)")
    ap.add_argument("--duration", type=float, default=0.0, help="simulated seconds of the trace (default: all)")
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile pass")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    scenario = load_scenario("default")
    spec = msgspec.structs.replace(scenario.trace, duration_s=args.duration)
    trace = build_trace(spec)
    profile = Profile.load(scenario.profile)
    rows = []
    for name in args.policy or ["dualscale", "distserve"]:
        sim = Simulation(scenario, profile, trace, make_policy(name, profile, scenario))
        run = sim.run()
        s = summarize(run)
        row = {"policy": name, "requests": len(trace), "simulated_s": run.end_s, "wall_s": run.wall_s,
               "events": run.events, "events_per_s": run.events / run.wall_s,
               "simulated_s_per_wall_s": run.end_s / run.wall_s, "slo_met": s.slo.met}
        print(f"{name:>12s}: {len(trace):,} requests, {run.end_s:,.0f} s simulated in {run.wall_s:.1f} s wall "
              f"({run.events:,} events, {row['events_per_s']:,.0f} events/s, "
              f"{row['simulated_s_per_wall_s']:.0f}x real time)")
        if not args.no_profile:
            prof = cProfile.Profile()
            sim = Simulation(scenario, profile, trace, make_policy(name, profile, scenario))
            prof.enable()
            sim.run()
            prof.disable()
            cats = categorise(pstats.Stats(prof))
            total = sum(cats.values())
            row["time_share"] = {k: v / total for k, v in cats.items()}
            print("              where time goes (cProfile own time): "
                  + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in cats.items()))
        rows.append(row)
    if args.json:
        meta = {"python": platform.python_version(), "cpus": os.cpu_count(), "dualscale": dualscale.__version__}
        args.json.write_text(json.dumps({"meta": meta, "runs": rows}, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
