from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings

settings.register_profile("dualscale", max_examples=60, deadline=None)
settings.load_profile("dualscale")


@pytest.fixture(scope="session", autouse=True)
def _compiled_kernels():
    """Compile every kernel once, before any hypothesis deadline could see the JIT."""
    from dualscale._kernels import mpc, perf_model, slack

    perf_model.warm_up()
    mpc.warm_up()
    slack.warm_up()


@pytest.fixture(scope="session")
def profile():
    import dualscale

    return dualscale.Profile.load("h100-sxm-llama-3.3-70b")


@pytest.fixture
def rng():
    return np.random.default_rng(20261123)
