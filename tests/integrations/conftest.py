from __future__ import annotations

import os

import pytest
from hook_helpers import Pull

from dualscale.integrations.settings import ENV

# vLLM picks its platform on first use: the CPU one, before any test imports vLLM (no GPU here)
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


@pytest.fixture
def pull(tmp_path):
    p = Pull(f"ipc://{tmp_path}/reports")
    yield p
    p.close()


@pytest.fixture(autouse=True)
def _no_dualscale_env(monkeypatch):
    """Tests set the hook's environment themselves."""
    for var in ENV.values():
        monkeypatch.delenv(var, raising=False)
