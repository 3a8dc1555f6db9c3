"""The shipped systemd units (configs/deploy/): they agree with the code, and systemd accepts them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from dualscale.runtime.actuator import EXIT_NODE_LOCKED
from dualscale.runtime.config import DEFAULT_LOCK_FILE

DEPLOY = Path(__file__).resolve().parents[2] / "configs" / "deploy"
UNITS = ("dualscale-actuator.service", "dualscale-controller.service", "dualscale-controller.socket")


def directives(unit: str) -> list[tuple[str, str]]:
    out = []
    for line in (DEPLOY / unit).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


def test_the_actuator_unit_keeps_the_node_lock_of_the_code():
    d = directives("dualscale-actuator.service")
    assert ("RuntimeDirectory", Path(DEFAULT_LOCK_FILE).parent.name) in d and ("RuntimeDirectoryPreserve", "yes") in d
    assert Path(DEFAULT_LOCK_FILE).parent.parent == Path("/run")  # RuntimeDirectory= is under /run
    # the reset after any stop runs only while no other actuator holds the node lock
    (stop,) = [v for k, v in d if k == "ExecStopPost"]
    assert stop.startswith(f"/usr/bin/flock --nonblock --conflict-exit-code 0 {DEFAULT_LOCK_FILE} ")
    assert ("RestartPreventExitStatus", str(EXIT_NODE_LOCKED)) in d


def test_the_controller_runs_unprivileged_on_the_ports_its_socket_unit_holds():
    svc, sock = directives("dualscale-controller.service"), directives("dualscale-controller.socket")
    assert ("Requires", "dualscale-controller.socket") in svc and ("User", "dualscale") in svc
    assert ("CapabilityBoundingSet", "") in svc and ("NoNewPrivileges", "yes") in svc
    assert ("Service", "dualscale-controller.service") in sock
    assert len([v for k, v in sock if k == "ListenStream"]) == 4  # reports, actuators, plan, metrics


@pytest.mark.skipif(shutil.which("systemd-analyze") is None or not Path("/usr/lib/systemd/system").is_dir(),
                    reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path):
    """Verified in a root of their own, where the programs they run exist (as on an installed host)."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    for exe in ("opt/dualscale/bin/python", "usr/bin/nvidia-smi", "usr/bin/flock"):
        (root / exe).parent.mkdir(parents=True, exist_ok=True)
        (root / exe).write_text("#!/bin/sh\n")
        (root / exe).chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(DEPLOY / unit, root / "etc/systemd/system" / unit)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}",
                        *(str(root / "etc/systemd/system" / u) for u in UNITS)],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
