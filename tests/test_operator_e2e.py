"""The product end to end: real kube-apiserver + controller-manager, real S3, the operator
as its own process, worker pods run by the test kubelet.

`kubectl create -f examples/wordcount.yaml` is reproduced as a POST of that very file
(generateName and all); everything after that is the operator's and the workers' doing.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubemr_async import formats
from kubemr_async.errors import UsageError
from kubemr_async.formats import SUCCESS_MARKER
from kubemr_async.results import read_results
from kubemr_async.testing.cluster import ApiError, TestCluster
from kubemr_async.testing.s3server import S3Server

from .operator_fixtures import BUCKET, DATA, OPERATOR_NS, kube_namespace, operator, s3
from .test_counters import expected_totals
from .test_local_run import KUBEMR, ROOT

__all__ = ["kube_namespace", "operator", "s3"]  # fixtures, used by name

pytestmark = [pytest.mark.kube, pytest.mark.s3, pytest.mark.slow]

GROUP_PATH = "/apis/kubemr.io/v1alpha1"


def jobs_path(namespace: str, name: str = "") -> str:
    return f"{GROUP_PATH}/namespaces/{namespace}/mapreducejobs" + (f"/{name}" if name else "")


def create_job(cluster: TestCluster, namespace: str, manifest: dict[str, Any]) -> str:
    created = cluster.api("POST", jobs_path(namespace), manifest)
    return str(created["metadata"]["name"])


def wait_for_phase(cluster: TestCluster, namespace: str, name: str, operator_log: Path,
                   phases: tuple[str, ...] = ("Succeeded", "Failed"),
                   timeout: float = 240.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = cluster.api("GET", jobs_path(namespace, name))
        if (job.get("status") or {}).get("phase") in phases:
            return job
        if time.monotonic() > deadline:
            tail = operator_log.read_text(errors="replace")[-3000:]
            raise AssertionError(f"job {name} stuck in {job.get('status')}; operator log:\n{tail}")
        time.sleep(0.3)


def wait_for_condition(cluster: TestCluster, namespace: str, name: str, condition: str,
                       timeout: float = 240.0) -> dict[str, Any]:
    """Run the real ``kubectl wait --for=condition=<condition> mrj/<name>``; the object after."""
    cluster.kubectl("wait", f"--for=condition={condition}", f"mrj/{name}", "-n", namespace,
                    f"--timeout={int(timeout)}s", timeout=timeout + 30)
    job: dict[str, Any] = cluster.api("GET", jobs_path(namespace, name))
    return job


def wait_for_completion(cluster: TestCluster, namespace: str, name: str,
                        timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = cluster.api("GET", jobs_path(namespace, name))["status"]
        if status.get("completionTime"):
            return status
        assert time.monotonic() < deadline, f"operator never completed {name}: {status}"
        time.sleep(0.2)


def wait_gone(cluster: TestCluster, path: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            cluster.api("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return
            raise
        time.sleep(0.3)
    raise AssertionError(f"{path} still exists")


def events_for(cluster: TestCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    listing = cluster.api("GET", f"/api/v1/namespaces/{namespace}/events"
                          f"?fieldSelector=involvedObject.name%3D{name}")
    return list(listing["items"])


def word_counts() -> list[bytes]:
    """The word count of examples/data as sorted ``word\tcount`` lines."""
    counts: Counter[bytes] = Counter()
    for path in DATA.iterdir():
        counts.update(path.read_bytes().split())
    return sorted(w + b"\t" + str(n).encode() for w, n in counts.items())


def result_lines(s3: Any, results: list[str]) -> list[bytes]:
    """Every line of the result objects ``results`` (in the examples bucket), sorted."""
    lines: list[bytes] = []
    for url in results:
        key = url[len(f"s3://{BUCKET}/"):]
        lines += s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().splitlines()
    return sorted(lines)


def echo_job(prefix: str, inputs: list[str], **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "kubemr.io/v1alpha1", "kind": "MapReduceJob",
            "metadata": {"generateName": f"{prefix}-"},
            "spec": {"image": "kubemr-tests:dev", "job": "tests.jobs.attempts",
                     "inputs": inputs, "splitInputs": False,
                     "output": f"s3://{BUCKET}/echo", **spec}}


def test_wordcount_yaml_runs_end_to_end(kube_cluster: TestCluster, kube_namespace: str,
                                        operator: Path, s3: Any) -> None:
    manifest = yaml.safe_load((ROOT / "examples" / "wordcount.yaml").read_text())
    name = create_job(kube_cluster, kube_namespace, manifest)
    assert name.startswith("wordcount-") and name != "wordcount-"
    job = wait_for_phase(kube_cluster, kube_namespace, name, operator)
    assert job["status"]["phase"] == "Succeeded", job["status"]
    done = wait_for_condition(kube_cluster, kube_namespace, name, "Succeeded")
    conditions = {c["type"]: c for c in done["status"]["conditions"]}
    assert {t: c["status"] for t, c in conditions.items()} == {
        "Running": "False", "Succeeded": "True", "Failed": "False", "Cancelled": "False"}
    assert conditions["Succeeded"]["reason"] == "Succeeded"
    assert done["status"]["completionTime"], "written with the conditions, in one patch"
    # The operator's bookkeeping (progress columns, completionTime) follows the verdict.
    status = wait_for_completion(kube_cluster, kube_namespace, name)
    results = status["results"]
    assert len(results) == 2
    prefix = f"s3://{BUCKET}/results/{kube_namespace}/{name}/output/"
    for partition, url in enumerate(results):  # ordered by partition
        assert url.startswith(f"{prefix}part-{partition:05d}."), url
    assert result_lines(s3, results) == word_counts(), "results equal the reference byte for byte"
    leftover = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"results/{kube_namespace}/{name}/map/")
    assert leftover.get("KeyCount", 0) == 0, "intermediate runs are cleaned up"
    assert (status["mapsDone"], status["maps"]) == (3, 3)
    assert (status["reducesDone"], status["reduces"]) == (2, 2)
    table = kube_cluster.api("GET", jobs_path(kube_namespace, name),
                             accept="application/json;as=Table;v=v1;g=meta.k8s.io")
    columns = [c["name"] for c in table["columnDefinitions"]]
    row = dict(zip(columns, table["rows"][0]["cells"], strict=True))
    assert row["Phase"] == "Succeeded"
    assert "Age" in columns and any("Maps" in c for c in columns)
    reasons = {e["reason"] for e in events_for(kube_cluster, kube_namespace, name)}
    assert {"Planned", "Succeeded"} <= reasons
    account = kube_cluster.api("GET", f"/api/v1/namespaces/{kube_namespace}/serviceaccounts/"
                               f"kubemr-worker-{name}")
    assert account["metadata"]["ownerReferences"][0]["name"] == name


def test_counters_are_stamped_exactly_once_and_kubemr_status_prints_them(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path, s3: Any,
        tmp_path: Path) -> None:
    """User and framework counters on a cluster: first attempts of some tasks increment,
    then raise; status.counters still equal a plain-Python count of the input."""
    log = tmp_path / "failed-attempts.log"
    failing = "map-00001,reduce-00000"
    manifest = echo_job("counting", [f"s3://{BUCKET}/data/"], splitInputs=True, workers=2,
                        reducers=2, args={"fail": failing, "log": str(log)})
    manifest["spec"]["job"] = "tests.jobs.counting"
    name = create_job(kube_cluster, kube_namespace, manifest)
    status = wait_for_phase(kube_cluster, kube_namespace, name, operator)["status"]
    assert status["phase"] == "Succeeded", status
    failed = sorted(line.split()[0] for line in log.read_text().splitlines())
    assert failed == sorted(failing.split(",")), "the chosen first attempts did fail"
    expected = expected_totals()
    assert status["counters"] == expected
    base = [KUBEMR, "status", name, "--kubeconfig", str(kube_cluster.kubeconfig_path),
            "-n", kube_namespace]
    printed = subprocess.run([*base, "-o", "json"], capture_output=True, text=True,
                             timeout=120, check=True)
    assert json.loads(printed.stdout)["status"]["counters"] == expected
    described = subprocess.run(base, capture_output=True, text=True, timeout=120,
                               check=True).stdout.splitlines()
    start = described.index("Counters:")
    assert described[start:] == ["Counters:", "  kubemr",
                                 *[f"    {k}={v}" for k, v in expected["kubemr"].items()],
                                 "  text", *[f"    {k}={v}" for k, v in expected["text"].items()]]
    manifest_key = f"echo/{kube_namespace}/{name}/_SUCCESS"  # echo_job's output prefix
    written = json.loads(s3.get_object(Bucket=BUCKET, Key=manifest_key)["Body"].read())
    assert written["counters"] == expected, "the result location's manifest has them too"


def test_streaming_job_from_spec_commands_runs_on_the_cluster(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path, s3: Any) -> None:
    """No job module: the spec's mapper, combiner and reducer are shell commands, run by
    the worker pods (this checkout, so awk and tr are there)."""
    from .test_streaming import MAPPER, SUMMER, TEXT_INPUTS, reference

    manifest = {"apiVersion": "kubemr.io/v1alpha1", "kind": "MapReduceJob",
                "metadata": {"generateName": "streaming-"},
                "spec": {"image": "kubemr-tests:dev", "reducers": 2, "chunkSize": 16384,
                         "inputs": [f"s3://{BUCKET}/data/{path.name}" for path in TEXT_INPUTS],
                         "mapper": MAPPER, "combiner": SUMMER, "reducer": SUMMER,
                         "output": f"s3://{BUCKET}/results"}}
    name = create_job(kube_cluster, kube_namespace, manifest)
    job = wait_for_phase(kube_cluster, kube_namespace, name, operator)
    assert job["status"]["phase"] == "Succeeded", job["status"]
    assert "job" not in job["spec"] and job["spec"]["mapper"] == MAPPER
    lines: list[bytes] = []
    for url in job["status"]["results"]:
        key = url[len(f"s3://{BUCKET}/"):]
        lines += s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().splitlines()
    assert len(job["status"]["results"]) == 2
    assert sorted(lines) == reference(TEXT_INPUTS)
    # A failing command fails the job with the task, the attempt and the command.
    manifest["spec"] = {**manifest["spec"], "mapper": "no-such-command-kubemr-xyz"}
    name = create_job(kube_cluster, kube_namespace, manifest)
    status = wait_for_phase(kube_cluster, kube_namespace, name, operator)["status"]
    assert status["phase"] == "Failed"
    assert "mapper command 'no-such-command-kubemr-xyz' not found" in status["error"]["message"]
    assert status["error"]["task"].startswith("map-")


def test_skip_mode_stamps_the_skipped_sample_on_a_succeeded_job(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path, s3: Any) -> None:
    """spec.maxSkippedRecords on a cluster: poison records and a malformed line skipped,
    the committed tasks' sample in status.skipped, kubemr status and the manifest."""
    lines = [json.dumps({"id": i, "word": f"w{i % 5}"}) for i in range(200)]
    lines[50] = "{not json"
    s3.put_object(Bucket=BUCKET, Key="skip/records.jsonl",
                  Body=("\n".join(lines) + "\n").encode())
    url = f"s3://{BUCKET}/skip/records.jsonl"
    manifest = echo_job("skipping", [url], splitInputs=True, workers=1, reducers=1,
                        maxSkippedRecords=3, args={"poison": "7,120"})
    manifest["spec"]["job"] = "tests.jobs.skipping"
    name = create_job(kube_cluster, kube_namespace, manifest)
    status = wait_for_phase(kube_cluster, kube_namespace, name, operator)["status"]
    assert status["phase"] == "Succeeded", status
    assert status["counters"]["kubemr"]["skippedRecords"] == 3
    assert [(e["task"], e["input"], e["line"], e["error"]) for e in status["skipped"]] == [
        ("map-00000", url, 8, "ValueError: poison record 7"),
        ("map-00000", url, 51, "invalid JSON: Expecting property name enclosed in double "
                               "quotes: line 1 column 2 (char 1): b'{not json'"),
        ("map-00000", url, 121, "ValueError: poison record 120")]
    described = subprocess.run(
        [KUBEMR, "status", name, "--kubeconfig", str(kube_cluster.kubeconfig_path),
         "-n", kube_namespace], capture_output=True, text=True, timeout=120,
        check=True).stdout.splitlines()
    start = described.index("Skipped records (sample):")
    assert described[start + 1] == f"  map-00000 {url} line 8: ValueError: poison record 7"
    written = json.loads(s3.get_object(
        Bucket=BUCKET, Key=f"echo/{kube_namespace}/{name}/_SUCCESS")["Body"].read())
    assert written["skipped"] == status["skipped"]


def test_fifty_workers_commit_a_thousand_tasks_exactly_once(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path, tmp_path: Path) -> None:
    log = tmp_path / "attempts.log"
    inputs = [f"item-{i:04d}" for i in range(1000)]
    started = time.monotonic()
    name = create_job(kube_cluster, kube_namespace, echo_job(
        "race", inputs, workers=50, reducers=4, args={"log": str(log)}))
    job = wait_for_phase(kube_cluster, kube_namespace, name, operator, timeout=900)
    wall = time.monotonic() - started
    assert job["status"]["phase"] == "Succeeded", job["status"]
    runs = Counter(tuple(line.split()[:2]) for line in log.read_text().splitlines())
    maps = [task for task, _ in runs if task.startswith("map-")]
    assert len(maps) == 1000 and len(set(maps)) == 1000
    assert set(runs.values()) == {1}, "no task ran twice"
    merged = sorted(i for part in job["status"]["results"] for i in part.split(","))
    assert merged == inputs
    pids = {line.split()[2] for line in log.read_text().splitlines()}
    assert len(pids) > 25, "the tasks were spread over many worker pods"
    print(f"\n50 worker pods, 1,000 maps + 4 reduces: {len(pids)} pods ran tasks; "
          f"job {wall:.1f}s; every task run and committed once")


def test_a_task_stuck_in_a_blocking_call_times_out_and_its_worker_pods_are_replaced(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path) -> None:
    """spec.taskTimeoutSeconds on a cluster: each attempt is failed, then its pod exits 75
    (its user thread cannot be stopped) and is replaced without counting toward the
    workers' backoff limit (1 here) or the crash-loop rule; the job fails, naming the
    timeout, once maxAttempts have timed out."""
    manifest = echo_job("stuck", ["x"], workers=1, maxAttempts=2, taskTimeoutSeconds=1,
                        args={"block": "1000"})
    name = create_job(kube_cluster, kube_namespace, manifest)
    status = wait_for_phase(kube_cluster, kube_namespace, name, operator)["status"]
    assert status["phase"] == "Failed", status
    error = status["error"]
    assert (error["task"], error["attempt"]) == ("map-00000", 2), error
    assert error["message"].startswith(
        "map timed out after 1 s (spec.taskTimeoutSeconds) and was cancelled, but its "
        "callback did not stop"), error


def test_unloadable_job_module_fails_the_job_with_the_reason(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path) -> None:
    manifest = echo_job("broken", ["x"])
    manifest["spec"]["job"] = "tests.jobs.broken"
    name = create_job(kube_cluster, kube_namespace, manifest)
    status = wait_for_phase(kube_cluster, kube_namespace, name, operator)["status"]
    assert status["phase"] == "Failed"
    assert "this image ships a broken job module" in status["error"]["message"]
    failed = wait_for_condition(kube_cluster, kube_namespace, name, "failed")
    condition = next(c for c in failed["status"]["conditions"] if c["type"] == "Failed")
    assert "this image ships a broken job module" in condition["message"]
    warnings = [e for e in events_for(kube_cluster, kube_namespace, name)
                if e["type"] == "Warning"]
    assert any("broken job module" in e["message"] for e in warnings)


def test_a_new_job_of_an_earlier_jobs_name_drops_its_stale_manifest(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path, s3: Any,
        s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """`kubemr delete` keeps a job's results; a new job of the same name writes the same
    attempt-unique keys. Its location must stop claiming the earlier job's verdict once it
    is planned: read_results would otherwise present the old manifest (over parts the new
    job may have overwritten, or a new job that failed) as a finished result."""
    name = "rerun-broken"
    prefix = f"echo/{kube_namespace}/{name}"
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/output/part-00000.attempt-1", Body=b"old\t1\n")
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{SUCCESS_MARKER}", Body=formats.manifest(
        name, "text", [f"s3://{BUCKET}/{prefix}/output/part-00000.attempt-1"],
        ["output/part-00000.attempt-1"], [6]))
    manifest = echo_job("unused", ["x"])
    manifest["metadata"] = {"name": name}
    manifest["spec"]["job"] = "tests.jobs.broken"
    create_job(kube_cluster, kube_namespace, manifest)
    status = wait_for_phase(kube_cluster, kube_namespace, name, operator)["status"]
    assert status["phase"] == "Failed"
    for key, value in s3_server.client_env().items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UsageError, match="no _SUCCESS manifest"):
        list(read_results(f"s3://{BUCKET}/{prefix}"))


def test_an_input_in_the_jobs_own_data_location_is_refused_at_planning(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path, s3: Any) -> None:
    """An input prefix over the output picks up what an earlier job of this name left in
    the job's own location; the job would read it as input, then overwrite or delete it."""
    name = "reads-itself"
    stale = f"echo/{kube_namespace}/{name}/output/part-00000.attempt-1"
    s3.put_object(Bucket=BUCKET, Key=stale, Body=b"old\t1\n")
    s3.put_object(Bucket=BUCKET, Key=f"echo/{kube_namespace}/in.txt", Body=b"new\n")
    manifest = echo_job("unused", [f"s3://{BUCKET}/echo/{kube_namespace}/"])
    manifest["metadata"] = {"name": name}
    create_job(kube_cluster, kube_namespace, manifest)
    status = wait_for_phase(kube_cluster, kube_namespace, name, operator)["status"]
    assert status["phase"] == "Failed"
    assert (f"input s3://{BUCKET}/{stale} lies in this job's own data location"
            in status["error"]["message"])
    assert s3.get_object(Bucket=BUCKET, Key=stale)["Body"].read() == b"old\t1\n"


def test_missing_input_bucket_fails_the_job_at_planning(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path, s3: Any) -> None:
    manifest = echo_job("nobucket", ["s3://no-such-bucket-kubemr/data/"], splitInputs=True)
    name = create_job(kube_cluster, kube_namespace, manifest)
    status = wait_for_phase(kube_cluster, kube_namespace, name, operator)["status"]
    assert status["phase"] == "Failed"
    assert "no-such-bucket-kubemr" in status["error"]["message"]


def test_crashing_worker_pods_fail_the_job_instead_of_hanging(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path) -> None:
    # An overlay's env replaces the worker's (lists replace), so the worker starts without
    # its job and exits at once. (The command itself cannot be overlaid: issue 13.)
    manifest = echo_job("crash", ["x"], workers=2, template={"spec": {"containers": [{
        "name": "worker", "env": [{"name": "KUBEMR_CRASH", "value": "1"}]}]}})
    name = create_job(kube_cluster, kube_namespace, manifest)
    status = wait_for_phase(kube_cluster, kube_namespace, name, operator)["status"]
    assert status["phase"] == "Failed"
    assert "worker pods failed" in status["error"]["message"]


def test_worker_token_cannot_touch_another_jobs_objects(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path) -> None:
    names = [create_job(kube_cluster, kube_namespace, echo_job(
        f"rbac{i}", ["a", "b"], args={"sleep": "120"})) for i in range(2)]
    for name in names:
        wait_for_phase(kube_cluster, kube_namespace, name, operator, phases=("Running",))
    mine, theirs = names
    token = token_when_ready(kube_cluster, kube_namespace, f"kubemr-worker-{mine}")

    def status_of(method: str, path: str, body: Any = None) -> int:
        try:
            kube_cluster.api(method, path, body, token=token,
                             content_type="application/json-patch+json")
            return 200
        except ApiError as exc:
            return exc.status

    own = kube_cluster.api("GET", jobs_path(kube_namespace, mine))["status"]["taskNamespace"]
    other = kube_cluster.api("GET", jobs_path(kube_namespace, theirs))["status"]["taskNamespace"]
    assert status_of("GET", jobs_path(kube_namespace, mine)) == 200
    assert status_of("GET", f"{GROUP_PATH}/namespaces/{own}/mapreducetasks") == 200
    assert status_of("GET", jobs_path(kube_namespace, theirs)) == 403
    assert status_of("GET", f"{GROUP_PATH}/namespaces/{other}/mapreducetasks") == 403
    assert status_of("GET", f"{GROUP_PATH}/namespaces/{other}/mapreducetasks/"
                     f"{theirs}-map-00000") == 403
    patch = [{"op": "replace", "path": "/status/phase", "value": "Cancelled"}]
    assert status_of("PATCH", jobs_path(kube_namespace, theirs) + "/status", patch) == 403
    assert status_of("GET", f"/api/v1/namespaces/{kube_namespace}/secrets") == 403
    for name in names:
        kube_cluster.api("DELETE", jobs_path(kube_namespace, name))


def token_when_ready(cluster: TestCluster, namespace: str, account: str) -> str:
    deadline = time.monotonic() + 60
    while True:
        try:
            return cluster.token_for(namespace, account)
        except ApiError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_deleting_a_running_job_removes_everything_it_owns(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path) -> None:
    name = create_job(kube_cluster, kube_namespace, echo_job("doomed", ["a", "b"],
                                                             args={"sleep": "300"}))
    wait_for_phase(kube_cluster, kube_namespace, name, operator, phases=("Running",))
    wait_for_condition(kube_cluster, kube_namespace, name, "Running")
    job_path = f"/apis/batch/v1/namespaces/{kube_namespace}/jobs/{name}-workers"
    deadline = time.monotonic() + 60
    while not kube_cluster.api("GET", f"/api/v1/namespaces/{kube_namespace}/pods"
                               f"?labelSelector=kubemr.io/job%3D{name}")["items"]:
        assert time.monotonic() < deadline, "worker pods never appeared"
        time.sleep(0.3)
    task_ns = kube_cluster.api("GET", jobs_path(kube_namespace, name))["status"]["taskNamespace"]
    kube_cluster.api("DELETE", jobs_path(kube_namespace, name))
    wait_gone(kube_cluster, jobs_path(kube_namespace, name))
    for path in [job_path,
                 f"/api/v1/namespaces/{kube_namespace}/serviceaccounts/kubemr-worker-{name}",
                 f"/apis/rbac.authorization.k8s.io/v1/namespaces/{kube_namespace}/roles/"
                 f"kubemr-worker-{name}",
                 f"/api/v1/namespaces/{task_ns}"]:
        wait_gone(kube_cluster, path)
    pods = kube_cluster.api("GET", f"/api/v1/namespaces/{kube_namespace}/pods"
                            f"?labelSelector=kubemr.io/job%3D{name}")["items"]
    deadline = time.monotonic() + 120
    while pods:
        assert time.monotonic() < deadline, f"pods left: {[p['metadata']['name'] for p in pods]}"
        time.sleep(0.3)
        pods = kube_cluster.api("GET", f"/api/v1/namespaces/{kube_namespace}/pods"
                                f"?labelSelector=kubemr.io/job%3D{name}")["items"]


def test_ttl_after_finished_deletes_the_job(kube_cluster: TestCluster, kube_namespace: str,
                                            operator: Path) -> None:
    name = create_job(kube_cluster, kube_namespace,
                      echo_job("ttl", ["a"], ttlSecondsAfterFinished=2))
    wait_for_phase(kube_cluster, kube_namespace, name, operator)
    wait_gone(kube_cluster, jobs_path(kube_namespace, name), timeout=60)


@pytest.mark.anyio
async def test_concurrent_reconciles_are_idempotent(kube_cluster: TestCluster,
                                                    kube_namespace: str, operator: Path,
                                                    tmp_path: Path) -> None:
    """A second operator reconciling the same job over and over (as after a restart, or
    with two replicas) creates nothing twice and loses no transition."""
    import asyncio

    from kubemr_async.kube import Kube
    from kubemr_async.operator import Operator, OperatorConfig

    log = tmp_path / "attempts.log"
    name = create_job(kube_cluster, kube_namespace, echo_job(
        "again", [f"i{n}" for n in range(6)], workers=3, args={"log": str(log)}))
    async with await Kube.connect(str(kube_cluster.kubeconfig_path)) as kube:
        second = Operator(kube, OperatorConfig(
            namespace=kube_namespace, operator_namespace=OPERATOR_NS,
            platform_credentials_namespaces=f"kubernetes.io/metadata.name={kube_namespace}"))
        await asyncio.gather(*(second.reconcile(kube_namespace, name) for _ in range(5)))
        job = await asyncio.to_thread(wait_for_phase, kube_cluster, kube_namespace, name,
                                      operator)
        for _ in range(3):
            await second.reconcile(kube_namespace, name)
    assert job["status"]["phase"] == "Succeeded", job["status"]
    runs = Counter(tuple(line.split()[:2]) for line in log.read_text().splitlines())
    assert set(runs.values()) == {1} and len(runs) == 6 + 1, runs
    workers = kube_cluster.api("GET", f"/apis/batch/v1/namespaces/{kube_namespace}/jobs"
                               f"?labelSelector=kubemr.io/job%3D{name}")["items"]
    assert len(workers) <= 1


def test_batched_map_tasks_run_exactly_once_on_the_cluster(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path, s3: Any,
        tmp_path: Path) -> None:
    """splitsPerTask through the operator: 20 small files in ceil(20 / 8) = 3 map records;
    the second record fails on its sixth split on attempt 1 and is re-mapped whole; the
    result is a Counter's and every input byte is counted once."""
    files = {f"batch/f{i:03d}.txt": (" ".join(f"w{(i * 5 + j) % 11}" for j in range(i % 4 + 2))
                                     + f"\nonly{i}\n").encode() for i in range(20)}
    for key, body in files.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    log = tmp_path / "failed-attempts.log"
    manifest = echo_job("batched", [f"s3://{BUCKET}/batch/"], splitInputs=True, workers=2,
                        reducers=2, splitsPerTask=8, args={"fail": "f013.txt", "log": str(log)})
    manifest["spec"]["job"] = "tests.jobs.batched"
    name = create_job(kube_cluster, kube_namespace, manifest)
    status = wait_for_phase(kube_cluster, kube_namespace, name, operator)["status"]
    assert status["phase"] == "Succeeded", status
    assert status["maps"] == 3
    assert log.read_text().split()[:2] == ["map-00001", "1"], "the chosen attempt did fail"
    counts: Counter[bytes] = Counter()
    for body in files.values():
        counts.update(body.split())
    assert result_lines(s3, status["results"]) == sorted(
        w + b"\t" + str(n).encode() for w, n in counts.items())
    assert status["counters"]["kubemr"]["mapInputBytes"] == sum(map(len, files.values()))
    assert status["counters"]["text"]["splits"] == 20
    planned = [e["message"] for e in events_for(kube_cluster, kube_namespace, name)
               if e["reason"] == "Planned"]
    assert planned == ["3 map and 2 reduce tasks created"]
    kept = json.loads(s3.get_object(Bucket=BUCKET, Key=f"echo/{kube_namespace}/{name}/"
                                    "_timeline.json")["Body"].read())
    assert [t["inputs"] for t in kept if t["kind"] == "map"] == [
        f"s3://{BUCKET}/batch/f{first:03d}.txt and {more} more"
        for first, more in ((0, 7), (8, 7), (16, 3))]
