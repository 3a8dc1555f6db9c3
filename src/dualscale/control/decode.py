"""Decode fine tier: slack-aware SM clock of one decode instance, chosen before every step.

The step budget comes from the running requests' TPOT slack (or, with ``slack="tbt"``, from the
per-step target the paper uses as a proxy); the clock is the least-power one whose predicted step
time fits it (or, with ``objective="energy"``, the least energy per step; DESIGN.md, "Decode
decision", leaves the objective to measurement, and least power saves more: see the class).

After each step, :meth:`DecodeController.observe` feeds back what was measured; the controller
then plans with corrected step times and falls back to the top clock when a measurement exceeds
its prediction (``dualscale.control.correction``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import msgspec
import numpy as np
from numpy.typing import ArrayLike, NDArray

from dualscale import _validate as v
from dualscale._kernels import perf_model as pm
from dualscale._kernels import slack as sk
from dualscale._kernels import stepping as st
from dualscale.control import correction as corr
from dualscale.control._clocks import resolve_clocks
from dualscale.control.correction import Z_DECODE, Learner
from dualscale.profile import Profile

Slack = Literal["request", "tbt"]
SLACKS: tuple[Slack, ...] = ("request", "tbt")
Objective = Literal["energy", "power"]
OBJECTIVES: tuple[Objective, ...] = ("energy", "power")


class DecodeDecision(msgspec.Struct, frozen=True, gc=False):
    """One decode decision.

    Attributes:
        freq_mhz: clock for the step about to run (MHz).
        step_time_s: predicted step time at ``freq_mhz`` (s); 0 when idle.
        energy_j: predicted energy of the step, all GPUs of the instance (J).
        feasible: some clock's step time fits the budget.
        budget_s: the step-time budget (s); may be negative when a request is already late.
        top_energy_j: the step's predicted energy at the top clock (J, all GPUs).
    """

    freq_mhz: int
    step_time_s: float
    energy_j: float
    feasible: bool
    budget_s: float
    top_energy_j: float = 0.0


class DecodeController(Learner):
    """Per-step clock choice for one decode instance (embeddable: no threads, no sockets).

    Args:
        profile: latency and power model of the (GPU, model) pair.
        tp: tensor-parallel degree of the instance (one of ``profile.tp_degrees``).
        tpot_slo_s: TPOT target (s).
        margin: fraction of the SLO held back, in [0, 1).
        kv_guard: KV-cache use (fraction) at or above which the top clock is used, in (0, 1].
        clocks_mhz: clocks to choose from; ``None`` is every supported clock of the profile.
        idle_freq_mhz: clock returned for an empty batch; ``None`` is the lowest of the set.
        slack: ``"request"`` (each request's accumulated TPOT slack) or ``"tbt"`` (fixed per-step
            target, the paper's proxy).
        objective: ``"power"`` (default: least power, i.e. usually the lowest clock that fits) or
            ``"energy"`` (least tp x power x step time). A decode instance with work runs steps
            back to back, so over time its energy is its power integrated: a slower step lets
            the batch grow instead of costing more steps, and energy per step is the wrong unit.
            Measured (bench/decode_objective.py, README "Fine tier"): least power saves more decode
            energy on every workload with the SLOs met, and never more than PlaceOnly's fixed
            baseline clocks, which least energy per step did at 10-55 % load.
        online_correction: learn from :meth:`observe` (default); False ignores the feedback.
    """

    def __init__(self, profile: Profile, tp: int, tpot_slo_s: float, margin: float = 0.05,
                 kv_guard: float = 0.9, clocks_mhz: Sequence[int] | NDArray[np.integer] | None = None,
                 idle_freq_mhz: int | None = None, slack: Slack = "request",
                 objective: Objective = "power", online_correction: bool = True) -> None:
        if not isinstance(profile, Profile):
            raise TypeError(f"profile: expected a dualscale.Profile, got {type(profile).__name__}")
        tp = v.whole("tp", tp, 1)
        if tp not in profile.tp_degrees:
            raise ValueError(f"tp = {tp}: profile {profile.name!r} covers tp in {profile.tp_degrees}")
        if slack not in SLACKS:
            raise ValueError(f"slack = {slack!r}: must be one of {SLACKS}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective = {objective!r}: must be one of {OBJECTIVES}")
        self.objective: Objective = objective
        self.profile = profile
        self.tp = tp
        self.tpot_slo_s = v.finite("tpot_slo_s", tpot_slo_s, 0.0, lo_open=True)
        self.margin = v.finite("margin", margin, 0.0, 1.0, hi_open=True)
        self.kv_guard = v.finite("kv_guard", kv_guard, 0.0, 1.0, lo_open=True)
        self.slack: Slack = slack
        self.clocks_mhz, self.idle_freq_mhz = resolve_clocks(profile, clocks_mhz, idle_freq_mhz)
        self._clock_list = self.clocks_mhz.tolist()
        self._init_learning(profile.coefficients("decode", tp), self.clocks_mhz, online_correction, Z_DECODE)
        self._table = np.ascontiguousarray(profile.clock_table("decode", tp, self.clocks_mhz))
        self._out = np.empty((2, self.clocks_mhz.size))
        self._params = np.zeros(sk.N_PARAMS)
        self._params[sk.D_TPOT_SLO_S] = self.tpot_slo_s
        self._params[sk.D_MARGIN] = self.margin
        self._params[sk.D_REQUEST_SLACK] = 1.0 if slack == "request" else 0.0
        self._params[sk.D_POWER_OBJECTIVE] = 1.0 if objective == "power" else 0.0
        pm.warm_up()
        sk.warm_up()
        self.decide(1.0, [0.5], [3], [100])
        self._decided_factor = 0.0

    def __repr__(self) -> str:
        return (f"DecodeController(profile={self.profile.name!r}, tp={self.tp}, tpot_slo_s={self.tpot_slo_s}, "
                f"slack={self.slack!r}, clocks={self.clocks_mhz.size})")

    def decide(self, now_s: float, first_token_s: ArrayLike, tokens_out: ArrayLike,
               context_tokens: ArrayLike, kv_util: float = 0.0) -> DecodeDecision:
        """Choose the clock of the next decode step.

        Args:
            now_s: current time (s), same clock as ``first_token_s``.
            first_token_s: when each running request emitted its first token (s), <= ``now_s``.
            tokens_out: output tokens of each request so far, the first included (>= 1).
            context_tokens: tokens in each request's KV cache (prompt + output so far, >= 1).
            kv_util: KV-cache use of the instance in [0, 1]; at or above ``kv_guard`` -> top clock.

        Returns:
            DecodeDecision: the clock to apply now, with the predicted step.
        """
        now = v.finite("now_s", now_s)
        kv = v.finite("kv_util", kv_util, 0.0, 1.0)
        first = v.vector("first_token_s", first_token_s)
        n = first.shape[0]
        out_tok = v.counts("tokens_out", tokens_out, n, "first_token_s")
        ctx = v.counts("context_tokens", context_tokens, n, "first_token_s")
        if n == 0:
            self._decided_factor = 0.0
            return DecodeDecision(self.idle_freq_mhz, 0.0, 0.0, True, float("inf"))
        code, i = sk.check_batch(now, first, out_tok, ctx)
        if code != sk.BATCH_OK:
            raise ValueError({
                sk.BATCH_FIRST_NOT_FINITE: f"first_token_s[{i}] = {first[i]}: must be finite",
                sk.BATCH_FIRST_AFTER_NOW: f"first_token_s[{i}] = {first[i]}: after now_s = {now} "
                                          "(a running request has emitted its first token)",
                sk.BATCH_TOKENS_OUT_BELOW_1: f"tokens_out[{i}] = {out_tok[i]}: must be >= 1 (the first token counts)",
                sk.BATCH_CONTEXT_BELOW_1: f"context_tokens[{i}] = {ctx[i]}: must be >= 1",
            }[code])
        self._params[sk.D_NOW_S] = now
        j, budget = sk.choose(first, out_tok, ctx, self._params, self._coef, self._table, self._out)
        feasible = j >= 0
        if self.correction.take_hold() or not feasible or kv >= self.kv_guard:
            j = self.clocks_mhz.size - 1
        self._decided_factor = self.correction.time_factor
        t = float(self._out[pm.O_TIME_S, j])
        return DecodeDecision(
            freq_mhz=self._clock_list[j],
            step_time_s=t,
            energy_j=self.tp * float(self._out[pm.O_POWER_W, j]) * t * self.correction.power_factor,
            feasible=bool(feasible),
            budget_s=float(budget),
            top_energy_j=self.tp * float(self._out[pm.O_POWER_W, -1] * self._out[pm.O_TIME_S, -1])
            * self.correction.power_factor,
        )

    def _last_model(self, freq_mhz: float, factor: float, with_power: bool) -> tuple[float, float]:
        at = self._clock_index.value_at
        return (at(self._out[pm.O_TIME_S], freq_mhz) / factor,
                at(self._out[pm.O_POWER_W], freq_mhz) if with_power else 0.0)


class Plant(msgspec.Struct, frozen=True, kw_only=True):
    """How a simulated instance's GPUs differ from the profile (a simulator's ground truth).

    Attributes:
        time_factor: true iteration time / the profile's (at every clock).
        power_factor: true power / the profile's.
        clock_shape_error: the slowdown below the top clock is (1 + this) x the profile's.
        latency_noise: sigma of log(iteration time), drawn per iteration from the simulator's generator.
        power_cap_w: per-GPU cap (0: none); above it a GPU runs at the highest clock that fits.
        switch_jitter: each rank's switch delay is delay x (1 +/- jitter), the slowest counts.
    """

    time_factor: float = 1.0
    power_factor: float = 1.0
    clock_shape_error: float = 0.0
    latency_noise: float = 0.0
    power_cap_w: float = 0.0
    switch_jitter: float = 0.0

    @property
    def draws(self) -> bool:
        """True when iterations or switches draw random numbers."""
        return self.latency_noise > 0.0 or self.switch_jitter != 0.0


class _Stepper:
    """What a simulated instance's compiled iterations share: clock state (a switch lands
    ``switch_delay_s`` after it is asked for), the plant, energy and the timeline in preallocated
    arrays (``dualscale._kernels.stepping`` documents the layouts)."""

    RUNNING = st.RUNNING
    IDLE = st.IDLE
    NEED_DECISION = st.NEED_DECISION

    def __init__(self, profile: Profile, phase: Literal["prefill", "decode"], tp: int, fixed_mhz: int | None,
                 idle_freq_mhz: int, requests: tuple[NDArray[np.int64], NDArray[np.float64]], plant: Plant,
                 switch_delay_s: float, rng: np.random.Generator | None) -> None:
        self.tp = tp
        clocks = profile.clocks_mhz
        self.req_i, self.req_f = requests
        self.si = np.zeros(st.N_SI, dtype=np.int64)
        self.sf = np.zeros(st.N_SF)
        self.si[st.S_PENDING_J] = -1
        self.si[st.S_ITER_J] = -1
        self.si[st.S_J] = (int(idle_freq_mhz) - int(clocks[0])) // int(profile.config.gpu.clock_step_mhz)
        self.pv = np.zeros(st.N_PV)
        self.pv[:pm.N_COEF] = profile.coefficients(phase, tp)
        p = pm.N_COEF
        self.pv[p + st.P_TIME_FACTOR] = plant.time_factor
        self.pv[p + st.P_POWER_FACTOR] = plant.power_factor
        self.pv[p + st.P_SHAPE] = plant.clock_shape_error
        self.pv[p + st.P_SIGMA] = plant.latency_noise
        self.pv[p + st.P_CAP_W] = plant.power_cap_w
        self.pv[p + st.P_JITTER] = plant.switch_jitter
        self.pv[p + st.P_DELAY_S] = switch_delay_s
        self.pv[p + st.P_TP] = tp
        self.pv[p + st.P_IDLE_MHZ] = idle_freq_mhz
        self.p_rows = np.zeros((st.N_PROWS, clocks.size))
        self.p_rows[:pm.N_TABLE_ROWS] = profile.clock_table(phase, tp)
        self.p_rows[st.PR_IDLE_W] = profile.idle_power_w(clocks.astype(np.float64))
        self.p_int = np.stack([clocks.astype(np.int64), np.arange(clocks.size, dtype=np.int64)])
        self.rng = rng if plant.draws else None
        self.tl_f = np.zeros((3, 1024))
        self.tl_i = np.zeros((3, 1024), dtype=np.int64)
        self.cv = np.zeros(st.N_CV)
        self.cv[st.C_MODE] = st.MODE_EXTERNAL if fixed_mhz is None else st.MODE_FIXED
        self.cv[st.C_FIXED_MHZ] = 0 if fixed_mhz is None else int(fixed_mhz)
        self.c_rows = np.zeros((st.N_CROWS, 1))
        #: the caller decides (and feeds back) every iteration
        self.asks = fixed_mhz is None
        _warm_up()

    def _kernel(self, t_s: float, horizon_s: float, entry: int) -> tuple[int, float]:
        raise NotImplementedError

    def _call(self, t_s: float, horizon_s: float, entry: int) -> tuple[int, float]:
        while True:
            code, t1 = self._kernel(t_s, horizon_s, entry)
            if code != st.TIMELINE_FULL:
                return int(code), float(t1)  # Python numbers with the JIT off too
            t_s, entry = t1, int(self.si[st.S_RESUME])
            self.tl_f = np.concatenate([self.tl_f, np.zeros_like(self.tl_f)], axis=1)
            self.tl_i = np.concatenate([self.tl_i, np.zeros_like(self.tl_i)], axis=1)

    def advance(self, t_s: float, horizon_s: float, *, boundary: bool) -> tuple[int, float]:
        """Run iterations from ``t_s`` while they end before ``horizon_s``.

        ``boundary``: the iteration in flight ended at ``t_s`` (else the instance was idle).
        Returns (code, time s): :attr:`RUNNING` and the end of the iteration in flight, :attr:`IDLE`
        and when the instance ran out of work, or :attr:`NEED_DECISION` (no clock or controller
        given) and the time to decide at.
        """
        return self._call(t_s, horizon_s, st.AT_BOUNDARY if boundary else st.AT_START)

    def run_decided(self, t_s: float, freq_mhz: int) -> float:
        """Run one iteration at ``freq_mhz`` (decided by the caller) from ``t_s``; returns its end (s)."""
        self.cv[st.C_FIXED_MHZ] = freq_mhz
        return self._call(t_s, t_s, st.RUN_DECIDED)[1]

    def idle_until(self, t_s: float) -> None:
        """Account idle power up to ``t_s``."""
        self._call(t_s, t_s, st.IDLE_TO)

    def measured(self, t_s: float) -> tuple[float, int, float]:
        """What an engine measures of the iteration that ended at ``t_s``: (time s, clock in effect
        MHz as read back or 0 if it changed midway, power per GPU W or 0)."""
        j = int(self.si[st.S_ITER_J])
        dt = t_s - float(self.sf[st.F_STEP_STARTED])
        if j < 0:
            return dt, 0, 0.0
        return dt, int(self.p_int[st.PI_CLOCKS, self.p_int[st.PI_EFF, j]]), float(self.p_rows[st.PR_POWER_W, j])

    @staticmethod
    def _grow(a: NDArray[np.int64], need: int) -> NDArray[np.int64]:
        if a.shape[-1] >= need:
            return a
        b = np.zeros((*a.shape[:-1], max(need, 2 * a.shape[-1])), dtype=a.dtype)
        b[..., :a.shape[-1]] = a
        return b

    @property
    def busy(self) -> bool:
        """An iteration is running."""
        return bool(self.si[st.S_BUSY])

    @property
    def steps(self) -> int:
        """Iteration boundaries processed (one per iteration that ran)."""
        return int(self.si[st.S_STEPS])

    @property
    def energy_busy_j(self) -> float:
        return float(self.sf[st.F_ENERGY_BUSY])

    @property
    def energy_idle_j(self) -> float:
        return float(self.sf[st.F_ENERGY_IDLE])

    def segments(self) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
        """Timeline segments so far: float rows (t0 s, t1 s, power W per GPU) and int rows (clock
        read back MHz, queued or running requests at the segment's start, busy)."""
        n = int(self.si[st.S_TL_N])
        return self.tl_f[:, :n], self.tl_i[:, :n]

    # the per-request arrays steppers share (see request_arrays)
    REQ_FIRST_TOKEN_S = st.Q_FIRST_TOKEN
    REQ_READY_S = st.Q_READY
    REQ_ADMIT_WAIT_S = st.Q_ADMIT_WAIT
    REQ_FINISH_S = st.Q_FINISH
    REQ_ARRIVAL_S = st.Q_ARRIVAL
    REQ_TOKENS_OUT = st.R_TOKENS_OUT
    REQ_KV_BLOCKED = st.R_KV_BLOCKED
    REQ_PREFILLED = st.R_PREFILLED
    REQ_REJECTED = st.R_REJECTED

    @staticmethod
    def request_arrays(arrival_s: NDArray[np.float64], prompt_tokens: NDArray[np.int64],
                       output_tokens: NDArray[np.int64],
                       need_tokens: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
        """The per-request arrays a run's steppers share: arrival, lengths and KV need in; records
        out (times NaN until written). Rows are the ``REQ_*`` constants."""
        n = prompt_tokens.shape[0]
        req_i = np.zeros((st.N_R, n), dtype=np.int64)
        req_i[st.R_PROMPT] = prompt_tokens
        req_i[st.R_OUTPUT] = output_tokens
        req_i[st.R_NEED] = need_tokens
        req_f = np.full((st.N_Q, n), np.nan)
        req_f[st.Q_ADMIT_WAIT] = 0.0
        req_f[st.Q_ARRIVAL] = arrival_s
        return req_i, req_f


_WARM = [False]


def _warm_up() -> None:
    """Compile (or load from the cache) the stepping kernels once per process."""
    if not _WARM[0]:
        st.warm_up()
        _WARM[0] = True


class DecodeStepper(_Stepper):
    """A simulated decode instance run step after step by its controller, many steps per call.

    This is the controller's trusted fast path for a simulator (the simulator builds the batch
    itself, so nothing is re-validated): each step admits waiting requests (FCFS, within
    ``max_batch_requests`` and the KV capacity), decides its clock as :meth:`DecodeController.decide`
    would, runs it on ``plant`` (switch delays, throttling, noise), accounts energy and a timeline
    segment, feeds the measurement back as :meth:`DecodeController.observe` would, and emits one
    token per request. :meth:`advance` repeats this until a step ends at or after the horizon the
    caller gives (the next event that could touch this instance). Results equal one
    ``decide``/``observe`` pair per step exactly: the same operations in the same order.

    While a stepper runs a :class:`DecodeController`, the controller's learnt state lives here;
    :meth:`sync` writes it back (call it before using the controller elsewhere).

    Args:
        profile: the (GPU, model) pair; its supported clocks are the ones that can run.
        tp: GPUs of the instance.
        control: a :class:`DecodeController`, a fixed clock in MHz, or None: the caller decides each
            step (:attr:`NEED_DECISION`) and calls ``observe`` itself.
        idle_freq_mhz: clock asked for when the batch empties (and the one in effect at start).
        requests: the run's per-request arrays (:meth:`request_arrays`); the stepper reads lengths
            and first-token and ready times, and writes admission waits, KV blocking, finish times
            and tokens out.
        plant: how the GPUs differ from the profile.
        switch_delay_s: a clock change lands this long after it is asked for (s).
        kv_capacity_tokens: KV-cache tokens of the instance.
        max_batch_requests: cap on running requests.
        rng: the simulator's generator, used when ``plant.draws`` (shared, in event order).
    """

    def __init__(self, profile: Profile, tp: int, control: DecodeController | int | None, *, idle_freq_mhz: int,
                 requests: tuple[NDArray[np.int64], NDArray[np.float64]], plant: Plant,
                 switch_delay_s: float, kv_capacity_tokens: int, max_batch_requests: int,
                 rng: np.random.Generator | None = None) -> None:
        super().__init__(profile, "decode", tp, None if isinstance(control, DecodeController) else control,
                         idle_freq_mhz, requests, plant, switch_delay_s, rng)
        self.control = control
        self.asks = control is None
        self.pv[pm.N_COEF + st.P_KV_CAPACITY] = kv_capacity_tokens
        self.pv[pm.N_COEF + st.P_MAX_BATCH] = max_batch_requests
        cap = max(1, int(max_batch_requests))
        self.batch = np.zeros((st.N_B, cap), dtype=np.int64)
        self.first_s = np.zeros(cap)
        self.wait = np.zeros(64, dtype=np.int64)
        if isinstance(control, DecodeController):
            self.cv[st.C_MODE] = st.MODE_SLACK
            self.c_rows = np.zeros((st.N_CROWS, control.clocks_mhz.size))
            self._check_out(control)

    # ---- the controller's state while the stepper runs it ----
    _CORR = ("mu", "var", "time_factor", "power_factor", "observations", "power_observations", "triggers",
             "hold_left", "last_error", "last_model_error", "z")
    _COUNTS = ("observations", "power_observations", "triggers", "hold_left")

    def _check_out(self, ctl: DecodeController) -> None:
        cv = self.cv
        cv[st.C_KV_GUARD] = ctl.kv_guard
        cv[st.C_ONLINE] = 1.0 if ctl.online_correction else 0.0
        cv[st.C_MU:st.C_Z + 1] = [getattr(ctl.correction, a) for a in self._CORR]
        cv[st.C_DECIDED_FACTOR] = ctl._decided_factor
        cv[st.C_ALPHA] = corr.ALPHA
        cv[st.C_TRIGGER_Z] = corr.TRIGGER_Z
        cv[st.C_LOG_TOL] = math.log1p(corr.TOL)
        cv[st.C_HOLD] = corr.HOLD
        cv[st.C_LOG_LIMIT] = math.log(corr.FACTOR_LIMIT)
        cv[st.CV_PARAMS:st.CV_COEF] = ctl._params
        cv[st.CV_COEF:st.CV_MODEL_COEF] = ctl._coef
        cv[st.CV_MODEL_COEF:] = ctl._model_coef
        self.c_rows[:pm.N_TABLE_ROWS] = ctl._table
        self.c_rows[st.CR_OUT_TIME_S:st.CR_OUT_POWER_W + 1] = ctl._out
        self.c_rows[st.CR_CLOCKS] = ctl.clocks_mhz

    def sync(self) -> None:
        """Write what the controller learnt while the stepper ran it back into the controller."""
        ctl = self.control
        if not isinstance(ctl, DecodeController):
            return
        cv = self.cv
        for a, x in zip(self._CORR, cv[st.C_MU:st.C_Z + 1].tolist()):
            setattr(ctl.correction, a, int(x) if a in self._COUNTS else x)
        ctl._decided_factor = float(cv[st.C_DECIDED_FACTOR])
        ctl._params[:] = cv[st.CV_PARAMS:st.CV_COEF]
        ctl._coef[:] = cv[st.CV_COEF:st.CV_MODEL_COEF]
        ctl._out[:] = self.c_rows[st.CR_OUT_TIME_S:st.CR_OUT_POWER_W + 1]

    def _kernel(self, t_s: float, horizon_s: float, entry: int) -> tuple[int, float]:
        return st.advance(t_s, horizon_s, entry, self.si, self.sf, self.batch, self.first_s, self.wait, self.req_i,
                          self.req_f, self.pv, self.p_rows, self.p_int, self.cv, self.c_rows, self.tl_f, self.tl_i,
                          self.rng)

    def enqueue(self, request: int) -> None:
        """A request reached the instance: it joins the batch at the next step boundary it fits."""
        head, tail = int(self.si[st.S_W_HEAD]), int(self.si[st.S_W_TAIL])
        if tail == self.wait.size:  # move the live part to the front, growing when over half full
            live = self.wait[head:tail].copy()
            self.wait = self._grow(self.wait, 2 * live.size + 1) if 2 * live.size > self.wait.size else self.wait
            self.wait[:live.size] = live
            tail = live.size
            self.si[st.S_W_HEAD] = 0
        self.wait[tail] = request
        self.si[st.S_W_TAIL] = tail + 1

    def batch_views(self) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.int64], float]:
        """(first-token times s, tokens out, context tokens, KV use) of the running batch, as a
        decision sees it (views: read only)."""
        n = int(self.si[st.S_N])
        return (self.first_s[:n], self.batch[st.B_OUT_DONE, :n], self.batch[st.B_CTX, :n],
                float(self.sf[st.F_KV_UTIL]))

    @property
    def routed_tokens(self) -> int:
        """KV tokens reserved by running requests and by those on their way (the router's load)."""
        return int(self.si[st.S_ROUTED])

    def route(self, need_tokens: int) -> None:
        """A request needing ``need_tokens`` of KV was sent here (the router's load grows)."""
        self.si[st.S_ROUTED] += need_tokens
