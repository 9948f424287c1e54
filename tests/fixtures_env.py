"""Session fixtures for the real test environment (Kubernetes control plane, S3 server).

Loaded from tests/conftest.py via ``pytest_plugins``. The servers start once per session,
on first use, so test runs that deselect ``kube``/``s3`` tests never build or start them.
When the binaries cannot be had, the fixtures raise with the reason: a test that needs a
real server errors instead of being skipped quietly.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kubemr_async.testing.cluster import ApiError, TestCluster
from kubemr_async.testing.kubelet import FakeKubelet
from kubemr_async.testing.planted import Planted
from kubemr_async.testing.s3server import S3Server

from .leaks import audited_cluster

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = ROOT / "charts" / "kubemr-async" / "crds"


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[TestCluster]:
    """etcd + kube-apiserver + kube-controller-manager, shared by the whole session; what
    is written to it is searched for planted credentials (tests/leaks.py)."""
    with audited_cluster() as cluster:
        yield cluster


@contextlib.contextmanager
def running_kubelet(cluster: TestCluster, log_dir: Path) -> Iterator[FakeKubelet]:
    """The test kubelet on ``cluster``: it runs every unscheduled Pod as a local process."""
    # Pods see the repository the way a job image built from it would: examples/ and the
    # test jobs importable as modules (examples.wordcount, tests.jobs.attempts).
    with FakeKubelet(cluster.kubeconfig_path, log_dir=log_dir,
                     extra_env={"PYTHONPATH": str(ROOT)}) as kubelet:
        yield kubelet


@pytest.fixture(scope="session")
def fake_kubelet(
    kube_cluster: TestCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FakeKubelet]:
    """Runs every unscheduled Pod in the session's cluster as a local process."""
    with running_kubelet(kube_cluster, tmp_path_factory.mktemp("pod-logs")) as kubelet:
        yield kubelet


@pytest.fixture
def kube_namespace(kube_cluster: TestCluster) -> Iterator[str]:
    """A fresh namespace (with its default ServiceAccount) per test, deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    kube_cluster.create_namespace(name)
    yield name
    kube_cluster.api("DELETE", f"/api/v1/namespaces/{name}")


@pytest.fixture(scope="session")
def s3_server(planted: Planted) -> Iterator[S3Server]:
    """An S3-compatible server on loopback, shared by the whole session. Its keys are
    planted: no output of the suite may hold them (tests/leaks.py)."""
    with S3Server(access_key=planted.plant("the S3 server's access key id", "access"),
                  secret_key=planted.plant("the S3 server's secret key", "secret")) as server:
        yield server


@pytest.fixture(scope="session")
def crds(kube_cluster: TestCluster) -> None:
    """Install the chart's CRDs (the one source of truth) and wait until they are served."""
    install_crds(kube_cluster)


def install_crds(kube_cluster: TestCluster) -> None:
    """Install the chart's CRDs on ``kube_cluster`` and wait until they are established."""
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    names = []
    for manifest in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(manifest.read_text())
        names.append(crd["metadata"]["name"])
        try:
            kube_cluster.api("POST", path, crd)
        except ApiError as exc:
            if exc.status != 409:
                raise
    deadline = time.monotonic() + 60
    for name in names:
        while True:
            conditions = (kube_cluster.api("GET", f"{path}/{name}").get("status") or {}).get(
                "conditions") or []
            if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} was not established")
            time.sleep(0.1)
