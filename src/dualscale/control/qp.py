"""The prefill MPC's condensed QP, solved by OSQP behind a fixed life cycle.

For a horizon of K batches the variables are the per-batch slowdowns u (time / fastest time):

    minimise    1/2 u' P u + q' u        P = diag(px)
    subject to  sum_{k <= b} t0_k u_k <= budget_b     (rows 0..K-1: cumulative TTFT budgets)
                1 <= u_k <= umax_k                    (rows K..2K-1)

The sparsity pattern depends only on K, so :meth:`QpSolver.setup` runs once per horizon and every
decision only updates values (``update``), warm-starts from the previous solution shifted by one
batch (``warm_start``), and solves (``solve``).
"""

from __future__ import annotations

import enum
import math
import time

import msgspec
import numpy as np
import osqp
import scipy.sparse as sp
from numpy.typing import NDArray

from dualscale._kernels import mpc
from dualscale.control import _osqp_c
from dualscale.errors import SolverError


class QpStatus(enum.IntEnum):
    """Outcome of one solve. Anything but SOLVED means the caller repairs from a safe start."""

    SOLVED = 1
    INACCURATE = 2
    MAX_ITER = 3
    FAILED = 4


class QpSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """OSQP settings the controller uses. Tolerances are loose on purpose: the continuous solution
    is only a starting point for the discrete repair, which restores exact feasibility, and the
    relaxation's exact optimum is rounded too."""

    eps_abs: float = 1e-3
    eps_rel: float = 1e-3
    max_iter: int = 50
    polish: bool = False
    adaptive_rho: bool = True
    rho: float = 0.1
    # termination checked every 5 iterations, not OSQP's 25: warm-started from the relaxation's
    # optimum the solve usually converges in 10-20 (measured on recorded queues)
    check_termination: int = 5


class QpResult(msgspec.Struct, frozen=True, gc=False):
    """Solution of one solve: slowdowns ``x`` (K,), constraint duals ``y`` (2K,)."""

    x: NDArray[np.float64]
    y: NDArray[np.float64]
    status: QpStatus
    iterations: int
    solve_time_s: float


_STATUS = {"solved": QpStatus.SOLVED, "solved inaccurate": QpStatus.INACCURATE,
           "maximum iterations reached": QpStatus.MAX_ITER}
_STATUS_VAL = {int(osqp.SolverStatus.OSQP_SOLVED): QpStatus.SOLVED,
               int(osqp.SolverStatus.OSQP_SOLVED_INACCURATE): QpStatus.INACCURATE,
               int(osqp.SolverStatus.OSQP_MAX_ITER_REACHED): QpStatus.MAX_ITER}
_OSQP_INFTY = osqp.constant("OSQP_INFTY")


def a_pattern(horizon: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """CSC (indptr, indices) of A: column k has cumulative rows k..K-1, then bound row K + k."""
    indptr = np.zeros(horizon + 1, dtype=np.int64)
    indices = []
    for k in range(horizon):
        rows = list(range(k, horizon)) + [horizon + k]
        indices.extend(rows)
        indptr[k + 1] = indptr[k] + len(rows)
    return indptr, np.asarray(indices, dtype=np.int64)


def a_nnz(horizon: int) -> int:
    """Number of stored entries of A for a horizon of ``horizon`` batches."""
    return horizon * (horizon + 1) // 2 + horizon


class QpSolver:
    """One OSQP workspace for a fixed horizon; see the module docstring for the problem."""

    def __init__(self, horizon: int, settings: QpSettings | None = None) -> None:
        self.horizon = horizon
        self.settings = settings or QpSettings()
        self._solver: osqp.OSQP | None = None
        self.reset_warm_start()
        self._xs = np.empty(horizon)
        self._ys = np.empty(2 * horizon)
        self._upper = np.empty(2 * horizon)
        self._ext: object | None = None
        #: True when decisions drive OSQP's compiled solver directly (see :meth:`_self_test`)
        self.fast_path = False
        #: OSQP's C API for compiled decisions (dualscale.control._osqp_c), when its self-test passed
        self.c_api: _osqp_c.CSolver | None = None
        #: why the C API is not used ("" when it is)
        self.c_api_fallback = ""

    def open_c_api(self, known_answer: float = 1.5) -> bool:
        """Try OSQP's C API for compiled decisions (checked on a problem with a known answer; tests
        pass a wrong ``known_answer`` to see the fallback); True when it passed. On failure the
        reason is kept in ``c_api_fallback`` and decisions use the Python binding."""
        if self.c_api is not None:
            self.c_api.close()
        self.c_api, self.c_api_fallback = _osqp_c.open_solver(self.horizon, self.settings, known_answer)
        return self.c_api is not None

    def setup(self) -> None:
        """Build the OSQP workspace with the fixed sparsity pattern (values are placeholders)."""
        k = self.horizon
        p = sp.csc_matrix((np.ones(k), np.arange(k), np.arange(k + 1)), shape=(k, k))
        indptr, indices = a_pattern(k)
        a = sp.csc_matrix((np.ones(a_nnz(k)), indices, indptr), shape=(2 * k, k))
        lower = np.concatenate([np.full(k, -np.inf), np.ones(k)])
        upper = np.concatenate([np.full(k, np.inf), np.ones(k)])
        s = self.settings
        solver = osqp.OSQP()
        try:
            solver.setup(p, np.zeros(k), a, lower, upper, verbose=False, warm_starting=True,
                         eps_abs=s.eps_abs, eps_rel=s.eps_rel, max_iter=s.max_iter, polishing=s.polish,
                         adaptive_rho=s.adaptive_rho, rho=s.rho, check_termination=s.check_termination)
        except Exception as e:  # OSQP raises its own ValueError subclasses; normalise them
            raise SolverError(f"OSQP setup failed for horizon {k}: {e}") from e
        self._solver = solver
        self.fast_path = self._self_test()
        self._ext = solver._solver if self.fast_path else None

    def _self_test(self) -> bool:
        """True when OSQP's compiled solver object can be driven directly and agrees with the
        public wrapper on a small problem. The wrapper adds ~50 us of Python per decision (it
        rebuilds a namespace of every info field on each solve), three times the solve itself."""
        assert self._solver is not None
        ext = getattr(self._solver, "_solver", None)
        needed = ("update_data_vec", "update_data_mat", "warm_start", "solve", "solution", "info")
        if ext is None or not all(hasattr(ext, name) for name in needed):
            return False
        # a problem with a known answer: u_k = 1.5 minimises (u - 1.5)^2 inside loose bounds
        k = self.horizon
        px = np.full(k, 2.0)
        q = np.full(k, -3.0)
        ax = np.ones(a_nnz(k))
        upper = np.concatenate([np.arange(1, k + 1) * 10.0, np.full(k, 3.0)])
        try:
            self._solver.update(q=q, u=upper, Px=px, Ax=ax)
            self._solver.warm_start(x=np.ones(k), y=np.zeros(2 * k))
            ref = np.array(self._solver.solve(raise_error=False).x)
            ext.update_data_vec(q=q, l=None, u=upper)
            ext.update_data_mat(P_x=px, P_i=None, A_x=ax, A_i=None)
            ext.warm_start(np.ones(k), np.zeros(2 * k))
            ext.solve()
            fast = np.array(ext.solution.x)
            ok = ext.info.status_val == int(osqp.SolverStatus.OSQP_SOLVED)
            return bool(ok and np.allclose(fast, 1.5, atol=1e-2) and np.allclose(ref, 1.5, atol=1e-2))
        except Exception:  # any mismatch in the private interface means: use the public one
            return False

    def update(self, px: NDArray[np.float64], q: NDArray[np.float64], ax: NDArray[np.float64],
               upper: NDArray[np.float64]) -> None:
        """New values for P's diagonal, q, A (CSC order) and the upper bounds (2K,)."""
        if self._solver is None:
            self.setup()
        assert self._solver is not None
        if self._ext is not None:
            np.minimum(upper, _OSQP_INFTY, out=self._upper)
            self._ext.update_data_vec(q=q, l=None, u=self._upper)
            self._ext.update_data_mat(P_x=px, P_i=None, A_x=ax, A_i=None)
        else:
            self._solver.update(q=q, u=upper, Px=px, Ax=ax)

    def reset_warm_start(self) -> None:
        """Forget the previous solution: the next solve starts cold (all batches at the fastest clock)."""
        self._x = np.ones(self.horizon)
        self._y = np.zeros(2 * self.horizon)

    def warm_start_shifted(self) -> None:
        """Start from the previous solution shifted by one batch (the first batch has run)."""
        assert self._solver is not None
        xs, ys = self._xs, self._ys
        mpc.shift_warm_start(self._x, self._y, xs, ys)
        if self._ext is not None:
            self._ext.warm_start(xs, ys)
        else:
            self._solver.warm_start(x=xs, y=ys)

    def solve_from(self, px: NDArray[np.float64], q: NDArray[np.float64], ax: NDArray[np.float64],
                   upper: NDArray[np.float64], x: NDArray[np.float64], y: NDArray[np.float64]) -> QpResult:
        """:meth:`update`, warm start from ``x``/``y``, :meth:`solve`: one decision's QP."""
        self.update(px, q, ax, upper)
        assert self._solver is not None
        if self._ext is not None:
            self._ext.warm_start(x, y)
        else:
            self._solver.warm_start(x=x, y=y)
        return self.solve()

    def solve(self) -> QpResult:
        """Solve from the current warm start; never raises on a non-converged solve."""
        assert self._solver is not None
        t0 = time.perf_counter()
        if self._ext is not None:
            self._ext.solve()
            info = self._ext.info
            status = _STATUS_VAL.get(info.status_val, QpStatus.FAILED)
            x = np.array(self._ext.solution.x)
            y = np.array(self._ext.solution.y)
        else:
            res = self._solver.solve(raise_error=False)
            info = res.info
            status = _STATUS.get(res.info.status, QpStatus.FAILED)
            x = np.array(res.x)
            y = np.array(res.y)
        dt = time.perf_counter() - t0
        # one sum is finite iff every entry is (inf - inf is nan): cheaper than two isfinite sweeps
        if status is not QpStatus.FAILED and math.isfinite(float(x.sum() + y.sum())):
            self._x = x
            self._y = y
        else:
            status = QpStatus.FAILED
            self.reset_warm_start()
        return QpResult(x=x, y=y, status=status, iterations=int(info.iter), solve_time_s=dt)
