"""`dualscale profile derive`: scaling a base profile to another dense model's geometry."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import msgspec
import numpy as np
import pytest

import dualscale
from dualscale.cli import main
from dualscale.errors import ConfigError
from dualscale.profile import Profile, derive
from dualscale.profile.fit import MLENERGY_PROMPT_TOKENS
from dualscale.profile.validate import DERIVE_TARGET_PCT, check_derived
from dualscale.testing import DecodeBatch, PrefillQueue, check_decode_decision, check_prefill_decision

BASE = "h100-sxm-llama-3.3-70b"
BASE_ID = "meta-llama/Llama-3.3-70B-Instruct"
#: Written profiles keep 6 significant digits (as `profile fit` does): each coefficient is off by at
#: most 5e-6 relative, so a sum of them (time) and the power built on their ratios stay within 1e-5.
ROUNDING_RTOL = 1e-5


@pytest.fixture(scope="module")
def base() -> Profile:
    return Profile.load(BASE)


@pytest.fixture(scope="module")
def base_cfg() -> dict:
    return json.loads((derive.models_dir() / "meta-llama--Llama-3.3-70B-Instruct.json").read_text())


def _derive(base: Profile, cfg: dict, name: str = "test") -> Profile:
    geom = derive.parse_config(cfg, "<test>", name="test/model")
    return Profile(derive.derive(base.config, derive.base_geometry(base.config), geom, name=name))


# ---- the base model's own config reproduces the base ------------------------------------------
def test_own_config_reproduces_the_base(base, base_cfg):
    own = _derive(base, base_cfg)
    assert own.tp_degrees == base.tp_degrees  # 70B bf16 does not fit one 80 GB GPU: no TP1
    rng = np.random.default_rng(0)
    clocks = base.clocks_mhz.astype(float)
    for tp in base.tp_degrees:
        assert own.kv_capacity_tokens(tp) == base.kv_capacity_tokens(tp)
        for _ in range(20):
            ctx = rng.integers(1, 8000, rng.integers(1, 256))
            chunks = rng.integers(1, 4096, rng.integers(1, 8))
            for a, b in ((own.decode(tp, ctx, clocks), base.decode(tp, ctx, clocks)),
                         (own.prefill(tp, chunks, clocks), base.prefill(tp, chunks, clocks))):
                np.testing.assert_allclose(a[0], b[0], rtol=ROUNDING_RTOL)
                np.testing.assert_allclose(a[1], b[1], rtol=ROUNDING_RTOL)


def test_base_file_format_unchanged(base):
    """The schema's new optional fields are omitted when unset: a refit writes the same keys as before."""
    raw = msgspec.to_builtins(base.config)
    assert "attention_pair_token_equiv" not in raw["model"]
    assert "memory_bandwidth_bytes_per_s" not in raw["gpu"]


# ---- scaling properties -------------------------------------------------------------------------
def test_twice_the_layers_doubles_the_work(base, base_cfg):
    one = _derive(base, base_cfg)
    two = _derive(base, {**base_cfg, "num_hidden_layers": 2 * base_cfg["num_hidden_layers"]})
    g1 = derive.parse_config(base_cfg, "<1>")
    g2 = derive.parse_config({**base_cfg, "num_hidden_layers": 160}, "<2>")
    lin = g2.linear_flops_per_token / g1.linear_flops_per_token  # < 2: the lm_head does not double
    assert 1.95 < lin < 2.0
    assert two.tp_degrees == (4, 8)  # 282 GB of weights: not in 2 x 80 GB
    for tp in two.tp_degrees:
        for phase in ("prefill", "decode"):
            c1, c2 = one.coefficients(phase, tp), two.coefficients(phase, tp)
            assert c2[2] / c1[2] == pytest.approx(2.0, rel=ROUNDING_RTOL)  # KV bytes per token
            assert c2[3] / c1[3] == pytest.approx(lin, rel=ROUNDING_RTOL)  # linear FLOPs
            assert 1.9 < c2[0] / c1[0] < 2.0  # weights streamed (lm_head once) + per-layer overhead
        ctx = np.full(16, 1000)
        assert 1.9 < two.decode_time_s(tp, ctx, 1980.0) / one.decode_time_s(tp, ctx, 1980.0) < 2.0
        assert 1.9 < two.prefill_time_s(tp, [4096], 1980.0) / one.prefill_time_s(tp, [4096], 1980.0) < 2.0


def test_more_kv_heads_more_kv_bytes_less_capacity(base, base_cfg):
    small = derive.parse_config(base_cfg, "<8>")
    big_cfg = {**base_cfg, "num_key_value_heads": 16}
    big = derive.parse_config(big_cfg, "<16>")
    assert big.kv_bytes_per_token_layer == 2 * small.kv_bytes_per_token_layer
    one, two = _derive(base, base_cfg), _derive(base, big_cfg)
    for tp in one.tp_degrees:
        assert two.coefficients("decode", tp)[2] == pytest.approx(2 * one.coefficients("decode", tp)[2],
                                                                   rel=ROUNDING_RTOL)
        assert two.kv_capacity_tokens(tp) < one.kv_capacity_tokens(tp)
        ctx = np.full(64, 4000)
        assert two.decode_time_s(tp, ctx, 1980.0) > one.decode_time_s(tp, ctx, 1980.0)


def test_small_model_gets_tp1_and_big_one_does_not(base):
    small = Profile(derive.derive(base.config, derive.base_geometry(base.config),
                                  derive.read_config("meta-llama/Llama-3.1-8B-Instruct"), name="8b"))
    assert small.tp_degrees == (1, 2, 4, 8)
    assert "TP1 not in the base" in small.config.latency.decode[0].source
    assert small.decode_time_s(1, np.full(8, 1000), 1980.0) < base.decode_time_s(2, np.full(8, 1000), 1980.0)
    big = Profile(derive.derive(base.config, derive.base_geometry(base.config),
                                derive.read_config("meta-llama/Llama-3.1-70B-Instruct"), name="70b"))
    assert 1 not in big.tp_degrees
    assert "TP1:" in big.config.model.source  # says why


def test_min_kv_tokens_decides_what_fits(base):
    g = derive.read_config("Qwen/Qwen3-32B")  # 65.5 GB of weights: ~31k KV tokens left on one GPU
    bg = derive.base_geometry(base.config)
    assert Profile(derive.derive(base.config, bg, g, name="a", min_kv_tokens=16_000)).tp_degrees[0] == 1
    assert Profile(derive.derive(base.config, bg, g, name="b", min_kv_tokens=64_000)).tp_degrees[0] == 2


def test_sliding_window_layers_read_a_window(base):
    """Gemma 3: 5 of 6 layers attend to 1024 tokens; only the rest pay per context token."""
    g = derive.read_config("google/gemma-3-27b-it")
    assert (g.sliding_layers, g.sliding_window, g.global_layers) == (52, 1024, 10)
    full = derive.parse_config({"hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 62,
                                "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128,
                                "vocab_size": 262208, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}, "<f>")
    bg = derive.base_geometry(base.config)
    win = Profile(derive.derive(base.config, bg, g, name="w"))
    nowin = Profile(derive.derive(base.config, bg, full, name="n"))
    assert win.coefficients("decode", 2)[2] == pytest.approx(nowin.coefficients("decode", 2)[2] * 10 / 62, rel=1e-4)
    long_ctx = np.full(32, 30_000)
    assert win.decode_time_s(2, long_ctx, 1980.0) < nowin.decode_time_s(2, long_ctx, 1980.0)


def test_derivations_compose(base, tmp_path):
    """70B -> Qwen3-8B -> Qwen3-14B gives Qwen3-14B's coefficients of 70B -> Qwen3-14B: every rule is a ratio
    of work, and the streaming part of the fixed time is bytes / bandwidth at each step."""
    bg = derive.base_geometry(base.config)
    q8, q14 = derive.read_config("Qwen/Qwen3-8B"), derive.read_config("Qwen/Qwen3-14B")
    mid = derive.derive(base.config, bg, q8, name="q8")
    chained = Profile(derive.derive(mid, q8, q14, name="a"))
    direct = Profile(derive.derive(base.config, bg, q14, name="b"))
    assert chained.tp_degrees == direct.tp_degrees == (1, 2, 4, 8)
    for tp in direct.tp_degrees:
        for phase in ("prefill", "decode"):
            np.testing.assert_allclose(chained.coefficients(phase, tp), direct.coefficients(phase, tp),
                                       rtol=2 * ROUNDING_RTOL)  # rounded twice


def test_tied_embeddings_default_follows_the_model_family(base_cfg):
    untied = {k: v for k, v in base_cfg.items() if k != "tie_word_embeddings"}
    assert not derive.parse_config(untied, "<llama>").tie_word_embeddings
    gemma = json.loads((derive.models_dir() / "google--gemma-3-27b-it.json").read_text())
    del gemma["text_config"]["tie_word_embeddings"]
    g = derive.parse_config(gemma, "<gemma>")
    gemma["text_config"]["tie_word_embeddings"] = False
    untied_g = derive.parse_config(gemma, "<gemma untied>")
    assert g.tie_word_embeddings and untied_g.params - g.params == g.vocab_size * g.hidden_size
    assert untied_g.streamed_params == g.streamed_params  # the lm_head is read once a step either way


def test_shipped_configs_all_derive(base):
    names = sorted(p.stem for p in derive.models_dir().glob("*.json"))
    assert len(names) >= 8
    for n in names:
        prof = Profile(derive.derive(base.config, derive.base_geometry(base.config), derive.read_config(n.replace(
            "--", "/")), name=n))
        assert all(len(c.source) > 20 for c in (*prof.config.latency.prefill, *prof.config.latency.decode))


# ---- bad configs name the field ---------------------------------------------------------------
BAD = [
    ("missing", {"num_hidden_layers": None}, "num_hidden_layers", "required"),
    ("negative", {"hidden_size": -8192}, "hidden_size", "-8192"),
    ("zero", {"num_attention_heads": 0}, "num_attention_heads", "0"),
    ("non-integer", {"intermediate_size": 28672.5}, "intermediate_size", "28672.5"),
    ("boolean", {"vocab_size": True}, "vocab_size", "True"),
    ("string", {"num_key_value_heads": "8"}, "num_key_value_heads", "'8'"),
    ("absurd", {"num_hidden_layers": 10**6}, "num_hidden_layers", "<= 1024"),
    ("heads-not-dividing-hidden", {"num_attention_heads": 60}, "num_attention_heads", "must divide hidden_size"),
    ("kv-not-dividing-heads", {"num_key_value_heads": 7}, "num_key_value_heads", "must divide num_attention_heads"),
    ("unknown-dtype", {"torch_dtype": "int3"}, "torch_dtype", "bfloat16"),
    ("moe-num-experts", {"num_experts": 128}, "num_experts", "not dense"),
    ("moe-local-experts", {"num_local_experts": 8}, "num_local_experts", "not dense"),
    ("hybrid", {"hybrid_override_pattern": "M-M*"}, "hybrid_override_pattern", "not dense"),
    ("quantized", {"quantization_config": {"quant_method": "fp8"}}, "quantization_config", "fp8"),
    ("tie-not-bool", {"tie_word_embeddings": "yes"}, "tie_word_embeddings", "true or false"),
]


@pytest.mark.parametrize("change,field,says", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_names_the_field(base_cfg, change, field, says):
    cfg = {**base_cfg, **change}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with pytest.raises(ConfigError) as e:
        derive.parse_config(cfg, "my/config.json")
    msg = str(e.value)
    assert f"`{field}" in msg and says in msg and "my/config.json" in msg


def test_not_json_and_not_an_object(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        derive.read_config(p)
    p.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        derive.read_config(p)
    with pytest.raises(ConfigError, match="shipped: .*Qwen/Qwen3-8B"):
        derive.read_config(tmp_path / "missing.json")


def test_dtype_must_match_the_base(base, base_cfg):
    geom = derive.parse_config({**base_cfg, "torch_dtype": "float32"}, "<f32>")
    with pytest.raises(ConfigError, match="dtypes must match"):
        derive.derive(base.config, derive.base_geometry(base.config), geom, name="x")


def test_model_too_big_for_every_tp(base, base_cfg):
    geom = derive.parse_config({**base_cfg, "num_hidden_layers": 640}, "<huge>")
    with pytest.raises(ConfigError, match="fits in none of TP"):
        derive.derive(base.config, derive.base_geometry(base.config), geom, name="x")


def test_base_config_must_match_the_base_profile(base, tmp_path, base_cfg):
    p = tmp_path / "other.json"
    p.write_text(json.dumps({**base_cfg, "num_hidden_layers": 40}))
    with pytest.raises(ConfigError, match="layers = 40 but the profile's model.layers = 80"):
        derive.base_geometry(base.config, p)


# ---- CLI and the controllers ------------------------------------------------------------------
def test_cli_round_trip(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text((derive.models_dir() / "Qwen--Qwen3-14B.json").read_text())
    out = tmp_path / "sub" / "qwen14.toml"
    assert main(["profile", "derive", "--config", str(cfg), "--from", BASE, "--out", str(out)]) == 0
    assert "TP1, TP2, TP4, TP8" in capsys.readouterr().err
    prof = dualscale.Profile.load(out)
    assert prof.name == "qwen14" and prof.tp_degrees == (1, 2, 4, 8)
    assert not list(out.parent.glob(".*.tmp"))
    assert main(["profile", "show", str(out), "--tp", "1", "--clocks-mhz", "1980"]) == 0
    assert "TP1" in capsys.readouterr().out


def test_cli_errors_are_clear_and_write_nothing(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"num_hidden_layers": 2, "num_experts": 8}))
    out = tmp_path / "x.toml"
    assert main(["profile", "derive", "--config", str(cfg), "--out", str(out)]) == 2
    assert "num_experts" in capsys.readouterr().err
    assert not out.exists()


def test_cli_help_teaches(capsys):
    with pytest.raises(SystemExit) as e:
        main(["profile", "derive", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and "--config" in out and "--min-kv-tokens" in out


def test_derived_profile_drives_the_controllers(tmp_path):
    out = tmp_path / "llama8b.toml"
    assert main(["profile", "derive", "--config", "meta-llama/Llama-3.1-8B-Instruct", "--out", str(out)]) == 0
    prof = dualscale.Profile.load(out)
    dec = dualscale.DecodeController(prof, tp=1, tpot_slo_s=0.05, slack="tbt")
    b = DecodeBatch(100.0, np.full(32, 99.0), np.full(32, 20, dtype=np.int64), np.full(32, 1500, dtype=np.int64))
    d = dec.decide(b.now_s, b.first_token_s, b.tokens_out, b.context_tokens)
    check_decode_decision(dec, b, d)
    assert d.feasible and d.freq_mhz < prof.clocks_mhz[-1]  # an 8B model on one GPU has slack at 50 ms
    pre = dualscale.PrefillController(prof, tp=1, ttft_slo_s=0.5, horizon=4)
    q = PrefillQueue(1.0, np.array([0.9, 0.95]), np.array([2000, 800], dtype=np.int64), np.zeros(2, dtype=np.int64))
    check_prefill_decision(pre, q, pre.decide(q.now_s, q.arrival_s, q.prompt_tokens, q.prefilled_tokens))


# ---- the held-out check in `profile validate`, on synthetic data ------------------------------
def _write_mlenergy(data: Path, prof: Profile, model_id: str, tp: int, scale_time: float, scale_power: float) -> None:
    rows = []
    for batch in (8, 32, 128):
        out_len = 600.0
        mean_ctx = MLENERGY_PROMPT_TOKENS + 0.5 * out_len
        from dualscale.profile.datasets import spread_contexts

        t, w = prof.decode(tp, spread_contexts(batch, mean_ctx, 0.3 * mean_ctx), 1980.0)
        rows.append({"model_id": model_id, "gpu_model": "H100", "num_gpus": str(tp), "tensor_parallel": str(tp),
                     "avg_batch_size": str(batch), "median_itl_ms": str(t * 1e3 * scale_time),
                     "avg_power_watts": str(w * tp * scale_power), "avg_output_len": str(out_len)})
    path = data / "mlenergy_leaderboard" / "lm-arena-chat_configs_flat.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.mark.parametrize("scale,met", [(1.0, True), (1.2, False)])
def test_heldout_check_scores_the_derived_profile(base, tmp_path, scale, met):
    """Synthetic 'measurements' = the derived profile's own predictions x scale: error (scale - 1)."""
    prof = Profile(derive.derive(base.config, derive.base_geometry(base.config),
                                 derive.read_config("Qwen/Qwen3-8B"), name="q"))
    _write_mlenergy(tmp_path, prof, "Qwen/Qwen3-8B", 1, scale, scale)
    res = {r.check: r for r in check_derived(base, tmp_path)}
    per_model = res["derive_decode_step_time[Qwen/Qwen3-8B]"]
    assert per_model.n == 3
    assert per_model.median_err_pct == pytest.approx(abs(1 / scale - 1) * 100, abs=1e-3)
    for q in ("decode_step_time", "decode_power"):
        summary = res[f"derive_{q}_heldout_models"]
        assert summary.n == 1 and summary.target_pct == DERIVE_TARGET_PCT and summary.met is met
    assert not any(BASE_ID in c for c in res)  # the base model is not held out
