from __future__ import annotations

import pytest
from rt_helpers import small_config


@pytest.fixture
def config(tmp_path):
    return small_config(tmp_path)


@pytest.fixture(scope="session")
def make_config():
    return small_config
