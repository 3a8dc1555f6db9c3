"""OSQP's C API, called from compiled code through function pointers.

The osqp wheel's extension module is a shared library that exports OSQP's C API (``osqp_setup``,
``osqp_update_data_vec``, ``osqp_solve``, ...). Compiled kernels call those functions through
ctypes function objects (Numba calls them as plain C function pointers), so a decision never
returns to Python between building the QP and reading its solution; no compiler is needed at
install time.

That depends on the library's binary layout: the structs below are OSQP v1.0.0's
(include/public/osqp_api_types.h at tag v1.0.0, 32-bit ``OSQPInt``, double ``OSQPFloat``), which
is what osqp 1.0-1.1 wheels embed. :func:`open_solver` therefore checks, before any decision uses
it, that (1) the library reports version 1.0.x, (2) ``osqp_set_default_settings`` fills every
field of our settings struct with OSQP's documented default, and (3) a solve through the compiled
kernel of a problem with a known answer returns that answer with status "solved" read from the
info struct. Any failure returns None with the reason; the caller then uses the Python binding
(dualscale.control.qp) and says so.
"""

from __future__ import annotations

import ctypes
import math
import weakref
from pathlib import Path

import numpy as np
import osqp

from dualscale._kernels import mpc, osqp_c

I = ctypes.c_int32  # OSQPInt of the wheel's build (checked through the defaults below)
F = ctypes.c_double
U64 = ctypes.c_uint64  # every pointer is passed as an address


class Settings(ctypes.Structure):
    _fields_ = [("device", I), ("linsys_solver", ctypes.c_int), ("allocate_solution", I), ("verbose", I),
                ("profiler_level", I), ("warm_starting", I), ("scaling", I), ("polishing", I),
                ("rho", F), ("rho_is_vec", I), ("sigma", F), ("alpha", F),
                ("cg_max_iter", I), ("cg_tol_reduction", I), ("cg_tol_fraction", F), ("cg_precond", ctypes.c_int),
                ("adaptive_rho", I), ("adaptive_rho_interval", I), ("adaptive_rho_fraction", F),
                ("adaptive_rho_tolerance", F), ("max_iter", I), ("eps_abs", F), ("eps_rel", F),
                ("eps_prim_inf", F), ("eps_dual_inf", F), ("scaled_termination", I), ("check_termination", I),
                ("check_dualgap", I), ("time_limit", F), ("delta", F), ("polish_refine_iter", I)]


#: OSQP v1.0.0's defaults (osqp_api_constants.h): what osqp_set_default_settings must write
DEFAULTS = {"device": 0, "linsys_solver": 1, "allocate_solution": 1, "verbose": 1, "warm_starting": 1,
            "scaling": 10, "polishing": 0, "rho": 0.1, "sigma": 1e-6, "alpha": 1.6, "cg_max_iter": 20,
            "cg_tol_reduction": 10, "cg_tol_fraction": 0.15, "adaptive_rho": 1, "adaptive_rho_interval": 50,
            "adaptive_rho_fraction": 0.4, "adaptive_rho_tolerance": 5.0, "max_iter": 4000, "eps_abs": 1e-3,
            "eps_rel": 1e-3, "eps_prim_inf": 1e-4, "eps_dual_inf": 1e-4, "scaled_termination": 0,
            "check_termination": 25, "check_dualgap": 1, "time_limit": 1e10, "delta": 1e-6,
            "polish_refine_iter": 3}
#: offsets in OSQPInfo (v1.0.0): status[32], status_val, status_polish, then 5 doubles, then iter
INFO_STATUS_VAL = 32
INFO_ITER = 80
OSQP_SOLVED = 1


class Csc(ctypes.Structure):
    _fields_ = [("m", I), ("n", I), ("p", ctypes.POINTER(I)), ("i", ctypes.POINTER(I)),
                ("x", ctypes.POINTER(F)), ("nzmax", I), ("nz", I)]


def _library() -> ctypes.CDLL:
    mod = Path(osqp.__file__).parent
    found = sorted(mod.glob("ext_builtin*.so")) + sorted(mod.glob("ext_builtin*.pyd"))
    if not found:
        raise OSError(f"no ext_builtin library in {mod}")
    return ctypes.CDLL(str(found[0]))


def _fn(lib: ctypes.CDLL, name: str, restype, *argtypes):  # type: ignore[no-untyped-def]
    f = getattr(lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


class CSolver:
    """One OSQP solver created through the C API; ``at`` (addresses) is what the kernels take."""

    def __init__(self, lib: ctypes.CDLL, handle: int, at: np.ndarray) -> None:
        self.lib = lib
        self.at = at
        cleanup = _fn(lib, "osqp_cleanup", I, U64)
        self._finalizer = weakref.finalize(self, cleanup, handle)

    def close(self) -> None:
        self._finalizer()


def _csc(m: int, n: int, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, keep: list) -> Csc:
    p = np.ascontiguousarray(indptr, dtype=np.int32)
    i = np.ascontiguousarray(indices, dtype=np.int32)
    x = np.ascontiguousarray(values, dtype=np.float64)
    keep += [p, i, x]
    return Csc(m, n, p.ctypes.data_as(ctypes.POINTER(I)), i.ctypes.data_as(ctypes.POINTER(I)),
               x.ctypes.data_as(ctypes.POINTER(F)), x.size, -1)


def open_solver(horizon: int, settings: object, known_answer: float = 1.5) -> tuple[CSolver | None, str]:
    """(solver, "") for the condensed QP of ``horizon`` batches, or (None, reason) when the C
    route fails any check (module docstring). ``settings`` is a dualscale QpSettings.
    ``known_answer`` is what the self-test expects (tests pass a wrong one to force the fallback)."""
    from dualscale.control.qp import a_nnz, a_pattern  # qp imports this module

    try:
        lib = _library()
        version = _fn(lib, "osqp_version", ctypes.c_char_p)().decode()
        if not version.startswith("1.0."):
            return None, f"OSQP C library {version}: the struct layouts here are v1.0's"
        s = Settings()
        _fn(lib, "osqp_set_default_settings", None, ctypes.c_void_p)(ctypes.byref(s))
        for name, want in DEFAULTS.items():
            got = getattr(s, name)
            if not math.isclose(got, want, rel_tol=1e-12):
                return None, f"OSQPSettings layout: {name} reads {got}, OSQP's default is {want}"
        s.verbose = 0
        s.warm_starting = 1
        s.eps_abs = settings.eps_abs  # type: ignore[attr-defined]
        s.eps_rel = settings.eps_rel  # type: ignore[attr-defined]
        s.max_iter = settings.max_iter  # type: ignore[attr-defined]
        s.polishing = int(settings.polish)  # type: ignore[attr-defined]
        s.adaptive_rho = int(settings.adaptive_rho)  # type: ignore[attr-defined]
        s.rho = settings.rho  # type: ignore[attr-defined]
        s.check_termination = settings.check_termination  # type: ignore[attr-defined]
        k = horizon
        keep: list = []
        p = _csc(k, k, np.arange(k + 1), np.arange(k), np.ones(k), keep)
        indptr, indices = a_pattern(k)
        a = _csc(2 * k, k, indptr, indices, np.ones(a_nnz(k)), keep)
        q = np.zeros(k)
        lower = np.concatenate([np.full(k, -mpc.OSQP_INFTY), np.ones(k)])
        upper = np.concatenate([np.full(k, mpc.OSQP_INFTY), np.ones(k)])
        solver = ctypes.c_void_p()
        setup = _fn(lib, "osqp_setup", I, ctypes.c_void_p, ctypes.c_void_p, U64, ctypes.c_void_p, U64, U64, I, I,
                    ctypes.c_void_p)
        rc = setup(ctypes.byref(solver), ctypes.byref(p), q.ctypes.data, ctypes.byref(a), lower.ctypes.data,
                   upper.ctypes.data, 2 * k, k, ctypes.byref(s))
        if rc != 0 or not solver.value:
            return None, f"osqp_setup returned {rc}"
        handle = int(solver.value)
        # OSQPSolver is {settings*, solution*, info*, work*}; OSQPSolution starts {x*, y*}
        ptrs = (ctypes.c_uint64 * 3).from_address(handle)
        sol = (ctypes.c_uint64 * 2).from_address(ptrs[1])
        at = np.zeros(mpc.N_ADDR, dtype=np.int64)
        at[mpc.A_SOLVER] = handle
        at[mpc.A_X] = sol[0]
        at[mpc.A_Y] = sol[1]
        at[mpc.A_STATUS] = ptrs[2] + INFO_STATUS_VAL
        at[mpc.A_ITER] = ptrs[2] + INFO_ITER
        osqp_c.bind({"osqp_update_data_vec": _fn(lib, "osqp_update_data_vec", I, U64, U64, U64, U64),
                     "osqp_update_data_mat": _fn(lib, "osqp_update_data_mat", I, U64, U64, U64, I, U64, U64, I),
                     "osqp_warm_start": _fn(lib, "osqp_warm_start", I, U64, U64, U64),
                     "osqp_solve": _fn(lib, "osqp_solve", I, U64),
                     "memcpy": _fn(ctypes.CDLL(None), "memcpy", U64, U64, U64, U64)})
        out = CSolver(lib, handle, at)
        # the self-test solves to OSQP's default iteration limit (the controller's 50 is too few for
        # its test problem at long horizons), then the controller's settings are restored
        update = _fn(lib, "osqp_update_settings", I, U64, ctypes.c_void_p)
        test = Settings.from_buffer_copy(s)
        test.max_iter = DEFAULTS["max_iter"]
        rc = update(handle, ctypes.byref(test))
        reason = _self_test(out, horizon, known_answer) if rc == 0 else f"osqp_update_settings returned {rc}"
        if not reason and update(handle, ctypes.byref(s)) != 0:
            reason = "osqp_update_settings failed restoring the settings"
        if reason:
            out.close()
            return None, reason
        return out, ""
    except (OSError, AttributeError, ValueError, TypeError) as e:
        return None, f"{type(e).__name__}: {e}"


def _self_test(c: CSolver, horizon: int, known_answer: float) -> str:
    """"" when a solve through the compiled kernel gives the known answer of a small problem:
    u_k = 1.5 minimises (u_k - 1.5)^2 inside loose bounds; else what went wrong."""
    from dualscale.control.qp import a_nnz

    k = horizon
    px = np.full(k, 2.0)
    q = np.full(k, -3.0)
    ax = np.ones(a_nnz(k))
    upper = np.concatenate([np.arange(1, k + 1) * 10.0, np.full(k, 3.0)])
    x = np.empty(k)
    y = np.empty(2 * k)
    stats = np.zeros(mpc.N_STATS, dtype=np.int64)
    ok = osqp_c.osqp_step(c.at, px, q, ax, upper, np.ones(k), np.zeros(2 * k), x, y, stats)
    if not ok:
        return "self-test: an OSQP C call returned an error"
    if stats[mpc.ST_STATUS] != OSQP_SOLVED:
        return f"self-test: info status reads {stats[mpc.ST_STATUS]}, expected {OSQP_SOLVED} (solved)"
    if not 0 < stats[mpc.ST_ITER] <= 10_000:
        return f"self-test: info iterations read {stats[mpc.ST_ITER]}"
    if not np.allclose(x, known_answer, atol=1e-2):
        return f"self-test: solution {x.tolist()} instead of {known_answer} in every entry"
    # the multipliers of this problem are all zero (no constraint binds)
    if not np.allclose(y, 0.0, atol=1e-2):
        return f"self-test: multipliers {y.tolist()} instead of 0"
    # a second solve must not depend on the first (warm start from a different point)
    ok = osqp_c.osqp_step(c.at, px, q, ax, upper, np.full(k, 2.5), np.zeros(2 * k), x, y, stats)
    if not ok or not np.allclose(x, known_answer, atol=1e-2):
        return "self-test: a second solve disagreed"
    return ""
