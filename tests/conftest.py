"""Shared fixtures. Async tests run on anyio's pytest plugin (asyncio backend)."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.leaks", "tests.fixtures_env"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def operator_args() -> list[str]:
    """More `kubemr operator` flags for tests/operator_fixtures.py's operator; a test module
    overrides this fixture to add its own (the metrics ports, say)."""
    return []


@pytest.fixture(scope="module")
def platform_namespaces(kube_namespace: str) -> str:
    """The namespaces (a label selector) where tests/operator_fixtures.py's operator lets
    jobs use the platform's S3 credentials: the module's own, whose jobs name none of their
    own. tests/test_tenant_security.py overrides it to test the tenant's path."""
    return f"kubernetes.io/metadata.name={kube_namespace}"
