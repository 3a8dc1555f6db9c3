"""Latency of evaluating one batch on a whole clock grid: Numba kernel vs the NumPy reference.

Prints median / p99 per call for each case and the reference/kernel ratio, measured side by side
in the same process. Target (issue 2): under 2 us for one batch x 100 clocks.

    python bench/profile_kernels.py [--repeats 20000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import reference as ref  # noqa: E402

import dualscale  # noqa: E402
from dualscale._kernels import perf_model as pm  # noqa: E402


def _time(fn, repeats: int) -> np.ndarray:
    for _ in range(min(1000, repeats)):
        fn()
    out = np.empty(repeats)
    clock = time.perf_counter_ns
    for i in range(repeats):
        t0 = clock()
        fn()
        out[i] = clock() - t0
    return out / 1e3  # us


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20000, help="timed calls per case (default: %(default)s)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    prof = dualscale.Profile.load("h100-sxm-llama-3.3-70b")
    pm.warm_up()
    clocks = prof.clocks_mhz[:100].astype(float)
    rng = np.random.default_rng(0)
    cases = {
        "prefill 8 chunks x 100 clocks": ("prefill", rng.integers(16, 512, 8), rng.integers(0, 2048, 8)),
        "decode B=256 x 100 clocks": ("decode", rng.integers(100, 4000, 256), None),
        "decode B=1024 x 100 clocks": ("decode", rng.integers(100, 4000, 1024), None),
    }
    results = []
    print("kernel = one call from Python (includes dispatch); compiled = per call from njit code")
    print(f"{'case':34s} {'compiled p50 us':>15s} {'p99':>6s} {'kernel p50 us':>14s} {'p99':>6s} "
          f"{'numpy p50 us':>13s} {'p99':>6s} {'numpy/kernel':>12s}")
    for name, (phase, toks, prefix) in cases.items():
        toks = toks.astype(np.int64)
        tp = 4
        coef = prof.coefficients(phase, tp)
        table = np.ascontiguousarray(prof.clock_table(phase, tp, clocks))
        out = np.empty((2, table.shape[1]))
        if phase == "prefill":
            prefix = prefix.astype(np.int64)
            kern = lambda: pm.prefill_grid(toks, prefix, coef, table, out)  # noqa: E731
            numpy_ref = lambda: ref.prefill_grid(toks, prefix, coef, table)  # noqa: E731
        else:
            kern = lambda: pm.decode_grid(toks, coef, table, out)  # noqa: E731
            numpy_ref = lambda: ref.decode_grid(toks, coef, table)  # noqa: E731
        k = _time(kern, args.repeats)
        # In-kernel cost as a compiled caller (a controller's njit driver) pays it: batches of 100 calls.
        if phase == "prefill":
            loop = lambda: pm.bench_prefill_loop(toks, prefix, coef, table, out, 100)  # noqa: E731
        else:
            loop = lambda: pm.bench_decode_loop(toks, coef, table, out, 100)  # noqa: E731
        c = _time(loop, max(200, args.repeats // 50)) / 100.0
        r = _time(numpy_ref, max(1000, args.repeats // 10))
        row = {
            "case": name, "clocks": int(table.shape[1]),
            "kernel_us": {"p50": float(np.median(k)), "p99": float(np.percentile(k, 99))},
            "in_compiled_caller_us": {"p50": float(np.median(c)), "p99": float(np.percentile(c, 99))},
            "numpy_us": {"p50": float(np.median(r)), "p99": float(np.percentile(r, 99))},
        }
        row["ratio_numpy_over_kernel_p50"] = row["numpy_us"]["p50"] / row["kernel_us"]["p50"]
        results.append(row)
        cc = row["in_compiled_caller_us"]
        print(f"{name:34s} {cc['p50']:15.2f} {cc['p99']:6.2f} {row['kernel_us']['p50']:14.2f} "
              f"{row['kernel_us']['p99']:6.2f} {row['numpy_us']['p50']:13.2f} {row['numpy_us']['p99']:6.2f} "
              f"{row['ratio_numpy_over_kernel_p50']:12.1f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                                         "repeats": args.repeats, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
