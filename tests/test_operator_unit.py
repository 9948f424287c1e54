"""The operator's pure parts: what it would write (no cluster, no API calls)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubemr_async.conditions import job_conditions
from kubemr_async.deaths import STUCK_EXIT_CODE
from kubemr_async.errors import UsageError
from kubemr_async.operator import FINALIZER, OperatorConfig, worker_names
from kubemr_async.operator import resources as build
from kubemr_async.operator.admission import StorageAccess
from kubemr_async.operator.controller import ChangeFilter
from kubemr_async.operator.pool import may_adopt
from kubemr_async.protocol import JobPhase, Progress

MRJ: dict[str, Any] = {
    "metadata": {"name": "wc-1", "namespace": "team", "uid": "u-1", "generation": 1},
    "spec": {"image": "img:1", "workers": 3, "job": "examples.wordcount",
             "inputs": ["s3://b/in/"], "output": "s3://bkt/out"},
}


def mrj_with(spec: dict[str, Any] | None = None, **parts: Any) -> dict[str, Any]:
    mrj = copy.deepcopy(MRJ)
    mrj["spec"].update(spec or {})
    mrj.update(parts)
    return mrj


def job_for(template: dict[str, Any] | None = None) -> dict[str, Any]:
    return build.worker_job(mrj_with({"template": template} if template else None),
                      OperatorConfig(), [])


def test_worker_job_is_owned_and_parallel() -> None:
    job = job_for()
    assert job["metadata"]["name"] == "wc-1-workers" == worker_names("wc-1")[1]
    spec = job["spec"]
    # One index per worker, each with its own failure count (and backoff before a new pod).
    assert (spec["parallelism"], spec["completions"], spec["completionMode"]) == (
        3, 3, "Indexed")
    assert spec["backoffLimitPerIndex"] == OperatorConfig().worker_backoff_limit
    assert spec["maxFailedIndexes"] == 0 and "backoffLimit" not in spec
    # Kills, disruptions and a stuck worker's exit are not counted: the operator judges
    # crash loops (crashloop), and maxAttempts bounds a stuck worker's timed-out attempts.
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        {"action": "Ignore", "onExitCodes": {"containerName": "worker", "operator": "In",
                                             "values": [STUCK_EXIT_CODE, 137, 143]}}]
    assert spec["template"]["spec"]["containers"][0]["terminationMessagePolicy"] == \
        "FallbackToLogsOnError"
    # A template that restarts in place cannot have either (the API refuses them).
    restarting = job_for({"spec": {"restartPolicy": "OnFailure"}})["spec"]
    assert restarting["backoffLimit"] == OperatorConfig().worker_backoff_limit
    assert not {"podFailurePolicy", "completionMode", "backoffLimitPerIndex"} & set(restarting)
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("MapReduceJob", "u-1", True)
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "kubemr-worker-wc-1"
    assert pod["containers"][0]["command"] == ["kubemr", "worker"]


def test_template_merges_containers_by_name_but_cannot_change_identity() -> None:
    job = job_for({"spec": {"serviceAccountName": "admin", "serviceAccount": "admin",
                            "nodeSelector": {"pool": "batch"},
                            "containers": [{"name": "worker",
                                            "resources": {"limits": {"cpu": "2"}}},
                                           {"name": "sidecar", "image": "side:1"}]}})
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "kubemr-worker-wc-1" and "serviceAccount" not in pod
    assert pod["nodeSelector"] == {"pool": "batch"}
    worker, sidecar = pod["containers"]
    assert worker["image"] == "img:1" and worker["resources"]["limits"]["cpu"] == "2"
    assert worker["command"] == ["kubemr", "worker"], "merged, not replaced"
    assert sidecar == {"name": "sidecar", "image": "side:1"}
    assert MRJ["spec"].get("template") is None, "the job object is not modified"


def test_long_names_stay_valid_object_names() -> None:
    account, job = worker_names("x" * 63)
    assert len(account) <= 63 and len(job) <= 63
    assert not account.endswith("-") and not job.endswith("-")


def test_worker_roles_reach_only_this_jobs_objects() -> None:
    role = build.job_role(MRJ)
    assert role["metadata"]["namespace"] == "team"
    assert all(rule["resourceNames"] == ["wc-1"] for rule in role["rules"])
    assert {r for rule in role["rules"] for r in rule["resources"]} == {
        "mapreducejobs", "mapreducejobs/status"}
    tasks = build.task_role(MRJ, "kubemr-team-wc-1-abc")
    assert tasks["metadata"]["namespace"] == "kubemr-team-wc-1-abc"
    assert "ownerReferences" not in tasks["metadata"], "no owner across namespaces"
    assert tasks["rules"][0]["resources"] == ["mapreducetasks"]
    assert "create" not in tasks["rules"][0]["verbs"] and "delete" not in tasks["rules"][0]["verbs"]


def test_bindings_name_the_account_beside_the_job_wherever_the_role_is() -> None:
    account = build.service_account(MRJ)
    assert account["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    for role in (build.job_role(MRJ), build.task_role(MRJ, "elsewhere")):
        binding = build.role_binding(MRJ, role)
        assert binding["metadata"] == role["metadata"]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": account["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount",
                                        "name": account["metadata"]["name"],
                                        "namespace": "team"}]


def test_secret_copy_is_owned_and_the_env_refers_to_it() -> None:
    copied = build.secret_copy(MRJ, {"AWS_ACCESS_KEY_ID": "a2V5",
                                     "AWS_SECRET_ACCESS_KEY": "c2VjcmV0"})
    assert copied["metadata"]["name"] == "wc-1-s3"
    assert copied["metadata"]["namespace"] == "team"
    assert copied["metadata"]["ownerReferences"][0]["name"] == "wc-1"
    config = OperatorConfig(s3_endpoint="http://s3:9000", s3_region="eu-west-1")
    env = {e["name"]: e for e in build.worker_env(MRJ, config, "wc-1-s3")}
    assert env["KUBEMR_JOB"]["value"] == "wc-1" and env["KUBEMR_NAMESPACE"]["value"] == "team"
    assert env["KUBEMR_S3_ENDPOINT"]["value"] == "http://s3:9000"
    assert env["AWS_REGION"]["value"] == "eu-west-1"
    assert env["MALLOC_ARENA_MAX"]["value"] == "2"  # RSS near the budget (spec.py)
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "wc-1-s3", "key": "AWS_SECRET_ACCESS_KEY"}
    bare = {e["name"] for e in build.worker_env(MRJ, OperatorConfig())}
    assert not bare & {"KUBEMR_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_failed_or_stuck_workers_say_why() -> None:
    assert build.workers_failed({"status": {}}) is None
    failed = {"status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": ""}]}}
    assert build.workers_failed(failed) == "worker pods failed (BackoffLimitExceeded): no message"

    def pod(reason: str | None) -> dict[str, Any]:
        state = {"waiting": {"reason": reason, "message": "m"}} if reason else {"running": {}}
        return {"status": {"containerStatuses": [{"state": state}]}}

    assert build.pods_stuck([]) is None, "no pods yet is not stuck"
    assert build.pods_stuck([pod("ImagePullBackOff"), pod(None)]) is None, "one may still work"
    assert build.pods_stuck([pod("ContainerCreating")]) is None, "waiting that passes"
    assert build.pods_stuck([pod("ErrImagePull"), pod("ImagePullBackOff")]) == \
        "worker pods cannot start: ErrImagePull: m"


def test_workers_killed_for_memory_say_so() -> None:
    def pod(reason: str) -> dict[str, Any]:
        return {"spec": {"containers": [{"name": "worker",
                                         "resources": {"limits": {"memory": "64Mi"}}}]},
                "status": {"containerStatuses": [
                    {"state": {"terminated": {"reason": reason, "exitCode": 137}}}]}}

    assert build.pods_out_of_memory([]) is None
    assert build.pods_out_of_memory([pod("Error")]) is None, "a crash is not out of memory"
    assert build.pods_out_of_memory([pod("OOMKilled"), pod("Error"), pod("OOMKilled")]) == (
        "2 of 3 worker pods ran out of memory (OOMKilled; memory limit 64Mi): "
        "raise the workers' memory limit")


def test_finalizer_patches() -> None:
    assert build.add_finalizer(mrj_with(metadata={**MRJ["metadata"],
                                            "finalizers": [FINALIZER]})) is None
    assert build.add_finalizer(MRJ) == [{"op": "add", "path": "/metadata/finalizers",
                                   "value": [FINALIZER]}]
    assert build.remove_finalizer(MRJ) is None
    ours = mrj_with(metadata={**MRJ["metadata"], "finalizers": ["other", FINALIZER]})
    assert build.remove_finalizer(ours) == [
        {"op": "test", "path": "/metadata/finalizers", "value": ["other", FINALIZER]},
        {"op": "replace", "path": "/metadata/finalizers", "value": ["other"]}]


def test_status_patch_writes_only_what_changed() -> None:
    patch = build.status_patch(MRJ, JobPhase.RUNNING, None, "t1")
    assert patch is not None and set(patch["status"]) == {"conditions"}
    current = mrj_with(status=patch["status"])
    assert build.status_patch(current, JobPhase.RUNNING, None, "t2") is None, "conditions current"
    fields = {**build.progress_fields(Progress(3, 3, 1, 2, 0, 0)), "completionTime": "t3"}
    assert fields == {"mapsDone": 3, "reduces": 2, "reducesDone": 1, "completionTime": "t3"}
    done = build.status_patch(current, JobPhase.SUCCEEDED, fields, "t3")
    assert done is not None and done["status"]["completionTime"] == "t3"
    succeeded = next(c for c in done["status"]["conditions"] if c["type"] == "Succeeded")
    assert succeeded["status"] == "True" and succeeded["lastTransitionTime"] == "t3"


def test_an_invalid_job_fails_with_the_next_seq() -> None:
    status = build.invalid_job_status(mrj_with(status={"seq": 4}), "invalid job: no inputs")
    assert status["status"]["phase"] == "Failed" and status["status"]["seq"] == 5
    assert status["status"]["error"]["message"] == "invalid job: no inputs"


def test_ttl_counts_from_the_completion_time() -> None:
    at = datetime(2026, 1, 1, 12, 0, 10, tzinfo=UTC)
    assert build.ttl_remaining(MRJ, at) is None
    ttl = mrj_with({"ttlSecondsAfterFinished": 30},
                   status={"completionTime": "2026-01-01T12:00:00Z"})
    assert build.ttl_remaining(ttl, at) == 20
    assert build.ttl_remaining(ttl, at + timedelta(minutes=1)) == -40
    unstamped = mrj_with({"ttlSecondsAfterFinished": 30})
    assert build.ttl_remaining(unstamped, at) == 30, "just finished: the whole TTL"


def test_events_are_about_the_job() -> None:
    body = build.event(MRJ["metadata"], "Planned", "x" * 2000, False, "t")
    assert body["metadata"] == {"generateName": "wc-1.", "namespace": "team"}
    assert body["involvedObject"] == {"apiVersion": "kubemr.io/v1alpha1",
                                      "kind": "MapReduceJob", "name": "wc-1",
                                      "namespace": "team", "uid": "u-1"}
    assert body["type"] == "Normal" and len(body["message"]) == 1024
    unknown = build.event({"name": "gone", "namespace": "team", "uid": ""}, "ReconcileError", "e",
                    True, "t")
    assert "uid" not in unknown["involvedObject"] and unknown["type"] == "Warning"


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


def test_watch_events_that_change_nothing_a_reconcile_acts_on_are_dropped() -> None:
    changes = ChangeFilter()
    running = mrj_with(status={"phase": "Running"})
    changes.relisted([running, mrj_with(metadata={"namespace": "team", "name": "gone"})])
    assert len(changes) == 2
    progress = mrj_with(status={"phase": "Running", "mapsDone": 2})
    assert not changes.changed("MODIFIED", progress), "listed already: progress only"
    succeeded = mrj_with(status={"phase": "Succeeded"})
    assert changes.changed("MODIFIED", succeeded)
    assert not changes.changed("MODIFIED", succeeded)
    deleting = mrj_with(metadata={**MRJ["metadata"], "deletionTimestamp": "t"},
                        status={"phase": "Succeeded"})
    assert changes.changed("MODIFIED", deleting)
    assert changes.changed("DELETED", deleting)
    changes.relisted([])
    assert len(changes) == 0, "a re-list forgets jobs that went away unseen"


def test_workers_spill_to_an_empty_dir_unless_the_template_gives_its_own() -> None:
    pod = job_for()["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": build.SCRATCH_VOLUME, "emptyDir": {}}]
    assert pod["containers"][0]["volumeMounts"] == [
        {"name": build.SCRATCH_VOLUME, "mountPath": "/tmp"}]
    # A template's own volumes are kept beside ours; its own scratch definition wins.
    memory = {"name": build.SCRATCH_VOLUME, "emptyDir": {"medium": "Memory"}}
    pod = job_for({"spec": {"volumes": [{"name": "data", "emptyDir": {}}, memory]}})[
        "spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "data", "emptyDir": {}}, memory]
    # Something of its own mounted at /tmp: nothing is added.
    own = {"name": "data", "mountPath": "/tmp/"}
    pod = job_for({"spec": {"volumes": [{"name": "data", "emptyDir": {}}],
                            "containers": [{"name": "worker", "volumeMounts": [own]}]}})[
        "spec"]["template"]["spec"]
    assert pod["containers"][0]["volumeMounts"] == [own]
    assert pod["volumes"] == [{"name": "data", "emptyDir": {}}]


def test_workers_serve_metrics_with_scrape_annotations_only_when_configured() -> None:
    config = OperatorConfig(worker_metrics_port=9090, worker_metrics_linger=12.5)
    env = build.worker_env(MRJ, config)
    pod = build.worker_job(MRJ, config, env)["spec"]["template"]
    assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "true",
                                              "prometheus.io/port": "9090",
                                              "prometheus.io/path": "/metrics"}
    assert pod["spec"]["containers"][0]["ports"] == [
        {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    values = {e["name"]: e.get("value") for e in env}
    assert values["KUBEMR_METRICS_PORT"] == "9090"
    assert values["KUBEMR_METRICS_LINGER_SECONDS"] == "12.5"
    plain = job_for()["spec"]["template"]
    assert "annotations" not in plain["metadata"]
    assert "ports" not in plain["spec"]["containers"][0]
    assert "KUBEMR_METRICS_PORT" not in {e["name"] for e in build.worker_env(MRJ, OperatorConfig())}


def test_jobs_are_counted_by_the_phase_the_watch_last_saw() -> None:
    changes = ChangeFilter()
    changes.relisted([mrj_with(status={"phase": "Running"}),
                      mrj_with(metadata={"namespace": "team", "name": "new"})])
    assert changes.phases() == {"Running": 1, "Pending": 1}
    changes.changed("MODIFIED", mrj_with(status={"phase": "Succeeded"}))
    assert changes.phases() == {"Succeeded": 1, "Pending": 1}
    changes.changed("DELETED", mrj_with(metadata={"namespace": "team", "name": "new"}))
    assert changes.phases() == {"Succeeded": 1}


# --- the warm pool ---------------------------------------------------------------------

WARM = OperatorConfig(warm_workers=1, warm_image="img:1", s3_endpoint="http://s3:9000")


def test_a_standby_runs_the_pod_a_job_of_its_image_would_run_but_for_the_job() -> None:
    """What lets a standby stand in for a job's worker: the same container (image,
    command, security context, scratch volume), only its identity and job env differ."""
    job_pod = build.worker_job(MRJ, WARM, build.worker_env(MRJ, WARM, "s"))["spec"]["template"]
    standby = build.standby_pod("kubemr-standby-ab", "pool", WARM, "s")
    assert standby["metadata"]["namespace"] == "pool"
    assert standby["spec"]["serviceAccountName"] == "kubemr-standby-ab"
    drop_env = [{k: v for k, v in c.items() if k != "env"}
                for c in (job_pod["spec"]["containers"][0], standby["spec"]["containers"][0])]
    assert drop_env[0] == drop_env[1]
    pod_level = [{k: v for k, v in pod["spec"].items()
                  if k not in ("serviceAccountName", "containers")} for pod in (job_pod, standby)]
    assert pod_level[0] == pod_level[1]
    env = {e["name"]: e for e in standby["spec"]["containers"][0]["env"]}
    assert "KUBEMR_JOB" not in env and env["KUBEMR_STANDBY_POD"]["value"] == "kubemr-standby-ab"
    job_env = {e["name"]: e for e in job_pod["spec"]["containers"][0]["env"]}
    shared = set(job_env) - {"KUBEMR_JOB", "KUBEMR_NAMESPACE"}
    assert {name: env[name] for name in shared} == {name: job_env[name] for name in shared}
    # Before adoption its account reads its own pod and nothing else.
    assert build.standby_role("kubemr-standby-ab", "pool")["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "resourceNames": ["kubemr-standby-ab"],
         "verbs": ["get", "list", "watch"]}]


def test_an_adopting_job_starts_one_pod_fewer_and_binds_the_standby() -> None:
    adopting = build.worker_job(MRJ, WARM, [], standby="kubemr-standby-ab")
    assert (adopting["spec"]["parallelism"], adopting["spec"]["completions"]) == (2, 3)
    assert build.workers_adopted(adopting) == "kubemr-standby-ab"
    assert build.workers_adopted(build.worker_job(MRJ, WARM, [])) is None
    alone = build.worker_job(mrj_with({"workers": 1}), WARM, [], standby="kubemr-standby-ab")
    assert (alone["spec"]["parallelism"], alone["spec"]["completions"]) == (0, 1)
    role = build.job_role(MRJ)
    binding = build.role_binding(MRJ, role, ("pool", "kubemr-standby-ab"))
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kubemr-worker-wc-1", "namespace": "team"},
        {"kind": "ServiceAccount", "name": "kubemr-standby-ab", "namespace": "pool"}]
    assert build.role_binding(MRJ, role)["subjects"] == binding["subjects"][:1]


def test_only_a_job_whose_pod_would_be_a_standbys_may_adopt_one() -> None:
    platform = StorageAccess("wc-1-s3", None, None, {}, platform=True)
    tenant = StorageAccess("team-s3", None, None, {})
    identity = StorageAccess(None, None, {"eks.amazonaws.com/role-arn": "arn"}, {})
    assert may_adopt(MRJ, WARM, platform)
    assert not may_adopt(MRJ, WARM, tenant) and not may_adopt(MRJ, WARM, identity)
    assert not may_adopt(mrj_with({"image": "img:2"}), WARM, platform)
    shaped = mrj_with({"template": {"spec": {"nodeSelector": {"disk": "ssd"}}}})
    assert not may_adopt(shaped, WARM, platform)
    assert not may_adopt(MRJ, OperatorConfig(), platform)


def test_a_warm_pool_without_its_image_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--warm-workers needs --warm-image"):
        OperatorConfig(warm_workers=2)
    with pytest.raises(UsageError, match="--warm-workers must be 0 or more"):
        OperatorConfig(warm_workers=-1, warm_image="img:1")
