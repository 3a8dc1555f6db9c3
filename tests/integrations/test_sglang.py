"""The SGLang plugin on SGLang's real classes (skipped where SGLang is not installed; CI installs it).

Real: SGLang's plugin loader (``load_plugins()`` discovering dualscale's entry point when dualscale is
installed, else our ``register()``), its ``HookRegistry``, the ``Scheduler`` class whose methods the
hooks wrap, ``Req``/``ScheduleBatch``/``ForwardMode``, a simulated ``RadixCache`` (prefix matches
and evictable tokens), ``SchedulerPoolStatsObserver`` (KV use), request state moved on by SGLang's
own functions (``init_next_round_input`` matching the cached prefix, ``checkpoint_kv_cache``
advancing a chunked request), and ranks and role published by SGLang's ``runtime_context.publish``
from a real ``ServerArgs``, as its scheduler process does.

Not real: the scheduler is never constructed (its ``__init__`` loads a model on a device), so
``Scheduler.__init__`` is replaced by one that sets the attributes the plugin reads, and
``Scheduler.run_batch`` by a recorder (the real one runs the model); the hooks wrap those as they
would wrap the real methods. The event loop is this file's sequence of batches, not SGLang's; the
KV allocator is a stand-in (its free count), and no GPU, model or serving process is involved.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import logging
import warnings
from array import array
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hook_helpers import wait_until

with warnings.catch_warnings():  # SGLang's own import-time deprecations are not ours to fail on
    warnings.simplefilter("ignore")
    sglang = pytest.importorskip("sglang", reason="SGLang is not installed (CI installs it)")
    import sglang.srt.plugins as sgl_plugins
    from sglang.srt import runtime_context
    from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.managers.scheduler_components.pool_stats_observer import SchedulerPoolStatsObserver
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.common import checkpoint_kv_cache
    from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.sampling.sampling_params import SamplingParams
    from sglang.srt.server_args import ServerArgs

import torch  # installed with SGLang

from dualscale.integrations import sglang as plugin
from dualscale.integrations.settings import check_version

TARGETS = {f"{plugin.SCHEDULER}.__init__", f"{plugin.SCHEDULER}.run_batch"}
TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2,
              "vocab_size": 1000, "max_position_embeddings": 8192, "torch_dtype": "float32"}
MAX_TOKENS = 20_000
CACHED = 64  # tokens 0..63 are in the radix cache before the test's requests arrive


def entry_point_installed() -> bool:
    return any(ep.value == "dualscale.integrations.sglang:register"
               for ep in importlib.metadata.entry_points(group=sgl_plugins.GENERAL_PLUGINS_GROUP))


class Engine:
    """The SGLang side of a test: loads the plugins and publishes the process's ranks and role as
    SGLang's scheduler process does; undoes both after the test."""

    def __init__(self, monkeypatch, tmp_path) -> None:
        self.mp = monkeypatch
        self.model = tmp_path / "model"
        self.model.mkdir()
        (self.model / "config.json").write_text(json.dumps(TINY_LLAMA))
        self.batches: list[tuple[Scheduler, ScheduleBatch]] = []  # what the (recorded) run_batch got
        self.seen: dict[int, list] = {}  # report seq -> the scheduler's state when run_batch ran
        self.on_run = None

    def load(self, run_batch=None, init=None) -> dict:
        """SGLang's plugin loading, with Scheduler.__init__/run_batch first set to ``init``/``run_batch``
        (default: this file's stand-ins); the hooks registered, by target."""
        mp = self.mp
        HookRegistry.reset()
        mp.setattr(Scheduler, "__init__", init or _fake_init())
        mp.setattr(Scheduler, "run_batch", run_batch or self._run_batch)
        mp.setattr(sgl_plugins, "_plugins_loaded", False)
        mp.setenv("SGLANG_PLUGINS", "dualscale")
        if entry_point_installed():
            sgl_plugins.load_plugins()
        else:  # dualscale not installed (tests run from the source tree): what load_plugins() would call
            plugin.register()
            HookRegistry.apply_hooks()
        return {t: [h for _, h, _ in hs] for t, hs in HookRegistry._hooks.items()}

    def publish(self, *, world_rank: int = 0, dp_rank: int | None = None, **server_args) -> None:
        """Ranks and role as SGLang's scheduler process publishes them before building its Scheduler."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sa = ServerArgs(model_path=str(self.model), device="cpu", **server_args)
            runtime_context.publish(sa, role="scheduler",
                                    ranks=runtime_context.SpawnRanks(world_rank=world_rank, dp_rank=dp_rank))

    def _run_batch(self, sched, batch, *args, **kwargs):
        ds = getattr(sched, "_dualscale", None)
        if ds is not None and ds.agent.seq:
            self.seen[ds.agent.seq] = self.on_run(sched, batch) if self.on_run else None
        self.batches.append((sched, batch))
        return "result"

    def close(self) -> None:
        HookRegistry.reset()
        runtime_context.reset_context()


def _fake_init():
    """What Scheduler.__init__ sets that the plugin reads (the real one loads a model). A new function
    per test: SGLang's apply_hooks also rebinds every module global that is the function it wraps."""

    def init(self, *args, **kwargs):
        self.waiting_queue = []
        self.running_batch = ScheduleBatch(reqs=[], batch_is_full=False)
        self.chunked_req = None
        self.tree_cache = RadixCache.create_simulated()
        self.tree_cache.insert(InsertParams(key=RadixKey(array("q", range(CACHED))), value=torch.arange(CACHED)))
        self.kv_in_use = 0  # the allocator stand-in's count
        self.token_to_kv_pool_allocator = SimpleNamespace(available_size=lambda: MAX_TOKENS - CACHED - self.kv_in_use)
        self.pool_stats_observer = SchedulerPoolStatsObserver(
            tree_cache=self.tree_cache, token_to_kv_pool_allocator=self.token_to_kv_pool_allocator,
            req_to_token_pool=None, session_controller=None, hisparse_coordinator=None, is_hybrid_swa=False,
            is_hybrid_ssm=False, enable_hisparse=False, full_tokens_per_layer=None, swa_tokens_per_layer=None,
            max_total_num_tokens=MAX_TOKENS)

    return init


@pytest.fixture
def engine(monkeypatch, tmp_path):
    e = Engine(monkeypatch, tmp_path)
    yield e
    e.close()


def configure(monkeypatch, address: str, instance: str, phase: str | None = None) -> None:
    monkeypatch.setenv("DUALSCALE_CONTROLLER", address)
    monkeypatch.setenv("DUALSCALE_INSTANCE", instance)
    if phase:
        monkeypatch.setenv("DUALSCALE_PHASE", phase)


def new_req(rid: str, tokens, max_new_tokens: int = 8) -> Req:
    """A request as the scheduler queues it: SGLang's Req, its wait-queue entry time set."""
    r = Req(rid, "", array("q", tokens), SamplingParams(max_new_tokens=max_new_tokens))
    r.time_stats.set_wait_queue_entry_time()
    return r


def connect(sched) -> None:
    """Idle iterations until the relay has delivered a report (later ones are not dropped)."""
    agent = sched._dualscale.agent
    assert wait_until(lambda: (sched.run_batch(ScheduleBatch(reqs=[], forward_mode=ForwardMode.IDLE)),
                               agent.sent >= 1)[1]), "the report relay never reached the socket"


def received(pull, agent) -> dict:
    assert wait_until(lambda: agent.pending == 0)
    return {r.seq: r for _, r in pull.received()}


def f64(b) -> list:
    return np.frombuffer(b, "<f8").tolist()


def i64(b) -> list:
    return np.frombuffer(b, "<i8").tolist()


def test_scheduler_still_has_what_the_plugin_reads():
    """A drift detector: the attributes and methods the plugin reads exist in this SGLang."""
    src = inspect.getsource(Scheduler)
    for attr in ("self.waiting_queue", "self.running_batch", "self.pool_stats_observer"):
        assert attr in src
    assert list(inspect.signature(Scheduler.run_batch).parameters)[:2] == ["self", "batch"]
    r = new_req("r", range(10))
    assert (r.prefix_len, len(r.output_ids), r.time_stats.wait_queue_entry_time > 0) == (0, 0, True)
    assert "def get_kv_token_stats" in inspect.getsource(inspect.getmodule(SchedulerPoolStatsObserver))


def test_the_tested_release_is_the_supported_one():
    check_version("sglang", sglang.__version__)  # raises naming the range otherwise


def test_installed_dualscale_is_found_by_sglangs_plugin_loader():
    """Where dualscale is installed (CI), the other tests load it through SGLang's own discovery."""
    import dualscale

    source = Path(__file__).resolve().parents[2] / "src"
    if Path(dualscale.__file__).resolve().is_relative_to(source):
        pytest.skip("dualscale imported from the source tree, not installed: SGLang cannot discover it")
    assert entry_point_installed()


def test_hooks_wrap_the_real_scheduler_methods(engine, monkeypatch, tmp_path):
    configure(monkeypatch, f"ipc://{tmp_path}/r", "p")
    real_init, real_run_batch = Scheduler.__init__, Scheduler.run_batch
    registered = engine.load(run_batch=real_run_batch, init=real_init)  # restored after the test
    assert set(registered) == TARGETS
    assert registered[f"{plugin.SCHEDULER}.run_batch"] == [plugin._around_run_batch]
    assert Scheduler.run_batch is not real_run_batch and Scheduler.run_batch.__wrapped__ is real_run_batch
    assert Scheduler.__init__.__wrapped__ is real_init
    assert TARGETS <= HookRegistry._patched


def test_inert_unless_configured(engine, caplog):
    with caplog.at_level(logging.INFO, logger="dualscale.integrations.sglang"):
        assert engine.load() == {}
    engine.publish(disaggregation_mode="prefill")
    s = Scheduler(None, None)
    assert not hasattr(s, "_dualscale")
    assert not [r for r in caplog.records if r.name.startswith("dualscale")]


def test_unsupported_release_registers_nothing_and_says_the_range(engine, monkeypatch, tmp_path, caplog):
    configure(monkeypatch, f"ipc://{tmp_path}/r", "p")
    monkeypatch.setattr(sglang, "__version__", "0.5.24")
    with caplog.at_level(logging.ERROR):
        assert engine.load() == {}
    errors = [r.getMessage() for r in caplog.records if r.name == "dualscale.integrations.sglang"]
    assert len(errors) == 1 and "sglang>=0.5.23,<0.5.24" in errors[0] and "0.5.24 is installed" in errors[0]


def test_bad_settings_register_nothing(engine, monkeypatch, caplog):
    monkeypatch.setenv("DUALSCALE_CONTROLLER", "tcp://h:1")
    with caplog.at_level(logging.ERROR, logger="dualscale.integrations.sglang"):
        assert engine.load() == {}
    assert "DUALSCALE_INSTANCE" in caplog.text


def test_prefill_reports_match_the_requests(engine, monkeypatch, pull):
    configure(monkeypatch, pull.address, "prefill-0")

    def state(sched, batch):  # what the report should say: the extend batch's requests, then the queue
        q = [r for r in batch.reqs if batch.forward_mode.is_extend()] + list(sched.waiting_queue)
        q.sort(key=lambda r: r.time_stats.wait_queue_entry_time)
        return ([r.time_stats.wait_queue_entry_time for r in q], [len(r.origin_input_ids) for r in q],
                [r.prefix_len for r in q], sched.pool_stats_observer.get_pool_stats().get_kv_token_stats()[1])

    engine.on_run = state
    assert set(engine.load()) == TARGETS
    engine.publish(disaggregation_mode="prefill")
    s = Scheduler(None, None)
    ds = s._dualscale
    assert (ds.instance, ds.phase) == ("prefill-0", "prefill")
    connect(s)
    engine.seen.clear()
    tc = s.tree_cache
    r0 = new_req("r0", range(1000, 2200))  # 1,200 tokens, nothing cached
    r1 = new_req("r1", range(300))  # 300 tokens, the first 64 cached
    r2 = new_req("r2", range(5000, 5700))
    s.waiting_queue += [r0, r1, r2]

    def run(reqs, mode=ForwardMode.EXTEND):
        s.run_batch(ScheduleBatch(reqs=reqs, forward_mode=mode))
        return ds.agent.seq

    # iteration 1: r0's first 512-token chunk (a chunked prefill, as the scheduler plans it)
    s.waiting_queue.remove(r0)
    r0.init_next_round_input(tc)
    r0.extend_end, r0.skip_radix_cache_insert, s.chunked_req = 512, True, r0
    s.kv_in_use = 512
    first = run([r0])
    # iteration 2: the scheduler checkpoints the chunk (prefix_len = 512), then the next chunk
    checkpoint_kv_cache(r0, tc)
    r0.extend_end, s.kv_in_use = 1024, 1024
    mid = run([r0])
    # iteration 3: r0's last chunk and r1, whose first 64 tokens the radix cache already holds
    checkpoint_kv_cache(r0, tc)
    s.waiting_queue.remove(r1)
    r1.init_next_round_input(tc)
    r0.extend_end, r1.extend_end, s.chunked_req, s.kv_in_use = 1200, 300, None, 1200 + 300 - CACHED
    last = run([r0, r1])
    # iteration 4: a decode batch: only the waiting queue is left to prefill
    r0.output_ids.append(7)
    r1.output_ids.append(7)
    decode = run([r0, r1], ForwardMode.DECODE)

    got = received(pull, ds.agent)
    assert set(engine.seen) == {first, mid, last, decode} <= set(got)
    for seq, (arrival, prompt, prefilled, kv) in engine.seen.items():
        r = got[seq]
        assert (f64(r.arrival_s), i64(r.prompt_tokens), i64(r.prefilled_tokens)) == (arrival, prompt, prefilled)
        assert r.kv_util == pytest.approx(kv, rel=1e-12) and r.now_s >= max(arrival)
    assert i64(got[first].prompt_tokens) == [1200, 300, 700] and i64(got[first].prefilled_tokens) == [0, 0, 0]
    assert i64(got[mid].prefilled_tokens) == [512, 0, 0]  # the chunk done before this iteration
    assert i64(got[last].prefilled_tokens) == [1024, CACHED, 0]  # earlier chunks; a cached prefix
    assert i64(got[decode].prompt_tokens) == [700] and i64(got[decode].prefilled_tokens) == [0]
    # KV use as SGLang counts it: 1 - (free + evictable) / capacity, the radix cache's 64 evictable
    assert got[first].kv_util == pytest.approx(1 - (MAX_TOKENS - CACHED - 512 + CACHED) / MAX_TOKENS)
    assert got[mid].iteration_s > 0
    ds.agent.close()


def test_decode_reports_match_the_requests(engine, monkeypatch, pull):
    configure(monkeypatch, pull.address, "decode-0")

    def state(sched, batch):
        running = [r for r in sched.running_batch.reqs if r.output_ids]
        return ([r.rid for r in running], [len(r.output_ids) for r in running],
                [len(r.origin_input_ids) + len(r.output_ids) for r in running])

    engine.on_run = state
    engine.load()
    engine.publish(disaggregation_mode="decode")
    s = Scheduler(None, None)
    ds = s._dualscale
    assert ds.phase == "decode"
    connect(s)
    engine.seen.clear()
    reqs = [new_req(f"r{i}", range(100 * i, 100 * i + 50 + 10 * i)) for i in range(5)]
    steps = []
    for step in range(8):
        if step < len(reqs):  # one request joins per step; the newest has no output token yet
            s.running_batch.reqs.append(reqs[step])
        for r in s.running_batch.reqs[:-1] if step < len(reqs) else s.running_batch.reqs:
            r.output_ids.append(7)
        s.running_batch.reqs = [r for r in s.running_batch.reqs if len(r.output_ids) < 6]
        s.run_batch(ScheduleBatch(reqs=list(s.running_batch.reqs), forward_mode=ForwardMode.DECODE))
        steps.append(ds.agent.seq)
    got = received(pull, ds.agent)
    assert set(steps) <= set(got)
    first_seen: dict[str, float] = {}
    sizes = []
    for seq in steps:
        rids, out, ctx = engine.seen[seq]
        r = got[seq]
        assert (i64(r.tokens_out), i64(r.context_tokens)) == (out, ctx)
        for rid, t in zip(rids, f64(r.first_token_s), strict=True):
            assert t == first_seen.setdefault(rid, r.now_s)  # the report that first saw its output token
        sizes.append(len(out))
    assert sizes[0] == 0 and max(sizes) == 5 and set(first_seen) == {f"r{i}" for i in range(5)}
    ds.agent.close()


@pytest.mark.parametrize(("server_args", "world_rank", "dp_rank", "name"), [
    ({"tp_size": 4}, 0, None, "x"),
    ({"tp_size": 4}, 1, None, None),  # TP rank 1: its instance reports from TP rank 0
    ({"tp_size": 2, "pp_size": 2}, 2, None, None),  # PP rank 1
    ({"tp_size": 2, "dp_size": 2}, 0, 1, "x-dp1"),  # DP replica 1
    ({"tp_size": 4, "dp_size": 2, "enable_dp_attention": True}, 2, 1, "x-dp1"),  # attention-DP group 1
    ({"tp_size": 4, "dp_size": 2, "enable_dp_attention": True}, 3, 1, None),  # its attention-TP rank 1
])
def test_one_report_per_instance_and_dp_rank(engine, monkeypatch, tmp_path, server_args, world_rank, dp_rank, name):
    configure(monkeypatch, f"ipc://{tmp_path}/r", "x")
    engine.load()
    engine.publish(world_rank=world_rank, dp_rank=dp_rank, disaggregation_mode="decode", **server_args)
    s = Scheduler(None, None)
    if name is None:
        assert s._dualscale is None
        s.run_batch(ScheduleBatch(reqs=[], forward_mode=ForwardMode.IDLE))
        assert len(engine.batches) == 1  # the engine goes on
        return
    assert (s._dualscale.instance, s._dualscale.phase) == (name, "decode")
    s._dualscale.agent.close()


def test_null_mode_needs_a_phase(engine, monkeypatch, tmp_path, caplog):
    configure(monkeypatch, f"ipc://{tmp_path}/r", "x")
    engine.load()
    engine.publish(disaggregation_mode="null")
    with caplog.at_level(logging.ERROR, logger="dualscale.integrations.sglang"):
        assert Scheduler(None, None)._dualscale is None
    assert "DUALSCALE_PHASE" in caplog.text and "--disaggregation-mode null" in caplog.text
    monkeypatch.setenv("DUALSCALE_PHASE", "prefill")
    s = Scheduler(None, None)
    assert s._dualscale.phase == "prefill"
    s._dualscale.agent.close()


def test_a_failure_stops_reporting_only(engine, monkeypatch, tmp_path, caplog):
    configure(monkeypatch, f"ipc://{tmp_path}/r", "d")
    engine.load()
    engine.publish(disaggregation_mode="decode")
    s = Scheduler(None, None)
    r = new_req("r", range(10))
    r.output_ids.append(7)
    s.running_batch.reqs.append(r)
    s.pool_stats_observer = None  # only the report reads it
    with caplog.at_level(logging.ERROR, logger="dualscale.integrations.sglang"):
        results = [s.run_batch(ScheduleBatch(reqs=[r], forward_mode=ForwardMode.DECODE)) for _ in range(3)]
    assert results == ["result"] * 3 and len(engine.batches) == 3  # SGLang's run_batch ran every time
    assert s._dualscale is None
    assert len([x for x in caplog.records if "reporting stopped" in x.getMessage()]) == 1


def test_declared_as_sglang_plugin_entry_point():
    import tomllib

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("no pyproject.toml beside the tests (installed package)")
    eps = tomllib.loads(pyproject.read_text())["project"]["entry-points"][sgl_plugins.GENERAL_PLUGINS_GROUP]
    module, func = eps["dualscale"].split(":")
    assert module == plugin.__name__ and callable(getattr(plugin, func))
