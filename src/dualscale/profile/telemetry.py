"""Telemetry: what a calibration sweep or a production recording measured, one format for both.

Format: JSON Lines (``.jsonl``), one record per line, each a JSON object whose ``kind`` field says
which record it is. Why JSON Lines and not a columnar format (Parquet, Arrow IPC): a recording is
written continuously by a long-running daemon and must stay readable up to its last complete line
after a crash or a kill (a columnar file is readable only once its footer is written); every tool
reads it (``jq``, pandas ``read_json(lines=True)``, DuckDB); batch shapes are variable-length
lists, awkward in a flat table; and it needs no new dependency (msgspec encodes and validates it).
A day of decode at ~30 iterations/s is a few GB: the writer rotates files at a size bound.

Records (``version`` = :data:`VERSION`; units in every field name)::

    {"kind": "header", "version": 1, "instance": "decode-0", "phase": "decode", "tp": 4,
     "node": "gpu-node-3", "gpus": [4, 5, 6, 7], "profile": "h100-sxm-llama-3.3-70b",
     "source": "serve", "started_unix_s": 1764770000.0}
        Once per instance at the start of every file (rotation repeats them): what the records of
        ``instance`` describe. ``profile`` is the profile the controller used while recording.
    {"kind": "prefill", "instance": "prefill-0", "t0_s": 12.5, "time_s": 0.211, "freq_mhz": 1410,
     "locked_mhz": 1410, "chunk_tokens": [2048, 1024], "prefix_tokens": [0, 4096]}
        One prefill iteration: its chunks (new tokens per request) and each chunk's prefix (tokens
        of that request prefilled before it), measured time, and the SM clock read back at its
        start. ``end_mhz``: the clock read back at its end when a switch landed while it ran (0 =
        the same clock throughout); such iterations are not used to fit time, only to account
        for the energy of the power windows they fall in.
        ``t0_s``: start, on the recorder's monotonic clock (the same clock as power windows).
        ``locked_mhz``: the clock that was asked for (0 = unknown); a difference from ``freq_mhz``
        means the GPU did not reach it (power or thermal throttling).
    {"kind": "decode", "instance": "decode-0", "t0_s": 3.1, "time_s": 0.031, "freq_mhz": 1200,
     "locked_mhz": 1200, "context_tokens": [812, 1533, 96]}
        One decode step: each running request's context (tokens in its KV cache).
    {"kind": "power", "instance": "decode-0", "t0_s": 3.0, "t1_s": 4.0, "freq_mhz": 1200,
     "energy_j": [401.2, 398.7, 402.0, 399.9], "power_w": [401.2, 398.7, 402.0, 399.9]}
        One power window of an instance from ``t0_s`` to ``t1_s``: energy per GPU from the
        actuator's energy counters and mean power per GPU (energy / duration). ``freq_mhz``: the
        clock the GPUs held throughout (locked and read back), or 0 when DVFS changed it inside
        the window (then every iteration in it was recorded, each with its own clock). NVML
        power is a ~100 ms average and its energy counter updates about every 100 ms, so power
        is fitted from such windows (>= 0.5 s), never per iteration: the fit attributes each
        window's energy to the iterations that ran in it (by ``t0_s`` and ``time_s``, each at its
        clock) and the idle time between them.

A reader rejects the first bad line, naming file, line, field and value. A final line without a
newline (the writer was killed mid-write) is skipped and counted (:attr:`Telemetry.truncated`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Self

import msgspec

from dualscale.errors import DataError

#: Telemetry format version written by this code; the reader accepts exactly the versions in READS.
VERSION = 1
READS = (1,)

Tokens = Annotated[int, msgspec.Meta(ge=0)]
NonNegS = Annotated[float, msgspec.Meta(ge=0)]
Mhz = Annotated[int, msgspec.Meta(ge=0)]


class Header(msgspec.Struct, tag="header", tag_field="kind", frozen=True, forbid_unknown_fields=True):
    version: int
    instance: str
    phase: Literal["prefill", "decode"]
    tp: Annotated[int, msgspec.Meta(ge=1)]
    gpus: list[int]
    profile: str
    source: str
    node: str = ""
    started_unix_s: float = 0.0


class PrefillIteration(msgspec.Struct, tag="prefill", tag_field="kind", frozen=True, forbid_unknown_fields=True):
    instance: str
    t0_s: float
    time_s: Annotated[float, msgspec.Meta(gt=0)]
    freq_mhz: Annotated[int, msgspec.Meta(gt=0)]
    chunk_tokens: list[Annotated[int, msgspec.Meta(ge=1)]]
    prefix_tokens: list[Tokens]
    locked_mhz: Mhz = 0
    end_mhz: Mhz = 0


class DecodeIteration(msgspec.Struct, tag="decode", tag_field="kind", frozen=True, forbid_unknown_fields=True):
    instance: str
    t0_s: float
    time_s: Annotated[float, msgspec.Meta(gt=0)]
    freq_mhz: Annotated[int, msgspec.Meta(gt=0)]
    context_tokens: list[Annotated[int, msgspec.Meta(ge=1)]]
    locked_mhz: Mhz = 0
    end_mhz: Mhz = 0


class PowerWindow(msgspec.Struct, tag="power", tag_field="kind", frozen=True, forbid_unknown_fields=True):
    instance: str
    t0_s: float
    t1_s: float
    freq_mhz: Mhz  # 0 = the clock changed inside the window
    energy_j: list[Annotated[float, msgspec.Meta(ge=0)]]
    power_w: list[Annotated[float, msgspec.Meta(ge=0)]]

    @property
    def mean_power_w(self) -> float:
        """Mean power per GPU over the window and the instance's GPUs (W)."""
        return sum(self.power_w) / len(self.power_w)


Record = Header | PrefillIteration | DecodeIteration | PowerWindow
Iteration = PrefillIteration | DecodeIteration

_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(Record)


def _check(rec: Record, headers: dict[str, Header]) -> str | None:
    """The first semantic problem of ``rec`` (schema checks done), as 'field = value: rule', or None."""
    if isinstance(rec, Header):
        if rec.version not in READS:
            return f"version = {rec.version}: this dualscale reads telemetry versions {list(READS)}"
        if len(rec.gpus) != rec.tp:
            return f"gpus = {rec.gpus}: must list tp = {rec.tp} GPUs"
        return None
    h = headers.get(rec.instance)
    if h is None:
        return f"instance = {rec.instance!r}: no header record for it earlier in the file"
    if not math.isfinite(rec.t0_s):
        return f"t0_s = {rec.t0_s}: must be finite"
    if isinstance(rec, PowerWindow):
        if not rec.t1_s > rec.t0_s:
            return f"t1_s = {rec.t1_s}: must exceed t0_s = {rec.t0_s}"
        if len(rec.energy_j) != h.tp or len(rec.power_w) != h.tp:
            return f"energy_j/power_w: {len(rec.energy_j)}/{len(rec.power_w)} values, must be one per GPU ({h.tp})"
        return None
    if phase_of(rec) != h.phase:
        return f"kind = {phase_of(rec)!r}: instance {rec.instance!r} is a {h.phase} instance (header)"
    if rec.end_mhz == rec.freq_mhz:
        return f"end_mhz = {rec.end_mhz}: 0 when the clock did not change, else the clock read at the end"
    if isinstance(rec, PrefillIteration):
        if not rec.chunk_tokens:
            return "chunk_tokens = []: a prefill iteration has at least one chunk"
        if len(rec.prefix_tokens) != len(rec.chunk_tokens):
            return (f"prefix_tokens: {len(rec.prefix_tokens)} values, must be one per chunk "
                    f"({len(rec.chunk_tokens)})")
    elif not rec.context_tokens:
        return "context_tokens = []: a decode step has at least one request"
    return None


def phase_of(it: Iteration) -> Literal["prefill", "decode"]:
    """The phase an iteration record belongs to."""
    return "prefill" if isinstance(it, PrefillIteration) else "decode"


@dataclass
class Telemetry:
    """Every record of one recording (all its rotated files), by kind, in file order."""

    headers: dict[str, Header] = field(default_factory=dict)
    iterations: list[Iteration] = field(default_factory=list)
    windows: list[PowerWindow] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    #: final lines without a newline (a writer killed mid-line), skipped
    truncated: int = 0

    def add(self, rec: Record) -> None:
        if isinstance(rec, Header):
            self.headers[rec.instance] = rec
        elif isinstance(rec, PowerWindow):
            self.windows.append(rec)
        else:
            self.iterations.append(rec)


def rotated(path: Path) -> list[Path]:
    """``path`` and its rotated predecessors (``path.1`` newest ... ``path.K`` oldest), oldest first."""
    olds = []
    k = 1
    while Path(f"{path}.{k}").exists():
        olds.append(Path(f"{path}.{k}"))
        k += 1
    return [*reversed(olds), *([path] if path.exists() else [])]


def read(path: str | Path, with_rotated: bool = True) -> Telemetry:
    """Read and validate a telemetry file (and, by default, its rotated predecessors).

    Raises:
        DataError: no such file, or a bad line (the message names file, line, field and value).
    """
    path = Path(path)
    files = rotated(path) if with_rotated else [path]
    if not files:
        raise DataError(f"{path}: no such telemetry file (record one with `dualscale serve --record {path}` "
                        "or `dualscale profile sweep`)")
    tel = Telemetry(files=files)
    for f in files:
        headers: dict[str, Header] = {}
        data = f.read_bytes()
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        elif lines:
            lines.pop()  # no newline after it: cut off mid-write
            tel.truncated += 1
        for no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = _DECODER.decode(line)
            except msgspec.ValidationError as e:
                raise DataError(f"{f} line {no}: {e}") from e
            except msgspec.DecodeError as e:
                raise DataError(f"{f} line {no}: not a JSON object ({e})") from e
            problem = _check(rec, headers)
            if problem is not None:
                raise DataError(f"{f} line {no}: {problem}")
            if isinstance(rec, Header):
                headers[rec.instance] = rec
            tel.add(rec)
    return tel


class Writer:
    """Appends telemetry records to ``path`` (JSON Lines), rotating at ``max_bytes``.

    Every file starts with the headers, so each one reads on its own. At ``max_bytes`` the file
    becomes ``path.1`` (older ones shift to ``.2`` ...; at most ``keep`` rotated files are kept, the
    oldest is deleted): disk use stays below about ``(keep + 1) * max_bytes``. Lines are written
    whole and flushed every ``flush_every`` records and on :meth:`close`, so a reader (or a crash)
    sees complete lines only, except possibly the last.

    Args:
        path: the file (created with its parent folder; appended to if it exists).
        headers: one per instance recorded.
        max_bytes: rotate when the file reaches this size (>= 4096).
        keep: rotated files kept (>= 0).
        flush_every: records buffered between writes (>= 1).
    """

    def __init__(self, path: str | Path, headers: Iterable[Header], max_bytes: int = 256 * 2**20, keep: int = 3,
                 flush_every: int = 64) -> None:
        if max_bytes < 4096:
            raise ValueError(f"max_bytes = {max_bytes}: must be >= 4096")
        if keep < 0 or flush_every < 1:
            raise ValueError(f"keep = {keep}, flush_every = {flush_every}: must be >= 0 and >= 1")
        self.path = Path(path)
        self.headers = [msgspec.structs.replace(h, version=VERSION) for h in headers]
        self.max_bytes = max_bytes
        self.keep = keep
        self.flush_every = flush_every
        self.records = 0
        self.rotations = 0
        self._buf: list[bytes] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()

    def _open(self) -> None:
        self._fh = open(self.path, "ab")  # noqa: SIM115 (owned until close())
        self._size = self._fh.tell()
        # a new file, or appending to an earlier recording (whose instances may differ): headers first
        self._write_now(b"".join(_ENCODER.encode(h) + b"\n" for h in self.headers))

    def _write_now(self, data: bytes) -> None:
        self._fh.write(data)
        self._fh.flush()
        self._size += len(data)

    def write(self, rec: Record) -> None:
        """Append one record (buffered)."""
        self._buf.append(_ENCODER.encode(rec) + b"\n")
        self.records += 1
        if len(self._buf) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write the buffered records; rotate first if they would cross ``max_bytes``."""
        if not self._buf:
            return
        data = b"".join(self._buf)
        self._buf.clear()
        if self._size + len(data) > self.max_bytes and self._size > 0:
            self._rotate()
        self._write_now(data)

    def _rotate(self) -> None:
        self._fh.close()
        last = Path(f"{self.path}.{self.keep}") if self.keep else self.path
        if self.keep:
            last.unlink(missing_ok=True)
            for k in range(self.keep - 1, 0, -1):
                src = Path(f"{self.path}.{k}")
                if src.exists():
                    os.replace(src, f"{self.path}.{k + 1}")
            os.replace(self.path, f"{self.path}.1")
        else:
            self.path.unlink()
        self.rotations += 1
        self._open()

    def close(self) -> None:
        """Flush and close (idempotent)."""
        if not self._fh.closed:
            self.flush()
            self._fh.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_phase(tel: Telemetry, phase: str) -> Iterator[Iteration]:
    """The iterations of ``phase`` ("prefill" or "decode")."""
    cls = PrefillIteration if phase == "prefill" else DecodeIteration
    return (it for it in tel.iterations if isinstance(it, cls))
