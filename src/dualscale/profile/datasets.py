"""Readers for the public measurement folders the profile is fitted on and validated against.

Each reader returns plain NumPy arrays with unit-suffixed names. Only ``dualscale profile fit``
and ``dualscale profile validate`` touch these files; the committed profile never does, so a
fresh clone without the data folder still loads and runs.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from dualscale.errors import DataError

#: The seven clocks at which the DualScale authors profiled H100 (their models are trusted only here).
AUTHORS_PROFILED_CLOCKS_MHZ = (360, 570, 780, 1080, 1380, 1680, 1830)


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found (is the data folder next to the checkout?)")
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@dataclass(frozen=True)
class Batches:
    """Iteration shapes with a measured (or authors'-model) latency and per-GPU power.

    ``chunk_tokens`` and ``prefix_tokens`` (prefill) or ``context_tokens`` (decode) are ragged:
    request ``j`` of row ``i`` is entry ``offsets[i] + j``.
    """

    tp: NDArray[np.int64]
    freq_mhz: NDArray[np.float64]
    offsets: NDArray[np.int64]
    tokens: NDArray[np.int64]
    time_s: NDArray[np.float64]
    power_w: NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.tp)

    def batch(self, i: int) -> NDArray[np.int64]:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def subset(self, mask: NDArray[np.bool_]) -> Batches:
        return self.take(np.flatnonzero(mask))

    def take(self, idx: NDArray[np.int64]) -> Batches:
        """The rows ``idx``, in that order."""
        parts = [self.batch(i) for i in idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(p) for p in parts])
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return Batches(
            self.tp[idx], self.freq_mhz[idx], offsets, tokens, self.time_s[idx], self.power_w[idx]
        )


def pack(tp: list[int], freq: list[float], batches: list[list[int]], t: list[float], p: list[float]) -> Batches:
    offsets = np.zeros(len(batches) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in batches])
    tokens = np.array([x for b in batches for x in b], dtype=np.int64)
    return Batches(
        np.array(tp, dtype=np.int64),
        np.array(freq, dtype=np.float64),
        offsets,
        tokens,
        np.array(t, dtype=np.float64),
        np.array(p, dtype=np.float64),
    )


def _trusted(row: dict[str, str]) -> bool:
    """Authors' grid rows at a profiled clock, inside both models' training ranges, not suspect."""
    return (
        row["profiled_clock"] == "1"
        and not row["suspect"]
        and not row["oor_latency_model"]
        and not row["oor_power_model"]
        and row["kv_feasible"] == "1"
    )


def _equal_split(total: int, n: int) -> list[int]:
    base, extra = divmod(total, n)
    return [base + 1] * extra + [base] * (n - extra)


def authors_prefill(data_dir: Path) -> Batches:
    """Prefill-only rows of the authors' LightGBM grid (biscale_authors_models), trusted rows only."""
    tp, freq, batches, t, p = [], [], [], [], []
    for row in _rows(data_dir / "biscale_authors_models" / "prefill_iteration_grid.csv"):
        if not _trusted(row):
            continue
        if row["shape"] == "equal":
            lengths = _equal_split(int(row["total_tokens"]), int(row["n_requests"]))
        else:
            lengths = [int(x) for x in row["lengths"].split()]
        tp.append(int(row["tp"]))
        freq.append(float(row["sm_clock_mhz"]))
        batches.append(lengths)
        t.append(float(row["latency_ms"]) / 1e3)
        p.append(float(row["power_per_gpu_w"]))
    return pack(tp, freq, batches, t, p)


def authors_decode(data_dir: Path) -> Batches:
    """Decode-only rows of the authors' grid with spread contexts (std 0.3 x mean), trusted rows only.

    Contexts are laid out deterministically around the mean with the grid's standard deviation.
    """
    tp, freq, batches, t, p = [], [], [], [], []
    for row in _rows(data_dir / "biscale_authors_models" / "decode_iteration_grid.csv"):
        if not _trusted(row) or row["std_fraction"] != "0.3":
            continue
        b = int(row["batch_size"])
        mean, std = float(row["mean_context"]), float(row["std_context"])
        tp.append(int(row["tp"]))
        freq.append(float(row["sm_clock_mhz"]))
        batches.append(spread_contexts(b, mean, std))
        t.append(float(row["latency_ms"]) / 1e3)
        p.append(float(row["power_per_gpu_w"]))
    return pack(tp, freq, batches, t, p)


def spread_contexts(batch: int, mean: float, std: float) -> list[int]:
    """``batch`` integer contexts with the given mean and (population) std, evenly spaced."""
    if batch == 1:
        return [round(mean)]
    z = np.linspace(-1.0, 1.0, batch)
    z = z / z.std()
    return [max(1, round(mean + std * v)) for v in z]


@dataclass(frozen=True)
class PowerTable:
    tp: NDArray[np.int64]
    tokens: NDArray[np.int64]
    freq_mhz: NDArray[np.float64]
    power_w: NDArray[np.float64]


def authors_prefill_power_lut(data_dir: Path) -> PowerTable:
    """The authors' simulator prefill busy-power table (per GPU), TP2/TP4 x 15 token points x 7 clocks."""
    rows = _rows(data_dir / "biscale_authors_sim" / "h100_llama33_70b_prefill_power_lut.csv")
    return PowerTable(
        np.array([int(r["tp"]) for r in rows]),
        np.array([int(r["batch_prefill_tokens"]) for r in rows]),
        np.array([float(r["sm_clock_mhz"]) for r in rows]),
        np.array([float(r["power_per_gpu_w"]) for r in rows]),
    )


def authors_idle_power(data_dir: Path, tp: int = 4) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Idle floor per GPU vs locked clock (simulator variant): (freq_mhz, power_w)."""
    rows = [
        r
        for r in _rows(data_dir / "biscale_authors_sim" / "h100_llama33_70b_prefill_idle_power.csv")
        if r["variant"] == "simulator" and int(r["tp"]) == tp
    ]
    rows.sort(key=lambda r: float(r["sm_clock_mhz"]))
    return (
        np.array([float(r["sm_clock_mhz"]) for r in rows]),
        np.array([float(r["idle_power_per_gpu_w"]) for r in rows]),
    )


@dataclass(frozen=True)
class ServingSweep:
    """Lowest-load rows of the measured H100 70B serving sweep (prompt 1023, output 99 tokens)."""

    tp: NDArray[np.int64]
    freq_mhz: NDArray[np.float64]
    ttft_s: NDArray[np.float64]
    tpot_s: NDArray[np.float64]
    power_w: NDArray[np.float64]


def serving_sweep_lowest_load(data_dir: Path) -> ServingSweep:
    rows = _rows(data_dir / "biscale_authors_sim" / "h100_70b_serving_sweep_lowest_load_summary.csv")
    return ServingSweep(
        np.array([int(r["tp"]) for r in rows]),
        np.array([float(r["sm_clock_mhz"]) for r in rows]),
        np.array([float(r["ttft_p99_ms"]) / 1e3 for r in rows]),
        np.array([float(r["tpot_p99_ms"]) / 1e3 for r in rows]),
        np.array([float(r["power_per_gpu_w"]) for r in rows]),
    )


def kv_capacity_tokens(data_dir: Path, model: str = "meta-llama/Llama-3.3-70B-Instruct") -> dict[int, int]:
    """DistServe's measured KV capacity (tokens) per TP degree for ``model`` (PP = 1)."""
    out: dict[int, int] = {}
    for r in _rows(data_dir / "biscale_authors_sim" / "kv_capacity_tokens.csv"):
        if r["model"] == model and r["pp"] == "1":
            out[int(r["tp"])] = int(r["kv_capacity_tokens"])
    if not out:
        raise DataError(f"kv_capacity_tokens.csv: no rows for model {model!r}")
    return out


@dataclass(frozen=True)
class MlEnergyDecode:
    """ML.ENERGY steady-state serving at default clocks: batch, median ITL, per-GPU power."""

    batch: NDArray[np.float64]
    itl_s: NDArray[np.float64]
    power_w: NDArray[np.float64]
    avg_output_tokens: NDArray[np.float64]


MLENERGY_CHAT = Path("mlenergy_leaderboard") / "lm-arena-chat_configs_flat.csv"


def mlenergy_h100_tp(data_dir: Path, model_id: str) -> list[int]:
    """TP degrees of ``model_id``'s H100 lm-arena-chat rows that use one TP group (num_gpus = TP)."""
    return sorted({int(r["tensor_parallel"]) for r in _rows(data_dir / MLENERGY_CHAT)
                   if r["model_id"] == model_id and r["gpu_model"] == "H100"
                   and r["num_gpus"] == r["tensor_parallel"]})


def mlenergy_decode(data_dir: Path, gpus: int = 4, model_id: str = "meta-llama/Llama-3.3-70B-Instruct") -> MlEnergyDecode:
    rows = [
        r
        for r in _rows(data_dir / MLENERGY_CHAT)
        if r["model_id"] == model_id
        and r["gpu_model"] == "H100"
        and int(r["num_gpus"]) == gpus
        and int(r["tensor_parallel"]) == gpus
    ]
    rows.sort(key=lambda r: float(r["avg_batch_size"]))
    return MlEnergyDecode(
        np.array([float(r["avg_batch_size"]) for r in rows]),
        np.array([float(r["median_itl_ms"]) / 1e3 for r in rows]),
        np.array([float(r["avg_power_watts"]) / gpus for r in rows]),
        np.array([float(r["avg_output_len"]) for r in rows]),
    )


def splitwise_h100(data_dir: Path) -> dict[tuple[int, str, int, int], float]:
    """Median Splitwise Llama-2-70B H100 times: key (tp, 'prompt'|'token', prompt_size, batch) -> s."""
    groups: dict[tuple[int, str, int, int], list[float]] = {}
    for r in _rows(data_dir / "splitwise_sim_perf_model" / "perf_model.csv"):
        if r["model"] != "llama2-70b" or r["hardware"] != "h100-80gb":
            continue
        tp, ps, bs = int(r["tensor_parallel"]), int(r["prompt_size"]), int(r["batch_size"])
        groups.setdefault((tp, "prompt", ps, bs), []).append(float(r["prompt_time"]) / 1e3)
        groups.setdefault((tp, "token", ps, bs), []).append(float(r["token_time"]) / 1e3)
    return {k: float(np.median(v)) for k, v in groups.items()}


@dataclass(frozen=True)
class ClockSweep:
    """Per-iteration latency of fixed batch shapes at many locked clocks (one GPU)."""

    shape_id: NDArray[np.int64]
    freq_mhz: NDArray[np.float64]
    work_tokens: NDArray[np.float64]
    batch: NDArray[np.float64]
    time_s: NDArray[np.float64]


def l4_sweep(data_dir: Path, kind: str) -> ClockSweep:
    """vLLM L4 Llama-3-8B profiles, ``kind`` in {'prefill-only', 'decode-only'}; median of repeats."""
    path = data_dir / "vllm_dvfs_l4_llama3_8b_profiles" / f"profile_L4_Llama3-8B_{kind}.json"
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    entries = json.loads(path.read_text())
    shape_ids: dict[tuple[int, int, int, int], int] = {}
    sid, freq, work, batch, t = [], [], [], [], []
    for e in entries:
        key = (e["prefill_batch_size"], e["sum_prefill_len"], e["decode_batch_size"], e["sum_decode_len"])
        sid.append(shape_ids.setdefault(key, len(shape_ids)))
        freq.append(float(e["frequency"]))
        work.append(float(e["sum_prefill_len"] if kind == "prefill-only" else e["sum_decode_len"]))
        batch.append(float(e["prefill_batch_size"] if kind == "prefill-only" else e["decode_batch_size"]))
        t.append(float(np.median(e["latencies"])))
    return ClockSweep(np.array(sid), np.array(freq), np.array(work), np.array(batch), np.array(t))


def perseus_forward(data_dir: Path, name: str = "gpt3-175b+a100_sxm_bf16") -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Perseus stage-0 forward pass: (freq_mhz, time_s, power_w), sorted by clock."""
    rows = [
        r
        for r in _rows(data_dir / "perseus_sosp24_freq_profiles" / f"stage_profile_{name}.csv")
        if r["stage"] == "0" and r["instruction"] == "forward"
    ]
    rows.sort(key=lambda r: float(r["frequency"]))
    f = np.array([float(r["frequency"]) for r in rows])
    t = np.array([float(r["time"]) for r in rows])
    e = np.array([float(r["energy"]) for r in rows])
    return f, t, e / t
