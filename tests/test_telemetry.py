"""The telemetry format: writer (rotation, headers in every file), reader (validation names the line and field)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dualscale.errors import DataError
from dualscale.profile import telemetry as T

HEADERS = [T.Header(version=0, instance="p0", phase="prefill", tp=2, gpus=[0, 1], profile="x", source="test"),
           T.Header(version=0, instance="d0", phase="decode", tp=2, gpus=[2, 3], profile="x", source="test")]


def records(n: int) -> list[T.Record]:
    out: list[T.Record] = []
    for i in range(n):
        out.append(T.PrefillIteration("p0", float(i), 0.1, 1200, [512, 100], [0, 2048], locked_mhz=1200))
        out.append(T.DecodeIteration("d0", float(i), 0.02, 1200, [300, 4000, 17]))
        out.append(T.PowerWindow("d0", float(i), float(i) + 1.0, 1200, [400.0, 410.0], [400.0, 410.0]))
    return out


def test_round_trip_with_version_and_headers(tmp_path: Path):
    path = tmp_path / "t.jsonl"
    with T.Writer(path, HEADERS) as w:
        for r in records(5):
            w.write(r)
    first = path.read_text().splitlines()[0]
    assert '"kind":"header"' in first and '"version":1' in first
    tel = T.read(path)
    assert set(tel.headers) == {"p0", "d0"}
    assert len(tel.iterations) == 10 and len(tel.windows) == 5
    assert tel.iterations[0] == records(1)[0]
    assert tel.windows[0].mean_power_w == pytest.approx(405.0)
    assert tel.truncated == 0


def test_rotation_bounds_size_and_every_file_reads_alone(tmp_path: Path):
    path = tmp_path / "t.jsonl"
    with T.Writer(path, HEADERS, max_bytes=8192, keep=2, flush_every=4) as w:
        for r in records(200):
            w.write(r)
    assert w.rotations > 2
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["t.jsonl", "t.jsonl.1", "t.jsonl.2"]  # the oldest were deleted
    assert all(f.stat().st_size <= 8192 for f in files)
    for f in files:
        assert len(T.read(f, with_rotated=False).headers) == 2
    tel = T.read(path)
    assert tel.files == [tmp_path / "t.jsonl.2", tmp_path / "t.jsonl.1", path]
    # the newest records survive, in order
    t0 = [it.t0_s for it in tel.iterations if it.instance == "d0"]
    assert t0 == sorted(t0) and t0[-1] == 199.0


def test_truncated_last_line_is_skipped_and_counted(tmp_path: Path):
    path = tmp_path / "t.jsonl"
    with T.Writer(path, HEADERS) as w:
        for r in records(2):
            w.write(r)
    with open(path, "ab") as fh:
        fh.write(b'{"kind":"decode","instance":"d0","t0_s":9')
    tel = T.read(path)
    assert tel.truncated == 1 and len(tel.iterations) == 4


@pytest.mark.parametrize("line, words", [
    ('{"kind":"decode","instance":"d0","t0_s":1,"time_s":-1,"freq_mhz":1200,"context_tokens":[5]}',
     ["line 3", "time_s"]),
    ('{"kind":"decode","instance":"zz","t0_s":1,"time_s":1,"freq_mhz":1200,"context_tokens":[5]}',
     ["line 3", "instance = 'zz'", "no header"]),
    ('{"kind":"prefill","instance":"p0","t0_s":1,"time_s":1,"freq_mhz":1200,"chunk_tokens":[5],"prefix_tokens":[]}',
     ["line 3", "prefix_tokens", "one per chunk"]),
    ('{"kind":"prefill","instance":"d0","t0_s":1,"time_s":1,"freq_mhz":1200,"chunk_tokens":[5],"prefix_tokens":[0]}',
     ["line 3", "decode instance"]),
    ('{"kind":"power","instance":"d0","t0_s":1,"t1_s":0.5,"freq_mhz":1200,"energy_j":[1,1],"power_w":[1,1]}',
     ["line 3", "t1_s"]),
    ('{"kind":"power","instance":"d0","t0_s":1,"t1_s":2,"freq_mhz":1200,"energy_j":[1],"power_w":[1]}',
     ["line 3", "one per GPU"]),
    ('{"kind":"decode","instance":"d0","t0_s":1,"time_s":1,"freq_mhz":1200,"context_tokens":[5],"extra":1}',
     ["line 3", "extra"]),
    ('{"kind":"teapot"}', ["line 3", "teapot"]),
    ('not json', ["line 3", "not a JSON object"]),
])
def test_reader_names_line_and_field(tmp_path: Path, line: str, words: list[str]):
    path = tmp_path / "t.jsonl"
    with T.Writer(path, HEADERS):
        pass
    with open(path, "ab") as fh:
        fh.write(line.encode() + b"\n")
    with pytest.raises(DataError) as e:
        T.read(path)
    for w in words:
        assert w in str(e.value)


def test_reader_rejects_other_versions_and_missing_files(tmp_path: Path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"kind":"header","version":7,"instance":"a","phase":"decode","tp":1,"gpus":[0],'
                    '"profile":"x","source":"y"}\n')
    with pytest.raises(DataError, match="version = 7"):
        T.read(path)
    with pytest.raises(DataError, match="no such telemetry file"):
        T.read(tmp_path / "nope.jsonl")


def test_writer_rejects_bad_bounds(tmp_path: Path):
    with pytest.raises(ValueError, match="max_bytes"):
        T.Writer(tmp_path / "t.jsonl", HEADERS, max_bytes=10)
