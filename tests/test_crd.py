"""The CRDs: generated manifests match the chart, and a real API server enforces them.

Validation is the API server's job, so these tests send invalid MapReduceJobs to a real
kube-apiserver and check that each is rejected at create time with a message that names
the offending field (what a user sees from ``kubectl create``).
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import yaml

from kubemr_async import crd
from kubemr_async.conditions import job_conditions
from kubemr_async.counters import MAX_COUNTERS
from kubemr_async.crd import GROUP, JOB_PLURAL, TASK_PLURAL, VERSION, ensure_crds, manifests
from kubemr_async.kube import Kube
from kubemr_async.protocol import JobPhase
from kubemr_async.spec import DEFAULT_CHUNK_SIZE, MAX_REDUCERS, MAX_SPLITS_PER_TASK
from kubemr_async.testing.cluster import ApiError, TestCluster

JOBS = f"/apis/{GROUP}/{VERSION}/namespaces/{{ns}}/{JOB_PLURAL}"
TASKS = f"/apis/{GROUP}/{VERSION}/namespaces/{{ns}}/{TASK_PLURAL}"
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"


def valid_job(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "MapReduceJob",
        "metadata": {"generateName": "wordcount-"},
        "spec": {"image": "example/wordcount:1", "inputs": ["s3://data/books/"],
                 "job": "/app/wordcount.py", "output": "s3://results/wordcount", **spec},
    }


# --- the manifests in the chart ------------------------------------------------------


@pytest.mark.parametrize("file_name", sorted(manifests()))
def test_chart_manifests_are_the_generated_ones(file_name: str) -> None:
    path = crd.CRD_DIR / file_name
    assert yaml.safe_load(path.read_text()) == manifests()[file_name], (
        f"{path} drifted from kubemr_async/crd.py: run python -m kubemr_async.crd --write")
    assert path.read_text() == crd.render(manifests()[file_name])


def test_check_mode_reports_no_drift() -> None:
    assert crd.main(["--check"]) == 0


def test_schema_uses_the_spec_limits() -> None:
    spec = crd.job_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    props = spec["spec"]["properties"]
    assert props["reducers"]["maximum"] == MAX_REDUCERS
    assert (props["splitsPerTask"]["minimum"], props["splitsPerTask"]["maximum"]) == (
        1, MAX_SPLITS_PER_TASK)
    assert props["chunkSize"]["default"] == DEFAULT_CHUNK_SIZE
    assert set(spec["spec"]["required"]) == {"image", "inputs", "output"}
    rules = [rule["rule"] for rule in spec["spec"]["x-kubernetes-validations"]]
    assert "has(self.job) || has(self.mapper)" in rules  # a job module or a mapper command


def test_counters_are_atomic_int64_maps_and_a_tasks_are_capped() -> None:
    def counters_of(made: dict[str, Any]) -> dict[str, Any]:
        schema = made["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        found: dict[str, Any] = schema["properties"]["status"]["properties"]["counters"]
        return found

    job, task = counters_of(crd.job_crd()), counters_of(crd.task_crd())
    for schema in (job, task):
        # Atomic: managedFields name the field once, not every counter in it.
        assert schema["x-kubernetes-map-type"] == "atomic"
        assert schema["additionalProperties"]["additionalProperties"] == {
            "type": "integer", "format": "int64"}
    assert task["maxProperties"] == MAX_COUNTERS + 1  # the user's groups and "kubemr"
    assert task["additionalProperties"]["maxProperties"] == MAX_COUNTERS
    assert "maxProperties" not in job, "a job's totals have no cap of their own"


# --- against the API server ----------------------------------------------------------


@pytest.fixture(scope="module")
def installed(kube_cluster: TestCluster) -> None:
    """The CRDs, installed the way the operator does it (server-side apply)."""

    async def install() -> None:
        async with await Kube.connect(str(kube_cluster.kubeconfig_path)) as kube:
            await ensure_crds(kube)

    asyncio.run(install())


@pytest.fixture
def namespace(kube_cluster: TestCluster, installed: None) -> Iterator[str]:
    name = f"crd-{uuid.uuid4().hex[:8]}"
    kube_cluster.create_namespace(name)
    yield name
    kube_cluster.api("DELETE", f"/api/v1/namespaces/{name}")


@pytest.fixture
async def admin(kube_cluster: TestCluster, installed: None) -> AsyncIterator[Kube]:
    async with await Kube.connect(str(kube_cluster.kubeconfig_path)) as kube:
        yield kube


def _drop(field: str) -> Callable[[dict[str, Any]], None]:
    return lambda spec: spec.pop(field)


def _set(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda spec: spec.__setitem__(field, value)


INVALID_SPECS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("missing image", _drop("image"), "spec.image: Required value"),
    ("empty image", _set("image", ""), "spec.image"),
    ("zero workers", _set("workers", 0), "spec.workers"),
    ("too many workers", _set("workers", 1001), "spec.workers"),
    ("workers not a number", _set("workers", "two"), "spec.workers"),
    ("negative reducers", _set("reducers", -1), "spec.reducers"),
    ("too many reducers", _set("reducers", MAX_REDUCERS + 1), "spec.reducers"),
    ("missing inputs", _drop("inputs"), "spec.inputs: Required value"),
    ("empty inputs", _set("inputs", []), "spec.inputs"),
    ("empty input string", _set("inputs", ["s3://data/a", ""]), "spec.inputs[1]"),
    ("missing job", _drop("job"), "spec.job: a job module (or spec.mapper"),
    ("empty mapper", _set("mapper", ""), "spec.mapper"),
    ("zero maxAttempts", _set("maxAttempts", 0), "spec.maxAttempts"),
    ("too many maxAttempts", _set("maxAttempts", 101), "spec.maxAttempts"),
    ("zero leaseSeconds", _set("leaseSeconds", 0), "spec.leaseSeconds"),
    ("zero chunkSize", _set("chunkSize", 0), "spec.chunkSize"),
    ("zero taskTimeoutSeconds", _set("taskTimeoutSeconds", 0), "spec.taskTimeoutSeconds"),
    ("negative taskTimeoutSeconds", _set("taskTimeoutSeconds", -1),
     "spec.taskTimeoutSeconds"),
    ("taskTimeoutSeconds not a number", _set("taskTimeoutSeconds", "30s"),
     "spec.taskTimeoutSeconds"),
    ("missing output", _drop("output"), "spec.output: Required value"),
    ("output not s3", _set("output", "http://results/x"), "spec.output"),
    ("output bucket uppercase", _set("output", "s3://Results/x"), "spec.output"),
    ("non-string arg", _set("args", {"lang": 1}), "spec.args.lang"),
    ("negative ttl", _set("ttlSecondsAfterFinished", -1), "spec.ttlSecondsAfterFinished"),
    ("zero steps", _set("steps", 0), "spec.steps"),
    ("zero splitsPerTask", _set("splitsPerTask", 0), "spec.splitsPerTask"),
    ("too many splitsPerTask", _set("splitsPerTask", MAX_SPLITS_PER_TASK + 1),
     "spec.splitsPerTask"),
    ("splitsPerTask with unsplit inputs",
     lambda spec: spec.update(splitsPerTask=8, splitInputs=False),
     "spec.splitsPerTask: must be 1 when spec.splitInputs is false"),
    ("stepReducers not one per step", lambda spec: spec.update(steps=3, stepReducers=[1, 1]),
     "spec.stepReducers: must give one count per step"),
    ("stepReducers[0] is not reducers", lambda spec: spec.update(steps=2, stepReducers=[4, 1]),
     "spec.reducers: must equal spec.stepReducers[0]"),
    ("negative step reducers", lambda spec: spec.update(steps=2, stepReducers=[1, -1]),
     "spec.stepReducers[1]"),
    # Issue 13: what admission can refuse in every namespace (the operator checks the rest).
    ("another service account", _set("template", {"spec": {"serviceAccountName": "admin"}}),
     "spec.template.spec.serviceAccountName"),
    ("the legacy service account field", _set("template", {"spec": {"serviceAccount": "a"}}),
     "spec.template.spec.serviceAccount"),
    ("token automount changed",
     _set("template", {"spec": {"automountServiceAccountToken": True}}),
     "spec.template.spec.automountServiceAccountToken"),
    ("worker image changed",
     _set("template", {"spec": {"containers": [{"name": "worker", "image": "evil:1"}]}}),
     "spec.template.spec.containers"),
    ("worker command changed (unnamed container is the worker)",
     _set("template", {"spec": {"containers": [{"command": ["sh"]}]}}),
     "spec.template.spec.containers"),
    ("storage annotation not allowed",
     _set("storage", {"serviceAccountAnnotations": {"kubernetes.io/enforce": "x"}}),
     "spec.storage.serviceAccountAnnotations: only"),
    ("storage secret and identity",
     _set("storage", {"credentialsSecret": "mine",
                      "serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": "r"}}),
     "spec.storage: give credentialsSecret or serviceAccountAnnotations, not both"),
    ("storage secret name invalid", _set("storage", {"credentialsSecret": "Not_A_Name"}),
     "spec.storage.credentialsSecret"),
]


@pytest.mark.kube
@pytest.mark.slow
@pytest.mark.parametrize(("case", "mutate", "field"), INVALID_SPECS,
                         ids=[case for case, _, _ in INVALID_SPECS])
def test_invalid_job_is_rejected_naming_the_field(
        kube_cluster: TestCluster, namespace: str, case: str,
        mutate: Callable[[dict[str, Any]], None], field: str) -> None:
    job = valid_job()
    mutate(job["spec"])
    with pytest.raises(ApiError) as rejected:
        kube_cluster.api("POST", JOBS.format(ns=namespace), job)
    assert rejected.value.status == 422, case
    assert field in rejected.value.body, f"{case}: {rejected.value.body}"


@pytest.mark.kube
@pytest.mark.slow
def test_job_without_spec_or_with_a_long_name_is_rejected(
        kube_cluster: TestCluster, namespace: str) -> None:
    no_spec = valid_job()
    del no_spec["spec"]
    with pytest.raises(ApiError, match=r"spec: Required value"):
        kube_cluster.api("POST", JOBS.format(ns=namespace), no_spec)
    # Task names and label values derive from the job name, so it must fit a DNS label.
    long_name = valid_job()
    long_name["metadata"] = {"name": "w" * 64}
    with pytest.raises(ApiError, match=r"metadata.name must be at most 63 characters"):
        kube_cluster.api("POST", JOBS.format(ns=namespace), long_name)
    dotted = valid_job()  # a valid object name, but not a label value
    dotted["metadata"] = {"name": "word.count"}
    with pytest.raises(ApiError, match=r"metadata.name must be a DNS label"):
        kube_cluster.api("POST", JOBS.format(ns=namespace), dotted)


@pytest.mark.kube
@pytest.mark.slow
def test_valid_job_is_accepted_with_defaults_filled(
        kube_cluster: TestCluster, namespace: str) -> None:
    created = kube_cluster.api("POST", JOBS.format(ns=namespace), valid_job())
    assert created["metadata"]["name"].startswith("wordcount-")
    assert created["spec"] == {
        "image": "example/wordcount:1", "inputs": ["s3://data/books/"],
        "job": "/app/wordcount.py", "output": "s3://results/wordcount",
        "workers": 2, "reducers": 1, "maxAttempts": 3, "leaseSeconds": 30,
        "chunkSize": DEFAULT_CHUNK_SIZE, "splitInputs": True, "outputFormat": "text",
        "speculative": True,
    }
    assert "status" not in created, "status is a subresource: create ignores it"
    # Shell commands instead of a job module (Hadoop Streaming).
    streaming = valid_job(mapper="cat", combiner="uniq", reducer="uniq -c")
    del streaming["spec"]["job"]
    spec = kube_cluster.api("POST", JOBS.format(ns=namespace), streaming)["spec"]
    assert (spec["mapper"], spec["combiner"], spec["reducer"]) == ("cat", "uniq", "uniq -c")
    csv = valid_job()
    csv["spec"]["outputFormat"] = "csv"
    with pytest.raises(ApiError, match=r"spec.outputFormat: Unsupported value: \W+csv\W"):
        kube_cluster.api("POST", JOBS.format(ns=namespace), csv)


MERGE = "application/merge-patch+json"


def new_job(kube_cluster: TestCluster, namespace: str) -> tuple[str, Callable[..., Any]]:
    """A new job's path, and a function that merge-patches its status (as the operator)."""
    name = kube_cluster.api("POST", JOBS.format(ns=namespace), valid_job())["metadata"]["name"]
    path = f"{JOBS.format(ns=namespace)}/{name}"

    def status(**fields: Any) -> Any:
        return kube_cluster.api("PATCH", f"{path}/status", {"status": fields},
                                content_type=MERGE)

    return path, status


@pytest.mark.kube
@pytest.mark.slow
def test_status_and_immutable_spec_are_enforced(
        kube_cluster: TestCluster, namespace: str) -> None:
    path, status = new_job(kube_cluster, namespace)

    with pytest.raises(ApiError, match=r"status.phase: Unsupported value.*Done"):
        status(phase="Done")
    with pytest.raises(ApiError, match=r"status.error.attempt"):
        status(error={"task": "map-00001", "attempt": "first", "message": "boom"})
    assert status(phase="Failed")["status"] == {"phase": "Failed"}
    with pytest.raises(ApiError, match=r"can only go back to Running"):
        status(phase="Pending")
    assert status(phase="Running")["status"] == {"phase": "Running"}, "retry re-opens a job"
    assert status(phase="Succeeded")["status"] == {"phase": "Succeeded"}
    with pytest.raises(ApiError, match=r"a Succeeded job's phase cannot change"):
        status(phase="Running")
    with pytest.raises(ApiError, match=r"spec.reducers is immutable"):
        kube_cluster.api("PATCH", path, {"spec": {"reducers": 4}}, content_type=MERGE)
    with pytest.raises(ApiError, match=r"spec.outputFormat is immutable"):
        kube_cluster.api("PATCH", path, {"spec": {"outputFormat": "jsonl"}}, content_type=MERGE)
    with pytest.raises(ApiError, match=r"spec.job is immutable"):
        kube_cluster.api("PATCH", path, {"spec": {"job": "/app/other.py"}}, content_type=MERGE)
    with pytest.raises(ApiError, match=r"spec.reducer is immutable"):
        kube_cluster.api("PATCH", path, {"spec": {"reducer": "uniq -c"}}, content_type=MERGE)
    # What may change on a running job, does.
    assert kube_cluster.api("PATCH", path, {"spec": {"workers": 8}},
                            content_type=MERGE)["spec"]["workers"] == 8


@pytest.mark.kube
@pytest.mark.slow
def test_status_conditions_follow_the_api_conventions(
        kube_cluster: TestCluster, namespace: str) -> None:
    """What the operator writes is accepted; one condition per type (a map keyed by type)."""
    _, status = new_job(kube_cluster, namespace)
    error = {"task": "map-00000", "attempt": 3, "message": "boom"}
    conditions = job_conditions(JobPhase.FAILED, error, 1, [], "2026-01-02T03:04:05Z")
    written = status(phase="Failed", conditions=conditions)["status"]["conditions"]
    assert written == conditions
    failed = next(c for c in written if c["type"] == "Failed")
    assert failed["status"] == "True" and "map-00000 attempt 3: boom" in failed["message"]
    twice = [*conditions, {**conditions[0], "message": "again"}]
    with pytest.raises(ApiError, match=r"status.conditions\[4\]: Duplicate value"):
        status(conditions=twice)
    with pytest.raises(ApiError, match=r"status.conditions\[0\].status: Unsupported value"):
        status(conditions=[{**conditions[0], "status": "Yes"}])


def _task(name: str, **status: Any) -> dict[str, Any]:
    body = {"kind": "map", "index": 0, "input": "s3://data/a", "range": [0, 10],
            "state": "pending", "attempt": 0, "failures": 0, "worker": "",
            "leaseExpires": 0.0, "outputs": None, "error": "", "seq": 0, **status}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MapReduceTask",
            "metadata": {"name": name}, "status": body}


@pytest.mark.kube
@pytest.mark.slow
def test_task_schema_keeps_nulls_and_rejects_bad_records(
        kube_cluster: TestCluster, namespace: str) -> None:
    created = kube_cluster.api("POST", TASKS.format(ns=namespace),
                               _task("j-reduce-00000", kind="reduce", input=None, range=None))
    assert created["status"]["input"] is None and created["status"]["outputs"] is None
    with pytest.raises(ApiError, match=r"status.state: Unsupported value"):
        kube_cluster.api("POST", TASKS.format(ns=namespace), _task("j-map-1", state="done"))
    missing = _task("j-map-2")
    del missing["status"]["seq"]
    with pytest.raises(ApiError, match=r"status.seq: Required value"):
        kube_cluster.api("POST", TASKS.format(ns=namespace), missing)


async def _table(kube: Kube, path: str) -> dict[str, Any]:
    """A `kubectl get`-style Table, as the server renders it from the printer columns."""
    return await kube.request("GET", path, context=f"reading a table of {path}", accept=TABLE)


@pytest.mark.anyio
@pytest.mark.kube
@pytest.mark.slow
async def test_printer_columns_show_progress(
        kube_cluster: TestCluster, admin: Kube, namespace: str) -> None:
    job = kube_cluster.api("POST", JOBS.format(ns=namespace), valid_job(workers=3))
    name = job["metadata"]["name"]
    kube_cluster.api("PATCH", f"{JOBS.format(ns=namespace)}/{name}/status",
                     {"status": {"phase": "Running", "maps": 12, "mapsDone": 5, "reduces": 2,
                                 "reducesDone": 0}},
                     content_type=MERGE)
    table = await _table(admin, JOBS.format(ns=namespace))
    columns = [c["name"] for c in table["columnDefinitions"]]
    assert columns == ["Name", "Phase", "Maps Done", "Maps", "Reduces Done", "Reduces",
                       "Workers", "Image", "Age"]
    assert table["rows"][0]["cells"][:8] == [name, "Running", 5, 12, 0, 2, 3,
                                             "example/wordcount:1"]

    task = copy.deepcopy(_task(f"{name}-map-00000", state="running", attempt=2,
                               worker="pod-a"))
    kube_cluster.api("POST", TASKS.format(ns=namespace), task)
    table = await _table(admin, TASKS.format(ns=namespace))
    assert [c["name"] for c in table["columnDefinitions"]] == [
        "Name", "State", "Attempt", "Worker", "Kind", "Input", "Age"]
    assert table["rows"][0]["cells"][:4] == [f"{name}-map-00000", "running", 2, "pod-a"]


@pytest.mark.anyio
@pytest.mark.kube
@pytest.mark.slow
async def test_ensure_crds_is_idempotent(admin: Kube, kube_cluster: TestCluster) -> None:
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    before = {n: kube_cluster.api("GET", f"{path}/{c['metadata']['name']}")
              for n, c in manifests().items()}
    await ensure_crds(admin)
    for file_name, generated in manifests().items():
        after = kube_cluster.api("GET", f"{path}/{generated['metadata']['name']}")
        assert after["metadata"]["resourceVersion"] == (
            before[file_name]["metadata"]["resourceVersion"]), "a no-op apply changed the CRD"
        assert after["spec"]["versions"] == generated["spec"]["versions"]
