"""Emulated serving workers: the simulator's P/D engine, paced to wall time, behind real worker agents.

One process emulates one small disaggregated cluster (one prefill and one decode instance of the
runtime config) on a request trace. Before every iteration the simulated engine does what a real
one would: read the SM clock its GPUs run at (from the simulated node's state file, as a real
engine could read NVML), report its queue or batch through a :class:`WorkerAgent`, post the
iteration's busy power to the simulated GPUs, and run the iteration at the clock it found, taking
the profile's time for it in wall time (divided by ``speed``), or the ground truth's when one is
given (``truth``: the same ``[truth]`` the simulator takes, e.g. a 20 % latency bias the
controller must learn). Each report carries the previous iteration's measured time and the clock
read at the iteration's start, as a real engine's would. The clock decisions therefore take the
real path: agent -> controller daemon -> actuator -> simulated GPU -> engine.

Used by the end-to-end test and ``bench/``; also a demo::

    python -m dualscale.runtime.emulate --config example --prefill prefill-0 --decode decode-0 \\
        --state-file node0.state --rate 2 --duration 60
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from dualscale.device.sim import SimNodeState
from dualscale.profile import Profile
from dualscale.runtime.config import InstanceSpec, RuntimeConfig, load_runtime_config
from dualscale.runtime.worker import WorkerAgent
from dualscale.sim.engine import Simulation
from dualscale.sim.policies import DecodeControl, Policy, PrefillControl
from dualscale.sim.run import build_trace
from dualscale.sim.scenario import Cluster, DecodePool, PrefillPool, Scenario, TraceSpec, Truth


class _Pacer:
    """Sleeps until the wall clock reaches simulated time ``t_s`` / ``speed`` since the start."""

    def __init__(self, speed: float) -> None:
        self.speed = speed
        self.t0 = time.monotonic()

    def wait(self, t_s: float) -> None:
        delay = self.t0 + t_s / self.speed - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class _Remote:
    """What both phases share: the agent, the GPUs, the clock in effect."""

    def __init__(self, spec: InstanceSpec, agent: WorkerAgent, node: SimNodeState | None, profile: Profile,
                 pacer: _Pacer) -> None:
        self.spec = spec
        self.agent = agent
        self.node = node
        self.profile = profile
        self.pacer = pacer
        self.top_mhz = int(profile.clocks_mhz[-1])
        self.idle_mhz = self.top_mhz  # an unlocked GPU runs at the driver's default (top) clock
        self.last_iteration_s = 0.0

    def clock_now(self, now_s: float) -> tuple[int, float]:
        """(clock in effect now, measured time of the previous iteration or 0)."""
        self.pacer.wait(now_s)
        freq = self.node.sm_clock_mhz(self.spec.gpus[0]) if self.node is not None else self.top_mhz
        freq = int(min(max(freq, self.profile.clocks_mhz[0]), self.top_mhz))
        last, self.last_iteration_s = self.last_iteration_s, 0.0
        return freq, last

    def observe(self, iteration_s: float, freq_mhz: int, power_w: float) -> None:
        self.last_iteration_s = iteration_s

    def post(self, power_w: float, time_s: float) -> None:
        if self.node is not None:
            self.node.set_load_w(self.spec.gpus, power_w, time_s / self.pacer.speed)


class _RemotePrefill(_Remote, PrefillControl):
    def clock(self, now_s, arrival_s, prompt_tokens, prefilled_tokens, kv_util):  # type: ignore[no-untyped-def]
        freq, last_s = self.clock_now(now_s)
        self.agent.report_prefill(now_s, arrival_s, prompt_tokens, prefilled_tokens, kv_util=kv_util,
                                  iteration_s=last_s, freq_mhz=freq)
        room, chunks, prefix = self.spec.max_batch_tokens, [], []
        for p, d in zip(prompt_tokens.tolist(), prefilled_tokens.tolist()):
            take = min(p - d, room)
            chunks.append(take)
            prefix.append(d)
            room -= take
            if room == 0:
                break
        t, w = self.profile.prefill(self.spec.tp, chunks, freq, prefix)
        self.post(float(w), float(t))
        return freq


class _RemoteDecode(_Remote, DecodeControl):
    def clock(self, now_s, first_token_s, tokens_out, context_tokens, kv_util):  # type: ignore[no-untyped-def]
        freq, last_s = self.clock_now(now_s)
        self.agent.report_decode(now_s, first_token_s, tokens_out, context_tokens, kv_util=kv_util,
                                 iteration_s=last_s, freq_mhz=freq)
        t, w = self.profile.decode(self.spec.tp, context_tokens, freq)
        self.post(float(w), float(t))
        return freq


class RemotePolicy(Policy):
    """The simulator policy whose clocks come from the runtime (see the module docstring)."""

    name = "remote"

    def __init__(self, profile: Profile, scenario: Scenario, controls: dict[str, _Remote]) -> None:
        super().__init__(profile, scenario)
        self.controls = controls

    def prefill(self, tp: int, base_mhz: int | None = None) -> PrefillControl:
        c = self.controls["prefill"]
        assert isinstance(c, _RemotePrefill)  # internal: built by emulate()
        return c

    def decode(self, tp: int, base_mhz: int | None = None) -> DecodeControl:
        c = self.controls["decode"]
        assert isinstance(c, _RemoteDecode)  # internal: built by emulate()
        return c


def emulate(config: RuntimeConfig, prefill: str, decode: str, *, state_file: str | None, trace: str = "gamma",
            rate_per_s: float = 2.0, duration_s: float = 30.0, seed: int = 0, speed: float = 1.0,
            report_address: str | None = None, truth: Truth | None = None) -> dict[str, Any]:
    """Run one emulated P/D pair until its trace is served; returns a summary."""
    specs = {s.name: s for s in config.instances}
    for name, phase in ((prefill, "prefill"), (decode, "decode")):
        if name not in specs or specs[name].phase != phase:
            raise ValueError(f"instance {name!r}: not a {phase} instance of the runtime config")
    p_spec, d_spec = specs[prefill], specs[decode]
    profile = Profile.load(config.profile)
    spec = TraceSpec(name=trace, rate_per_s=rate_per_s, duration_s=duration_s, seed=seed) if trace == "gamma" \
        else TraceSpec(name=trace, duration_s=duration_s)
    scenario = Scenario(
        name="emulated", profile=config.profile, trace=spec, slo=config.slo, control=config.control,
        prefill=PrefillPool(tp=p_spec.tp, instances=1, max_batch_tokens=p_spec.max_batch_tokens),
        decode=DecodePool(tp=d_spec.tp, instances=1),
        cluster=Cluster(gpus=p_spec.tp + d_spec.tp, clock_switch_delay_s=0.0), truth=truth or Truth())
    requests = build_trace(scenario.trace)
    node = SimNodeState.attach(state_file) if state_file else None
    if node is not None:
        node.set_idle_power(profile)  # integrate energy up to each posted load (see SimNodeState.set_load_w)
    address = report_address or config.controller.report_address
    pacer = _Pacer(speed)
    keys = config.security.keys_dir if config.security.mechanism == "curve" else None
    with WorkerAgent(address, prefill, "prefill", keys_dir=keys) as pa, \
            WorkerAgent(address, decode, "decode", keys_dir=keys) as da:
        controls: dict[str, _Remote] = {"prefill": _RemotePrefill(p_spec, pa, node, profile, pacer),
                                        "decode": _RemoteDecode(d_spec, da, node, profile, pacer)}
        run = Simulation(scenario, profile, requests, RemotePolicy(profile, scenario, controls)).run()
        agents = {"prefill": pa, "decode": da}
        out = {"requests": len(requests), "completed": int(np.isfinite(run.finish_s).sum()),
               "sim_end_s": run.end_s,
               "reports": {k: {"sent": a.sent, "dropped": a.dropped, "errors": a.errors} for k, a in agents.items()}}
    if node is not None:
        node.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dualscale.runtime.emulate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="example", help="runtime config name or TOML path")
    p.add_argument("--prefill", required=True, help="prefill instance to emulate")
    p.add_argument("--decode", required=True, help="decode instance to emulate")
    p.add_argument("--state-file", help="the simulated node's state file (the actuator's sim.state_file)")
    p.add_argument("--trace", default="gamma", help="trace name or file (default: gamma arrivals)")
    p.add_argument("--rate", type=float, default=2.0, help="gamma arrivals per second (default 2)")
    p.add_argument("--duration", type=float, default=30.0, help="arrivals for this long, s (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speed", type=float, default=1.0, help="simulated seconds per wall second (default 1)")
    p.add_argument("--latency-bias", type=float, default=0.0,
                   help="the emulated GPUs run this much slower than the profile says (0.2 = 20 %%; default 0)")
    args = p.parse_args(argv)
    truth = Truth(latency_bias_prefill=args.latency_bias, latency_bias_decode=args.latency_bias)
    summary = emulate(load_runtime_config(args.config), args.prefill, args.decode, state_file=args.state_file,
                      trace=args.trace, rate_per_s=args.rate, duration_s=args.duration, seed=args.seed,
                      speed=args.speed, truth=truth)
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
