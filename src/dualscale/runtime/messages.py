"""The runtime's wire protocol: every message the worker agent, controller daemon and actuator exchange.

This module holds only Structs and IntEnums (import-light: msgspec and the standard library), so a
serving engine can import it without pulling NumPy, Numba or ZeroMQ.

Framing (one ZeroMQ frame per message)::

    byte 0   PROTOCOL_VERSION   major version; a receiver drops (and counts) any other value
    byte 1   MsgType            which Struct the body holds; unknown types are dropped
    byte 2.. msgpack body       the Struct, encoded ``array_like`` (fields by position)

Sockets (all created by :func:`dualscale.runtime.transport.make_socket`)::

    worker agent  ──frames──> shared-memory ring ──> report relay (a process beside the engine)
    report relay  PUSH ──reports──────────────> PULL   controller daemon (binds ``report_address``)
    actuator      DEALER <─commands, heartbeats─ ROUTER controller daemon (binds ``actuator_address``)
                  (routing id = node name)  ──status──>
    subscribers   SUB <──────plan updates────── PUB    controller daemon (binds ``plan_address``)

Evolution rules: fields are positional, so new fields are only ever appended, with defaults; a
field is never re-typed, renamed in meaning or removed. An older receiver ignores trailing fields
it does not know, a newer one fills defaults for fields an older sender did not send. An
incompatible change bumps ``PROTOCOL_VERSION``.

Array fields (``*_s``, ``*_tokens`` in reports) are msgpack ``bin`` holding little-endian float64
(``_s``) or int64 (``_tokens``) arrays, one entry per request, so a report of a 256-request batch
encodes in about a microsecond and decodes without a Python list.

Times: ``*_ns`` fields are ``CLOCK_MONOTONIC`` nanoseconds of the sending host (comparable only on
the same host, used for latency measurement); ``now_s`` and the per-request times of a report are
on the engine's own clock, whatever it is, as long as it is one clock.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Annotated

import msgspec

#: Major protocol version, byte 0 of every frame. Bumped only for an incompatible change.
#: 2: report epochs are the sender's CLOCK_MONOTONIC at its start (were wall-clock ns), and the
#: controller routes commands by the actuator's authenticated key, not by a routing id it chose.
PROTOCOL_VERSION = 2

#: Bounds every receiver enforces while decoding (a hostile peer cannot make it allocate more).
MAX_NAME = 128
MAX_GPUS = 256
MAX_GPU_INDEX = 1023
MAX_INSTANCES = 256
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]
Gpu = Annotated[int, msgspec.Meta(ge=0, le=MAX_GPU_INDEX)]
Gpus = Annotated[list[Gpu], msgspec.Meta(max_length=MAX_GPUS)]


class MsgType(IntEnum):
    """Byte 1 of every frame: the Struct in the body."""

    PREFILL_REPORT = 1
    DECODE_REPORT = 2
    CLOCK_COMMAND = 3
    HEARTBEAT = 4
    NODE_STATUS = 5
    PLAN_UPDATE = 6


class Phase(IntEnum):
    """Which phase an instance serves."""

    PREFILL = 0
    DECODE = 1


class _Report(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, frozen=True):
    """The fields every report starts with (a subclass's fields follow them on the wire).

    Attributes:
        instance: instance name (as in the runtime config).
        epoch: the agent's incarnation: its host's CLOCK_MONOTONIC ns at its start (0 < epoch <= sent_ns).
        seq: 1, 2, ... within an epoch; a report not newer than the last accepted one is dropped.
        sent_ns: sender's CLOCK_MONOTONIC ns at send.
        now_s: engine clock now (s), the clock of the report's per-request times.
        kv_util: KV-cache use in [0, 1].
        iteration_s: measured time of the previous iteration (s); 0 when unknown.
        freq_mhz: SM clock in use as the engine sees it (MHz); 0 when unknown.
    """

    instance: Name
    epoch: int
    seq: int
    sent_ns: int
    now_s: float
    kv_util: float
    iteration_s: float
    freq_mhz: int


class PrefillReport(_Report, frozen=True):
    """Worker -> daemon, once per prefill iteration: the FCFS waiting queue as the scheduler sees it.

    Attributes:
        arrival_s: float64 LE array, arrival time of each waiting request (s), non-decreasing.
        prompt_tokens: int64 LE array, prompt length of each waiting request.
        prefilled_tokens: int64 LE array, tokens of each request already prefilled.
    """

    arrival_s: bytes
    prompt_tokens: bytes
    prefilled_tokens: bytes


class DecodeReport(_Report, frozen=True):
    """Worker -> daemon, once per decode step: the running batch.

    Attributes:
        first_token_s: float64 LE array, when each running request emitted its first token (s).
        tokens_out: int64 LE array, output tokens so far per request (first included, >= 1).
        context_tokens: int64 LE array, tokens in each request's KV cache (>= 1).
    """

    first_token_s: bytes
    tokens_out: bytes
    context_tokens: bytes


class ClockCommand(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, frozen=True):
    """Daemon -> actuator: lock every GPU of an instance at one SM clock.

    Attributes:
        instance: instance name.
        gpus: GPU indices on the actuator's node (NVML indices).
        freq_mhz: SM clock to lock (MHz); the actuator rounds up to a supported clock.
        seq: per-instance command number of this daemon epoch (newest wins).
        origin_ns: ``sent_ns`` of the report that caused it (0 if none): report-to-command latency.
        controller_epoch: the daemon's incarnation (wall-clock ns at its start).
    """

    instance: Name
    gpus: Gpus
    freq_mhz: int
    seq: int
    origin_ns: int = 0
    controller_epoch: int = 0


class Heartbeat(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, frozen=True):
    """Daemon -> actuator, every ``heartbeat_s``: the controller is alive (feeds the dead-man switch)."""

    controller_epoch: int
    sent_ns: int


class GpuStatus(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, frozen=True):
    """One GPU as the actuator last read it.

    Attributes:
        index: NVML index.
        locked_mhz: SM clock the actuator locked (MHz); 0 when not locked.
        sm_mhz: SM clock reached, read back (MHz).
        reasons: clock-event (throttle) reasons bitmask (NVML ``nvmlClocksEventReason*``).
        power_w: power draw (W).
        energy_j: energy since the actuator started (J): the device's 64-bit counter, extended
            between its updates by integrated power samples.
        error: the last device error on this GPU, empty when none.
        counter_j: the device's energy counter as read (J): monotonic while ``counter_id`` stays the same.
        counter_id: identity of that counter (boot and device); a new identity starts a new count.
    """

    index: Gpu
    locked_mhz: int
    sm_mhz: int
    reasons: int
    power_w: float
    energy_j: float
    error: Annotated[str, msgspec.Meta(max_length=1024)] = ""
    counter_j: float = 0.0
    counter_id: Annotated[str, msgspec.Meta(max_length=MAX_NAME)] = ""


class InstanceClock(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, frozen=True):
    """The last command applied for one instance: what was asked and what was locked after clamping
    (0 in shadow mode, ``actuator --observe``, which locks nothing)."""

    instance: Name
    seq: int
    requested_mhz: int
    applied_mhz: int


class NodeStatus(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, frozen=True):
    """Actuator -> daemon, every ``status_period_s``.

    Attributes:
        node: the actuator's node name; must be the node its key names.
        epoch: the actuator's incarnation (its host's CLOCK_MONOTONIC ns at its start).
        sent_ns: CLOCK_MONOTONIC ns at send.
        gpus: one entry per managed GPU.
        instances: last applied command per instance.
        commands: commands received since start.
        writes: clock writes done (locks and resets).
        noop_skips: GPU writes skipped because the clock was already locked there.
        deadman_resets: times the dead-man switch reset the node's GPUs.
        dropped: messages the actuator dropped (malformed, other version, unknown GPU).
        refused: commands refused by the node policy (unknown instance, other GPUs, clock out of bounds).
    """

    node: Name
    epoch: int
    sent_ns: int
    gpus: Annotated[list[GpuStatus], msgspec.Meta(max_length=MAX_GPUS)]
    instances: Annotated[list[InstanceClock], msgspec.Meta(max_length=MAX_INSTANCES)] = []
    commands: int = 0
    writes: int = 0
    noop_skips: int = 0
    deadman_resets: int = 0
    dropped: int = 0
    refused: int = 0


class PlanInstance(msgspec.Struct, array_like=True, omit_defaults=True, frozen=True):
    """One instance of a placement: where it runs and its baseline clock and routing weight."""

    name: str
    phase: Phase
    tp: int
    node: str
    gpus: list[int]
    base_freq_mhz: int
    weight: float = 1.0


class PlanUpdate(msgspec.Struct, array_like=True, omit_defaults=True, frozen=True):
    """Daemon -> subscribers (routers, autoscalers): the placement in force; ``seq`` grows on change."""

    controller_epoch: int
    seq: int
    instances: list[PlanInstance]


#: The Struct each message type carries.
BODY: dict[MsgType, type[msgspec.Struct]] = {
    MsgType.PREFILL_REPORT: PrefillReport,
    MsgType.DECODE_REPORT: DecodeReport,
    MsgType.CLOCK_COMMAND: ClockCommand,
    MsgType.HEARTBEAT: Heartbeat,
    MsgType.NODE_STATUS: NodeStatus,
    MsgType.PLAN_UPDATE: PlanUpdate,
}
