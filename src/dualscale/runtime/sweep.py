"""``dualscale profile sweep``: measure your own node's clock response for ``profile fit --telemetry``.

The sweep takes the controller's place (the same config, key and sockets as ``dualscale serve``, so
it runs unprivileged and the actuator takes its commands as it would the controller's): it locks
every instance at one clock of a grid, holds it for ``dwell_s`` while load runs through the engines,
then moves to the next clock. Every iteration the engines report and the actuators' power and
energy are recorded exactly as ``serve --record`` records them (:mod:`dualscale.runtime.recorder`;
the iterations during a clock change are marked and left out of the time fit). Load comes from the
user's own benchmark client, or from :mod:`dualscale.runtime.loadgen` against an OpenAI-compatible
endpoint (``--load-url``).

A sweep can be interrupted (SIGINT/SIGTERM) and resumed (``--resume``): the clocks already held for
their whole dwell are kept in ``OUT.sweep.json`` (written atomically after each clock), the
telemetry file is appended to, and only the clocks left are swept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from dualscale._files import write_atomic
from dualscale.errors import ConfigError
from dualscale.profile import Profile
from dualscale.runtime.config import RuntimeConfig
from dualscale.runtime.daemon import ControllerDaemon, _Decided
from dualscale.runtime.recorder import TelemetryRecorder


class SweepState(msgspec.Struct, forbid_unknown_fields=True):
    """What ``--resume`` needs: the grid asked for and the clocks already done."""

    clocks_mhz: list[int]
    dwell_s: float
    done_mhz: list[int] = []


def grid_mhz(profile: Profile, steps: int) -> list[int]:
    """``steps`` supported clocks spread evenly over the profile's range, both ends included."""
    if steps < 3:
        raise ConfigError(f"--steps = {steps}: a fit needs at least 3 clocks")
    clocks = profile.clocks_mhz
    idx = sorted({round(i * (clocks.size - 1) / (steps - 1)) for i in range(steps)})
    return [int(clocks[i]) for i in idx]


def state_path(out: Path) -> Path:
    return out.with_name(out.name + ".sweep.json")


def load_state(out: Path, clocks_mhz: list[int], dwell_s: float, resume: bool) -> SweepState:
    """The sweep's state: a fresh one, or (``resume``) the one an interrupted sweep left, which must
    be for the same grid and dwell."""
    path = state_path(out)
    if not resume:
        if path.exists() or out.exists():
            raise ConfigError(f"{out}: a recording (or {path.name}) is already there: --resume to continue it, "
                              "or choose another --out")
        return SweepState(list(clocks_mhz), dwell_s)
    if not path.exists():
        raise ConfigError(f"--resume: {path} not found (nothing to resume; drop --resume to start a sweep)")
    try:
        st = msgspec.json.decode(path.read_bytes(), type=SweepState)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ConfigError(f"{path}: not a sweep state file ({e})") from e
    if st.clocks_mhz != list(clocks_mhz) or st.dwell_s != dwell_s:
        raise ConfigError(f"--resume: {path} is a sweep of clocks {st.clocks_mhz} with dwell {st.dwell_s} s; "
                          f"this one asks for {list(clocks_mhz)} with dwell {dwell_s} s")
    return st


class SweepDaemon(ControllerDaemon):
    """The controller daemon with every decision replaced by the sweep's current clock.

    Args:
        config: the deployment (as for ``dualscale serve``).
        state: the grid, the dwell and the clocks already done (``sweep``, updated as clocks finish).
        out: the telemetry file (its state file sits beside it).
        recorder: records the telemetry.
        progress: called with (clock MHz or None when done, seconds left in the whole sweep).
    """

    def __init__(self, config: RuntimeConfig, state: SweepState, out: Path, recorder: TelemetryRecorder,
                 progress: Callable[[int | None, float], None] | None = None, **kw: Any) -> None:
        super().__init__(config, recorder=recorder, **kw)
        self.sweep = state
        self.out = out
        self.todo = [f for f in state.clocks_mhz if f not in state.done_mhz]
        self.current_mhz = 0
        self._until_s = -math.inf
        self._progress = progress or (lambda f, left: None)
        for slot in self.slots.values():  # every instance at the sweep's clock, whatever it reports
            slot.decide = self._fixed

    def _fixed(self, ctl: Any, r: Any) -> _Decided:
        return _Decided(self.current_mhz, True, 0.0, math.inf, 0.0, 0.0)

    def step(self) -> None:
        now = time.monotonic()
        if now >= self._until_s:
            self._next_clock(now)
        self._progress(self.current_mhz or None, max(0.0, self._until_s - now) + len(self.todo) * self.sweep.dwell_s)
        super().step()

    def _next_clock(self, now_s: float) -> None:
        if self.current_mhz:
            self.sweep.done_mhz.append(self.current_mhz)
            write_atomic(state_path(self.out), msgspec.json.encode(self.sweep))
        if not self.todo:
            self.current_mhz = 0
            self._until_s = math.inf
            self.stop()
            return
        self.current_mhz = self.todo.pop(0)
        self._until_s = now_s + self.sweep.dwell_s

    @property
    def finished(self) -> bool:
        return not self.todo and self.current_mhz == 0
