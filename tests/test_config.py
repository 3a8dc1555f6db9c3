"""Config loading: all-or-nothing, one clear error naming file, field, value and what is allowed."""

from __future__ import annotations

import re

import numpy as np
import pytest

import dualscale
from dualscale.config import builtin_config_dir
from dualscale.errors import ConfigError

SRC = builtin_config_dir() / "profiles" / "h100-sxm-llama-3.3-70b.toml"


def _write(tmp_path, text):
    p = tmp_path / "p.toml"
    p.write_text(text)
    return p


def _edit(pattern, repl):
    text = SRC.read_text()
    new = re.sub(pattern, repl, text, count=1, flags=re.M)
    assert new != text, pattern
    return new


def test_builtin_loads_from_a_path(tmp_path):
    p = _write(tmp_path, SRC.read_text())
    assert dualscale.Profile.load(p).name == "h100-sxm-llama-3.3-70b"


@pytest.mark.parametrize(
    ("pattern", "repl", "expect"),
    [
        (r"^power_cap_w = .*$", 'power_cap_w = "lots"', ["gpu.power_cap_w", "'lots'", "Expected `float`"]),
        (r"^power_cap_w = .*$", "power_cap_w = -5.0", ["gpu.power_cap_w", "-5.0", "> 0"]),
        (r"^layers = 80$", "layers = 80\nlayer_count = 3", ["unknown field", "layer_count"]),
        (r"^clock_step_mhz = 15$", "clock_step_mhz = 7", ["gpu.clock_step_mhz", "7", "must divide"]),
        (r"^reference_mhz = .*$", "reference_mhz = 1234.0", ["clock_response.reference_mhz", "1234.0"]),
        (r"^format = 2$", "format = 3", ["format", "3", "must be 2"]),
        (r"^format = 2$", "format = 1", ["format", "1", "must be 2", "squared work shares", "refit"]),
        (r"^prefill_mem_power_w = \[\n\s+[0-9.e+-]+,", "prefill_mem_power_w = [\n    -3.5,",
         ["clock_response.prefill_mem_power_w[0]", "-3.5", ">= 0"]),
        (r"^decode_comp_power_w = \[\n\s+[0-9.e+-]+,", "decode_comp_power_w = [\n    inf,",
         ["clock_response.decode_comp_power_w", "inf", "must be finite"]),
        (r"^base_s = .*$", "base_s = -0.5", ["latency.prefill[0].base_s", "-0.5", ">= 0"]),
        (r"^tp = 2\nprefill_mem_power_w", "tp = 3\nprefill_mem_power_w",
         ["clock_response.power_by_tp[0]", "clock_response.power_by_tp.tp", "3", "must be one of (1, 2, 4, 8, 16)"]),
        (r"^tp = 2\nprefill_mem_power_w", "tp = 16\nprefill_mem_power_w",
         ["clock_response.power_by_tp[0].tp", "16", "must be one of the profile's TP degrees [2, 4, 8]"]),
        (r"^tp = 2\nprefill_mem_power_w", "tp = 0\nprefill_mem_power_w",
         ["clock_response.power_by_tp[0].tp", "0", ">= 1"]),
    ],
)
def test_bad_field_is_named_with_value_and_rule(tmp_path, pattern, repl, expect):
    p = _write(tmp_path, _edit(pattern, repl))
    with pytest.raises(ConfigError) as e:
        dualscale.Profile.load(p)
    msg = str(e.value)
    assert str(p) in msg
    for part in expect:
        assert part in msg, (part, msg)


def test_missing_section_is_named(tmp_path):
    text = SRC.read_text()
    start = text.index("\n[model]\n")
    end = text.index("\n[clock_response]\n")
    p = _write(tmp_path, text[:start] + text[end:])
    with pytest.raises(ConfigError, match="missing required field `model`"):
        dualscale.Profile.load(p)


def test_knot_count_mismatch(tmp_path):
    p = _write(tmp_path, _edit(r"^mem_slowdown = \[\n\s+[0-9.e+-]+,", "mem_slowdown = ["))
    with pytest.raises(ConfigError, match=r"clock_response.mem_slowdown.*one value per knot"):
        dualscale.Profile.load(p)


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        dualscale.Profile.load(_write(tmp_path, "name = = 3"))
    with pytest.raises(ConfigError, match="cannot read"):
        dualscale.Profile.load(tmp_path / "absent.toml")


def test_every_section_names_its_source():
    prof = dualscale.Profile.load("h100-sxm-llama-3.3-70b")
    c = prof.config
    sections = [c.gpu, c.model, c.clock_response, c.latency, *c.latency.prefill, *c.latency.decode]
    assert all(len(s.source) > 20 for s in sections)


# ---- per-TP busy power curves: [[clock_response.power_by_tp]] ---------------------------------
def _power_by_tp_block(text):
    """The first [[clock_response.power_by_tp]] table of ``text`` as (start, end) offsets."""
    start = text.index("[[clock_response.power_by_tp]]\n")
    return start, text.index("\n[", start + 1)


def test_builtin_has_a_tp2_power_override_and_tp8_uses_the_shared_curves():
    c = dualscale.Profile.load("h100-sxm-llama-3.3-70b").config.clock_response
    assert [p.tp for p in c.power_by_tp] == [2]
    assert c.power_curves(2) is c.power_by_tp[0]
    assert c.power_curves(4) is c and c.power_curves(8) is c
    assert len(c.power_by_tp[0].source) > 20


def test_bad_power_by_tp_curve_is_named_with_value_and_rule(tmp_path):
    text = SRC.read_text()
    start, end = _power_by_tp_block(text)
    block = re.sub(r"(decode_mem_power_w = \[\n)\s+[0-9.e+-]+,", r"\1    -40.0,", text[start:end], count=1)
    p = _write(tmp_path, text[:start] + block + text[end:])
    with pytest.raises(ConfigError) as e:
        dualscale.Profile.load(p)
    msg = str(e.value)
    for part in ("clock_response.power_by_tp[0].decode_mem_power_w[0]", "-40.0", ">= 0"):
        assert part in msg, (part, msg)


def test_power_by_tp_curve_needs_one_value_per_knot(tmp_path):
    text = SRC.read_text()
    start, end = _power_by_tp_block(text)
    block = re.sub(r"(prefill_comp_power_w = \[\n)\s+[0-9.e+-]+,\n", r"\1", text[start:end], count=1)
    p = _write(tmp_path, text[:start] + block + text[end:])
    with pytest.raises(ConfigError, match=r"clock_response.power_by_tp\[0\].prefill_comp_power_w` = '8 values'.*"
                                          r"one value per knot \(9\)"):
        dualscale.Profile.load(p)


def test_power_by_tp_degrees_must_be_unique(tmp_path):
    text = SRC.read_text()
    start, end = _power_by_tp_block(text)
    p = _write(tmp_path, text[:end] + "\n" + text[start:end] + text[end:])
    with pytest.raises(ConfigError, match=r"clock_response.power_by_tp` = \[2, 2\]: TP degrees must be unique"):
        dualscale.Profile.load(p)


def test_power_by_tp_is_optional(tmp_path):
    """Without overrides every TP degree uses the shared curves."""
    text = SRC.read_text()
    start, end = _power_by_tp_block(text)
    prof = dualscale.Profile.load(_write(tmp_path, text[:start] + text[end + 1:]))
    assert prof.config.clock_response.power_by_tp == []
    shared = dualscale.Profile.load("h100-sxm-llama-3.3-70b")
    for phase in ("prefill", "decode"):
        np.testing.assert_array_equal(prof.clock_table(phase, 2)[3:], shared.clock_table(phase, 4)[3:])


def test_cross_field_rule_is_reported_once_without_the_whole_section(tmp_path):
    p = _write(tmp_path, _edit(r"^clock_step_mhz = 15$", "clock_step_mhz = 7"))
    with pytest.raises(ConfigError) as e:
        dualscale.Profile.load(p)
    assert str(e.value) == (f"{p}: field `gpu.clock_step_mhz` = 7: must divide clock_max_mhz - clock_min_mhz = 1635 "
                            "(in `gpu`)")
