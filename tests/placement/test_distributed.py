"""Goodput tables and evaluations on a real distributed engine: a dask.distributed LocalCluster of
worker processes (loopback only) gives the same results as this process alone."""

from __future__ import annotations

import pytest

from dualscale.placement import GoodputSettings, goodput_table
from dualscale.placement.evaluate import EvalSettings, evaluate
from dualscale.sim.scenario import load_scenario
from dualscale.sim.traces import gamma_trace, load_trace

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  scheduler_port=0, dashboard_address=None, silence_logs=40) as cluster, \
            distributed.Client(cluster) as c:
        yield c


def test_goodput_table_on_dask_matches_the_local_run(client, tmp_path):
    scenario = load_scenario("paper")
    tr = gamma_trace(10.0, 1.41, 30.0, load_trace("azure-conv"), seed=3)
    settings = GoodputSettings(tp_degrees=[2, 4], clocks_mhz=[1065, 1980], tolerance_per_s=0.5)
    local = goodput_table(scenario, tr, settings, workers=1, cache_dir=tmp_path / "local")
    remote = goodput_table(scenario, tr, settings, executor=client.get_executor(), cache_dir=tmp_path / "dask")
    assert remote.entries == local.entries
    # the workers are other processes: the probes did not run here
    assert len(client.scheduler_info()["workers"]) == 2


SMALL = EvalSettings(
    window_s=30.0, table_window_s=30.0,
    goodput=GoodputSettings(tp_degrees=[4], clocks_mhz=[1065, 1980], tolerance_per_s=0.5),
    gamma_loads=[0.5], gamma_duration_s=60.0, trace_loads=[0.67], trace_duration_s=60.0)


def test_small_evaluation_on_dask_matches_the_local_run(client, tmp_path):
    scenario = load_scenario("paper")
    local, table, plan = evaluate(scenario, SMALL, workers=1, cache_dir=tmp_path / "local")
    remote, table2, plan2 = evaluate(scenario, SMALL, executor=client.get_executor(), cache_dir=tmp_path / "dask")
    assert table2.entries == table.entries and plan2 == plan
    assert remote == local
    assert {r.policy for r in local} == {"distserve", "placeonly", "dualscale"} and len(local) == 6
