"""Fine tier: per-iteration clock controllers for prefill (MPC) and decode (slack)."""

from __future__ import annotations

from dualscale.control.decode import DecodeController, DecodeDecision
from dualscale.control.prefill import PrefillController, PrefillDecision
from dualscale.control.qp import QpSettings, QpStatus

__all__ = ["DecodeController", "DecodeDecision", "PrefillController", "PrefillDecision", "QpSettings", "QpStatus"]
