"""PNG plots of simulated runs: clock, power and queue over time per instance; energy per phase.

Timelines hold one segment per iteration (hundreds of thousands per hour), so they are binned in
time first: the time-weighted mean clock and power, and the largest queue, per bin.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from numpy.typing import NDArray  # noqa: E402

from dualscale.sim.engine import RunResult, Timeline  # noqa: E402
from dualscale.sim.metrics import Summary  # noqa: E402

BINS = 1500


def binned(tl: Timeline, end_s: float, bins: int = BINS) -> tuple[NDArray[np.float64], ...]:
    """(bin centres s, mean clock MHz, mean power W per GPU, max queue) of a timeline."""
    edges = np.linspace(0.0, max(end_s, 1e-9), bins + 1)
    t0 = np.asarray(tl.t0_s)
    t1 = np.asarray(tl.t1_s)
    f = np.asarray(tl.freq_mhz, dtype=np.float64)
    w = np.asarray(tl.power_w)
    q = np.asarray(tl.queue, dtype=np.float64)
    # overlap of every segment with every bin would be bins x segments; instead integrate through
    # cumulative sums evaluated at the bin edges
    order = np.argsort(t0, kind="stable")
    t0, t1, f, w, q = t0[order], t1[order], f[order], w[order], q[order]

    def integral(rate: NDArray[np.float64]) -> NDArray[np.float64]:
        cum = np.concatenate([[0.0], np.cumsum(rate * (t1 - t0))])
        i = np.searchsorted(t1, edges, side="left")
        inside = np.clip(edges - t0[np.minimum(i, t0.size - 1)], 0.0, None)
        partial = np.where(i < t0.size, rate[np.minimum(i, t0.size - 1)] * inside, 0.0)
        return np.diff(cum[i] + partial)

    width = np.diff(edges)
    mean_f = integral(f) / width
    mean_w = integral(w) / width
    # largest queue in a bin: of the segments starting in it, and of the one running at its start
    bin_of = np.clip(np.searchsorted(edges, t0, side="right") - 1, 0, bins - 1)
    max_q = np.zeros(bins)
    np.maximum.at(max_q, bin_of, q)
    cover = np.searchsorted(t1, edges[:-1], side="right")
    ok = cover < t0.size
    running = np.where(ok, q[np.minimum(cover, t0.size - 1)], 0.0)
    max_q = np.maximum(max_q, np.where(ok & (t0[np.minimum(cover, t0.size - 1)] <= edges[:-1]), running, 0.0))
    return (edges[:-1] + edges[1:]) / 2, mean_f, mean_w, max_q


def plot_run(run: RunResult, out_dir: Path) -> list[Path]:
    """One PNG per phase: clock, power and queue over time, a line per instance."""
    written = []
    for phase, insts in (("prefill", run.prefill), ("decode", run.decode)):
        fig, axes = plt.subplots(3, 1, figsize=(11, 7.5), sharex=True)
        for inst in insts:
            t, f, w, q = binned(inst.timeline, run.end_s)
            label = f"{phase} {inst.index} (TP{inst.tp})"
            axes[0].plot(t, f, lw=0.8, label=label)
            axes[1].plot(t, w, lw=0.8, label=label)
            axes[2].plot(t, q, lw=0.8, label=label)
        axes[0].set_ylabel("SM clock (MHz)")
        axes[1].set_ylabel("power per GPU (W)")
        axes[2].set_ylabel("waiting" if phase == "prefill" else "running")
        axes[2].set_xlabel("time (s)")
        axes[0].set_title(f"{run.policy}: {phase} instances on {run.trace.name} (binned, {BINS} bins)")
        axes[0].legend(loc="upper right", fontsize=7, ncol=4)
        for ax in axes:
            ax.grid(alpha=0.3)
        path = out_dir / f"{_safe(run.policy)}-{phase}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_energy(summaries: Sequence[Summary], out_dir: Path) -> Path:
    """Energy per phase per policy, grouped bars (kJ)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(summaries))
    pre = [s.energy_j.prefill / 1e3 for s in summaries]
    dec = [s.energy_j.decode / 1e3 for s in summaries]
    ax.bar(x - 0.2, pre, 0.4, label="prefill")
    ax.bar(x + 0.2, dec, 0.4, label="decode")
    ax.set_xticks(x, [s.policy for s in summaries])
    ax.set_ylabel("energy (kJ)")
    ax.set_title(f"energy per phase on {summaries[0].trace}" if summaries else "energy per phase")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    path = out_dir / "energy.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def plot_evaluation(rows: Sequence[object], out_dir: Path) -> Path:
    """Energy per phase per policy for each workload and load of ``dualscale evaluate`` (kJ)."""
    cases = list(dict.fromkeys((r.workload, r.load) for r in rows))  # type: ignore[attr-defined]
    policies = list(dict.fromkeys(r.policy for r in rows))  # type: ignore[attr-defined]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=False)
    width = 0.8 / max(1, len(policies))
    x = np.arange(len(cases))
    for ax, phase in zip(axes, ("prefill", "decode")):
        for k, pol in enumerate(policies):
            vals = [next((r.energy_j[phase] / 1e3 for r in rows  # type: ignore[attr-defined]
                          if (r.workload, r.load, r.policy) == (*c, pol)), 0.0) for c in cases]  # type: ignore[attr-defined]
            ax.bar(x + (k - (len(policies) - 1) / 2) * width, vals, width, label=pol)
        ax.set_xticks(x, [f"{w}\n{load:.0%}" for w, load in cases], fontsize=8)
        ax.set_ylabel(f"{phase} energy (kJ)")
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"{phase}")
    axes[0].legend()
    path = out_dir / "evaluate.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
