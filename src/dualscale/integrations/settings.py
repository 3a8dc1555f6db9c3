"""What an engine hook reports to (controller address, instance name, phase) and whether the
installed engine is one the hook supports.

Settings come from the engine's own config when it has a place for them (vLLM:
``--additional-config '{"dualscale": {...}}'``) and, for what that leaves unset, from the
environment::

    DUALSCALE_CONTROLLER   the daemon's report_address, e.g. tcp://10.0.0.1:5600
    DUALSCALE_INSTANCE     this instance's name in the runtime config, e.g. decode-0
    DUALSCALE_PHASE        prefill | decode | auto (default: from the engine's P/D role)

With neither an address nor an instance the hook is inert: the engine runs as without it.
``queue_batches`` (how far a prefill report lists the queue) is set in the engine's config only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from dualscale.config import convert, env_str
from dualscale.errors import ConfigError

#: Engine releases each integration is written and tested against, [minimum, below); the extras of
#: pyproject.toml pin the same ranges.
SUPPORTED = {"vllm": ("0.33", "0.34"), "sglang": ("0.5.23", "0.5.24")}

ENV = {"controller": "DUALSCALE_CONTROLLER", "instance": "DUALSCALE_INSTANCE", "phase": "DUALSCALE_PHASE",
       "keys_dir": "DUALSCALE_KEYS_DIR"}

Phase = Literal["prefill", "decode"]

#: Default of ``HookSettings.queue_batches``: the largest prefill horizon a controller accepts
#: (``dualscale.control.prefill.MAX_HORIZON``, not imported: the engine side loads no controller code).
QUEUE_BATCHES = 24


class HookSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One engine instance's reporting settings."""

    #: the controller daemon's ``report_address``; "" = reporting off
    controller: str = ""
    #: this instance's name in the runtime config (a data-parallel rank is appended by the hook)
    instance: str = ""
    #: "auto" = from the engine's prefill/decode role
    phase: Literal["auto", "prefill", "decode"] = "auto"
    #: folder with this engine's CURVE key pair (``engine-<instance>``, from ``dualscale keys``) and
    #: the controller's public key; "" = plain ZeroMQ (only for a controller that allows it)
    keys_dir: str = ""
    #: prefill: the report lists the queue only until its prompt tokens left fill this many batches of
    #: the engine's token budget (``max_num_batched_tokens``): a controller whose horizon is at most
    #: that never looks further, so its decision is the same, and the report's cost is bounded by the
    #: budget, not the queue. 0 = the whole queue.
    queue_batches: Annotated[int, msgspec.Meta(ge=0)] = QUEUE_BATCHES

    @property
    def enabled(self) -> bool:
        return bool(self.controller or self.instance)


def load_settings(explicit: Mapping[str, Any] | None, source: str) -> HookSettings:
    """Settings from ``explicit`` (the engine's config), the environment filling what it leaves unset.

    Raises:
        ConfigError: a bad field (naming ``source`` or the variable, the field, the value and what is
            allowed), or only one of controller and instance given.
    """
    raw: dict[str, Any] = {}
    for field, var in ENV.items():
        value = env_str(var)
        if value is not None:
            raw[field] = value
    if explicit:
        raw.update(explicit)
        where = source
    else:
        where = "environment (" + ", ".join(ENV.values()) + ")"
    settings = convert(raw, HookSettings, where)
    if settings.enabled and not (settings.controller and settings.instance):
        missing = "controller" if not settings.controller else "instance"
        raise ConfigError(f"{where}: field `{missing}` is not set (env {ENV[missing]}); dualscale needs both "
                          "the controller's report address and this instance's name")
    return settings


def resolve_phase(setting: str, engine_phase: Phase | None, engine_role: str) -> Phase:
    """The phase to report as: the setting, else the engine's role; ConfigError when neither decides."""
    if setting in ("prefill", "decode"):
        return setting  # type: ignore[return-value]
    if engine_phase is None:
        raise ConfigError(f"phase: the engine's role ({engine_role}) does not say prefill or decode; "
                          f"set {ENV['phase']}=prefill or {ENV['phase']}=decode")
    return engine_phase


def parse_version(text: str) -> tuple[int, ...]:
    """The leading numeric release of a version string ("0.33.1rc1+cu130" -> (0, 33, 1))."""
    m = re.match(r"\d+(\.\d+)*", text.strip())
    if m is None:
        raise ConfigError(f"version {text!r}: not a release number")
    return tuple(int(p) for p in m.group(0).split("."))


def check_version(engine: str, installed: str) -> None:
    """Raise ConfigError unless ``installed`` is in ``SUPPORTED[engine]`` (release numbers compared)."""
    minimum, below = SUPPORTED[engine]
    v = parse_version(installed)
    if not parse_version(minimum) <= v < parse_version(below):
        raise ConfigError(f"{engine} {installed} is installed; dualscale's {engine} integration supports "
                          f"{engine}>={minimum},<{below} (the scheduler internals it hooks are not a public "
                          f"interface). Install a supported release: pip install 'dualscale[{engine}]'")
