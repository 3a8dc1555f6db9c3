"""Config loading: all-or-nothing, one clear error naming file, field, value and what is allowed."""

from __future__ import annotations

import re

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
        (r"^format = 1$", "format = 2", ["format", "2"]),
        (r"^base_s = .*$", "base_s = -0.5", ["latency.prefill[0].base_s", "-0.5", ">= 0"]),
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


def test_cross_field_rule_is_reported_once_without_the_whole_section(tmp_path):
    p = _write(tmp_path, _edit(r"^clock_step_mhz = 15$", "clock_step_mhz = 7"))
    with pytest.raises(ConfigError) as e:
        dualscale.Profile.load(p)
    assert str(e.value) == (f"{p}: field `gpu.clock_step_mhz` = 7: must divide clock_max_mhz - clock_min_mhz = 1635 "
                            "(in `gpu`)")
