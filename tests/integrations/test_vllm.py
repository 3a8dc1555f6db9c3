"""The vLLM integration driven through vLLM's REAL v1 scheduler (CPU, no model): what a controller
receives over a real socket matches the scheduler's own state step by step.

Skipped when vLLM is not installed (``pip install '.[vllm]'``; CI runs these after the main suite).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("vllm")

from hook_helpers import connect, wait_until  # noqa: E402
from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm_harness import TINY_LLAMA, EngineLoop, build_scheduler, make_scheduler, model_config, prefill_queue, request  # noqa: E402

from dualscale.integrations.vllm import DualscaleAsyncScheduler, DualscaleScheduler  # noqa: E402
from dualscale.runtime.messages import DecodeReport, MsgType, PrefillReport  # noqa: E402

MODES = {"sync": (DualscaleScheduler, False), "async": (DualscaleAsyncScheduler, True)}
PLAIN = {False: Scheduler, True: AsyncScheduler}


@pytest.fixture(scope="module")
def mc(tmp_path_factory):
    return model_config(tmp_path_factory.mktemp("tiny-llama"))


def build(mc, tmp_path, mode, monkeypatch, *, controller, instance, role=None, phase=None, **kw):
    cls, async_ = MODES[mode]
    monkeypatch.setenv("DUALSCALE_CONTROLLER", controller)
    monkeypatch.setenv("DUALSCALE_INSTANCE", instance)
    if phase:
        monkeypatch.setenv("DUALSCALE_PHASE", phase)
    sched = make_scheduler(cls, mc, async_scheduling=async_, kv_role=role, kv_path=tmp_path / "kv", **kw)
    return sched, async_


def f64(b):
    return np.frombuffer(b, "<f8")


def i64(b):
    return np.frombuffer(b, "<i8")


def received_by_seq(pull, agent) -> dict[int, object]:
    """Every report the PULL socket received, by seq, once the relay has forwarded them all."""
    assert wait_until(lambda: agent.pending == 0), (agent.sent, agent.dropped)
    got = {}
    for mtype, r in pull.received():
        got[r.seq] = (mtype, r)
    return got


@pytest.mark.parametrize("mode", MODES)
def test_prefill_reports_match_the_scheduler_step_by_step(mc, tmp_path, monkeypatch, pull, mode):
    sched, async_ = build(mc, tmp_path, mode, monkeypatch, controller=pull.address, instance="p0",
                          role="kv_producer", max_batched_tokens=512)
    ds = sched.dualscale
    assert ds is not None and (ds.phase, ds.instance) == ("prefill", "p0")
    seq0 = connect(sched)
    expected: dict[int, tuple] = {}

    def on_schedule(s, out):
        t = time.time()
        expected[ds.agent.seq] = (t, prefill_queue(s, out), s.kv_cache_manager.usage, ds.iteration_s)

    loop = EngineLoop(sched, async_, on_schedule)
    t0 = time.time()
    # arrivals out of order of their ids, prompts longer than the 512-token budget (chunked), one
    # request added mid-run; a P/D prefill request produces one token
    for rid, prompt, dt in (("a", 1200, 0.0), ("b", 300, 0.1), ("c", 700, 0.05)):
        sched.add_request(request(rid, prompt, 1, arrival_s=t0 - 1 + dt))
    loop.step()
    loop.step()
    sched.add_request(request("d", 90, 1))
    loop.run_until_idle()
    assert not sched.requests or all(r.is_finished() for r in sched.requests.values())

    got = received_by_seq(pull, ds.agent)
    assert sorted(expected) == sorted(s for s in got if s > seq0)
    for seq, (t, (arrival, prompt, prefilled), kv, iteration_s) in sorted(expected.items()):
        mtype, r = got[seq]
        assert mtype is MsgType.PREFILL_REPORT and isinstance(r, PrefillReport) and r.instance == "p0"
        assert f64(r.arrival_s).tolist() == arrival  # wall-clock arrival, FCFS order
        assert i64(r.prompt_tokens).tolist() == prompt
        assert i64(r.prefilled_tokens).tolist() == prefilled
        assert r.kv_util == kv
        assert r.iteration_s == iteration_s
        assert t - 5 < r.now_s <= t and all(a <= r.now_s for a in arrival)
    # the first step by hand: all three queued in arrival order (a, c, b), nothing prefilled yet;
    # the second: a's first 512-token chunk done
    a, b, c = t0 - 1, t0 - 0.9, t0 - 0.95
    r1, r2 = got[seq0 + 1][1], got[seq0 + 2][1]
    assert f64(r1.arrival_s).tolist() == [a, c, b] and i64(r1.prefilled_tokens).tolist() == [0, 0, 0]
    assert i64(r2.prompt_tokens).tolist() == [1200, 700, 300] and i64(r2.prefilled_tokens).tolist() == [512, 0, 0]
    last = got[max(expected)][1]
    assert i64(last.prompt_tokens).size == 0  # every prompt done
    assert any(got[s][1].iteration_s > 0 for s in expected)  # step times measured
    assert ds.agent.errors == 0 and ds.failed is None
    sched.shutdown()


def capped(queue: tuple[list, list, list], cap_tokens: int) -> tuple[list, list, list]:
    """The queue up to (and with) the request whose prompt tokens left reach ``cap_tokens`` in all."""
    left, n = cap_tokens, 0
    for p, d in zip(queue[1], queue[2], strict=True):
        if left <= 0:
            break
        left -= p - d
        n += 1
    return queue[0][:n], queue[1][:n], queue[2][:n]


@pytest.mark.parametrize("mode", MODES)
def test_a_long_prefill_queue_is_listed_up_to_queue_batches_of_the_token_budget(mc, tmp_path, monkeypatch, pull,
                                                                               mode):
    """queue_batches = 2 with a 512-token budget: the report lists the queue until 1,024 prompt tokens
    are left in it (the rest cannot reach a controller whose horizon is 2 batches or less)."""
    cfg = {"dualscale": {"controller": pull.address, "instance": "p0", "queue_batches": 2}}
    cls, async_ = MODES[mode]
    sched = make_scheduler(cls, mc, async_scheduling=async_, kv_role="kv_producer", kv_path=tmp_path / "kv",
                           max_batched_tokens=512, additional_config=cfg)
    ds = sched.dualscale
    assert ds.queue_tokens == 1024
    seq0 = connect(sched)
    expected: dict[int, tuple] = {}
    loop = EngineLoop(sched, async_, lambda s, out: expected.__setitem__(ds.agent.seq, prefill_queue(s, out)))
    t0 = time.time()
    for i in range(12):
        sched.add_request(request(f"q{i}", 300 + 37 * i, 1, arrival_s=t0 - 1 + 0.01 * i))
    loop.run_until_idle()
    got = received_by_seq(pull, ds.agent)
    lengths = []
    for seq, queue in sorted(expected.items()):
        r = got[seq][1]
        want = capped(queue, 1024)
        assert f64(r.arrival_s).tolist() == want[0]
        assert i64(r.prompt_tokens).tolist() == want[1]
        assert i64(r.prefilled_tokens).tolist() == want[2]
        lengths.append((len(queue[0]), len(want[0])))
    assert seq0 < min(expected)
    assert any(full > 4 >= listed for full, listed in lengths)  # the cap did cut the queue
    sched.shutdown()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", ["vllm", "reversed"])
def test_decode_reports_match_the_scheduler_step_by_step(mc, tmp_path, monkeypatch, pull, mode, order):
    sched, async_ = build(mc, tmp_path, mode, monkeypatch, controller=pull.address, instance="d0",
                          role="kv_consumer", max_batched_tokens=256)
    ds = sched.dualscale
    assert ds is not None and (ds.phase, ds.instance) == ("decode", "d0")
    connect(sched)
    if order == "reversed":
        # the running list reversed while reporting: the requests still waiting for their first token
        # come first, not last as vLLM orders them (the report's general path)
        report = sched._report_decode

        def reversed_report(ds):
            sched.running.reverse()
            try:
                report(ds)
            finally:
                sched.running.reverse()
        sched._report_decode = reversed_report
    first_seen: dict[str, tuple[float, float]] = {}
    expected: dict[int, tuple] = {}

    def on_update(s, t0, t1):
        for rid, r in s.requests.items():
            if r.num_output_tokens > 0 and rid not in first_seen:
                first_seen[rid] = (t0, t1)

    def on_schedule(s, out):
        running = s.running[::-1] if order == "reversed" else s.running
        batch = [(r.request_id, r.num_output_tokens, r.num_computed_tokens) for r in running
                 if r.request_id in first_seen]
        expected[ds.agent.seq] = (time.time(), batch, s.kv_cache_manager.usage)

    loop = EngineLoop(sched, async_, on_schedule, on_update)
    for i in range(6):
        sched.add_request(request(f"r{i}", 60 + 90 * i, 4 + 3 * i))
    for _ in range(5):
        loop.step()
    sched.add_request(request("late", 40, 5))
    loop.run_until_idle()

    got = received_by_seq(pull, ds.agent)
    assert set(expected) <= set(got)  # every report after the connection was made arrived
    sizes = []
    for seq, (t, batch, kv) in sorted(expected.items()):
        mtype, r = got[seq]
        assert mtype is MsgType.DECODE_REPORT and isinstance(r, DecodeReport) and r.instance == "d0"
        assert i64(r.tokens_out).tolist() == [b[1] for b in batch]
        assert i64(r.context_tokens).tolist() == [b[2] for b in batch]
        for ft, (rid, _, _) in zip(f64(r.first_token_s).tolist(), batch, strict=True):
            lo, hi = first_seen[rid]
            assert lo <= ft <= hi, (rid, ft, lo, hi)  # recorded by the update that produced the token
        assert r.kv_util == kv and t - 5 < r.now_s <= t
        sizes.append(len(batch))
    assert max(sizes) >= 5 and sizes[-1] == 0  # a real batch formed, and drained
    assert set(first_seen) == {f"r{i}" for i in range(6)} | {"late"}
    assert ds.awaiting == {}  # nothing kept for finished requests
    assert ds.agent.errors == 0 and ds.failed is None
    sched.shutdown()


def run_trace(sched, async_) -> list:
    """A fixed workload; returns what the engine would see: every step's scheduled tokens and the
    finished requests, in order."""
    trace = []
    loop = EngineLoop(sched, async_, lambda s, out: trace.append(dict(out.num_scheduled_tokens)))
    for i in range(8):
        sched.add_request(request(f"q{i}", 50 + 120 * i, 3 + i, arrival_s=1000.0 + i))
    loop.run_until_idle()
    return trace


@pytest.mark.parametrize("mode", MODES)
def test_controller_absent_reports_dropped_and_counted_engine_unaffected(mc, tmp_path, monkeypatch, mode):
    sched, async_ = build(mc, tmp_path, mode, monkeypatch, controller=f"ipc://{tmp_path}/nobody", instance="d0",
                          phase="decode")
    plain = make_scheduler(PLAIN[async_], mc, async_scheduling=async_)
    trace = run_trace(sched, async_)
    assert trace == run_trace(plain, async_) and len(trace) > 10
    agent = sched.dualscale.agent
    assert wait_until(lambda: agent.pending == 0)
    assert (agent.sent, agent.dropped, agent.errors) == (0, len(trace), 0)
    sched.shutdown()
    assert sched.dualscale is None


def test_a_failure_in_dualscale_is_logged_once_and_reporting_stops(mc, tmp_path, monkeypatch, pull, caplog):
    sched, async_ = build(mc, tmp_path, "async", monkeypatch, controller=pull.address, instance="d0",
                          phase="decode")
    ds = sched.dualscale
    ds._scheduled_at = None  # breaks the report
    with caplog.at_level(logging.ERROR, logger="dualscale.integrations.vllm"):
        trace = run_trace(sched, async_)
    assert sched.dualscale is None and isinstance(ds.failed, AttributeError)
    assert len([r for r in caplog.records if "reporting stopped" in r.getMessage()]) == 1
    assert trace == run_trace(make_scheduler(AsyncScheduler, mc, async_scheduling=True), True)
    sched.shutdown()


def test_not_configured_is_inert(mc, caplog):
    with caplog.at_level(logging.WARNING, logger="dualscale.integrations.vllm"):
        sched = make_scheduler(DualscaleAsyncScheduler, mc, async_scheduling=True)
    assert sched.dualscale is None and "reporting is off" in caplog.text
    trace = run_trace(sched, True)
    assert trace == run_trace(make_scheduler(AsyncScheduler, mc, async_scheduling=True), True)


@pytest.mark.parametrize(("role", "phase", "want"), [
    ("kv_producer", None, "prefill"),
    ("kv_consumer", None, "decode"),
    ("kv_consumer", "prefill", "prefill"),  # the override wins
    ("kv_both", "decode", "decode"),
    ("kv_both", None, None),  # ambiguous: reporting off, the engine goes on
    (None, None, None),
])
def test_phase_from_kv_role_with_override(mc, tmp_path, monkeypatch, caplog, role, phase, want):
    with caplog.at_level(logging.ERROR, logger="dualscale.integrations.vllm"):
        sched, _ = build(mc, tmp_path, "sync", monkeypatch, controller=f"ipc://{tmp_path}/r", instance="x",
                         role=role, phase=phase)
    if want is None:
        assert sched.dualscale is None and "DUALSCALE_PHASE" in caplog.text
    else:
        assert sched.dualscale.phase == want
    sched.shutdown()


def test_settings_from_additional_config_and_data_parallel_rank(mc, tmp_path, monkeypatch):
    monkeypatch.setenv("DUALSCALE_INSTANCE", "from-env")
    cfg = {"dualscale": {"controller": f"ipc://{tmp_path}/r", "instance": "decode-0", "phase": "decode"}}
    sched = make_scheduler(DualscaleScheduler, mc, async_scheduling=False, additional_config=cfg,
                           data_parallel=(4, 2))
    assert (sched.dualscale.instance, sched.dualscale.phase) == ("decode-0-dp2", "decode")
    sched.shutdown()


def test_bad_settings_are_logged_and_the_engine_goes_on(mc, caplog):
    with caplog.at_level(logging.ERROR, logger="dualscale.integrations.vllm"):
        sched = make_scheduler(DualscaleScheduler, mc, async_scheduling=False,
                               additional_config={"dualscale": {"controller": "tcp://h:1", "instanse": "p0"}})
    assert sched.dualscale is None and "instanse" in caplog.text
    assert len(run_trace(sched, False)) > 10


def test_the_engine_side_loads_no_controller_code():
    """The scheduler class runs in vLLM's engine process: it must not pull in the controllers (Numba
    kernels, OSQP) or the simulator, only the worker agent."""
    code = ("import sys, dualscale.integrations.vllm\n"
            "print(sorted(m for m in sys.modules if m.startswith(('dualscale.control', 'dualscale._kernels', "
            "'dualscale.sim', 'dualscale.profile', 'dualscale.runtime.daemon'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"


def test_one_flag_through_vllms_own_command_line(tmp_path, pull):
    """`--scheduler-cls` and `--additional-config` as `vllm serve` parses them: vLLM resolves the
    class itself, and the scheduler it builds reports."""
    import json

    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    argv = ["--model", str(tmp_path), "--skip-tokenizer-init",
            "--scheduler-cls", "dualscale.integrations.vllm.DualscaleAsyncScheduler",
            "--kv-transfer-config", json.dumps({"kv_connector": "ExampleConnector", "kv_role": "kv_producer",
                                                "kv_connector_extra_config": {"shared_storage_path": str(tmp_path)}}),
            "--additional-config", json.dumps({"dualscale": {"controller": pull.address, "instance": "prefill-0"}})]
    args = EngineArgs.add_cli_args(FlexibleArgumentParser()).parse_args(argv)
    vc = EngineArgs.from_cli_args(args).create_engine_config()
    cls = vc.scheduler_config.get_scheduler_cls()
    assert cls is DualscaleAsyncScheduler
    sched = build_scheduler(cls, vc)
    assert (sched.dualscale.instance, sched.dualscale.phase) == ("prefill-0", "prefill")
    seq0 = connect(sched)
    sched.add_request(request("x", 300, 1))
    EngineLoop(sched, vc.scheduler_config.async_scheduling).run_until_idle()
    got = received_by_seq(pull, sched.dualscale.agent)
    assert next(i64(got[s][1].prompt_tokens).tolist() for s in sorted(got) if s > seq0) == [300]
    sched.shutdown()
