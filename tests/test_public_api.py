import dualscale


def test_exported_names():
    assert sorted(dualscale.__all__) == dualscale.__all__
    assert set(dualscale.__all__) == {
        "ConfigError", "DataError", "DecodeController", "DecodeDecision", "DualscaleError",
        "PrefillController", "PrefillDecision", "Profile", "SolverError", "__version__",
    }
    for name in dualscale.__all__:
        assert hasattr(dualscale, name)


def test_lazy_exports_resolve_and_name_what_they_load():
    """The package inits load names on first use (an engine importing the worker agent must not
    load Numba): every exported name resolves, and nothing unexported is loadable by that path."""
    import pytest

    import dualscale.runtime as runtime

    for pkg, extra in ((dualscale, {"__version__"}), (runtime, set())):
        assert set(pkg.__all__) == set(pkg._LAZY) | extra
        for name in pkg.__all__:
            assert getattr(pkg, name) is not None
        with pytest.raises(AttributeError, match="no attribute 'Nope'"):
            pkg.Nope  # noqa: B018
