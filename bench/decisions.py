"""Decision latency and plan quality of the fine-tier controllers, measured in-process and warm.

Prefill: for each solver (qp, exact, greedy) x horizon x clock set (the paper's 7 clocks, the
full 15 MHz grid) x queue size, the controllers decide on the same closed-loop sequence of queue
states (each state: the previous one with its first batch run at the qp clock, arrivals since,
topped up to the queue size). Reported per case: p50 / p99 / p99.9 latency of `decide`, the
p50 ratio to greedy's on the same states, and for qp and greedy the energy gap to exact's plan
(share within 1 %, p95, max). For qp also the median share of the decision spent in OSQP
(update + warm start + solve) and its median iterations.

Decode: `DecodeController.decide` at batch sizes 16 / 64 / 256 / 1024, side by side with a plain
NumPy implementation of the same decision (tests/reference.py).

Targets on a 2-core machine (issue 3): prefill qp, K=8, full grid: p99 <= 200 us (goal 50 us);
decode, B=256: p99 <= 20 us (goal 10 us). The paper reports about 4 ms per decision.

    python bench/decisions.py [--json out.json] [--budget-s 4] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import reference as ref  # noqa: E402

import dualscale  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _recorded  # noqa: E402

PAPER_CLOCKS = [360, 570, 780, 1080, 1380, 1680, 1830]
SOLVERS = ("greedy", "qp", "exact")


def queue_states(rng: np.random.Generator, ctl: dualscale.PrefillController, size: int, count: int,
                 rate_per_s: float) -> list[tuple[float, np.ndarray, np.ndarray, np.ndarray]]:
    """A closed-loop sequence of waiting queues of about ``size`` requests (see module docstring)."""
    now = 100.0
    arrival = list(np.sort(now - rng.uniform(0.0, 0.4, size)))
    prompt = list(np.clip(rng.lognormal(6.5, 1.0, size), 16, 8000).astype(int))
    done = [0] * size
    states = []
    while len(states) < count:
        states.append((now, np.array(arrival), np.array(prompt, dtype=np.int64), np.array(done, dtype=np.int64)))
        d = ctl.decide(now, arrival, prompt, done)
        # run the first batch: it prefills its tokens from the head of the queue
        budget = d.batch_tokens[0]
        while budget > 0:
            take = min(prompt[0] - done[0], budget)
            done[0] += take
            budget -= take
            if done[0] == prompt[0]:
                arrival.pop(0), prompt.pop(0), done.pop(0)
        later = now + d.batch_time_s
        t = now
        while True:
            t += rng.exponential(1.0 / rate_per_s)
            if t > later:
                break
            arrival.append(t), prompt.append(int(np.clip(rng.lognormal(6.5, 1.0), 16, 8000))), done.append(0)
        now = later
        while len(arrival) < size:  # keep the queue at its nominal size: top up with fresh arrivals
            arrival.append(now), prompt.append(int(np.clip(rng.lognormal(6.5, 1.0), 16, 8000))), done.append(0)
        if len(arrival) > size:
            del arrival[size:], prompt[size:], done[size:]
    return states


def percentiles_us(samples_s: list[float]) -> dict[str, float]:
    a = np.asarray(samples_s) * 1e6
    return {"p50_us": float(np.median(a)), "p99_us": float(np.percentile(a, 99)),
            "p999_us": float(np.percentile(a, 99.9)), "n": int(a.size)}


def time_solver(ctl, states, budget_s: float, max_decisions: int) -> tuple[dict, list[float], list[float], list[int]]:
    """Latency over repeated passes of ``states`` within ``budget_s``; energies and OSQP stats of pass 1."""
    for s in states[: min(20, len(states))]:
        ctl.decide(*s)
    lat: list[float] = []
    energies: list[float] = []
    osqp_share: list[float] = []
    iters: list[int] = []
    clock = time.perf_counter
    start = clock()
    i = 0
    while len(lat) < max_decisions and (clock() - start < budget_s or i < len(states)):
        s = states[i % len(states)]
        t0 = clock()
        d = ctl.decide(*s)
        dt = clock() - t0
        lat.append(dt)
        if i < len(states):
            energies.append(d.energy_j)
            if getattr(ctl, "last_qp", None) is not None:
                osqp_share.append(ctl.last_osqp_s / dt)
                iters.append(ctl.last_qp.iterations)
        i += 1
    return percentiles_us(lat), energies, osqp_share, iters


def bench_prefill(args, profile, progress) -> list[dict]:
    horizons = (4, 8) if args.quick else (4, 8, 16)
    sizes = (4, 32) if args.quick else (4, 16, 64)
    clock_sets = {"paper7": PAPER_CLOCKS, "full": None}
    cases = [(k, cn, q) for k in horizons for cn in clock_sets for q in sizes]
    task = progress.add_task("prefill cases", total=len(cases) * len(SOLVERS))
    rows = []
    for horizon, cname, size in cases:
        ctls = {s: dualscale.PrefillController(profile, tp=4, ttft_slo_s=0.6, horizon=horizon, solver=s,
                                               clocks_mhz=clock_sets[cname]) for s in SOLVERS}
        rng = np.random.default_rng(1000 * horizon + size)
        states = queue_states(rng, ctls["qp"], size, args.states, rate_per_s=args.rate)
        results = {}
        for s in SOLVERS:
            results[s] = time_solver(ctls[s], states, args.budget_s, args.max_decisions)
            progress.advance(task)
        exact_e = np.asarray(results["exact"][1])
        greedy_p50 = results["greedy"][0]["p50_us"]
        for s in SOLVERS:
            lat, energies, share, iters = results[s]
            row = {"phase": "prefill", "solver": s, "horizon": horizon, "clocks": cname,
                   "clock_count": int(ctls[s].clocks_mhz.size), "queue": size, **lat,
                   "p50_vs_greedy": lat["p50_us"] / greedy_p50}
            if s != "exact":
                gap = np.asarray(energies) / exact_e - 1.0
                row |= {"gap_within_1pct": float(np.mean(gap <= 0.01)), "gap_p95": float(np.percentile(gap, 95)),
                        "gap_max": float(gap.max())}
            if share:
                row |= {"osqp_share_p50": float(np.median(share)), "osqp_iters_p50": float(np.median(iters))}
            rows.append(row)
    return rows


def replay(sc, profile, streams, limit: int, clocks=None) -> dict:
    """Every recorded decision through fresh controllers of each solver (no feedback, no switch
    charge: every solver plans the same problem). Per solver: latencies and energies; plus the
    unbounded exact optimum and the unconstrained optimum (to tell where a deadline binds)."""
    names = ("greedy", "qp", "exact", "oracle", "free")
    lat = {s: [] for s in names[:3]}
    energy = {s: [] for s in names}
    fallbacks = 0
    count = 0
    for stream in streams:
        if count >= limit:
            break
        kw = dict(tp=sc.prefill.tp, horizon=sc.control.horizon, max_batch_tokens=sc.prefill.max_batch_tokens,
                  margin=sc.control.margin, kv_guard=sc.control.kv_guard, online_correction=False, clocks_mhz=clocks)
        ctls = {s: dualscale.PrefillController(profile, ttft_slo_s=sc.slo.ttft_s, solver=s, **kw) for s in names[:3]}
        ctls["oracle"] = dualscale.PrefillController(profile, ttft_slo_s=sc.slo.ttft_s, solver="exact",
                                                     exact_max_labels=0, **kw)
        ctls["free"] = dualscale.PrefillController(profile, ttft_slo_s=1e9, solver="exact", **kw)
        clock = time.perf_counter
        for now, arrival, prompt, done, kv in stream[: limit - count]:
            count += 1
            for s, ctl in ctls.items():
                t0 = clock()
                d = ctl.decide(now, arrival, prompt, done, kv)
                dt = clock() - t0
                if s in lat:
                    lat[s].append(dt)
                energy[s].append(d.energy_j)
                fallbacks += s == "exact" and d.fallback
    return {"lat": lat, "energy": {s: np.asarray(e) for s, e in energy.items()}, "fallbacks": fallbacks, "n": count}


def bench_recorded(args, profile, progress) -> list[dict]:
    suites = list(_recorded.SUITES)
    clock_sets = {"full": None, "paper7": PAPER_CLOCKS}
    task = progress.add_task("recorded suites", total=len(suites) * len(clock_sets))
    rows = []
    for suite in suites:
        sc, streams = _recorded.load(suite, args.record_s)
        for cname, clocks in clock_sets.items():
            r = replay(sc, profile, streams, args.recorded_limit, clocks)
            e = r["energy"]
            binding = e["oracle"] > e["free"] * (1 + 1e-9)
            for s in ("greedy", "qp", "exact"):
                gap = e[s][binding] / e["oracle"][binding] - 1.0
                row = {"phase": "prefill-recorded", "suite": suite, "clocks": cname, "solver": s, "decisions": r["n"],
                       "binding": int(binding.sum()), **percentiles_us(r["lat"][s])}
                if gap.size:
                    row |= {"gap_within_0.1pct": float(np.mean(gap <= 1e-3)), "gap_within_1pct": float(np.mean(gap <= 1e-2)),
                            "gap_mean": float(gap.mean()), "gap_max": float(gap.max())}
                if s == "exact":
                    row["fallback_rate"] = r["fallbacks"] / r["n"]
                rows.append(row)
            progress.advance(task)
    return rows


def bench_closed_loop(args) -> list[dict]:
    """Prefill energy of whole simulated runs with qp vs exact as the prefill solver (default scenario)."""
    rows = []
    for s in ("qp", "exact"):
        summary, _ = _recorded.simulate("default", args.record_s, solver=s)
        rows.append({"solver": s, "prefill_energy_j": summary.energy_j.prefill, "slo_met": summary.slo.met})
    return rows


def bench_decode(args, profile, progress) -> list[dict]:
    batches = (16, 64, 256, 1024)
    clock_sets = {"paper7": PAPER_CLOCKS, "full": None}
    task = progress.add_task("decode cases", total=len(batches) * len(clock_sets))
    rows = []
    for cname, clocks in clock_sets.items():
        ctl = dualscale.DecodeController(profile, tp=4, tpot_slo_s=0.1, clocks_mhz=clocks)
        coef = profile.coefficients("decode", 4)
        table = np.ascontiguousarray(profile.clock_table("decode", 4, ctl.clocks_mhz))
        for b in batches:
            rng = np.random.default_rng(b)
            states = []
            for _ in range(200):
                out = rng.integers(1, 1500, b)
                first = 1000.0 - (out - 1) * 0.1 * rng.uniform(0.3, 1.0, b)
                ctx = rng.integers(100, 4000, b) + out
                states.append((1000.0, first, out, ctx))
            lat = time_solver(ctl, states, args.budget_s / 2, args.max_decisions)[0]
            ref_lat = []
            for s in states:  # the same decision in plain NumPy, side by side
                t0 = time.perf_counter()
                ref.decode_choose(s[0], s[1], s[2], s[3], 0.1, 0.05, True, coef, table)
                ref_lat.append(time.perf_counter() - t0)
            # agreement check: the benchmark reports only if the two pick the same clock
            agree = True
            for s in states[:50]:
                j, _ = ref.decode_choose(s[0], s[1], s[2], s[3], 0.1, 0.05, True, coef, table)
                agree &= ctl.decide(*s).freq_mhz == int(ctl.clocks_mhz[j])  # j = -1: top clock, as the controller

            r = percentiles_us(ref_lat)
            rows.append({"phase": "decode", "clocks": cname, "clock_count": int(ctl.clocks_mhz.size), "batch": b,
                         **lat, "numpy_p50_us": r["p50_us"], "numpy_vs_controller": r["p50_us"] / lat["p50_us"],
                         "agrees_with_numpy": agree})
            progress.advance(task)
    return rows


def bench_feedback(profile) -> list[dict]:
    """What the online correction adds: one ``observe`` after each decision (the measured iteration
    a few percent off the prediction, so the estimate moves and the coefficients are rewritten)."""
    rows = []
    rng = np.random.default_rng(7)
    pre = dualscale.PrefillController(profile, tp=4, ttft_slo_s=0.6)
    dec = dualscale.DecodeController(profile, tp=4, tpot_slo_s=0.1)
    b = 256
    out = rng.integers(1, 1500, b)
    first = 1000.0 - (out - 1) * 0.1 * rng.uniform(0.3, 1.0, b)
    ctx = rng.integers(100, 4000, b) + out
    cases = (("prefill", pre, lambda: pre.decide(10.0, [9.7, 9.9], [3000, 800], [2048, 0]), "batch_time_s"),
             ("decode", dec, lambda: dec.decide(1000.0, first, out, ctx), "step_time_s"))
    for phase, ctl, decide, attr in cases:
        decide_s, observe_s = [], []
        for _ in range(3000):
            t0 = time.perf_counter()
            d = decide()
            t1 = time.perf_counter()
            ctl.observe(getattr(d, attr) * rng.uniform(0.97, 1.03), d.freq_mhz, 400.0)
            t2 = time.perf_counter()
            decide_s.append(t1 - t0)
            observe_s.append(t2 - t1)
            ctl.correction.hold_left = 0  # time the plan, not the safety rule's shortcut
        rows.append({"phase": phase, "decide": percentiles_us(decide_s), "observe": percentiles_us(observe_s)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--budget-s", type=float, default=4.0, help="wall seconds per prefill case and solver (default: %(default)s)")
    ap.add_argument("--max-decisions", type=int, default=3000, help="timed decisions per case at most (default: %(default)s)")
    ap.add_argument("--states", type=int, default=300, help="queue states per prefill case (default: %(default)s)")
    ap.add_argument("--rate", type=float, default=12.0, help="arrival rate of the closed-loop queue, req/s (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="fewer cases (horizons 4, 8; queues 4, 32), for a smoke run")
    args = ap.parse_args()

    console = Console(width=None if sys.stdout.isatty() else 160)
    profile = dualscale.Profile.load("h100-sxm-llama-3.3-70b")
    with Progress(console=console, transient=True) as progress:
        prefill = bench_prefill(args, profile, progress)
        decode = bench_decode(args, profile, progress)
    feedback = bench_feedback(profile)

    t = Table(title="prefill decision latency (us) and energy gap to exact")
    for col in ("solver", "K", "clocks", "queue", "p50", "p99", "p99.9", "n", "x greedy", "<=1% gap", "gap max", "OSQP share", "iters"):
        t.add_column(col, justify="right")
    for r in prefill:
        t.add_row(r["solver"], str(r["horizon"]), f"{r['clocks']}({r['clock_count']})", str(r["queue"]),
                  f"{r['p50_us']:.0f}", f"{r['p99_us']:.0f}", f"{r['p999_us']:.0f}", str(r["n"]),
                  f"{r['p50_vs_greedy']:.2f}", f"{r['gap_within_1pct']:.3f}" if "gap_max" in r else "-",
                  f"{r['gap_max']:.4f}" if "gap_max" in r else "-",
                  f"{r['osqp_share_p50']:.2f}" if "osqp_share_p50" in r else "-",
                  f"{r['osqp_iters_p50']:.0f}" if "osqp_iters_p50" in r else "-")
    console.print(t)
    t = Table(title="decode decision latency (us), controller vs plain NumPy")
    for col in ("clocks", "batch", "p50", "p99", "p99.9", "numpy p50", "numpy / controller", "same clock"):
        t.add_column(col, justify="right")
    for r in decode:
        t.add_row(f"{r['clocks']}({r['clock_count']})", str(r["batch"]), f"{r['p50_us']:.1f}", f"{r['p99_us']:.1f}",
                  f"{r['p999_us']:.1f}", f"{r['numpy_p50_us']:.1f}", f"{r['numpy_vs_controller']:.1f}",
                  str(r["agrees_with_numpy"]))
    console.print(t)
    t = Table(title="online correction: cost of observe() after a decision (us)")
    for col in ("phase", "decide p50", "decide p99", "observe p50", "observe p99"):
        t.add_column(col, justify="right")
    for r in feedback:
        t.add_row(r["phase"], f"{r['decide']['p50_us']:.1f}", f"{r['decide']['p99_us']:.1f}",
                  f"{r['observe']['p50_us']:.1f}", f"{r['observe']['p99_us']:.1f}")
    console.print(t)
    if args.json:
        meta = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                "dualscale": dualscale.__version__, "args": {k: str(v) for k, v in vars(args).items() if k != "json"}}
        args.json.write_text(json.dumps({"meta": meta, "prefill": prefill, "decode": decode, "feedback": feedback}, indent=1))
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
