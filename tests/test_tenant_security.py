"""Tenant security (issue 13, docs/security.md) end to end, acting as a tenant.

The tenant is a ServiceAccount of namespace ``team-a`` holding one Role: create, get, list,
watch and delete MapReduceJobs there, nothing else (no Secrets, no pods). Everything it does
goes through the `kubemr` CLI with that identity; the admin (the test's own kubeconfig)
only prepares what a platform team would: the team's bucket and key on the S3 server
(versitygw, which checks every signature), the team's Secret, namespace labels.

The operator runs as tests/operator_fixtures.py starts it, watching ``team-a``, with the
admin's settings of the chart: the platform's credentials only in namespaces labelled
``kubemr.io/platform-storage=allowed``, Pod Security ``baseline`` only where labelled
``kubemr.io/pod-security=baseline``. Known key values are planted (the team's, a wrong
one, the platform's: tests/leaks.py searches the whole suite's output for them too) and the
last test makes every kind of CLI output of every job and searches all that the module
produced for them.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from kubemr_async.testing.cluster import ApiError, TestCluster
from kubemr_async.testing.kubelet import FakeKubelet
from kubemr_async.testing.planted import Planted
from kubemr_async.testing.s3server import S3Server

from .operator_fixtures import BUCKET, DATA, operator, s3
from .test_local_run import KUBEMR, ROOT
from .test_operator_e2e import events_for, jobs_path, wait_for_phase, wait_gone

__all__ = ["operator", "s3"]  # fixtures, used by name

pytestmark = [pytest.mark.kube, pytest.mark.s3, pytest.mark.slow]

TEAM = "team-a"
ALLOW_PLATFORM = "kubemr.io/platform-storage"
POD_SECURITY = "kubemr.io/pod-security"
ROLE_ARN = "arn:aws:iam::111122223333:role/team-a-jobs"
TEAM_SECRET = "team-a-s3"
#: Every CLI output of the module, for the last test's search.
OUTPUTS: list[str] = []


@dataclass(frozen=True)
class Tenant:
    kubeconfig: Path
    access_key: str
    secret_key: str
    bucket: str
    s3: Any  # a boto3 client with the team's keys
    workdir: Path


# --- the module's namespace, operator settings and tenant --------------------------------


@pytest.fixture(scope="module")
def kube_namespace(kube_cluster: TestCluster) -> Iterator[str]:
    """``team-a``, the only namespace this module's operator watches."""
    kube_cluster.create_namespace(TEAM)
    yield TEAM
    kube_cluster.api("DELETE", f"/api/v1/namespaces/{TEAM}")


@pytest.fixture(scope="module")
def platform_namespaces() -> str:
    return f"{ALLOW_PLATFORM}=allowed"


@pytest.fixture(scope="module")
def operator_args() -> list[str]:
    return ["--baseline-namespaces", f"{POD_SECURITY}=baseline"]


@pytest.fixture(scope="module")
def tenant(kube_cluster: TestCluster, crds: None, kube_namespace: str, s3_server: S3Server,
           s3: Any, planted: Planted, tmp_path_factory: pytest.TempPathFactory) -> Tenant:
    """The team's S3 account and bucket (with the example data), its Secret in team-a,
    and its identity on the API server: a Role on MapReduceJobs and nothing else."""
    tag = uuid.uuid4().hex[:8]
    access = planted.plant("team-a's access key id", "access")
    secret = planted.plant("team-a's secret key", "secret")
    bucket = f"team-a-data-{tag}"
    s3_server.add_tenant(access, secret, bucket)
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id=access,
                          aws_secret_access_key=secret, region_name=s3_server.region)
    for path in sorted(DATA.iterdir()):
        client.put_object(Bucket=bucket, Key=f"data/{path.name}", Body=path.read_bytes())
    create_secret(kube_cluster, TEAM_SECRET, access, secret)
    api = f"/api/v1/namespaces/{TEAM}"
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{TEAM}"
    kube_cluster.api("POST", f"{api}/serviceaccounts", {"metadata": {"name": "alice"}})
    kube_cluster.api("POST", f"{rbac}/roles", {
        "metadata": {"name": "mapreducejobs"},
        "rules": [{"apiGroups": ["kubemr.io"], "resources": ["mapreducejobs"],
                   "verbs": ["create", "get", "list", "watch", "delete"]}]})
    kube_cluster.api("POST", f"{rbac}/rolebindings", {
        "metadata": {"name": "alice-mapreducejobs"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": "mapreducejobs"},
        "subjects": [{"kind": "ServiceAccount", "name": "alice", "namespace": TEAM}]})
    workdir = tmp_path_factory.mktemp("tenant")
    kubeconfig = kube_cluster.kubeconfig_for_token(kube_cluster.token_for(TEAM, "alice"),
                                                   workdir / "alice.kubeconfig")
    return Tenant(kubeconfig, access, secret, bucket, client, workdir)


def create_secret(cluster: TestCluster, name: str, access: str, secret: str) -> None:
    """A credentials Secret of the team's (made by the admin: the tenant may not)."""
    cluster.api("POST", f"/api/v1/namespaces/{TEAM}/secrets", {
        "metadata": {"name": name},
        "stringData": {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret}})


def kubemr(tenant: Tenant, s3_server: S3Server, *args: str,
           kubeconfig: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as the tenant (its kubeconfig, its own S3 keys); output kept for the search."""
    env = {"PATH": str(Path(KUBEMR).parent), "PYTHONPATH": str(ROOT),
           "HOME": os.environ.get("HOME", "/tmp"), "KUBEMR_S3_ENDPOINT": s3_server.endpoint_url,
           "AWS_ACCESS_KEY_ID": tenant.access_key, "AWS_SECRET_ACCESS_KEY": tenant.secret_key,
           "AWS_REGION": s3_server.region}
    proc = subprocess.run([KUBEMR, *args, "--kubeconfig", str(kubeconfig or tenant.kubeconfig),
                           "-n", TEAM], capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    OUTPUTS.append(f"$ kubemr {' '.join(args)}\n{proc.stdout}{proc.stderr}")
    return proc


def submit(tenant: Tenant, s3_server: S3Server, manifest: dict[str, Any],
           *flags: str) -> subprocess.CompletedProcess[str]:
    path = tenant.workdir / f"job-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return kubemr(tenant, s3_server, "submit", str(path), *flags)


def wordcount(inputs: str, output: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "kubemr.io/v1alpha1", "kind": "MapReduceJob",
            "metadata": {"generateName": "wc-"},
            "spec": {"image": "kubemr-wordcount:latest", "job": "examples.wordcount",
                     "workers": 1, "reducers": 1, "inputs": [inputs], "output": output,
                     **spec}}


def team_job(tenant: Tenant, **spec: Any) -> dict[str, Any]:
    """Word count over the team's own bucket."""
    return wordcount(f"s3://{tenant.bucket}/data/", f"s3://{tenant.bucket}/results", **spec)


def expected_counts() -> list[bytes]:
    counts: Counter[bytes] = Counter()
    for path in DATA.iterdir():
        counts.update(path.read_bytes().split())
    return sorted(w + b"\t" + str(n).encode() for w, n in counts.items())


def results_of(client: Any, job: dict[str, Any]) -> list[bytes]:
    lines: list[bytes] = []
    for url in job["status"]["results"]:
        bucket, _, key = url[len("s3://"):].partition("/")
        lines += client.get_object(Bucket=bucket, Key=key)["Body"].read().splitlines()
    return sorted(lines)


def label_team(cluster: TestCluster, key: str, value: str | None) -> None:
    """The admin labels (or unlabels) team-a; a tenant cannot."""
    cluster.api("PATCH", f"/api/v1/namespaces/{TEAM}",
                {"metadata": {"labels": {key: value}}},
                content_type="application/merge-patch+json")


def platform_key_holders(cluster: TestCluster, s3_server: S3Server) -> list[str]:
    """Every object in team-a whose content holds the platform's secret key (plain or
    base64, as a Secret's data has it)."""
    search = Planted()
    search.add("the platform's secret key", s3_server.secret_key)
    found = []
    core = f"/api/v1/namespaces/{TEAM}"
    for kind, path in (("Secret", f"{core}/secrets"), ("ConfigMap", f"{core}/configmaps"),
                       ("ServiceAccount", f"{core}/serviceaccounts"), ("Pod", f"{core}/pods"),
                       ("Job", f"/apis/batch/v1/namespaces/{TEAM}/jobs"),
                       ("MapReduceJob", jobs_path(TEAM)), ("Event", f"{core}/events")):
        for obj in cluster.api("GET", path)["items"]:
            if search.find(json.dumps(obj)) is not None:
                found.append(f"{kind}/{obj['metadata']['name']}")
    return found


def created_name(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def run_job(cluster: TestCluster, tenant: Tenant, s3_server: S3Server, operator_log: Path,
            manifest: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Submit as the tenant and wait for the verdict (`--wait` follows the tasks, which
    live in the job's task namespace, where the tenant's Role does not reach); the job,
    and its workers' env as the operator wrote it (the batch Job goes once decided)."""
    name = created_name(submit(tenant, s3_server, manifest))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        with contextlib.suppress(ApiError):
            workers = cluster.api("GET", f"/apis/batch/v1/namespaces/{TEAM}/jobs/"
                                         f"{name}-workers")
            container = workers["spec"]["template"]["spec"]["containers"][0]
            env = {e["name"]: e for e in container["env"]}
            return wait_for_phase(cluster, TEAM, name, operator_log), env
        time.sleep(0.2)
    raise AssertionError(f"no workers for job {name}: {operator_log.read_text()[-3000:]}")


# --- the tenant's identity ---------------------------------------------------------------


def test_the_tenant_holds_only_its_role(kube_cluster: TestCluster, tenant: Tenant,
                                        s3_server: S3Server) -> None:
    """What the tests below lean on: the tenant cannot read Secrets or make pods itself."""
    listed = kubemr(tenant, s3_server, "list")
    assert listed.returncode == 0, listed.stderr
    token = kube_cluster.token_for(TEAM, "alice")
    for method, path, body in (
            ("GET", f"/api/v1/namespaces/{TEAM}/secrets/{TEAM_SECRET}", None),
            ("GET", f"/api/v1/namespaces/{TEAM}/secrets", None),
            ("POST", f"/api/v1/namespaces/{TEAM}/pods",
             {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "x"}]}})):
        with pytest.raises(ApiError) as refused:
            kube_cluster.api(method, path, body, token=token)
        assert refused.value.status == 403, (method, path)


# --- item 1: the tenant's own storage credentials ---------------------------------------


def test_a_job_with_the_teams_own_secret_runs_end_to_end(
        kube_cluster: TestCluster, tenant: Tenant, operator: Path,
        s3_server: S3Server) -> None:
    job, env = run_job(kube_cluster, tenant, s3_server, operator,
                       team_job(tenant, storage={"credentialsSecret": TEAM_SECRET}))
    name = job["metadata"]["name"]
    assert job["status"]["phase"] == "Succeeded", job["status"]
    assert results_of(tenant.s3, job) == expected_counts()
    # The pods reference the team's Secret; nothing of the platform's was made or copied.
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == TEAM_SECRET
    with pytest.raises(ApiError) as missing:
        kube_cluster.api("GET", f"/api/v1/namespaces/{TEAM}/secrets/{name}-s3")
    assert missing.value.status == 404
    assert platform_key_holders(kube_cluster, s3_server) == []


def test_wrong_keys_fail_the_job_naming_the_input(
        kube_cluster: TestCluster, tenant: Tenant, operator: Path,
        s3_server: S3Server, planted: Planted) -> None:
    """The S3 server checks signatures: a Secret with a wrong key cannot plan the job, and
    the team's right keys cannot read the platform's bucket either."""
    wrong = planted.plant("a wrong secret key of team-a's", "wrong")
    create_secret(kube_cluster, "team-a-wrong", tenant.access_key, wrong)
    name = created_name(submit(tenant, s3_server, team_job(
        tenant, storage={"credentialsSecret": "team-a-wrong"})))
    job = wait_for_phase(kube_cluster, TEAM, name, operator)
    message = job["status"]["error"]["message"]
    assert job["status"]["phase"] == "Failed"
    assert f"input s3://{tenant.bucket}/data/: access denied (SignatureDoesNotMatch)" in message
    # Right keys, someone else's bucket (the platform's).
    name = created_name(submit(tenant, s3_server, wordcount(
        f"s3://{BUCKET}/data/", f"s3://{tenant.bucket}/results",
        storage={"credentialsSecret": TEAM_SECRET})))
    job = wait_for_phase(kube_cluster, TEAM, name, operator)
    assert job["status"]["phase"] == "Failed"
    assert "access denied (AccessDenied)" in job["status"]["error"]["message"]


def test_a_job_with_workload_identity_runs_end_to_end(
        kube_cluster: TestCluster, tenant: Tenant, operator: Path, s3_server: S3Server,
        fake_kubelet: FakeKubelet) -> None:
    """The allow-listed annotation lands on the job's ServiceAccount and no static key is
    injected: the workers' credentials are the ambient ones the node gives a pod of that
    account (the test kubelet stands in for EKS's webhook: role ARN -> the team's keys)."""
    fake_kubelet.identities[ROLE_ARN] = {"AWS_ACCESS_KEY_ID": tenant.access_key,
                                         "AWS_SECRET_ACCESS_KEY": tenant.secret_key}
    job, env = run_job(kube_cluster, tenant, s3_server, operator, team_job(
        tenant, storage={"serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": ROLE_ARN}}))
    name = job["metadata"]["name"]
    assert job["status"]["phase"] == "Succeeded", job["status"]
    assert results_of(tenant.s3, job) == expected_counts()
    account = kube_cluster.api("GET", f"/api/v1/namespaces/{TEAM}/serviceaccounts/"
                                      f"kubemr-worker-{name}")
    assert account["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": ROLE_ARN}
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env)
    assert platform_key_holders(kube_cluster, s3_server) == []


def test_a_job_naming_no_credentials_gets_the_platforms_only_where_allowed(
        kube_cluster: TestCluster, tenant: Tenant, operator: Path, s3_server: S3Server,
        s3: Any) -> None:
    platform_job = wordcount(f"s3://{BUCKET}/data/", f"s3://{BUCKET}/results")
    # Not allowed (the default): refused at once, nothing made, no platform key in team-a.
    name = created_name(submit(tenant, s3_server, platform_job))
    job = wait_for_phase(kube_cluster, TEAM, name, operator)
    assert job["status"]["phase"] == "Failed"
    refusal = (f"refused: spec.storage: namespace {TEAM} may not use the platform's storage "
               "credentials")
    assert job["status"]["error"]["message"].startswith(refusal), job["status"]
    warnings = [e for e in events_for(kube_cluster, TEAM, name) if e["type"] == "Warning"]
    assert any(e["message"].startswith(refusal) for e in warnings), warnings
    with pytest.raises(ApiError) as missing:
        kube_cluster.api("GET", f"/apis/batch/v1/namespaces/{TEAM}/jobs/{name}-workers")
    assert missing.value.status == 404
    assert platform_key_holders(kube_cluster, s3_server) == []
    # Allowed by the admin: the job runs on the platform's keys, copied beside it.
    label_team(kube_cluster, ALLOW_PLATFORM, "allowed")
    try:
        job, env = run_job(kube_cluster, tenant, s3_server, operator, platform_job)
        name = job["metadata"]["name"]
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == f"{name}-s3"
        assert job["status"]["phase"] == "Succeeded", job["status"]
        assert results_of(s3, job) == expected_counts()
        assert platform_key_holders(kube_cluster, s3_server) == [f"Secret/{name}-s3"]
    finally:
        label_team(kube_cluster, ALLOW_PLATFORM, None)
    # The copy goes with its job.
    kube_cluster.api("DELETE", jobs_path(TEAM, name))
    wait_gone(kube_cluster, f"/api/v1/namespaces/{TEAM}/secrets/{name}-s3")
    assert platform_key_holders(kube_cluster, s3_server) == []


# --- item 2: no privilege through the operator --------------------------------------------


def worker_overlay(security: dict[str, Any]) -> dict[str, Any]:
    return {"spec": {"containers": [{"name": "worker", "securityContext": security}]}}


Overlays = list[tuple[str, dict[str, Any], str]]  # (case, spec.template, field message)


def overlay_cases(table: Overlays) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(("case", "template", "field"), table,
                                   ids=[case for case, _, _ in table])


REFUSED_BY_THE_OPERATOR: Overlays = [
    ("privileged", worker_overlay({"privileged": True}),
     "spec.template.spec.containers[worker].securityContext.privileged: must not be true"),
    ("hostPath", {"spec": {"volumes": [{"name": "node", "hostPath": {"path": "/"}}]}},
     "spec.template.spec.volumes[node].hostPath: is not allowed"),
    ("hostNetwork", {"spec": {"hostNetwork": True}},
     "spec.template.spec.hostNetwork: must not be true"),
    ("hostPID", {"spec": {"hostPID": True}}, "spec.template.spec.hostPID: must not be true"),
    ("added capability", worker_overlay({"capabilities": {"add": ["SYS_ADMIN"]}}),
     "spec.template.spec.containers[worker].securityContext.capabilities.add: must not add "
     "SYS_ADMIN"),
    ("runAsUser 0", {"spec": {"securityContext": {"runAsUser": 0}}},
     "spec.template.spec.securityContext.runAsUser: must not be 0"),
]


@overlay_cases(REFUSED_BY_THE_OPERATOR)
def test_a_privileged_overlay_is_refused_by_the_operator(
        kube_cluster: TestCluster, tenant: Tenant, operator: Path, s3_server: S3Server,
        case: str, template: dict[str, Any], field: str) -> None:
    """What depends on the namespace's level (so no CRD rule can say it): the job fails at
    once naming the field, with a Warning Event, and no worker is created."""
    name = created_name(submit(tenant, s3_server, team_job(
        tenant, storage={"credentialsSecret": TEAM_SECRET}, template=template)))
    job = wait_for_phase(kube_cluster, TEAM, name, operator)
    message = job["status"]["error"]["message"]
    assert job["status"]["phase"] == "Failed"
    assert message.startswith("refused: Pod Security 'restricted' forbids "), message
    assert field in message, (case, message)
    assert any(field in e["message"] for e in events_for(kube_cluster, TEAM, name)
               if e["type"] == "Warning")
    with pytest.raises(ApiError) as missing:
        kube_cluster.api("GET", f"/apis/batch/v1/namespaces/{TEAM}/jobs/{name}-workers")
    assert missing.value.status == 404


REFUSED_AT_CREATE: Overlays = [
    ("another service account", {"spec": {"serviceAccountName": "default"}},
     "spec.template.spec.serviceAccountName: Invalid value"),
    ("token automount", {"spec": {"automountServiceAccountToken": False}},
     "spec.template.spec.automountServiceAccountToken: Invalid value"),
    ("worker image", {"spec": {"containers": [{"name": "worker", "image": "evil:1"}]}},
     "spec.template.spec.containers: Invalid value"),
    ("worker command", {"spec": {"containers": [{"name": "worker", "command": ["sh"]}]}},
     "spec.template.spec.containers: Invalid value"),
]


@overlay_cases(REFUSED_AT_CREATE)
def test_an_overlay_of_the_workers_identity_is_refused_at_create(
        kube_cluster: TestCluster, tenant: Tenant, operator: Path, s3_server: S3Server,
        case: str, template: dict[str, Any], field: str) -> None:
    """What no namespace may do is in the CRD's CEL rules: `kubemr submit` (the API
    server) refuses it in one line naming the field; the operator would refuse it too
    (tests/test_security_units.py)."""
    before = len(kube_cluster.api("GET", jobs_path(TEAM))["items"])
    proc = submit(tenant, s3_server, team_job(
        tenant, storage={"credentialsSecret": TEAM_SECRET}, template=template))
    assert proc.returncode != 0
    assert field in proc.stderr, (case, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert len(kube_cluster.api("GET", jobs_path(TEAM))["items"]) == before


def test_a_baseline_namespace_accepts_what_baseline_allows(
        kube_cluster: TestCluster, tenant: Tenant, operator: Path, s3_server: S3Server) -> None:
    baseline = {"spec": {"securityContext": {"runAsUser": 0, "runAsNonRoot": False},
                         "containers": [{"name": "worker", "securityContext": {
                             "runAsNonRoot": False, "allowPrivilegeEscalation": True,
                             "capabilities": {"add": ["CHOWN"], "drop": []}}}]}}
    # Restricted (the default) refuses it ...
    name = created_name(submit(tenant, s3_server, team_job(
        tenant, storage={"credentialsSecret": TEAM_SECRET}, template=baseline)))
    job = wait_for_phase(kube_cluster, TEAM, name, operator)
    assert job["status"]["phase"] == "Failed"
    assert "runAsUser: must not be 0" in job["status"]["error"]["message"]
    label_team(kube_cluster, POD_SECURITY, "baseline")
    try:
        # ... a baseline namespace runs it, and still refuses what baseline does not allow.
        job, _ = run_job(kube_cluster, tenant, s3_server, operator, team_job(
            tenant, storage={"credentialsSecret": TEAM_SECRET}, template=baseline))
        assert job["status"]["phase"] == "Succeeded", job["status"]
        name = created_name(submit(tenant, s3_server, team_job(
            tenant, storage={"credentialsSecret": TEAM_SECRET},
            template={"spec": {"hostNetwork": True}})))
        job = wait_for_phase(kube_cluster, TEAM, name, operator)
        assert job["status"]["error"]["message"] == (
            "refused: Pod Security 'baseline' forbids spec.template.spec.hostNetwork: must "
            "not be true")
    finally:
        label_team(kube_cluster, POD_SECURITY, None)


# --- item 3: nothing secret in the open (last: it reads what the others produced) ---------


def test_no_planted_key_in_any_log_event_status_or_cli_output(
        kube_cluster: TestCluster, tenant: Tenant, operator: Path, s3_server: S3Server,
        fake_kubelet: FakeKubelet, planted: Planted) -> None:
    jobs = kube_cluster.api("GET", jobs_path(TEAM))["items"]
    assert len(jobs) >= 10, "the tests above ran first"
    # json and yaml print the raw objects (a list holds every job's; status -o the same
    # one object), so one status per job in the describe form, which words the error.
    for output in ("table", "json", "yaml"):
        kubemr(tenant, s3_server, "list", "-o", output)
    for job in jobs:
        name = job["metadata"]["name"]
        described = kubemr(tenant, s3_server, "status", name)
        assert described.returncode == 0 and "Phase:" in described.stdout, described.stderr
        if job["status"]["phase"] == "Succeeded":
            kubemr(tenant, s3_server, "results", name)
            # Pod logs need pods/log, which the tenant lacks: the admin's kubeconfig.
            kubemr(tenant, s3_server, "logs", name, kubeconfig=kube_cluster.kubeconfig_path)
    name = jobs[0]["metadata"]["name"]
    for output in ("json", "yaml"):
        kubemr(tenant, s3_server, "status", name, "-o", output)
    texts = {"operator log": operator.read_text(errors="replace"),
             "cli output": "\n".join(OUTPUTS),
             "jobs": json.dumps(jobs),
             "events": json.dumps(kube_cluster.api("GET", f"/api/v1/namespaces/{TEAM}/events"))}
    for job in jobs:
        task_ns = (job.get("status") or {}).get("taskNamespace")
        if task_ns:
            with_tasks = kube_cluster.api(
                "GET", f"/apis/kubemr.io/v1alpha1/namespaces/{task_ns}/mapreducetasks")
            texts[f"tasks of {job['metadata']['name']}"] = json.dumps(with_tasks)
    for path in sorted((fake_kubelet.log_dir / TEAM).glob("*.log")):
        texts[f"pod log {path.name}"] = path.read_text(errors="replace")
    assert len(texts) > 4 and "kubemr submit" in texts["cli output"]
    assert {"team-a's secret key", "a wrong secret key of team-a's",
            "the S3 server's secret key"} <= set(planted.labels)
    leaks = [(where, label) for where, text in texts.items()
             if (label := planted.find(text)) is not None]
    assert leaks == [], leaks
