"""Shared fixtures: tiny random-weight models of each family, built once per test run in a temp dir."""

from __future__ import annotations

import os

import pytest

FAMILIES = ["tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-smolvlm"]


@pytest.fixture(scope="session", autouse=True)
def streamvlm_home(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Presets are built into a fresh directory for the run, so the builder itself is under test."""
    home = os.environ.get("STREAMVLM_TEST_HOME") or str(tmp_path_factory.mktemp("streamvlm-home"))
    os.environ["STREAMVLM_HOME"] = home
    return home


_loaded: dict[str, object] = {}


def load(name: str):
    from streamvlm.models import load_model

    if name not in _loaded:
        _loaded[name] = load_model(name)
    return _loaded[name]


@pytest.fixture(params=FAMILIES)
def adapter(request: pytest.FixtureRequest):
    """One adapter per family; tests using it run once for each."""
    return load(request.param)


@pytest.fixture
def smol():
    return load("tiny-smolvlm")
