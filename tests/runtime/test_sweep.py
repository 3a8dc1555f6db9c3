"""``dualscale profile sweep``: the grid, resuming, the load generator, and truth recovery end to end
(sim actuator + emulated engine on a hidden truth + the sweep in the controller's place, over real
processes and CURVE; then ``profile fit --telemetry``)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import msgspec
import numpy as np
import pytest
from test_record_e2e import BASE, held_out_error, recovery_mape, truth_node, wait_until

from dualscale.errors import ConfigError
from dualscale.profile import Profile
from dualscale.profile import telemetry as T
from dualscale.profile.fit_telemetry import fit_telemetry
from dualscale.runtime.loadgen import LoadGenerator
from dualscale.runtime.recorder import TelemetryRecorder
from dualscale.runtime.sweep import SweepDaemon, grid_mhz, load_state, state_path


def test_grid_spans_the_range_and_needs_three_clocks(profile):
    g = grid_mhz(profile, 8)
    assert len(g) == 8 and g[0] == 345 and g[-1] == 1980 and g == sorted(set(g))
    assert set(g) <= set(profile.clocks_mhz.tolist())
    with pytest.raises(ConfigError, match="at least 3"):
        grid_mhz(profile, 2)


def test_state_refuses_to_overwrite_and_to_resume_another_sweep(tmp_path):
    out = tmp_path / "t.jsonl"
    st = load_state(out, [600, 900, 1200], 5.0, resume=False)
    assert st.done_mhz == []
    with pytest.raises(ConfigError, match="nothing to resume"):
        load_state(out, [600, 900, 1200], 5.0, resume=True)
    state_path(out).write_bytes(msgspec.json.encode(msgspec.structs.replace(st, done_mhz=[600])))
    with pytest.raises(ConfigError, match="--resume to continue"):
        load_state(out, [600, 900, 1200], 5.0, resume=False)
    with pytest.raises(ConfigError, match="this one asks for"):
        load_state(out, [600, 900], 5.0, resume=True)
    assert load_state(out, [600, 900, 1200], 5.0, resume=True).done_mhz == [600]


def test_the_daemon_holds_each_clock_then_stops_and_resumes(tmp_path, make_config, profile):
    config = make_config(tmp_path)
    out = tmp_path / "t.jsonl"
    state = load_state(out, [600, 900, 1200], 0.05, resume=False)
    rec = TelemetryRecorder(str(out), list(config.instances), config.profile, source="sweep")
    seen: list[int | None] = []
    d = SweepDaemon(config, state, out, rec, progress=lambda f, left: seen.append(f), profile=profile)
    d._next_clock(0.0)  # what step() does when a dwell ends, without the sockets
    assert d.current_mhz == 600 and d._fixed(None, None).freq_mhz == 600
    d._next_clock(1.0)
    assert d.current_mhz == 900 and json.loads(state_path(out).read_bytes())["done_mhz"] == [600]
    rec.close()
    # interrupted here: a resumed sweep holds only the clocks left
    again = load_state(out, [600, 900, 1200], 0.05, resume=True)
    rec2 = TelemetryRecorder(str(out), list(config.instances), config.profile)
    d2 = SweepDaemon(config, again, out, rec2, profile=profile)
    assert d2.todo == [900, 1200]
    d2._next_clock(0.0)
    d2._next_clock(1.0)
    d2._next_clock(2.0)
    assert d2.finished and json.loads(state_path(out).read_bytes())["done_mhz"] == [600, 900, 1200]
    rec2.close()


class _Stub(BaseHTTPRequestHandler):
    bodies: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        n = int(self.headers["Content-Length"])
        _Stub.bodies.append(json.loads(self.rfile.read(n)))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"choices": []}')

    def log_message(self, *args):
        pass


def test_load_generator_sends_varied_shapes_to_an_openai_endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Stub.bodies.clear()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/completions"
        gen = LoadGenerator(url, "tiny", rate_per_s=200.0, seed=1).start()
        wait_until("requests", lambda: gen.stats.ok >= 100, 30, [])
        gen.stop(wait=True)
    finally:
        server.shutdown()
        server.server_close()
    assert gen.stats.failed == 0 and gen.stats.sent >= gen.stats.ok >= 100
    words = np.array([len(b["prompt"].split()) for b in _Stub.bodies])
    out = np.array([b["max_tokens"] for b in _Stub.bodies])
    assert {b["model"] for b in _Stub.bodies} == {"tiny"}
    assert words.min() < 100 and words.max() > 1000 and out.min() < 32 and out.max() > 200  # log-uniform spread
    with pytest.raises(ValueError, match="http"):
        LoadGenerator("ftp://x", "m", 1.0)
    with pytest.raises(ValueError, match="rate"):
        LoadGenerator("http://x", "m", 0.0)


SWEEP_MHZ = [str(f) for f in range(600, 1951, 150)]  # 10 clocks


def test_sweep_recovers_the_truth(tmp_path: Path, processes):
    truth, truth_rt, sweep_rt, state, actuator = truth_node(tmp_path, processes)
    out = tmp_path / "sweep.jsonl"
    start = processes.start
    sweep = start("sweep", "-m", "dualscale.cli", "profile", "sweep", "--config", str(sweep_rt), "--out", str(out),
                  "--clocks-mhz", *SWEEP_MHZ, "--dwell-s", "3", "--window-s", "0.5", "--quiet")
    wait_until("the telemetry headers", lambda: out.exists() and out.stat().st_size > 0, 90, [sweep])
    start("engine", "-m", "dualscale.runtime.emulate", "--config", str(truth_rt), "--prefill", "p0", "--decode", "d0",
          "--state-file", str(state), "--rate", "4", "--duration", "600", "--seed", "5")
    wait_until("the sweep to finish", lambda: sweep.poll() is not None, 240, [actuator])
    assert sweep.returncode == 0, processes.log("sweep")
    assert "sweep done: 10 of 10 clocks" in processes.log("sweep")

    tel = T.read(out)
    assert {h.source for h in tel.headers.values()} == {"sweep"}
    steady = [i for i in tel.iterations if i.end_mhz == 0]
    swept = {int(f) for f in SWEEP_MHZ}
    # every clock held; before the first lock lands the GPUs run unlocked, at the top clock
    assert swept <= {i.freq_mhz for i in steady} <= swept | {1980}
    fitted = Profile(fit_telemetry(tel, Profile.load(BASE).config).config)
    got = recovery_mape(truth, fitted, tel)  # held-out shapes at the swept clocks
    got |= {f"{k} (held-out clocks)": v for k, v in held_out_clocks_mape(truth, fitted, steady).items()}
    print("sweep truth recovery, MAPE %:", {k: round(v, 2) for k, v in got.items()})
    assert all(v <= 3.0 for v in got.values()), got


def held_out_clocks_mape(truth: Profile, fitted: Profile, its: list, n: int = 400) -> dict[str, float]:
    """MAPE % fitted vs truth on held-out shapes (recorded ones with token counts scaled by 0.8-1.2) at
    clocks the sweep never held: half way between two swept clocks."""
    rng = np.random.default_rng(1)
    swept = sorted(int(f) for f in SWEEP_MHZ)
    between = [(a + b) // 2 // 15 * 15 for a, b in zip(swept, swept[1:])]
    out = {}
    for phase, kind in (("prefill", T.PrefillIteration), ("decode", T.DecodeIteration)):
        pool = [i for i in its if isinstance(i, kind)]
        err = {"time": [], "power": []}
        for _ in range(n):
            f = int(rng.choice(between))
            it = pool[int(rng.integers(len(pool)))]
            time_err, power_err = held_out_error(truth, fitted, it, f, rng)
            err["time"].append(time_err)
            err["power"].append(power_err)
        out |= {f"{phase} {q}": 100.0 * float(np.mean(e)) for q, e in err.items()}
    return out
