from __future__ import annotations

from dualscale.cli import main


def test_profile_show_prints_tables(capsys):
    assert main(["profile", "show", "--tp", "4", "--clocks-mhz", "780", "1980"]) == 0
    out = capsys.readouterr().out
    assert "TP4" in out and "1980" in out and "J/token" in out


def test_bad_profile_and_tp_are_clear_errors(capsys):
    assert main(["profile", "show", "no-such-profile"]) == 2
    assert "no such built-in profile" in capsys.readouterr().err
    assert main(["profile", "show", "--tp", "3"]) == 2
    assert "tp = 3" in capsys.readouterr().err


def test_validate_without_data_names_the_missing_file(tmp_path, capsys):
    assert main(["profile", "validate", "--data", str(tmp_path)]) == 2
    assert "file not found" in capsys.readouterr().err


def test_simulate_writes_json_and_plots(tmp_path, capsys):
    import json

    from dualscale.cli import main

    out = tmp_path / "out.json"
    rc = main(["simulate", "--duration", "20", "--quiet", "--json", str(out), "--plots", str(tmp_path / "p"),
               "--policy", "distserve", "--policy", "dualscale"])
    assert rc == 0
    records = json.loads(out.read_text())
    assert [r["policy"] for r in records] == ["distserve", "dualscale"]
    for r in records:
        assert set(r) >= {"policy", "trace", "requests", "completed", "energy_j", "j_per_token", "ttft_s",
                          "tpot_s", "slo", "gpus", "sim_wall_s"}
        assert r["energy_j"]["total"] == r["energy_j"]["prefill"] + r["energy_j"]["decode"]
        assert r["gpus"] == {"prefill": 8, "decode": 8}
    assert records[1]["energy_j"]["total"] < records[0]["energy_j"]["total"]
    pngs = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert pngs == ["distserve-decode.png", "distserve-prefill.png", "dualscale-decode.png", "dualscale-prefill.png",
                    "energy.png"]
    assert "energy and latency per policy" in capsys.readouterr().out


def test_simulate_bad_arguments_exit_2_with_the_reason(capsys):
    from dualscale.cli import main

    assert main(["simulate", "--policy", "turbo", "--duration", "5", "--quiet"]) == 2
    assert "policy 'turbo'" in capsys.readouterr().err
    assert main(["simulate", "--trace", "gamma", "--quiet"]) == 2
    assert "trace.rate_per_s" in capsys.readouterr().err


def test_evaluate_quick_and_plan(tmp_path, monkeypatch, capsys):
    import json

    from dualscale.cli import main

    monkeypatch.setenv("DUALSCALE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--quick", "--workers", "1", "--json", str(out), "--plots", str(tmp_path / "p")]) == 0
    rows = json.loads(out.read_text())
    assert {r["policy"] for r in rows} == {"distserve", "placeonly", "dualscale"}
    for r in rows:
        if r["policy"] == "distserve":
            assert r["saving_vs_distserve"] == {"prefill": 0.0, "decode": 0.0}
    assert (tmp_path / "p" / "evaluate.png").is_file()
    assert "DistServe vs PlaceOnly vs DualScale" in capsys.readouterr().out
    # plan reuses nothing from evaluate's grid cache here; keep it small through a short window
    rc = main(["plan", "--trace", "azure-conv", "--gpus", "16", "--window", "40", "--workers", "1", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0 and plan["feasible"] and plan["gpus_used"] <= 16
    assert {g["phase"] for g in plan["groups"]} == {"prefill", "decode"}
    assert main(["plan", "--trace", "azure-conv", "--gpus", "2", "--window", "40", "--workers", "1", "--rate", "50"]) == 1
    assert "cannot serve 50.00 req/s" in capsys.readouterr().err


def test_simulate_truth_options_reach_the_scenario(capsys):
    from dualscale.cli import _parser, _with_truth
    from dualscale.sim.scenario import load_scenario

    args = _parser().parse_args(["simulate", "--latency-bias", "0.2", "--latency-noise", "0.05", "--power-cap-w", "500",
                                 "--clock-shape-error", "-0.1", "--switch-jitter", "0.3", "--no-correction"])
    sc = _with_truth(load_scenario("default"), args)
    t = sc.truth
    assert (t.latency_bias_prefill, t.latency_bias_decode, t.latency_noise) == (0.2, 0.2, 0.05)
    assert (t.power_cap_w, t.clock_shape_error, t.switch_jitter) == (500.0, -0.1, 0.3)
    assert t.power_bias_prefill == 0.0 and not sc.control.online_correction
    assert _with_truth(load_scenario("default"), _parser().parse_args(["simulate"])) == load_scenario("default")
    assert main(["simulate", "--latency-bias", "-2", "--duration", "30", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "truth.latency_bias_prefill" in err and "-2.0" in err
