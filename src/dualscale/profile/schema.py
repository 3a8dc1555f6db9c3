"""The profile file format: latency and power of one (GPU, model) pair, as msgspec Structs.

Model (per iteration, one instance of ``tp`` GPUs, clock ``f``)::

    mem_s  = base_s + per_request_s * n + per_context_token_s * sum(context)     (memory-bound work)
    comp_s = per_token_s * (sum(tokens) + attention_pairs * attention_token_equiv)  (compute-bound)
    a, b   = mem_s * mem_slowdown(f), comp_s * comp_slowdown(f)
    time_s(f)  = sqrt(a**2 + b**2)                                                   (soft roofline)
    power_w(f) = min(cap, idle_power_w(f) + (a / time_s) * mem_power_w(f) + (b / time_s) * comp_power_w(f))

``a / time_s`` and ``b / time_s`` are the fractions of the iteration the memory system and the
tensor cores are busy (each <= 1; they overlap, so their sum lies in [1, sqrt(2)]), and
``mem_power_w``/``comp_power_w`` the power each draws above idle while busy: the energy of an
iteration is idle power x time plus each unit's busy power x its busy time. Format 1 weighted
the curves by the squared shares ``(a / time_s)**2`` instead; its curves do not carry over.

The clock-dependent curves live in :class:`ClockResponse`, apart from the batch-dependent
coefficients, so a sweep on real hardware can replace them without refitting the rest. The busy
power curves are per phase and apply to every TP degree, unless ``[[clock_response.power_by_tp]]``
gives a TP degree curves of its own (:class:`TpPower`). Slowdowns are interpolated linearly in
1/f (time of clock-bound work scales with 1/f), power curves linearly in f.
"""

from __future__ import annotations

import math
from typing import Annotated

import msgspec
import tomli_w

from dualscale.config import check

Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNeg = Annotated[float, msgspec.Meta(ge=0)]
#: Busy power above idle of one GPU, W: at least 0 (and finite, checked after decoding).
PowerW = Annotated[float, msgspec.Meta(ge=0)]
Source = Annotated[str, msgspec.Meta(min_length=3)]
TP_DEGREES = (1, 2, 4, 8, 16)
#: Version of the profile file format this code reads (see the module docstring).
FORMAT = 2
POWER_CURVES = ("prefill_mem_power_w", "prefill_comp_power_w", "decode_mem_power_w", "decode_comp_power_w")


class _Frozen(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class Gpu(_Frozen, omit_defaults=True):
    name: str
    memory_bytes: Annotated[int, msgspec.Meta(gt=0)]
    usable_memory_bytes: Annotated[int, msgspec.Meta(gt=0)]
    power_cap_w: Positive
    clock_min_mhz: Annotated[int, msgspec.Meta(gt=0)]
    clock_max_mhz: Annotated[int, msgspec.Meta(gt=0)]
    clock_step_mhz: Annotated[int, msgspec.Meta(gt=0)]
    source: Source
    #: Datasheet HBM bandwidth, bytes/s; 0 = not given. Only `profile derive` reads it (to split a
    #: step's fixed time into weight streaming and per-layer overhead).
    memory_bandwidth_bytes_per_s: Annotated[int, msgspec.Meta(ge=0)] = 0

    def __post_init__(self) -> None:
        check(self.clock_max_mhz > self.clock_min_mhz, "gpu.clock_max_mhz", self.clock_max_mhz,
              f"must exceed gpu.clock_min_mhz = {self.clock_min_mhz}")
        span = self.clock_max_mhz - self.clock_min_mhz
        check(span % self.clock_step_mhz == 0, "gpu.clock_step_mhz", self.clock_step_mhz,
              f"must divide clock_max_mhz - clock_min_mhz = {span}")
        check(self.usable_memory_bytes <= self.memory_bytes, "gpu.usable_memory_bytes",
              self.usable_memory_bytes, f"must be <= gpu.memory_bytes = {self.memory_bytes}")


class Model(_Frozen, omit_defaults=True):
    name: str
    layers: Annotated[int, msgspec.Meta(gt=0)]
    hidden_size: Annotated[int, msgspec.Meta(gt=0)]
    kv_heads: Annotated[int, msgspec.Meta(gt=0)]
    head_dim: Annotated[int, msgspec.Meta(gt=0)]
    params: Annotated[int, msgspec.Meta(gt=0)]
    bytes_per_param: Annotated[int, msgspec.Meta(gt=0)]
    kv_block_tokens: Annotated[int, msgspec.Meta(gt=0)]
    source: Source
    #: Linear-layer token-equivalents of one (query, key) attention pair, when the geometry formula
    #: of :attr:`attention_token_equiv` does not hold (heads x head_dim != hidden size, embeddings
    #: counted in ``params``): `profile derive` sets it from the full geometry. 0 = the formula.
    attention_pair_token_equiv: NonNeg = 0.0

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer and KV head, all TP shards together."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_param

    @property
    def weight_bytes(self) -> int:
        return self.params * self.bytes_per_param

    @property
    def attention_token_equiv(self) -> float:
        """Linear-layer token-equivalents of one (query, key) attention pair: 4*d*L / (2*params) FLOPs
        (or ``attention_pair_token_equiv`` when given)."""
        if self.attention_pair_token_equiv > 0:
            return self.attention_pair_token_equiv
        return 4.0 * self.hidden_size * self.layers / (2.0 * self.params)


def _check_curves(owner: object, prefix: str, names: tuple[str, ...], n_knots: int) -> None:
    for name in names:
        v = getattr(owner, name)
        check(len(v) == n_knots, f"{prefix}.{name}", f"{len(v)} values", f"must have one value per knot ({n_knots})")
        bad = [x for x in v if not math.isfinite(x)]
        check(not bad, f"{prefix}.{name}", bad[0] if bad else None, "must be finite")


class TpPower(_Frozen):
    """Busy power curves (W per GPU, at ``clock_response.knots_mhz``) of one TP degree.

    They replace the shared curves of :class:`ClockResponse` for that TP degree only: the work
    per GPU, and so its power, changes with the number of GPUs the model is split over.
    """

    tp: Annotated[int, msgspec.Meta(gt=0)]
    prefill_mem_power_w: list[PowerW]
    prefill_comp_power_w: list[PowerW]
    decode_mem_power_w: list[PowerW]
    decode_comp_power_w: list[PowerW]
    source: Source

    def __post_init__(self) -> None:
        check(self.tp in TP_DEGREES, "clock_response.power_by_tp.tp", self.tp, f"must be one of {TP_DEGREES}")


class ClockResponse(_Frozen):
    """Clock-dependent curves at knots (ascending MHz), normalised to 1 at ``reference_mhz``.

    The four busy power curves apply to every TP degree without an entry in ``power_by_tp``.
    """

    knots_mhz: list[Positive]
    reference_mhz: Positive
    mem_slowdown: list[Positive]
    comp_slowdown: list[Positive]
    idle_power_w: list[NonNeg]
    prefill_mem_power_w: list[PowerW]
    prefill_comp_power_w: list[PowerW]
    decode_mem_power_w: list[PowerW]
    decode_comp_power_w: list[PowerW]
    source: Source
    power_by_tp: list[TpPower] = []

    def __post_init__(self) -> None:
        k = self.knots_mhz
        check(len(k) >= 2, "clock_response.knots_mhz", k, "needs at least 2 knots")
        check(all(a < b for a, b in zip(k, k[1:])), "clock_response.knots_mhz", k, "must be strictly ascending")
        check(self.reference_mhz in k, "clock_response.reference_mhz", self.reference_mhz,
              "must be one of clock_response.knots_mhz")
        _check_curves(self, "clock_response", ("mem_slowdown", "comp_slowdown", "idle_power_w", *POWER_CURVES), len(k))
        tps = [p.tp for p in self.power_by_tp]
        check(len(set(tps)) == len(tps), "clock_response.power_by_tp", tps, "TP degrees must be unique")
        for i, p in enumerate(self.power_by_tp):
            _check_curves(p, f"clock_response.power_by_tp[{i}]", POWER_CURVES, len(k))

    def power_curves(self, tp: int) -> TpPower | ClockResponse:
        """The object holding the busy power curves of ``tp``: its override, else the shared curves."""
        return next((p for p in self.power_by_tp if p.tp == tp), self)


class Coefficients(_Frozen):
    """Batch-dependent work of one phase at one TP degree, in seconds at the reference clock."""

    tp: Annotated[int, msgspec.Meta(gt=0)]
    base_s: NonNeg
    per_request_s: NonNeg
    per_context_token_s: NonNeg
    per_token_s: NonNeg
    source: Source

    def __post_init__(self) -> None:
        check(self.tp in TP_DEGREES, "latency.*.tp", self.tp, f"must be one of {TP_DEGREES}")


class Latency(_Frozen):
    prefill: list[Coefficients]
    decode: list[Coefficients]
    source: Source

    def __post_init__(self) -> None:
        for phase in ("prefill", "decode"):
            tps = [c.tp for c in getattr(self, phase)]
            check(len(tps) > 0, f"latency.{phase}", tps, "needs at least one TP degree")
            check(len(set(tps)) == len(tps), f"latency.{phase}", tps, "TP degrees must be unique")
        check({c.tp for c in self.prefill} == {c.tp for c in self.decode}, "latency.decode",
              sorted(c.tp for c in self.decode),
              f"must cover the same TP degrees as latency.prefill {sorted(c.tp for c in self.prefill)}")


class ProfileConfig(_Frozen):
    """One (GPU, model) profile file. Every section carries ``source``: dataset, fit or assumption."""

    format: Annotated[int, msgspec.Meta(ge=1)]
    name: str
    description: str
    gpu: Gpu
    model: Model
    clock_response: ClockResponse
    latency: Latency

    def __post_init__(self) -> None:
        check(self.format == FORMAT, "format", self.format,
              f"must be {FORMAT}, the format this version reads (format 1 weighted busy power by the squared work "
              "shares, so its power curves do not carry over: refit with `dualscale profile fit`)")
        k = self.clock_response.knots_mhz
        check(k[0] <= self.gpu.clock_min_mhz and k[-1] >= self.gpu.clock_max_mhz,
              "clock_response.knots_mhz", [k[0], k[-1]],
              f"must span the GPU clock range [{self.gpu.clock_min_mhz}, {self.gpu.clock_max_mhz}] MHz")
        tps = sorted(c.tp for c in self.latency.prefill)
        for i, p in enumerate(self.clock_response.power_by_tp):
            check(p.tp in tps, f"clock_response.power_by_tp[{i}].tp", p.tp,
                  f"must be one of the profile's TP degrees {tps} (latency.prefill)")


def dump_toml(cfg: ProfileConfig, header: str) -> bytes:
    """The profile file: ``header`` (comment lines saying what wrote it) and the TOML of ``cfg``."""
    return header.encode() + tomli_w.dumps(msgspec.to_builtins(cfg)).encode()
