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

from collections.abc import Sequence
from typing import Literal

import msgspec
import numpy as np
from numpy.typing import ArrayLike, NDArray

from dualscale import _validate as v
from dualscale._kernels import perf_model as pm
from dualscale._kernels import slack as sk
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
