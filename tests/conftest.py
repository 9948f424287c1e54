"""Shared fixtures. Async tests run on anyio's pytest plugin (asyncio backend)."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.fixtures_env"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
