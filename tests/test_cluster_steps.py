"""A multi-step job (``Pipeline``) as one MapReduceJob: real kube-apiserver, S3 and operator.

The operator plans each next step over the parts of the step before (it imports no job
module), the workers run whichever step is current, and `kubemr retry` resumes a job in
the step that failed, without running the steps before it again.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from kubemr_async import protocol
from kubemr_async.protocol import JobView
from kubemr_async.testing.cluster import TestCluster

from .operator_fixtures import BUCKET, kube_namespace, operator, s3
from .test_cli import GROUP_PATH, IMAGE, Cli, cli, completed, job_path, ok, one_line_error
from .test_operator_e2e import events_for
from .test_steps import three_steps_reference

__all__ = ["cli", "kube_namespace", "operator", "s3"]  # fixtures, used by name
pytestmark = [pytest.mark.kube, pytest.mark.s3, pytest.mark.slow]

OUTPUT = f"s3://{BUCKET}/steps"


def submit_three_steps(cli: Cli, *args: str) -> subprocess.CompletedProcess[str]:
    """`kubemr submit` of tests/jobs/three_steps.py by flags: submit reads the module for
    spec.steps and spec.stepReducers (3 reducers, but the last step fixes 2)."""
    return cli("submit", "--image", IMAGE, "--job", "tests.jobs.three_steps:steps",
               "--input", f"s3://{BUCKET}/data/", "--output", OUTPUT, "--reducers", "3",
               "--workers", "2", "--chunk-size", "40k", *args, "--wait", timeout=600)


def result_lines(s3: Any, status: dict[str, Any]) -> list[bytes]:
    lines = []
    for url in status["results"]:
        body = s3.get_object(Bucket=BUCKET, Key=url.removeprefix(f"s3://{BUCKET}/"))["Body"]
        lines += body.read().splitlines()
    return sorted(lines)


def left_in_bucket(s3: Any, namespace: str, name: str) -> list[str]:
    prefix = f"steps/{namespace}/{name}/"
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"].removeprefix(prefix) for item in listing.get("Contents", []))


def test_a_three_step_job_runs_as_one_mapreducejob(
        cli: Cli, kube_cluster: TestCluster, s3: Any) -> None:
    result = submit_three_steps(cli)
    name = ok(result).strip()
    status = completed(kube_cluster, cli.namespace, name)
    assert status["phase"] == "Succeeded", status
    spec = kube_cluster.api("GET", job_path(cli.namespace, name))["spec"]
    assert (spec["steps"], spec["stepReducers"], spec["reducers"]) == (3, [3, 3, 2], 3)
    assert status["step"] == 2 and len(status["results"]) == 2
    assert all("/s3/output/part-" in url for url in status["results"]), status["results"]
    assert result_lines(s3, status) == three_steps_reference()[2]
    advanced = sorted(e["message"] for e in events_for(kube_cluster, cli.namespace, name)
                      if e["reason"] == "Advanced")
    assert [m.split(":")[0] for m in advanced] == ["step 2/3", "step 3/3"], advanced
    # Every earlier step's data went; the last step's parts, the manifest and the
    # timeline's attempts (for `kubemr timeline` once the task records are gone) stay.
    left = left_in_bucket(s3, cli.namespace, name)
    assert left == sorted(["_SUCCESS", "_timeline.json", *(url.rsplit(f"{name}/", 1)[1]
                                         for url in status["results"])]), left


def test_a_failed_step_is_retried_without_running_the_steps_before_it(
        cli: Cli, kube_cluster: TestCluster, s3: Any, tmp_path: Path) -> None:
    log = tmp_path / "attempts.log"
    result = submit_three_steps(cli, "--max-attempts", "1", "--arg", "fail_once=2",
                                "--arg", f"log={log}")
    assert "step 2 was told to fail" in one_line_error(result, 1)
    name = result.stdout.strip()
    status = completed(kube_cluster, cli.namespace, name)
    assert status["phase"] == "Failed" and status["step"] == 1, status
    assert status["error"]["task"].startswith("s2-reduce-"), status["error"]
    # What `kubemr retry` applies: only step 2's tasks that had not committed reopen.
    task_ns = status["taskNamespace"]
    tasks = kube_cluster.api("GET", f"{GROUP_PATH}/namespaces/{task_ns}/mapreducetasks")
    records: dict[str, Any] = {t["metadata"]["labels"]["kubemr.io/task"]: t["status"]
                               for t in tasks["items"]}
    step_one = {key: (body["attempt"], body["seq"]) for key, body in records.items()
                if "step" not in body}
    assert step_one and all(body["state"] == "committed" for key, body in records.items()
                            if key in step_one)
    job = kube_cluster.api("GET", job_path(cli.namespace, name))
    view = JobView({protocol.JOB_KEY: {"spec": job["spec"], **job["status"]}, **records})
    reopened = {u.key for u in protocol.retry(view)} - {protocol.JOB_KEY}
    assert "s2-reduce-00000" in reopened, reopened
    assert all(key.startswith("s2-reduce-") for key in reopened), reopened
    ran_before = log.read_text().splitlines()

    retried = cli("retry", name, "--wait")
    assert retried.returncode == 0, retried.stderr
    assert f"job {name} succeeded" in retried.stderr
    status = completed(kube_cluster, cli.namespace, name)
    assert status["phase"] == "Succeeded" and status["step"] == 2, status
    assert result_lines(s3, status) == three_steps_reference()[2]
    ran_after = log.read_text().splitlines()[len(ran_before):]
    assert ran_after, "the retry ran tasks"
    again = sorted(line for line in ran_after if not line.startswith(("s2-reduce-", "s3-")))
    assert again == [], f"tasks of committed steps (or step 2's maps) ran again: {again}"
    assert reopened <= {line.split()[0] for line in ran_after}, (reopened, ran_after)
