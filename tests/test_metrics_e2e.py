"""Metrics and health on the real API server: the operator (its own process) and a worker
pod (run by the test kubelet) scraped during and after a real job, the counts compared with
what the job did, and both expositions passed through Prometheus's linter.

The job (tests.jobs.counting) has one worker and one reducer; the reduce's first attempt
fails on purpose and its second waits at a gate file, so the job can be looked at
half-way. To see the worker's *final* counts the operator is paused (SIGSTOP) before the
gate opens: the worker stamps the verdict itself and keeps /metrics up (its linger) until
the operator, resumed, deletes the workers.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from kubemr_async.testing.cluster import TestCluster

from .operator_fixtures import BUCKET, DATA, PROCESSES, kube_namespace, operator, s3
from .test_counters import COUNTING, expected_totals
from .test_metrics import free_port, lint, promlint, scrape_until, value, wait_for_status
from .test_operator_e2e import create_job, echo_job, wait_for_phase

__all__ = ["kube_namespace", "operator", "promlint", "s3"]  # fixtures, used by name

pytestmark = [pytest.mark.kube, pytest.mark.s3, pytest.mark.slow]

PORTS = {"operator": free_port(), "worker": free_port()}


@pytest.fixture(scope="module")
def operator_args() -> list[str]:
    return ["--metrics-port", str(PORTS["operator"]),
            "--worker-metrics-port", str(PORTS["worker"]), "--worker-metrics-linger", "600"]


def test_operator_and_worker_metrics_count_what_the_job_did(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path, s3: Any,
        promlint: str, tmp_path: Path) -> None:
    op = f"http://127.0.0.1:{PORTS['operator']}"
    worker = f"http://127.0.0.1:{PORTS['worker']}/metrics"
    assert wait_for_status(f"{op}/healthz", 200) == "[+]loop ok\nok\n"
    assert wait_for_status(f"{op}/readyz", 200) == "[+]watch ok\nok\n", "the watch listed"

    gate = tmp_path / "gate"
    manifest = echo_job("metrics", [f"s3://{BUCKET}/data/"], splitInputs=True, workers=1,
                        reducers=1, args={"fail": "reduce-00000", "gate": str(gate)})
    manifest["spec"]["job"] = COUNTING
    name = create_job(kube_cluster, kube_namespace, manifest)
    maps = len(list(DATA.iterdir()))  # one split per file
    totals = expected_totals()["kubemr"]

    # Half-way: every map committed, the reduce failed once and waits at the gate.
    text, samples = scrape_until(
        worker, lambda s: value(s, "kubemr_tasks_claimed_total", kind="reduce") == 2)
    lint(promlint, text)
    assert value(samples, "kubemr_tasks_committed_total", kind="map") == maps
    assert value(samples, "kubemr_tasks_committed_total", kind="reduce") == 0
    assert value(samples, "kubemr_tasks_failed_total", kind="reduce") == 1
    assert value(samples, "kubemr_read_bytes_total", source="input") == totals["mapInputBytes"]
    text, samples = scrape_until(
        f"{op}/metrics", lambda s: value(s, "kubemr_operator_jobs", phase="Running") == 1)
    lint(promlint, text)
    assert value(samples, "kubemr_operator_reconciles_total", result="success") >= 1
    assert ("kubemr_operator_workqueue_depth", frozenset()) in samples

    # The end: the worker's final counts, scraped before the operator can stop it.
    process = PROCESSES[operator]
    os.kill(process.pid, signal.SIGSTOP)
    try:
        gate.touch()
        job = wait_for_phase(kube_cluster, kube_namespace, name, operator)
        assert job["status"]["phase"] == "Succeeded", job["status"]
        text, samples = scrape_until(
            worker, lambda s: value(s, "kubemr_tasks_committed_total", kind="reduce") == 1)
    finally:
        os.kill(process.pid, signal.SIGCONT)
    lint(promlint, text)
    committed = sum(value(samples, "kubemr_tasks_committed_total", kind=kind)
                    for kind in ("map", "reduce"))
    assert committed == maps + 1, "one worker committed every task: maps + reduces"
    assert value(samples, "kubemr_tasks_failed_total", kind="reduce") == 1
    assert value(samples, "kubemr_tasks_failed_total", kind="map") == 0
    assert value(samples, "kubemr_read_bytes_total", source="input") == totals["mapInputBytes"]
    assert value(samples, "kubemr_records_written_total", kind="map") == totals[
        "mapOutputRecords"]
    assert value(samples, "kubemr_records_read_total", kind="reduce") == totals[
        "reduceInputRecords"]
    assert value(samples, "kubemr_records_written_total", kind="reduce") == totals[
        "reduceOutputRecords"]
    assert value(samples, "kubemr_task_duration_seconds_count", kind="reduce",
                 outcome="failed") == 1
    assert value(samples, "kubemr_written_bytes_total", sink="output") > 0
    assert value(samples, "kubemr_lease_renewals_total", result="lost") == 0

    # The operator, resumed, sees the verdict, and deletes the workers (ending the linger).
    text, samples = scrape_until(
        f"{op}/metrics", lambda s: value(s, "kubemr_operator_jobs", phase="Succeeded") == 1)
    lint(promlint, text)
    assert value(samples, "kubemr_operator_jobs", phase="Running") == 0
    reconciles = sum(value(samples, "kubemr_operator_reconciles_total", result=result)
                     for result in ("success", "error"))
    assert value(samples, "kubemr_operator_reconcile_duration_seconds_count") == reconciles
    assert value(samples, "kubemr_operator_reconcile_errors_total") == value(
        samples, "kubemr_operator_reconciles_total", result="error")
    wait_until_closed(PORTS["worker"])


def wait_until_closed(port: int, timeout: float = 120.0) -> None:
    """Wait until nothing listens on ``port`` (the worker pod has exited)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except OSError:
            return
        assert time.monotonic() < deadline, f"port {port} still served after {timeout}s"
        time.sleep(0.3)

