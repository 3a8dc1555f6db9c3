"""Argument checks shared by the public entry points: each names the argument, the value and the rule.

Kernels trust their inputs, so everything that reaches them passes through here first.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray


def finite(name: str, x: Any, lo: float = -math.inf, hi: float = math.inf,
           lo_open: bool = False, hi_open: bool = False) -> float:
    """``x`` as a float, finite and within the interval; otherwise a ValueError naming ``name``."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{name} = {x!r}: expected a number") from None
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ValueError(f"{name} = {x!r}: must be finite and in {left}{lo}, {hi}{right}")
    return v


def whole(name: str, x: Any, minimum: int, maximum: int | None = None) -> int:
    """``x`` as an int >= ``minimum`` (and <= ``maximum``); bools and fractions are rejected."""
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} = {x!r}: expected an integer")
    v = int(x)
    if v < minimum or (maximum is not None and v > maximum):
        limit = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} = {x!r}: must be {limit}")
    return v


def token_array(name: str, x: ArrayLike, minimum: int, allow_empty: bool = False) -> NDArray[np.int64]:
    """A 1-D contiguous int64 array of whole token counts, each >= ``minimum``."""
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of integers (one per request), got shape {a.shape}")
    if a.size == 0:
        if allow_empty:
            return np.zeros(0, dtype=np.int64)
        raise ValueError(f"{name}: empty batch; needs at least one request")
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a) | (a != np.floor(a))
        if np.any(bad):
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{name}[{i}] = {a[i].item()!r}: token counts must be finite whole numbers")
    elif a.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer token counts, got dtype {a.dtype}")
    if np.any(a < minimum):
        i = int(np.argmin(a))
        raise ValueError(f"{name}[{i}] = {a[i].item()!r}: must be >= {minimum}")
    return np.ascontiguousarray(a, dtype=np.int64)


def counts(name: str, x: ArrayLike, n: int, ref: str) -> NDArray[np.int64]:
    """Token counts as int64, length ``n`` (that of ``ref``), without per-element range checks: the
    controllers' compiled input checks do those in one pass (see ``check_queue``/``check_batch``)."""
    a = np.asarray(x)
    if a.dtype.kind not in "iu" or a.ndim != 1:
        a = token_array(name, a, -(2**62), allow_empty=True)
    if a.shape[0] != n:
        raise ValueError(f"{name}: length {a.shape[0]} does not match {ref} length {n}")
    return np.ascontiguousarray(a, dtype=np.int64)


def vector(name: str, x: ArrayLike) -> NDArray[np.float64]:
    """A 1-D float64 array (finiteness is left to the compiled input checks)."""
    a = np.ascontiguousarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array (one entry per request), got shape {a.shape}")
    return a
