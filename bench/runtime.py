"""Runtime benchmark: report-to-command latency through the controller daemon, and sustained decisions/s.

The daemon (``dualscale serve``) runs as its own process over ipc:// sockets. This process plays
the rest of the system: 64 instances' worker agents (real ``WorkerAgent`` objects: half prefill
instances with a waiting queue of 4-16 requests, half decode instances with 32-256 running requests,
states drawn once per instance from a seeded generator and cycled). A third process plays the
node's actuator (a DEALER that timestamps each command on arrival and applies nothing, so what is
timed is the daemon's path).

Latency = actuator receive time - the report's time (both CLOCK_MONOTONIC on this host), so it
covers: encode + the shared-memory ring + the relay's poll + ZeroMQ to the daemon + decode + decision
+ encode + ZeroMQ to the actuator.

1. unloaded: one report every 2 ms (one in flight), cycling over the instances;
2. sustained: every instance reports at 50 Hz (64 x 50 = 3,200 reports/s) for ``--duration-s``;
   decisions/s = commands received / duration, plus the latency under that load;
3. (``--ramp``) the same at 2x and 4x the rate, to show the headroom.

Also: the cost of one ``WorkerAgent.report_*`` call to the engine's thread, in a tight loop
(everything in cache), and wall and CPU time of single calls: back to back, after the thread slept
0.5 or 2 ms (an engine waiting for its GPU step), and after 2 ms of sleep then ~20 us of other
Python work (an engine scheduling its next step), measured in rotation with two references: the previous hand-off (encode, then send on a ZeroMQ PUSH socket from
the engine's thread) and a plain 1 KB copy (what any code costs after the same sleep on this host).
Wall minus CPU time is time the thread spent not running: waiting, or preempted.

Targets (issue 6): p99 <= 1 ms; 3,200 decisions/s sustained on a 2-core machine.

    python bench/runtime.py [--json out.json] [--duration-s 10] [--ramp]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
import zmq

from dualscale.runtime.messages import DecodeReport, MsgType, NodeStatus, PrefillReport
from dualscale.runtime.metrics import read_metrics
from dualscale.runtime.serial import FrameDecoder, FrameEncoder
from dualscale.runtime.transport import EVENTS, NOBLOCK, POLLOUT, make_socket
from dualscale.runtime.worker import WorkerAgent, _f64, _i64

N_INSTANCES = 64
RATE_HZ = 50.0


def config(tmp: Path, port: int) -> dict:
    instances, gpu = [], 0
    for i in range(N_INSTANCES):
        prefill = i % 2 == 0
        tp = 2 if prefill else 4
        instances.append({"name": f"{'p' if prefill else 'd'}{i}", "phase": "prefill" if prefill else "decode",
                          "tp": tp, "node": "bench", "gpus": list(range(gpu, gpu + tp))})
        gpu += tp
    # plain ZeroMQ: this process plays 64 engines, and with CURVE each instance's key gets a relay of its
    # own (one engine process per instance, as deployed); CURVE's cost is not in these figures
    return {"format": 1, "instances": instances, "security": {"mechanism": "none"},
            "controller": {"report_address": f"ipc://{tmp}/r", "actuator_address": f"ipc://{tmp}/a",
                           "metrics_port": port, "heartbeat_s": 0.25, "hwm": 10000}}


def states(rng: np.random.Generator, prefill: bool, now_s: float, count: int = 32) -> list[tuple]:
    out = []
    for _ in range(count):
        if prefill:
            n = int(rng.integers(4, 17))
            arrival = np.sort(now_s - rng.uniform(0.0, 0.4, n))
            prompt = np.clip(rng.lognormal(6.5, 1.0, n), 16, 8000).astype(np.int64)
            done = np.zeros(n, dtype=np.int64)
            done[0] = prompt[0] // 2
            out.append((arrival, prompt, done))
        else:
            n = int(rng.integers(32, 257))
            tokens = rng.integers(1, 400, n)
            first = now_s - tokens * rng.uniform(0.015, 0.03, n)
            ctx = rng.integers(200, 4000, n) + tokens
            out.append((first, tokens, ctx))
    return out


def actuator_stub(address: str, stop: Any, out: Any) -> None:
    """The node's actuator, as far as timing goes: receive commands, note (receive ns, origin ns)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVHWM, 1_000_000)
    sock.connect(address)
    # the controller routes a node's commands to the connection its status arrived on
    sock.send(bytes(FrameEncoder().encode(MsgType.NODE_STATUS, NodeStatus("bench", 1, 1, []))))
    dec = FrameDecoder((MsgType.CLOCK_COMMAND, MsgType.HEARTBEAT))
    recv_ns: list[int] = []
    origin_ns: list[int] = []
    while not stop.is_set():
        if not sock.poll(100):
            continue
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frame = sock.recv()
            t = time.monotonic_ns()
            mtype, msg = dec.decode(frame)
            if mtype is MsgType.CLOCK_COMMAND:
                recv_ns.append(t)
                origin_ns.append(msg.origin_ns)
    out.send((np.array(recv_ns, dtype=np.int64), np.array(origin_ns, dtype=np.int64)))
    sock.close(0)
    ctx.term()


class DirectReporter:
    """Reference: the previous hand-off, a report encoded and sent on a PUSH socket by the engine's thread."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], address: str) -> None:
        self.sock = make_socket(ctx, zmq.PUSH, address, bind=False, hwm=16, immediate=True)
        self.enc = FrameEncoder()
        self.epoch = time.monotonic_ns()
        self.seq = 0
        self.sent = 0

    def report(self, instance: str, prefill: bool, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> bool:
        self.seq += 1
        cls, mtype = (PrefillReport, MsgType.PREFILL_REPORT) if prefill else (DecodeReport, MsgType.DECODE_REPORT)
        msg = cls(instance, self.epoch, self.seq, time.monotonic_ns(), 1000.0, 0.3, 0.0, 0, _f64(x), _i64(y), _i64(z))
        if not self.sock.getsockopt(EVENTS) & POLLOUT:
            return False
        try:
            self.sock.send(self.enc.encode(mtype, msg), NOBLOCK, copy=True)
        except zmq.Again:
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        self.sock.close(linger=0)


def sink(address: str, stop: Any) -> None:
    """A controller that only receives: the quiet-host setting of the cost measurement."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.bind(address)
    while not stop.is_set():
        while sock.poll(100):
            sock.recv()
    sock.close(0)
    ctx.term()


class Rig:
    """The load generator (worker agents) around a daemon process (or, with ``sink_address``, a
    receive-only stand-in); the actuator stub and the sink are processes too."""

    def __init__(self, tmp: Path, port: int, sink_address: str | None = None) -> None:
        self.ctx = zmq.Context(io_threads=1)
        cfg = config(tmp, port)
        mp = multiprocessing.get_context("spawn")
        self.stop = mp.Event()
        self.results, child = mp.Pipe(duplex=False)
        if sink_address is None:
            self.stub = mp.Process(target=actuator_stub, args=(cfg["controller"]["actuator_address"], self.stop, child))
        else:
            self.stub = mp.Process(target=sink, args=(sink_address, self.stop))
        self.stub.start()
        self.names = [i["name"] for i in cfg["instances"]]
        addr = sink_address or cfg["controller"]["report_address"]
        self.agents = [WorkerAgent(addr, n, "prefill" if n[0] == "p" else "decode") for n in self.names]
        self.direct = DirectReporter(self.ctx, addr)
        rng = np.random.default_rng(20261123)
        self.states = [states(rng, n[0] == "p", 1000.0) for n in self.names]
        self.k = [0] * len(self.names)

    def state(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Instance ``i``'s next queue or batch."""
        st = self.states[i]
        self.k[i] += 1
        return st[self.k[i] % len(st)]

    def report(self, i: int, arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> bool:
        a = self.agents[i]
        x, y, z = arrays or self.state(i)
        if a.phase == "prefill":
            return a.report_prefill(1000.0, x, y, z, kv_util=0.3)
        return a.report_decode(1000.0, x, y, z, kv_util=0.3)

    def report_direct(self, i: int, arrays: tuple[np.ndarray, np.ndarray, np.ndarray]) -> bool:
        x, y, z = arrays
        # its own instance name space: the daemon drops these as unknown instances after decoding
        return self.direct.report(f"direct-{self.names[i]}", self.names[i][0] == "p", x, y, z)

    def dropped(self) -> int:
        return sum(a.dropped for a in self.agents)

    def commands(self) -> tuple[np.ndarray, np.ndarray]:
        """Stop the stub; (receive ns, origin ns) of every command it got."""
        self.stop.set()
        got = self.results.recv()
        self.stub.join(30)
        return got

    def close(self) -> None:
        self.stop.set()
        if self.stub.is_alive():
            try:  # the actuator stub sends its results before it exits
                if self.results.poll(30):
                    self.results.recv()
            except EOFError:  # the sink sends none
                pass
            self.stub.join(30)
        for a in self.agents:
            a.close()
        self.direct.close()
        self.ctx.term()


def pct(a: list[float]) -> dict[str, float]:
    x = np.asarray(a) * 1e6
    return {"p50_us": float(np.median(x)), "p99_us": float(np.percentile(x, 99)),
            "p999_us": float(np.percentile(x, 99.9)), "max_us": float(x.max()), "n": int(x.size)}


def unloaded(rig: Rig, count: int) -> tuple[int, int]:
    """One report every 2 ms (one in flight), cycling over the instances; returns its time window."""
    t0 = time.monotonic_ns()
    for j in range(count):
        rig.report(j % N_INSTANCES)
        time.sleep(0.002)
    return t0, time.monotonic_ns()


def sustained(rig: Rig, rate_hz: float, duration_s: float) -> dict:
    """Every instance reports at ``rate_hz``, evenly staggered, for ``duration_s``."""
    period = 1.0 / rate_hz
    t0 = time.monotonic() + 0.05
    t0_ns = time.monotonic_ns() + 50_000_000
    dropped_before = rig.dropped()
    k = 0  # reports scheduled so far: instance k % N at t0 + (k / N) * period
    total = int(duration_s * rate_hz) * N_INSTANCES
    while k < total:
        due = t0 + (k / N_INSTANCES) * period
        now = time.monotonic()
        if now < due:
            time.sleep(due - now)
            continue
        while k < total and t0 + (k / N_INSTANCES) * period <= now:
            rig.report(k % N_INSTANCES)
            k += 1
    wall = time.monotonic() - t0
    window = (t0_ns, time.monotonic_ns())
    time.sleep(0.05)  # the relay's last polls: its drops are counted once it has seen every report
    dropped = rig.dropped() - dropped_before
    return {"rate_per_instance_hz": rate_hz, "offered_per_s": total / wall, "sent": total - dropped,
            "dropped_at_worker": dropped, "window_ns": window, "wall_s": wall}


def agent_cost(rig: Rig, count: int) -> dict[str, dict[str, dict[str, float]]]:
    """What one report costs the engine's thread, in rotation with the two references (see the top)."""
    copy_src, copy_dst = bytes(1024), bytearray(1024)

    def copy_1kb(i: int, arrays: object) -> bool:
        copy_dst[:] = copy_src
        return True

    def scheduler_work() -> None:
        # what an engine's thread does between waking and reporting: some ~20 us of plain Python
        queue = {f"r{k}": k for k in range(40)}
        sum(sorted(queue.values(), reverse=True)[:16])

    ops = {"ring (WorkerAgent)": rig.report, "zmq send (previous)": rig.report_direct, "1 KB copy": copy_1kb}
    out = {}
    wall_ns, cpu_ns, perf_ns = time.perf_counter_ns, time.thread_time_ns, time.perf_counter_ns
    for label, gap_s, work in (("back_to_back", 0.0, False), ("after_0.5ms_sleep", 0.0005, False),
                               ("after_2ms_sleep", 0.002, False), ("after_2ms_sleep+work", 0.002, True)):
        wall: dict[str, list[float]] = {k: [] for k in ops}
        cpu: dict[str, list[float]] = {k: [] for k in ops}
        for j in range(count):
            i = j % N_INSTANCES
            for name, op in ops.items():
                if gap_s:
                    time.sleep(gap_s)
                elif j % 16 == 0:
                    time.sleep(0.005)  # let the daemon drain: reports beyond its queue would be dropped (cheaper)
                if work:
                    scheduler_work()
                # an engine reports arrays it has just built: fresh copies, in cache as they would be
                arrays = tuple(a.copy() for a in rig.state(i))
                c0 = cpu_ns()
                t0 = perf_ns()
                op(i, arrays)
                t1 = wall_ns()
                c1 = cpu_ns()
                wall[name].append((t1 - t0) * 1e-9)
                cpu[name].append((c1 - c0) * 1e-9)
        out[label] = {}
        for name in ops:
            w, c = np.asarray(wall[name]), np.asarray(cpu[name])
            out[label][name] = {"wall": pct(w), "cpu": pct(c), "wall_minus_cpu": pct(w - c)}
    return out


def tight_loop(rig: Rig, rounds: int = 9, n: int = 2000) -> dict[str, float]:
    """Mean cost (us) of one decode report in a loop of ``n`` back to back (one instance, same
    arrays, everything in cache): the agent's own CPU work, per round."""
    i = 1  # a decode instance: the larger reports
    arrays = rig.state(i)
    per_call = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            rig.report(i, arrays)
        per_call.append((time.perf_counter() - t) / n * 1e6)
        time.sleep(0.1)  # the relay catches up
    return {"min_us": min(per_call), "median_us": float(np.median(per_call)), "requests": int(arrays[0].size)}


def in_window(recv_ns: np.ndarray, origin_ns: np.ndarray, window: tuple[int, int]) -> np.ndarray:
    """Latencies (s) of the commands whose report was sent within ``window``."""
    sel = (origin_ns >= window[0]) & (origin_ns <= window[1])
    return (recv_ns[sel] - origin_ns[sel]) * 1e-9


def scrape(port: int) -> dict[str, float]:
    return read_metrics("127.0.0.1", port)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--duration-s", type=float, default=10.0, help="length of each sustained run (default 10)")
    p.add_argument("--unloaded", type=int, default=2000, help="reports in the unloaded latency run (one per 2 ms)")
    p.add_argument("--ramp", action="store_true", help="also run at 2x and 4x the rate")
    args = p.parse_args()

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="ds-bench-") as tmp:
        cfg_path = Path(tmp) / "bench.toml"
        cfg_path.write_bytes(tomli_w.dumps(config(Path(tmp), port)).encode())
        quiet = Rig(Path(tmp), port, sink_address=f"ipc://{tmp}/sink")
        try:
            time.sleep(0.5)
            quiet_cost = agent_cost(quiet, 3200)
            quiet_tight = tight_loop(quiet)
        finally:
            quiet.close()
        t_start = time.monotonic()
        daemon = subprocess.Popen([sys.executable, "-m", "dualscale.cli", "serve", "--config", str(cfg_path),
                                   "--log-level", "warning"])
        rig = Rig(Path(tmp), port)
        try:
            while True:  # up once its metrics answer (controllers built, sockets bound)
                if daemon.poll() is not None:
                    raise SystemExit(f"daemon exited with {daemon.returncode}")
                try:
                    scrape(port)
                    break
                except OSError:
                    time.sleep(0.1)
            startup_s = time.monotonic() - t_start
            print(f"daemon up with {N_INSTANCES} instances after {startup_s:.1f} s", file=sys.stderr)
            for i in range(N_INSTANCES):  # warm up: one report per instance
                rig.report(i)
            time.sleep(1.0)
            res: dict = {"meta": {"instances": N_INSTANCES, "cpus": os.cpu_count(), "python": platform.python_version(),
                                  "machine": platform.machine(), "daemon_startup_s": startup_s,
                                  "load_average_1min_before": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d"),
                                  "command": " ".join(["python", *sys.argv])}}
            win_unloaded = unloaded(rig, args.unloaded)
            rates = [RATE_HZ, 2 * RATE_HZ, 4 * RATE_HZ] if args.ramp else [RATE_HZ]
            runs = []
            for r in rates:
                runs.append(sustained(rig, r, args.duration_s))
                time.sleep(0.5)
            res["agent_report_cost"] = {"quiet host (receive-only controller)": quiet_cost,
                                        "beside the daemon at work": agent_cost(rig, 3200)}
            res["reference_reports_sent"] = rig.direct.sent
            res["agent_tight_loop"] = quiet_tight
            res["meta"]["load_average_1min_after"] = os.getloadavg()[0]
            m = scrape(port)
            time.sleep(0.5)
            recv_ns, origin_ns = rig.commands()
            res["unloaded"] = pct(in_window(recv_ns, origin_ns, win_unloaded))
            res["sustained"] = []
            for run in runs:
                lat = in_window(recv_ns, origin_ns, run["window_ns"])
                res["sustained"].append(run | {"commands": int(lat.size), "decisions_per_s": lat.size / run["wall_s"],
                                               "answered_share": lat.size / max(1, run["sent"]), "latency": pct(lat)})
            res["daemon"] = {k.split("{")[0]: v for k, v in m.items() if k.startswith((
                "dualscale_superseded_reports_total", "dualscale_unroutable_commands_total"))}
            res["daemon"]["dropped"] = sum(v for k, v in m.items() if k.startswith("dualscale_dropped_messages_total"))
        finally:
            rig.close()
            daemon.terminate()
            daemon.wait(30)

    u = res["unloaded"]
    print(f"report-to-command latency, unloaded ({u['n']} reports): p50 {u['p50_us']:.0f} us, "
          f"p99 {u['p99_us']:.0f} us, p99.9 {u['p999_us']:.0f} us")
    for s in res["sustained"]:
        lat = s["latency"]
        print(f"sustained {N_INSTANCES} x {s['rate_per_instance_hz']:.0f} Hz (offered {s['offered_per_s']:,.0f}/s): "
              f"{s['decisions_per_s']:,.0f} decisions/s, {100 * s['answered_share']:.2f} % of reports answered, "
              f"{s['dropped_at_worker']} dropped by the agents and their relay; latency p50 {lat['p50_us']:.0f} us, "
              f"p99 {lat['p99_us']:.0f} us, p99.9 {lat['p999_us']:.0f} us")
    t = res["agent_tight_loop"]
    print(f"WorkerAgent.report_decode ({t['requests']} requests) in a tight loop: {t['median_us']:.1f} us per call "
          f"(best round {t['min_us']:.1f} us)")
    print("cost of one report to the engine's thread, us (wall p50 / p99 | CPU p50 | wall - CPU p50 / p99):")
    for setting, by_label in res["agent_report_cost"].items():
        print(f" {setting}:")
        for label, costs in by_label.items():
            for name, c in costs.items():
                w, cp, b = c["wall"], c["cpu"], c["wall_minus_cpu"]
                print(f"  {label:21s} {name:20s} {w['p50_us']:6.1f} / {w['p99_us']:6.1f} | {cp['p50_us']:6.1f} | "
                      f"{b['p50_us']:6.1f} / {b['p99_us']:6.1f}")
    print(f"daemon: {res['daemon']} (the reference sent {res['reference_reports_sent']} reports named after no "
          f"instance: the daemon drops those)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
