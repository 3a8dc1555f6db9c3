"""Scenario files: the cluster, the workload and the SLOs of one simulated run (TOML, msgspec).

A scenario names a profile and a trace, how many prefill and decode instances run with which TP
degree, the SLOs, and the fine tier's settings. Built-ins live in ``configs/scenarios/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec

from dualscale.config import Control, Slo, builtin_names, check, load_named

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


Bias = Annotated[float, msgspec.Meta(gt=-1)]


class Truth(_Frozen):
    """How the simulated GPUs differ from the profile the controllers believe (``[truth]``). Every
    default is "no error", so a scenario without the table runs on the model itself.

    Applied to every iteration's real time and power: time x (1 + latency_bias of its phase), its
    slowdown below the top clock made steeper (clock_shape_error > 0) or flatter (< 0) by that
    fraction, x a lognormal noise factor of mean 1; power x (1 + power_bias of its phase). With
    ``power_cap_w`` a GPU whose power at the asked clock exceeds the cap runs at the highest clock
    that fits under it (the clock read back differs from the one asked). With ``switch_jitter``
    each TP rank's clock switch takes ``clock_switch_delay_s x U(1 - j, 1 + j)`` and the iteration
    runs at the slowest rank's pace.
    """

    latency_bias_prefill: Bias = 0.0
    latency_bias_decode: Bias = 0.0
    clock_shape_error: Bias = 0.0
    #: sigma of log(time factor) per iteration
    latency_noise: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    power_bias_prefill: Bias = 0.0
    power_bias_decode: Bias = 0.0
    #: per GPU; 0 = only the profile's own cap
    power_cap_w: NonNeg = 0.0
    switch_jitter: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.0
    seed: int = 0

    @property
    def is_model(self) -> bool:
        """True when the truth is the profile itself (every field at its default)."""
        return msgspec.structs.replace(self, seed=0) == Truth()


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
    truth: Truth = Truth()

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
