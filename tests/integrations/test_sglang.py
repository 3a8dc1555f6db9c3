"""The SGLang plugin on a stand-in (tests/integrations/sglang_standin.py), not on SGLang itself:
the hooks it registers, and the reports a PULL socket receives against the stand-in's state."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import sglang_standin as sg
from hook_helpers import wait_until

from dualscale.integrations import sglang as plugin


@pytest.fixture
def standin():
    mod = sg.install()
    yield mod
    sg.uninstall()


def configure(monkeypatch, address: str, instance: str, phase: str | None = None) -> None:
    monkeypatch.setenv("DUALSCALE_CONTROLLER", address)
    monkeypatch.setenv("DUALSCALE_INSTANCE", instance)
    if phase:
        monkeypatch.setenv("DUALSCALE_PHASE", phase)


def registered(standin):
    plugin.register()
    hooks = {t: [h for _, h in hs] for t, hs in sg.HookRegistry.hooks.items()}
    sg.HookRegistry.apply_hooks()
    return hooks


def test_inert_unless_configured(standin):
    assert registered(standin) == {}
    s = standin.Scheduler("prefill")
    assert not hasattr(s, "_dualscale")


def test_bad_settings_register_nothing(standin, monkeypatch, caplog):
    monkeypatch.setenv("DUALSCALE_CONTROLLER", "tcp://h:1")
    with caplog.at_level(logging.ERROR, logger="dualscale.integrations.sglang"):
        assert registered(standin) == {}
    assert "DUALSCALE_INSTANCE" in caplog.text


def received(pull, agent) -> dict:
    assert wait_until(lambda: agent.pending == 0)
    return {r.seq: r for _, r in pull.received()}


def drive(s, steps: int = 10_000) -> None:
    for _ in range(steps):
        if not s.event_loop_step():
            return


def f64(b):
    return np.frombuffer(b, "<f8").tolist()


def i64(b):
    return np.frombuffer(b, "<i8").tolist()


def test_prefill_reports_match_the_scheduler(standin, monkeypatch, pull):
    configure(monkeypatch, pull.address, "prefill-0")
    expected = {}
    original = sg.Scheduler.run_batch

    def spy(self, batch):  # the state the plugin reported from: just before the stand-in's run_batch
        if batch is not None:
            q = [r for r in batch.reqs if batch.forward_mode.is_extend()] + list(self.waiting_queue)
            q.sort(key=lambda r: r.time_stats.wait_queue_entry_time)
            expected[self._dualscale.agent.seq] = ([r.time_stats.wait_queue_entry_time for r in q],
                                                   [len(r.origin_input_ids) for r in q],
                                                   [len(r.prefix_indices) for r in q])
        return original(self, batch)

    monkeypatch.setattr(sg.Scheduler, "run_batch", spy)  # before the plugin's hook wraps it
    hooks = registered(standin)
    assert set(hooks) == {f"{plugin.SCHEDULER}.__init__", f"{plugin.SCHEDULER}.run_batch"}
    s = standin.Scheduler("prefill", chunk=512)
    ds = s._dualscale
    assert (ds.instance, ds.phase) == ("prefill-0", "prefill")
    assert wait_until(lambda: (s.run_batch(None), ds.agent.sent >= 1)[1])  # the relay is connected
    for i, n in enumerate((1200, 300, 700)):
        s.add(sg.Req(f"r{i}", [1] * n, 1))
    drive(s)
    got = received(pull, ds.agent)
    assert len(expected) >= 4 and set(expected) <= set(got)
    for seq, (arrival, prompt, prefilled) in expected.items():
        assert (f64(got[seq].arrival_s), i64(got[seq].prompt_tokens), i64(got[seq].prefilled_tokens)) == \
            (arrival, prompt, prefilled)
    first = got[min(expected)]
    assert i64(first.prompt_tokens) == [1200, 300, 700] and i64(first.prefilled_tokens) == [0, 0, 0]
    second = got[min(expected) + 1]
    assert i64(second.prefilled_tokens) == [512, 0, 0]  # the first 512-token chunk of r0 done
    s._dualscale.agent.close()


def test_decode_reports_match_the_scheduler(standin, monkeypatch, pull):
    configure(monkeypatch, pull.address, "decode-0")
    batches = {}
    original = sg.Scheduler.run_batch

    def spy(self, batch):
        if batch is not None:
            running = [r for r in self.running_batch.reqs if r.output_ids]
            batches[self._dualscale.agent.seq] = ([len(r.output_ids) for r in running],
                                                  [len(r.origin_input_ids) + len(r.output_ids) for r in running])
        return original(self, batch)

    monkeypatch.setattr(sg.Scheduler, "run_batch", spy)  # before the plugin's hook wraps it
    registered(standin)
    s = standin.Scheduler("decode", chunk=4096)
    ds = s._dualscale
    assert ds.phase == "decode"
    assert wait_until(lambda: (s.run_batch(None), ds.agent.sent >= 1)[1])
    for i in range(5):
        s.add(sg.Req(f"r{i}", [1] * (50 + 10 * i), 3 + 2 * i))
    drive(s)
    got = received(pull, ds.agent)
    assert set(batches) <= set(got)
    sizes = []
    for seq, (out, ctx) in batches.items():
        r = got[seq]
        assert (i64(r.tokens_out), i64(r.context_tokens)) == (out, ctx)
        assert all(t <= r.now_s for t in f64(r.first_token_s))
        sizes.append(len(out))
    assert max(sizes) == 5 and 0 < got[max(batches)].kv_util < 1
    s._dualscale.agent.close()


def test_only_the_first_gpu_reports_and_dp_ranks_are_named(standin, monkeypatch, tmp_path):
    configure(monkeypatch, f"ipc://{tmp_path}/r", "d", "decode")
    registered(standin)
    assert standin.Scheduler("null", tp_rank=1)._dualscale is None
    s = standin.Scheduler("null", dp_size=2, dp_rank=1)
    assert s._dualscale.instance == "d-dp1"
    s._dualscale.agent.close()


def test_null_mode_needs_a_phase_and_a_failure_stops_reporting_only(standin, monkeypatch, tmp_path, caplog):
    configure(monkeypatch, f"ipc://{tmp_path}/r", "x")
    registered(standin)
    with caplog.at_level(logging.ERROR, logger="dualscale.integrations.sglang"):
        assert standin.Scheduler("null")._dualscale is None
        assert "DUALSCALE_PHASE" in caplog.text
        s = standin.Scheduler("decode")
        s.tree_cache = None  # only the report reads it
        s.add(sg.Req("r", [1] * 10, 3))
        drive(s)  # the engine goes on
    assert s._dualscale is None and len(s.batches) == 3
    assert len([r for r in caplog.records if "reporting stopped" in r.getMessage()]) == 1


def test_declared_as_sglang_plugin_entry_point():
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("no pyproject.toml beside the tests (installed package)")
    eps = tomllib.loads(pyproject.read_text())["project"]["entry-points"]["sglang.srt.plugins"]
    module, func = eps["dualscale"].split(":")
    assert module == plugin.__name__ and callable(getattr(plugin, func))
