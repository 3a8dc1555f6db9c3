"""Prefill fine tier: model predictive control of one prefill instance's SM clock.

Every iteration the waiting queue is projected into at most ``horizon`` batches, each batch is
evaluated on every clock of the set, TTFT deadlines become cumulative time budgets, and the
least-energy plan meeting them is chosen (semantics: DESIGN.md, "Prefill decision"). Only the
first clock is applied; the next call re-plans. Three solvers share that problem:

``"qp"``     the continuous relaxation on each batch's convex hull of (time, energy), solved exactly
             (water-filling), and the condensed QP fitted to the hulls, solved by OSQP from there;
             both rounded toward faster, repaired and improved discretely, and the better plan
             polished by an exact search among its neighbouring clocks. One compiled call, OSQP
             included (its C API; the Python binding if the C API's start-up self-test fails).
``"exact"``  Pareto dynamic program: the least-energy plan, exactly (the oracle), bounded by the
             ``qp`` pipeline's plan (without OSQP) and capped at ``exact_max_labels`` partial plans;
             past the cap the decision keeps that plan and says so (``fallback``).
``"greedy"`` the paper's level-by-level search from the all-top plan (the baseline).
``"lowest"`` the lowest clock at which every request completing in the next batch meets its
             deadline, no horizon (throttLL'eM-style): a batch in which no request completes (a
             chunk of a long prompt) runs at the lowest clock, the weakness a horizon removes.

After each iteration, :meth:`PrefillController.observe` feeds back what was measured; the
controller then plans with corrected times and falls back to the top clock when a measurement
exceeds its prediction (``dualscale.control.correction``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Literal

import msgspec
import numpy as np
from numpy.typing import ArrayLike, NDArray

from dualscale import _validate as v
from dualscale._kernels import mpc, osqp_c
from dualscale._kernels import perf_model as pm
from dualscale.control._clocks import resolve_clocks
from dualscale.control.correction import Z, Learner
from dualscale.control.qp import QpResult, QpSettings, QpSolver, QpStatus
from dualscale.profile import Profile

Solver = Literal["qp", "exact", "greedy", "lowest"]
SOLVERS: tuple[Solver, ...] = ("qp", "exact", "greedy", "lowest")

#: Largest horizon accepted: the greedy search enumerates 2**horizon subsets per level.
MAX_HORIZON = 24


class PrefillDecision(msgspec.Struct, frozen=True, gc=False):
    """One prefill decision.

    Attributes:
        freq_mhz: clock for the batch about to run (MHz).
        plan_mhz: one clock per projected batch (MHz); empty when the queue is empty.
        batch_time_s: predicted time of the batch about to run at ``freq_mhz`` (s); 0 when idle.
        energy_j: predicted energy of the whole plan, all GPUs of the instance (J).
        feasible: every projected deadline is met as given (no request needed relaxing to the
            all-top-clock completion time).
        batch_tokens: prompt tokens of each projected batch.
        batch_energy_j: predicted energy of the batch about to run at ``freq_mhz`` (J, all GPUs).
        top_energy_j: the same batch's predicted energy at the top clock (J): what the plan saves
            on this iteration is ``top_energy_j - batch_energy_j``.
        budget_s: time the batch about to run may take so that every request completing in it
            meets its deadline (s; relaxed to the top clock's time when even that is late).
        fallback: ``"exact"`` only: the search reached its cap of partial plans and the plan is
            its incumbent's (the ``qp`` pipeline's without OSQP), not proven least.
    """

    freq_mhz: int
    plan_mhz: tuple[int, ...]
    batch_time_s: float
    energy_j: float
    feasible: bool
    batch_tokens: tuple[int, ...]
    batch_energy_j: float = 0.0
    top_energy_j: float = 0.0
    budget_s: float = float("inf")
    fallback: bool = False


class PrefillController(Learner):
    """Per-iteration clock choice for one prefill instance (embeddable: no threads, no sockets).

    Args:
        profile: latency and power model of the (GPU, model) pair.
        tp: tensor-parallel degree of the instance (one of ``profile.tp_degrees``).
        ttft_slo_s: TTFT target (s), judged per request from its arrival.
        horizon: batches projected from the queue (1..24).
        max_batch_tokens: token budget of one prefill batch (the engine's chunking rule).
        margin: fraction of the SLO held back for clock-switch delays and model error, in [0, 1).
        kv_guard: KV-cache use (fraction) at or above which the top clock is used, in (0, 1].
        clocks_mhz: clocks to choose from; ``None`` is every supported clock of the profile.
        idle_freq_mhz: clock returned for an empty queue; ``None`` is the lowest of the set.
        solver: ``"qp"`` (default), ``"exact"``, ``"greedy"`` or ``"lowest"`` (see the module docstring).
        qp_settings: OSQP settings for ``solver="qp"``.
        online_correction: learn from :meth:`observe` (default); False ignores the feedback.
        switch_delay_s: how long a clock change takes to land (s; H100 ~0.02 including the
            decision's own latency); the batch about to run is charged that long at the clock in
            effect. 0 (default) plans as if clocks switched at once (DESIGN.md's plan semantics).
        exact_max_labels: ``"exact"`` only: partial plans kept after any batch at most (default
            32: measured to keep its p99 under 100 us on the full grid); past it the decision falls
            back to the incumbent (``fallback``). 0: no cap.
    """

    def __init__(self, profile: Profile, tp: int, ttft_slo_s: float, horizon: int = 8,
                 max_batch_tokens: int = 2048, margin: float = 0.05, kv_guard: float = 0.9,
                 clocks_mhz: Sequence[int] | NDArray[np.integer] | None = None,
                 idle_freq_mhz: int | None = None, solver: Solver = "qp",
                 qp_settings: QpSettings | None = None, online_correction: bool = True,
                 switch_delay_s: float = 0.0, exact_max_labels: int = 32) -> None:
        if not isinstance(profile, Profile):
            raise TypeError(f"profile: expected a dualscale.Profile, got {type(profile).__name__}")
        tp = v.whole("tp", tp, 1)
        if tp not in profile.tp_degrees:
            raise ValueError(f"tp = {tp}: profile {profile.name!r} covers tp in {profile.tp_degrees}")
        self.profile = profile
        self.tp = tp
        self.ttft_slo_s = v.finite("ttft_slo_s", ttft_slo_s, 0.0, lo_open=True)
        self.horizon = v.whole("horizon", horizon, 1, MAX_HORIZON)
        self.max_batch_tokens = v.whole("max_batch_tokens", max_batch_tokens, 1)
        self.margin = v.finite("margin", margin, 0.0, 1.0, hi_open=True)
        self.kv_guard = v.finite("kv_guard", kv_guard, 0.0, 1.0, lo_open=True)
        if solver not in SOLVERS:
            raise ValueError(f"solver = {solver!r}: must be one of {SOLVERS}")
        self.solver: Solver = solver
        self.clocks_mhz, self.idle_freq_mhz = resolve_clocks(profile, clocks_mhz, idle_freq_mhz)

        k, n_clocks = self.horizon, self.clocks_mhz.size
        self._table = np.ascontiguousarray(profile.clock_table("prefill", tp, self.clocks_mhz))
        self._init_learning(profile.coefficients("prefill", tp), self.clocks_mhz, online_correction, Z)
        self.switch_delay_s = v.finite("switch_delay_s", switch_delay_s, 0.0)
        # the clock the GPUs are at (column of the set) and until when the last batch was planned to run;
        # the idle clock's column (the nearest of the set above it when the set lacks it)
        self._idle_j = min(int(np.searchsorted(self.clocks_mhz, self.idle_freq_mhz)), self.clocks_mhz.size - 1)
        self._clock_j = self._idle_j
        self._busy_until_s = -np.inf
        self._model_row0 = np.empty((2, self.clocks_mhz.size))  # batch 1's time and energy before the charge
        self._params = np.zeros(mpc.N_PARAMS)
        self._params[mpc.P_TTFT_SLO_S] = self.ttft_slo_s
        self._params[mpc.P_MARGIN] = self.margin
        self._bounds = np.zeros(k + 1, dtype=np.int64)
        self._batch_tokens = np.zeros(k, dtype=np.int64)
        self._done_batch = np.empty(0, dtype=np.int64)
        self._grow(64)
        self._tables = np.zeros((2, k, n_clocks))
        self._out = np.empty((2, n_clocks))
        self._budget_s = np.empty(k)
        self._order = np.empty((k, n_clocks), dtype=np.int64)
        self._n_front = np.zeros(k, dtype=np.int64)
        self._plan = np.empty(k, dtype=np.int64)
        self.exact_max_labels = v.whole("exact_max_labels", exact_max_labels, 0)
        self._hpos = np.zeros((k, n_clocks), dtype=np.int64)
        self._n_hull = np.zeros(k, dtype=np.int64)
        n_fw, n_iw = mpc.qp_workspace(k, n_clocks)
        self._fw = np.zeros(n_fw)
        self._iw = np.zeros(n_iw, dtype=np.int64)
        self._stats = np.zeros(mpc.N_STATS, dtype=np.int64)
        # views of the workspace: the QP's data, OSQP's last solution, the window search's scratch
        (self._qp_vec, self._px, self._ax, self._x, self._xw, _, self._y, self._yw, _, _,
         self._alt, self._cand, self._n_cand, _) = mpc.qp_slices(self._fw, self._iw, k, n_clocks)
        self._upper = np.empty(2 * k)
        cap = max(self.exact_max_labels, 1)
        n_fx, n_ix = mpc.window_workspace(k, n_clocks, cap) if solver == "exact" else (0, 0)
        self._fx = np.zeros(n_fx)
        self._ix = np.zeros(n_ix, dtype=np.int64)
        self._qp: QpSolver | None = None
        #: wall seconds of the last decision spent in OSQP through the Python binding (0 on the C API)
        self.last_osqp_s = 0.0
        #: ``"exact"``: decisions that reached the cap and kept the incumbent, since construction
        self.exact_fallbacks = 0
        self._qp_ran = False
        if solver == "qp":
            self._qp = QpSolver(k, qp_settings)
            if not self._qp.open_c_api():
                warnings.warn(f"OSQP's C API is not usable ({self._qp.c_api_fallback}): prefill decisions "
                              "call OSQP through its Python binding (slower)", RuntimeWarning, stacklevel=2)
                self._qp.setup()
        self._warm_up()

    @property
    def osqp_route(self) -> str:
        """How the ``qp`` solver reaches OSQP: ``"c-api"`` (compiled, one call per decision),
        ``"binding"`` (the Python binding: the C API's self-test failed, see ``qp_fallback``), or
        ``""`` for the other solvers."""
        if self._qp is None:
            return ""
        return "c-api" if self._qp.c_api is not None else "binding"

    @property
    def qp_fallback(self) -> str:
        """Why OSQP's C API is not used ("" when it is, or for the other solvers)."""
        return self._qp.c_api_fallback if self._qp is not None else ""

    @property
    def last_qp(self) -> QpResult | None:
        """OSQP's result in the last decision (None when it did not run)."""
        if not self._qp_ran:
            return None
        st = int(self._stats[mpc.ST_STATUS])
        # OSQP's status values (osqp_api_constants.h): 1 solved, 2 solved inaccurate, 7 max iterations
        status = {1: QpStatus.SOLVED, 2: QpStatus.INACCURATE, 7: QpStatus.MAX_ITER}.get(st, QpStatus.FAILED)
        return QpResult(x=self._x.copy(), y=self._y.copy(), status=status,
                        iterations=int(self._stats[mpc.ST_ITER]), solve_time_s=self.last_osqp_s)

    def __repr__(self) -> str:
        return (f"PrefillController(profile={self.profile.name!r}, tp={self.tp}, ttft_slo_s={self.ttft_slo_s}, "
                f"horizon={self.horizon}, solver={self.solver!r}, clocks={self.clocks_mhz.size})")

    def _grow(self, n_requests: int) -> None:
        # workspaces sized by the queue grow geometrically and are reused across decisions
        cap = max(n_requests, 2 * self._done_batch.shape[0])
        self._done_batch = np.empty(cap, dtype=np.int64)
        self._chunk_tokens = np.empty(cap + self.horizon, dtype=np.int64)
        self._chunk_prefix = np.empty(cap + self.horizon, dtype=np.int64)

    def _warm_up(self) -> None:
        # compile (or load) every kernel now, and make one real decision so the first call is fast
        pm.warm_up()
        mpc.warm_up()
        self.decide(1.0, [0.5, 0.9], [self.max_batch_tokens + 7, 300])
        # the warm-up's solution must not seed the first real decision
        self._x[:] = 1.0
        self._y[:] = 0.0
        if self._qp is not None:
            self._qp.reset_warm_start()
        self.exact_fallbacks = 0
        self._decided_factor = 0.0

    # ---- the decision ------------------------------------------------------------------------
    def _queue(self, now_s: float, arrival_s: ArrayLike, prompt_tokens: ArrayLike,
               prefilled_tokens: ArrayLike | None) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
        arrival = v.vector("arrival_s", arrival_s)
        n = arrival.shape[0]
        tokens = np.zeros((2, n), dtype=np.int64)
        tokens[mpc.Q_PROMPT] = v.counts("prompt_tokens", prompt_tokens, n, "arrival_s")
        if prefilled_tokens is not None:
            tokens[mpc.Q_DONE] = v.counts("prefilled_tokens", prefilled_tokens, n, "arrival_s")
        code, i = mpc.check_queue(now_s, arrival, tokens)
        if code != mpc.QUEUE_OK:
            prompt, done = tokens[mpc.Q_PROMPT, i], tokens[mpc.Q_DONE, i]
            raise ValueError({
                mpc.QUEUE_ARRIVAL_NOT_FINITE: f"arrival_s[{i}] = {arrival[i]}: must be finite",
                mpc.QUEUE_UNSORTED: f"arrival_s must be sorted (FCFS queue): arrival_s[{i}] = {arrival[i]} "
                                    f"< arrival_s[{i - 1}] = {arrival[i - 1]}",
                mpc.QUEUE_ARRIVAL_AFTER_NOW: f"arrival_s[{i}] = {arrival[i]}: after now_s = {now_s} "
                                             "(a waiting request has already arrived)",
                mpc.QUEUE_PROMPT_BELOW_1: f"prompt_tokens[{i}] = {prompt}: must be >= 1",
                mpc.QUEUE_DONE_NEGATIVE: f"prefilled_tokens[{i}] = {done}: must be >= 0",
                mpc.QUEUE_DONE_NOT_BELOW_PROMPT: f"prefilled_tokens[{i}] = {done}: must be < prompt_tokens[{i}] "
                                                 f"= {prompt} (a fully prefilled request is no longer waiting)",
            }[code])
        return arrival, tokens

    def decide(self, now_s: float, arrival_s: ArrayLike, prompt_tokens: ArrayLike,
               prefilled_tokens: ArrayLike | None = None, kv_util: float = 0.0) -> PrefillDecision:
        """Choose the clock of the next prefill batch.

        Args:
            now_s: current time (s), same clock as ``arrival_s``.
            arrival_s: arrival time of each waiting request (s), FCFS order (non-decreasing).
            prompt_tokens: prompt length of each waiting request (tokens, >= 1).
            prefilled_tokens: tokens of each request already prefilled by earlier chunks (default 0).
            kv_util: KV-cache use of the instance in [0, 1]; at or above ``kv_guard`` -> top clock.

        Returns:
            PrefillDecision: the clock to apply now and the plan behind it.
        """
        now = v.finite("now_s", now_s)
        kv = v.finite("kv_util", kv_util, 0.0, 1.0)
        arrival, tokens = self._queue(now, arrival_s, prompt_tokens, prefilled_tokens)
        n_req = arrival.shape[0]
        if n_req == 0:
            self._decided_factor = 0.0
            self._busy_until_s = -np.inf  # the GPUs go to the idle clock
            return PrefillDecision(self.idle_freq_mhz, (), 0.0, 0.0, True, ())
        self._params[mpc.P_NOW_S] = now
        if n_req > self._done_batch.shape[0]:
            self._grow(n_req)
        n = mpc.project(tokens, self.max_batch_tokens, self.horizon, self._chunk_tokens, self._chunk_prefix,
                        self._bounds, self._done_batch, self._batch_tokens)
        mpc.tabulate(self._chunk_tokens, self._chunk_prefix, self._bounds, n, self._coef, self._table,
                     self._tables, self._out)
        if self.switch_delay_s > 0.0:
            self._charge_switch(now)
        relaxed = mpc.budgets(arrival, self._done_batch[:n_req], self._params, self._tables, n, self._budget_s)
        plan = self._plan
        top = self.clocks_mhz.size - 1
        self._qp_ran = False
        self._fallback = False
        self.last_osqp_s = 0.0
        hold = self.correction.take_hold()
        if kv >= self.kv_guard or hold:
            plan[:n] = top
            energy, _ = mpc.plan_cost(self._tables, self._budget_s, n, plan)
        else:
            energy = self._solve(n)
        self._decided_factor = self.correction.time_factor
        self._clock_j = int(plan[0])
        self._busy_until_s = now + float(self._tables[mpc.TB_TIME_S, 0, plan[0]])
        plan_mhz = tuple(self.clocks_mhz[plan[:n]].tolist())
        return PrefillDecision(
            freq_mhz=plan_mhz[0],
            plan_mhz=plan_mhz,
            batch_time_s=float(self._tables[mpc.TB_TIME_S, 0, plan[0]]),
            energy_j=float(energy) * self.correction.power_factor,
            feasible=relaxed == 0,
            batch_tokens=tuple(self._batch_tokens[:n].tolist()),
            batch_energy_j=float(self._tables[mpc.TB_ENERGY_J, 0, plan[0]]) * self.correction.power_factor,
            top_energy_j=float(self._tables[mpc.TB_ENERGY_J, 0, top]) * self.correction.power_factor,
            budget_s=float(self._budget_s[0]),
            fallback=self._fallback,
        )

    def _charge_switch(self, now_s: float) -> None:
        """Charge the batch about to run the clock switch: a new clock lands ``switch_delay_s``
        after it is asked for, and until then the batch runs at the clock in effect (work advances
        at 1 / time(f), so a fraction d / t_cur of it is done at the old clock).

        The clock in effect is the last one decided while the instance stays busy; after a gap
        longer than the last batch (plus two switch delays) the engine went idle and asked for the
        idle clock. Without this, a burst that lands on an idle instance at the lowest clock loses
        ~d to a slow start the plan never saw (measured: most of the P99 TTFT excess over
        DistServe at +10 % model error)."""
        d = self.switch_delay_s
        j = self._clock_j if now_s <= self._busy_until_s + 2.0 * d else self._idle_j
        t = self._tables[mpc.TB_TIME_S, 0]
        e = self._tables[mpc.TB_ENERGY_J, 0]
        self._model_row0[0] = t
        self._model_row0[1] = e
        t_cur, e_cur = float(t[j]), float(e[j])
        if t_cur <= d:  # the whole batch runs before the switch lands
            t[:] = t_cur
            e[:] = e_cur
            return
        rest = 1.0 - d / t_cur
        t *= rest
        t += d
        e *= rest
        e += e_cur * d / t_cur

    def _last_model(self, freq_mhz: float, factor: float, with_power: bool) -> tuple[float, float]:
        # a measurement at one clock throughout is compared with the model alone (no switch in it)
        rows = self._model_row0 if self.switch_delay_s > 0.0 else self._tables[:, 0]
        at = self._clock_index.value_at
        model_s = at(rows[mpc.TB_TIME_S], freq_mhz) / factor
        if not (with_power and model_s > 0):
            return model_s, 0.0
        return model_s, at(rows[mpc.TB_ENERGY_J], freq_mhz) / (self.tp * model_s * factor)

    def _solve(self, n: int) -> float:
        t, b, plan = self._tables, self._budget_s, self._plan
        if self.solver == "greedy":
            return mpc.solve_greedy(t, b, n, plan)
        if self.solver == "lowest":
            # the next batch alone; its budget is already relaxed to the top clock's completion
            fits = np.flatnonzero(t[mpc.TB_TIME_S, 0] <= b[0] + mpc.TOL_S)
            plan[0] = fits[0] if fits.size else self.clocks_mhz.size - 1
            plan[1:n] = plan[0]
            return mpc.plan_cost(t, b, n, plan)[0]
        if self.solver == "exact":
            return self._solve_exact(n)
        assert self._qp is not None
        c = self._qp.c_api
        if c is not None:
            energy = osqp_c.solve_qp(t, b, n, self._order, self._n_front, self._hpos, self._n_hull, plan, self._fw,
                                     self._iw, c.at, self._stats)
            self._qp_ran = self._stats[mpc.ST_SOURCE] != mpc.SOURCE_CHEAPEST
            return energy
        # fallback: the compiled steps around OSQP's Python binding
        energy, done = self._prepare(n)
        if done:
            return energy
        t0 = time.perf_counter()
        res = self._qp.solve_from(self._px, self._qp_vec[0], self._ax, self._qp_vec[1:3].reshape(-1),
                                  self._xw, self._yw)
        self.last_osqp_s = time.perf_counter() - t0
        self._x[:] = res.x
        self._y[:] = res.y
        self._stats[mpc.ST_STATUS] = {QpStatus.SOLVED: 1, QpStatus.INACCURATE: 2, QpStatus.MAX_ITER: 7}.get(res.status, -1)
        self._stats[mpc.ST_ITER] = res.iterations
        self._qp_ran = True
        return mpc.qp_finish(t, b, n, self._order, self._n_front, self._hpos, self._n_hull, plan, energy,
                             res.status is not QpStatus.FAILED, self._fw, self._iw, self._stats)

    def _prepare(self, n: int) -> tuple[float, bool]:
        return mpc.qp_prepare(self._tables, self._budget_s, n, self._order, self._n_front, self._hpos, self._n_hull,
                              self._plan, self._fw, self._iw, self._stats)

    def _solve_exact(self, n: int) -> float:
        """Least energy, bounded by the qp pipeline's plan without OSQP (a good incumbent, and
        optimal outright when every batch fits at its cheapest clock), capped."""
        t, b, plan = self._tables, self._budget_s, self._plan
        upper, done = self._prepare(n)
        if done:
            return upper
        upper = mpc.qp_finish(t, b, n, self._order, self._n_front, self._hpos, self._n_hull, plan, upper, False,
                              self._fw, self._iw, self._stats)
        alt = self._alt
        if self.exact_max_labels == 0:
            energy = mpc.solve_exact(t, b, n, self._order, self._n_front, alt, upper)
            status = 0 if energy < np.inf else 2
        else:
            self._cand[:n] = np.arange(self._cand.shape[1])
            self._n_cand[:n] = self._n_front[:n]
            energy, status = mpc.solve_window(t, b, n, self._order, self._cand, self._n_cand, alt, upper,
                                              self.exact_max_labels, self._fx, self._ix)
        if status == 0 and energy < upper:
            plan[:n] = alt[:n]
            return energy
        if status == 1:
            self._fallback = True
            self.exact_fallbacks += 1
        # status 2: nothing cheaper than the incumbent exists, so the incumbent is optimal
        return upper
