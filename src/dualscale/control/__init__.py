"""Fine tier: per-iteration clock controllers for prefill (MPC) and decode (slack)."""

from __future__ import annotations

from dualscale.control.batching import BatchFormer
from dualscale.control.correction import Correction
from dualscale.control.decode import DecodeController, DecodeDecision, DecodePlant, DecodeStepper
from dualscale.control.factory import make_controller
from dualscale.control.prefill import PrefillController, PrefillDecision
from dualscale.control.qp import QpSettings, QpStatus

__all__ = ["BatchFormer", "Correction", "DecodeController", "DecodeDecision", "DecodePlant", "DecodeStepper",
           "PrefillController", "PrefillDecision",
           "QpSettings", "QpStatus", "make_controller"]
