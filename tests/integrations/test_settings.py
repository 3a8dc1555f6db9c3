"""Engine-hook settings and the version check: no engine needed."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

import dualscale
from dualscale.control.prefill import MAX_HORIZON
from dualscale.errors import ConfigError
from dualscale.integrations.settings import (
    ENV,
    QUEUE_BATCHES,
    SUPPORTED,
    HookSettings,
    check_version,
    load_settings,
    parse_version,
    resolve_phase,
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ENV.values():
        monkeypatch.delenv(var, raising=False)


def test_nothing_configured_means_inert():
    s = load_settings(None, "cfg")
    assert s == HookSettings() and not s.enabled


def test_environment_fills_what_the_engine_config_leaves_unset(monkeypatch):
    monkeypatch.setenv("DUALSCALE_CONTROLLER", "tcp://10.0.0.1:5600")
    monkeypatch.setenv("DUALSCALE_INSTANCE", "from-env")
    monkeypatch.setenv("DUALSCALE_PHASE", "decode")
    assert load_settings(None, "cfg") == HookSettings(controller="tcp://10.0.0.1:5600", instance="from-env",
                                                      phase="decode")
    s = load_settings({"instance": "from-cfg", "phase": "prefill"}, "cfg")
    assert (s.controller, s.instance, s.phase) == ("tcp://10.0.0.1:5600", "from-cfg", "prefill")


@pytest.mark.parametrize(("raw", "env", "words"), [
    ({"phase": "both"}, {}, ["cfg", "phase", "'both'"]),
    ({"controler": "x"}, {}, ["cfg", "controler"]),
    ({}, {"DUALSCALE_PHASE": "middle"}, ["DUALSCALE_PHASE", "phase", "'middle'"]),
    ({"controller": "tcp://h:1"}, {}, ["instance", "DUALSCALE_INSTANCE"]),
    ({}, {"DUALSCALE_INSTANCE": "p0"}, ["controller", "DUALSCALE_CONTROLLER"]),
])
def test_bad_settings_name_field_value_and_source(monkeypatch, raw, env, words):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as e:
        load_settings(raw, "cfg")
    for w in words:
        assert w in str(e.value)


def test_phase_override_then_engine_role():
    assert resolve_phase("decode", "prefill", "kv_producer") == "decode"
    assert resolve_phase("auto", "prefill", "kv_producer") == "prefill"
    with pytest.raises(ConfigError, match="kv_both.*DUALSCALE_PHASE"):
        resolve_phase("auto", None, "kv_both")


def test_version_check_names_the_supported_range():
    lo, hi = SUPPORTED["vllm"]
    check_version("vllm", lo)
    check_version("vllm", lo + ".9rc1+cu130")
    for bad in (hi, hi + ".1", "0.1.0", "99.0"):
        with pytest.raises(ConfigError) as e:
            check_version("vllm", bad)
        assert f"vllm>={lo},<{hi}" in str(e.value) and bad in str(e.value) and "dualscale[vllm]" in str(e.value)
    assert parse_version("0.33.1.dev4+gabc") == (0, 33, 1)
    with pytest.raises(ConfigError):
        parse_version("dev")


def test_pyproject_extra_pins_the_checked_range():
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("no pyproject.toml beside the tests (installed package)")
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    for engine, (lo, hi) in SUPPORTED.items():
        assert extras[engine] == [f"{engine}>={lo},<{hi}"]


def test_without_vllm_the_module_says_what_to_install():
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    with pytest.raises(ImportError, match=r"pip install 'dualscale\[vllm\]'"):
        import dualscale.integrations.vllm  # noqa: F401


def cut_queue(prompt: np.ndarray, prefilled: np.ndarray, cap_tokens: int) -> int:
    """How many requests an engine hook lists: up to (and with) the one whose prompt tokens left reach
    ``cap_tokens`` in all (the rule of dualscale.integrations.vllm's prefill report)."""
    left = cap_tokens - np.cumsum(prompt - prefilled)
    return int(np.searchsorted(-left, 0) + 1) if left[-1] <= 0 else prompt.size


def test_queue_batches_default_is_the_largest_prefill_horizon():
    assert QUEUE_BATCHES == MAX_HORIZON


@pytest.mark.parametrize(("horizon", "solver"), [(1, "qp"), (4, "qp"), (8, "exact"), (8, "greedy"), (24, "qp")])
def test_a_queue_listed_up_to_horizon_batches_of_tokens_gets_the_same_decision(profile, horizon, solver):
    """Why a prefill report may stop listing the queue: a controller whose horizon is at most
    queue_batches decides the same on the listed prefix as on the whole queue, step after step."""
    budget = 512
    rng = np.random.default_rng(horizon)
    # seven clocks across the range (the paper's count): the property does not depend on the grid,
    # and CI also runs this with the kernels as plain Python, where 110 clocks x 24 batches is slow
    clocks = [int(c) for c in profile.clocks_mhz[[0, 18, 36, 54, 72, 90, 109]]]
    full, cut = (dualscale.PrefillController(profile, tp=2, ttft_slo_s=0.6, horizon=horizon, solver=solver,
                                             max_batch_tokens=budget, clocks_mhz=clocks) for _ in range(2))
    cuts = 0
    for step in range(30):
        n = int(rng.integers(1, 120))
        now = 100.0 + step * 0.05
        arrival = np.sort(now - rng.uniform(0.0, 0.5, n))
        prompt = rng.integers(1, 3000, n)
        prefilled = np.zeros(n, np.int64)
        prefilled[0] = rng.integers(0, prompt[0])
        m = cut_queue(prompt, prefilled, horizon * budget)
        cuts += m < n
        kv = float(rng.uniform(0.0, 1.0))
        a = full.decide(now, arrival, prompt, prefilled, kv)
        b = cut.decide(now, arrival[:m], prompt[:m], prefilled[:m], kv)
        assert a == b, (step, n, m)
        t = a.batch_time_s * float(rng.uniform(0.9, 1.1))  # the same feedback to both
        full.observe(t, a.freq_mhz)
        cut.observe(t, b.freq_mhz)
    assert cuts > 10


def test_queue_batches_is_a_count_of_batches():
    assert load_settings({"controller": "tcp://h:1", "instance": "p0", "queue_batches": 0}, "cfg").queue_batches == 0
    with pytest.raises(ConfigError, match="queue_batches.*-1"):
        load_settings({"controller": "tcp://h:1", "instance": "p0", "queue_batches": -1}, "cfg")
