"""Faults of the control plane under a running job: the kube-apiserver or etcd killed and
started again mid-job. The workers, the operator and the test kubelet must ride the
outage out, and the job must finish exactly: every task run once, nothing lost.

This module runs a cluster of its own (it kills its servers), with the test kubelet and
the operator on it; S3 is the session's.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubemr_async.testing.cluster import TestCluster
from kubemr_async.testing.kubelet import FakeKubelet

from .fixtures_env import install_crds, running_kubelet
from .operator_fixtures import kube_namespace, operator, s3
from .test_operator_e2e import create_job, echo_job, wait_for_phase

__all__ = ["kube_namespace", "operator", "s3"]  # fixtures, used by name

pytestmark = [pytest.mark.kube, pytest.mark.s3, pytest.mark.slow]


@pytest.fixture(scope="module")
def kube_cluster() -> Iterator[TestCluster]:
    with TestCluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def crds(kube_cluster: TestCluster) -> None:
    install_crds(kube_cluster)


@pytest.fixture(scope="module")
def fake_kubelet(kube_cluster: TestCluster,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeKubelet]:
    with running_kubelet(kube_cluster, tmp_path_factory.mktemp("pod-logs")) as kubelet:
        yield kubelet


def _runs(log: Path) -> Counter[tuple[str, str]]:
    lines = log.read_text().splitlines() if log.exists() else []
    return Counter((line.split()[0], line.split()[1]) for line in lines)


@pytest.mark.parametrize(("server", "down"), [("kube-apiserver", 5.0),
                                              ("kube-apiserver", 60.0), ("etcd", 5.0)])
def test_a_job_rides_out_a_control_plane_restart(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path, s3: Any,
        tmp_path: Path, server: str, down: float) -> None:
    log = tmp_path / "attempts.log"
    inputs = [f"item-{i:04d}" for i in range(200)]
    started = time.monotonic()
    name = create_job(kube_cluster, kube_namespace, echo_job(
        "outage", inputs, workers=4, reducers=4, args={"log": str(log), "sleep": "0.05"}))
    while sum(1 for task, _ in _runs(log) if task.startswith("map-")) < 50:
        assert time.monotonic() - started < 300, "the job never got going"
        time.sleep(0.1)
    done_before = len(_runs(log))
    with kube_cluster.outage(server):  # type: ignore[arg-type]
        time.sleep(down)
    back = time.monotonic()
    job = wait_for_phase(kube_cluster, kube_namespace, name, operator, timeout=900)
    finished = time.monotonic()
    assert job["status"]["phase"] == "Succeeded", job["status"]
    runs = _runs(log)
    assert sorted(task for task, _ in runs if task.startswith("map-")) == [
        f"map-{i:05d}" for i in range(200)]
    twice = {task: count for task, count in Counter(task for task, _ in runs).items()
             if count > 1}
    assert twice == {}, f"tasks that ran more than once: {twice}"
    merged = sorted(i for part in job["status"]["results"] for i in part.split(","))
    assert merged == inputs  # nothing lost, nothing duplicated
    print(f"\n{server} down {down:.0f}s after {done_before} attempts: job finished "
          f"{finished - back:.1f}s after the restart, {finished - started:.1f}s in all; "
          f"attempts {sum(runs.values())} for {len(runs)} tasks")
