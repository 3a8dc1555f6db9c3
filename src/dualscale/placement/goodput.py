"""Goodput table: the highest request rate one instance of each configuration sustains within the
P99 SLOs, and its energy per request there (paper-notes.md, "Tier 1").

A configuration is (phase, TP degree, baseline clock). Its goodput is found by binary search on
the rate in phase-only simulations of one instance locked at the baseline clock: prefill judged by
TTFT, decode by TPOT (and every request must be served). Rates below the trace's own are reached
by downsampling it (evenly spaced requests, original timestamps: burstiness kept, the paper's
method); rates above it by compressing time, since downsampling cannot add requests. Goodput is
assumed non-decreasing in the clock (as in the authors' code), so the search for a clock starts
from the goodput of the next lower one; the clocks of one (phase, TP) therefore run in order, and
the (phase, TP) groups run in parallel through any ``concurrent.futures.Executor``.

Tables are cached on disk under a key of everything that changes them (profile content, trace
window and content, SLOs, the grid, search settings, the simulator's cluster settings and code
version), so a re-run is instant.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import numpy as np

from dualscale._files import write_atomic
from dualscale._version import __version__
from dualscale.profile import Profile
from dualscale.sim.engine import Simulation
from dualscale.sim.policies import Static
from dualscale.sim.scenario import Scenario, Truth
from dualscale.sim.traces import Trace, downsample, gamma_trace, time_scale

#: Bump when the probe's semantics change, so old caches are not reused.
CACHE_VERSION = 1


class GoodputSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What a goodput table is computed over (all of it is part of the cache key)."""

    tp_degrees: list[int]
    clocks_mhz: list[int]
    #: upper end of the rate search per GPU of the instance, req/s (the authors' fork: 20)
    max_rate_per_gpu: float = 20.0
    #: the search stops when the bracket is narrower than this many req/s, or 2 % of the rate
    tolerance_per_s: Annotated[float, msgspec.Meta(gt=0)] = 0.05
    #: "trace": probes rescale the trace's own arrivals; "gamma": every probe draws fresh Gamma
    #: arrivals at its rate (coefficient of variation ``gamma_cv``) with the trace's lengths,
    #: because downsampling a renewal process smooths it (keeping every k-th arrival divides
    #: its CV by sqrt(k)) and would overstate goodput at low rates
    arrivals: Literal["trace", "gamma"] = "trace"
    gamma_cv: float = 1.41
    gamma_seed: int = 0


class GoodputEntry(msgspec.Struct, frozen=True):
    """One configuration's goodput (req/s per instance, 0 if it cannot meet the SLO at any rate)
    and energy per request at that rate (J, whole instance, idle included; None at goodput 0)."""

    phase: str
    tp: int
    freq_mhz: int
    goodput_per_s: float
    energy_per_request_j: float | None
    probes: int


class GoodputTable(msgspec.Struct, frozen=True):
    key: str
    trace: str
    settings: GoodputSettings
    entries: list[GoodputEntry]

    def get(self, phase: str, tp: int, freq_mhz: int) -> GoodputEntry:
        for e in self.entries:
            if (e.phase, e.tp, e.freq_mhz) == (phase, tp, freq_mhz):
                return e
        raise KeyError(f"no goodput entry for {phase} TP{tp} at {freq_mhz} MHz")


def probe_trace(trace: Trace, rate_per_s: float, settings: GoodputSettings) -> Trace:
    """The requests one probe at ``rate_per_s`` replays (see ``GoodputSettings.arrivals``)."""
    if settings.arrivals == "gamma":
        return gamma_trace(rate_per_s, settings.gamma_cv, trace.duration_s, trace, settings.gamma_seed)
    return at_rate(trace, rate_per_s)


def at_rate(trace: Trace, rate_per_s: float) -> Trace:
    """``trace`` at ``rate_per_s``: downsampled below its own rate, time-compressed above."""
    own = trace.rate_per_s
    if rate_per_s <= own:
        return downsample(trace, rate_per_s) if rate_per_s < own else trace
    return time_scale(trace, rate_per_s)


def probe(scenario: Scenario, profile: Profile, trace: Trace, phase: str, tp: int, freq_mhz: int,
          rate_per_s: float, settings: GoodputSettings | None = None) -> tuple[bool, float]:
    """(SLO met, energy per request J) of one instance of (phase, tp) at ``freq_mhz`` under ``rate_per_s``."""
    tr = probe_trace(trace, rate_per_s, settings) if settings is not None else at_rate(trace, rate_per_s)
    pool = {"tp": tp, "instances": 1}
    sc = msgspec.convert(
        msgspec.to_builtins(scenario) | {"prefill": {**pool, "max_batch_tokens": scenario.prefill.max_batch_tokens},
                                         "decode": {**pool, "max_batch_requests": scenario.decode.max_batch_requests},
                                         "cluster": msgspec.to_builtins(scenario.cluster) | {"gpus": 2 * tp}},
        Scenario)
    run = Simulation(sc, profile, tr, Static(profile, sc, freq_mhz, f"static:{freq_mhz}"), only=phase).run()  # type: ignore[arg-type]
    served = bool(np.isfinite(run.finish_s).all())
    ttft, tpot = run.latencies_s()
    lat, slo = (ttft, scenario.slo.ttft_s) if phase == "prefill" else (tpot, scenario.slo.tpot_s)
    ok = served and (lat.size == 0 or float(np.percentile(lat, scenario.slo.percentile)) <= slo)
    return ok, run.energy_j(phase) / max(1, len(tr))


def _group(scenario: Scenario, profile_name: str, trace: Trace, phase: str, tp: int,
           settings: GoodputSettings, latency_factors: tuple[float, float] = (1.0, 1.0)) -> list[GoodputEntry]:
    """Goodput of every baseline clock of one (phase, TP), lowest clock first, sharing bounds."""
    profile = Profile.load(profile_name).with_latency_factors(prefill=latency_factors[0], decode=latency_factors[1])
    hi_limit = settings.max_rate_per_gpu * tp
    # below this a probe would replay fewer than two requests: call it goodput 0
    min_rate = 2.0 / max(trace.duration_s, 1e-9)
    lo = 0.0
    out = []
    for f in sorted(settings.clocks_mhz):
        probes = 0
        energy_at_lo: float | None = None
        hi = hi_limit
        if lo > 0:
            ok, energy_at_lo = probe(scenario, profile, trace, phase, tp, f, lo, settings)
            probes += 1
            if ok:
                # the next clock usually sustains a little more: widen upward before bisecting
                hi = min(hi_limit, 1.25 * lo)
                while hi < hi_limit:
                    ok, e = probe(scenario, profile, trace, phase, tp, f, hi, settings)
                    probes += 1
                    if not ok:
                        break
                    lo, energy_at_lo, hi = hi, e, min(hi_limit, 1.25 * hi)
            else:  # goodput not monotone in the clock here after all: search this clock afresh
                lo, energy_at_lo = 0.0, None
        if hi == hi_limit:
            ok, e = probe(scenario, profile, trace, phase, tp, f, hi, settings)
            probes += 1
            if ok:
                lo, energy_at_lo = hi, e
        while hi - lo > max(settings.tolerance_per_s, 0.02 * lo):
            mid = (lo + hi) / 2
            if mid < min_rate:
                break
            ok, e = probe(scenario, profile, trace, phase, tp, f, mid, settings)
            probes += 1
            if ok:
                lo, energy_at_lo = mid, e
            else:
                hi = mid
        out.append(GoodputEntry(phase, tp, int(f), lo, energy_at_lo if lo > 0 else None, probes))
        if lo == 0.0:
            energy_at_lo = None
    return out


def cache_key(scenario: Scenario, profile: Profile, trace: Trace, settings: GoodputSettings) -> str:
    """Hash of everything a goodput table depends on."""
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION} dualscale {__version__}".encode())
    h.update(msgspec.json.encode(profile.config))
    h.update(msgspec.json.encode(settings))
    relevant = {"slo": scenario.slo, "cluster": scenario.cluster,
                "max_batch_tokens": scenario.prefill.max_batch_tokens,
                "max_batch_requests": scenario.decode.max_batch_requests}
    h.update(msgspec.json.encode(relevant))
    for a in (trace.arrival_s, trace.input_tokens, trace.output_tokens):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:20]


def default_cache_dir() -> Path:
    """``$DUALSCALE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/dualscale`` (``~/.cache/dualscale``)."""
    from dualscale.config import env_path

    explicit = env_path("DUALSCALE_CACHE_DIR")
    if explicit is not None:
        return explicit
    base = env_path("XDG_CACHE_HOME") or Path.home() / ".cache"
    return base / "dualscale"


def goodput_table(scenario: Scenario, trace: Trace, settings: GoodputSettings, *,
                  executor: cf.Executor | None = None, workers: int | None = None,
                  cache_dir: Path | None = None, latency_factors: tuple[float, float] = (1.0, 1.0),
                  progress: Callable[[int, int], None] | None = None) -> GoodputTable:
    """Compute (or load from the cache) the goodput table of ``scenario``'s profile on ``trace``.

    The coarse tier plans on its model, never on the simulated GPUs' ``[truth]`` (which the probes
    leave out): on the profile, with every iteration time of a phase multiplied by
    ``latency_factors`` (prefill, decode), what the fine tier learnt of the GPUs (see
    :meth:`~dualscale.profile.Profile.with_latency_factors`).

    Args:
        executor: any ``concurrent.futures.Executor`` (a Ray or Dask executor works unchanged: the
            tasks are plain picklable functions and arguments). Default: a process pool of
            ``workers`` processes (``os.cpu_count()`` if None); ``workers=1`` runs in this process.
        cache_dir: where tables are kept (default :func:`default_cache_dir`); ``None`` entries
            are never stale because the key covers their inputs.
        progress: called with (groups done, groups total).
    """
    scenario = msgspec.structs.replace(scenario, truth=Truth())
    profile = Profile.load(scenario.profile).with_latency_factors(prefill=latency_factors[0],
                                                                  decode=latency_factors[1])
    bad = [tp for tp in settings.tp_degrees if tp not in profile.tp_degrees]
    if bad:
        raise ValueError(f"tp_degrees contains {bad[0]}: profile {profile.name!r} covers {profile.tp_degrees}")
    bad_f = [f for f in settings.clocks_mhz if f not in profile.clocks_mhz]
    if bad_f:
        raise ValueError(f"clocks_mhz contains {bad_f[0]}: not a supported clock of profile {profile.name!r}")
    if len(trace) < 2:
        raise ValueError(f"trace {trace.name!r}: needs at least 2 requests to set a rate, has {len(trace)}")
    key = cache_key(scenario, profile, trace, settings)
    path = (cache_dir or default_cache_dir()) / f"goodput-{key}.json"
    if path.is_file():
        try:
            return msgspec.json.decode(path.read_bytes(), type=GoodputTable)
        except msgspec.DecodeError:
            pass  # a damaged cache entry is recomputed and overwritten
    groups = [(phase, tp) for phase in ("prefill", "decode") for tp in settings.tp_degrees]
    args = [(scenario, scenario.profile, trace, phase, tp, settings, latency_factors) for phase, tp in groups]
    entries: list[GoodputEntry] = []
    done = 0
    if executor is None and (workers == 1 or (workers is None and (os.cpu_count() or 1) == 1)):
        for a in args:
            entries.extend(_group(*a))
            done += 1
            if progress:
                progress(done, len(groups))
    else:
        own = executor is None
        ex = executor or cf.ProcessPoolExecutor(max_workers=workers)
        try:
            futures = [ex.submit(_group, *a) for a in args]
            for fut in cf.as_completed(futures):
                fut.result()
                done += 1
                if progress:
                    progress(done, len(groups))
            for fut in futures:
                entries.extend(fut.result())
        finally:
            if own:
                ex.shutdown()
    table = GoodputTable(key=key, trace=trace.name, settings=settings, entries=entries)
    write_atomic(path, msgspec.json.encode(table))
    return table
