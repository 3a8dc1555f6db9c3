"""The one config system: frozen msgspec Structs decoded from TOML files in ``configs/``.

Loading is all-or-nothing: a file either decodes completely into its Struct or raises one
:class:`~dualscale.errors.ConfigError` naming the file, the field, the value and what is allowed.
Built-in configs ship inside the wheel (``dualscale/configs``); in a source checkout they are read
from the top-level ``configs/`` folder.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from dualscale.errors import ConfigError

T = TypeVar("T")

_PATH_RE = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")


def env_str(name: str) -> str | None:
    """The one place environment variables are read: ``name``'s value, or None when unset/empty."""
    return os.environ.get(name) or None


def env_path(name: str) -> Path | None:
    """Environment variable ``name`` as a path, or None when unset/empty."""
    value = env_str(name)
    return Path(value).expanduser() if value else None


def builtin_config_dir() -> Path:
    """Folder of the built-in configs: inside the installed package, else the checkout's ``configs/``."""
    packaged = resources.files("dualscale") / "configs"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "configs"


def _lookup(raw: Any, path: str) -> Any:
    """Value at a msgspec error path such as ``gpu.power_cap_w`` or ``latency.prefill[1].tp``."""
    node = raw
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        try:
            node = node[int(part[1:-1])] if part.startswith("[") else node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def decode_toml(data: bytes, type_: type[T], source: str) -> T:
    """Decode TOML ``data`` into ``type_``; any problem becomes one ConfigError naming ``source``."""
    try:
        raw = msgspec.toml.decode(data)
    except msgspec.DecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from e
    return convert(raw, type_, source)


def convert(raw: Any, type_: type[T], source: str) -> T:
    """Convert plain data (decoded TOML, a dict from an engine's config) into ``type_``; any problem
    becomes one ConfigError naming ``source``, the field, the value and what is allowed."""
    try:
        return msgspec.convert(raw, type_)
    except msgspec.ValidationError as e:
        msg = str(e)
        m = _PATH_RE.search(msg)
        if m:
            field = m.group("path") or "(top level)"
            what = msg[: m.start()]
            if what.startswith("field `"):  # a rule from `check`: it names its field and value itself
                raise ConfigError(f"{source}: {what} (in `{field}`)") from e
            value = _lookup(raw, m.group("path"))
            raise ConfigError(f"{source}: field `{field}` = {value!r}: {what}") from e
        raise ConfigError(f"{source}: {msg}") from e


def load_toml(path: str | Path, type_: type[T]) -> T:
    """Read and decode one TOML file into ``type_`` (see :func:`decode_toml`)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror or e}") from e
    return decode_toml(data, type_, str(p))


def check(cond: bool, field: str, value: object, allowed: str) -> None:
    """Raise ValueError for a cross-field rule; msgspec turns it into a ValidationError on decode."""
    if not cond:
        raise ValueError(f"field `{field}` = {value!r}: {allowed}")


def builtin_names(kind: str) -> list[str]:
    """Names of the built-in configs of one kind (a folder of ``configs/``, e.g. ``"scenarios"``)."""
    return sorted(p.stem for p in (builtin_config_dir() / kind).glob("*.toml"))


def load_named(name_or_path: str | Path, type_: type[T], kind: str, what: str) -> T:
    """A built-in config of ``kind`` by name, or a TOML file by path, decoded into ``type_``;
    an unknown name is a ConfigError listing the built-in ``what``s."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        return load_toml(p, type_)
    builtin = builtin_config_dir() / kind / f"{name_or_path}.toml"
    if not builtin.is_file():
        raise ConfigError(f"{what} {str(name_or_path)!r}: no such built-in {what} or file; "
                          f"built-in {what}s: {', '.join(builtin_names(kind)) or '(none found)'}")
    return load_toml(builtin, type_)


# ---- settings shared by the simulator and the runtime (import-light: the actuator reads them) ----
class _Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class Slo(_Settings):
    """Latency targets, judged per request."""

    ttft_s: Annotated[float, msgspec.Meta(gt=0)] = 0.6
    tpot_s: Annotated[float, msgspec.Meta(gt=0)] = 0.1
    #: the percentile of TTFT and TPOT that must be within the SLO for the run to meet it
    percentile: Annotated[float, msgspec.Meta(gt=0, le=100)] = 99.0


class Control(_Settings):
    """Fine-tier settings (``[control]`` of a scenario or a runtime config); every field reaches the
    controllers through :func:`dualscale.control.make_controller`, in the simulator and the daemon."""

    #: prefill batches the MPC projects from the queue
    horizon: Annotated[int, msgspec.Meta(ge=1, le=24)] = 8
    #: fraction of the SLO held back for clock-switch delays and model error
    margin: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.05
    #: KV-cache use at or above which the top clock is used
    kv_guard: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.9
    #: "qp" (MPC, default), "exact" (optimal plan), "greedy" (the paper's search) or "lowest"
    #: (lowest clock meeting the next batch's deadlines, no horizon)
    prefill_solver: Literal["qp", "exact", "greedy", "lowest"] = "qp"
    #: "request" (each request's TPOT slack) or "tbt" (per-step target, the paper's proxy)
    decode_slack: Literal["request", "tbt"] = "request"
    #: decode clock objective among the clocks that fit the step budget (see DecodeController)
    decode_objective: Literal["energy", "power"] = "power"
    #: how long the controllers assume a clock change takes to land (s): the prefill plan charges
    #: the batch about to run that long at the clock in effect (H100: NVML call + switch ~20 ms)
    switch_delay_s: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.02
    #: correct the latency/power predictions from measured iterations, with the top-clock safety
    #: rule when a measurement exceeds the corrected prediction (see dualscale.control.correction)
    online_correction: bool = True
