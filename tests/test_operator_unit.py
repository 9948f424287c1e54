"""Pure parts of the operator: the worker Job it would create (no API calls)."""

from __future__ import annotations

from typing import Any

from kubemr_async.conditions import job_conditions
from kubemr_async.operator import Operator, OperatorConfig
from kubemr_async.protocol import JobPhase

MRJ: dict[str, Any] = {
    "metadata": {"name": "wc-1", "namespace": "team", "uid": "u-1"},
    "spec": {"image": "img:1", "workers": 3, "job": "examples.wordcount",
             "inputs": ["s3://b/in/"], "output": "s3://bkt/out"},
}


def worker_job(template: dict[str, Any] | None = None) -> dict[str, Any]:
    mrj = {**MRJ, "spec": {**MRJ["spec"], **({"template": template} if template else {})}}
    operator = Operator.__new__(Operator)
    operator.config = OperatorConfig()
    return operator.worker_job(mrj, "wc-1-workers", "kubemr-worker-wc-1", [])


def test_worker_job_is_owned_and_parallel() -> None:
    job = worker_job()
    assert job["spec"]["parallelism"] == 3 and "completions" not in job["spec"]
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("MapReduceJob", "u-1", True)
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "kubemr-worker-wc-1"
    assert pod["containers"][0]["command"] == ["kubemr", "worker"]


def test_template_merges_containers_by_name_but_cannot_change_identity() -> None:
    job = worker_job({"spec": {"serviceAccountName": "admin", "serviceAccount": "admin",
                               "nodeSelector": {"pool": "batch"},
                               "containers": [{"name": "worker",
                                               "resources": {"limits": {"cpu": "2"}}}]}})
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "kubemr-worker-wc-1" and "serviceAccount" not in pod
    assert pod["nodeSelector"] == {"pool": "batch"}
    (container,) = pod["containers"]
    assert container["image"] == "img:1" and container["resources"]["limits"]["cpu"] == "2"


def test_conditions_follow_the_phase_and_keep_their_transition_times() -> None:
    running = job_conditions(JobPhase.RUNNING, None, 1, [], "t1")
    assert {c["type"]: c["status"] for c in running} == {
        "Running": "True", "Succeeded": "False", "Failed": "False", "Cancelled": "False"}
    assert all(c["reason"] == "Running" and c["observedGeneration"] == 1 for c in running)
    done = job_conditions(JobPhase.SUCCEEDED, None, 2, running, "t2")
    times = {c["type"]: c["lastTransitionTime"] for c in done}
    # Failed and Cancelled stayed False: their times are those of the last change.
    assert times == {"Running": "t2", "Succeeded": "t2", "Failed": "t1", "Cancelled": "t1"}
    assert done == job_conditions(JobPhase.SUCCEEDED, None, 2, done, "t3"), "stable: no write"
    cancelled = job_conditions(JobPhase.CANCELLED, {"task": "", "attempt": 0,
                                                     "message": "cancelled by alice"}, 2, [], "t")
    assert next(c for c in cancelled if c["type"] == "Cancelled")["message"] == \
        "cancelled by alice"
