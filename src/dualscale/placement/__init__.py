"""Coarse tier: goodput table (simulator probes), placement ILP, and the two-tier evaluation."""

from __future__ import annotations

from dualscale.placement.goodput import GoodputEntry, GoodputSettings, GoodputTable, goodput_table
from dualscale.placement.ilp import PlacementGroup, PlacementPlan, max_rate, place

__all__ = [
    "GoodputEntry",
    "GoodputSettings",
    "GoodputTable",
    "PlacementGroup",
    "PlacementPlan",
    "goodput_table",
    "max_rate",
    "place",
]
