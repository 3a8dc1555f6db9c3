"""Scenario files and the policy factory: built-ins load, bad input is named."""

from __future__ import annotations

import numpy as np
import pytest

from dualscale.errors import ConfigError
from dualscale.sim.policies import POLICIES, make_policy
from dualscale.sim.scenario import builtin_scenarios, load_scenario

DEFAULT = load_scenario("default")


def test_default_scenario_is_the_papers_setup():
    assert "default" in builtin_scenarios()
    s = DEFAULT
    assert (s.prefill.tp, s.prefill.instances, s.decode.tp, s.decode.instances) == (2, 4, 4, 2)
    assert (s.slo.ttft_s, s.slo.tpot_s, s.cluster.gpus, s.trace.name) == (0.6, 0.1, 16, "azure-conv")


@pytest.mark.parametrize(
    "edit, expect",
    [
        (("instances = 4", "instances = 9"), "use 26 GPUs, more than cluster.gpus = 16"),
        (("[prefill]\ntp = 2", "[prefill]\ntp = 2\nweights = [1.0]"), "needs one weight per instance (4)"),
        (('name = "azure-conv"', 'name = "gamma"'), "trace.rate_per_s"),
        (("ttft_s = 0.6", "ttft_s = -1"), "slo.ttft_s"),
        (('prefill_solver = "qp"', 'prefill_solver = "milp"'), "control.prefill_solver"),
        (("gpus = 16", "gpus = 16\nracks = 2"), "unknown field"),
    ],
)
def test_bad_scenario_is_named(tmp_path, edit, expect):
    from dualscale.config import builtin_config_dir

    text = (builtin_config_dir() / "scenarios" / "default.toml").read_text()
    assert edit[0] in text
    p = tmp_path / "bad.toml"
    p.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(ConfigError, match="bad.toml") as e:
        load_scenario(p)
    assert expect in str(e.value)


def test_unknown_scenario_lists_the_built_ins():
    with pytest.raises(ConfigError, match="built-in scenarios: default"):
        load_scenario("nope")


@pytest.mark.parametrize(
    "spec, expect",
    [("fastest", "must be one of"), ("static:abc", "static:<MHz>"), ("static:1000", "not a supported clock"),
     ("oracle", "deferred")],
)
def test_bad_policy_is_named(profile, spec, expect):
    with pytest.raises(ValueError, match=expect):
        make_policy(spec, profile, DEFAULT)


@pytest.mark.parametrize("spec", [p for p in POLICIES if "<" not in p] + ["static:1380"])
def test_every_policy_returns_supported_clocks(profile, spec):
    pol = make_policy(spec, profile, DEFAULT)
    pre, dec = pol.prefill(2), pol.decode(4)
    supported = set(profile.clocks_mhz.tolist())
    assert pre.idle_mhz in supported and dec.idle_mhz in supported
    f = pre.clock(10.0, np.array([9.5, 9.9]), np.array([3000, 500]), np.array([0, 0]), 0.0)
    g = dec.clock(10.0, np.array([9.0, 9.8]), np.array([10, 3]), np.array([1200, 800]), 0.0)
    pre.observe(0.2, f, 400.0)
    dec.observe(0.02, g, 400.0)
    assert f in supported and g in supported
    # at the KV guard every adaptive policy runs at its top clock
    if spec in ("dualscale", "lowest-feasible", "rules"):
        assert pre.clock(10.0, np.array([9.9]), np.array([100]), np.array([0]), 0.95) == 1980
        assert dec.clock(10.0, np.array([9.9]), np.array([2]), np.array([100]), 0.95) == 1980


def test_lowest_feasible_is_the_lowest_clock_meeting_the_next_batch(profile):
    pre = make_policy("lowest-feasible", profile, DEFAULT).prefill(2)
    now, arrival = 10.0, np.array([9.8])
    f = pre.clock(now, arrival, np.array([1500]), np.array([0]), 0.0)
    budget = 9.8 + 0.95 * 0.6 - now
    t = profile.prefill_time_s(2, [1500], profile.clocks_mhz.astype(float))
    # from idle: the first 20 ms (the switch delay) run at the idle clock, the lowest
    d = DEFAULT.control.switch_delay_s
    t = d + (1 - d / t[0]) * t
    want = profile.clocks_mhz[np.flatnonzero(t <= budget + 1e-9)[0]]
    assert f == want and f > profile.clocks_mhz[0]
