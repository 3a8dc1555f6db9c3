"""The one way to build a fine-tier controller from settings: the simulator, the controller daemon
and the emulator all call :func:`make_controller`, so a ``[control]`` field means the same
everywhere (tests/test_factory.py checks each field through the daemon)."""

from __future__ import annotations

from typing import Literal

from dualscale.config import Control, Slo
from dualscale.control.decode import DecodeController
from dualscale.control.prefill import PrefillController
from dualscale.profile import Profile


def make_controller(profile: Profile, control: Control, slo: Slo, *, phase: Literal["prefill", "decode"], tp: int,
                    max_batch_tokens: int = 2048) -> PrefillController | DecodeController:
    """A controller for one instance.

    Args:
        profile: latency and power model of the (GPU, model) pair.
        control: fine-tier settings (``[control]``).
        slo: latency targets (``[slo]``).
        phase: ``"prefill"`` or ``"decode"``.
        tp: the instance's tensor-parallel degree.
        max_batch_tokens: prefill only: the engine's chunking budget (tokens per batch).
    """
    if phase == "prefill":
        return PrefillController(profile, tp=tp, ttft_slo_s=slo.ttft_s, horizon=control.horizon,
                                 max_batch_tokens=max_batch_tokens, margin=control.margin, kv_guard=control.kv_guard,
                                 solver=control.prefill_solver, online_correction=control.online_correction,
                                 switch_delay_s=control.switch_delay_s)
    if phase == "decode":
        return DecodeController(profile, tp=tp, tpot_slo_s=slo.tpot_s, margin=control.margin,
                                kv_guard=control.kv_guard, slack=control.decode_slack,
                                objective=control.decode_objective, online_correction=control.online_correction)
    raise ValueError(f"phase = {phase!r}: must be 'prefill' or 'decode'")
