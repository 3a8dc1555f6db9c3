"""Clock policies the simulator compares, behind one interface.

A :class:`Policy` makes one controller per instance (controllers hold state: the QP's warm start,
a feedback rule's level, the online correction). Before every iteration the simulator asks the
instance's controller for a clock, showing it what a real engine would: the waiting queue
(prefill) or the running batch (decode), and the KV-cache use; after it, what was measured (the
iteration's time, the clock in effect, the power). The fine-tier controllers are built by
:func:`dualscale.control.make_controller`, as the daemon builds them.

``distserve``        every GPU at the top clock, always (the paper's baseline)
``static:<MHz>``     one fixed clock
``dualscale``        prefill MPC (:class:`~dualscale.PrefillController`) + decode slack control
``lowest-feasible``  per iteration, the lowest clock meeting the SLO for the batch about to run,
                     no horizon (throttLL'eM-style): the prefill controller's ``lowest`` solver,
                     and the decode controller on the per-step target at least power
``rules``            feedback rules on observed slack with hysteresis (VoltanaLLM-style, our reading)
``baseline``         each instance locked at its baseline clock from a placement (PlaceOnly)

An offline ``oracle`` is deferred: a bound that holds for every policy would have to optimise
batching and clocks jointly over the whole trace (queueing couples every decision), which no
tractable relaxation we know of bounds tightly; a loose bound (every batch at its cheapest clock,
SLOs ignored) would mislead more than inform.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import msgspec
import numpy as np
from numpy.typing import NDArray

from dualscale.control import DecodeController, PrefillController, make_controller
from dualscale.profile import Profile
from dualscale.sim.scenario import Scenario

#: The authors' colocated prototype's 10 candidate clocks on H100 (paper-notes.md), used by ``rules``.
RULE_CLOCKS_MHZ = (345, 525, 705, 885, 1065, 1260, 1440, 1620, 1800, 1980)


class _Observer:
    def observe(self, iteration_s: float, freq_mhz: int, power_w: float) -> None:
        """What the iteration just decided on measured: its time (s), the clock in effect while it
        ran as read back (MHz; 0 when it changed during the iteration) and its power per GPU (W)."""

    def learnt(self) -> tuple[float, int]:
        """(measured / model time as learnt, iterations it was learnt from): (1, 0) for controls
        that do not learn."""
        return 1.0, 0


class PrefillControl(_Observer, ABC):
    """Clock choice of one prefill instance."""

    idle_mhz: int

    def stepping(self) -> int | None:
        """A fixed clock (MHz) the simulator's compiled batches can run in place of :meth:`clock`
        and :meth:`observe`, or None (ask every batch)."""
        return None

    @abstractmethod
    def clock(self, now_s: float, arrival_s: NDArray[np.float64], prompt_tokens: NDArray[np.int64],
              prefilled_tokens: NDArray[np.int64], kv_util: float) -> int:
        """Clock (MHz) for the batch about to run from this FCFS queue."""


class DecodeControl(_Observer, ABC):
    """Clock choice of one decode instance."""

    idle_mhz: int

    def stepping(self) -> DecodeController | int | None:
        """What the simulator's compiled steps can run in place of :meth:`clock` and
        :meth:`observe`: a fine-tier controller, a fixed clock (MHz), or None (ask every step)."""
        return None

    @abstractmethod
    def clock(self, now_s: float, first_token_s: NDArray[np.float64], tokens_out: NDArray[np.int64],
              context_tokens: NDArray[np.int64], kv_util: float) -> int:
        """Clock (MHz) for the step about to run for this batch."""


class Policy(ABC):
    """Builds the per-instance controls of one policy."""

    name: str

    def __init__(self, profile: Profile, scenario: Scenario) -> None:
        self.profile = profile
        self.scenario = scenario

    @abstractmethod
    def prefill(self, tp: int, base_mhz: int | None = None) -> PrefillControl:
        """Control of one prefill instance; ``base_mhz`` is its baseline clock from a placement."""

    @abstractmethod
    def decode(self, tp: int, base_mhz: int | None = None) -> DecodeControl:
        """Control of one decode instance; ``base_mhz`` is its baseline clock from a placement."""


# ---- fixed clocks ----------------------------------------------------------------------------
class _Fixed(PrefillControl, DecodeControl):
    def __init__(self, freq_mhz: int) -> None:
        self.idle_mhz = freq_mhz
        self._f = freq_mhz

    def clock(self, *args: object) -> int:
        return self._f

    def stepping(self) -> int:
        return self._f


class Static(Policy):
    """Every GPU locked at one clock, busy or idle. ``distserve`` is the top clock."""

    def __init__(self, profile: Profile, scenario: Scenario, freq_mhz: int, name: str) -> None:
        super().__init__(profile, scenario)
        if freq_mhz not in profile.clocks_mhz:
            raise ValueError(f"policy {name!r}: {freq_mhz} MHz is not a supported clock of profile "
                             f"{profile.name!r} ({profile.clocks_mhz[0]}..{profile.clocks_mhz[-1]} MHz in steps of "
                             f"{profile.config.gpu.clock_step_mhz})")
        self.freq_mhz = freq_mhz
        self.name = name

    def prefill(self, tp: int, base_mhz: int | None = None) -> PrefillControl:
        return _Fixed(self.freq_mhz)

    def decode(self, tp: int, base_mhz: int | None = None) -> DecodeControl:
        return _Fixed(self.freq_mhz)


# ---- fine-tier controllers (dualscale, lowest-feasible) -----------------------------------------
class _Controller:
    """A fine-tier controller behind the simulator's interface: its idle clock, and the feedback."""

    def __init__(self, ctl: PrefillController | DecodeController) -> None:
        self.ctl = ctl
        self.idle_mhz = ctl.idle_freq_mhz

    def observe(self, iteration_s: float, freq_mhz: int, power_w: float) -> None:
        self.ctl.observe(iteration_s, freq_mhz, power_w)

    def learnt(self) -> tuple[float, int]:
        c = self.ctl.correction
        return c.mean_time_factor, c.observations


class _MpcPrefill(_Controller, PrefillControl):
    def clock(self, now_s, arrival_s, prompt_tokens, prefilled_tokens, kv_util):  # type: ignore[no-untyped-def]
        return self.ctl.decide(now_s, arrival_s, prompt_tokens, prefilled_tokens, kv_util).freq_mhz


class _SlackDecode(_Controller, DecodeControl):
    ctl: DecodeController

    def clock(self, now_s, first_token_s, tokens_out, context_tokens, kv_util):  # type: ignore[no-untyped-def]
        return self.ctl.decide(now_s, first_token_s, tokens_out, context_tokens, kv_util).freq_mhz

    def stepping(self) -> DecodeController:
        return self.ctl


class _FineTier(Policy):
    """Controllers from :func:`make_controller` with the scenario's SLOs and ``[control]``
    settings, after ``overrides`` (fields of ``Control``)."""

    overrides: dict[str, object] = {}

    def prefill(self, tp: int, base_mhz: int | None = None) -> PrefillControl:
        s = self.scenario
        ctl = make_controller(self.profile, msgspec.structs.replace(s.control, **self.overrides), s.slo,
                              phase="prefill", tp=tp, max_batch_tokens=s.prefill.max_batch_tokens)
        assert isinstance(ctl, PrefillController)  # internal: make_controller's contract
        return _MpcPrefill(ctl)

    def decode(self, tp: int, base_mhz: int | None = None) -> DecodeControl:
        s = self.scenario
        ctl = make_controller(self.profile, msgspec.structs.replace(s.control, **self.overrides), s.slo,
                              phase="decode", tp=tp)
        assert isinstance(ctl, DecodeController)  # internal: make_controller's contract
        return _SlackDecode(ctl)


class DualScale(_FineTier):
    """Prefill MPC + decode slack control with the scenario's SLOs and fine-tier settings."""

    name = "dualscale"


class LowestFeasible(_FineTier):
    """Per iteration the lowest clock meeting the SLO for the batch about to run, no horizon:
    prefill on the next batch's deadlines, decode on the per-step TPOT target (the paper's rule)."""

    name = "lowest-feasible"
    overrides = {"prefill_solver": "lowest", "decode_slack": "tbt", "decode_objective": "power"}


# ---- feedback rules (VoltanaLLM-style) ---------------------------------------------------------
class _RulesPrefill(PrefillControl):
    """Raise the clock two levels when the queue's least TTFT slack falls under half the SLO, lower
    it one level when it exceeds 80 % of the SLO and the queue fits in one batch."""

    def __init__(self, scenario: Scenario, clocks: tuple[int, ...]) -> None:
        self.clocks = clocks
        self.level = len(clocks) - 1
        self.idle_mhz = clocks[0]
        self.slo_s = scenario.slo.ttft_s
        self.kv_guard = scenario.control.kv_guard
        self.max_batch_tokens = scenario.prefill.max_batch_tokens

    def clock(self, now_s, arrival_s, prompt_tokens, prefilled_tokens, kv_util):  # type: ignore[no-untyped-def]
        top = len(self.clocks) - 1
        if kv_util >= self.kv_guard:
            self.level = top
            return self.clocks[top]
        slack_s = float(arrival_s[0]) + self.slo_s - now_s  # the head waited longest
        if slack_s < 0.5 * self.slo_s:
            self.level = min(top, self.level + 2)
        elif slack_s > 0.8 * self.slo_s and int((prompt_tokens - prefilled_tokens).sum()) <= self.max_batch_tokens:
            self.level = max(0, self.level - 1)
        return self.clocks[self.level]


class _RulesDecode(DecodeControl):
    """Raise the clock one level when the last step took over 90 % of the per-step TPOT target,
    lower it one level under 60 % (hysteresis band between)."""

    def __init__(self, scenario: Scenario, clocks: tuple[int, ...]) -> None:
        self.clocks = clocks
        self.level = len(clocks) - 1
        self.idle_mhz = clocks[0]
        self.target_s = (1 - scenario.control.margin) * scenario.slo.tpot_s
        self.kv_guard = scenario.control.kv_guard

    def clock(self, now_s, first_token_s, tokens_out, context_tokens, kv_util):  # type: ignore[no-untyped-def]
        if kv_util >= self.kv_guard:
            self.level = len(self.clocks) - 1
        return self.clocks[self.level]

    def observe(self, iteration_s: float, freq_mhz: int, power_w: float) -> None:
        if iteration_s > 0.9 * self.target_s:
            self.level = min(len(self.clocks) - 1, self.level + 1)
        elif iteration_s < 0.6 * self.target_s:
            self.level = max(0, self.level - 1)


class Rules(Policy):
    name = "rules"

    def __init__(self, profile: Profile, scenario: Scenario) -> None:
        super().__init__(profile, scenario)
        grid = profile.clocks_mhz
        # another GPU: ten levels spread over its grid, the lowest and the top clock included
        spread = tuple(int(grid[i]) for i in sorted(set(np.linspace(0, grid.size - 1, 10).round().astype(int))))
        self.clocks = tuple(f for f in RULE_CLOCKS_MHZ if f in grid) or spread

    def prefill(self, tp: int, base_mhz: int | None = None) -> PrefillControl:
        return _RulesPrefill(self.scenario, self.clocks)

    def decode(self, tp: int, base_mhz: int | None = None) -> DecodeControl:
        return _RulesDecode(self.scenario, self.clocks)


class Baseline(Policy):
    """Every instance locked at its baseline clock from the placement (the paper's PlaceOnly); the
    top clock for instances without one."""

    name = "baseline"

    def prefill(self, tp: int, base_mhz: int | None = None) -> PrefillControl:
        return _Fixed(int(base_mhz if base_mhz is not None else self.profile.clocks_mhz[-1]))

    def decode(self, tp: int, base_mhz: int | None = None) -> DecodeControl:
        return _Fixed(int(base_mhz if base_mhz is not None else self.profile.clocks_mhz[-1]))


POLICIES = ("distserve", "static:<MHz>", "baseline", "dualscale", "lowest-feasible", "rules")


def make_policy(spec: str, profile: Profile, scenario: Scenario) -> Policy:
    """The policy named by ``spec`` (one of :data:`POLICIES`)."""
    if spec == "distserve":
        return Static(profile, scenario, int(profile.clocks_mhz[-1]), "distserve")
    if spec.startswith("static:"):
        try:
            f = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"policy {spec!r}: expected static:<MHz> with a whole number of MHz") from None
        return Static(profile, scenario, f, spec)
    if spec == "dualscale":
        return DualScale(profile, scenario)
    if spec == "lowest-feasible":
        return LowestFeasible(profile, scenario)
    if spec == "rules":
        return Rules(profile, scenario)
    if spec == "baseline":
        return Baseline(profile, scenario)
    if spec == "oracle":
        raise ValueError("policy 'oracle' is deferred: see dualscale.sim.policies for why")
    raise ValueError(f"policy {spec!r}: must be one of {', '.join(POLICIES)}")
