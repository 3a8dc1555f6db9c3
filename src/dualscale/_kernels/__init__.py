"""Numba kernels of the hot path. Compile options live here, in one place, as import-time constants.

``fastmath`` stays off everywhere: NaN and inf must propagate, not be assumed away.
"""

from __future__ import annotations

#: Cache compiled machine code next to the sources so a second process starts warm.
CACHE = True
FASTMATH = False
