"""Telemetry of a simulated run: what an engine and an actuator would have recorded.

:class:`RecordingPolicy` wraps any policy: its controls decide exactly as the wrapped ones do,
and every iteration whose clock did not change while it ran is recorded with the batch shape it
ran (prefill: the chunks the simulator forms by the controller's rule; decode: the contexts), the
time the engine measured and the clock read back. After the run, :func:`power_windows` cuts each
instance's timeline (the simulated GPUs' power, busy and idle) into windows at a fixed clock, as
the daemon's recorder does with actuator statuses. Used to test the telemetry fit against a known
truth profile, without sockets; the same format as ``dualscale serve --record``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dualscale.control import BatchFormer
from dualscale.profile.telemetry import DecodeIteration, Header, PowerWindow, PrefillIteration, Writer
from dualscale.sim.engine import RunResult
from dualscale.sim.policies import DecodeControl, Policy, PrefillControl


class _Recording:
    def __init__(self, inner: Any, name: str, writer: Writer, former: BatchFormer | None) -> None:
        self.inner = inner
        self.name = name
        self.writer = writer
        self.former = former
        self.idle_mhz = inner.idle_mhz
        self._t0_s = 0.0
        self._shape: tuple[list[int], ...] = ()
        self.spans: list[tuple[float, float]] = []  # (start, end) s of every recorded iteration

    def observe(self, iteration_s: float, freq_mhz: int, power_w: float) -> None:
        self.inner.observe(iteration_s, freq_mhz, power_w)
        if freq_mhz <= 0 or not iteration_s > 0:
            return  # the clock changed while it ran: nothing an engine could attribute
        if self.former is not None:
            rec: Any = PrefillIteration(self.name, self._t0_s, iteration_s, freq_mhz, *self._shape)
        else:
            rec = DecodeIteration(self.name, self._t0_s, iteration_s, freq_mhz, *self._shape)
        self.writer.write(rec)
        self.spans.append((self._t0_s, self._t0_s + iteration_s))


class _RecPrefill(_Recording, PrefillControl):
    def clock(self, now_s, arrival_s, prompt_tokens, prefilled_tokens, kv_util):  # type: ignore[no-untyped-def]
        assert self.former is not None  # internal: built by RecordingPolicy
        chunks, prefix = self.former.next_batch(prompt_tokens, prefilled_tokens)
        self._t0_s, self._shape = now_s, (chunks.tolist(), prefix.tolist())
        return self.inner.clock(now_s, arrival_s, prompt_tokens, prefilled_tokens, kv_util)


class _RecDecode(_Recording, DecodeControl):
    def clock(self, now_s, first_token_s, tokens_out, context_tokens, kv_util):  # type: ignore[no-untyped-def]
        self._t0_s, self._shape = now_s, (context_tokens.tolist(),)
        return self.inner.clock(now_s, first_token_s, tokens_out, context_tokens, kv_util)


class RecordingPolicy(Policy):
    """``inner``'s decisions, with every measurable iteration written to ``writer``.

    Instances are named ``prefill-<i>``/``decode-<i>`` in the order the simulator builds them; call
    :meth:`headers` before opening the writer (it needs them) or pass them in.
    """

    def __init__(self, inner: Policy, writer: Writer) -> None:
        super().__init__(inner.profile, inner.scenario)
        self.inner = inner
        self.name = inner.name
        self.writer = writer
        self.counts = {"prefill": 0, "decode": 0}
        self.controls: dict[str, _Recording] = {}

    def prefill(self, tp: int, base_mhz: int | None = None) -> PrefillControl:
        name = f"prefill-{self.counts['prefill']}"
        self.counts["prefill"] += 1
        c = _RecPrefill(self.inner.prefill(tp, base_mhz), name, self.writer,
                        BatchFormer(self.scenario.prefill.max_batch_tokens))
        self.controls[name] = c
        return c

    def decode(self, tp: int, base_mhz: int | None = None) -> DecodeControl:
        name = f"decode-{self.counts['decode']}"
        self.counts["decode"] += 1
        c = _RecDecode(self.inner.decode(tp, base_mhz), name, self.writer, None)
        self.controls[name] = c
        return c


def headers(tps: dict[str, list[int]], profile: str) -> list[Header]:
    """Headers of the instances of a run: ``{"prefill": [tp, ...], "decode": [tp, ...]}``."""
    return [Header(version=0, instance=f"{phase}-{i}", phase=phase, tp=tp, gpus=list(range(tp)),  # type: ignore[arg-type]
                   profile=profile, source="simulate")
            for phase, ts in tps.items() for i, tp in enumerate(ts)]


def power_windows(run: RunResult, policy: RecordingPolicy, window_s: float = 1.0, min_s: float = 0.25) -> int:
    """Write each instance's power windows at a fixed clock (at most ``window_s`` long, at least
    ``min_s``) to the policy's writer; returns how many. A window in which the GPUs were busy
    longer than the recorded iterations account for (an iteration whose clock changed while it
    ran is not recorded) is left out, as the daemon's recorder leaves it out."""
    n = 0
    writer = policy.writer
    for phase, insts in (("prefill", run.prefill), ("decode", run.decode)):
        for i, inst in enumerate(insts):
            spans = np.array(policy.controls[f"{phase}-{i}"].spans).reshape(-1, 2)
            tl = inst.timeline
            busy = np.asarray(tl.busy)
            t0 = np.asarray(tl.t0_s)
            t1 = np.asarray(tl.t1_s)
            f = np.asarray(tl.freq_mhz)
            p = np.asarray(tl.power_w)
            k = 0
            while k < len(t0):
                # a run of contiguous segments at one clock
                j = k
                while j + 1 < len(t0) and f[j + 1] == f[k] and t0[j + 1] == t1[j]:
                    j += 1
                start, end = t0[k], t1[j]
                cuts = np.arange(start, end, window_s)
                for a in cuts.tolist():
                    b = min(a + window_s, float(end))
                    if b - a < min_s:
                        continue
                    seg = slice(k, j + 1)
                    ov = np.clip(np.minimum(t1[seg], b) - np.maximum(t0[seg], a), 0.0, None)
                    e = float((ov * p[seg]).sum())
                    known = float(np.clip(np.minimum(spans[:, 1], b) - np.maximum(spans[:, 0], a), 0.0, None).sum())
                    if abs(float((ov * busy[seg]).sum()) - known) > 1e-6 * (b - a):
                        continue
                    writer.write(PowerWindow(f"{phase}-{i}", a, b, int(f[k]), [e] * inst.tp,
                                             [e / (b - a)] * inst.tp))
                    n += 1
                k = j + 1
    return n


class _Held(PrefillControl, DecodeControl):
    def __init__(self, schedule: SweepPolicy) -> None:
        self.schedule = schedule
        self.last_mhz = schedule.clocks_mhz[0]

    @property  # type: ignore[override]
    def idle_mhz(self) -> int:
        """An idle GPU keeps the clock it last ran at (the sweep holds it)."""
        return self.last_mhz

    def clock(self, now_s, *args):  # type: ignore[no-untyped-def, override]
        self.last_mhz = self.schedule.clock_at(now_s)
        return self.last_mhz


class SweepPolicy(Policy):
    """Every GPU holds each clock of ``clocks_mhz`` in turn for ``dwell_s`` (busy or idle), cycling:
    a calibration sweep in simulation."""

    name = "sweep"

    def __init__(self, profile: Any, scenario: Any, clocks_mhz: list[int], dwell_s: float) -> None:
        super().__init__(profile, scenario)
        bad = [f for f in clocks_mhz if f not in profile.clocks_mhz]
        if bad or not clocks_mhz or not dwell_s > 0:
            raise ValueError(f"clocks_mhz = {clocks_mhz}, dwell_s = {dwell_s}: need supported clocks and dwell_s > 0")
        self.clocks_mhz = list(clocks_mhz)
        self.dwell_s = dwell_s

    def clock_at(self, now_s: float) -> int:
        return self.clocks_mhz[int(now_s // self.dwell_s) % len(self.clocks_mhz)]

    def prefill(self, tp: int, base_mhz: int | None = None) -> PrefillControl:
        return _Held(self)

    def decode(self, tp: int, base_mhz: int | None = None) -> DecodeControl:
        return _Held(self)
