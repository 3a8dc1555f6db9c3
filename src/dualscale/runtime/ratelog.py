"""Rate-limited warnings: a peer that sends garbage in a loop must not fill the disk with logs."""

from __future__ import annotations

import logging
import time

#: Seconds between two log lines of one key; the ones in between are counted and summarised.
PERIOD_S = 10.0
#: Keys remembered at most (a flood of distinct keys costs bounded memory).
MAX_KEYS = 256


class RateLimitedLog:
    """Logs the first message of each key, then at most one per ``period_s`` with how many were held back."""

    def __init__(self, logger: logging.Logger, period_s: float = PERIOD_S) -> None:
        self.log = logger
        self.period_s = period_s
        self._next: dict[str, tuple[float, int]] = {}  # key -> (next time it may log, held back)

    def __call__(self, level: int, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        due, held = self._next.get(key, (0.0, 0))
        if now < due:
            self._next[key] = (due, held + 1)
            return
        if len(self._next) >= MAX_KEYS and key not in self._next:
            self._next.clear()
        self._next[key] = (now + self.period_s, 0)
        suffix = f" ({held} more like this in the last {self.period_s:g} s)" if held else ""
        self.log.log(level, msg + suffix, *args)
