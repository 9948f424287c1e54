"""The HA operator on the real API server (issue 15): two `kubemr operator` processes elect
a leader on a Lease; only the leader reconciles and is ready.

* SIGKILL of the leader while a job runs: the standby takes over once the lease has run
  out on its clock, the job completes with exactly the right output, and nothing the
  operator makes (worker Job, pods, ServiceAccount, Roles, RoleBindings, Secret copy, task
  namespace, task records) is created twice: every object the API server announced was
  announced with one uid only, watched from before the job until its end.
* SIGTERM of the leader: it releases the lease on its way out (exit 0), so the standby takes
  it at its next try instead of waiting out a lease far longer than the test waits.

The job is tests.jobs.counting, held at a gate file in its reduce so the kill lands
mid-job on purpose.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubemr_async.testing.cluster import TestCluster
from kubemr_async.testing.s3server import S3Server

from .operator_fixtures import (
    BUCKET,
    OPERATOR_NS,
    kube_namespace,
    prepare_operator_namespace,
    s3,
    start_operator,
)
from .test_counters import COUNTING, expected_totals
from .test_metrics import free_port, get, parse, value, wait_for_status
from .test_operator_e2e import (
    create_job,
    echo_job,
    result_lines,
    wait_for_completion,
    wait_for_phase,
    word_counts,
)

__all__ = ["kube_namespace", "s3"]  # fixtures, used by name

pytestmark = [pytest.mark.kube, pytest.mark.s3, pytest.mark.slow]


class Operator:
    """One `kubemr operator` process with leader election, and its HTTP port."""

    def __init__(self, identity: str, proc: subprocess.Popen[bytes], port: int,
                 log: Path) -> None:
        self.identity, self.proc, self.port, self.log = identity, proc, port, log

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def readyz(self) -> tuple[int, str]:
        return get(self.url("/readyz"))


@contextlib.contextmanager
def operator_pair(cluster: TestCluster, s3_server: S3Server, namespace: str, lease: str,
                  tmp_path: Path, duration: int) -> Iterator[tuple[Operator, Operator]]:
    """Two operators on Lease ``lease`` (``duration`` seconds; renewed every 0.5 s, given
    up after 3 s without a renewal), both stopped at the end."""
    prepare_operator_namespace(cluster, s3_server)
    pair: list[Operator] = []
    try:
        for identity in (f"{lease}-a", f"{lease}-b"):
            port, log = free_port(), tmp_path / f"{identity}.log"
            args = ["--metrics-port", str(port), "--leader-elect",
                    "--leader-elect-lease-name", lease, "--leader-elect-identity", identity,
                    "--leader-elect-lease-duration", str(duration),
                    "--leader-elect-renew-deadline", "3", "--leader-elect-retry-period", "0.5"]
            pair.append(Operator(identity, start_operator(cluster, s3_server, namespace,
                                                          args, log), port, log))
        yield pair[0], pair[1]
    finally:
        for op in pair:
            if op.proc.poll() is None:
                op.proc.terminate()
                op.proc.wait(timeout=30)


def holder(cluster: TestCluster, lease: str) -> dict[str, Any]:
    found: dict[str, Any] = cluster.api(
        "GET", f"/apis/coordination.k8s.io/v1/namespaces/{OPERATOR_NS}/leases/{lease}")["spec"]
    return found


def elected(cluster: TestCluster, lease: str, ops: tuple[Operator, ...],
            timeout: float = 120.0) -> tuple[Operator, dict[str, Any]]:
    """Wait until the Lease names one of ``ops`` and that one is ready; it and the Lease."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            spec = holder(cluster, lease)
            leader = next((op for op in ops if op.identity == spec.get("holderIdentity")), None)
            if leader is not None and leader.readyz()[0] == 200:
                return leader, spec
        logs = "\n".join(op.log.read_text(errors="replace")[-1500:] for op in ops)
        assert time.monotonic() < deadline, f"no leader elected; logs:\n{logs}"
        time.sleep(0.1)


class Creations:
    """Every object the API server announces under some collections, from a watch opened
    before the test acts: ``uids[(path, namespace, name)]`` holds each uid announced for a
    name, so an object deleted and created again shows two."""

    def __init__(self, cluster: TestCluster, paths: list[str]) -> None:
        self.uids: dict[tuple[str, str, str], set[str]] = defaultdict(set)
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._ready = threading.Barrier(len(paths) + 1)
        for path in paths:
            threading.Thread(target=self._follow, args=(cluster, path), daemon=True).start()
        self._ready.wait(timeout=30)

    def _follow(self, cluster: TestCluster, path: str) -> None:
        context = ssl.create_default_context(cafile=str(cluster.ca_file))
        conn = http.client.HTTPSConnection("127.0.0.1", cluster.port, context=context)
        # No resourceVersion: the watch starts with an ADDED for every existing object.
        conn.request("GET", f"{path}?watch=true&timeoutSeconds=1800",
                     headers={"Authorization": f"Bearer {cluster.admin_token}"})
        resp = conn.getresponse()
        assert conn.sock is not None
        self._socks.append(conn.sock)
        self._ready.wait(timeout=30)
        try:
            for line in resp:
                event = json.loads(line)
                meta = event["object"]["metadata"]
                with self._lock:
                    self.uids[(path, meta.get("namespace", ""), meta["name"])].add(meta["uid"])
        except (OSError, ValueError, http.client.HTTPException):
            pass  # closed
        finally:
            conn.close()

    def named(self, fragment: str) -> dict[tuple[str, str, str], set[str]]:
        """The names announced whose namespace or name contains ``fragment``."""
        with self._lock:
            return {key: set(uids) for key, uids in self.uids.items()
                    if fragment in key[1] or fragment in key[2]}

    def close(self) -> None:
        """Stop every watch: shutting the sockets down ends the blocked reads (each reader
        then closes its own connection)."""
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def watched(namespace: str) -> list[str]:
    return [f"/apis/batch/v1/namespaces/{namespace}/jobs",
            f"/api/v1/namespaces/{namespace}/pods",
            f"/api/v1/namespaces/{namespace}/serviceaccounts",
            f"/api/v1/namespaces/{namespace}/secrets",
            "/apis/rbac.authorization.k8s.io/v1/roles",  # the job's and its task namespace's
            "/apis/rbac.authorization.k8s.io/v1/rolebindings",
            "/apis/kubemr.io/v1alpha1/mapreducetasks",
            "/api/v1/namespaces"]


def test_the_standby_takes_over_from_a_killed_leader_and_the_job_completes_exactly(
        kube_cluster: TestCluster, crds: None, s3_server: S3Server, fake_kubelet: Any,
        kube_namespace: str, s3: Any, tmp_path: Path) -> None:
    lease = f"ha-{uuid.uuid4().hex[:6]}"
    duration = 6
    with operator_pair(kube_cluster, s3_server, kube_namespace, lease, tmp_path,
                       duration) as ops:
        leader, first = elected(kube_cluster, lease, ops)
        standby = next(op for op in ops if op is not leader)
        creations = Creations(kube_cluster, watched(kube_namespace))
        try:
            gate = tmp_path / "gate"
            manifest = echo_job("ha", [f"s3://{BUCKET}/data/"], splitInputs=True, workers=1,
                                reducers=1, args={"gate": str(gate)})
            manifest["spec"]["job"] = COUNTING
            name = create_job(kube_cluster, kube_namespace, manifest)
            wait_for_phase(kube_cluster, kube_namespace, name, leader.log, ("Running",))
            wait_for_worker_pod(kube_cluster, kube_namespace, name)

            # Before the kill: the leader alone is ready, and alone reconciles.
            code, body = standby.readyz()
            assert (code, body.splitlines()[0]) == (503, "[-]leader failed"), body
            assert get(standby.url("/readyz?exclude=leader&exclude=watch")) == (200, "ok\n")
            assert leader.readyz() == (200, "[+]leader ok\n[+]watch ok\nok\n")
            standby_metrics = parse(get(standby.url("/metrics"))[1])
            assert value(standby_metrics, "kubemr_operator_leader") == 0
            assert value(standby_metrics, "kubemr_operator_reconciles_total",
                         result="success") == 0, "a standby reconciles nothing"
            assert value(parse(get(leader.url("/metrics"))[1]),
                         "kubemr_operator_leader") == 1
            before = holder(kube_cluster, lease)

            leader.proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            leader.proc.wait(timeout=30)
            new_leader, taken = elected(kube_cluster, lease, (standby,))
            takeover = time.monotonic() - killed
            print(f"takeover after SIGKILL: {takeover:.2f}s (lease {duration}s)")
            assert taken["leaseTransitions"] == first["leaseTransitions"] + 1
            assert taken["acquireTime"] > before["renewTime"], "taken after the last renewal"
            assert new_leader.readyz() == (200, "[+]leader ok\n[+]watch ok\nok\n")

            gate.touch()
            job = wait_for_phase(kube_cluster, kube_namespace, name, standby.log)
            assert job["status"]["phase"] == "Succeeded", job["status"]
            status = wait_for_completion(kube_cluster, kube_namespace, name)  # the new leader
            assert status["counters"] == expected_totals(), "every task counted exactly once"
            assert result_lines(s3, status["results"]) == word_counts()
            assert value(parse(get(standby.url("/metrics"))[1]),
                         "kubemr_operator_reconciles_total", result="success") >= 1
            mine = creations.named(name)
        finally:
            creations.close()
    twice = {key: uids for key, uids in mine.items() if len(uids) > 1}
    assert not twice, f"created more than once: {twice}"
    kinds = {key[0].rsplit("/", 1)[1] for key in mine}
    assert kinds >= {"jobs", "pods", "serviceaccounts", "secrets", "roles", "rolebindings",
                     "mapreducetasks", "namespaces"}, f"the watch saw them all: {sorted(mine)}"
    pods = [key for key in mine if key[0].endswith("/pods")]
    assert len(pods) == 1, f"one worker pod, never replaced: {pods}"


def wait_for_worker_pod(cluster: TestCluster, namespace: str, job: str,
                        timeout: float = 120.0) -> None:
    """Wait until the job's worker pod runs (the operator has made every worker object)."""
    deadline = time.monotonic() + timeout
    while True:
        pods = cluster.api("GET", f"/api/v1/namespaces/{namespace}/pods")["items"]
        if any(job in pod["metadata"]["name"] and pod.get("status", {}).get("phase")
               == "Running" for pod in pods):
            return
        assert time.monotonic() < deadline, f"no running worker pod for {job}: {pods}"
        time.sleep(0.2)


def test_a_leader_stopped_by_sigterm_releases_the_lease_and_the_standby_takes_it_at_once(
        kube_cluster: TestCluster, crds: None, s3_server: S3Server, kube_namespace: str,
        tmp_path: Path) -> None:
    lease = f"ha-{uuid.uuid4().hex[:6]}"
    # A lease far longer than the wait below: only the release can hand it on in time.
    with operator_pair(kube_cluster, s3_server, kube_namespace, lease, tmp_path,
                       duration=600) as ops:
        leader, first = elected(kube_cluster, lease, ops)
        standby = next(op for op in ops if op is not leader)
        assert wait_for_status(standby.url("/readyz"), 503).startswith("[-]leader failed")
        leader.proc.send_signal(signal.SIGTERM)
        assert leader.proc.wait(timeout=30) == 0, "a clean stop"
        assert "released the leader lease" in leader.log.read_text()
        new_leader, taken = elected(kube_cluster, lease, (standby,), timeout=60)
        assert taken["leaseTransitions"] == first["leaseTransitions"] + 1
        assert taken["leaseDurationSeconds"] == 600
        assert new_leader.readyz() == (200, "[+]leader ok\n[+]watch ok\nok\n")
