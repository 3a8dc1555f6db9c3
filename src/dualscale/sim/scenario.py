"""Scenario files: the cluster, the workload and the SLOs of one simulated run (TOML, msgspec).

A scenario names a profile and a trace, how many prefill and decode instances run with which TP
degree, the SLOs, and the fine tier's settings. Built-ins live in ``configs/scenarios/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec

from dualscale.config import builtin_names, check, load_named

Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNeg = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=1)]


class _Frozen(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class TraceSpec(_Frozen):
    """Which requests arrive: a built-in trace name, a CSV/JSONL file, or ``"gamma"`` (synthetic
    Gamma arrivals at ``rate_per_s`` with coefficient of variation ``cv`` for ``duration_s``,
    lengths drawn from the trace ``lengths``), optionally windowed and rescaled."""

    name: str = "azure-conv"
    start_s: NonNeg = 0.0
    #: 0 means up to the end of the trace
    duration_s: NonNeg = 0.0
    #: 0 means the trace's own rate
    rate_per_s: NonNeg = 0.0
    #: how a rate is reached: keep evenly spaced requests (the paper's method) or rescale time
    scaling: Literal["downsample", "time"] = "downsample"
    #: synthetic arrivals only: burstiness (the paper's Gamma workloads use CV ~1.41), length source, seed
    cv: Positive = 1.41
    lengths: str = "azure-conv"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name == "gamma":
            check(self.rate_per_s > 0, "trace.rate_per_s", self.rate_per_s, "must be > 0 for gamma arrivals")
            check(self.duration_s > 0, "trace.duration_s", self.duration_s, "must be > 0 for gamma arrivals")


class Slo(_Frozen):
    ttft_s: Positive = 0.6
    tpot_s: Positive = 0.1
    #: the percentile of TTFT and TPOT that must be within the SLO for the run to meet it
    percentile: Annotated[float, msgspec.Meta(gt=0, le=100)] = 99.0


class Pool(_Frozen):
    """Instances of one phase. ``weights``: routing weights (default: equal)."""

    tp: Count
    instances: Count
    weights: list[Positive] = []

    def __post_init__(self) -> None:
        check(not self.weights or len(self.weights) == self.instances, "weights", self.weights,
              f"needs one weight per instance ({self.instances}) or none")


class PrefillPool(Pool):
    max_batch_tokens: Count = 2048


class DecodePool(Pool):
    #: continuous-batching cap on running requests per instance (vLLM's max_num_seqs)
    max_batch_requests: Count = 256


class Cluster(_Frozen):
    gpus: Count = 16
    #: KV transfer bandwidth prefill -> decode per request, Gbit/s (one 400G InfiniBand NDR link)
    kv_link_gbps: Positive = 400.0
    #: a clock lock takes effect this long after it is asked for (NVML calls and the switch take
    #: tens of ms on H100: ../shared/docs/peers.md)
    clock_switch_delay_s: NonNeg = 0.02


class Control(_Frozen):
    """Fine-tier settings used by the ``dualscale`` policy (and the SLO margin of every policy)."""

    horizon: Count = 8
    margin: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.05
    kv_guard: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.9
    prefill_solver: Literal["qp", "exact", "greedy"] = "qp"
    decode_slack: Literal["request", "tbt"] = "request"
    #: decode clock objective: "energy" per step (DESIGN.md) or "power" (see DecodeController)
    decode_objective: Literal["energy", "power"] = "energy"


class Scenario(_Frozen, kw_only=True):
    format: Literal[1] = 1
    name: str
    description: str = ""
    profile: str = "h100-sxm-llama-3.3-70b"
    trace: TraceSpec = TraceSpec()
    slo: Slo = Slo()
    prefill: PrefillPool
    decode: DecodePool
    cluster: Cluster = Cluster()
    control: Control = Control()

    def __post_init__(self) -> None:
        used = self.prefill.tp * self.prefill.instances + self.decode.tp * self.decode.instances
        check(used <= self.cluster.gpus, "prefill/decode instances", used,
              f"use {used} GPUs, more than cluster.gpus = {self.cluster.gpus}")


def builtin_scenarios() -> list[str]:
    """Names of the scenarios shipped with dualscale."""
    return builtin_names("scenarios")


def load_scenario(name_or_path: str | Path) -> Scenario:
    """A built-in scenario by name (e.g. ``"default"``) or a scenario TOML file by path."""
    return load_named(name_or_path, Scenario, "scenarios", "scenario")
