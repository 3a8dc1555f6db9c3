import dualscale


def test_exported_names():
    assert sorted(dualscale.__all__) == dualscale.__all__
    assert set(dualscale.__all__) == {
        "ConfigError", "DataError", "DecodeController", "DecodeDecision", "DualscaleError",
        "PrefillController", "PrefillDecision", "Profile", "SolverError", "__version__",
    }
    for name in dualscale.__all__:
        assert hasattr(dualscale, name)
