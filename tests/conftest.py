"""Shared fixtures. Async tests run on anyio's pytest plugin (asyncio backend)."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.fixtures_env"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def operator_args() -> list[str]:
    """More `kubemr operator` flags for tests/operator_fixtures.py's operator; a test module
    overrides this fixture to add its own (the metrics ports, say)."""
    return []
