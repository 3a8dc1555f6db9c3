from __future__ import annotations

import numpy as np
import pytest
import zmq

from dualscale.runtime.messages import MsgType
from dualscale.runtime.serial import FrameDecoder
from dualscale.runtime.worker import WorkerAgent


def test_no_controller_means_counted_drops_never_errors(tmp_path):
    with WorkerAgent(f"ipc://{tmp_path}/nobody", "d0", "decode") as agent:
        for i in range(100):
            assert agent.report_decode(10.0 + i, [9.0], [3], [300]) is False
        assert (agent.sent, agent.dropped, agent.errors) == (0, 100, 0)


@pytest.mark.parametrize("bad", [
    dict(now_s="soon"),
    dict(first_token_s=object()),
    dict(tokens_out=[[1, 2], [3]]),
    dict(freq_mhz=None),
])
def test_bad_input_never_raises_into_the_engine(tmp_path, bad):
    args = dict(now_s=10.0, first_token_s=[9.0], tokens_out=[3], context_tokens=[300]) | bad
    with WorkerAgent(f"ipc://{tmp_path}/nobody", "d0", "decode") as agent:
        assert agent.report_decode(**args) is False
        assert agent.errors == 1


def test_reports_after_close_are_dropped(tmp_path):
    agent = WorkerAgent(f"ipc://{tmp_path}/nobody", "p0", "prefill")
    agent.close()
    agent.close()  # idempotent
    assert agent.report_prefill(1.0, [0.5], [100], [0]) is False and agent.dropped == 1


def test_reports_reach_a_controller_in_order(tmp_path):
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"ipc://{tmp_path}/r")
    agent = WorkerAgent(f"ipc://{tmp_path}/r", "p0", "prefill")
    dec = FrameDecoder((MsgType.PREFILL_REPORT,))
    try:
        got = []
        for i in range(1, 400):  # until the connection is up and three reports have passed
            agent.report_prefill(10.0 + i, [9.0, 9.5], [3000, 800], [2048, 0], kv_util=0.3, iteration_s=0.1,
                                 freq_mhz=1380)
            if pull.poll(10):
                while pull.poll(0):
                    got.append(dec.decode(pull.recv())[1])
            if len(got) >= 3:
                break
        assert len(got) >= 3
        r = got[-1]
        assert r.instance == "p0" and r.epoch == agent.epoch and r.freq_mhz == 1380 and r.kv_util == 0.3
        assert np.frombuffer(r.arrival_s, "<f8").tolist() == [9.0, 9.5]
        assert np.frombuffer(r.prompt_tokens, "<i8").tolist() == [3000, 800]
        assert np.frombuffer(r.prefilled_tokens, "<i8").tolist() == [2048, 0]
        seqs = [x.seq for x in got]
        assert seqs == sorted(seqs)
        assert agent.sent >= len(got)
    finally:
        agent.close()
        pull.close(0)
        ctx.term()


def test_bad_construction_is_rejected_up_front(tmp_path):
    with pytest.raises(ValueError, match="phase"):
        WorkerAgent(f"ipc://{tmp_path}/x", "p0", "both")
    with pytest.raises(ValueError, match="instance"):
        WorkerAgent(f"ipc://{tmp_path}/x", "", "decode")


def test_bad_or_busy_addresses_are_config_errors(tmp_path):
    from dualscale.errors import ConfigError
    from dualscale.runtime.transport import make_socket

    ctx = zmq.Context()
    try:
        with pytest.raises(ConfigError, match="cannot connect"):
            make_socket(ctx, zmq.PUSH, "nonsense://x", bind=False)
        s = make_socket(ctx, zmq.PULL, f"ipc://{tmp_path}/busy", bind=True)
        t = make_socket(ctx, zmq.PULL, "tcp://127.0.0.1:0", bind=True)
        port = t.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1]
        with pytest.raises(ConfigError, match="another daemon"):
            make_socket(ctx, zmq.PULL, f"tcp://127.0.0.1:{port}", bind=True)
        with pytest.raises(ValueError, match="hwm"):
            make_socket(ctx, zmq.PULL, f"ipc://{tmp_path}/x", bind=True, hwm=0)
        s.close(0)
        t.close(0)
    finally:
        ctx.term()
