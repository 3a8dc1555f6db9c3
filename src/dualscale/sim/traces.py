"""Request traces for the simulator: when each request arrives and how long its prompt and output are.

A :class:`Trace` is three parallel arrays (arrival time in seconds, input tokens, output tokens).
Three real traces ship inside the package (``builtin_traces()``); users can load their own CSV
or JSONL file with the same ``load_trace``. Four transforms derive new traces: ``gamma_trace``
(synthetic arrivals with the lengths of a real trace), ``downsample`` and ``time_scale`` (reach a
target rate) and ``window`` (cut a time slice).

Every trace this module returns starts at 0.0 s (its first request) and is sorted by arrival.

File format (CSV with a header, or JSONL with one object per line; ``.gz`` is decompressed):

============  ==============================================================================
quantity      accepted column names (exactly one per file)
============  ==============================================================================
arrival       ``arrival_s``, ``timestamp_s`` (seconds); ``timestamp_ms`` (milliseconds);
              ``TIMESTAMP`` (Azure wall-clock string ``YYYY-MM-DD HH:MM:SS.fffffff``);
              ``timestamp``: seconds, except next to ``input_length`` (the Mooncake layout),
              where it is milliseconds as in the Mooncake release
input         ``input_tokens``, ``ContextTokens``, ``input_length``
output        ``output_tokens``, ``GeneratedTokens``, ``output_length``
============  ==============================================================================

Other columns (e.g. Mooncake's ``hash_ids``) are ignored. Loading rules:

* rows out of time order are sorted stably (ties keep file order), then re-based so the first
  request arrives at 0.0 s;
* ``input_tokens`` must be >= 1 (a request without a prompt cannot be prefilled);
* ``output_tokens`` of 0 becomes 1: prefill always emits the first token, so such a request still
  costs a prefill and one token (the shipped traces contain no zeros; user logs of requests
  cancelled at the first token do). Negative counts are an error.

Malformed files raise :class:`dualscale.errors.DataError` naming the file, the line, the column
and the value. Invalid arguments raise ``ValueError`` naming the argument, the value and the rule.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from dualscale import _validate
from dualscale.errors import DataError

__all__ = [
    "Trace",
    "builtin_traces",
    "downsample",
    "gamma_trace",
    "load_trace",
    "rebuild_builtin_traces",
    "time_scale",
    "window",
]

_SPLITWISE = 'Patel et al., "Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024'
_MOONCAKE = 'Qin et al., "Mooncake: A KVCache-centric Disaggregated Architecture for LLM Serving", FAST 2025'

#: built-in name -> (path of the source file under the shared data folder, provenance line)
_BUILTINS: dict[str, tuple[str, str]] = {
    "azure-code": (
        "azure_llm_inference_2023/AzureLLMInferenceTrace_code.csv",
        (
            "Azure LLM inference trace 2023, code (Azure/AzurePublicDataset@b469a11 "
            f"data/AzureLLMInferenceTrace_code.csv), CC-BY 4.0; {_SPLITWISE}"
        ),
    ),
    "azure-conv": (
        "azure_llm_inference_2023/AzureLLMInferenceTrace_conv.csv",
        (
            "Azure LLM inference trace 2023, conversation (Azure/AzurePublicDataset@b469a11 "
            f"data/AzureLLMInferenceTrace_conv.csv), CC-BY 4.0; {_SPLITWISE}"
        ),
    ),
    "mooncake-conv": (
        "mooncake/conversation_trace.jsonl",
        (
            "Mooncake conversation trace (kvcache-ai/Mooncake@3b5a594 "
            f"FAST25-release/traces/conversation_trace.jsonl), Apache-2.0; {_MOONCAKE}"
        ),
    ),
}

_ARRIVAL_NAMES = ("arrival_s", "timestamp_s", "timestamp_ms", "TIMESTAMP", "timestamp")
_INPUT_NAMES = ("input_tokens", "ContextTokens", "input_length")
_OUTPUT_NAMES = ("output_tokens", "GeneratedTokens", "output_length")
# Azure writes 7 decimals; numpy parses up to nanoseconds exactly. No time zones: only differences matter.
_WALL_CLOCK = re.compile(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(\.\d{1,9})?")
# Guard against an accidental rate * duration that would not fit in memory.
_MAX_GAMMA_REQUESTS = 100_000_000


@dataclass(frozen=True)
class Trace:
    """Requests in arrival order. The arrays are copied on construction and made read-only.

    Attributes:
        name: short label (a built-in name, a file name, or a description of the transform).
        arrival_s: arrival time of each request, seconds, non-decreasing (0.0 first after loading).
        input_tokens: prompt length of each request, tokens, >= 1.
        output_tokens: generated length of each request, tokens, >= 1 (the first token always comes).
        source: provenance and attribution of the data.
    """

    name: str
    arrival_s: NDArray[np.float64]
    input_tokens: NDArray[np.int64]
    output_tokens: NDArray[np.int64]
    source: str

    def __post_init__(self) -> None:
        arrival = np.array(self.arrival_s, dtype=np.float64)
        if arrival.ndim != 1:
            raise ValueError(f"arrival_s: expected a 1-D array (one time per request), got shape {arrival.shape}")
        if not np.all(np.isfinite(arrival)):
            i = int(np.flatnonzero(~np.isfinite(arrival))[0])
            raise ValueError(f"arrival_s[{i}] = {arrival[i].item()!r}: must be finite")
        if np.any(np.diff(arrival) < 0):
            i = int(np.flatnonzero(np.diff(arrival) < 0)[0]) + 1
            raise ValueError(
                f"arrival_s[{i}] = {arrival[i].item()!r}: must be >= arrival_s[{i - 1}] = {arrival[i - 1].item()!r}"
            )
        n = len(arrival)
        columns: dict[str, NDArray[Any]] = {"arrival_s": arrival}
        for name in ("input_tokens", "output_tokens"):
            tokens = np.array(_validate.token_array(name, getattr(self, name), minimum=1, allow_empty=True))
            if len(tokens) != n:
                raise ValueError(f"{name}: has {len(tokens)} entries, arrival_s has {n}; they must match")
            columns[name] = tokens
        # Read-only arrays make a Trace safe to share (and to cache) between simulations.
        for name, values in columns.items():
            values.setflags(write=False)
            object.__setattr__(self, name, values)

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        """Seconds from the first to the last arrival (0.0 for fewer than two requests)."""
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) else 0.0

    @property
    def rate_per_s(self) -> float:
        """Mean arrival rate, requests per second: ``len(trace) / duration_s``.

        Raises:
            ValueError: the trace spans 0 s (fewer than two distinct arrival times).
        """
        if self.duration_s <= 0.0:
            raise ValueError(f"trace {self.name!r}: {len(self)} request(s) over 0 s; its rate is undefined")
        return len(self) / self.duration_s

    def _take(self, idx: NDArray[np.int64], name: str) -> Trace:
        """The requests at ``idx`` (sorted), re-based so the first one arrives at 0.0 s."""
        arrival = self.arrival_s[idx]
        if len(arrival):
            arrival = arrival - arrival[0]
        return Trace(name, arrival, self.input_tokens[idx], self.output_tokens[idx], self.source)


# ----------------------------------------------------------------------------------------------
# Loading


def builtin_traces() -> list[str]:
    """Names of the traces shipped with dualscale, sorted."""
    return sorted(_BUILTINS)


def load_trace(name_or_path: str | Path) -> Trace:
    """Load a built-in trace by name, or a user CSV/JSONL file (see the module docstring for the format).

    A ``str`` that is a built-in name loads the built-in, even if a file of that name exists;
    pass a ``Path`` to force a file.

    Raises:
        DataError: the file is missing or malformed (the message names file, line, column, value).
    """
    if isinstance(name_or_path, str) and name_or_path in _BUILTINS:
        return _load_builtin(name_or_path)
    path = Path(name_or_path)
    if not path.is_file():
        raise DataError(f"{path}: no such trace file (built-in traces: {', '.join(builtin_traces())})")
    arrival_s, input_tokens, output_tokens = _read(path)
    order = np.argsort(arrival_s, kind="stable")
    arrival_s = arrival_s[order]
    # The first token always comes out of prefill, so a logged 0 means "stopped after it".
    output_tokens = np.maximum(output_tokens[order], 1)
    name = path.name.removesuffix(".gz").rsplit(".", 1)[0]
    return Trace(name, arrival_s - arrival_s[0], input_tokens[order], output_tokens, str(path))


@functools.cache
def _load_builtin(name: str) -> Trace:
    # Cached: a Trace is immutable, and sweeps load the same trace once per run.
    resource = resources.files("dualscale.sim") / "data" / f"{name}.csv.gz"
    with resources.as_file(resource) as path:
        trace = load_trace(path)
    return Trace(name, trace.arrival_s, trace.input_tokens, trace.output_tokens, _BUILTINS[name][1])


def _read(path: Path) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.int64]]:
    """Rows of ``path`` in file order: arrival (seconds, rebased to the earliest), input and output tokens."""
    is_jsonl = path.name.removesuffix(".gz").endswith((".jsonl", ".json"))
    try:
        with _open_text(path) as fh:
            rows = list(_jsonl_rows(path, fh) if is_jsonl else _csv_rows(path, fh))
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    if not rows:
        raise DataError(f"{path}: no requests (a trace needs at least one row)")
    keys = _pick_columns(path, rows[0][1])
    arrival_key, input_key, output_key = keys
    times, inputs, outputs = [], [], []
    for line, row in rows:
        for key in keys:
            if key not in row:
                raise DataError(f"{path}, line {line}: column {key!r} is missing")
        times.append(row[arrival_key])
        inputs.append(_tokens(path, line, input_key, row[input_key], minimum=1))
        outputs.append(_tokens(path, line, output_key, row[output_key], minimum=0))
    lines = [line for line, _ in rows]
    arrival_s = _arrival_seconds(path, lines, arrival_key, times, ms=_is_milliseconds(arrival_key, keys))
    return arrival_s, np.array(inputs, dtype=np.int64), np.array(outputs, dtype=np.int64)


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def _csv_rows(path: Path, fh: io.TextIOBase) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(fh)
    if reader.fieldnames is None:
        raise DataError(f"{path}: empty file (expected a CSV header naming arrival, input and output columns)")
    for row in reader:
        yield reader.line_num, row


def _jsonl_rows(path: Path, fh: io.TextIOBase) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, text in enumerate(fh, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {line}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {line}: expected a JSON object, got {text.strip()[:60]!r}")
        yield line, row


def _pick_columns(path: Path, row: dict[str, Any]) -> tuple[str, str, str]:
    """The arrival, input and output column names of a file, from its header or first record."""
    picked = []
    for quantity, names in (("arrival", _ARRIVAL_NAMES), ("input", _INPUT_NAMES), ("output", _OUTPUT_NAMES)):
        present = [n for n in names if n in row]
        if len(present) != 1:
            found = "none" if not present else f"several ({', '.join(present)})"
            raise DataError(
                f"{path}: needs exactly one {quantity} column, found {found}; accepted names: {', '.join(names)}"
            )
        picked.append(present[0])
    return picked[0], picked[1], picked[2]


def _is_milliseconds(arrival_key: str, keys: tuple[str, str, str]) -> bool:
    # Mooncake's release names its millisecond clock plain "timestamp", next to "input_length".
    return arrival_key == "timestamp_ms" or (arrival_key == "timestamp" and keys[1] == "input_length")


def _tokens(path: Path, line: int, key: str, value: Any, minimum: int) -> int:
    """One token count: a whole number >= ``minimum`` (``"12"``, ``12`` and ``12.0`` are accepted)."""
    count: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    elif isinstance(value, (str, float)) and not isinstance(value, bool):
        try:
            count = int(value)
        except (ValueError, OverflowError):
            try:
                as_float = float(value)
                count = int(as_float) if as_float.is_integer() else None
            except (ValueError, OverflowError):
                count = None
    if count is None:
        raise DataError(f"{path}, line {line}: {key} = {value!r}: expected a whole number of tokens")
    if count < minimum:
        raise DataError(f"{path}, line {line}: {key} = {value!r}: must be >= {minimum}")
    return count


def _arrival_seconds(path: Path, lines: list[int], key: str, values: list[Any], ms: bool) -> NDArray[np.float64]:
    """Arrival times in seconds, rebased to the earliest so wall clocks keep sub-microsecond precision."""
    if key == "TIMESTAMP":
        stamps = np.empty(len(values), dtype="datetime64[ns]")
        for i, (line, value) in enumerate(zip(lines, values)):
            if not isinstance(value, str) or not _WALL_CLOCK.fullmatch(value.strip()):
                raise DataError(
                    f"{path}, line {line}: {key} = {value!r}: expected a date and time 'YYYY-MM-DD HH:MM:SS[.fffffff]'"
                )
            stamps[i] = np.datetime64(value.strip(), "ns")
        # Integer nanoseconds first: a float of seconds since 1970 would lose the 7th decimal.
        return np.asarray((stamps - stamps.min()).astype(np.int64) / 1e9, dtype=np.float64)
    numbers = np.empty(len(values), dtype=np.float64)
    unit = "milliseconds" if ms else "seconds"
    for i, (line, value) in enumerate(zip(lines, values)):
        try:
            if isinstance(value, bool):
                raise ValueError
            numbers[i] = float(value)
        except (TypeError, ValueError):
            numbers[i] = math.nan
        if not math.isfinite(numbers[i]):
            hint = " (wall-clock strings go in a TIMESTAMP column)" if isinstance(value, str) else ""
            raise DataError(f"{path}, line {line}: {key} = {value!r}: expected a finite number of {unit}{hint}")
    numbers -= numbers.min()
    return numbers / 1e3 if ms else numbers


# ----------------------------------------------------------------------------------------------
# Transforms


def gamma_trace(rate_per_s: float, cv: float, duration_s: float, lengths_from: Trace, seed: int) -> Trace:
    """Synthetic arrivals with Gamma inter-arrival times and request lengths drawn from a real trace.

    Gaps have mean ``1 / rate_per_s`` seconds and coefficient of variation ``cv`` (Gamma shape
    ``1 / cv**2``): ``cv = 1`` is a Poisson process, ``cv > 1`` burstier, ``cv = 0`` evenly spaced.
    The first request arrives at 0.0 s and the last before ``duration_s``. Each request takes the
    (input, output) pair of a row of ``lengths_from`` drawn uniformly with replacement.

    Args:
        rate_per_s: mean arrival rate, requests per second, > 0.
        cv: coefficient of variation of the gaps (std / mean), >= 0.
        duration_s: length of the trace, seconds, > 0.
        lengths_from: the trace whose (input, output) pairs are resampled; at least one request.
        seed: seed of the ``numpy.random.Generator``; the same seed gives the same trace.
    """
    rate_per_s = _validate.finite("rate_per_s", rate_per_s, lo=0.0, lo_open=True)
    cv = _validate.finite("cv", cv, lo=0.0)
    duration_s = _validate.finite("duration_s", duration_s, lo=0.0, lo_open=True)
    seed = _validate.whole("seed", seed, minimum=0)
    if not isinstance(lengths_from, Trace):
        raise TypeError(f"lengths_from = {type(lengths_from).__name__}: expected a Trace")
    if len(lengths_from) == 0:
        raise ValueError(f"lengths_from = trace {lengths_from.name!r}: has no requests; needs at least one")
    expected = rate_per_s * duration_s
    if expected > _MAX_GAMMA_REQUESTS:
        raise ValueError(
            f"rate_per_s * duration_s = {expected:.3g}: must be <= {_MAX_GAMMA_REQUESTS:.0e} requests"
        )
    rng = np.random.default_rng(seed)
    mean_gap_s = 1.0 / rate_per_s
    gaps: list[NDArray[np.float64]] = []
    total_s = 0.0
    while total_s < duration_s:  # draw in chunks until the arrivals pass the end
        chunk = max(64, int(1.1 * (duration_s - total_s) * rate_per_s) + 64)
        if cv == 0.0:
            draw = np.full(chunk, mean_gap_s)
        else:
            shape = 1.0 / cv**2
            draw = rng.gamma(shape, mean_gap_s / shape, size=chunk)
        gaps.append(draw)
        total_s += float(draw.sum())
    arrival_s = np.concatenate([[0.0], np.cumsum(np.concatenate(gaps))])
    arrival_s = arrival_s[arrival_s < duration_s]
    rows = rng.integers(0, len(lengths_from), size=len(arrival_s))
    return Trace(
        f"gamma(rate={rate_per_s:g}/s, cv={cv:g}, {duration_s:g} s, lengths={lengths_from.name}, seed={seed})",
        arrival_s,
        lengths_from.input_tokens[rows],
        lengths_from.output_tokens[rows],
        f"synthetic Gamma arrivals; lengths resampled from: {lengths_from.source}",
    )


def downsample(trace: Trace, rate_per_s: float) -> Trace:
    """Keep evenly spaced requests (by index) with their original timestamps to lower the mean rate.

    This is how the paper scales a trace down: the arrival pattern (bursts, diurnal drift) is kept,
    only thinned. The first and last requests are always kept, so the span stays the same and the
    kept count is ``round(rate_per_s * trace.duration_s)``, within half a request of the target.

    Args:
        trace: the trace to thin; spans more than 0 s.
        rate_per_s: target mean rate, requests per second, in (0, trace.rate_per_s]; it must keep
            at least two requests.
    """
    rate_per_s = _validate.finite("rate_per_s", rate_per_s, lo=0.0, lo_open=True)
    if rate_per_s > trace.rate_per_s:
        raise ValueError(
            f"rate_per_s = {rate_per_s!r}: must be <= the rate of trace {trace.name!r} "
            f"({trace.rate_per_s:.6g}/s); downsampling cannot add requests, use time_scale"
        )
    n = len(trace)
    keep = min(n, round(rate_per_s * trace.duration_s))
    if keep < 2:
        raise ValueError(
            f"rate_per_s = {rate_per_s!r}: keeps {keep} request(s) of trace {trace.name!r} over "
            f"{trace.duration_s:.6g} s; must keep at least 2 (rate >= {1.5 / trace.duration_s:.3g}/s)"
        )
    # Index i * (n-1) / (keep-1), rounded half up in integer arithmetic: exact, strictly increasing.
    i = np.arange(keep, dtype=np.int64)
    idx = (2 * i * (n - 1) + (keep - 1)) // (2 * (keep - 1))
    return trace._take(idx, f"{trace.name}@{rate_per_s:g}/s")


def time_scale(trace: Trace, rate_per_s: float) -> Trace:
    """Stretch or compress time so that the mean rate becomes ``rate_per_s`` (same requests, same order).

    Args:
        trace: the trace to rescale; spans more than 0 s.
        rate_per_s: target mean rate, requests per second, > 0.
    """
    rate_per_s = _validate.finite("rate_per_s", rate_per_s, lo=0.0, lo_open=True)
    if trace.duration_s <= 0.0:
        raise ValueError(
            f"trace = {trace.name!r}: spans 0 s ({len(trace)} request(s)); time_scale needs two distinct arrival times"
        )
    span_s = len(trace) / rate_per_s  # the new duration, seconds
    # Fraction of the span first: the last request lands on span_s exactly, whatever the old span.
    arrival_s = (trace.arrival_s - trace.arrival_s[0]) / trace.duration_s * span_s
    return Trace(
        f"{trace.name}~{rate_per_s:g}/s", arrival_s, trace.input_tokens, trace.output_tokens, trace.source
    )


def window(trace: Trace, start_s: float, duration_s: float) -> Trace:
    """The requests with ``start_s <= arrival_s < start_s + duration_s``, re-based to start at 0.0 s.

    Like every trace here, the result starts at its first request: the idle gap between
    ``start_s`` and the first request in the window is dropped. The result may be empty.

    Args:
        trace: the trace to cut.
        start_s: window start on the trace's clock, seconds, >= 0.
        duration_s: window length, seconds, > 0.
    """
    start_s = _validate.finite("start_s", start_s, lo=0.0)
    duration_s = _validate.finite("duration_s", duration_s, lo=0.0, lo_open=True)
    lo, hi = np.searchsorted(trace.arrival_s, [start_s, start_s + duration_s], side="left")
    return trace._take(np.arange(lo, hi, dtype=np.int64), f"{trace.name}[{start_s:g}s+{duration_s:g}s]")


# ----------------------------------------------------------------------------------------------
# Packaged data


def rebuild_builtin_traces(data_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Regenerate the packaged ``<name>.csv.gz`` files from the public source files.

    Rows keep their source order and counts; arrival is seconds since the trace's earliest request,
    written as the shortest decimal that reads back to the same float64 (Azure's 100 ns wall clock
    therefore keeps its 7 decimals, Mooncake's integer milliseconds 3). Token counts are copied
    unchanged (zeros would be kept; ``load_trace`` maps an output of 0 to 1). The output is
    byte-identical on re-run: fixed line endings, gzip with ``mtime=0`` and no file name.

    Args:
        data_dir: the shared data folder holding ``azure_llm_inference_2023/`` and ``mooncake/``.
        out_dir: where to write the files (``src/dualscale/sim/data`` in a checkout); created if needed.

    Returns:
        The written paths, in ``builtin_traces()`` order.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in builtin_traces():
        source = data_dir / _BUILTINS[name][0]
        if not source.is_file():
            raise DataError(f"{source}: source of built-in trace {name!r} not found")
        arrival_s, input_tokens, output_tokens = _read(source)
        lines = ["arrival_s,input_tokens,output_tokens\n"]
        lines += [
            f"{np.format_float_positional(t, unique=True, trim='-')},{i},{o}\n"
            for t, i, o in zip(arrival_s.tolist(), input_tokens.tolist(), output_tokens.tolist())
        ]
        path = out_dir / f"{name}.csv.gz"
        with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
            gz.write("".join(lines).encode("ascii"))
        written.append(path)
    return written
