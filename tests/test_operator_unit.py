"""Pure parts of the operator: the worker Job it would create (no API calls)."""

from __future__ import annotations

from typing import Any

from kubemr_async.operator import Operator, OperatorConfig

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

