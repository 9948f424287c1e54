"""The warm pool on the real API server: standby workers, adopted by new jobs.

The operator (its own process, tests/operator_fixtures.py) keeps one standby running in a
pool namespace of this module's; a job that would run exactly the standby's pod adopts it
and runs with no pod of its own, any other job starts cold, a standby can read nothing but
its own pod until a job adopts it, and a standby lost mid-job is replaced by the job's own
pods.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from kubemr_async.kube import NAMESPACES, PODS, SERVICE_ACCOUNTS, Kube
from kubemr_async.operator import OperatorConfig
from kubemr_async.operator.pool import WarmPool
from kubemr_async.operator.resources import standby_account, standby_pod
from kubemr_async.testing.cluster import ApiError, TestCluster
from kubemr_async.testing.kubelet import FakeKubelet
from kubemr_async.testing.s3server import S3Server

from .operator_fixtures import OPERATOR_NS, PROCESSES, kube_namespace, operator, s3, start_operator
from .test_cli import Cli, cli, completed, wait_for
from .test_cluster_order import (
    test_a_total_order_job_sorts_globally_on_a_cluster as sort_globally,
)
from .test_cluster_steps import result_lines, submit_three_steps
from .test_local_run import KUBEMR
from .test_operator_e2e import create_job, echo_job, events_for, wait_for_phase
from .test_steps import three_steps_reference

__all__ = ["cli", "kube_namespace", "operator", "s3"]  # fixtures, used by name

pytestmark = [pytest.mark.kube, pytest.mark.s3, pytest.mark.slow]

POOL_NS = f"pool-{uuid.uuid4().hex[:8]}"
IMAGE = "kubemr-tests:dev"  # echo_job's image: the jobs that may adopt a standby
STANDBYS = "app.kubernetes.io/component=standby"


@pytest.fixture(scope="module")
def operator_args(kube_cluster: TestCluster) -> Any:
    yield ["--warm-workers", "1", "--warm-image", IMAGE, "--pool-namespace", POOL_NS]
    kube_cluster.api("DELETE", f"/api/v1/namespaces/{POOL_NS}")


def pool_pods(cluster: TestCluster) -> list[dict[str, Any]]:
    listing = cluster.api("GET", f"/api/v1/namespaces/{POOL_NS}/pods?labelSelector={STANDBYS}")
    return [pod for pod in listing["items"] if not pod["metadata"].get("deletionTimestamp")]


def waiting_standby(cluster: TestCluster, kubelet: FakeKubelet) -> str:
    """The name of a standby that is running and says it is waiting for a job."""
    def ready() -> str | None:
        for pod in pool_pods(cluster):
            name = pod["metadata"]["name"]
            log = kubelet.log_dir / POOL_NS / f"{name}.log"
            if ("kubemr.io/adopted-by" not in (pod["metadata"].get("annotations") or {})
                    and log.exists() and "standby waiting" in log.read_text()):
                return str(name)
        return None
    return str(wait_for("a waiting standby", ready))


def standby_at_work(cluster: TestCluster, namespace: str, kubelet: FakeKubelet,
                    attempts: Path, prefix: str, sleep: float) -> tuple[str, str]:
    """A waiting standby, and a one-worker job (maps of ``sleep`` seconds, logged to
    ``attempts``) created to adopt it, once the standby runs its first map."""
    standby = waiting_standby(cluster, kubelet)
    name = create_job(cluster, namespace, echo_job(
        prefix, ["p", "q"], workers=1, reducers=1,
        args={"log": str(attempts), "sleep": str(sleep)}))
    wait_for("the standby's first attempt", lambda: attempts.exists()
               and attempts.read_text().strip())
    return standby, name


def gone(cluster: TestCluster, path: str) -> bool:
    try:
        cluster.api("GET", path)
    except ApiError as exc:
        if exc.status == 404:
            return True
        raise
    return False


def job_pod_logs(kubelet: FakeKubelet, namespace: str, name: str) -> list[Path]:
    """The log files of every pod the job's own batch Job ever ran (the kubelet keeps
    them after the pods are deleted)."""
    return sorted((kubelet.log_dir / namespace).glob(f"{name}-workers-*.log"))


def allowed(cluster: TestCluster, account: str, verb: str, resource: str, namespace: str,
            name: str = "", group: str = "") -> bool:
    """What RBAC lets ServiceAccount ``account`` of the pool namespace do (a
    SubjectAccessReview, as the API server's authorizer answers it)."""
    review = cluster.api("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": f"system:serviceaccount:{POOL_NS}:{account}",
                 "groups": ["system:serviceaccounts", f"system:serviceaccounts:{POOL_NS}"],
                 "resourceAttributes": {"verb": verb, "resource": resource, "group": group,
                                        "namespace": namespace, "name": name}}})
    return bool(review["status"].get("allowed"))


def test_a_new_job_adopts_the_standby_and_starts_no_pod_of_its_own(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path,
        fake_kubelet: FakeKubelet) -> None:
    standby = waiting_standby(kube_cluster, fake_kubelet)
    # Before it is adopted, the standby's account reaches its own pod and nothing else.
    assert allowed(kube_cluster, standby, "watch", "pods", POOL_NS, standby)
    assert not allowed(kube_cluster, standby, "get", "pods", POOL_NS, "another-pod")
    assert not allowed(kube_cluster, standby, "get", "secrets", POOL_NS, "kubemr-standby-s3")
    assert not allowed(kube_cluster, standby, "list", "mapreducejobs", kube_namespace,
                       group="kubemr.io")

    name = create_job(kube_cluster, kube_namespace, echo_job(
        "adopting", ["a", "b", "c"], workers=1, reducers=1))
    job = wait_for_phase(kube_cluster, kube_namespace, name, operator)
    assert job["status"]["phase"] == "Succeeded", job["status"]
    assert job["status"]["results"] == ["a,b,c"]
    log = fake_kubelet.logs(POOL_NS, standby)
    assert "standby adopted" in log and name in log, log[-2000:]
    assert job_pod_logs(fake_kubelet, kube_namespace, name) == [], \
        "a one-worker job that adopted a standby runs no pod of its own"
    adopted = [e["message"] for e in events_for(kube_cluster, kube_namespace, name)
               if e["reason"] == "Adopted"]
    assert adopted == [f"standby worker {standby} (namespace {POOL_NS}) works as one of "
                       "its workers"], "the job's Events say where its worker's log is"
    # The job's RoleBindings named the standby's account beside the job's own.
    binding = kube_cluster.api("GET", f"/apis/rbac.authorization.k8s.io/v1/namespaces/"
                               f"{kube_namespace}/rolebindings/kubemr-worker-{name}")
    assert {"kind": "ServiceAccount", "name": standby, "namespace": POOL_NS} in \
        binding["subjects"]
    # A standby serves one job: it is removed with its account, and a fresh one (another
    # name, so no RoleBinding of the decided job names it) waits in its place.
    wait_for("the adopted standby's removal", lambda: gone(
        kube_cluster, f"/api/v1/namespaces/{POOL_NS}/pods/{standby}"))
    wait_for("the adopted standby's account's removal", lambda: gone(
        kube_cluster, f"/api/v1/namespaces/{POOL_NS}/serviceaccounts/{standby}"))
    assert waiting_standby(kube_cluster, fake_kubelet) != standby


def test_a_job_whose_pod_would_differ_starts_cold(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path,
        fake_kubelet: FakeKubelet) -> None:
    """A template overlay (resources, here) makes the job's pod other than a standby's:
    the standby is left waiting and the job runs on its own pods."""
    standby = waiting_standby(kube_cluster, fake_kubelet)
    manifest = echo_job("shaped", ["x", "y"], workers=1, reducers=1)
    manifest["spec"]["template"] = {"spec": {"containers": [
        {"name": "worker", "resources": {"limits": {"memory": "1Gi"}}}]}}
    name = create_job(kube_cluster, kube_namespace, manifest)
    job = wait_for_phase(kube_cluster, kube_namespace, name, operator)
    assert job["status"]["phase"] == "Succeeded", job["status"]
    assert len(job_pod_logs(fake_kubelet, kube_namespace, name)) == 1
    pods = {pod["metadata"]["name"]: pod for pod in pool_pods(kube_cluster)}
    assert standby in pods, "the standby was not taken"
    assert "kubemr.io/adopted-by" not in (pods[standby]["metadata"].get("annotations") or {})


def test_a_standby_lost_mid_job_is_replaced_by_the_jobs_own_pod(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path,
        fake_kubelet: FakeKubelet, tmp_path: Path) -> None:
    standby, name = standby_at_work(kube_cluster, kube_namespace, fake_kubelet,
                                    tmp_path / "attempts.log", "orphaned", sleep=2)
    assert job_pod_logs(fake_kubelet, kube_namespace, name) == []
    kube_cluster.api("DELETE", f"/api/v1/namespaces/{POOL_NS}/pods/{standby}")
    job = wait_for_phase(kube_cluster, kube_namespace, name, operator)
    assert job["status"]["phase"] == "Succeeded", job["status"]
    assert job["status"]["results"] == ["p,q"]
    assert len(job_pod_logs(fake_kubelet, kube_namespace, name)) == 1, \
        "the job's own pod took the lost standby's place"


@pytest.mark.anyio
async def test_a_standby_that_cannot_start_is_never_adopted_nor_replaced_in_a_hot_loop(
        kube_cluster: TestCluster, fake_kubelet: FakeKubelet,
        caplog: pytest.LogCaptureFixture) -> None:
    """A pool whose standbys die before any job (here their command exits 3, as a bad
    image's would) starts the next one only after a growing wait, and says why; a standby
    that is not running is never adopted (a job would be a worker short behind it)."""
    namespace = f"pool-{uuid.uuid4().hex[:8]}"
    config = OperatorConfig(warm_workers=1, warm_image=IMAGE, pool_namespace=namespace,
                            worker_command=["sh", "-c", "exit 3"])
    lost: list[tuple[str, str]] = []
    try:
        async with await Kube.connect(str(kube_cluster.kubeconfig_path)) as kube:
            pool = WarmPool(kube, config, lost.append)
            await kube.create(NAMESPACES, {"metadata": {"name": namespace}})
            await pool.refill()
            (first,) = [p["metadata"]["name"] for p in pool_pods_in(kube_cluster, namespace)]
            job = {"metadata": {"name": "j", "namespace": "team", "uid": "u-1"}}
            wait_for("the standby's end", lambda: phase_of(
                kube_cluster, namespace, first) == "Failed")
            none = REGISTRY.get_sample_value("kubemr_operator_adoptions_total",
                                             {"result": "none"}) or 0
            assert await pool.adopt(job, fresh=True) is None, "an ended standby is not adopted"
            assert REGISTRY.get_sample_value("kubemr_operator_adoptions_total",
                                             {"result": "none"}) == none + 1
            await pool.refill()  # removes it, and waits before the next
            await pool.refill()
            assert pool_pods_in(kube_cluster, namespace) == []
            assert REGISTRY.get_sample_value("kubemr_operator_standbys",
                                             {"state": "waiting"}) == 0
            assert "a standby ended before any job adopted it" in caplog.text
            assert lost == []
            # A standby that never runs (no node takes it) is not adopted either.
            pending = standby_pod("kubemr-standby-pending", namespace, config, None)
            pending["spec"]["nodeSelector"] = {"kubemr.io/no-such-node": "x"}
            await kube.create(SERVICE_ACCOUNTS, standby_account(
                "kubemr-standby-pending", namespace), namespace)
            await kube.create(PODS, pending, namespace)
            assert await pool.adopt(job, fresh=True) is None
    finally:
        kube_cluster.api("DELETE", f"/api/v1/namespaces/{namespace}")


def pool_pods_in(cluster: TestCluster, namespace: str) -> list[dict[str, Any]]:
    listing = cluster.api("GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector={STANDBYS}")
    return [pod for pod in listing["items"] if not pod["metadata"].get("deletionTimestamp")]


def phase_of(cluster: TestCluster, namespace: str, name: str) -> str:
    pod = cluster.api("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
    return str((pod.get("status") or {}).get("phase"))


def test_kubemr_logs_of_a_job_shows_its_adopted_standby(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path,
        fake_kubelet: FakeKubelet, tmp_path: Path) -> None:
    """The standby runs in the pool's namespace, not the job's: `kubemr logs` finds it
    through the job's Adopted Event (its related pod) and reads it beside the job's own."""
    standby = waiting_standby(kube_cluster, fake_kubelet)
    attempts = tmp_path / "attempts.log"
    name = create_job(kube_cluster, kube_namespace, echo_job(
        "logged", ["x"], workers=1, reducers=1, args={"log": str(attempts), "sleep": "8"}))
    wait_for("the standby's first attempt", lambda: attempts.exists()
               and attempts.read_text().strip())
    printed = subprocess.run(
        [KUBEMR, "logs", name, "-n", kube_namespace,
         "--kubeconfig", str(kube_cluster.kubeconfig_path)],
        capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    lines = [line for line in printed.stdout.splitlines()
             if line.startswith(f"[pod/{standby}/worker] ")]
    assert any("claimed" in line and name in line for line in lines), printed.stdout[-2000:]
    # A tenant who may read its own namespace's pods, logs and Events, not the pool's, is
    # told where the standby's log is instead of finding nothing.
    reader = tenant_kubeconfig(kube_cluster, kube_namespace, tmp_path)
    printed = subprocess.run([KUBEMR, "logs", name, "-n", kube_namespace,
                              "--kubeconfig", str(reader)],
                             capture_output=True, text=True, timeout=120)
    assert (f"kubemr: note: the standby worker {standby} that job {name} adopted runs in "
            f"namespace {POOL_NS}, whose logs you may not read") in printed.stderr
    job = wait_for_phase(kube_cluster, kube_namespace, name, operator)
    assert job["status"]["phase"] == "Succeeded", job["status"]


def tenant_kubeconfig(cluster: TestCluster, namespace: str, directory: Path) -> Path:
    """A kubeconfig for a ServiceAccount of ``namespace`` that may read its jobs, pods,
    their logs and Events there, and nothing in the pool's namespace."""
    return cluster.account_with(namespace, "log-reader", [
        {"apiGroups": ["kubemr.io"], "resources": ["mapreducejobs"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["pods", "pods/log", "events"],
         "verbs": ["get", "list"]}], directory / "reader.kubeconfig")[1]


def standby_objects(cluster: TestCluster, name: str) -> list[str]:
    """Which of standby ``name``'s objects (pod, account, Role, RoleBinding) still exist."""
    paths = {"pod": f"/api/v1/namespaces/{POOL_NS}/pods/{name}",
             "serviceaccount": f"/api/v1/namespaces/{POOL_NS}/serviceaccounts/{name}",
             "role": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{POOL_NS}/roles/{name}",
             "rolebinding": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{POOL_NS}"
                            f"/rolebindings/{name}"}
    return [kind for kind, path in paths.items() if not gone(cluster, path)]


def test_a_three_worker_job_adopts_one_standby_and_runs_each_task_once(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path,
        fake_kubelet: FakeKubelet, tmp_path: Path) -> None:
    standby = waiting_standby(kube_cluster, fake_kubelet)
    attempts = tmp_path / "attempts.log"
    inputs = [f"in{i}" for i in range(9)]
    name = create_job(kube_cluster, kube_namespace, echo_job(
        "three", inputs, workers=3, reducers=2, args={"log": str(attempts)}))
    workers = wait_for("the batch Job", lambda: not gone(
        kube_cluster, f"/apis/batch/v1/namespaces/{kube_namespace}/jobs/{name}-workers")
        and kube_cluster.api("GET", f"/apis/batch/v1/namespaces/{kube_namespace}/jobs/"
                             f"{name}-workers"))
    assert (workers["spec"]["parallelism"], workers["spec"]["completions"]) == (2, 3)
    job = wait_for_phase(kube_cluster, kube_namespace, name, operator)
    assert job["status"]["phase"] == "Succeeded", job["status"]
    expected = [",".join(sorted(i for n, i in enumerate(inputs) if n % 2 == p))
                for p in range(2)]
    assert job["status"]["results"] == expected
    lines = attempts.read_text().split()
    tasks = lines[0::3]
    assert sorted(tasks) == sorted(set(tasks)), f"a task ran twice: {lines}"
    assert "standby adopted" in fake_kubelet.logs(POOL_NS, standby)
    wait_for("the standby's objects' removal",
               lambda: standby_objects(kube_cluster, standby) == [])
    assert waiting_standby(kube_cluster, fake_kubelet) != standby


def test_a_job_deleted_while_it_holds_a_standby_leaves_nothing_behind(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path,
        fake_kubelet: FakeKubelet, tmp_path: Path) -> None:
    standby, name = standby_at_work(kube_cluster, kube_namespace, fake_kubelet,
                                    tmp_path / "attempts.log", "deleted", sleep=30)
    kube_cluster.api("DELETE", f"/apis/kubemr.io/v1alpha1/namespaces/{kube_namespace}/"
                               f"mapreducejobs/{name}")
    wait_for("the job's removal", lambda: gone(
        kube_cluster, f"/apis/kubemr.io/v1alpha1/namespaces/{kube_namespace}/"
                      f"mapreducejobs/{name}"), timeout=60)
    wait_for("the standby's objects' removal",
               lambda: standby_objects(kube_cluster, standby) == [], timeout=60)
    assert waiting_standby(kube_cluster, fake_kubelet) != standby


def test_jobs_created_at_once_each_adopt_their_own_standby_or_run_cold(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path,
        fake_kubelet: FakeKubelet) -> None:
    """Three jobs at once, one standby waiting (the pool refills meanwhile, so a later
    job may adopt the next one): no standby serves two jobs, an adopter starts no pod of
    its own (not even once its standby has exited with the verdict), the rest run cold."""
    waiting_standby(kube_cluster, fake_kubelet)
    names = [create_job(kube_cluster, kube_namespace, echo_job(
        f"race{i}", ["a", "b"], workers=1, reducers=1)) for i in range(3)]
    for name in names:
        job = wait_for_phase(kube_cluster, kube_namespace, name, operator)
        assert job["status"]["phase"] == "Succeeded", job["status"]
        assert job["status"]["results"] == ["a,b"]
    adopted = {name: e["message"].split()[2] for name in names
               for e in events_for(kube_cluster, kube_namespace, name)
               if e["reason"] == "Adopted"}
    assert adopted and len(set(adopted.values())) == len(adopted), adopted
    for standby in adopted.values():
        assert fake_kubelet.logs(POOL_NS, standby).count("standby adopted") == 1
    time.sleep(1)  # a pod started for a decided job would have a log by now
    assert [n for n in names if job_pod_logs(fake_kubelet, kube_namespace, n)] == [
        n for n in names if n not in adopted], adopted


def test_a_failing_job_that_adopted_a_standby_fails_and_releases_it(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path,
        fake_kubelet: FakeKubelet, tmp_path: Path) -> None:
    standby = waiting_standby(kube_cluster, fake_kubelet)
    poison = tmp_path / "poison.txt"
    poison.write_text("poison\n")
    manifest = echo_job("failing", [str(poison)], workers=1, reducers=1, maxAttempts=1,
                        args={"log": str(tmp_path / "a.log")})
    manifest["spec"]["job"] = "tests.jobs.poison"
    name = create_job(kube_cluster, kube_namespace, manifest)
    job = wait_for_phase(kube_cluster, kube_namespace, name, operator)
    assert job["status"]["phase"] == "Failed", job["status"]
    assert "poisoned input" in job["status"]["error"]["message"], job["status"]
    assert "standby adopted" in fake_kubelet.logs(POOL_NS, standby)
    wait_for("the standby's objects' removal",
               lambda: standby_objects(kube_cluster, standby) == [], timeout=60)



def test_a_pipeline_that_adopted_a_standby_fails_then_is_retried_cold(
        cli: Cli, kube_cluster: TestCluster, s3: Any, fake_kubelet: FakeKubelet,
        tmp_path: Path) -> None:
    """A three-step job adopts the standby; step 2 fails once; `kubemr retry` reopens it
    (no standby this time: the job is not new) and it finishes with exact results."""
    standby = waiting_standby(kube_cluster, fake_kubelet)
    result = submit_three_steps(cli, "--max-attempts", "1", "--arg", "fail_once=2",
                                "--arg", f"log={tmp_path / 'attempts.log'}")
    name = result.stdout.strip()
    status = completed(kube_cluster, cli.namespace, name)
    assert status["phase"] == "Failed" and status["step"] == 1, status
    assert f"standby worker {standby} " in str(events_for(kube_cluster, cli.namespace, name))
    wait_for("the standby's objects' removal",
               lambda: standby_objects(kube_cluster, standby) == [], timeout=60)
    retried = cli("retry", name, "--wait")
    assert retried.returncode == 0, retried.stderr
    status = completed(kube_cluster, cli.namespace, name)
    assert status["phase"] == "Succeeded" and status["step"] == 2, status
    assert result_lines(s3, status) == three_steps_reference()[2]
    assert job_pod_logs(fake_kubelet, cli.namespace, name), "the retry ran cold pods"
    assert [e.get("count", 1) for e in events_for(kube_cluster, cli.namespace, name)
            if e["reason"] == "Adopted"] == [1], "adopted once, when new"


def test_an_adopted_standby_reaches_its_job_and_nothing_else(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path,
        fake_kubelet: FakeKubelet, tmp_path: Path) -> None:
    """A hostile tenant's map in an adopted standby has its job's rights, not the pool's:
    no Secret, no other pod, no write to its own pod, no other job."""
    standby, name = standby_at_work(kube_cluster, kube_namespace, fake_kubelet,
                                    tmp_path / "attempts.log", "hostile", sleep=20)
    group = "kubemr.io"
    assert allowed(kube_cluster, standby, "get", "mapreducejobs", kube_namespace, name,
                   group), "the job's RoleBinding names the standby"
    assert not allowed(kube_cluster, standby, "get", "mapreducejobs", kube_namespace,
                       "another-job", group)
    assert not allowed(kube_cluster, standby, "list", "mapreducejobs", "default", group=group)
    for verb, resource, where, what in (
            ("get", "secrets", POOL_NS, "kubemr-standby-s3"),
            ("list", "secrets", kube_namespace, ""),
            ("list", "pods", POOL_NS, ""),
            ("patch", "pods", POOL_NS, standby),
            ("create", "pods", kube_namespace, ""),
            ("patch", "rolebindings", kube_namespace, f"kubemr-worker-{name}")):
        assert not allowed(kube_cluster, standby, verb, resource, where, what), \
            (verb, resource, where, what)
    kube_cluster.api("DELETE", f"/apis/kubemr.io/v1alpha1/namespaces/{kube_namespace}/"
                               f"mapreducejobs/{name}")
    wait_for("the standby's objects' removal",
               lambda: standby_objects(kube_cluster, standby) == [], timeout=60)


def test_waiting_standbys_are_replaced_when_the_platforms_keys_change(
        kube_cluster: TestCluster, operator: Path, fake_kubelet: FakeKubelet) -> None:
    """A standby reads its S3 keys when it starts: after the platform's Secret changes
    (keys rotated, the old ones revoked), a job adopting a standby started before would
    run with the old keys. The waiting ones are replaced by standbys with the new keys."""
    standby = waiting_standby(kube_cluster, fake_kubelet)
    secret = f"/api/v1/namespaces/{OPERATOR_NS}/secrets/kubemr-s3"
    mark = {"data": {"KUBEMR_ROTATED": "MQ=="}}
    kube_cluster.api("PATCH", secret, mark, content_type="application/merge-patch+json")
    try:
        wait_for("the stale standby's replacement", lambda: standby not in {
            p["metadata"]["name"] for p in pool_pods(kube_cluster)}, timeout=30)
        copy = kube_cluster.api("GET", f"/api/v1/namespaces/{POOL_NS}/secrets/"
                                       "kubemr-standby-s3")
        assert copy["data"]["KUBEMR_ROTATED"] == "MQ=="
        assert waiting_standby(kube_cluster, fake_kubelet) != standby
    finally:
        kube_cluster.api("PATCH", secret, {"data": {"KUBEMR_ROTATED": None}},
                         content_type="application/merge-patch+json")


def test_a_total_order_job_that_adopts_a_standby_sorts_globally(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path, s3: Any,
        fake_kubelet: FakeKubelet, tmp_path: Path) -> None:
    """The sampling before the first map (the partition file) runs in the standby too."""
    standby = waiting_standby(kube_cluster, fake_kubelet)
    sort_globally(kube_cluster, kube_namespace, operator, s3, tmp_path)
    assert "standby adopted" in fake_kubelet.logs(POOL_NS, standby)


def test_jobs_deleted_right_after_creation_leave_the_pool_as_it_was(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path,
        fake_kubelet: FakeKubelet) -> None:
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{POOL_NS}"
    kinds = (f"/api/v1/namespaces/{POOL_NS}/serviceaccounts", f"{rbac}/roles",
             f"{rbac}/rolebindings")

    def settled() -> bool:
        pods = pool_pods(kube_cluster)
        names = {p["metadata"]["name"] for p in pods}
        waiting = [p for p in pods if "kubemr.io/adopted-by-uid" not in p["metadata"]["labels"]]
        return len(pods) == len(waiting) == 1 and all(
            {o["metadata"]["name"] for o in kube_cluster.api(
                "GET", f"{kind}?labelSelector={STANDBYS}")["items"]} == names
            for kind in kinds)

    for delay in (0.0, 0.2, 0.5, 1.0):
        waiting_standby(kube_cluster, fake_kubelet)
        name = create_job(kube_cluster, kube_namespace, echo_job(
            "gone", ["a"], workers=1, reducers=1, args={"sleep": "30"}))
        time.sleep(delay)
        kube_cluster.api("DELETE", f"/apis/kubemr.io/v1alpha1/namespaces/{kube_namespace}/"
                                   f"mapreducejobs/{name}")
        path = f"/apis/kubemr.io/v1alpha1/namespaces/{kube_namespace}/mapreducejobs/{name}"
        wait_for("the job's removal", lambda p=path: gone(kube_cluster, p), timeout=60)
        wait_for(f"the pool to settle after deleting at {delay} s", settled, timeout=60)


def test_a_standby_whose_job_kills_it_at_once_is_replaced_by_the_jobs_own_pod(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path,
        fake_kubelet: FakeKubelet) -> None:
    """The standby dies before the pool has seen it working (its first map SIGKILLs it):
    the job gets a pod of its own all the same, soon."""
    standby = waiting_standby(kube_cluster, fake_kubelet)
    name = create_job(kube_cluster, kube_namespace, echo_job(
        "killer", ["a"], workers=1, reducers=1, args={"die": "always"}))
    wait_for("the job's own pod", lambda: job_pod_logs(
        fake_kubelet, kube_namespace, name), timeout=20)
    assert "kills its worker" in fake_kubelet.logs(POOL_NS, standby)
    kube_cluster.api("DELETE", f"/apis/kubemr.io/v1alpha1/namespaces/{kube_namespace}/"
                               f"mapreducejobs/{name}")
    wait_for("the standby's objects' removal",
               lambda: standby_objects(kube_cluster, standby) == [], timeout=60)

def test_a_standby_killed_by_its_jobs_import_is_replaced_by_the_jobs_own_pod(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path,
        fake_kubelet: FakeKubelet) -> None:
    """The standby dies before it claims anything (the job module's import kills it), so
    nothing of the job changes: the job must get a pod of its own all the same."""
    standby = waiting_standby(kube_cluster, fake_kubelet)
    manifest = echo_job("importkill", ["a"], workers=1, reducers=1)
    manifest["spec"]["job"] = "tests.jobs.dies_on_import"
    name = create_job(kube_cluster, kube_namespace, manifest)
    wait_for("the job's own pod", lambda: job_pod_logs(
        fake_kubelet, kube_namespace, name), timeout=30)
    assert "killing the worker at import" in fake_kubelet.logs(POOL_NS, standby)
    kube_cluster.api("DELETE", f"/apis/kubemr.io/v1alpha1/namespaces/{kube_namespace}/"
                               f"mapreducejobs/{name}")


# Last in the module: it replaces the module's operator with a new process.
def test_a_standby_lost_while_the_operator_is_down_is_replaced_after_its_restart(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path, s3_server: S3Server,
        operator_args: list[str], fake_kubelet: FakeKubelet, tmp_path: Path) -> None:
    standby, name = standby_at_work(kube_cluster, kube_namespace, fake_kubelet,
                                    tmp_path / "attempts.log", "restart", sleep=3)
    PROCESSES[operator].kill()
    PROCESSES[operator].wait()
    kube_cluster.api("DELETE", f"/api/v1/namespaces/{POOL_NS}/pods/{standby}")
    wait_for("the standby's end", lambda: gone(
        kube_cluster, f"/api/v1/namespaces/{POOL_NS}/pods/{standby}")
        or phase_of(kube_cluster, POOL_NS, standby) in ("Failed", "Succeeded"))
    replacement_log = tmp_path / "operator-2.log"
    replacement = start_operator(kube_cluster, s3_server, kube_namespace, operator_args,
                                 replacement_log)
    try:
        job = wait_for_phase(kube_cluster, kube_namespace, name, replacement_log,
                             timeout=120)
        assert job["status"]["phase"] == "Succeeded", job["status"]
        assert job["status"]["results"] == ["p,q"]
        assert len(job_pod_logs(fake_kubelet, kube_namespace, name)) == 1
        wait_for("the standby's objects' removal",
                   lambda: standby_objects(kube_cluster, standby) == [], timeout=60)
        assert waiting_standby(kube_cluster, fake_kubelet) != standby
    finally:
        replacement.terminate()
        replacement.wait(timeout=30)
