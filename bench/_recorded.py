"""Prefill decisions recorded from simulated hours, for replaying through each solver.

A run of the ``dualscale`` policy is simulated and every prefill decision's input (the waiting
queue as the engine handed it over) is kept, per instance in order. The simulator is
deterministic, so the same scenario, trace and duration give the same recording: the file is a
cache (``bench/results/.recorded-*.npz``, not committed), rebuilt when missing.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np

from dualscale.profile import Profile
from dualscale.sim.engine import Simulation
from dualscale.sim.metrics import summarize
from dualscale.sim.policies import Policy, PrefillControl, make_policy
from dualscale.sim.run import build_trace
from dualscale.sim.scenario import Scenario, load_scenario

#: name -> (scenario, trace): the default scenario on its own trace and on two others
SUITES = {"default": ("default", None), "azure-code": ("default", "azure-code"),
          "mooncake-conv": ("default", "mooncake-conv")}
CACHE = Path(__file__).resolve().parent / "results"


class _Tap(PrefillControl):
    def __init__(self, inner: PrefillControl, out: list) -> None:
        self.inner = inner
        self.out = out
        self.idle_mhz = inner.idle_mhz

    def clock(self, now_s, arrival_s, prompt_tokens, prefilled_tokens, kv_util):  # type: ignore[no-untyped-def]
        self.out.append((float(now_s), np.array(arrival_s, dtype=float), np.array(prompt_tokens, dtype=np.int64),
                         np.array(prefilled_tokens, dtype=np.int64), float(kv_util)))
        return self.inner.clock(now_s, arrival_s, prompt_tokens, prefilled_tokens, kv_util)

    def observe(self, iteration_s: float, freq_mhz: int, power_w: float) -> None:
        self.inner.observe(iteration_s, freq_mhz, power_w)


class _TapPolicy(Policy):
    def __init__(self, inner: Policy) -> None:
        super().__init__(inner.profile, inner.scenario)
        self.inner = inner
        self.name = inner.name
        self.streams: list[list] = []

    def prefill(self, tp: int, base_mhz: int | None = None) -> PrefillControl:
        self.streams.append([])
        return _Tap(self.inner.prefill(tp, base_mhz), self.streams[-1])

    def decode(self, tp: int, base_mhz: int | None = None):  # type: ignore[no-untyped-def]
        return self.inner.decode(tp, base_mhz)


def scenario_for(suite: str, duration_s: float, solver: str = "qp") -> Scenario:
    name, trace = SUITES[suite]
    sc = load_scenario(name)
    spec = sc.trace if trace is None else msgspec.structs.replace(sc.trace, name=trace)
    spec = msgspec.structs.replace(spec, duration_s=duration_s)
    return msgspec.structs.replace(sc, trace=spec, control=msgspec.structs.replace(sc.control, prefill_solver=solver))


def simulate(suite: str, duration_s: float, solver: str = "qp", tap: bool = False):
    """(summary, streams): one run of the dualscale policy with ``solver`` for prefill."""
    sc = scenario_for(suite, duration_s, solver)
    profile = Profile.load(sc.profile)
    policy = make_policy("dualscale", profile, sc)
    if tap:
        policy = _TapPolicy(policy)
    run = Simulation(sc, profile, build_trace(sc.trace), policy).run()
    return summarize(run), (policy.streams if tap else [])


def load(suite: str, duration_s: float) -> tuple[Scenario, list[list]]:
    """The recorded decisions of ``suite`` (per prefill instance, in order), from cache or a new run."""
    path = CACHE / f".recorded-{suite}-{int(duration_s)}.npz"
    sc = scenario_for(suite, duration_s)
    if path.exists():
        z = np.load(path)
        streams = []
        for s in range(int(z["n_streams"])):
            pre = f"s{s}_"
            off = z[pre + "offsets"]
            now, kv, arr, prompt, done = (z[pre + key] for key in ("now", "kv", "arrival", "prompt", "done"))
            streams.append([(float(now[i]), arr[off[i]:off[i + 1]], prompt[off[i]:off[i + 1]],
                             done[off[i]:off[i + 1]], float(kv[i])) for i in range(off.size - 1)])
        return sc, streams
    _, streams = simulate(suite, duration_s, tap=True)
    arrays: dict[str, np.ndarray] = {"n_streams": np.array(len(streams))}
    for s, st in enumerate(streams):
        pre = f"s{s}_"
        arrays[pre + "now"] = np.array([d[0] for d in st])
        arrays[pre + "kv"] = np.array([d[4] for d in st])
        arrays[pre + "offsets"] = np.cumsum([0] + [d[1].size for d in st]).astype(np.int64)
        for i, key in ((1, "arrival"), (2, "prompt"), (3, "done")):
            arrays[pre + key] = np.concatenate([d[i] for d in st]) if st else np.empty(0)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return sc, streams
