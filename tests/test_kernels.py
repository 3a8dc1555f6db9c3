"""Each Numba kernel against its NumPy twin in tests/reference.py."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import reference as ref
from dualscale._kernels import perf_model as pm

pos = st.floats(1e-9, 1.0, allow_nan=False)
watts = st.floats(0.0, 900.0, allow_nan=False)


@st.composite
def coefs(draw):
    c = np.zeros(pm.N_COEF)
    c[pm.C_BASE_S] = draw(st.floats(0.0, 0.05))
    c[pm.C_PER_REQUEST_S] = draw(st.floats(0.0, 1e-3))
    c[pm.C_PER_CONTEXT_TOKEN_S] = draw(st.floats(0.0, 1e-6))
    c[pm.C_PER_TOKEN_S] = draw(st.floats(0.0, 1e-3))
    c[pm.C_ATTN_TOKEN_EQUIV] = draw(st.floats(0.0, 1e-3))
    c[pm.C_POWER_CAP_W] = draw(st.floats(100.0, 1000.0))
    return c


@st.composite
def tables(draw):
    n = draw(st.integers(1, 12))
    t = np.empty((pm.N_TABLE_ROWS, n))
    t[pm.T_MEM_SLOWDOWN] = draw(hnp.arrays(float, n, elements=st.floats(0.5, 6.0)))
    t[pm.T_COMP_SLOWDOWN] = draw(hnp.arrays(float, n, elements=st.floats(0.5, 6.0)))
    t[pm.T_IDLE_W] = draw(hnp.arrays(float, n, elements=st.floats(0.0, 200.0)))
    t[pm.T_MEM_POWER_W] = draw(hnp.arrays(float, n, elements=st.floats(-100.0, 900.0)))
    t[pm.T_COMP_POWER_W] = draw(hnp.arrays(float, n, elements=st.floats(-100.0, 900.0)))
    return t


tokens = hnp.arrays(np.int64, st.integers(1, 24), elements=st.integers(1, 16384))


@given(tokens, st.data(), coefs(), tables())
def test_prefill_grid_matches_reference(chunks, data, coef, table):
    prefix = data.draw(hnp.arrays(np.int64, chunks.shape, elements=st.integers(0, 32768)))
    out = np.empty((2, table.shape[1]))
    pm.prefill_grid(chunks, prefix, coef, table, out)
    np.testing.assert_allclose(out, ref.prefill_grid(chunks, prefix, coef, table), rtol=1e-9, atol=1e-12)


@given(tokens, coefs(), tables())
def test_decode_grid_matches_reference(ctx, coef, table):
    out = np.empty((2, table.shape[1]))
    pm.decode_grid(ctx, coef, table, out)
    np.testing.assert_allclose(out, ref.decode_grid(ctx, coef, table), rtol=1e-9, atol=1e-12)


@given(st.floats(0.0, 1.0), st.floats(0.0, 1.0), coefs(), tables())
def test_eval_clocks_matches_reference(mem_s, comp_s, coef, table):
    out = np.empty((2, table.shape[1]))
    pm.eval_clocks(mem_s, comp_s, coef, table, out)
    np.testing.assert_allclose(out, ref.eval_clocks(mem_s, comp_s, coef, table), rtol=1e-9, atol=1e-12)


def test_zero_work_is_idle():
    coef = np.zeros(pm.N_COEF)
    coef[pm.C_POWER_CAP_W] = 700.0
    table = np.ones((pm.N_TABLE_ROWS, 3)) * 50.0
    out = np.empty((2, 3))
    pm.eval_clocks(0.0, 0.0, coef, table, out)
    assert np.all(out[pm.O_TIME_S] == 0.0) and np.all(out[pm.O_POWER_W] == 50.0)


def test_nan_propagates_instead_of_vanishing():
    """fastmath is off: a NaN coefficient must show up in the output, not be optimised away."""
    coef = np.ones(pm.N_COEF)
    coef[pm.C_PER_TOKEN_S] = np.nan
    table = np.ones((pm.N_TABLE_ROWS, 2))
    out = np.empty((2, 2))
    pm.decode_grid(np.array([10], dtype=np.int64), coef, table, out)
    assert np.isnan(out[pm.O_TIME_S]).all()


def test_profile_tables_match_reference(profile):
    """The profile's expanded grid tables (per phase and TP) drive the kernels exactly like the reference."""
    chunks = np.array([700, 300, 48])
    prefix = np.array([0, 1024, 0])
    ctx = np.array([900, 1500, 64, 3000])
    for tp in profile.tp_degrees:
        want = ref.prefill_grid(chunks, prefix, profile.coefficients("prefill", tp), profile.clock_table("prefill", tp))
        t, p = profile.prefill(tp, chunks, profile.clocks_mhz, prefix)
        np.testing.assert_allclose(t, want[0], rtol=1e-12)
        np.testing.assert_allclose(p, want[1], rtol=1e-12)
        want = ref.decode_grid(ctx, profile.coefficients("decode", tp), profile.clock_table("decode", tp))
        t, p = profile.decode(tp, ctx, profile.clocks_mhz)
        np.testing.assert_allclose(t, want[0], rtol=1e-12)
        np.testing.assert_allclose(p, want[1], rtol=1e-12)


def test_power_is_idle_plus_busy_fractions():
    """Hand-checked cases: pure memory work draws idle + memory power; equal work draws both at 1/sqrt(2)."""
    coef = np.zeros(pm.N_COEF)
    coef[pm.C_POWER_CAP_W] = 700.0
    table = np.ones((pm.N_TABLE_ROWS, 1))
    table[pm.T_IDLE_W], table[pm.T_MEM_POWER_W], table[pm.T_COMP_POWER_W] = 100.0, 200.0, 400.0
    out = np.empty((2, 1))
    pm.eval_clocks(0.02, 0.0, coef, table, out)
    np.testing.assert_allclose(out[:, 0], [0.02, 300.0], rtol=1e-15)
    pm.eval_clocks(0.0, 0.03, coef, table, out)
    np.testing.assert_allclose(out[:, 0], [0.03, 500.0], rtol=1e-15)
    pm.eval_clocks(0.01, 0.01, coef, table, out)
    np.testing.assert_allclose(out[:, 0], [0.01 * np.sqrt(2.0), 100.0 + 600.0 / np.sqrt(2.0)], rtol=1e-15)
    pm.eval_clocks(0.03, 0.04, coef, table, out)  # busy fractions 0.6 and 0.8
    np.testing.assert_allclose(out[:, 0], [0.05, 100.0 + 0.6 * 200.0 + 0.8 * 400.0], rtol=1e-14)
    coef[pm.C_POWER_CAP_W] = 400.0
    pm.eval_clocks(0.03, 0.04, coef, table, out)
    assert out[pm.O_POWER_W, 0] == 400.0
