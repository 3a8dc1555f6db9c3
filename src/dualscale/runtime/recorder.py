"""``dualscale serve --record FILE``: the controller daemon's telemetry, for refitting a profile.

The daemon calls three hooks and nothing else:

* :meth:`TelemetryRecorder.iteration` from ``ControllerDaemon._feedback`` when a report carries the
  measured time of the iteration last decided on: one iteration record, with the batch shape of
  the report that was decided on, the clock read at its start and, if a switch landed while it ran
  (the controller learns nothing from those), the clock read at its end (prefill: the chunks the engine forms from the waiting queue by
  the rule the controller projects, :class:`~dualscale.control.BatchFormer`; decode: the running
  batch's contexts). It starts when that report arrived.
* :meth:`TelemetryRecorder.decided` after each decision: resolves which iterations are known.
* :meth:`TelemetryRecorder.status` for every actuator status: power windows. A window of an
  instance runs from one status to a later one (``window_s``) while every iteration that ran in it
  was recorded (an iteration of unknown clock, or a superseded report, voids the windows it
  overlaps), with each GPU's energy from the actuator's counters. It is written once the iteration
  running at its end is resolved, with ``freq_mhz`` the clock if every status and iteration in it
  saw the same locked and read-back clock, else 0 (DVFS changed it: the fit then takes each
  iteration at its own clock, which energy allows, being additive).

Times are the GPU node's ``CLOCK_MONOTONIC`` in seconds: an iteration starts when its worker sent
the report decided on (``sent_ns``: engines report at each iteration's start), a window runs between
the ``sent_ns`` of two actuator statuses (stamped right after the energy counters are read). Worker
and actuator run on the same node, so both sides of the energy attribution share one clock, and the
daemon's own delays (it may take a status tens of ms after it was sent) do not blur it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dualscale.control import BatchFormer
from dualscale.profile.telemetry import DecodeIteration, Header, PowerWindow, PrefillIteration, Writer
from dualscale.runtime.config import InstanceSpec
from dualscale.runtime.messages import NodeStatus

#: Default length of a power window, s (NVML power and energy update about every 100 ms).
WINDOW_S = 1.0


@dataclass
class _Window:
    t0_ns: int
    energy_j: list[float]
    freq_mhz: int
    epoch: int
    void: bool = False
    mixed: bool = False


@dataclass
class _State:
    spec: InstanceSpec
    former: BatchFormer | None
    decided: Any = None  # the report last decided on
    decided_ns: int = 0  # when it arrived: the start of the iteration it describes
    recorded_seq: int = -1  # seq of the last report whose preceding iteration was recorded
    locked_mhz: int = 0
    open: _Window | None = None
    pending: list[tuple[_Window, int, list[float]]] = field(default_factory=list)  # (window, t1_ns, energy at t1)


class TelemetryRecorder:
    """Writes the daemon's telemetry (see the module docstring) through a :class:`Writer`.

    Args:
        path: the telemetry file (rotated by the writer).
        instances: the runtime config's instances.
        profile: name of the profile the controllers use (goes in the headers).
        window_s: power window length, s (> 0).
        max_bytes, keep: the writer's rotation bound and rotated files kept.
    """

    def __init__(self, path: str, instances: list[InstanceSpec], profile: str, window_s: float = WINDOW_S,
                 max_bytes: int = 256 * 2**20, keep: int = 3, source: str = "serve") -> None:
        if not window_s > 0:
            raise ValueError(f"window_s = {window_s}: must be > 0")
        self.window_ns = int(window_s * 1e9)
        self.states = {s.name: _State(s, BatchFormer(s.max_batch_tokens) if s.phase == "prefill" else None)
                       for s in instances}
        self.by_node: dict[str, list[_State]] = {}
        for st in self.states.values():
            self.by_node.setdefault(st.spec.node, []).append(st)
        self.writer = Writer(path, [Header(version=0, instance=s.name, phase=s.phase, tp=s.tp, gpus=list(s.gpus),
                                           profile=profile, source=source, node=s.node,
                                           started_unix_s=time.time()) for s in instances],
                             max_bytes=max_bytes, keep=keep)
        self.iterations = 0
        self.windows = 0

    @staticmethod
    def _s(ns: int) -> float:
        return ns * 1e-9

    # ---- hooks ---------------------------------------------------------------------------------
    def iteration(self, instance: str, r: Any, freq_mhz: int) -> None:
        """Report ``r`` measured the iteration last decided on, run at ``freq_mhz`` throughout (0: the
        clock changed while it ran)."""
        st = self.states[instance]
        d = st.decided
        if d is None or d.freq_mhz <= 0 or r.freq_mhz <= 0:
            return  # the engine does not know its clock: the iteration stays unknown
        start_mhz = int(d.freq_mhz)
        end_mhz = 0 if freq_mhz > 0 else int(r.freq_mhz)
        st.recorded_seq = r.seq
        if st.open is not None and (st.open.freq_mhz != start_mhz or end_mhz):  # another clock inside the window
            st.open.mixed = True
        t0 = self._s(st.decided_ns)
        if st.former is not None:
            prompt = np.frombuffer(d.prompt_tokens, dtype="<i8")
            if prompt.size == 0:
                return
            chunks, prefix = st.former.next_batch(prompt, np.frombuffer(d.prefilled_tokens, dtype="<i8"))
            rec: PrefillIteration | DecodeIteration = PrefillIteration(
                instance, t0, float(r.iteration_s), start_mhz, chunks.tolist(), prefix.tolist(), st.locked_mhz, end_mhz)
        else:
            ctx = np.frombuffer(d.context_tokens, dtype="<i8")
            if ctx.size == 0:
                return
            rec = DecodeIteration(instance, t0, float(r.iteration_s), start_mhz, ctx.tolist(), st.locked_mhz, end_mhz)
        self.writer.write(rec)
        self.iterations += 1

    def decided(self, instance: str, r: Any) -> None:
        """The daemon decided on report ``r``: the iteration it describes starts (``r.sent_ns``)."""
        st = self.states[instance]
        if st.decided is not None and st.recorded_seq != r.seq:
            # the iteration(s) since the last decided report are unknown (a report was superseded or
            # invalid, or the engine did not know its clock): void every window they overlap
            start = st.decided_ns
            st.pending = [p for p in st.pending if p[1] <= start]
            if st.open is not None:
                st.open.void = True
        # everything pending ended before this iteration started and is now resolved
        for w, t1_ns, e1 in st.pending:
            self._emit(st, w, t1_ns, e1)
        st.pending.clear()
        st.decided, st.decided_ns = r, int(r.sent_ns)

    def status(self, status: NodeStatus) -> None:
        """An actuator status arrived: extend, close or void the node's instances' power windows."""
        now = int(status.sent_ns)
        gpus = {g.index: g for g in status.gpus}
        for st in self.by_node.get(status.node, ()):
            gs = [gpus.get(i) for i in st.spec.gpus]
            if any(g is None or g.error for g in gs):
                st.open = None
                continue
            f = gs[0].sm_mhz  # type: ignore[union-attr]
            st.locked_mhz = gs[0].locked_mhz  # type: ignore[union-attr]
            fixed = f > 0 and all(g.sm_mhz == f and g.locked_mhz == f for g in gs)  # type: ignore[union-attr]
            energy = [g.energy_j for g in gs]  # type: ignore[union-attr]
            w = st.open
            if w is not None and not w.void and w.epoch == status.epoch:
                w.mixed |= not fixed or w.freq_mhz != f
                if now - w.t0_ns >= self.window_ns:
                    st.pending.append((w, now, energy))
                    st.open = _Window(now, energy, f, status.epoch, mixed=not fixed)
                continue
            st.open = _Window(now, energy, f, status.epoch, mixed=not fixed)

    def _emit(self, st: _State, w: _Window, t1_ns: int, energy_j: list[float]) -> None:
        dt = (t1_ns - w.t0_ns) * 1e-9
        e = [max(0.0, b - a) for a, b in zip(w.energy_j, energy_j)]
        self.writer.write(PowerWindow(st.spec.name, self._s(w.t0_ns), self._s(t1_ns), 0 if w.mixed else w.freq_mhz, e,
                                      [x / dt for x in e]))
        self.windows += 1

    def close(self) -> None:
        """Write what is buffered and close the file (windows still unresolved are left out)."""
        self.writer.close()
