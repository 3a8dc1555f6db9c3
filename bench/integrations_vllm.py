"""What the vLLM integration adds to vLLM's own scheduler, per step, at 16, 256 and 1,024 requests.

Two real vLLM v1 schedulers (CPU, no model; built as in tests/integrations/vllm_harness.py) run the
same workload side by side in one process, steps interleaved so host noise hits both alike: vLLM's
plain ``AsyncScheduler`` and ``DualscaleAsyncScheduler`` reporting to a controller address with no
controller behind it (the engine thread's work is the same either way: encode the report and copy it
into the shared-memory ring; the relay process drops what it cannot forward).

- decode role: N requests running (short prompts; outputs of 64-1023 tokens, spread evenly, so as in
  serving requests finish and new ones join every few steps and the batch changes; ``--fixed-batch``:
  endless outputs, the same batch every step);
- prefill role: N requests in the prefill queue (16 running chunks of long prompts, the rest waiting).

Per step it records the wall time of ``schedule()`` and of ``update_from_output()`` for both, and the
adapter's own work timed inside the dualscale scheduler (the report after ``schedule()`` plus the
bookkeeping after ``update_from_output()``): that is the added cost, measured directly rather than
as a difference of two noisy distributions. Targets (issue 17): added cost <= 5 % of the plain
``schedule()`` at 256 running requests, and <= 50 us at p99.

It also counts the garbage collections that started inside the adapter's hooks (a collection
there is the engine's garbage, collected when our allocation happens to cross the threshold) and
prints the host's load average beside the figures.

    VLLM_TARGET_DEVICE=cpu python bench/integrations_vllm.py [--steps 300] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integrations"))

import numpy as np  # noqa: E402
import vllm  # noqa: E402
from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # noqa: E402
from vllm_harness import EngineLoop, make_scheduler, model_config, request  # noqa: E402

from dualscale.integrations import vllm as dsv  # noqa: E402

SIZES = (16, 256, 1024)


class Timed:
    """Times the adapter's own work inside one dualscale scheduler (its hooks), per step and per hook."""

    HOOKS = ("_report_prefill", "_report_decode", "_after_step")

    def __init__(self, sched) -> None:
        self.samples: list[float] = []
        self.by_hook: dict[str, list[float]] = {h: [] for h in self.HOOKS}
        self._acc = dict.fromkeys(self.HOOKS, 0.0)
        self.inside = False
        self.gcs_inside = 0
        gc.callbacks.append(self._gc)
        for name in self.HOOKS:
            inner = getattr(sched, name)

            def timed(*a, _inner=inner, _name=name):
                self.inside = True
                t = time.perf_counter()
                try:
                    return _inner(*a)
                finally:
                    self._acc[_name] += time.perf_counter() - t
                    self.inside = False
            setattr(sched, name, timed)

    def _gc(self, phase: str, info: dict) -> None:
        if phase == "start" and self.inside:
            self.gcs_inside += 1

    def remove(self) -> None:
        gc.callbacks.remove(self._gc)

    def close_step(self) -> None:
        self.samples.append(sum(self._acc.values()))
        for h in self.HOOKS:
            self.by_hook[h].append(self._acc[h])
            self._acc[h] = 0.0

    def clear(self) -> None:
        self.gcs_inside = 0
        self.samples.clear()
        for h in self.HOOKS:
            self.by_hook[h].clear()
            self._acc[h] = 0.0


class TimedLoop(EngineLoop):
    """EngineLoop that times each schedule() and update_from_output() call of its scheduler."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.t_schedule: list[float] = []
        self.t_update: list[float] = []
        self.measure = False
        for name, into in (("schedule", self.t_schedule), ("update_from_output", self.t_update)):
            inner = getattr(self.sched, name)

            def timed(*args, _inner=inner, _into=into):
                t = time.perf_counter()
                out = _inner(*args)
                if self.measure:
                    _into.append(time.perf_counter() - t)
                return out
            setattr(self.sched, name, timed)


def top_up(sched, role: str, n: int, t0: float, made: list[int], fixed_batch: bool = False) -> None:
    """Keep n requests in the scheduler: decode ones run (short prompt, 64-1023 output tokens, or
    endless with ``fixed_batch``), prefill ones queue (long prompts, one output token); new ones
    replace the finished, with the same ids and lengths in both schedulers."""
    while len(sched.running) + len(sched.waiting) < n:
        i = made[0]
        made[0] += 1
        if role == "decode":
            out = 100_000 if fixed_batch else 64 + (i * 389) % 960
            sched.add_request(request(f"r{i}", 32, out, arrival_s=t0 + i * 1e-6))
        else:
            sched.add_request(request(f"r{i}", 6000, 1, arrival_s=t0 + i * 1e-6))


def run(role: str, n: int, steps: int, mc, tmp: Path, fixed_batch: bool = False) -> dict:
    os.environ["DUALSCALE_CONTROLLER"] = f"ipc://{tmp}/nobody-{role}-{n}"
    os.environ["DUALSCALE_INSTANCE"] = f"{role}-{n}"
    os.environ["DUALSCALE_PHASE"] = role
    kw = dict(async_scheduling=True, num_blocks=1 + (n * 30 if role == "decode" else 16 * 400),
              max_num_seqs=n if role == "decode" else 16, max_batched_tokens=max(2048, n))
    plain = make_scheduler(AsyncScheduler, mc, **kw)
    ds = make_scheduler(dsv.DualscaleAsyncScheduler, mc, **kw)
    assert ds.dualscale is not None
    timer = Timed(ds)
    loops = {"plain": TimedLoop(plain, True), "dualscale": TimedLoop(ds, True)}
    t0 = time.time()
    made = {name: [0] for name in loops}

    def step_both() -> None:
        for name, loop in loops.items():  # interleaved: the same host noise for both
            top_up(loop.sched, role, n, t0, made[name], fixed_batch)
            loop.step()

    # warm up: every request admitted (decode) and the caches hot
    for _ in range(200):
        step_both()
        if role == "prefill" or len(plain.running) == n:
            break
    for _ in range(20):
        step_both()
    for loop in loops.values():
        loop.measure = True
    timer.clear()
    for _ in range(steps):
        step_both()
        timer.close_step()
    running = len(ds.running)
    queued = len(ds.waiting) + len(ds.running)
    finished = made["dualscale"][0] - queued
    timer.remove()
    ds.shutdown()
    us = 1e6
    res = {"role": role, "requests": n, "running": running, "queued_or_running": queued, "finished": finished,
           "gc_in_hooks": timer.gcs_inside, "load_avg": os.getloadavg()}
    for name, loop in loops.items():
        for what, xs in (("schedule", loop.t_schedule), ("update", loop.t_update)):
            a = np.asarray(xs) * us
            res[f"{name}_{what}_us"] = {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
                                        "n": int(a.size)}
    # in async mode a step is one schedule() and one update_from_output(); the hooks of a step ran
    # in the same loop.step() call pair (the update may be of the previous batch)
    a = np.asarray(timer.samples) * us
    res["added_us"] = {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "n": int(a.size)}
    for h, xs in timer.by_hook.items():
        a = np.asarray(xs) * us
        if a.any():
            res[f"added{h}_us"] = {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}
    res["added_vs_plain_schedule_p50"] = res["added_us"]["p50"] / res["plain_schedule_us"]["p50"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="measured steps per size and role (default 300)")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="request counts (default 16 256 1024)")
    ap.add_argument("--roles", nargs="+", default=["decode", "prefill"], choices=["decode", "prefill"])
    ap.add_argument("--fixed-batch", action="store_true",
                    help="decode: endless outputs, the same running batch every step (no requests finish)")
    ap.add_argument("--quick", action="store_true", help="60 steps at 16 and 256 requests (a smoke run)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.sizes = 60, [16, 256]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        mc = model_config(Path(tmp) / "tiny-llama")
        for role in args.roles:
            for n in args.sizes:
                r = run(role, n, args.steps, mc, Path(tmp), args.fixed_batch)
                results.append(r)
                print(f"{role:7s} n={n:5d} (running {r['running']:4d}) | schedule() plain p50/p99 "
                      f"{r['plain_schedule_us']['p50']:8.1f} / {r['plain_schedule_us']['p99']:8.1f} us, with "
                      f"dualscale {r['dualscale_schedule_us']['p50']:8.1f} / {r['dualscale_schedule_us']['p99']:8.1f} us"
                      f" | update() plain {r['plain_update_us']['p50']:8.1f}, dualscale "
                      f"{r['dualscale_update_us']['p50']:8.1f} us | added p50/p99 {r['added_us']['p50']:6.1f} / "
                      f"{r['added_us']['p99']:6.1f} us = {100 * r['added_vs_plain_schedule_p50']:.1f} % of plain "
                      f"schedule() p50 | load {r['load_avg'][0]:.2f}, GCs in hooks {r['gc_in_hooks']}, "
                      f"finished {r['finished']}", flush=True)
                print("          of which " + ", ".join(
                    f"{k[5:-3]} {v['p50']:.1f} / {v['p99']:.1f} us" for k, v in r.items() if k.startswith("added_") and k.endswith("_us")
                    and k != "added_us"), flush=True)
    meta = {"vllm": vllm.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "steps": args.steps, "date": time.strftime("%Y-%m-%d")}
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
