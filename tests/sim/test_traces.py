from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dualscale.errors import DataError
from dualscale.sim import traces
from dualscale.sim.traces import (
    Trace,
    builtin_traces,
    downsample,
    gamma_trace,
    load_trace,
    rebuild_builtin_traces,
    time_scale,
    window,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
PACKAGED = Path(traces.__file__).parent / "data"


def make_trace(arrival_s, name="t") -> Trace:
    """A trace whose input_tokens are 1..n, so a derived trace tells which rows it kept."""
    n = len(arrival_s)
    return Trace(name, np.asarray(arrival_s, dtype=float), np.arange(1, n + 1), np.full(n, 7), "test")


@st.composite
def arrivals(draw, min_size=2):
    # Ties (0 s gaps) happen in real traces; gaps below 1 us do not, and only stress float rounding.
    gap = st.one_of(st.just(0.0), st.floats(1e-6, 10.0))
    gaps = draw(st.lists(gap, min_size=min_size - 1, max_size=300))
    a = np.concatenate([[0.0], np.cumsum(gaps)])
    if a[-1] == 0.0:  # a trace needs a non-zero span to have a rate
        a[-1] = 1.0
    return a


# ---------------------------------------------------------------------------- built-ins


def test_builtin_names():
    assert builtin_traces() == ["azure-code", "azure-conv", "mooncake-conv"]


# rows, mean input, mean output, span (s), rate (req/s): the shared data READMEs' numbers
@pytest.mark.parametrize(
    "name, rows, mean_in, mean_out, span_s, rate",
    [
        ("azure-code", 8819, 2048, 28, 3436, 2.57),
        ("azure-conv", 19366, 1155, 211, 3502, 5.53),
        ("mooncake-conv", 12031, 12035, 343, 3537, 3.40),
    ],
)
def test_builtin_matches_published_summary(name, rows, mean_in, mean_out, span_s, rate):
    trace = load_trace(name)
    assert trace.name == name
    assert len(trace) == rows
    assert round(trace.input_tokens.mean()) == mean_in
    assert round(trace.output_tokens.mean()) == mean_out
    assert round(trace.duration_s) == span_s
    assert trace.rate_per_s == pytest.approx(rate, abs=0.005)
    assert trace.arrival_s[0] == 0.0
    assert np.all(np.diff(trace.arrival_s) >= 0)
    assert trace.input_tokens.min() >= 1 and trace.output_tokens.min() >= 1
    assert ("CC-BY 4.0" if name.startswith("azure") else "Apache-2.0") in trace.source
    assert ("Splitwise" if name.startswith("azure") else "Mooncake") in trace.source


def test_builtin_keeps_azure_sub_millisecond_resolution():
    # Source rows 1-3: 18:15:46.6805900, 18:15:50.9951690, 18:15:51.2224670 (wall clock).
    arrival_s = load_trace("azure-conv").arrival_s
    assert arrival_s[:3].tolist() == [0.0, 4.314579, 4.541877]


def test_builtin_is_cached_and_read_only():
    trace = load_trace("azure-code")
    assert load_trace("azure-code") is trace
    with pytest.raises(ValueError, match="read-only"):
        trace.arrival_s[0] = 1.0


def test_builtin_files_ship_in_the_package():
    assert sorted(p.name for p in PACKAGED.glob("*.csv.gz")) == [f"{n}.csv.gz" for n in builtin_traces()]


def test_rebuild_writes_the_documented_format(tmp_path):
    # A miniature copy of the shared data layout, so this runs without ../shared.
    azure = (
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,0\n"
    )
    mooncake = (
        '{"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0]}\n'
        '{"timestamp": 1500, "input_length": 12, "output_length": 3, "hash_ids": []}\n'
    )
    for rel, _ in traces._BUILTINS.values():
        write_to = tmp_path / "src" / rel
        write_to.parent.mkdir(parents=True, exist_ok=True)
        write(write_to, mooncake if rel.endswith(".jsonl") else azure)
    first = rebuild_builtin_traces(tmp_path / "src", tmp_path / "a")
    second = rebuild_builtin_traces(tmp_path / "src", tmp_path / "b")
    assert [p.name for p in first] == ["azure-code.csv.gz", "azure-conv.csv.gz", "mooncake-conv.csv.gz"]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()
        assert a.read_bytes()[4:8] == bytes(4)  # gzip mtime field
    # Rows as in the source, including the output 0 (the loader, not the file, maps it to 1).
    assert gzip.decompress(first[0].read_bytes()).decode() == (
        "arrival_s,input_tokens,output_tokens\n0,374,44\n4.314579,396,0\n"
    )
    assert gzip.decompress(first[2].read_bytes()).decode() == (
        "arrival_s,input_tokens,output_tokens\n0,6758,500\n1.5,12,3\n"
    )
    assert load_trace(first[0]).output_tokens.tolist() == [44, 1]
    with pytest.raises(DataError, match="source of built-in trace 'azure-code' not found"):
        rebuild_builtin_traces(tmp_path / "missing", tmp_path / "c")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data folder not next to the checkout")
def test_packaged_files_equal_a_fresh_rebuild(tmp_path):
    first = rebuild_builtin_traces(SHARED_DATA, tmp_path / "a")
    second = rebuild_builtin_traces(SHARED_DATA, tmp_path / "b")
    assert [p.name for p in first] == [f"{n}.csv.gz" for n in builtin_traces()]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()  # byte-identical on re-run
        # Compare content, not bytes: another zlib build may compress the same text differently.
        assert gzip.decompress(a.read_bytes()) == gzip.decompress((PACKAGED / a.name).read_bytes())


def _packaged_text(name: str) -> str:
    return gzip.decompress((PACKAGED / f"{name}.csv.gz").read_bytes()).decode()


# ---------------------------------------------------------------------------- Trace


def test_trace_properties():
    t = make_trace([0.0, 1.0, 4.0])
    assert len(t) == 3
    assert t.duration_s == 4.0
    assert t.rate_per_s == 0.75
    assert t.arrival_s.dtype == np.float64 and t.input_tokens.dtype == np.int64


def test_trace_copies_its_inputs():
    arrival = np.array([0.0, 1.0])
    t = Trace("t", arrival, [1, 2], [3, 4], "test")
    arrival[1] = 5.0
    assert t.arrival_s[1] == 1.0 and arrival.flags.writeable


def test_trace_rate_needs_a_span():
    assert make_trace([]).duration_s == 0.0
    with pytest.raises(ValueError, match=r"'t': 2 request\(s\) over 0 s"):
        _ = make_trace([3.0, 3.0]).rate_per_s


@pytest.mark.parametrize(
    "arrival, inputs, outputs, message",
    [
        ([0.0, 2.0, 1.0], [1, 1, 1], [1, 1, 1], r"arrival_s\[2\] = 1.0: must be >= arrival_s\[1\] = 2.0"),
        ([0.0, math.nan], [1, 1], [1, 1], r"arrival_s\[1\] = nan: must be finite"),
        ([[0.0]], [1], [1], r"arrival_s: expected a 1-D array"),
        ([0.0, 1.0], [1, 0], [1, 1], r"input_tokens\[1\] = 0: must be >= 1"),
        ([0.0, 1.0], [1, 1], [1.5, 1], r"output_tokens\[0\] = 1.5: .*whole numbers"),
        ([0.0, 1.0], [1, 1], [1], r"output_tokens: has 1 entries, arrival_s has 2"),
    ],
)
def test_trace_rejects_bad_arrays(arrival, inputs, outputs, message):
    with pytest.raises(ValueError, match=message):
        Trace("t", arrival, inputs, outputs, "test")


# ---------------------------------------------------------------------------- downsample


@given(arrivals(), st.floats(0.01, 1.0))
def test_downsample_keeps_evenly_spaced_rows_and_their_times(arrival_s, fraction):
    trace = make_trace(arrival_s)
    rate = fraction * trace.rate_per_s
    if round(rate * trace.duration_s) < 2:
        with pytest.raises(ValueError, match="must keep at least 2"):
            downsample(trace, rate)
        return
    out = downsample(trace, rate)
    idx = out.input_tokens - 1
    assert idx[0] == 0 and idx[-1] == len(trace) - 1
    step = (len(trace) - 1) / (len(out) - 1)
    assert set(np.diff(idx).tolist()) <= {math.floor(step), math.ceil(step)}
    np.testing.assert_array_equal(out.arrival_s, trace.arrival_s[idx])  # original timestamps
    assert abs(len(out) - rate * out.duration_s) <= 1.0  # the rate within one request


def test_downsample_real_trace():
    trace = load_trace("azure-conv")
    out = downsample(trace, 2.0)
    assert out.duration_s == trace.duration_s
    assert len(out) == round(2.0 * trace.duration_s)
    assert out.rate_per_s == pytest.approx(2.0, abs=1 / trace.duration_s)
    assert downsample(trace, trace.rate_per_s).input_tokens.tolist() == trace.input_tokens.tolist()


def test_downsample_errors():
    trace = make_trace([0.0, 1.0, 2.0, 3.0])  # 4 requests over 3 s
    with pytest.raises(ValueError, match=r"rate_per_s = 2.0: must be <= the rate of trace 't' \(1.33333/s\)"):
        downsample(trace, 2.0)
    with pytest.raises(ValueError, match=r"rate_per_s = 0.4: keeps 1 request\(s\) .* at least 2"):
        downsample(trace, 0.4)
    with pytest.raises(ValueError, match=r"rate_per_s = 0: must be finite and in \(0.0, inf\]"):
        downsample(trace, 0)
    with pytest.raises(ValueError, match="rate_per_s = nan"):
        downsample(trace, math.nan)


# ---------------------------------------------------------------------------- time_scale


@given(arrivals(), st.floats(0.001, 1000.0))
def test_time_scale_hits_the_rate(arrival_s, rate):
    trace = make_trace(arrival_s)
    out = time_scale(trace, rate)
    assert out.rate_per_s == pytest.approx(rate, rel=1e-12)
    assert out.arrival_s[0] == 0.0
    np.testing.assert_allclose(out.arrival_s, trace.arrival_s * trace.rate_per_s / rate, rtol=1e-12)
    np.testing.assert_array_equal(out.input_tokens, trace.input_tokens)


def test_time_scale_errors():
    with pytest.raises(ValueError, match=r"rate_per_s = -1.0: must be finite and in \(0.0, inf\]"):
        time_scale(make_trace([0.0, 1.0]), -1.0)
    with pytest.raises(ValueError, match=r"trace = 't': spans 0 s \(1 request\(s\)\); time_scale needs two"):
        time_scale(make_trace([0.0]), 1.0)


# ---------------------------------------------------------------------------- window


@given(arrivals(min_size=1), st.floats(0.0, 500.0), st.floats(0.01, 500.0))
def test_window_selects_and_rebases(arrival_s, start_s, duration_s):
    trace = make_trace(arrival_s)
    out = window(trace, start_s, duration_s)
    inside = (trace.arrival_s >= start_s) & (trace.arrival_s < start_s + duration_s)
    np.testing.assert_array_equal(out.input_tokens - 1, np.flatnonzero(inside))
    if len(out):
        np.testing.assert_array_equal(out.arrival_s, trace.arrival_s[inside] - trace.arrival_s[inside][0])
        assert out.duration_s < duration_s


def test_window_example_and_empty():
    trace = make_trace([0.0, 1.0, 2.5, 3.0, 7.0])
    out = window(trace, 1.0, 2.0)
    assert out.arrival_s.tolist() == [0.0, 1.5]
    assert out.input_tokens.tolist() == [2, 3]
    assert out.name == "t[1s+2s]" and out.source == "test"
    assert len(window(trace, 3.5, 3.0)) == 0


def test_window_errors():
    trace = make_trace([0.0, 1.0])
    with pytest.raises(ValueError, match=r"start_s = -1: must be finite and in \[0.0, inf\]"):
        window(trace, -1, 1.0)
    with pytest.raises(ValueError, match=r"duration_s = 0.0: must be finite and in \(0.0, inf\]"):
        window(trace, 0.0, 0.0)


# ---------------------------------------------------------------------------- gamma_trace


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0])
def test_gamma_rate_and_cv(cv):
    lengths = load_trace("azure-conv")
    trace = gamma_trace(50.0, cv, 2000.0, lengths, seed=7)  # ~100k requests
    gaps = np.diff(trace.arrival_s)
    assert trace.rate_per_s == pytest.approx(50.0, rel=0.02)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)
    assert trace.arrival_s[0] == 0.0 and trace.arrival_s[-1] < 2000.0
    # Lengths are (input, output) rows of the source, resampled uniformly.
    pairs = set(zip(lengths.input_tokens.tolist(), lengths.output_tokens.tolist()))
    assert set(zip(trace.input_tokens.tolist(), trace.output_tokens.tolist())) <= pairs
    assert trace.input_tokens.mean() == pytest.approx(lengths.input_tokens.mean(), rel=0.03)


def test_gamma_zero_cv_is_evenly_spaced():
    trace = gamma_trace(4.0, 0.0, 10.0, make_trace([0.0, 1.0]), seed=0)
    np.testing.assert_allclose(trace.arrival_s, np.arange(40) / 4.0)


def test_gamma_is_deterministic_per_seed():
    lengths = load_trace("azure-code")
    a = gamma_trace(3.0, 1.5, 300.0, lengths, seed=11)
    b = gamma_trace(3.0, 1.5, 300.0, lengths, seed=11)
    c = gamma_trace(3.0, 1.5, 300.0, lengths, seed=12)
    for field in ("arrival_s", "input_tokens", "output_tokens"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.arrival_s[:10], c.arrival_s[:10])
    assert a.name == "gamma(rate=3/s, cv=1.5, 300 s, lengths=azure-code, seed=11)"
    assert "Splitwise" in a.source


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"rate_per_s": 0.0}, ValueError, r"rate_per_s = 0.0: must be finite and in \(0.0, inf\]"),
        ({"cv": -0.1}, ValueError, r"cv = -0.1: must be finite and in \[0.0, inf\]"),
        ({"duration_s": math.inf}, ValueError, r"duration_s = inf: must be finite"),
        ({"seed": -1}, ValueError, r"seed = -1: must be >= 0"),
        ({"seed": 1.5}, TypeError, r"seed = 1.5: expected an integer"),
        ({"lengths_from": [1, 2]}, TypeError, r"lengths_from = list: expected a Trace"),
        ({"lengths_from": make_trace([])}, ValueError, r"lengths_from = trace 't': has no requests"),
        ({"rate_per_s": 1e6, "duration_s": 1e3}, ValueError, r"rate_per_s \* duration_s = 1e\+09: must be <="),
    ],
)
def test_gamma_errors(kwargs, error, message):
    args = {"rate_per_s": 1.0, "cv": 1.0, "duration_s": 10.0, "lengths_from": make_trace([0.0, 1.0]), "seed": 0}
    with pytest.raises(error, match=message):
        gamma_trace(**(args | kwargs))


# ---------------------------------------------------------------------------- user files


def write(path: Path, text: str) -> Path:
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def test_user_csv_round_trip(tmp_path):
    # Unsorted rows are sorted stably (the two 5.0 s rows keep their file order); output 0 becomes 1.
    path = write(
        tmp_path / "mine.csv",
        "arrival_s,input_tokens,output_tokens,note\n10.5,100,20,a\n5.0,200,0,b\n5.0,300,30,c\n7.25,400,40,d\n",
    )
    trace = load_trace(path)
    assert trace.name == "mine"
    assert trace.source == str(path)
    assert trace.arrival_s.tolist() == [0.0, 0.0, 2.25, 5.5]
    assert trace.input_tokens.tolist() == [200, 300, 400, 100]
    assert trace.output_tokens.tolist() == [1, 30, 40, 20]
    assert load_trace(str(path)).input_tokens.tolist() == trace.input_tokens.tolist()


def test_user_azure_csv_gz(tmp_path):
    path = write(
        tmp_path / "azure.csv.gz",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 23:59:59.9999999,10,1\n2023-11-17 00:00:00.0000001,20,2\n2023-11-16T23:59:58,30,3\n",
    )
    trace = load_trace(path)
    assert trace.name == "azure"
    np.testing.assert_array_equal(trace.arrival_s, [0.0, 1.9999999, 2.0000001])
    assert trace.input_tokens.tolist() == [30, 10, 20]


@pytest.mark.parametrize(
    "keys, scale",
    [
        (("timestamp", "input_length", "output_length"), 1e-3),  # Mooncake: milliseconds
        (("timestamp_ms", "input_tokens", "output_tokens"), 1e-3),
        (("timestamp", "input_tokens", "output_tokens"), 1.0),  # plain "timestamp": seconds
        (("timestamp_s", "ContextTokens", "GeneratedTokens"), 1.0),
        (("arrival_s", "input_length", "output_tokens"), 1.0),
    ],
)
def test_user_jsonl_round_trip(tmp_path, keys, scale):
    t_key, in_key, out_key = keys
    records = [{t_key: 0, in_key: 6758, out_key: 500, "hash_ids": [0, 1]}, {t_key: 1500, in_key: 12, out_key: 3}]
    path = write(tmp_path / "trace.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n")
    trace = load_trace(path)
    assert trace.arrival_s.tolist() == [0.0, 1500 * scale]
    assert trace.input_tokens.tolist() == [6758, 12] and trace.output_tokens.tolist() == [500, 3]


def test_user_csv_matches_builtin_layout(tmp_path):
    path = write(tmp_path / "copy.csv.gz", _packaged_text("mooncake-conv"))
    copy, builtin = load_trace(path), load_trace("mooncake-conv")
    np.testing.assert_array_equal(copy.arrival_s, builtin.arrival_s)
    np.testing.assert_array_equal(copy.input_tokens, builtin.input_tokens)


HEADER = "arrival_s,input_tokens,output_tokens\n"
MOONCAKE_ROW = '{"timestamp": 0, "input_length": 1, "output_length": 1}\n'


@pytest.mark.parametrize(
    "file, text, message",
    [
        ("a.csv", "", "empty file (expected a CSV header"),
        ("a.csv", HEADER, "no requests"),
        (
            "a.csv",
            "time,input_tokens,output_tokens\n0,1,1\n",
            (
                "needs exactly one arrival column, found none; "
                "accepted names: arrival_s, timestamp_s, timestamp_ms, TIMESTAMP, timestamp"
            ),
        ),
        ("a.csv", "arrival_s,timestamp,input_tokens,output_tokens\n0,0,1,1\n", "found several (arrival_s, timestamp)"),
        (
            "a.csv",
            "arrival_s,input_tokens\n0,1\n",
            (
                "needs exactly one output column, found none; "
                "accepted names: output_tokens, GeneratedTokens, output_length"
            ),
        ),
        ("a.csv", HEADER + "0,1,1\n1,-5,1\n", "line 3: input_tokens = '-5': must be >= 1"),
        ("a.csv", HEADER + "0,0,1\n", "line 2: input_tokens = '0': must be >= 1"),
        ("a.csv", HEADER + "0,1,-1\n", "line 2: output_tokens = '-1': must be >= 0"),
        ("a.csv", HEADER + "0,1,x\n", "line 2: output_tokens = 'x': expected a whole number of tokens"),
        ("a.csv", HEADER + "0,1.5,1\n", "line 2: input_tokens = '1.5': expected a whole number"),
        ("a.csv", HEADER + "0,1,1\n1,2\n", "line 3: output_tokens = None: expected a whole number"),
        ("a.csv", HEADER + "0,1,1\nsoon,1,1\n", "line 3: arrival_s = 'soon': expected a finite number of seconds"),
        ("a.csv", HEADER + "nan,1,1\n", "line 2: arrival_s = 'nan': expected a finite number"),
        (
            "a.csv",
            "timestamp_s,input_tokens,output_tokens\n2023-11-16 18:15:46,1,1\n",
            "(wall-clock strings go in a TIMESTAMP column)",
        ),
        (
            "a.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46+01:00,1,1\n",
            "line 2: TIMESTAMP = '2023-11-16 18:15:46+01:00': expected a date and time",
        ),
        ("a.jsonl", MOONCAKE_ROW + '{"timestamp": 1}\n', "line 2: column 'input_length' is missing"),
        ("a.jsonl", MOONCAKE_ROW + '{"timestamp": 1,\n', "line 2: not valid JSON"),
        ("a.jsonl", "[0, 1, 1]\n", "line 1: expected a JSON object, got '[0, 1, 1]'"),
        (
            "a.jsonl",
            '{"timestamp_ms": "late", "input_length": 1, "output_length": 1}\n',
            "line 1: timestamp_ms = 'late': expected a finite number of milliseconds",
        ),
        (
            "a.jsonl",
            '{"timestamp": 0, "input_length": true, "output_length": 1}\n',
            "line 1: input_length = True: expected a whole number",
        ),
        ("a.csv.gz", "not gzip", "cannot read"),
    ],
)
def test_user_file_errors(tmp_path, file, text, message):
    path = tmp_path / file
    if file == "a.csv.gz":
        path.write_text(text)  # not actually compressed
    else:
        write(path, text)
    with pytest.raises(DataError, match=re.escape(message)) as info:
        load_trace(path)
    assert str(path) in str(info.value)


def test_missing_file_lists_builtins(tmp_path):
    with pytest.raises(DataError, match="no such trace file .*azure-code, azure-conv, mooncake-conv"):
        load_trace(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="no such trace file"):
        load_trace("azure-conversation")
