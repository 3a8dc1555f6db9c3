"""Timeline binning for plots: time-weighted means are exact on piecewise-constant segments."""

from __future__ import annotations

import numpy as np
import pytest

from dualscale.sim.engine import Timeline
from dualscale.sim.plots import binned


def test_binned_means_are_time_weighted():
    tl = Timeline(t0_s=[0.0, 1.0, 3.0], t1_s=[1.0, 3.0, 4.0], freq_mhz=[345, 1980, 900],
                  power_w=[100.0, 500.0, 200.0], queue=[0, 3, 1], busy=[False, True, True])
    t, f, w, q = binned(tl, 4.0, bins=2)
    assert t.tolist() == [1.0, 3.0]
    assert f.tolist() == pytest.approx([(345 + 1980) / 2, (1980 + 900) / 2])
    assert w.tolist() == pytest.approx([300.0, 350.0])
    assert q.tolist() == [3.0, 3.0]
    # total energy is preserved by the binning
    t, f, w, q = binned(tl, 4.0, bins=7)
    assert float(np.sum(w * 4.0 / 7)) == pytest.approx(100 + 1000 + 200)
