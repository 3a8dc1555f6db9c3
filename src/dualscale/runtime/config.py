"""Runtime config: the controller daemon, the node actuators and the instances they serve (TOML).

One file describes a deployment; the daemon reads ``[controller]`` and ``[[instances]]``, each
node's actuator reads ``[actuator]`` (command-line options override it, e.g. ``--node``). The SLO and
fine-tier settings are the simulator's (``[slo]``, ``[control]``), so a tuned scenario carries over.
Built-in example: ``configs/runtime/example.toml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec

from dualscale.config import Control, Slo, builtin_config_dir, builtin_names, check, decode_toml, load_named
from dualscale.runtime.trust import read_trusted

Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNeg = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=1)]
GpuIndex = Annotated[int, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]


#: The actuator lock of a GPU node (``[actuator] lock_file`` unless set): one actuator per node.
DEFAULT_LOCK_FILE = "/run/dualscale/actuator.lock"


class _Frozen(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ControllerSettings(_Frozen):
    """The controller daemon (``dualscale serve``)."""

    #: workers PUSH reports here (the daemon binds a PULL socket)
    report_address: str = "tcp://127.0.0.1:5600"
    #: actuators connect here (the daemon binds a ROUTER socket)
    actuator_address: str = "tcp://127.0.0.1:5601"
    #: placement plan updates are published here (PUB); "" = off
    plan_address: str = ""
    #: Prometheus metrics over HTTP; port 0 = off
    metrics_host: str = "127.0.0.1"
    metrics_port: Port = 0
    #: heartbeat to every actuator this often (s); keep well under the actuators' deadman_s
    heartbeat_s: Positive = 0.25
    #: high-water mark of every socket (messages)
    hwm: Count = 1000
    #: energy accounting survives a controller restart through this file (the last counter reading of
    #: every GPU and the totals, written atomically about once a second); "" = a restart starts afresh
    #: and loses the energy between the last status before it and the first after it
    state_file: str = ""


class SimSettings(_Frozen):
    """The simulated node of ``--backend sim``."""

    gpus: Count = 8
    switch_delay_s: NonNeg = 0.02
    #: share the simulated GPUs with other processes (emulated workers, tests) through this file
    state_file: str = ""


class ActuatorSettings(_Frozen):
    """One node's actuator (``dualscale actuator``)."""

    node: str = "node0"
    backend: Literal["nvml", "sim"] = "sim"
    controller_address: str = "tcp://127.0.0.1:5601"
    #: no command or heartbeat from the controller for this long (s) -> reset every locked GPU
    deadman_s: Positive = 2.0
    #: read back clocks, throttle reasons, power and energy and report them this often (s)
    status_period_s: Positive = 0.5
    #: shadow mode: read and report clocks, power and energy, never lock or reset a clock (the
    #: controller decides as usual and exports what it would have done); needs no privilege
    observe: bool = False
    #: GPUs this actuator manages (NVML indices); empty = all
    gpus: list[GpuIndex] = []
    #: NVML library to load instead of the system's libnvidia-ml.so.1 ("" = the system's); the file and
    #: its directories must be owned by root (or the running user, when not root) and writable by no one else
    nvml_library: str = ""
    #: the node policy (TOML, see NodePolicy): instances, their GPUs and clock bounds; "" = the config's
    #: [[instances]] of this node with no clock bounds
    policy_file: str = ""
    #: one actuator per node: an exclusive lock on this file is taken before any GPU is touched, and a
    #: second actuator exits naming the holder. "" = /run/dualscale/actuator.lock (nvml; a root-owned
    #: directory, created 0755 if missing) or the sim state file's path + ".lock" (sim; no lock when
    #: the simulated GPUs live in the process). Checked like every file the actuator reads.
    lock_file: str = ""
    sim: SimSettings = SimSettings()
    hwm: Count = 1000

    def lock_path(self) -> str:
        """The node lock this actuator takes ("" = none: shadow mode, or a sim node of its own).

        Shadow mode (``observe``) takes no lock: it never writes a clock, so it cannot release
        another actuator's locks, and it must run without the privilege the lock's directory needs."""
        if self.observe:
            return ""
        if self.lock_file:
            return self.lock_file
        if self.backend == "nvml":
            return DEFAULT_LOCK_FILE
        return f"{self.sim.state_file}.lock" if self.sim.state_file else ""


class SecuritySettings(_Frozen):
    """Authentication and encryption of every runtime socket (see :mod:`dualscale.runtime.keys`)."""

    #: "curve": ZeroMQ CURVE with the key pairs of `dualscale keys`; "none": plain ZeroMQ, no
    #: authentication (warned about at start; only for a single-user host)
    mechanism: Literal["curve", "none"] = "curve"
    #: directory of the key files; each host holds its own role's secret and the public keys it checks
    keys_dir: str = "/etc/dualscale/keys"


class PolicyInstance(_Frozen, kw_only=True):
    """One instance the actuator may clock: its GPUs and the clock range allowed (MHz, 0 = unbounded)."""

    name: str
    gpus: list[GpuIndex]
    min_mhz: Annotated[int, msgspec.Meta(ge=0)] = 0
    max_mhz: Annotated[int, msgspec.Meta(ge=0)] = 0

    def __post_init__(self) -> None:
        check(bool(self.gpus) and len(set(self.gpus)) == len(self.gpus), f"instances.{self.name}.gpus", self.gpus,
              "must name each GPU once, at least one")
        check(not self.max_mhz or self.min_mhz <= self.max_mhz, f"instances.{self.name}.max_mhz", self.max_mhz,
              f"must be >= min_mhz ({self.min_mhz}) or 0")


class NodePolicy(_Frozen, kw_only=True):
    """What the actuator of one node accepts; a command outside it is refused and counted."""

    format: Literal[1] = 1
    instances: list[PolicyInstance] = []

    def __post_init__(self) -> None:
        seen: dict[int, str] = {}
        for inst in self.instances:
            for g in inst.gpus:
                other = seen.setdefault(g, inst.name)
                check(other == inst.name, f"instances.{inst.name}.gpus", inst.gpus,
                      f"GPU {g} is already used by instance {other!r}")

    @classmethod
    def of_node(cls, config: RuntimeConfig, node: str) -> NodePolicy:
        """The instances of ``node`` in a runtime config, without clock bounds."""
        return cls(instances=[PolicyInstance(name=i.name, gpus=list(i.gpus)) for i in config.instances
                              if i.node == node])


class InstanceSpec(_Frozen, kw_only=True):
    """One serving instance: its phase, TP degree and the GPUs of one node it runs on."""

    name: str
    phase: Literal["prefill", "decode"]
    tp: Count
    node: str = "node0"
    gpus: list[GpuIndex]
    #: prefill: the engine's chunking budget (tokens per batch)
    max_batch_tokens: Count = 2048
    #: baseline clock from the placement (MHz); 0 = the profile's top clock. Published in the plan.
    base_freq_mhz: Annotated[int, msgspec.Meta(ge=0)] = 0
    #: routing weight, published in the plan
    weight: Positive = 1.0

    def __post_init__(self) -> None:
        check(len(self.gpus) == self.tp, f"instances.{self.name}.gpus", self.gpus,
              f"needs one GPU per TP rank ({self.tp})")
        check(len(set(self.gpus)) == len(self.gpus), f"instances.{self.name}.gpus", self.gpus, "lists a GPU twice")


class RuntimeConfig(_Frozen, kw_only=True):
    format: Literal[1] = 1
    description: str = ""
    profile: str = "h100-sxm-llama-3.3-70b"
    slo: Slo = Slo()
    control: Control = Control()
    controller: ControllerSettings = ControllerSettings()
    actuator: ActuatorSettings = ActuatorSettings()
    security: SecuritySettings = SecuritySettings()
    instances: list[InstanceSpec] = []

    def __post_init__(self) -> None:
        names = [i.name for i in self.instances]
        dup = next((n for n in names if names.count(n) > 1), None)
        check(dup is None, "instances.name", dup, "instance names must be unique")
        used: dict[tuple[str, int], str] = {}
        for inst in self.instances:
            for g in inst.gpus:
                other = used.setdefault((inst.node, g), inst.name)
                check(other == inst.name, f"instances.{inst.name}.gpus", inst.gpus,
                      f"GPU {g} of node {inst.node!r} is already used by instance {other!r}")


def builtin_runtime_configs() -> list[str]:
    """Names of the runtime configs shipped with dualscale."""
    return builtin_names("runtime")


def load_runtime_config(name_or_path: str | Path) -> RuntimeConfig:
    """A built-in runtime config by name (e.g. ``"example"``) or a TOML file by path."""
    return load_named(name_or_path, RuntimeConfig, "runtime", "runtime config")


def load_trusted_runtime_config(name_or_path: str | Path) -> RuntimeConfig:
    """As :func:`load_runtime_config`, for a privileged process: the file is opened without following
    symlinks and refused unless root (or the running user) owns it and no one else may write it."""
    p = Path(name_or_path)
    if not (p.suffix == ".toml" or p.exists()):
        p = builtin_config_dir() / "runtime" / f"{name_or_path}.toml"
        if not p.is_file():
            return load_runtime_config(name_or_path)  # the error listing the built-in configs
    return decode_toml(read_trusted(p, "runtime config"), RuntimeConfig, str(p))


def load_policy(path: str | Path) -> NodePolicy:
    """A node policy file (TOML, see :class:`NodePolicy`), checked like the actuator's config."""
    return decode_toml(read_trusted(path, "node policy"), NodePolicy, str(path))
