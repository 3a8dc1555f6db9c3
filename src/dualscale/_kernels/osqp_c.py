"""The ``qp`` prefill solver's whole plan in one compiled call, OSQP included through its C API.

OSQP's C functions are declared here as Numba external functions under ``dualscale_osqp_*``
names; :func:`bind` registers the addresses of the osqp wheel's exported functions under those
names (dualscale.control._osqp_c loads the library and checks its layout first). The names are
resolved when a kernel is compiled or loaded from the cache, so :func:`bind` runs before the first
call. Passing the functions as ctypes objects instead costs ~20 us per call in argument unboxing.

With ``NUMBA_DISABLE_JIT=1`` the same kernels run as Python and call the ctypes functions.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import llvmlite.binding as llvm
import numpy as np
from numba import njit, types
from numba.core import config

from dualscale._kernels import CACHE, FASTMATH
from dualscale._kernels import mpc

_U = types.uint64
#: C name -> Numba signature (every pointer passed as an address)
SIGNATURES = {
    "osqp_update_data_vec": types.int32(_U, _U, _U, _U),
    "osqp_update_data_mat": types.int32(_U, _U, _U, types.int32, _U, _U, types.int32),
    "osqp_warm_start": types.int32(_U, _U, _U),
    "osqp_solve": types.int32(_U),
    "memcpy": _U(_U, _U, _U),
}
_CTYPES: dict[str, Callable[..., Any]] = {}


def _declare(name: str) -> Any:
    if config.DISABLE_JIT:
        return lambda *args: _CTYPES[name](*args)
    return types.ExternalFunction(f"dualscale_{name}", SIGNATURES[name])


update_data_vec = _declare("osqp_update_data_vec")
update_data_mat = _declare("osqp_update_data_mat")
warm_start = _declare("osqp_warm_start")
solve = _declare("osqp_solve")
memcpy = _declare("memcpy")


def bind(functions: dict[str, Any]) -> None:
    """Register the ctypes functions (keyed by C name, :data:`SIGNATURES`) for the kernels."""
    for name, fn in functions.items():
        _CTYPES[name] = fn
        llvm.add_symbol(f"dualscale_{name}", ctypes.cast(fn, ctypes.c_void_p).value)


@njit(cache=CACHE, fastmath=FASTMATH)
def osqp_step(at, px, q, ax, upper, xw, yw, x, y, stats):
    """One OSQP update (P, q, A, upper bounds), warm start from ``xw``/``yw`` and solve, through
    the C API; the solution lands in ``x``/``y`` and the status and iterations in ``stats``.
    ``upper`` is clipped to OSQP's infinity in place. Returns True when every call succeeded."""
    h = at[mpc.A_SOLVER]
    for i in range(upper.shape[0]):
        if upper[i] > mpc.OSQP_INFTY:
            upper[i] = mpc.OSQP_INFTY
    rc = update_data_vec(h, q.ctypes.data, 0, upper.ctypes.data)
    rc |= update_data_mat(h, px.ctypes.data, 0, 0, ax.ctypes.data, 0, 0)
    rc |= warm_start(h, xw.ctypes.data, yw.ctypes.data)
    rc |= solve(h)
    if rc != 0:
        stats[mpc.ST_STATUS] = -1
        return False
    k = x.shape[0]
    memcpy(x.ctypes.data, at[mpc.A_X], 8 * k)
    memcpy(y.ctypes.data, at[mpc.A_Y], 16 * k)
    i4 = np.zeros(2, dtype=np.int32)
    memcpy(i4.ctypes.data, at[mpc.A_STATUS], 4)
    memcpy(i4.ctypes.data + 4, at[mpc.A_ITER], 4)
    stats[mpc.ST_STATUS] = i4[0]
    stats[mpc.ST_ITER] = i4[1]
    return True


@njit(cache=CACHE, fastmath=FASTMATH)
def solve_qp(tables, budget_s, n_batches, order, n_front, hpos, n_hull, plan, fw, iw, at, stats):
    """The ``qp`` solver's whole plan, in one call. Returns the plan's energy.

    1. Efficient clocks; every batch at its cheapest when that fits (optimal, done).
    2. Each batch's convex hull; the continuous relaxation solved exactly on it (water-filling),
       rounded toward faster, repaired and improved (``round_repair_improve``).
    3. The condensed QP (hull-fitted, ``qp_data``) warm-started from the relaxation's optimum
       and the previous duals, solved by OSQP through its C API (skipped when ``at[A_SOLVER]`` is 0).
    4. The QP's solution rounded, repaired and improved too; the better plan is the incumbent of an
       exact search among the efficient clocks near it and near the hull's vertices
       (``solve_window``), whose result replaces it when found within the label cap.

    ``fw``/``iw``: workspaces of ``qp_workspace`` sizes (views: ``qp_slices``).
    """
    energy, done = mpc.qp_prepare(tables, budget_s, n_batches, order, n_front, hpos, n_hull, plan, fw, iw, stats)
    if done:
        return energy
    solved = False
    if at[mpc.A_SOLVER] != 0:
        qp_vec, px, ax, x, xw, u, y, yw, work, wf, alt, cand, n_cand, wi = mpc.qp_slices(
            fw, iw, plan.shape[0], tables.shape[2])
        upper = qp_vec[1:3].reshape(-1)
        solved = osqp_step(at, px, qp_vec[0], ax, upper, xw, yw, x, y, stats)
    return mpc.qp_finish(tables, budget_s, n_batches, order, n_front, hpos, n_hull, plan, energy, solved, fw, iw, stats)
