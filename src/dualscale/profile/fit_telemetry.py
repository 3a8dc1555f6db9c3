"""``dualscale profile fit --telemetry``: calibrate a profile from telemetry of the user's own node.

The model forms are those of :mod:`dualscale.profile.fit` (see :mod:`dualscale.profile.schema`):
soft-roofline time with per-(phase, TP) coefficients and per-knot memory/compute slowdown curves,
and power = idle + busy fractions x busy power curves. Only the data differ: iterations of the
user's engine (batch shape, measured time, clock read back) and power windows at a fixed clock
(:mod:`dualscale.profile.telemetry`).

What the telemetry pins and what comes from the base profile (``--base``):

* Latency: every (phase, TP) the telemetry covers gets its four coefficients from its iterations
  (prefill's per-context-token term only when some chunk had a prefix; else it is decode's of the
  same TP, as in the built-in fit). TP degrees it does not cover keep the base's coefficients.
* Clock curves: at the base's knots (slowdowns interpolated linearly in 1/f, power linearly in f,
  as the profile evaluates them). A knot is *fitted* when at least :data:`MIN_KNOT_ROWS` iterations
  (weighted by interpolation) fall next to it; elsewhere (outside the clock range the telemetry
  visited) a weak penalty makes the curve follow the base's shape from the nearest fitted knot.
  The fit says which knots are which (:attr:`TelemetryFit.notes`, and the ``source`` fields).
* Power: idle and busy curves per knot by linear least squares (relative error) on the windows'
  mean power per GPU, each window's busy fractions being the time-weighted sum of its iterations'
  (from the fitted latency model) over the window; decode's compute power curve is prefill's of the
  same TP (as in the built-in fit: decode's compute fraction is too small to pin one); windows
  whose iterations would reach the power cap are left out (a capped window only says P >= cap).
* GPU, model geometry and KV capacity: the base's.

Failures name what to collect (:class:`~dualscale.errors.DataError`): too few clocks, too few
batch shapes for a (phase, TP), a clock that was locked but never read back (throttling), power
windows missing for a (phase, TP) or at too few clocks.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import msgspec
import numpy as np
from numpy.typing import NDArray
from scipy.optimize import least_squares

from dualscale._kernels import perf_model as pm
from dualscale.errors import DataError
from dualscale.profile.model import Profile, interp_curves
from dualscale.profile.schema import (
    POWER_CURVES,
    ClockResponse,
    Coefficients,
    Latency,
    ProfileConfig,
    TpPower,
    dump_toml,
)
from dualscale.profile.telemetry import (
    Iteration,
    PowerWindow,
    PrefillIteration,
    Telemetry,
    phase_of,
)

#: Distinct clocks (read back) the iterations must cover.
MIN_CLOCKS = 3
#: Distinct batch shapes each (phase, TP) needs (four coefficients, with room to spare).
MIN_SHAPES = 8
#: Iterations (interpolation-weighted) next to a knot for it to count as fitted.
MIN_KNOT_ROWS = 5.0
#: Power windows with work each (phase, TP) needs, and distinct window clocks overall.
MIN_WINDOWS = 6
MIN_WINDOW_CLOCKS = 2
#: A clock locked for this many iterations without ever being read back is a failure (throttling).
MIN_LOCKED = 20
#: Fitted knots are at least this far apart (MHz); a sweep's grid is usually coarser.
KNOT_SPACING_MHZ = 60.0
#: Weight of the penalty keeping each curve's knot-to-knot steps at the base's (per unit log-step
#: for slowdowns, per 100 W for power); a data row's residual is its relative error, weight 1.
SHAPE_WEIGHT = 0.1
#: A window whose clock varied is modelled only if idle for at most this share of it (the clock
#: of an idle gap is taken to be the last iteration's: no engine reports while idle).
MAX_GAP_SHARE = 0.1
#: A window is modelled only if iterations during which the clock switched fill at most this share
#: of it (when in them the switch landed is estimated, :func:`switch_delay_s`, not measured).
MAX_SWITCH_SHARE = 0.3
#: Iterations of one instance may overlap by this much (report timestamps jitter) before the
#: windows they fall in are left out.
OVERLAP_S = 0.002
#: Windows whose iterations the fitted model puts at or above this share of the cap are left out.
CAP_SHARE = 0.97
#: Iterations per (phase, TP) the time fit uses at most (an even subsample of a longer recording:
#: the fit's cost grows with rows, its accuracy barely past a few thousand).
MAX_ROWS = 4000
#: Soft-L1 scale of the time fit's relative residuals (measurement noise of a few %).
F_SCALE = 0.05


@dataclass
class TelemetryFit:
    """A profile fitted from telemetry, and what pinned each part of it."""

    config: ProfileConfig
    notes: list[str] = field(default_factory=list)
    iterations: int = 0
    windows: int = 0


@dataclass
class _Group:
    phase: str
    tp: int
    xm: NDArray[np.float64]  # (n, 3): 1, requests, context/prefix tokens
    xc: NDArray[np.float64]  # (n,): compute token-equivalents
    freq: NDArray[np.float64]
    time_s: NDArray[np.float64]
    shapes: int


def steady(tel: Telemetry) -> list[Iteration]:
    """The iterations that ran at one clock throughout (the ones time is fitted and scored on)."""
    return [it for it in tel.iterations if it.end_mhz == 0]


def work_features(it: Iteration, attn: float) -> tuple[tuple[float, float, float], float]:
    """Memory design (1, requests, context) and compute token-equivalents of one iteration, as the
    kernels compute them (``_kernels/perf_model.py``)."""
    if isinstance(it, PrefillIteration):
        ch = np.asarray(it.chunk_tokens, dtype=np.float64)
        pre = np.asarray(it.prefix_tokens, dtype=np.float64)
        pairs = float((ch * pre + 0.5 * ch * (ch + 1.0)).sum())
        return (1.0, float(ch.size), float(pre.sum())), float(ch.sum()) + attn * pairs
    ctx = np.asarray(it.context_tokens, dtype=np.float64)
    return (1.0, float(ctx.size), float(ctx.sum())), float(ctx.size) + attn * float(ctx.sum())


def _shape_key(it: Iteration) -> tuple[int, ...]:
    if isinstance(it, PrefillIteration):
        return (*it.chunk_tokens, -1, *it.prefix_tokens)
    return tuple(it.context_tokens)


def interp_weights(knots: NDArray[np.float64], f: NDArray[np.float64], inverse: bool) -> NDArray[np.float64]:
    """(n, K) weights w with ``curve(f) = w @ curve_at_knots``: linear in 1/f (``inverse``) or in f,
    flat beyond the end knots (as ``np.interp`` evaluates the profile)."""
    x = 1.0 / knots[::-1] if inverse else knots
    q = 1.0 / f if inverse else f
    q = np.clip(q, x[0], x[-1])
    j = np.clip(np.searchsorted(x, q, side="right") - 1, 0, len(x) - 2)
    t = (q - x[j]) / (x[j + 1] - x[j])
    w = np.zeros((len(f), len(x)))
    w[np.arange(len(f)), j] = 1.0 - t
    w[np.arange(len(f)), j + 1] = t
    return w[:, ::-1] if inverse else w


def _soft_roofline(a: NDArray[np.float64], c: NDArray[np.float64]) -> tuple[NDArray[np.float64], ...]:
    t = np.hypot(a, c)
    return t, a / t, c / t


def choose_knots(tel: Telemetry, base: ProfileConfig) -> NDArray[np.float64]:
    """Knots of the calibrated curves: the clocks the iterations ran at (with at least
    :data:`MIN_KNOT_ROWS` iterations, thinned to :data:`KNOT_SPACING_MHZ` apart, so a sweep's grid
    becomes the knots), the base profile's reference clock, and the base's knots outside the range
    the telemetry covers (where its curves are followed)."""
    counts = Counter(it.freq_mhz for it in steady(tel))
    seen = sorted(f for f, n in counts.items() if n >= MIN_KNOT_ROWS) or sorted(counts)
    kept: list[float] = []
    for f in seen:
        if not kept or f - kept[-1] >= KNOT_SPACING_MHZ:
            kept.append(float(f))
    if seen[-1] - kept[-1] > 0:
        kept[-1] = float(seen[-1])  # end on the highest clock measured
    lo, hi = kept[0], kept[-1]
    cr = base.clock_response
    outside = [k for k in cr.knots_mhz if k < lo - KNOT_SPACING_MHZ / 2 or k > hi + KNOT_SPACING_MHZ / 2]
    knots = sorted({*kept, *outside})
    # the curves must span the GPU's clock range: the base's end knots do
    if knots[0] > base.gpu.clock_min_mhz:
        knots.insert(0, cr.knots_mhz[0])
    if knots[-1] < base.gpu.clock_max_mhz:
        knots.append(cr.knots_mhz[-1])
    return np.asarray(knots, dtype=np.float64)


def check_inputs(tel: Telemetry) -> None:
    """Raise :class:`DataError`, naming what to collect, when ``tel`` cannot pin a profile."""
    its = steady(tel)
    if not its:
        raise DataError("telemetry has no iterations: record with `dualscale serve --record FILE` under load, "
                        "or run `dualscale profile sweep`")
    clocks = sorted({it.freq_mhz for it in its})
    if len(clocks) < MIN_CLOCKS:
        raise DataError(f"telemetry has iterations at {len(clocks)} clock(s) {clocks} MHz: need at least "
                        f"{MIN_CLOCKS} distinct clocks (run `dualscale profile sweep` over a clock grid, or "
                        "record longer under DVFS control with varied load)")
    locked: dict[int, Counter[int]] = defaultdict(Counter)
    for it in its:
        if it.locked_mhz > 0:
            locked[it.locked_mhz][it.freq_mhz] += 1
    for lock, got in sorted(locked.items()):
        if lock not in got and sum(got.values()) >= MIN_LOCKED:
            reached = ", ".join(f"{f} MHz x{n}" for f, n in got.most_common(3))
            raise DataError(f"clock {lock} MHz was locked for {sum(got.values())} iterations but never read back "
                            f"(reached: {reached}): the GPU is throttled (power or thermal cap). Check "
                            "`nvidia-smi -q -d PERFORMANCE`, cool or unload the GPU, or drop that clock from "
                            "the sweep grid")
    by_group: dict[tuple[str, int], set[tuple[int, ...]]] = defaultdict(set)
    for it in its:
        by_group[(phase_of(it), tel.headers[it.instance].tp)].add(_shape_key(it))
    for (phase, tp), shapes in sorted(by_group.items()):
        if len(shapes) < MIN_SHAPES:
            what = ("prompts of varied lengths and batch sizes" if phase == "prefill"
                    else "batches of varied sizes and context lengths")
            raise DataError(f"{phase} TP{tp}: {len(shapes)} distinct batch shape(s), need at least {MIN_SHAPES}: "
                            f"record {what}")
    power_groups: dict[tuple[str, int], int] = Counter()
    for w in tel.windows:
        h = tel.headers[w.instance]
        power_groups[(h.phase, h.tp)] += 1
    missing = [f"{ph} TP{tp} ({power_groups[(ph, tp)]})" for ph, tp in sorted(by_group)
               if power_groups[(ph, tp)] < MIN_WINDOWS]
    if missing:
        raise DataError(f"power windows missing: {', '.join(missing)}; need at least {MIN_WINDOWS} each. Power "
                        "comes from the actuator's status (per-GPU power and energy): run the actuator with "
                        "status reports reaching the controller, and hold each clock >= 1 s "
                        "(`serve --record-window-s`; a sweep holds every clock long enough)")
    wclocks = sorted({w.freq_mhz for w in tel.windows if w.freq_mhz > 0})
    if any(w.freq_mhz == 0 for w in tel.windows):  # windows over DVFS: each iteration at its clock
        wclocks = sorted(set(wclocks) | set(clocks))
    if len(wclocks) < MIN_WINDOW_CLOCKS:
        raise DataError(f"power windows at {len(wclocks)} clock(s) {wclocks} MHz: need at least "
                        f"{MIN_WINDOW_CLOCKS}; sweep more clocks or record longer")


def _groups(tel: Telemetry, attn: float) -> dict[tuple[str, int], _Group]:
    rows: dict[tuple[str, int], list[tuple[tuple[float, float, float], float, float, float]]] = defaultdict(list)
    shapes: dict[tuple[str, int], set[tuple[int, ...]]] = defaultdict(set)
    for it in steady(tel):
        key = (phase_of(it), tel.headers[it.instance].tp)
        xm, xc = work_features(it, attn)
        rows[key].append((xm, xc, float(it.freq_mhz), it.time_s))
        shapes[key].add(_shape_key(it))
    out = {}
    for key, r in sorted(rows.items()):
        if len(r) > MAX_ROWS:
            r = [r[i] for i in np.linspace(0, len(r) - 1, MAX_ROWS).astype(np.int64)]
        out[key] = _Group(key[0], key[1], np.array([x[0] for x in r]), np.array([x[1] for x in r]),
                          np.array([x[2] for x in r]), np.array([x[3] for x in r]), len(shapes[key]))
    return out


def _nearest_tp(base: ProfileConfig, tp: int) -> int:
    return min((c.tp for c in base.latency.prefill), key=lambda t: (abs(t - tp), t))


def _base_coefs(base: ProfileConfig, phase: str, tp: int) -> NDArray[np.float64]:
    cs = getattr(base.latency, phase)
    c = min(cs, key=lambda c: (abs(c.tp - tp), c.tp))
    return np.array([c.base_s, c.per_request_s, c.per_context_token_s, c.per_token_s])


def _fit_time(groups: dict[tuple[str, int], _Group], base: ProfileConfig, knots: NDArray[np.float64],
              ref: int) -> tuple[NDArray[np.float64], NDArray[np.float64], dict[tuple[str, int], NDArray[np.float64]]]:
    base_tab = interp_curves(base.clock_response, knots, "decode", base.latency.decode[0].tp)
    K = len(knots)
    free = [k for k in range(K) if k != ref]
    keys = list(groups)
    # prefill's per-context (prefix) term is free only when some chunk had a prefix
    has_prefix = {key: bool((g.xm[:, 2] > 0).any()) for key, g in groups.items()}
    W = {key: interp_weights(knots, g.freq, inverse=True) for key, g in groups.items()}
    # the base's curves renormalised to 1 at this fit's reference knot
    bm, bc = np.log(base_tab[pm.T_MEM_SLOWDOWN]), np.log(base_tab[pm.T_COMP_SLOWDOWN])
    bm, bc = bm - bm[ref], bc - bc[ref]
    n_c = 4 * len(keys)

    def unpack(x: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        lm, lc = np.zeros(K), np.zeros(K)
        lm[free], lc[free] = x[: K - 1], x[K - 1 : 2 * K - 2]
        th = np.exp(x[2 * K - 2 :]).reshape(len(keys), 4)
        for i, key in enumerate(keys):
            if key[0] == "prefill" and not has_prefix[key]:
                th[i, 2] = 0.0
        return np.exp(lm), np.exp(lc), th

    tie = [(keys.index(("decode", tp)), keys.index(("prefill", tp))) for (ph, tp) in keys
           if ph == "decode" and ("prefill", tp) in groups]

    def residuals(x: NDArray[np.float64]) -> NDArray[np.float64]:
        sm, sc, th = unpack(x)
        out = []
        for i, key in enumerate(keys):
            g, w = groups[key], W[key]
            a = (g.xm * th[i, :3]).sum(1) * (w @ sm)
            c = g.xc * th[i, 3] * (w @ sc)
            out.append(np.hypot(a, c) / g.time_s - 1.0)
        lm, lc = np.log(sm), np.log(sc)
        out.append(SHAPE_WEIGHT * (np.diff(lm) - np.diff(bm)))
        out.append(SHAPE_WEIGHT * (np.diff(lc) - np.diff(bc)))
        # decode's per-token compute is weakly tied to prefill's (same linear layers), as in fit.py
        out.append(np.array([SHAPE_WEIGHT * (np.log(th[d, 3]) - np.log(th[p, 3])) for d, p in tie]))
        return np.concatenate(out)

    th0 = np.concatenate([np.maximum(_base_coefs(base, *key), 1e-12) for key in keys])
    x0 = np.concatenate([bm[free], bc[free], np.log(th0)])
    lo = np.concatenate([np.full(2 * K - 2, -4.0), np.full(n_c, -45.0)])
    hi = np.concatenate([np.full(2 * K - 2, 4.0), np.full(n_c, 2.0)])
    sol = least_squares(residuals, np.clip(x0, lo, hi), bounds=(lo, hi), loss="soft_l1", f_scale=F_SCALE,
                        method="trf", xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=2000)
    sm, sc, th = unpack(sol.x)
    return sm, sc, {key: th[i] for i, key in enumerate(keys)}


def window_iterations(tel: Telemetry) -> list[tuple[PowerWindow, list[tuple[Iteration, float]]]]:
    """Each power window with the iterations of its instance that overlap it and by how long (s);
    windows in which two iterations overlap (by more than :data:`OVERLAP_S` or 5 %) are left out."""
    by_inst: dict[str, list[Iteration]] = defaultdict(list)
    for it in tel.iterations:
        by_inst[it.instance].append(it)
    starts = {}
    for k, v in by_inst.items():
        v.sort(key=lambda it: it.t0_s)
        starts[k] = np.array([it.t0_s for it in v])
    out = []
    for w in tel.windows:
        its, st = by_inst.get(w.instance, []), starts.get(w.instance, np.zeros(0))
        lo = int(np.searchsorted(st, w.t0_s - 60.0))  # no iteration lasts a minute
        hi = int(np.searchsorted(st, w.t1_s))
        ov = [(it, min(w.t1_s, it.t0_s + it.time_s) - max(w.t0_s, it.t0_s)) for it in its[lo:hi]]
        ov = [(it, o) for it, o in ov if o > 0]
        # an engine runs one iteration at a time: iterations that overlap mean the reported times
        # and the report times disagree (a lagging engine), and so would the window's energy
        if all(b.t0_s >= a.t0_s + a.time_s - max(OVERLAP_S, 0.05 * a.time_s) for (a, _), (b, _) in zip(ov, ov[1:])):
            out.append((w, ov))
    return out


@dataclass
class _WindowModel:
    """One window under a profile: its mean power per GPU is ``idle @ idle_w + mem @ mem_w + comp @ comp_w``
    over the knots' curve values (linear in them), ``model_w`` under the profile itself."""

    idle: NDArray[np.float64]
    mem: NDArray[np.float64]
    comp: NDArray[np.float64]
    model_w: float
    peak_w: float


def switch_delay_s(prof: Profile, tel: Telemetry) -> float | None:
    """How long after an iteration starts a clock switch decided on its report lands (s): the median
    over iterations during which the clock switched, from their measured time and ``prof``'s times at
    the old and new clocks (work done at the old clock's pace for that long, the rest at the new's).
    Only iterations whose two clocks differ in time by >= 10 % inform it; None when there are none."""
    est = []
    for it in tel.iterations:
        if not it.end_mhz:
            continue
        tp = tel.headers[it.instance].tp
        if isinstance(it, PrefillIteration):
            old, new = (float(prof.prefill_time_s(tp, it.chunk_tokens, f, it.prefix_tokens))
                        for f in (it.freq_mhz, it.end_mhz))
        else:
            old, new = (float(prof.decode_time_s(tp, it.context_tokens, f)) for f in (it.freq_mhz, it.end_mhz))
        if abs(old - new) >= 0.1 * it.time_s:
            est.append((it.time_s - new) / (1.0 - new / old))
    return float(max(0.0, np.median(est))) if est else None


def _window_model(prof: Profile, tel: Telemetry, w: PowerWindow, ov: list[tuple[Iteration, float]],
                  knots: NDArray[np.float64], delay_s: float | None) -> _WindowModel | None:
    """``w`` under ``prof`` (None when it cannot be modelled: a varied clock and long idle gaps).
    An iteration during which the clock switched runs its first ``delay_s`` at the old clock (half
    of it when unknown)."""
    h = tel.headers[w.instance]
    phase = h.phase
    coef = prof.coefficients(phase, h.tp)  # type: ignore[arg-type]
    cap = prof.config.gpu.power_cap_w
    attn = prof.config.model.attention_token_equiv
    T = w.t1_s - w.t0_s
    busy = sum(o for _, o in ov)
    if sum(o for it, o in ov if it.end_mhz) > MAX_SWITCH_SHARE * T:
        return None
    if w.freq_mhz > 0:
        gap_mhz = w.freq_mhz
    elif ov and T - busy <= MAX_GAP_SHARE * T:
        last = max(ov, key=lambda x: x[0].t0_s)[0]
        gap_mhz = last.end_mhz or last.freq_mhz  # an idle GPU keeps its last clock
    else:
        return None
    K = len(knots)
    idle, mem, comp = np.zeros(K), np.zeros(K), np.zeros(K)
    tables: dict[int, NDArray[np.float64]] = {}

    def table(f: int) -> NDArray[np.float64]:
        if f not in tables:
            tables[f] = prof.clock_table(phase, h.tp, float(f))[:, 0]  # type: ignore[arg-type]
        return tables[f]

    energy = peak = 0.0
    for it, o_all in ov:
        xm, xc = work_features(it, attn)
        if it.end_mhz == 0:
            parts: tuple[tuple[int, float], ...] = ((it.freq_mhz, o_all),)
        else:  # the switch landed delay_s into the iteration (when unknown: half way)
            cut = it.t0_s + (min(delay_s, it.time_s) if delay_s is not None else it.time_s / 2)
            o_old = max(0.0, min(w.t1_s, cut) - max(w.t0_s, it.t0_s))
            parts = ((it.freq_mhz, o_old), (it.end_mhz, max(0.0, o_all - o_old)))
        for f, o in parts:
            tb = table(f)
            a = (coef[0] * xm[0] + coef[1] * xm[1] + coef[2] * xm[2]) * tb[pm.T_MEM_SLOWDOWN]
            c = coef[3] * xc * tb[pm.T_COMP_SLOWDOWN]
            t = float(np.hypot(a, c))
            fa, fc = a / t, c / t
            p = tb[pm.T_IDLE_W] + fa * tb[pm.T_MEM_POWER_W] + fc * tb[pm.T_COMP_POWER_W]
            peak = max(peak, p)
            energy += o * min(cap, max(tb[pm.T_IDLE_W], p))
            wt = interp_weights(knots, np.array([float(f)]), inverse=False)[0] * (o / T)
            idle += wt
            mem += fa * wt
            comp += fc * wt
    gap = max(0.0, T - busy)
    idle += interp_weights(knots, np.array([float(gap_mhz)]), inverse=False)[0] * (gap / T)
    energy += gap * table(gap_mhz)[pm.T_IDLE_W]
    return _WindowModel(idle, mem, comp, energy / T, peak)


def _fit_power(tel: Telemetry, prof: Profile, base: ProfileConfig, knots: NDArray[np.float64],
               tps: list[int]) -> tuple[NDArray[np.float64], dict[int, dict[str, NDArray[np.float64]]], NDArray[np.float64], int]:
    """Idle curve and per-TP busy power curves; (idle, curves, window weight per knot, windows dropped)."""
    cap = base.gpu.power_cap_w
    delay = switch_delay_s(prof, tel)
    models = [(w, _window_model(prof, tel, w, ov, knots, delay)) for w, ov in window_iterations(tel)]
    rows = [(w, m) for w, m in models if m is not None]
    bad = len(tel.windows) - len(rows)
    used = [(w, m) for w, m in rows if m.peak_w < CAP_SHARE * cap]
    K = len(knots)
    # unknowns: idle (K), then per TP: prefill mem, comp, decode mem (K each); decode comp = prefill comp
    n = K + 3 * K * len(tps)
    A, y = [], []
    for w, m in used:
        h = tel.headers[w.instance]
        row = np.zeros(n)
        row[:K] = m.idle
        o = K + 3 * K * tps.index(h.tp)
        row[o + (0 if h.phase == "prefill" else 2 * K) : o + (K if h.phase == "prefill" else 3 * K)] = m.mem
        row[o + K : o + 2 * K] = m.comp
        p = w.mean_power_w
        A.append(row / p)
        y.append(1.0)
    # shape penalty (per 100 W) toward the base's knot-to-knot steps, and a tiny level anchor
    D = np.diff(np.eye(K), axis=0)
    pre = {tp: interp_curves(base.clock_response, knots, "prefill", _nearest_tp(base, tp)) for tp in tps}
    dec = {tp: interp_curves(base.clock_response, knots, "decode", _nearest_tp(base, tp)) for tp in tps}
    base_curves = [pre[tps[0]][pm.T_IDLE_W]]
    for tp in tps:
        base_curves += [pre[tp][pm.T_MEM_POWER_W], pre[tp][pm.T_COMP_POWER_W], dec[tp][pm.T_MEM_POWER_W]]
    for i, b in enumerate(base_curves):
        blk = np.zeros((K - 1, n))
        blk[:, i * K : (i + 1) * K] = D * SHAPE_WEIGHT / 100.0
        A.extend(blk)
        y.extend(D @ b * SHAPE_WEIGHT / 100.0)
        lvl = np.zeros((K, n))
        lvl[:, i * K : (i + 1) * K] = np.eye(K) * 1e-4 / 100.0
        A.extend(lvl)
        y.extend(b * 1e-4 / 100.0)
    sol = np.linalg.lstsq(np.array(A), np.array(y), rcond=None)[0]
    idle = np.maximum(sol[:K], 0.0)
    curves = {}
    for j, tp in enumerate(tps):
        o = K + 3 * K * j
        pm_, pc_, dm_ = (np.maximum(sol[o + i * K : o + (i + 1) * K], 0.0) for i in range(3))
        curves[tp] = {"prefill_mem_power_w": pm_, "prefill_comp_power_w": pc_, "decode_mem_power_w": dm_,
                      "decode_comp_power_w": pc_}
    mass = sum((m.idle for _, m in used), np.zeros(K))
    return idle, curves, mass, bad + len(rows) - len(used)


def _base_on_knots(base: ProfileConfig, knots: NDArray[np.float64], reference_mhz: float,
                   mem_slowdown: NDArray[np.float64], comp_slowdown: NDArray[np.float64]) -> ClockResponse:
    """The base's idle and power curves at ``knots`` (linear in f, as evaluated) with the given slowdowns."""
    cr = base.clock_response

    def at(v: list[float]) -> list[float]:
        return [float(x) for x in np.interp(knots, cr.knots_mhz, v)]

    return ClockResponse(
        knots_mhz=[float(k) for k in knots], reference_mhz=reference_mhz,
        mem_slowdown=[float(x) for x in mem_slowdown], comp_slowdown=[float(x) for x in comp_slowdown],
        idle_power_w=at(cr.idle_power_w), **{k: at(getattr(cr, k)) for k in POWER_CURVES}, source=cr.source,
        power_by_tp=[msgspec.structs.replace(p, **{k: at(getattr(p, k)) for k in POWER_CURVES},
                                             source=f"base profile {base.name} (no power telemetry at TP{p.tp}): "
                                             + p.source) for p in cr.power_by_tp])


def _rounded(x: NDArray[np.float64] | float) -> list[float] | float:
    if isinstance(x, float):
        return float(f"{x:.6g}")
    return [float(f"{v:.6g}") for v in x]


def fit_telemetry(tel: Telemetry, base: ProfileConfig, name: str | None = None) -> TelemetryFit:
    """Fit a profile to ``tel``, starting from (and falling back to) ``base`` (see the module docstring).

    Raises:
        DataError: the telemetry cannot pin the profile (the message names what to collect).
    """
    check_inputs(tel)
    cr = base.clock_response
    knots = choose_knots(tel, base)
    # the reference (slowdown 1, where the coefficients hold) is the measured knot nearest the base's:
    # a knot without data there would leave the scale to the base and skew the clocks around it
    measured = [i for i, k in enumerate(knots) if any(abs(k - f) < 1 for f in {it.freq_mhz for it in steady(tel)})]
    ref = min(measured, key=lambda i: abs(knots[i] - cr.reference_mhz))
    lo_mhz, hi_mhz = base.gpu.clock_min_mhz, base.gpu.clock_max_mhz
    outside = sorted({it.freq_mhz for it in tel.iterations if not lo_mhz <= it.freq_mhz <= hi_mhz})
    if outside:
        raise DataError(f"telemetry clocks {outside} MHz lie outside the base profile's GPU range [{lo_mhz}, {hi_mhz}] "
                        "MHz: fit against a base profile of the same GPU (--base)")
    attn = base.model.attention_token_equiv
    groups = _groups(tel, attn)
    sm, sc, th = _fit_time(groups, base, knots, ref)
    notes = []
    mass = sum(interp_weights(knots, g.freq, inverse=True).sum(0) for g in groups.values())
    fitted = [float(k) for k, m in zip(knots, mass) if m >= MIN_KNOT_ROWS]
    follow = [float(k) for k, m in zip(knots, mass) if m < MIN_KNOT_ROWS]
    notes.append(f"slowdown knots fitted from iterations: {fitted} MHz; following the base's shape (no telemetry "
                 f"near them): {follow or 'none'} MHz")
    tps_seen = sorted({tp for _, tp in groups})
    lat: dict[str, list[Coefficients]] = {"prefill": [], "decode": []}
    n_iter = {key: len(g.time_s) for key, g in groups.items()}
    for phase in ("prefill", "decode"):
        for c in getattr(base.latency, phase):
            if (phase, c.tp) in th:
                v = th[(phase, c.tp)]
                per_ctx = float(v[2])
                src = (f"fit to {n_iter[(phase, c.tp)]} telemetry iterations ({groups[(phase, c.tp)].shapes} shapes)"
                       " by least squares (soft-L1, relative error)")
                if phase == "prefill" and per_ctx == 0.0:
                    d = th.get(("decode", c.tp))
                    per_ctx = float(d[2]) if d is not None else c.per_context_token_s
                    src += "; per_context_token_s: no chunk had a prefix, " + (
                        "decode's (prefix KV read)" if d is not None else "the base's")
                lat[phase].append(Coefficients(tp=c.tp, base_s=_rounded(float(v[0])),
                                               per_request_s=_rounded(float(v[1])),
                                               per_context_token_s=_rounded(per_ctx),
                                               per_token_s=_rounded(float(v[3])), source=src))
            else:
                # the base's coefficients hold at its reference clock: move them to this fit's
                bt = interp_curves(cr, np.array([knots[ref]]), phase, c.tp)[:, 0]  # type: ignore[arg-type]
                ms, cs = float(bt[pm.T_MEM_SLOWDOWN]), float(bt[pm.T_COMP_SLOWDOWN])
                lat[phase].append(Coefficients(
                    tp=c.tp, base_s=_rounded(c.base_s * ms), per_request_s=_rounded(c.per_request_s * ms),
                    per_context_token_s=_rounded(c.per_context_token_s * ms), per_token_s=_rounded(c.per_token_s * cs),
                    source=f"base profile {base.name} (no telemetry at TP{c.tp}), moved to the {knots[ref]:g} MHz "
                           "reference with the base's slowdowns: " + c.source))
                notes.append(f"{phase} TP{c.tp}: no telemetry, base profile's coefficients kept")
    for phase, tp in groups:
        if tp not in [c.tp for c in base.latency.prefill]:
            notes.append(f"{phase} TP{tp}: telemetry at a TP degree the base profile lacks is not used")

    on_knots = _base_on_knots(base, knots, float(knots[ref]), sm, sc)
    draft = msgspec.structs.replace(base, clock_response=on_knots, latency=Latency(
        prefill=lat["prefill"], decode=lat["decode"], source=base.latency.source))
    tps_fit = [tp for tp in tps_seen if tp in [c.tp for c in base.latency.prefill]]
    if not tps_fit:
        raise DataError(f"telemetry covers TP {tps_seen}, none of the base profile's TP degrees "
                        f"{[c.tp for c in base.latency.prefill]}: choose a base profile with them (--base)")
    idle, power, wmass, dropped = _fit_power(tel, Profile(draft), base, knots, tps_fit)
    used = len(tel.windows) - dropped
    pfit = [float(k) for k, m in zip(knots, wmass) if m >= 1.0]
    notes.append(f"power: {used} windows used, {dropped} left out (timing inconsistent or at the cap); knots fitted: "
                 f"{pfit} MHz, others follow the base's shape")
    src_power = (f"per-knot linear least squares (relative error) on {used} telemetry power windows; knots "
                 f"{pfit} MHz fitted, others follow the base's knot-to-knot steps; decode compute power = prefill's")
    shared_tp = tps_fit[-1]
    by_tp = [TpPower(tp=tp, **{k: _rounded(power[tp][k]) for k in POWER_CURVES}, source=f"TP{tp}: " + src_power)
             for tp in tps_fit if tp != shared_tp]
    # TP degrees without power telemetry keep the base's curves (its override, else its shared ones)
    for c in base.latency.prefill:
        if c.tp not in power:
            own = next((p for p in on_knots.power_by_tp if p.tp == c.tp), None)
            by_tp.append(own if own is not None else TpPower(
                tp=c.tp, **{k: list(getattr(on_knots, k)) for k in POWER_CURVES},
                source=f"base profile {base.name}'s shared curves (no power telemetry at TP{c.tp})"))
            notes.append(f"TP{c.tp}: no power telemetry, base profile's power curves kept")
    new_cr = ClockResponse(
        knots_mhz=[float(k) for k in knots], reference_mhz=float(knots[ref]), mem_slowdown=_rounded(sm),
        comp_slowdown=_rounded(sc), idle_power_w=_rounded(idle),
        **{k: _rounded(power[shared_tp][k]) for k in POWER_CURVES},
        source=(f"calibrated from telemetry ({len(tel.iterations)} iterations, {used} power windows), base profile "
                f"{base.name}; slowdowns: " + notes[0] + f"; power (TP{shared_tp}'s curves shared): " + src_power),
        power_by_tp=sorted(by_tp, key=lambda p: p.tp))
    cfg = msgspec.structs.replace(
        draft, name=name or f"{base.name}-calibrated", clock_response=new_cr,
        description=f"{base.description.split(';')[0]}; calibrated from telemetry by `dualscale profile fit --telemetry`")
    Profile(cfg)  # everything the loader checks
    return TelemetryFit(cfg, notes, len(tel.iterations), used)


def to_toml(cfg: ProfileConfig) -> bytes:
    header = ("# Generated by `dualscale profile fit --telemetry`: calibrated from a recording of your node.\n"
              "# Units are in the field names; `source` says which numbers the telemetry pinned and which\n"
              "# come from the base profile. Model: see dualscale/profile/schema.py.\n")
    return dump_toml(cfg, header)


@dataclass(frozen=True)
class Score:
    """Error of a profile on telemetry: per phase, time (iterations) and power (windows)."""

    phase: str
    quantity: str
    n: int
    mape_pct: float
    median_pct: float
    max_pct: float


def score(prof: Profile, tel: Telemetry, fitted_on: Telemetry | None = None) -> list[Score]:
    """Error of ``prof`` on the iterations' times and the power windows' mean power in ``tel``.

    With ``fitted_on`` (the telemetry the profile was fitted on), only what it never saw counts:
    iterations at a clock or with a batch shape absent from it, windows at a clock where it has no
    window (each window is still modelled with every iteration of ``tel`` that ran in it).
    """
    clocks = {it.freq_mhz for it in steady(fitted_on)} if fitted_on else set()
    shapes = {_shape_key(it) for it in steady(fitted_on)} if fitted_on else set()
    wclocks = {w.freq_mhz for w in fitted_on.windows} if fitted_on else set()
    errs: dict[tuple[str, str], list[float]] = defaultdict(list)
    tps = set(prof.tp_degrees)
    for it in steady(tel):
        h = tel.headers[it.instance]
        if h.tp not in tps or (fitted_on and it.freq_mhz in clocks and _shape_key(it) in shapes):
            continue
        if isinstance(it, PrefillIteration):
            t = prof.prefill_time_s(h.tp, it.chunk_tokens, it.freq_mhz, it.prefix_tokens)
        else:
            t = prof.decode_time_s(h.tp, it.context_tokens, it.freq_mhz)
        errs[(h.phase, "time")].append(abs(float(t) / it.time_s - 1.0))
    delay = switch_delay_s(prof, tel)
    for w, ov in window_iterations(tel):
        h = tel.headers[w.instance]
        if h.tp not in tps or (fitted_on and w.freq_mhz in wclocks):
            continue
        m = _window_model(prof, tel, w, ov, np.asarray(prof.config.clock_response.knots_mhz), delay)
        if m is not None:
            errs[(h.phase, "power")].append(abs(m.model_w / w.mean_power_w - 1.0))
    return [Score(ph, q, len(e), 100 * float(np.mean(e)), 100 * float(np.median(e)), 100 * float(np.max(e)))
            for (ph, q), e in sorted(errs.items())]
