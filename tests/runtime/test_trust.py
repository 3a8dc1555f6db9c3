"""Files the root actuator reads, and the key files of `dualscale keys` (no root needed: files of the
current user are trusted, group/other-writable ones and symlinks are not; as root, a file of another
uid is refused too)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import tomli_w

from dualscale.cli import main
from dualscale.device.sim import SimNodeState
from dualscale.errors import ConfigError
from dualscale.runtime.config import load_policy, load_trusted_runtime_config
from dualscale.runtime.keys import Security, load_public, load_secret, write_keypair
from dualscale.runtime.trust import read_trusted


@pytest.fixture
def home(tmp_path):
    d = tmp_path / "etc"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    return d


def test_a_file_of_this_user_closed_to_others_is_read(home):
    f = home / "a.toml"
    f.write_text("x = 1\n")
    f.chmod(0o644)
    assert read_trusted(f, "config") == b"x = 1\n"


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_a_group_or_other_writable_file_is_refused_naming_it(home, mode):
    f = home / "a.toml"
    f.write_text("x = 1\n")
    f.chmod(mode)
    with pytest.raises(ConfigError, match=f"config {f}: mode 0{mode:o} lets group or others write it"):
        read_trusted(f, "config")


def test_a_symlink_is_refused_even_to_a_good_file(home):
    good = home / "good.toml"
    good.write_text("x = 1\n")
    good.chmod(0o644)
    link = home / "link.toml"
    link.symlink_to(good)
    with pytest.raises(ConfigError, match="symbolic link"):
        read_trusted(link, "config")


def test_a_writable_directory_on_the_path_is_refused(home):
    sub = home / "open"
    sub.mkdir()
    sub.chmod(0o777)
    f = sub / "a.toml"
    f.write_text("x = 1\n")
    f.chmod(0o644)
    with pytest.raises(ConfigError, match=f"directory {sub} is writable by group or others"):
        read_trusted(f, "config")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_as_root_a_file_of_another_user_is_refused(home):
    f = home / "a.toml"
    f.write_text("x = 1\n")
    f.chmod(0o644)
    os.chown(f, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        read_trusted(f, "config")


def test_a_fifo_is_refused_without_blocking(home):
    f = home / "fifo"
    os.mkfifo(f, 0o600)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_trusted(f, "config")


def test_keys_command_writes_every_role_with_safe_modes(tmp_path, capsys):
    out = tmp_path / "keys"
    assert main(["keys", "--config", "example", "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    for role in ("controller", "actuator-node0", "engine-prefill-0", "engine-prefill-1", "engine-decode-0"):
        assert {f"{role}.key", f"{role}.key_secret"} <= names
        assert stat.S_IMODE((out / f"{role}.key_secret").stat().st_mode) == 0o600
        assert stat.S_IMODE((out / f"{role}.key").stat().st_mode) == 0o644
        pub, sec = load_secret(out, role)
        assert load_public(out, role) == pub and len(sec) == 40
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert not [n for n in names if n.endswith(".tmp")]  # nothing half-written left behind
    assert main(["keys", "--out", str(out), "--name", "controller"]) == 1  # never overwritten silently
    assert "--force" in capsys.readouterr().err


def test_keys_are_never_written_through_a_planted_symlink(tmp_path):
    out = tmp_path / "keys"
    out.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (out / "engine-x.key_secret").symlink_to(victim)
    write_keypair(out, "engine-x", force=True)
    assert victim.read_text() == "precious\n"
    assert not (out / "engine-x.key_secret").is_symlink()


def test_a_readable_secret_key_is_refused(tmp_path):
    out = tmp_path / "keys"
    write_keypair(out, "controller")
    (out / "controller.key_secret").chmod(0o640)
    with pytest.raises(ConfigError, match="group or others read or write it"):
        Security("curve", out, "controller")


def test_a_key_directory_open_to_others_is_refused(tmp_path):
    out = tmp_path / "keys"
    out.mkdir()
    out.chmod(0o777)
    with pytest.raises(ConfigError, match="not writable by group or others"):
        write_keypair(out, "controller")


def test_the_actuator_config_and_policy_are_checked(home):
    cfg = home / "runtime.toml"
    cfg.write_bytes(tomli_w.dumps({"instances": [{"name": "d0", "phase": "decode", "tp": 1, "gpus": [0]}]}).encode())
    cfg.chmod(0o644)
    assert load_trusted_runtime_config(cfg).instances[0].name == "d0"
    assert load_trusted_runtime_config("example").instances  # a built-in config, checked the same way
    cfg.chmod(0o666)
    with pytest.raises(ConfigError, match="runtime config"):
        load_trusted_runtime_config(cfg)
    pol = home / "policy.toml"
    pol.write_bytes(tomli_w.dumps({"instances": [{"name": "d0", "gpus": [0, 1], "min_mhz": 900,
                                                  "max_mhz": 1500}]}).encode())
    pol.chmod(0o600)
    assert load_policy(pol).instances[0].max_mhz == 1500
    pol.write_bytes(tomli_w.dumps({"instances": [{"name": "a", "gpus": [0]}, {"name": "b", "gpus": [0]}]}).encode())
    with pytest.raises(ConfigError, match="GPU 0 is already used by instance 'a'"):
        load_policy(pol)


def test_an_nvml_library_from_config_is_checked_before_it_is_loaded(home, tmp_path, capsys):
    """The root-code-execution finding: a library anyone could write is never loaded."""
    lib = home / "libevil.so"
    lib.write_bytes(b"\x7fELF not really")
    lib.chmod(0o666)
    cfg = home / "rt.toml"
    cfg.write_bytes(tomli_w.dumps({"instances": [{"name": "d0", "phase": "decode", "tp": 1, "gpus": [0]}],
                                   "actuator": {"nvml_library": str(lib), "backend": "nvml",
                                                "lock_file": str(home / "actuator.lock")}}).encode())
    cfg.chmod(0o644)
    assert main(["actuator", "--config", str(cfg)]) == 2
    assert f"NVML library {lib}: mode 0666 lets group or others write it" in capsys.readouterr().err


def test_the_sim_state_file_is_private_and_never_a_symlink(tmp_path):
    s = SimNodeState(2, 1980, tmp_path / "node.state")
    s.close()
    assert stat.S_IMODE((tmp_path / "node.state").stat().st_mode) == 0o600
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    Path(tmp_path / "planted.state").symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link"):
        SimNodeState(2, 1980, tmp_path / "planted.state")
    assert target.read_bytes() == b""
