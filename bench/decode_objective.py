"""Which decode objective saves the most with every SLO met: least energy per step or least power?

Runs DualScale with each objective (everything else at the defaults, online correction on) against
DistServe on the default scenario's traces (Azure conv, Azure code, Mooncake conv; one hour each,
the default 16-GPU pools) and in the paper's evaluation (Gamma 10-85 %, Azure conv 67/85 %, with
PlaceOnly). Prints savings vs DistServe per phase, and whether the SLOs are met.

    python bench/decode_objective.py [--quick] [--json bench/results/decode-objective.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _rows
import msgspec
from rich.console import Console

from dualscale.placement.evaluate import QUICK, EvalSettings, evaluate
from dualscale.sim.run import build_trace, simulate
from dualscale.sim.scenario import Scenario, load_scenario

OBJECTIVES = ("energy", "power")
TRACES = ("azure-conv", "azure-code", "mooncake-conv")


def with_objective(scenario: Scenario, objective: str) -> Scenario:
    return msgspec.structs.replace(scenario, control=msgspec.structs.replace(scenario.control,
                                                                             decode_objective=objective))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10 simulated minutes per trace, the quick evaluation")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    con = Console(width=200)
    t0 = time.perf_counter()
    rows: list[dict[str, object]] = []
    base = load_scenario("default")
    for name in TRACES:
        spec = msgspec.structs.replace(base.trace, name=name, duration_s=600.0 if args.quick else 3600.0)
        trace = build_trace(spec)
        ref = simulate(base, ["distserve"], trace, show_progress=False)[0][1]
        rows.append({"workload": f"default, {name}", "objective": "-", "policy": "distserve", "saving_prefill": 0.0,
                     "saving_decode": 0.0, "ttft_p99_s": ref.ttft_s.p99, "tpot_p99_s": ref.tpot_s.p99,
                     "slo_met": ref.slo.met})
        for objective in OBJECTIVES:
            con.print(f"[dim]{time.perf_counter() - t0:6.0f} s[/dim] {name}: decode objective {objective}")
            s = simulate(with_objective(base, objective), ["dualscale"], trace, show_progress=False)[0][1]
            rows.append({"workload": f"default, {name}", "objective": objective, "policy": "dualscale",
                         "saving_prefill": 1 - s.energy_j.prefill / ref.energy_j.prefill,
                         "saving_decode": 1 - s.energy_j.decode / ref.energy_j.decode,
                         "ttft_p99_s": s.ttft_s.p99, "tpot_p99_s": s.tpot_s.p99, "slo_met": s.slo.met})
    settings = QUICK if args.quick else EvalSettings()
    paper = load_scenario("paper")
    for objective in OBJECTIVES:
        con.print(f"[dim]{time.perf_counter() - t0:6.0f} s[/dim] evaluation: decode objective {objective}")
        ev, _, _ = evaluate(with_objective(paper, objective), settings)
        for r in ev:
            if r.policy != "dualscale" and objective != OBJECTIVES[0]:
                continue  # DistServe and PlaceOnly never run the decode controller: the same runs
            rows.append({"workload": f"evaluate, {r.workload} {r.load:.0%}",
                         "objective": objective if r.policy == "dualscale" else "-", "policy": r.policy,
                         "saving_prefill": r.saving_vs_distserve["prefill"],
                         "saving_decode": r.saving_vs_distserve["decode"], "ttft_p99_s": r.ttft_p99_s,
                         "tpot_p99_s": r.tpot_p99_s, "slo_met": r.slo_met})
    rows.sort(key=lambda r: (str(r["workload"]), str(r["policy"]), str(r["objective"])))
    _rows.show(con, "decode objective: savings vs DistServe, P99 latencies, SLOs met", "objective", rows)
    if args.json is not None:
        _rows.write(args.json, rows, time.perf_counter() - t0)
        con.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
