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

from dualscale.config import Control, Slo, builtin_names, check, load_named

Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNeg = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=1)]
GpuIndex = Annotated[int, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]


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
    #: GPUs this actuator manages (NVML indices); empty = all
    gpus: list[GpuIndex] = []
    #: NVML library to load instead of the system's libnvidia-ml.so.1 ("" = the system's)
    nvml_library: str = ""
    sim: SimSettings = SimSettings()
    hwm: Count = 1000


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
