"""Fixtures for end-to-end modules that need the product running: the examples bucket, a
namespace per module and `kubemr operator` as its own process watching only there.

Import the fixtures into a test module (``from .operator_fixtures import operator, ...``):
they are module-scoped on purpose, so each module's operator watches its own namespace and
never competes with another module's (the Helm chart test runs one with the chart's own
credentials). Same configuration as tests/test_operator_e2e.py, which predates this file.
"""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from kubemr_async.testing.cluster import ApiError, TestCluster
from kubemr_async.testing.s3server import S3Server

from .test_local_run import KUBEMR, ROOT

DATA = ROOT / "examples" / "data"
BUCKET = "kubemr-examples"
OPERATOR_NS = "kubemr-system"
#: The process behind each running operator's log, for a test that must pause it.
PROCESSES: dict[Path, subprocess.Popen[bytes]] = {}


@pytest.fixture(scope="session")
def s3(s3_server: S3Server) -> Any:
    """A boto3 client; bucket ``kubemr-examples`` holds examples/data under ``data/``."""
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url,
                          aws_access_key_id=s3_server.access_key,
                          aws_secret_access_key=s3_server.secret_key,
                          region_name=s3_server.region)
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=BUCKET)
    for path in sorted(DATA.iterdir()):
        client.put_object(Bucket=BUCKET, Key=f"data/{path.name}", Body=path.read_bytes())
    return client


@pytest.fixture(scope="module")
def kube_namespace(kube_cluster: TestCluster) -> Iterator[str]:
    """This module's namespace, the only one its operator watches."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    kube_cluster.create_namespace(name)
    yield name
    kube_cluster.api("DELETE", f"/api/v1/namespaces/{name}")


@pytest.fixture(scope="module")
def operator(kube_cluster: TestCluster, crds: None, s3_server: S3Server, fake_kubelet: Any,
             kube_namespace: str, operator_args: list[str], platform_namespaces: str,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`kubemr operator` as a separate process, configured as the Helm chart configures it
    (plus ``operator_args``, a fixture a module may override; ``platform_namespaces``
    selects where jobs may use the platform's credentials); yields the path of its log."""
    prepare_operator_namespace(kube_cluster, s3_server)
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    proc = start_operator(kube_cluster, s3_server, kube_namespace, operator_args, log,
                          platform_namespaces)
    PROCESSES[log] = proc
    try:
        yield log
    finally:
        del PROCESSES[log]
        proc.terminate()
        proc.wait(timeout=30)


def prepare_operator_namespace(cluster: TestCluster, s3_server: S3Server) -> None:
    """The operator's namespace and its S3 Secret, and the custom resources served."""
    _create_ignoring_conflict(cluster, "/api/v1/namespaces",
                              {"metadata": {"name": OPERATOR_NS}})
    _create_ignoring_conflict(
        cluster, f"/api/v1/namespaces/{OPERATOR_NS}/secrets",
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kubemr-s3"},
         "stringData": {"AWS_ACCESS_KEY_ID": s3_server.access_key,
                        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}})
    # The operator does not survive a 429 "storage is (re)initializing" to its first list.
    cluster.wait_until_listed([f"/apis/kubemr.io/v1alpha1/{plural}"
                               for plural in ("mapreducejobs", "mapreducetasks")])


def start_operator(cluster: TestCluster, s3_server: S3Server, namespace: str,
                   args: list[str], log: Path,
                   platform_namespaces: str | None = None) -> subprocess.Popen[bytes]:
    """Start `kubemr operator` watching ``namespace``, its output going to ``log``; jobs
    may use the platform's credentials in ``platform_namespaces`` (a label selector;
    default: ``namespace`` itself)."""
    # PYTHONPATH: the operator runs this checkout's code (as the pods do), not whatever the
    # venv's editable install points at (another worktree's).
    env = {"PATH": str(Path(KUBEMR).parent), "PYTHONPATH": str(ROOT),
           "KUBEMR_S3_ENDPOINT": s3_server.endpoint_url,
           "AWS_ACCESS_KEY_ID": s3_server.access_key,
           "AWS_SECRET_ACCESS_KEY": s3_server.secret_key, "AWS_REGION": s3_server.region,
           "KUBEMR_LOG_LEVEL": "DEBUG"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [KUBEMR, "operator", "--kubeconfig", str(cluster.kubeconfig_path),
             "--operator-namespace", OPERATOR_NS, "--s3-secret", "kubemr-s3",
             "--s3-endpoint", s3_server.endpoint_url, "--worker-backoff-limit", "1",
             "--namespace", namespace,
             "--platform-credentials-namespaces",
             platform_namespaces or f"kubernetes.io/metadata.name={namespace}", *args],
            stdout=out, stderr=subprocess.STDOUT, env=env)


def _create_ignoring_conflict(cluster: TestCluster, path: str, body: dict[str, Any]) -> None:
    try:
        cluster.api("POST", path, body)
    except ApiError as exc:
        if exc.status != 409:
            raise
