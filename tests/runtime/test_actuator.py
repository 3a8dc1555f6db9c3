from __future__ import annotations

import threading
import time

import pytest
from rt_helpers import policy, security

from dualscale.device.sim import SimBackend
from dualscale.errors import DeviceError, PermissionDenied
from dualscale.runtime.actuator import Actuator, ActuatorState, EnergyMeter
from dualscale.runtime.messages import ClockCommand, Heartbeat, MsgType
from dualscale.runtime.serial import FrameEncoder

ENC = FrameEncoder()


def cmd(instance, gpus, freq_mhz, seq=1):
    return bytes(ENC.encode(MsgType.CLOCK_COMMAND, ClockCommand(instance, gpus, freq_mhz, seq)))


class Recording(SimBackend):
    """SimBackend that records which thread made each clock write and can fail on demand."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls: list[tuple[str, int, int, int]] = []
        self.fail: dict[int, Exception] = {}
        self._lock = threading.Lock()

    def set_locked_sm_clock_mhz(self, gpu, freq_mhz):
        if gpu in self.fail:
            raise self.fail[gpu]
        with self._lock:
            self.calls.append(("lock", gpu, freq_mhz, threading.get_ident()))
        super().set_locked_sm_clock_mhz(gpu, freq_mhz)

    def reset_locked_sm_clock(self, gpu):
        if gpu in self.fail:
            raise self.fail[gpu]
        with self._lock:
            self.calls.append(("reset", gpu, 0, threading.get_ident()))
        super().reset_locked_sm_clock(gpu)


@pytest.fixture
def backend(profile):
    return Recording(profile, gpus=4, switch_delay_s=0.0, call_delay_s=0.005)


@pytest.fixture
def act(backend, config):
    a = Actuator(backend, config.actuator, policy(config))
    a.start()
    yield a
    a.close()


def locks(backend):
    return [c for c in backend.calls if c[0] == "lock"]


def test_start_resets_every_managed_gpu(backend, act):
    assert sorted(c[1] for c in backend.calls if c[0] == "reset") == [0, 1, 2, 3]


def test_applies_an_instance_on_all_its_gpus_in_parallel(backend, act):
    act.handle(cmd("d0", [2, 3, 3, 2], 1380))  # a repeated GPU is written once
    act._apply()
    assert [backend.state.locked_mhz(g) for g in range(4)] == [0, 0, 1380, 1380]
    assert len(locks(backend)) == 2 and len({c[3] for c in locks(backend)}) == 2  # one thread per GPU
    assert act.applied["d0"].applied_mhz == 1380


def test_no_op_writes_are_skipped(backend, act):
    act.handle(cmd("d0", [2, 3], 1380, 1))
    act._apply()
    n = len(locks(backend))
    act.handle(cmd("d0", [2, 3], 1380, 2))
    act._apply()
    assert len(locks(backend)) == n and act.noop_skips == 2


def test_newest_command_per_instance_wins(backend, act):
    for seq, f in enumerate((1005, 1200, 1500), 1):
        act.handle(cmd("d0", [2, 3], f, seq))
    act.handle(cmd("p0", [0, 1], 780, 1))
    act._apply()
    assert {(c[1], c[2]) for c in locks(backend)} == {(2, 1500), (3, 1500), (0, 780), (1, 780)}


def test_clamps_to_supported_clocks_rounding_up(backend, act):
    assert act.clamp_mhz(0, 1000) == 1005  # 345 + 15k grid: the next one up
    assert act.clamp_mhz(0, 100) == 345
    assert act.clamp_mhz(0, 5000) == 1980
    act.handle(cmd("p0", [0, 1], 1000))
    act._apply()
    assert backend.state.locked_mhz(0) == 1005
    assert act.applied["p0"].requested_mhz == 1000 and act.applied["p0"].applied_mhz == 1005


def test_commands_for_unmanaged_gpus_and_garbage_are_dropped(backend, act):
    act.handle(cmd("x", [5000], 1005))  # beyond any GPU index: malformed
    act.handle(cmd("x", [1], 1005))
    act.handle(cmd("d0", [0, 1], 1005))
    act.handle(b"\x00\x01garbage")
    act.handle(bytes([9, MsgType.CLOCK_COMMAND]) + b"\x90")
    act._apply()
    assert act.dropped == 3 and act.refused == {"instance": 1, "gpus": 1, "clock": 0} and not locks(backend)


def test_dead_man_resets_every_locked_gpu(backend, act):
    act.handle(cmd("d0", [2, 3], 1200))
    act._apply()
    act._check_deadman(time.monotonic())
    assert backend.state.locked_mhz(2) == 1200  # the controller was just heard
    act._check_deadman(act.last_heard_s + act.settings.deadman_s + 0.01)
    assert [backend.state.locked_mhz(g) for g in range(4)] == [0] * 4
    assert act.deadman_resets == 1 and not act.applied
    act.handle(bytes(ENC.encode(MsgType.HEARTBEAT, Heartbeat(1, 2))))  # the controller is back
    act.handle(cmd("d0", [2, 3], 1200, 2))
    act._apply()
    assert backend.state.locked_mhz(2) == 1200


def test_heartbeat_keeps_the_dead_man_quiet(backend, act):
    act.handle(cmd("d0", [2, 3], 1200))
    act._apply()
    act.last_heard_s -= 100.0
    act.handle(bytes(ENC.encode(MsgType.HEARTBEAT, Heartbeat(1, 2))))
    act._check_deadman(time.monotonic())
    assert act.deadman_resets == 0 and backend.state.locked_mhz(2) == 1200


def test_device_errors_are_reported_not_fatal(backend, act):
    backend.fail[3] = DeviceError("GPU 3: boom")
    act.handle(cmd("d0", [2, 3], 1200))
    act._apply()
    st = act.status()
    assert backend.state.locked_mhz(2) == 1200 and act.locked[3] == 0
    assert "boom" in act.errors[3]
    assert [g.locked_mhz for g in st.gpus] == [0, 0, 1200, 0]


def test_status_reads_back_clock_reasons_power_energy(backend, act):
    act.handle(cmd("p0", [0, 1], 1005))
    act._apply()
    backend.state.set_throttle(1, 900)
    st = act.status()
    g0, g1 = st.gpus[0], st.gpus[1]
    assert (g0.locked_mhz, g0.sm_mhz, g0.reasons) == (1005, 1005, 0)
    assert (g1.locked_mhz, g1.sm_mhz, g1.reasons) == (1005, 900, 0x4)
    assert g0.power_w > 0 and g0.energy_j >= 0
    assert st.instances[0].instance == "p0" and st.writes >= 6


def test_permission_denied_at_start_propagates(profile, config):
    b = Recording(profile, gpus=4)
    b.fail[0] = PermissionDenied("GPU 0: NVML reset: Insufficient Permissions (run as root)")
    with pytest.raises(PermissionDenied):
        Actuator(b, config.actuator, policy(config)).start()


def wait_until(cond, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_run_resets_clocks_on_stop_and_on_error(backend, config):
    import zmq

    ctx = zmq.Context()
    ctl = security(config, "controller")
    ctl.authenticate(ctx, {"actuators": ["actuator-node0"]})
    router = ctx.socket(zmq.ROUTER)  # the controller's end
    ctl.server("actuators")(router)
    router.bind(config.actuator.controller_address)
    a = Actuator(backend, config.actuator, policy(config), security(config, "actuator-node0"))
    t = threading.Thread(target=a.run)
    t.start()
    try:
        assert router.poll(60_000)  # the actuator's first status: it is connected
        route = router.recv_multipart()[0]
        router.send_multipart([route, cmd("p0", [0, 1], 1380)])
        wait_until(lambda: backend.state.locked_mhz(0) == 1380)
    finally:
        a.stop()
        t.join(60)
        router.close(0)
        ctl.close()
        ctx.term()
    assert a.state is ActuatorState.STOPPED
    assert [backend.state.locked_mhz(g) for g in range(4)] == [0] * 4

    b = Actuator(backend, config.actuator, policy(config), security(config, "actuator-node0"))
    b.start()
    b.handle(cmd("p0", [0, 1], 1500))
    b._apply()

    def boom():
        raise RuntimeError("loop failure")

    b.start = lambda: None  # already started
    b.step = boom
    with pytest.raises(RuntimeError):
        b.run()
    assert backend.state.locked_mhz(0) == 0 and b.state is ActuatorState.STOPPED


def test_managed_gpus_must_exist(backend, config):
    import msgspec

    bad = msgspec.structs.replace(config.actuator, gpus=[0, 9])
    with pytest.raises(ValueError, match="GPU 9 does not exist"):
        Actuator(backend, bad, policy(config))


def test_energy_meter_extends_a_coarse_counter_with_power_samples():
    m = EnergyMeter(counter_j=5.0e6, t_s=0.0, power_w=100.0)
    assert m.sample(5.0e6, 100.0, 0.05) == pytest.approx(5.0)  # counter unchanged: trapezoid of samples
    assert m.sample(5.0e6, 300.0, 0.10) == pytest.approx(15.0)
    assert m.sample(5.0e6 + 12.0, 300.0, 0.11) == pytest.approx(15.0)  # counter moved, below estimate: never drops
    assert m.sample(5.0e6 + 40.0, 300.0, 0.2) == pytest.approx(40.0)  # the counter is the truth again


def test_energy_meter_survives_a_counter_reset_and_large_values():
    big = float(2**40)  # mJ-scale counters past 32 bits, in J
    m = EnergyMeter(counter_j=big, t_s=0.0)
    assert m.sample(big + 100.0, 0.0, 1.0) == pytest.approx(100.0)
    assert m.sample(10.0, 0.0, 2.0) == pytest.approx(100.0)  # counter went back (driver reload)
    assert m.sample(30.0, 0.0, 3.0) == pytest.approx(120.0)


def test_observe_mode_reads_and_reports_but_never_writes_a_clock(backend, config):
    """Shadow mode: no reset at start, commands recorded as what would have been applied, no lock, no
    reset at exit or by the dead-man; status (clocks, power, energy) as usual."""
    import msgspec

    backend.set_locked_sm_clock_mhz(1, 900)  # someone else's lock: shadow mode leaves it alone
    backend.calls.clear()
    a = Actuator(backend, msgspec.structs.replace(config.actuator, observe=True), policy(config))
    a.start()
    a.handle(cmd("d0", [2, 3], 1380))
    a._apply()
    st = a.status()
    assert [i.applied_mhz for i in st.instances] == [0] and st.instances[0].requested_mhz == 1380
    assert len(st.gpus) == 4 and st.gpus[1].locked_mhz == 0  # the actuator itself locked nothing
    a.release_all()  # what the dead-man calls
    a.close()
    assert backend.calls == []  # not one clock write or reset
    assert [backend.state.locked_mhz(g) for g in range(4)] == [0, 900, 0, 0]
    assert a.exit_code == 0
