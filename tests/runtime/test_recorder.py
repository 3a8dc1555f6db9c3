"""The daemon's telemetry recorder, driven directly: iteration records, power windows, voiding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dualscale.profile import telemetry as T
from dualscale.runtime.messages import DecodeReport, GpuStatus, NodeStatus, PrefillReport
from dualscale.runtime.recorder import TelemetryRecorder

MS = 1_000_000


def dec(seq: int, t_ms: int, freq: int, iteration_s: float, ctx: list[int]) -> DecodeReport:
    n = len(ctx)
    return DecodeReport("d0", 1, seq, t_ms * MS, 0.0, 0.0, iteration_s, freq, np.zeros(n).tobytes(),
                        np.ones(n, dtype=np.int64).tobytes(), np.array(ctx, dtype=np.int64).tobytes())


def status(t_ms: int, sm: int, energy_j: float, locked: int | None = None) -> NodeStatus:
    lk = sm if locked is None else locked
    return NodeStatus("node0", 7, t_ms * MS, [GpuStatus(g, lk, sm, 0, 0.0, energy_j + g) for g in (2, 3)])


@pytest.fixture
def rec(tmp_path: Path, config) -> TelemetryRecorder:
    return TelemetryRecorder(str(tmp_path / "t.jsonl"), list(config.instances), "h100-sxm-llama-3.3-70b",
                             window_s=0.1)


def test_iterations_carry_the_decided_shape_and_the_next_reports_time(rec: TelemetryRecorder, tmp_path: Path):
    rec.decided("d0", dec(1, 1000, 1200, 0.0, [10, 20]))
    r2 = dec(2, 1030, 1200, 0.03, [11, 21, 5])
    rec.iteration("d0", r2, 1200)
    rec.decided("d0", r2)
    r3 = dec(3, 1060, 1410, 0.028, [12, 22, 6])
    rec.iteration("d0", r3, 0)  # the clock changed while iteration 2 ran
    rec.decided("d0", r3)
    p1 = PrefillReport("p0", 1, 1, 500 * MS, 0.0, 0.0, 0.0, 990, np.zeros(2).tobytes(),
                       np.array([1500, 3000], dtype=np.int64).tobytes(), np.array([1000, 0], dtype=np.int64).tobytes())
    rec.decided("p0", p1)
    p2 = PrefillReport("p0", 1, 2, 700 * MS, 0.0, 0.0, 0.2, 990, b"", b"", b"")
    rec.iteration("p0", p2, 990)
    rec.close()
    tel = T.read(tmp_path / "t.jsonl")
    d = [i for i in tel.iterations if i.instance == "d0"]
    assert [(i.time_s, i.freq_mhz, i.end_mhz, i.context_tokens) for i in d] == [
        (0.03, 1200, 0, [10, 20]), (0.028, 1200, 1410, [11, 21, 5])]
    assert [i.t0_s for i in d] == pytest.approx([1.0, 1.03])  # the decided reports' sent_ns
    # prefill: the chunks the engine forms from the queue (2048-token budget): 500 left of the first, 1548 of the next
    (p,) = [i for i in tel.iterations if i.instance == "p0"]
    assert (p.chunk_tokens, p.prefix_tokens, p.time_s, p.freq_mhz) == ([500, 1548], [1000, 0], 0.2, 990)


def test_windows_fixed_mixed_and_voided(rec: TelemetryRecorder, tmp_path: Path):
    rec.status(status(0, 1200, 100.0))
    rec.decided("d0", dec(1, 10, 1200, 0.0, [10]))
    r = dec(2, 40, 1200, 0.03, [11])
    rec.iteration("d0", r, 1200)
    rec.decided("d0", r)
    rec.status(status(120, 1200, 130.0))  # closes [0, 120] ms at 1200 MHz (pending its straddler)
    r = dec(3, 130, 1200, 0.09, [12])
    rec.iteration("d0", r, 1200)
    rec.decided("d0", r)  # resolves it: written
    rec.status(status(150, 1350, 135.0, locked=1350))
    r = dec(4, 200, 1350, 0.07, [13])
    rec.iteration("d0", r, 1350)
    rec.decided("d0", r)
    rec.status(status(260, 1350, 160.0))  # [120, 260]: the clock changed inside -> freq 0 ("mixed")
    r = dec(5, 270, 1350, 0.07, [14])
    rec.iteration("d0", r, 1350)
    rec.decided("d0", r)
    rec.status(status(400, 1350, 200.0))  # [260, 400] ...
    rec.decided("d0", dec(7, 420, 1350, 0.07, [16]))  # ... but report 6 was lost: voided
    rec.close()
    w = [x for x in T.read(tmp_path / "t.jsonl").windows if x.instance == "d0"]
    assert [x.freq_mhz for x in w] == [1200, 0]
    assert [(x.t0_s, x.t1_s) for x in w] == [pytest.approx((0.0, 0.12)), pytest.approx((0.12, 0.26))]
    assert w[0].energy_j == pytest.approx([30.0, 30.0]) and w[0].power_w == pytest.approx([250.0, 250.0])
