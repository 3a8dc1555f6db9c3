"""The offline tier at scale (issue 16), in one command, side by side with the previous engine.

1. Engine speed: one simulated hour of the default scenario (Azure conv, 16 GPUs) under each policy,
   the previous per-event engine (bench/previous_engine.py, frozen) and the current one run in
   turn in this process on the same inputs; wall time, events/s, the ratio, and whether they
   agree (energy relative difference, largest TTFT/TPOT difference). Target: >= 5x for
   ``dualscale`` and ``distserve``.
2. ``dualscale evaluate``: cold (a fresh process, an empty result cache: goodput tables and windows
   all computed; Numba's cache as it is, i.e. warm after any earlier run) and warm (the same
   command again: everything from the result cache), and cold with Numba's cache cold too
   (NUMBA_CACHE_DIR pointed at an empty folder: every kernel compiled). Targets: cold <= 30 s,
   warm <= 5 s.
3. Long runs: Gamma arrivals at the Azure conv rate with its lengths for 1 h, 6 h and 24 h under
   ``dualscale``, each in a fresh process: wall time (linear in simulated time?) and peak RSS.
   Target: one day under 2 GB.

The host's load (``os.getloadavg``) is printed beside every figure: on a shared machine only the
ratios measured side by side mean much.

    python bench/simulate.py [--quick] [--json out.json] [--skip evaluate --skip long]

``--quick``: 10 simulated minutes for the ratio, ``evaluate --quick``, and 15 min / 30 min / 1 h
long runs (minutes instead of ~5 on a quiet 2-core host).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import numpy as np

import dualscale
from dualscale.profile import Profile
from dualscale.sim import engine as current
from dualscale.sim.policies import make_policy
from dualscale.sim.run import build_trace
from dualscale.sim.scenario import load_scenario

sys.path.insert(0, str(Path(__file__).resolve().parent))
import previous_engine as previous


def load() -> str:
    return "load {:.1f}/{:.1f}".format(*os.getloadavg()[:2])


def engine_speed(duration_s: float, policies: list[str], repeats: int) -> list[dict]:
    scenario = load_scenario("default")
    trace = build_trace(msgspec.structs.replace(scenario.trace, duration_s=duration_s))
    profile = Profile.load(scenario.profile)
    rows = []
    for name in policies:
        walls: dict[str, list[float]] = {"previous": [], "current": []}
        runs = {}
        for _ in range(repeats):  # alternate, so the host's noise hits both alike
            for label, mod in (("previous", previous), ("current", current)):
                sim = mod.Simulation(scenario, profile, trace, make_policy(name, profile, scenario))
                t0 = time.perf_counter()
                runs[label] = sim.run()
                walls[label].append(time.perf_counter() - t0)
        old, new = runs["previous"], runs["current"]
        w_old, w_new = float(np.median(walls["previous"])), float(np.median(walls["current"]))
        e_rel = max(abs(new.energy_j(p) / old.energy_j(p) - 1.0) for p in ("prefill", "decode"))
        lat = [float(np.max(np.abs(a - b), initial=0.0)) for a, b in zip(new.latencies_s(), old.latencies_s())]
        row = {"policy": name, "requests": len(trace), "simulated_s": new.end_s, "events": new.events,
               "previous_wall_s": w_old, "current_wall_s": w_new, "speedup": w_old / w_new,
               "current_events_per_s": new.events / w_new, "energy_rel_diff": e_rel,
               "ttft_max_abs_diff_s": lat[0], "tpot_max_abs_diff_s": lat[1], "host": load()}
        rows.append(row)
        print(f"{name:>10s}: {len(trace):,} requests, {new.end_s:,.0f} s simulated, {new.events:,} events: previous "
              f"{w_old:.2f} s, current {w_new:.2f} s -> {w_old / w_new:.1f}x "
              f"(target >= 5x); energy rel diff {e_rel:.1e}, max |dTTFT| {lat[0]:.1e} s, max |dTPOT| {lat[1]:.1e} s"
              f" [{row['host']}]", flush=True)
    return rows


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """(wall s, peak RSS of the child in KiB) of one command in a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def evaluate_times(quick: bool) -> dict:
    cmd = [sys.executable, "-m", "dualscale.cli", "evaluate"] + (["--quick"] if quick else [])
    out: dict = {"command": " ".join(cmd[2:])}
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as numba_cache:
        env = os.environ | {"DUALSCALE_CACHE_DIR": cache}
        out["cold_s"], _ = timed(cmd, env)
        out["cold_host"] = load()
        print(f"  evaluate cold (fresh process, empty result cache, Numba cache warm): {out['cold_s']:.1f} s "
              f"(target <= 30 s) [{out['cold_host']}]", flush=True)
        out["warm_s"], _ = timed(cmd, env)
        out["warm_host"] = load()
        print(f"  evaluate warm (results cached): {out['warm_s']:.1f} s (target <= 5 s) [{out['warm_host']}]",
              flush=True)
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as numba_cache:
        env = os.environ | {"DUALSCALE_CACHE_DIR": cache, "NUMBA_CACHE_DIR": numba_cache}
        out["cold_numba_cold_s"], _ = timed(cmd, env)
        out["cold_numba_cold_host"] = load()
        print(f"  evaluate cold with Numba's cache cold too (every kernel compiled): "
              f"{out['cold_numba_cold_s']:.1f} s [{out['cold_numba_cold_host']}]", flush=True)
    return out


_LONG = """
import resource, sys, time
import msgspec
from dualscale.profile import Profile
from dualscale.sim.engine import Simulation
from dualscale.sim.metrics import summarize
from dualscale.sim.policies import make_policy
from dualscale.sim.scenario import load_scenario
from dualscale.sim.traces import gamma_trace, load_trace
hours = float(sys.argv[1])
sc = load_scenario("default")
lengths = load_trace("azure-conv")
trace = gamma_trace(lengths.rate_per_s, 1.41, hours * 3600.0, lengths, 0)
profile = Profile.load(sc.profile)
sim = Simulation(sc, profile, trace, make_policy("dualscale", profile, sc))
t0 = time.perf_counter()
run = sim.run()
wall = time.perf_counter() - t0
s = summarize(run)
print(len(trace), run.events, wall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, s.slo.met)
"""


def long_runs(hours: list[float]) -> list[dict]:
    rows = []
    for h in hours:
        proc = subprocess.run([sys.executable, "-c", _LONG, str(h)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr)
        n, events, wall, rss_kib, met = proc.stdout.split()
        row = {"hours": h, "requests": int(n), "events": int(events), "wall_s": float(wall),
               "wall_s_per_simulated_h": float(wall) / h, "peak_rss_mb": int(rss_kib) / 1024, "slo_met": met == "True",
               "host": load()}
        rows.append(row)
        print(f"  {h:g} h Gamma at the Azure conv rate, dualscale: {int(n):,} requests, {int(events):,} events, "
              f"{float(wall):.1f} s wall ({float(wall) / h:.1f} s per simulated hour), peak RSS "
              f"{row['peak_rss_mb']:,.0f} MB (target < 2048 MB for 24 h) [{row['host']}]", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter runs throughout (see above)")
    ap.add_argument("--policy", action="append", help="policies to time (default: dualscale, distserve)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per engine and policy (median reported)")
    ap.add_argument("--skip", action="append", default=[], choices=["speed", "evaluate", "long"],
                    help="leave a part out")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    result: dict = {"meta": {"python": platform.python_version(), "cpus": os.cpu_count(),
                             "dualscale": dualscale.__version__, "quick": args.quick}}
    if "speed" not in args.skip:
        print("engine speed, default scenario, previous vs current engine (same process, same inputs):")
        result["speed"] = engine_speed(600.0 if args.quick else 3600.0, args.policy or ["dualscale", "distserve"],
                                       args.repeats)
    if "evaluate" not in args.skip:
        print("dualscale evaluate:")
        result["evaluate"] = evaluate_times(args.quick)
    if "long" not in args.skip:
        print("long runs (wall time linear in simulated time? peak memory):")
        result["long"] = long_runs([0.25, 0.5, 1.0] if args.quick else [1.0, 6.0, 24.0])
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
