"""Faults of the control plane under a running job: the kube-apiserver or etcd killed and
started again mid-job. The workers, the operator and the test kubelet must ride the
outage out, and the job must finish exactly: every task run once, nothing lost.

And S3 failing a tenth of its requests (errors, throttling, dropped connections, bodies
cut off) through a whole job.

This module runs a cluster of its own (it kills its servers), with the test kubelet and
the operator on it; S3 is the session's, reached through a fault proxy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubemr_async.testing.cluster import TestCluster
from kubemr_async.testing.faultproxy import FAULTS, FaultProxy, RandomFaults, proxy_in_thread
from kubemr_async.testing.kubelet import FakeKubelet
from kubemr_async.testing.s3server import S3Server

from .fixtures_env import install_crds, running_kubelet
from .leaks import audited_cluster
from .operator_fixtures import (
    BUCKET,
    PROCESSES,
    kube_namespace,
    operator,
    s3,
    start_operator,
)
from .test_operator_e2e import (
    create_job,
    echo_job,
    result_lines,
    wait_for_phase,
    word_counts,
)

__all__ = ["kube_namespace", "operator", "s3"]  # fixtures, used by name

pytestmark = [pytest.mark.kube, pytest.mark.s3, pytest.mark.slow]


@pytest.fixture(scope="module")
def kube_cluster() -> Iterator[TestCluster]:
    with audited_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def crds(kube_cluster: TestCluster) -> None:
    install_crds(kube_cluster)


@pytest.fixture(scope="module")
def fake_kubelet(kube_cluster: TestCluster,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeKubelet]:
    with running_kubelet(kube_cluster, tmp_path_factory.mktemp("pod-logs")) as kubelet:
        yield kubelet


@pytest.fixture(scope="module")
def s3_faults() -> RandomFaults:
    """Off (rate 0) until a test turns it on."""
    return RandomFaults(seed=20261202)


@pytest.fixture(scope="module")
def s3_proxy(s3_server: S3Server, s3_faults: RandomFaults) -> Iterator[FaultProxy]:
    with proxy_in_thread(s3_server.endpoint_url, s3_faults) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def operator_args(s3_proxy: FaultProxy) -> list[str]:
    """The operator's workers reach S3 through the proxy."""
    return ["--s3-endpoint", s3_proxy.endpoint_url]


def _wait_for_map_attempts(log: Path, count: int, started: float) -> None:
    """Wait until the attempt log shows ``count`` map attempts: the job is well under way."""
    while sum(1 for task, _ in _runs(log) if task.startswith("map-")) < count:
        assert time.monotonic() - started < 300, "the job never got going"
        time.sleep(0.1)


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
    _wait_for_map_attempts(log, 50, started)
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
    # The kubelet lived through it too: the workers the operator deletes once the job is
    # done are finished off and removed by the kubelet, which a dead one would never do.
    pods = f"/api/v1/namespaces/{kube_namespace}/pods?labelSelector=kubemr.io%2Fjob%3D{name}"
    while kube_cluster.api("GET", pods)["items"]:
        assert time.monotonic() - finished < 120, "worker pods were never cleaned up"
        time.sleep(0.5)
    print(f"\n{server} down {down:.0f}s after {done_before} attempts: job finished "
          f"{finished - back:.1f}s after the restart, {finished - started:.1f}s in all; "
          f"attempts {sum(runs.values())} for {len(runs)} tasks")


def test_a_job_is_exact_while_s3_fails_a_tenth_of_its_requests(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path, s3: Any,
        s3_faults: RandomFaults) -> None:
    manifest = {"apiVersion": "kubemr.io/v1alpha1", "kind": "MapReduceJob",
                "metadata": {"generateName": "s3faults-"},
                "spec": {"image": "kubemr-tests:dev", "job": "examples.wordcount",
                         "inputs": [f"s3://{BUCKET}/data/"], "chunkSize": 4096,
                         "workers": 3, "reducers": 4, "maxAttempts": 5,
                         "output": f"s3://{BUCKET}/s3faults"}}
    started = time.monotonic()
    with s3_faults.failing(0.10):
        name = create_job(kube_cluster, kube_namespace, manifest)
        job = wait_for_phase(kube_cluster, kube_namespace, name, operator, timeout=900)
    wall = time.monotonic() - started
    assert job["status"]["phase"] == "Succeeded", job["status"]
    assert result_lines(s3, job["status"]["results"]) == word_counts()
    injected = {fault: s3_faults.counts[fault] for fault in FAULTS}
    assert all(injected.values()), f"every kind of fault was injected: {injected}"
    print(f"\nS3 at 10% faults: {s3_faults.counts['requests']} requests, injected "
          f"{injected} ({sum(injected.values())} in all); job {wall:.1f}s; "
          f"maps {job['status'].get('maps')}, reduces 4")


def test_a_paused_worker_pod_is_taken_over_and_its_late_writes_are_refused(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path, s3: Any,
        tmp_path: Path) -> None:
    """A worker pod's process SIGSTOPped while it holds a map, past its lease; another
    worker takes the map over; then the zombie is SIGCONTed with its stale claim."""
    log = tmp_path / "attempts.log"
    inputs = [f"item-{i:04d}" for i in range(40)]
    name = create_job(kube_cluster, kube_namespace, echo_job(
        "zombie", inputs, workers=3, reducers=2, leaseSeconds=3,
        args={"log": str(log), "slow": "map-00005", "slow_seconds": "8"}))
    started = time.monotonic()
    zombie, paused_at, taken_over_after = 0, 0.0, 0.0
    try:
        while not taken_over_after:
            assert time.monotonic() - started < 300, f"no pause and takeover: {_runs(log)}"
            lines = log.read_text().splitlines() if log.exists() else []
            holders = [int(line.split()[2]) for line in lines
                       if line.split()[:2] == ["map-00005", "1"]]
            if holders and not zombie:
                zombie = holders[0]
                os.kill(zombie, signal.SIGSTOP)
                paused_at = time.monotonic()
            elif zombie and ("map-00005", "2") in _runs(log):
                taken_over_after = time.monotonic() - paused_at
                time.sleep(1.0)  # the takeover's quick attempt commits meanwhile
            time.sleep(0.05)
    finally:
        if zombie:
            with contextlib.suppress(ProcessLookupError):
                os.kill(zombie, signal.SIGCONT)
    job = wait_for_phase(kube_cluster, kube_namespace, name, operator, timeout=600)
    assert job["status"]["phase"] == "Succeeded", job["status"]
    merged = sorted(i for part in job["status"]["results"] for i in part.split(","))
    assert merged == inputs  # the zombie's late output is never read
    runs = _runs(log)
    assert sorted(a for t, a in runs if t == "map-00005") == ["1", "2"]
    assert all(count == 1 for count in runs.values())
    print(f"\nzombie pod: holder of map-00005 paused, taken over {taken_over_after:.1f}s "
          f"later (lease 3s); results exact")


# Last in the module: it replaces the module's operator with a new process.
def test_an_operator_killed_mid_job_and_started_again_finishes_it_exactly(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path, s3_server: S3Server,
        operator_args: list[str], tmp_path: Path) -> None:
    log = tmp_path / "attempts.log"
    inputs = [f"item-{i:04d}" for i in range(200)]
    name = create_job(kube_cluster, kube_namespace, echo_job(
        "oprestart", inputs, workers=4, reducers=4, args={"log": str(log), "sleep": "0.05"}))
    started = time.monotonic()
    _wait_for_map_attempts(log, 50, started)
    PROCESSES[operator].kill()
    PROCESSES[operator].wait()
    time.sleep(5.0)
    replacement_log = tmp_path / "operator-2.log"
    replacement = start_operator(kube_cluster, s3_server, kube_namespace, operator_args,
                                 replacement_log)
    try:
        job = wait_for_phase(kube_cluster, kube_namespace, name, replacement_log, timeout=600)
    finally:
        replacement.terminate()
        replacement.wait(timeout=30)
    assert job["status"]["phase"] == "Succeeded", job["status"]
    runs = _runs(log)
    assert all(count == 1 for count in runs.values()), "no task ran twice"
    merged = sorted(i for part in job["status"]["results"] for i in part.split(","))
    assert merged == inputs
    # One set of workers: a second worker Job would have brought pods of its own.
    pids = {line.split()[2] for line in log.read_text().splitlines()}
    assert len(pids) <= 4, f"{len(pids)} worker processes for 4 workers"
    print(f"\noperator SIGKILLed after ~50 attempts, restarted 5 s later: job finished "
          f"{time.monotonic() - started:.1f}s after the first attempts; {len(pids)} worker "
          f"processes; every task run once")
