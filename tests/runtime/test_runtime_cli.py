from __future__ import annotations

import tomli_w

import dualscale.device
import dualscale.runtime
from dualscale.cli import main
from dualscale.device.nvml_sim import STATE_ENV, SimNvml, library_path


def test_actuator_without_privileges_fails_at_start_naming_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(STATE_ENV, raising=False)
    node = SimNvml(tmp_path / "node.state", gpus=4)
    node.set_error(0, on_set=4)  # NVML_ERROR_NO_PERMISSION, as for a non-root process
    cfg = tmp_path / "rt.toml"
    cfg.write_bytes(tomli_w.dumps({"instances": [{"name": "d0", "phase": "decode", "tp": 4, "gpus": [0, 1, 2, 3]}],
                                   "actuator": {"controller_address": f"ipc://{tmp_path}/a",
                                                "lock_file": str(tmp_path / "actuator.lock")}}).encode())
    rc = main(["actuator", "--config", str(cfg), "--backend", "nvml", "--nvml-library", str(library_path()),
               "--log-level", "error"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Insufficient Permissions" in err and "root" in err and "systemd unit" in err
    assert node.locked_mhz(1) == 0


def test_bad_runtime_config_is_one_clear_error(tmp_path, capsys):
    cfg = tmp_path / "rt.toml"
    cfg.write_bytes(tomli_w.dumps({"instances": [{"name": "d0", "phase": "decode", "tp": 4, "gpus": [0, 1]}]}).encode())
    assert main(["serve", "--config", str(cfg)]) == 2
    assert "needs one GPU per TP rank (4)" in capsys.readouterr().err
    assert main(["actuator", "--config", "no-such-config"]) == 2
    assert "built-in runtime configs: example" in capsys.readouterr().err


def test_subpackages_declare_a_sorted_all():
    for mod in (dualscale.runtime, dualscale.device):
        assert sorted(mod.__all__) == mod.__all__
        for name in mod.__all__:
            assert hasattr(mod, name)
