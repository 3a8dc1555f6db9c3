"""Profile: latency and power of one (GPU, model) pair as functions of the batch and the SM clock.

Everything above this module (controllers, simulator, placement) asks the profile; nothing reads
the profile file directly. Curves from the file are expanded once, at load, onto the GPU's full
supported clock grid, so a decision evaluates a batch on every clock with one kernel call.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import msgspec
import numpy as np
from numpy.typing import ArrayLike, NDArray

from dualscale._kernels import perf_model as pm
from dualscale._validate import token_array
from dualscale.config import builtin_names, load_named
from dualscale.profile.schema import ClockResponse, Coefficients, ProfileConfig

Phase = Literal["prefill", "decode"]
PHASES: tuple[Phase, ...] = ("prefill", "decode")
FloatOrArray = float | NDArray[np.float64]


def builtin_profiles() -> list[str]:
    """Names of the profiles shipped with dualscale."""
    return builtin_names("profiles")


def interp_curves(cr: ClockResponse, freq_mhz: NDArray[np.float64], phase: Phase, tp: int) -> NDArray[np.float64]:
    """The (5, F) clock table of ``phase`` at ``tp`` at ``freq_mhz``: slowdowns linear in 1/f, powers linear in f.

    The busy power rows come from ``tp``'s entry in ``cr.power_by_tp`` if it has one, else from
    the shared curves.
    """
    knots = np.asarray(cr.knots_mhz, dtype=np.float64)
    table = np.empty((pm.N_TABLE_ROWS, len(freq_mhz)))
    # np.interp needs ascending x: 1/f descends with f, so reverse both.
    inv = 1.0 / freq_mhz
    table[pm.T_MEM_SLOWDOWN] = np.interp(inv, 1.0 / knots[::-1], np.asarray(cr.mem_slowdown)[::-1])
    table[pm.T_COMP_SLOWDOWN] = np.interp(inv, 1.0 / knots[::-1], np.asarray(cr.comp_slowdown)[::-1])
    table[pm.T_IDLE_W] = np.interp(freq_mhz, knots, cr.idle_power_w)
    curves = cr.power_curves(tp)
    mem_w = curves.prefill_mem_power_w if phase == "prefill" else curves.decode_mem_power_w
    comp_w = curves.prefill_comp_power_w if phase == "prefill" else curves.decode_comp_power_w
    table[pm.T_MEM_POWER_W] = np.interp(freq_mhz, knots, mem_w)
    table[pm.T_COMP_POWER_W] = np.interp(freq_mhz, knots, comp_w)
    return table


class GridEvaluator:
    """Time and power of batches of one (phase, TP) on every supported clock, with no input checks:
    the fast path for a simulator that builds its batches itself (``Profile.evaluator``).

    ``prefill``/``decode`` write into and return one (2, F) array (reused across calls): row
    :attr:`TIME_S` is seconds, row :attr:`POWER_W` is W per GPU, column k is ``clocks_mhz[k]``.
    Token arrays must be int64 and >= 1 (chunks, contexts) or >= 0 (prefixes).
    """

    TIME_S = pm.O_TIME_S
    POWER_W = pm.O_POWER_W

    def __init__(self, profile: Profile, phase: Phase, tp: int) -> None:
        self.clocks_mhz = profile.clocks_mhz
        self._coef = profile.coefficients(phase, tp)
        self._table = profile.clock_table(phase, tp)
        self.out = np.empty((2, self.clocks_mhz.size))

    def prefill(self, chunk_tokens: NDArray[np.int64], prefix_tokens: NDArray[np.int64]) -> NDArray[np.float64]:
        pm.prefill_grid(chunk_tokens, prefix_tokens, self._coef, self._table, self.out)
        return self.out

    def decode(self, context_tokens: NDArray[np.int64]) -> NDArray[np.float64]:
        pm.decode_grid(context_tokens, self._coef, self._table, self.out)
        return self.out


class Profile:
    """Latency and power model of one (GPU, model) pair. Load with :meth:`Profile.load`.

    Token arguments are integer arrays with one entry per request of the batch. ``freq_mhz`` is
    a scalar (the result is a float) or a 1-D array of clocks (the result is an array over
    clocks). Power is per GPU, in W; times are in seconds.
    """

    def __init__(self, config: ProfileConfig, origin: str = "<memory>") -> None:
        self.config = config
        self.origin = origin
        g = config.gpu
        self.clocks_mhz: NDArray[np.int64] = np.arange(
            g.clock_min_mhz, g.clock_max_mhz + 1, g.clock_step_mhz, dtype=np.int64
        )
        self.clocks_mhz.setflags(write=False)
        self.tp_degrees: tuple[int, ...] = tuple(sorted(c.tp for c in config.latency.prefill))
        self._coef: dict[tuple[Phase, int], NDArray[np.float64]] = {}
        for phase in PHASES:
            for c in getattr(config.latency, phase):
                v = np.zeros(pm.N_COEF)
                v[pm.C_BASE_S] = c.base_s
                v[pm.C_PER_REQUEST_S] = c.per_request_s
                v[pm.C_PER_CONTEXT_TOKEN_S] = c.per_context_token_s
                v[pm.C_PER_TOKEN_S] = c.per_token_s
                v[pm.C_ATTN_TOKEN_EQUIV] = config.model.attention_token_equiv
                v[pm.C_POWER_CAP_W] = g.power_cap_w
                v[pm.C_TP] = c.tp
                v.setflags(write=False)
                self._coef[(phase, c.tp)] = v
        grid = self.clocks_mhz.astype(np.float64)
        self._grid_tables = {(ph, tp): interp_curves(config.clock_response, grid, ph, tp)
                             for ph in PHASES for tp in self.tp_degrees}
        for t in self._grid_tables.values():
            t.setflags(write=False)

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str | Path) -> Profile:
        """Load a built-in profile by name (e.g. ``"h100-sxm-llama-3.3-70b"``) or a TOML file by path."""
        return cls(load_named(name_or_path, ProfileConfig, "profiles", "profile"), str(name_or_path))

    def with_latency_factors(self, *, prefill: float = 1.0, decode: float = 1.0) -> Profile:
        """This profile with every iteration time of a phase multiplied by its factor, power unchanged:
        what the online correction learnt (``Correction.mean_time_factor``) applied to the model, so
        the coarse tier can plan on it. Time is homogeneous of degree one in the four time
        coefficients (the soft roofline of two sums of them), so scaling them scales every time
        exactly, as the controllers' correction does."""
        for name, f in (("prefill", prefill), ("decode", decode)):
            if not (isinstance(f, (int, float)) and math.isfinite(f) and f > 0):
                raise ValueError(f"{name} = {f!r}: a latency factor must be finite and > 0")
        if prefill == 1.0 and decode == 1.0:
            return self

        def scaled(c: Coefficients, f: float) -> Coefficients:
            if f == 1.0:
                return c
            return msgspec.structs.replace(
                c, base_s=c.base_s * f, per_request_s=c.per_request_s * f,
                per_context_token_s=c.per_context_token_s * f, per_token_s=c.per_token_s * f,
                source=f"{c.source}; times x {f:.4g} (learnt online)")

        lat = self.config.latency
        lat = msgspec.structs.replace(lat, prefill=[scaled(c, prefill) for c in lat.prefill],
                                      decode=[scaled(c, decode) for c in lat.decode])
        return Profile(msgspec.structs.replace(self.config, latency=lat),
                       f"{self.origin} (latency x {prefill:.4g} prefill, x {decode:.4g} decode)")

    @property
    def name(self) -> str:
        return self.config.name

    def __repr__(self) -> str:
        return f"Profile({self.name!r}, tp={self.tp_degrees}, clocks={self.clocks_mhz[0]}..{self.clocks_mhz[-1]} MHz)"

    # ---- memory --------------------------------------------------------------------------
    def kv_capacity_tokens(self, tp: int) -> int:
        """KV-cache tokens an instance of ``tp`` GPUs holds, rounded down to whole KV blocks."""
        self._check_tp(tp)
        m, g = self.config.model, self.config.gpu
        free = tp * g.usable_memory_bytes - m.weight_bytes
        tokens = max(0, free) // m.kv_bytes_per_token
        return int(tokens // m.kv_block_tokens * m.kv_block_tokens)

    # ---- validation helpers ----------------------------------------------------------------
    def _check_tp(self, tp: int) -> None:
        if tp not in self.tp_degrees:
            raise ValueError(f"tp = {tp!r}: this profile covers tp in {self.tp_degrees}")

    def _freqs(self, freq_mhz: ArrayLike) -> tuple[NDArray[np.float64], bool]:
        f = np.asarray(freq_mhz, dtype=np.float64)
        if f.ndim > 1:
            raise ValueError(f"freq_mhz: expected a scalar or 1-D array, got shape {f.shape}")
        lo, hi = self.clocks_mhz[0], self.clocks_mhz[-1]
        if not np.all(np.isfinite(f)) or np.any(f < lo) or np.any(f > hi):
            bad = f[~(np.isfinite(f) & (f >= lo) & (f <= hi))].ravel()[0].item()
            raise ValueError(f"freq_mhz = {bad!r}: must be finite and within [{lo}, {hi}] MHz")
        return np.atleast_1d(f), f.ndim == 0

    def clock_table(self, phase: Phase, tp: int, freq_mhz: ArrayLike | None = None) -> NDArray[np.float64]:
        """The (5, F) per-clock table the kernels take for ``phase`` at ``tp``, at ``freq_mhz``
        (default: the full grid, read-only). Power curves may differ per TP degree
        (``[[clock_response.power_by_tp]]``)."""
        if phase not in PHASES:
            raise ValueError(f"phase = {phase!r}: must be one of {PHASES}")
        self._check_tp(tp)
        if freq_mhz is None:
            return self._grid_tables[(phase, tp)]
        f, _ = self._freqs(freq_mhz)
        idx = (f - self.clocks_mhz[0]) / self.config.gpu.clock_step_mhz
        if np.all(idx == np.round(idx)):
            return np.ascontiguousarray(self._grid_tables[(phase, tp)][:, idx.astype(np.int64)])
        return interp_curves(self.config.clock_response, f, phase, tp)

    def evaluator(self, phase: Phase, tp: int) -> GridEvaluator:
        """A :class:`GridEvaluator` of ``phase`` at ``tp`` (the unchecked fast path)."""
        if phase not in PHASES:
            raise ValueError(f"phase = {phase!r}: must be one of {PHASES}")
        self._check_tp(tp)
        return GridEvaluator(self, phase, tp)

    def coefficients(self, phase: Phase, tp: int) -> NDArray[np.float64]:
        """The kernel coefficient vector of ``phase`` at ``tp`` (read-only)."""
        self._check_tp(tp)
        return self._coef[(phase, tp)]

    # ---- evaluation ----------------------------------------------------------------------
    def prefill(self, tp: int, chunk_tokens: ArrayLike, freq_mhz: ArrayLike,
                prefix_tokens: ArrayLike | None = None) -> tuple[FloatOrArray, FloatOrArray]:
        """(time_s, power_w per GPU) of one prefill batch at ``freq_mhz``."""
        self._check_tp(tp)
        chunks = token_array("chunk_tokens", chunk_tokens, 1)
        if prefix_tokens is None:
            prefix = np.zeros_like(chunks)
        else:
            prefix = token_array("prefix_tokens", prefix_tokens, 0)
            if prefix.shape != chunks.shape:
                raise ValueError(
                    f"prefix_tokens: length {prefix.size} does not match chunk_tokens length {chunks.size}"
                )
        f, scalar = self._freqs(freq_mhz)
        out = np.empty((2, f.size))
        pm.prefill_grid(chunks, prefix, self._coef[("prefill", tp)], self.clock_table("prefill", tp, f), out)
        return self._result(out, scalar)

    def decode(self, tp: int, context_tokens: ArrayLike, freq_mhz: ArrayLike) -> tuple[FloatOrArray, FloatOrArray]:
        """(time_s, power_w per GPU) of one decode step of the batch at ``freq_mhz``."""
        self._check_tp(tp)
        ctx = token_array("context_tokens", context_tokens, 1)
        f, scalar = self._freqs(freq_mhz)
        out = np.empty((2, f.size))
        pm.decode_grid(ctx, self._coef[("decode", tp)], self.clock_table("decode", tp, f), out)
        return self._result(out, scalar)

    @staticmethod
    def _result(out: NDArray[np.float64], scalar: bool) -> tuple[FloatOrArray, FloatOrArray]:
        if scalar:
            return float(out[0, 0]), float(out[1, 0])
        return out[0], out[1]

    def prefill_time_s(self, tp: int, chunk_tokens: ArrayLike, freq_mhz: ArrayLike,
                       prefix_tokens: ArrayLike | None = None) -> FloatOrArray:
        """Seconds one prefill iteration takes (see :meth:`prefill`)."""
        return self.prefill(tp, chunk_tokens, freq_mhz, prefix_tokens)[0]

    def prefill_power_w(self, tp: int, chunk_tokens: ArrayLike, freq_mhz: ArrayLike,
                        prefix_tokens: ArrayLike | None = None) -> FloatOrArray:
        """Average power per GPU (W) during one prefill iteration (see :meth:`prefill`)."""
        return self.prefill(tp, chunk_tokens, freq_mhz, prefix_tokens)[1]

    def decode_time_s(self, tp: int, context_tokens: ArrayLike, freq_mhz: ArrayLike) -> FloatOrArray:
        """Seconds one decode step takes (see :meth:`decode`)."""
        return self.decode(tp, context_tokens, freq_mhz)[0]

    def decode_power_w(self, tp: int, context_tokens: ArrayLike, freq_mhz: ArrayLike) -> FloatOrArray:
        """Average power per GPU (W) during one decode step (see :meth:`decode`)."""
        return self.decode(tp, context_tokens, freq_mhz)[1]

    def idle_power_w(self, freq_mhz: ArrayLike) -> FloatOrArray:
        """Power per GPU (W) of an idle GPU locked at ``freq_mhz``."""
        f, scalar = self._freqs(freq_mhz)
        w = self.clock_table("prefill", self.tp_degrees[0], f)[pm.T_IDLE_W]
        return float(w[0]) if scalar else w

