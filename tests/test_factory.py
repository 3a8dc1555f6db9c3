"""One way into the fine tier: every ``[control]`` field reaches the controllers the same way
through ``dualscale serve`` (the daemon, from a TOML file) and the simulator, and the privileged
actuator reads its settings without loading the controllers' heavy dependencies."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest
import tomli_w

from dualscale.config import Control
from dualscale.runtime.config import load_runtime_config
from dualscale.runtime.daemon import ControllerDaemon
from dualscale.sim.policies import make_policy
from dualscale.sim.scenario import load_scenario

#: A non-default value of every field, and what it must become in the (prefill, decode) controllers.
FIELDS = {
    "horizon": (5, lambda p, d: p.horizon == 5),
    "margin": (0.2, lambda p, d: p.margin == 0.2 and d.margin == 0.2),
    "kv_guard": (0.5, lambda p, d: p.kv_guard == 0.5 and d.kv_guard == 0.5),
    "prefill_solver": ("greedy", lambda p, d: p.solver == "greedy"),
    "decode_slack": ("tbt", lambda p, d: d.slack == "tbt"),
    "decode_objective": ("energy", lambda p, d: d.objective == "energy"),
    "online_correction": (False, lambda p, d: not p.online_correction and not d.online_correction),
    "switch_delay_s": (0.05, lambda p, d: p.switch_delay_s == 0.05),
}


def test_every_control_field_is_checked():
    assert set(FIELDS) == {f.name for f in msgspec.structs.fields(Control)}
    for name, (value, _) in FIELDS.items():
        assert getattr(Control(), name) != value, f"{name}: the test value must differ from the default"


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_serve_honours_the_control_field(field, tmp_path, profile):
    value, check = FIELDS[field]
    raw = {"instances": [{"name": "p0", "phase": "prefill", "tp": 2, "gpus": [0, 1]},
                         {"name": "d0", "phase": "decode", "tp": 4, "gpus": [2, 3, 4, 5]}],
           "control": {field: value}}
    path = tmp_path / "runtime.toml"
    path.write_bytes(tomli_w.dumps(raw).encode())
    daemon = ControllerDaemon(load_runtime_config(path), profile=profile)
    assert check(daemon.slots["p0"].ctl, daemon.slots["d0"].ctl)


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_the_simulator_honours_the_control_field(field, profile):
    value, check = FIELDS[field]
    base = load_scenario("default")
    scenario = msgspec.structs.replace(base, control=msgspec.structs.replace(base.control, **{field: value}))
    policy = make_policy("dualscale", profile, scenario)
    assert check(policy.prefill(2).ctl, policy.decode(4).ctl)


def test_the_actuator_reads_its_config_without_numba_osqp_or_scipy():
    code = ("import sys\n"
            "import dualscale.runtime.actuator, dualscale.runtime.config\n"
            "from dualscale.runtime.config import load_runtime_config\n"
            "load_runtime_config('example')\n"
            "print(','.join(m for m in ('numba', 'osqp', 'scipy', 'dualscale.sim', 'dualscale.control')"
            " if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ""
