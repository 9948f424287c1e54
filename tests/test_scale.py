"""Scale: a 10,000-map-task job through the whole product on the real API server.

The operator (its own process watching this module's namespace, from the shared fixtures
of tests/operator_fixtures.py) plans the job and starts a 4-pod worker Job; the test
kubelet runs the pods as `kubemr worker` processes with their ServiceAccount tokens.
Nothing is mocked and nothing is shortened: every task is one MapReduceTask object,
claimed and committed through JSON-Patch tests.

A Succeeded job's task objects are deleted by the operator right after the verdict, so the
test follows the task namespace with its own watch from before the job exists and keeps
each task's last state: "reading all task objects at the end", without racing the clean-up.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubemr_async.state.kube import task_namespace_for
from kubemr_async.testing.cluster import ApiError, TestCluster

from .operator_fixtures import kube_namespace, operator

__all__ = ["kube_namespace", "operator"]  # fixtures used by name
# The shared operator fixture configures workers with the session's S3 server; this job
# never touches it (workers open their S3 client lazily).
pytestmark = [pytest.mark.kube, pytest.mark.s3, pytest.mark.slow]

GROUP_PATH = "/apis/kubemr.io/v1alpha1"
BIG = 10_000
SMALL = 10
WORKERS = 4
#: The task whose object is compared between the small and the big job.
PROBE = 7


def jobs_path(namespace: str, name: str = "") -> str:
    return f"{GROUP_PATH}/namespaces/{namespace}/mapreducejobs" + (f"/{name}" if name else "")


class TaskRecorder:
    """Keeps the latest state of every MapReduceTask in one namespace, via a raw watch.

    Started before the job exists, so it sees every task from its creation; DELETED events
    (the operator's clean-up) only mark a task as gone and keep its last written state.
    Plain HTTPS as admin: independent of the code under test.
    """

    def __init__(self, cluster: TestCluster, namespace: str) -> None:
        self.cluster = cluster
        self.path = f"{GROUP_PATH}/namespaces/{namespace}/mapreducetasks"
        self.latest: dict[str, dict[str, Any]] = {}
        self.deleted: set[str] = set()
        self.events = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._conn: http.client.HTTPSConnection | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._follow, name="task-recorder", daemon=True)

    def __enter__(self) -> TaskRecorder:
        # The first connection is made here: once the server answered, the watch is
        # registered, and the caller may create the job.
        self._resp = self._open("")
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        conn = self._conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader
        self._thread.join(timeout=30)

    def _open(self, version: str) -> http.client.HTTPResponse:
        context = ssl.create_default_context(cafile=str(self.cluster.ca_file))
        query = "watch=1&allowWatchBookmarks=true&timeoutSeconds=90"
        if version:
            query += f"&resourceVersion={version}"
        deadline = time.monotonic() + 60
        while True:
            self._conn = http.client.HTTPSConnection("127.0.0.1", self.cluster.port,
                                                     context=context, timeout=120)
            self._conn.request("GET", f"{self.path}?{query}",
                               headers={"Authorization": f"Bearer {self.cluster.admin_token}"})
            resp = self._conn.getresponse()
            if resp.status == 200:
                return resp
            body = resp.read().decode(errors="replace")
            self._conn.close()
            # 429 "storage is (re)initializing": a freshly installed CRD's watch cache.
            if resp.status != 429 or time.monotonic() > deadline:
                raise ApiError(resp.status, "WATCH", self.path, body)
            time.sleep(0.5)

    def _follow(self) -> None:
        version = ""
        resp = self._resp
        try:
            while not self._stopping.is_set():
                for line in resp:
                    event = json.loads(line)
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        raise AssertionError(f"task watch failed: {obj}")
                    version = obj["metadata"]["resourceVersion"]
                    if event["type"] == "BOOKMARK":
                        continue
                    with self._lock:
                        self.events += 1
                        name = obj["metadata"]["name"]
                        if event["type"] == "DELETED":
                            self.deleted.add(name)
                        else:
                            self.latest[name] = obj
                if not self._stopping.is_set():  # the server ended the watch: resume
                    resp = self._open(version)
        except BaseException as exc:
            if not self._stopping.is_set():
                self._error = exc

    def wait_for(self, done: Callable[[dict[str, dict[str, Any]]], bool],
                 timeout: float) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            if self._error is not None:
                raise self._error
            with self._lock:
                snapshot = dict(self.latest)
            if done(snapshot):
                return snapshot
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(snapshot)} tasks seen after {timeout}s")
            time.sleep(0.2)


@dataclass
class Finished:
    """A job the operator ran to the end, with the last state of each of its tasks."""

    name: str
    status: dict[str, Any]
    tasks: dict[str, dict[str, Any]]
    inputs: list[str]
    attempts_log: Path
    seconds: float


def run_echo_job(cluster: TestCluster, namespace: str, operator_log: Path, count: int,
                 scratch: Path, timeout: float) -> Finished:
    # Same-length names and inputs at every size, so the objects are comparable.
    name = f"scale-{uuid.uuid4().hex[:6]}"
    inputs = [f"item-{i:06d}" for i in range(count)]
    attempts_log = scratch / f"{name}.attempts"
    manifest = {"apiVersion": "kubemr.io/v1alpha1", "kind": "MapReduceJob",
                "metadata": {"name": name},
                "spec": {"image": "kubemr-tests:dev", "job": "tests.jobs.attempts",
                         "inputs": inputs, "splitInputs": False, "reducers": 1,
                         "workers": WORKERS, "output": "s3://kubemr-scale/echo",
                         "args": {"log": str(attempts_log)}}}
    started = time.monotonic()
    with TaskRecorder(cluster, task_namespace_for(namespace, name)) as recorder:
        cluster.api("POST", jobs_path(namespace), manifest)
        deadline = started + timeout
        while True:
            status = cluster.api("GET", jobs_path(namespace, name)).get("status") or {}
            if status.get("phase") in ("Succeeded", "Failed", "Cancelled"):
                break
            if time.monotonic() > deadline:
                tail = operator_log.read_text(errors="replace")[-3000:]
                raise AssertionError(f"job {name} stuck: {status}; operator log:\n{tail}")
            time.sleep(0.5)
        seconds = time.monotonic() - started
        assert status["phase"] == "Succeeded", status
        # The verdict needs every task committed; the recorder may lag a little behind.
        tasks = recorder.wait_for(
            lambda seen: len(seen) == count + 1 and all(
                t["status"]["state"] == "committed" for t in seen.values()),
            timeout=120)
    print(f"\n{count} map tasks: Succeeded {seconds:.1f}s after submission "
          f"({1000 * seconds / count:.1f} ms per task)")
    cluster.api("DELETE", jobs_path(namespace, name))
    return Finished(name, status, tasks, inputs, attempts_log, seconds)


@pytest.fixture(scope="module")
def small_job(kube_cluster: TestCluster, kube_namespace: str, operator: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Finished:
    return run_echo_job(kube_cluster, kube_namespace, operator, SMALL,
                        tmp_path_factory.mktemp("scale-small"), timeout=120)


@pytest.fixture(scope="module")
def big_job(kube_cluster: TestCluster, kube_namespace: str, operator: Path,
            small_job: Finished, tmp_path_factory: pytest.TempPathFactory) -> Finished:
    # After the small job, so the two never share the machine.
    return run_echo_job(kube_cluster, kube_namespace, operator, BIG,
                        tmp_path_factory.mktemp("scale-big"), timeout=900)


def test_ten_thousand_map_tasks_each_commit_exactly_once(big_job: Finished) -> None:
    tasks = [t["status"] for t in big_job.tasks.values()]
    maps = sorted((t for t in tasks if t["kind"] == "map"), key=lambda t: t["index"])
    reduces = [t for t in tasks if t["kind"] == "reduce"]
    assert [t["index"] for t in maps] == list(range(BIG)) and len(reduces) == 1
    not_first_try = [(t["kind"], t["index"], t["state"], t["attempt"], t["failures"])
                     for t in tasks
                     if (t["state"], t["attempt"], t["failures"]) != ("committed", 1, 0)]
    # Nothing failed, so every task committed its first attempt.
    assert not not_first_try, not_first_try[:10]
    wrong = [t["index"] for t in maps if t["outputs"] != {"0": big_job.inputs[t["index"]]}]
    assert not wrong, f"maps that did not commit their own input: {wrong[:10]}"
    # Executions as the job itself logged them, independent of what the store says.
    runs = Counter(tuple(line.split()[:2])
                   for line in big_job.attempts_log.read_text().splitlines())
    assert len(runs) == BIG + 1 and set(runs.values()) == {1}, "each task ran exactly once"
    assert all(attempt == "1" for _, attempt in runs)
    assert big_job.status["maps"] == BIG
    merged = big_job.status["results"][0].split(",")
    assert merged == big_job.inputs, "the result holds every input exactly once, in order"


def test_a_task_object_does_not_grow_with_the_job(small_job: Finished,
                                                  big_job: Finished) -> None:
    def probe(job: Finished) -> dict[str, Any]:
        return job.tasks[f"{job.name}-map-{PROBE:05d}"]

    def size(obj: dict[str, Any]) -> int:
        return len(json.dumps(obj, separators=(",", ":")))

    def without_version(obj: dict[str, Any]) -> dict[str, Any]:
        # resourceVersion counts writes cluster-wide: its digits are no property of the job.
        return {**obj, "metadata": {k: v for k, v in obj["metadata"].items()
                                    if k != "resourceVersion"}}

    small, big = probe(small_job), probe(big_job)
    assert size(small["status"]) == size(big["status"]), (small["status"], big["status"])
    assert size(without_version(small)) == size(without_version(big))
    largest = max(size(t) for t in big_job.tasks.values() if t["status"]["kind"] == "map")
    # Map records differ only by the digits of their own index.
    assert largest <= size(small) + 8, largest
    assert largest < 4096, "a task object is a few hundred bytes, far below etcd's 1.5 MiB"
