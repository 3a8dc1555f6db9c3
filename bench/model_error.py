"""Model error: does the fine tier keep the SLOs when the GPUs are not what the profile says?

The simulated GPUs follow a ground truth the controllers never see (``[truth]``): latency bias
-20..+20 % with 5 % per-iteration noise, and a clock-shape error of +/-10 % (with the same noise).
For each truth, on the default scenario (one hour of Azure conv) and in the paper's evaluation at
67 % and 85 % load (Azure conv, placed window by window), it runs DistServe (top clock, same truth),
DualScale with the online correction, and DualScale without it; PlaceOnly too in the evaluation.
Prints savings vs DistServe per phase, P99 TTFT/TPOT and whether the SLOs are met.

Targets (issue 12): with correction on, DualScale meets P99 TTFT and TPOT wherever DistServe does,
and its savings stay within 5 percentage points of the no-error case.

    python bench/model_error.py [--quick] [--json bench/results/model-error.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _rows
import msgspec
from rich.console import Console

from dualscale.placement.evaluate import EvalSettings, evaluate, run_workload, table_source
from dualscale.placement.goodput import at_rate, default_cache_dir
from dualscale.placement.ilp import max_rate
from dualscale.profile import Profile
from dualscale.sim.run import simulate
from dualscale.sim.scenario import Scenario, Truth, load_scenario
from dualscale.sim.traces import load_trace, window

NOISE = 0.05
TRUTHS: list[tuple[str, Truth]] = [("exact model", Truth())] + [
    (f"bias {b:+.0%}, noise {NOISE:.0%}", Truth(latency_bias_prefill=b, latency_bias_decode=b, latency_noise=NOISE))
    for b in (-0.2, -0.1, 0.0, 0.1, 0.2)
] + [
    (f"shape {s:+.0%}, noise {NOISE:.0%}", Truth(clock_shape_error=s, latency_noise=NOISE)) for s in (-0.1, 0.1)
]


def variant(scenario: Scenario, truth: Truth, correction: bool) -> Scenario:
    return msgspec.structs.replace(scenario, truth=truth,
                                   control=msgspec.structs.replace(scenario.control, online_correction=correction))


def row(workload: str, truth: str, policy: str, saving: dict[str, float], ttft_s: float, tpot_s: float,
        met: bool) -> dict[str, object]:
    return {"workload": workload, "truth": truth, "policy": policy, "saving_prefill": saving.get("prefill", 0.0),
            "saving_decode": saving.get("decode", 0.0), "ttft_p99_s": ttft_s, "tpot_p99_s": tpot_s, "slo_met": met}


def default_scenario(duration_s: float, say) -> list[dict[str, object]]:
    base = load_scenario("default")
    if duration_s:
        base = msgspec.structs.replace(base, trace=msgspec.structs.replace(base.trace, duration_s=duration_s))
    out = []
    for name, truth in TRUTHS:
        say(f"default scenario, {name}")
        on = simulate(variant(base, truth, True), ["distserve", "dualscale"], show_progress=False)
        off = simulate(variant(base, truth, False), ["dualscale"], show_progress=False)
        ref = on[0][1]
        for label, (_, s) in (("distserve", on[0]), ("dualscale", on[1]), ("dualscale, no correction", off[0])):
            saving = {"prefill": 1 - s.energy_j.prefill / ref.energy_j.prefill,
                      "decode": 1 - s.energy_j.decode / ref.energy_j.decode}
            out.append(row("default (azure-conv 1 h)", name, label, saving, s.ttft_s.p99, s.tpot_s.p99, s.slo.met))
    return out


def evaluation(loads: list[float], settings: EvalSettings, say) -> list[dict[str, object]]:
    scenario = load_scenario("paper")
    profile = Profile.load(scenario.profile)
    say("goodput table and DistServe placement (cached after the first run)")
    _, table, distserve = evaluate(scenario, msgspec.structs.replace(settings, gamma_loads=[], trace_loads=[]))
    capacity, _, _ = max_rate(table, profile, settings.gpus, [max(settings.goodput.clocks_mhz)])
    lengths = load_trace(settings.lengths_trace)
    # the coarse tier re-plans each window on what the fine tier learnt (the same table as
    # evaluate's at factors 1, others computed once and cached)
    table_for = table_source(scenario, window(lengths, 0.0, settings.table_window_s), settings.goodput,
                             cache_dir=default_cache_dir())
    out = []
    for load in loads:
        trace = at_rate(window(lengths, 0.0, settings.trace_duration_s), load * capacity)
        for name, truth in TRUTHS:
            say(f"evaluation {load:.0%}, {name}")
            rows = run_workload(settings.lengths_trace, load, trace, variant(scenario, truth, True), profile,
                                table_for, settings, distserve)
            (off,) = run_workload(settings.lengths_trace, load, trace, variant(scenario, truth, False), profile,
                                  table_for, settings, distserve, policies=("dualscale",))
            ref = next(r for r in rows if r.policy == "distserve").energy_j
            for r in rows:
                out.append(row(f"evaluate {load:.0%}", name, r.policy, r.saving_vs_distserve, r.ttft_p99_s,
                               r.tpot_p99_s, r.slo_met))
            saving = {ph: 1 - off.energy_j[ph] / ref[ph] for ph in ("prefill", "decode")}
            out.append(row(f"evaluate {load:.0%}", name, "dualscale, no correction", saving, off.ttft_p99_s,
                           off.tpot_p99_s, off.slo_met))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10 simulated minutes, evaluation at 67 %% only")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    con = Console(width=200)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        con.print(f"[dim]{time.perf_counter() - t0:6.0f} s[/dim] {msg}")

    settings = EvalSettings()
    if args.quick:
        settings = msgspec.structs.replace(settings, trace_duration_s=600.0)
    rows = default_scenario(600.0 if args.quick else 0.0, say)
    rows += evaluation([0.67] if args.quick else [0.67, 0.85], settings, say)
    _rows.show(con, "model error: savings vs DistServe under the same truth, P99 latencies, SLOs met", "truth", rows)
    if args.json is not None:
        _rows.write(args.json, rows, time.perf_counter() - t0)
        con.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
