"""End to end: vLLM's real scheduler -> dualscale scheduler class -> worker agent -> relay process ->
ControllerDaemon -> sim actuator: clocks decided from the real queue reach the simulated node.

The daemon and the actuator run in threads of this process (as in tests/runtime/test_daemon.py and
test_actuator.py), over real ipc:// sockets; the relay is its own process. Skipped without vLLM.
"""

from __future__ import annotations

import threading
import time

import msgspec
import numpy as np
import pytest

pytest.importorskip("vllm")

from hook_helpers import connect, wait_until  # noqa: E402
from vllm_harness import EngineLoop, make_scheduler, model_config, prefill_queue, request  # noqa: E402

from dualscale.device.sim import SimBackend  # noqa: E402
from dualscale.integrations.vllm import DualscaleAsyncScheduler  # noqa: E402
from dualscale.runtime.actuator import Actuator  # noqa: E402
from dualscale.runtime.config import NodePolicy, RuntimeConfig  # noqa: E402
from dualscale.runtime.daemon import ControllerDaemon  # noqa: E402
from dualscale.runtime.keys import Security, role_names, write_keypair  # noqa: E402

BUDGET = 512  # vLLM's --max-num-batched-tokens, and the prefill instance's max_batch_tokens


class RecordingDaemon(ControllerDaemon):
    """The real daemon, also keeping every (report, decided clock) pair it acted on."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[tuple[object, int]] = []

    def _decide(self) -> None:
        pending = {slot.spec.name: slot.pending for slot in self._dirty}
        n = len(self._outbox)
        super()._decide()
        self.log.extend((pending[cmd.instance], cmd.freq_mhz) for _, cmd in self._outbox[n:])

    def decided(self, instance: str) -> list[tuple[object, int]]:
        return [(r, f) for r, f in list(self.log) if r.instance == instance]


def runtime_config(tmp_path) -> RuntimeConfig:
    """The default, authenticated setup: CURVE keys for the controller, the node's actuator and both engines."""
    keys = tmp_path / "keys"
    for name in role_names(["node0"], ["p0", "d0"]):
        write_keypair(keys, name)
    return msgspec.convert({
        "security": {"mechanism": "curve", "keys_dir": str(keys)},
        "instances": [{"name": "p0", "phase": "prefill", "tp": 2, "gpus": [0, 1], "max_batch_tokens": BUDGET},
                      {"name": "d0", "phase": "decode", "tp": 2, "gpus": [2, 3]}],
        "controller": {"report_address": f"ipc://{tmp_path}/reports", "actuator_address": f"ipc://{tmp_path}/act",
                       "heartbeat_s": 0.05},
        "actuator": {"controller_address": f"ipc://{tmp_path}/act", "deadman_s": 30.0, "status_period_s": 0.05,
                     "sim": {"gpus": 4, "switch_delay_s": 0.0}},
    }, RuntimeConfig)


def test_real_vllm_queue_to_clocks_on_the_simulated_node(tmp_path, monkeypatch, profile):
    config = runtime_config(tmp_path)
    daemon = RecordingDaemon(config, profile=profile)
    backend = SimBackend(profile, gpus=4, switch_delay_s=0.0)
    actuator = Actuator(backend, config.actuator, NodePolicy.of_node(config, "node0"),
                        Security(config.security.mechanism, config.security.keys_dir, "actuator-node0"))
    ready = threading.Event()
    threads = [threading.Thread(target=daemon.run, kwargs={"ready": ready.set}), threading.Thread(target=actuator.run)]
    threads[0].start()
    assert ready.wait(60)
    threads[1].start()
    top = int(profile.clocks_mhz[-1])

    def locked(gpus) -> list[int]:
        return [int(x) for x in backend.state.snapshot()["locked_mhz"][gpus]]

    mc = model_config(tmp_path / "tiny-llama")
    monkeypatch.setenv("DUALSCALE_CONTROLLER", config.controller.report_address)
    monkeypatch.setenv("DUALSCALE_KEYS_DIR", config.security.keys_dir)
    try:
        # ---- prefill instance: vLLM as a P/D producer ----------------------------------------------
        monkeypatch.setenv("DUALSCALE_INSTANCE", "p0")
        pre = make_scheduler(DualscaleAsyncScheduler, mc, async_scheduling=True, kv_role="kv_producer",
                             kv_path=tmp_path / "kv", max_batched_tokens=BUDGET)
        queues: dict[int, tuple] = {}
        loop = EngineLoop(pre, True, lambda s, out: queues.__setitem__(pre.dualscale.agent.seq, prefill_queue(s, out)))

        def step_until_decided(loop, instance: str) -> tuple[object, int]:
            """One engine step at a time until the daemon has decided on a report of this step."""
            def decided_now() -> bool:
                loop.step()
                seq = loop.sched.dualscale.agent.seq
                return wait_until(lambda: any(r.seq == seq for r, _ in daemon.decided(instance)), 1.0)
            assert wait_until(decided_now, 60), f"no decision for {instance}"
            seq = loop.sched.dualscale.agent.seq
            return next((r, f) for r, f in daemon.decided(instance) if r.seq == seq)

        connect(pre)
        # a fresh short prompt: time to spare, a low clock
        pre.add_request(request("fresh", 200, 1))
        report, fresh_mhz = step_until_decided(loop, "p0")
        arrival, prompt, prefilled = queues[report.seq]
        assert np.frombuffer(report.prompt_tokens, "<i8").tolist() == prompt == [200] and prefilled == [0]
        assert np.frombuffer(report.arrival_s, "<f8").tolist() == arrival
        assert fresh_mhz < top
        assert wait_until(lambda: locked([0, 1]) == [fresh_mhz] * 2), locked([0, 1])
        loop.run_until_idle()

        # four long prompts that arrived 0.58 s ago (TTFT SLO 0.6 s): the deadline is at hand, top clock
        t = time.time() - 0.58
        for i in range(4):
            pre.add_request(request(f"late{i}", 2000, 1, arrival_s=t))
        report, late_mhz = step_until_decided(loop, "p0")
        assert np.frombuffer(report.prompt_tokens, "<i8").tolist() == queues[report.seq][1] == [2000] * 4
        assert late_mhz == top
        assert wait_until(lambda: locked([0, 1]) == [top] * 2), locked([0, 1])
        loop.run_until_idle()

        # ---- decode instance: vLLM as a P/D consumer -----------------------------------------------
        monkeypatch.setenv("DUALSCALE_INSTANCE", "d0")
        dec = make_scheduler(DualscaleAsyncScheduler, mc, async_scheduling=True, kv_role="kv_consumer",
                             kv_path=tmp_path / "kv")
        batches: dict[int, list[int]] = {}
        dloop = EngineLoop(dec, True, lambda s, out: batches.__setitem__(
            dec.dualscale.agent.seq, [r.num_output_tokens for r in s.running if r.num_output_tokens > 0]))
        connect(dec)
        for i in range(4):
            dec.add_request(request(f"d{i}", 100, 400))
        while True:  # until the running batch has emitted its first tokens
            report, dec_mhz = step_until_decided(dloop, "d0")
            if np.frombuffer(report.tokens_out, "<i8").size == 4:
                break
        assert np.frombuffer(report.tokens_out, "<i8").tolist() == batches[report.seq]
        assert dec_mhz < top  # fresh requests, a 100 ms TPOT budget: slack for a lower clock
        assert wait_until(lambda: locked([2, 3]) == [dec_mhz] * 2), locked([2, 3])
        for s in (pre, dec):
            assert s.dualscale.agent.errors == 0 and s.dualscale.failed is None
            s.shutdown()
        assert daemon.dropped == {}
    finally:
        daemon.stop()
        actuator.stop()
        for th in threads:
            th.join(30)
    try:
        assert locked([0, 1, 2, 3]) == [0, 0, 0, 0]  # the actuator reset every clock it locked
    finally:
        backend.close()
