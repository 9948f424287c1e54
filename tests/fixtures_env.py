"""Session fixtures for the real test environment (Kubernetes control plane, S3 server).

Loaded from tests/conftest.py via ``pytest_plugins``. The servers start once per session,
on first use, so test runs that deselect ``kube``/``s3`` tests never build or start them.
When the binaries cannot be had, the fixtures raise with the reason: a test that needs a
real server errors instead of being skipped quietly.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from kubemr_async.testing.cluster import TestCluster
from kubemr_async.testing.kubelet import FakeKubelet
from kubemr_async.testing.s3server import S3Server


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[TestCluster]:
    """etcd + kube-apiserver + kube-controller-manager, shared by the whole session."""
    with TestCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def fake_kubelet(
    kube_cluster: TestCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FakeKubelet]:
    """Runs every unscheduled Pod in the session's cluster as a local process."""
    with FakeKubelet(
        kube_cluster.kubeconfig_path, log_dir=tmp_path_factory.mktemp("pod-logs")
    ) as kubelet:
        yield kubelet


@pytest.fixture
def kube_namespace(kube_cluster: TestCluster) -> Iterator[str]:
    """A fresh namespace (with its default ServiceAccount) per test, deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    kube_cluster.create_namespace(name)
    yield name
    kube_cluster.api("DELETE", f"/api/v1/namespaces/{name}")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """An S3-compatible server on loopback, shared by the whole session."""
    with S3Server() as server:
        yield server
