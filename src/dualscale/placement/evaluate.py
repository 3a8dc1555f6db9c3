"""The paper's comparison in the simulator: DistServe, PlaceOnly and DualScale, window by window.

- DistServe: the max-goodput placement at the top clock (the most rate the GPU budget serves,
  fewest GPUs on ties), every GPU at the top clock, the same placement in every window.
- PlaceOnly: the coarse tier alone. Every window, the placement ILP sizes the cluster for the
  previous window's rate (the first window uses its own) with headroom alpha; every instance is
  locked at its baseline clock.
- DualScale: the same placements, with the fine tier (prefill MPC, decode slack control) choosing
  every instance's clock every iteration.

Loads are fractions of the DistServe placement's capacity (its max-goodput rate). Windows are
simulated one by one, each starting empty, as in the paper (which does not model transitions);
latencies are pooled over windows for the percentiles, energies summed. Only GPUs a placement uses
are charged: GPUs left out are assumed powered down or lent to other work.

Work is shared where it is the same computation: one pool of workers (any
``concurrent.futures.Executor``: a process pool by default, or a Dask/Ray cluster's) runs the
goodput tables' groups and then every window of every workload and policy at once; each window's
outcome is cached on disk (``<cache dir>/windows/``, see :func:`default_cache_dir`) under a key of
everything it depends on (scenario, profile, policy, the window's requests and placement, the
engine's version), so a second evaluation, or one that shares windows with an earlier one, only
pools. Each window starts empty with fresh controllers, as in the paper.

One thing flows from window to window when the simulated GPUs differ from the profile
(``[truth]``): what the fine tier learnt. The coarse tier plans each window on the profile with
every iteration time scaled by the latency factor DualScale's controllers learnt in the previous
window (per phase, rounded to :data:`FACTOR_STEP`), so it sizes the cluster for the GPUs it has,
not the ones it was told of; PlaceOnly runs on the same placements. Windows of such a workload are
therefore planned one after another. With the truth equal to the profile nothing is learnt (the
factors stay 1) and every window is planned up front.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import msgspec
import numpy as np

from dualscale._files import write_atomic
from dualscale._version import __version__
from dualscale.placement.goodput import GoodputSettings, GoodputTable, at_rate, default_cache_dir, goodput_table
from dualscale.placement.ilp import PlacementPlan, max_goodput_plan, max_rate, place
from dualscale.profile import Profile
from dualscale.sim.engine import Placement, RunResult, Simulation
from dualscale.sim.policies import make_policy
from dualscale.sim.scenario import Scenario
from dualscale.sim.traces import Trace, gamma_trace, load_trace, window

POLICIES = ("distserve", "placeonly", "dualscale")


class EvalSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    gpus: int = 16
    alpha: float = 0.05
    window_s: float = 300.0
    #: the goodput table is measured on this many seconds of the lengths trace
    table_window_s: float = 300.0
    goodput: GoodputSettings = msgspec.field(default_factory=lambda: GoodputSettings(
        tp_degrees=[2, 4, 8], clocks_mhz=[345, 525, 705, 885, 1065, 1245, 1425, 1605, 1785, 1980]))
    lengths_trace: str = "azure-conv"
    gamma_loads: list[float] = msgspec.field(default_factory=lambda: [0.1, 0.25, 0.4, 0.55, 0.7, 0.85])
    gamma_cv: float = 1.41
    gamma_duration_s: float = 300.0
    trace_loads: list[float] = msgspec.field(default_factory=lambda: [0.67, 0.85])
    trace_duration_s: float = 3600.0
    objective: str = "load"
    seed: int = 0
    #: plan each window on the latency factors the fine tier learnt in the previous one (only
    #: matters when the scenario's ``[truth]`` differs from the profile)
    coarse_feedback: bool = True


QUICK = EvalSettings(
    window_s=60.0, table_window_s=60.0,
    goodput=GoodputSettings(tp_degrees=[2, 4], clocks_mhz=[705, 1065, 1425, 1980], tolerance_per_s=0.2),
    gamma_loads=[0.4, 0.85], gamma_duration_s=60.0, trace_loads=[0.67], trace_duration_s=120.0)


class EvalRow(msgspec.Struct, frozen=True):
    workload: str
    load: float
    rate_per_s: float
    policy: str
    requests: int
    completed: int
    energy_j: dict[str, float]
    j_per_token: dict[str, float]
    saving_vs_distserve: dict[str, float]
    ttft_p99_s: float
    tpot_p99_s: float
    slo_met: bool
    gpus_mean: float
    infeasible_windows: int
    windows: int


def _placement(plan: PlacementPlan) -> Placement:
    return Placement(prefill=[(tp, f, w) for tp, f, w in plan.instances("prefill")],
                     decode=[(tp, f, w) for tp, f, w in plan.instances("decode")])


def _windows(trace: Trace, window_s: float) -> list[Trace]:
    out = []
    t = 0.0
    while t <= trace.duration_s:
        mask = (trace.arrival_s >= t) & (trace.arrival_s < t + window_s)
        if mask.any():  # every request is simulated, even alone in its window
            out.append(window(trace, t, window_s))
        t += window_s
    return out


#: Bump when a window's outcome changes meaning, so old cached windows are not reused.
WINDOW_CACHE_VERSION = 2
#: Learnt latency factors are rounded to powers of this (and to 1 within half a step), so the
#: coarse tier re-plans on a handful of cached goodput tables, not one per window.
FACTOR_STEP = 1.025
#: The policy each evaluated policy runs under in the simulator.
_SIM_POLICY = {"distserve": "distserve", "placeonly": "baseline", "dualscale": "dualscale"}


class WindowOutcome(msgspec.Struct, frozen=True, array_like=True):
    """What pooling needs of one simulated window (cached on disk): latencies (s, float64 bytes),
    requests served and in all, energy per phase (J) and tokens in and out."""

    ttft_s: bytes
    tpot_s: bytes
    served: int
    requests: int
    prefill_j: float
    decode_j: float
    tokens_in: int
    tokens_out: int
    #: measured / model time the controllers learnt (1 where nothing was learnt)
    prefill_factor: float
    decode_factor: float

    @classmethod
    def of(cls, run: RunResult) -> WindowOutcome:
        ttft, tpot = run.latencies_s()
        tr = run.trace
        return cls(ttft.astype(np.float64).tobytes(), tpot.astype(np.float64).tobytes(),
                   int(np.isfinite(run.finish_s).sum()), len(tr), run.energy_j("prefill"), run.energy_j("decode"),
                   int(tr.input_tokens.sum()), int(tr.output_tokens.sum()),
                   run.learnt_latency_factor("prefill"), run.learnt_latency_factor("decode"))

    def learnt(self) -> tuple[float, float]:
        """The learnt (prefill, decode) factors as the coarse tier plans on them (rounded)."""
        return _round_factor(self.prefill_factor), _round_factor(self.decode_factor)


def _round_factor(f: float) -> float:
    step = math.log(FACTOR_STEP)
    return float(math.exp(round(math.log(f) / step) * step)) if math.isfinite(f) and f > 0 else 1.0


def window_key(scenario: Scenario, profile: Profile, policy: str, trace: Trace, plan: PlacementPlan) -> str:
    """Hash of everything one window's outcome depends on."""
    h = hashlib.sha256()
    h.update(f"window v{WINDOW_CACHE_VERSION} dualscale {__version__} {policy}".encode())
    h.update(msgspec.json.encode(scenario))
    h.update(msgspec.json.encode(profile.config))
    h.update(msgspec.json.encode(_placement(plan)))
    for a in (trace.arrival_s, trace.input_tokens, trace.output_tokens):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:24]


_PROFILES: dict[str, Profile] = {}


def simulate_window(scenario: Scenario, policy: str, trace: Trace, plan: PlacementPlan) -> WindowOutcome:
    """One window under ``policy`` (one of :data:`POLICIES`) on ``plan``'s placement (a plain,
    picklable task: executors run it in other processes, or on other hosts)."""
    profile = _PROFILES.get(scenario.profile)
    if profile is None:
        profile = _PROFILES[scenario.profile] = Profile.load(scenario.profile)
    pol = make_policy(_SIM_POLICY[policy], profile, scenario)
    return WindowOutcome.of(Simulation(scenario, profile, trace, pol, placement=_placement(plan)).run())


def _pool(outcomes: Sequence[WindowOutcome], scenario: Scenario) -> dict[str, float]:
    ttft = np.concatenate([np.frombuffer(o.ttft_s) for o in outcomes])
    tpot = np.concatenate([np.frombuffer(o.tpot_s) for o in outcomes])
    served = sum(o.served for o in outcomes)
    n = sum(o.requests for o in outcomes)
    e_pre = sum(o.prefill_j for o in outcomes)
    e_dec = sum(o.decode_j for o in outcomes)
    tok_in = sum(o.tokens_in for o in outcomes)
    tok_out = sum(o.tokens_out for o in outcomes)
    q = scenario.slo.percentile
    t99 = float(np.percentile(ttft, q)) if ttft.size else math.inf
    p99 = float(np.percentile(tpot, q)) if tpot.size else 0.0
    return {"requests": n, "completed": served, "prefill_j": e_pre, "decode_j": e_dec,
            "prefill_j_per_token": e_pre / max(1, tok_in), "decode_j_per_token": e_dec / max(1, tok_out),
            "ttft_p99_s": t99, "tpot_p99_s": p99,
            "met": served == n and t99 <= scenario.slo.ttft_s and p99 <= scenario.slo.tpot_s}


Progress = Callable[[str, int, int], None]
"""Called with (what runs now, tasks done, tasks in all)."""


class _Windows:
    """Every window to simulate, run through one executor, each looked up in the cache first."""

    def __init__(self, cache_dir: Path | None, executor: cf.Executor | None, progress: Progress | None) -> None:
        self.dir = None if cache_dir is None else cache_dir / "windows"
        self.executor = executor
        self.progress = progress
        self.tasks: list[tuple[str, tuple[Scenario, str, Trace, PlacementPlan]]] = []
        self.known: dict[int, WindowOutcome | None] = {}

    def add(self, scenario: Scenario, profile: Profile, policy: str, trace: Trace, plan: PlacementPlan,
            known: WindowOutcome | None = None) -> int:
        """Queue one window (``known``: its outcome, already simulated)."""
        self.tasks.append((window_key(scenario, profile, policy, trace, plan), (scenario, policy, trace, plan)))
        self.known[len(self.tasks) - 1] = known
        return len(self.tasks) - 1

    def one(self, scenario: Scenario, profile: Profile, policy: str, trace: Trace,
            plan: PlacementPlan) -> WindowOutcome:
        """One window now (from the cache if there), on the executor if any."""
        key = window_key(scenario, profile, policy, trace, plan)
        out = self._cached(key)
        if out is None:
            args = (scenario, policy, trace, plan)
            out = simulate_window(*args) if self.executor is None else self.executor.submit(simulate_window, *args).result()
            self._store(key, out)
        return out

    def _cached(self, key: str) -> WindowOutcome | None:
        if self.dir is None:
            return None
        path = self.dir / f"{key}.msgpack"
        try:
            return msgspec.msgpack.decode(path.read_bytes(), type=WindowOutcome)
        except (OSError, msgspec.DecodeError):
            return None  # absent or damaged: recomputed and overwritten

    def _store(self, key: str, outcome: WindowOutcome) -> None:
        if self.dir is not None:
            write_atomic(self.dir / f"{key}.msgpack", msgspec.msgpack.encode(outcome))

    def run(self) -> list[WindowOutcome]:
        out: list[WindowOutcome | None] = [self._cached(k) if self.known.get(i) is None else self.known[i]
                                           for i, (k, _) in enumerate(self.tasks)]
        todo = [i for i, o in enumerate(out) if o is None]
        total = len(self.tasks)
        done = total - len(todo)
        say = self.progress or (lambda what, i, n: None)
        say("windows", done, total)
        if self.executor is None:
            for i in todo:
                out[i] = simulate_window(*self.tasks[i][1])
                self._store(self.tasks[i][0], out[i])  # type: ignore[arg-type]
                done += 1
                say("windows", done, total)
        else:
            futures = {self.executor.submit(simulate_window, *self.tasks[i][1]): i for i in todo}
            for fut in cf.as_completed(futures):
                i = futures[fut]
                out[i] = fut.result()
                self._store(self.tasks[i][0], out[i])  # type: ignore[arg-type]
                done += 1
                say("windows", done, total)
        return out  # type: ignore[return-value]


TableFor = Callable[[tuple[float, float]], GoodputTable]
"""The goodput table of the profile with (prefill, decode) latency factors applied."""


def _plans(wins: Sequence[Trace], table_for: TableFor, profile: Profile, settings: EvalSettings,
           learn: Callable[[int, PlacementPlan], tuple[float, float]] | None = None) -> list[PlacementPlan]:
    """One placement per window, sized for the previous window's rate (the first for its own) on
    what the fine tier learnt in the previous window (``learn(i, plan)`` runs window i on its plan
    and returns the factors learnt; None: nothing to learn, factors 1)."""
    plans = []
    prev_rate = None
    factors = (1.0, 1.0)
    for i, w in enumerate(wins):
        observed = len(w) / settings.window_s
        predicted = observed if prev_rate is None else prev_rate
        plan = place(table_for(factors), profile.with_latency_factors(prefill=factors[0], decode=factors[1]),
                     predicted, settings.gpus, alpha=settings.alpha, objective=settings.objective,  # type: ignore[arg-type]
                     window_s=settings.window_s)
        plans.append(plan)
        prev_rate = observed
        if learn is not None:
            factors = learn(i, plan)
    return plans


class _Workload:
    """One workload's windows, their plans, and where each policy's windows sit in the task list."""

    def __init__(self, name: str, load: float, trace: Trace, scenario: Scenario, profile: Profile,
                 table_for: TableFor, settings: EvalSettings, distserve: PlacementPlan, policies: Sequence[str],
                 windows: _Windows) -> None:
        unknown = [p for p in policies if p not in POLICIES]
        if unknown:
            raise ValueError(f"policies: {unknown} not among {POLICIES}")
        self.name, self.load, self.trace, self.scenario, self.policies = name, load, trace, scenario, policies
        self.distserve = distserve
        wins = _windows(trace, settings.window_s)
        learnt: dict[int, WindowOutcome] = {}
        learn = None
        if settings.coarse_feedback and not scenario.truth.is_model and "dualscale" in policies:
            def learn(i: int, plan: PlacementPlan) -> tuple[float, float]:
                learnt[i] = windows.one(scenario, profile, "dualscale", wins[i], plan)
                return learnt[i].learnt()

        self.plans = _plans(wins, table_for, profile, settings, learn)
        self.tasks = {p: [windows.add(scenario, profile, p, w, distserve if p == "distserve" else plan,
                                      learnt.get(i) if p == "dualscale" else None)
                          for i, (w, plan) in enumerate(zip(wins, self.plans))] for p in policies}

    def rows(self, outcomes: Sequence[WindowOutcome]) -> list[EvalRow]:
        pooled = {p: _pool([outcomes[i] for i in idx], self.scenario) for p, idx in self.tasks.items()}
        base = pooled.get("distserve")
        rows = []
        for policy in self.policies:
            p = pooled[policy]
            used = [self.distserve] * len(self.plans) if policy == "distserve" else self.plans
            rows.append(EvalRow(
                workload=self.name, load=self.load, rate_per_s=len(self.trace) / max(self.trace.duration_s, 1e-9),
                policy=policy, requests=p["requests"], completed=p["completed"],
                energy_j={"prefill": p["prefill_j"], "decode": p["decode_j"], "total": p["prefill_j"] + p["decode_j"]},
                j_per_token={"prefill": p["prefill_j_per_token"], "decode": p["decode_j_per_token"]},
                saving_vs_distserve={} if base is None else {"prefill": 1 - p["prefill_j"] / base["prefill_j"],
                                                             "decode": 1 - p["decode_j"] / base["decode_j"]},
                ttft_p99_s=p["ttft_p99_s"], tpot_p99_s=p["tpot_p99_s"], slo_met=p["met"],
                gpus_mean=float(np.mean([u.gpus_used for u in used])),
                infeasible_windows=sum(not u.feasible for u in used), windows=len(used)))
        return rows


@contextlib.contextmanager
def _pool_of(executor: cf.Executor | None, workers: int | None) -> Iterator[cf.Executor | None]:
    """``executor`` as given; else a process pool of ``workers`` (None: every CPU; 1: none, run here)."""
    if executor is not None or workers == 1 or (workers is None and (os.cpu_count() or 1) == 1):
        yield executor
        return
    with cf.ProcessPoolExecutor(max_workers=workers) as ex:
        yield ex


def run_workload(name: str, load: float, trace: Trace, scenario: Scenario, profile: Profile,
                 table_for: TableFor, settings: EvalSettings, distserve: PlacementPlan,
                 policies: Sequence[str] = POLICIES, *, executor: cf.Executor | None = None,
                 cache_dir: Path | None = None) -> list[EvalRow]:
    """Each of ``policies`` (default: every one) over ``trace``, planned window by window on the
    goodput tables of ``table_for`` (see :func:`table_source`). Savings are against DistServe when it
    is among them. Windows run on ``executor`` (default: here) and are cached in ``cache_dir``
    (default: not cached)."""
    windows = _Windows(cache_dir, executor, None)
    wl = _Workload(name, load, trace, scenario, profile, table_for, settings, distserve, policies, windows)
    return wl.rows(windows.run())


def table_source(scenario: Scenario, trace: Trace, settings: GoodputSettings, *, executor: cf.Executor | None = None,
                 cache_dir: Path | None = None, progress: Callable[[int, int], None] | None = None) -> TableFor:
    """The goodput table of ``scenario``'s profile on ``trace`` for any learnt latency factors
    (each computed once, then from the disk cache)."""
    memo: dict[tuple[float, float], GoodputTable] = {}

    def table_for(factors: tuple[float, float]) -> GoodputTable:
        if factors not in memo:
            memo[factors] = goodput_table(scenario, trace, settings, executor=executor,
                                          workers=1 if executor is None else None, cache_dir=cache_dir,
                                          latency_factors=factors, progress=progress)
        return memo[factors]

    return table_for


def evaluate(scenario: Scenario, settings: EvalSettings = EvalSettings(), *, workers: int | None = None,
             executor: cf.Executor | None = None, cache_dir: Path | None = None, use_cache: bool = True,
             progress: Progress | None = None) -> tuple[list[EvalRow], GoodputTable, PlacementPlan]:
    """Run the comparison; returns the rows, the trace's goodput table and the DistServe placement
    (sized on the trace's table; Gamma workloads are planned on a table of Gamma arrivals).

    Args:
        executor: any ``concurrent.futures.Executor`` for the goodput probes and the windows (a
            Dask ``Client.get_executor()``, a Ray-backed one); default: a process pool of
            ``workers`` processes (None: every CPU; 1: everything in this process).
        cache_dir: goodput tables and window outcomes are kept here (default
            :func:`~dualscale.placement.goodput.default_cache_dir`); ``use_cache=False`` neither
            reads nor writes window outcomes (goodput tables are still cached).
        progress: called with (stage, done, total) as tasks finish.
    """
    profile = Profile.load(scenario.profile)
    lengths = load_trace(settings.lengths_trace)
    say = progress or (lambda what, i, n: None)
    cache = cache_dir or default_cache_dir()
    with _pool_of(executor, workers) as ex:
        # goodput depends on the arrival process, not only the rate: one table per kind of workload,
        # measured on that workload's arrivals (probes rescale the rate from there)
        sources = []
        for kind, gs in (("trace", settings.goodput),
                         ("gamma", msgspec.structs.replace(settings.goodput, arrivals="gamma",
                                                           gamma_cv=settings.gamma_cv, gamma_seed=settings.seed))):
            stage = f"goodput table ({kind} arrivals)"
            say(stage, 0, 1)
            sources.append(table_source(scenario, window(lengths, 0.0, settings.table_window_s), gs, executor=ex,
                                        cache_dir=cache, progress=lambda i, n, stage=stage: say(stage, i, n)))
        table_for, gamma_table_for = sources
        table = table_for((1.0, 1.0))
        gamma_table_for((1.0, 1.0))  # computed now, in the goodput stage its progress reports
        top = max(settings.goodput.clocks_mhz)
        capacity, _, _ = max_rate(table, profile, settings.gpus, [top])
        if capacity <= 0:
            raise ValueError(f"{settings.gpus} GPUs cannot serve any rate within the SLOs at {top} MHz")
        distserve = max_goodput_plan(table, profile, settings.gpus, alpha=settings.alpha, window_s=settings.window_s)
        windows = _Windows(cache if use_cache else None, ex, progress)
        workloads = []
        for load in settings.gamma_loads:
            tr = gamma_trace(load * capacity, settings.gamma_cv, settings.gamma_duration_s, lengths, settings.seed)
            workloads.append(_Workload("gamma", load, tr, scenario, profile, gamma_table_for, settings, distserve,
                                       POLICIES, windows))
        base = window(lengths, 0.0, settings.trace_duration_s)
        for load in settings.trace_loads:
            workloads.append(_Workload(settings.lengths_trace, load, at_rate(base, load * capacity), scenario, profile,
                                       table_for, settings, distserve, POLICIES, windows))
        outcomes = windows.run()
    rows = [r for wl in workloads for r in wl.rows(outcomes)]
    return rows, table, distserve
