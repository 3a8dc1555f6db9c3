"""Fine tier: per-iteration clock controllers for prefill (MPC) and decode (slack)."""

from __future__ import annotations

from dualscale.control.batching import BatchFormer, PrefillStepper
from dualscale.control.correction import Correction
from dualscale.control.decode import DecodeController, DecodeDecision, DecodeStepper, Plant
from dualscale.control.factory import make_controller
from dualscale.control.prefill import PrefillController, PrefillDecision
from dualscale.control.qp import QpSettings, QpStatus

__all__ = ["BatchFormer", "Correction", "DecodeController", "DecodeDecision", "DecodeStepper",
           "Plant", "PrefillController", "PrefillDecision", "PrefillStepper",
           "QpSettings", "QpStatus", "make_controller"]
