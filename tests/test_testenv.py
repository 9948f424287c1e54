"""The test environment is real: these tests pin down the behaviour other tests rely on.

If one of these fails, end-to-end failures elsewhere are probably the environment's fault,
not the code under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiobotocore.session import get_session
from botocore.config import Config

from kubemr_async.testing.cluster import (
    ApiError,
    TestCluster,
    _make_pki_cryptography,
    _make_pki_openssl,
    pinned_versions,
)
from kubemr_async.testing.kubelet import FakeKubelet, expand_refs, local_argv
from kubemr_async.testing.s3server import S3Server

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 60) -> T:
    """Poll ``probe`` until it returns something other than None/False."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


# --------------------------------------------------------------------------- helpers


def job_manifest(name: str, code: str, env: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": "python:3.11-slim",  # never pulled; FakeKubelet runs it
                            "command": ["python", "-c", code],
                            "env": env or [],
                        }
                    ],
                }
            },
        },
    }


def job_pods(cluster: TestCluster, ns: str, job: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.api(
        "GET", f"/api/v1/namespaces/{ns}/pods?labelSelector=job-name%3D{job}"
    )["items"]
    return items


def job_condition(cluster: TestCluster, ns: str, job: str) -> str | None:
    status = cluster.api("GET", f"/apis/batch/v1/namespaces/{ns}/jobs/{job}")["status"]
    for cond in status.get("conditions", []):
        if cond["type"] in ("Complete", "Failed") and cond["status"] == "True":
            return str(cond["type"])
    return None


# ----------------------------------------------------------------------- unit-level


@pytest.mark.parametrize("make_pki", [_make_pki_cryptography, _make_pki_openssl])
def test_pki_serving_cert_verifies_against_ca(
    make_pki: Callable[[Path], None], tmp_path: Path
) -> None:
    make_pki(tmp_path)
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", "ca.crt", "-purpose", "sslserver", "apiserver.crt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert {p.name for p in tmp_path.iterdir()} >= {"ca.crt", "ca.key", "sa.key", "sa.pub"}


def test_env_var_expansion_follows_kubernetes_rules() -> None:
    env = {"A": "1", "B": "two"}
    assert expand_refs("$(A)-$(B)-$(C)-$$(A)", env) == "1-two-$(C)-$(A)"


def test_container_command_maps_onto_this_venv() -> None:
    assert local_argv(["python3", "-V"]) == [sys.executable, "-V"]
    assert local_argv(["/usr/local/bin/kubemr", "run"]) == [
        str(Path(sys.executable).parent / "kubemr"),
        "run",
    ]
    assert local_argv(["sh", "-c", "true"]) == ["sh", "-c", "true"]


# ----------------------------------------------------------------------- Kubernetes


@pytest.mark.kube
@pytest.mark.slow
def test_versions_are_the_pinned_ones(kube_cluster: TestCluster) -> None:
    pinned = pinned_versions()
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:  # someone else's binaries: expect whatever they are
        out = subprocess.run(
            [f"{assets}/kube-apiserver", "--version"], capture_output=True, text=True
        ).stdout
        pinned["K8S_VERSION"] = out.split()[-1]
    version = kube_cluster.api("GET", "/version")
    assert version["gitVersion"] == pinned["K8S_VERSION"]
    assert f"v{version['major']}.{version['minor']}." in pinned["K8S_VERSION"] + "."
    with urllib.request.urlopen(f"{kube_cluster.etcd_url}/version", timeout=10) as resp:
        etcd = json.load(resp)
    if not assets:
        assert f"v{etcd['etcdserver']}" == pinned["ETCD_VERSION"]


@pytest.mark.kube
@pytest.mark.slow
def test_rbac_is_enforced_for_service_account_tokens(
    kube_cluster: TestCluster, kube_namespace: str
) -> None:
    ns = kube_namespace
    kube_cluster.api(
        "POST", f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": "reader"}}
    )
    token = kube_cluster.token_for(ns, "reader")
    secrets = f"/api/v1/namespaces/{ns}/secrets"
    with pytest.raises(ApiError) as denied:
        kube_cluster.api("GET", secrets, token=token)
    assert denied.value.status == 403
    kube_cluster.api("GET", secrets)  # admin may

    # Granting the permission makes the same token work: it is RBAC deciding, not a
    # blanket deny.
    kube_cluster.api(
        "POST",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
        {
            "metadata": {"name": "secret-reader"},
            "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}],
        },
    )
    kube_cluster.api(
        "POST",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
        {
            "metadata": {"name": "secret-reader"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "secret-reader",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}],
        },
    )
    wait_for("RBAC grant to apply", lambda: _can_get(kube_cluster, secrets, token))


def _can_get(cluster: TestCluster, path: str, token: str) -> bool:
    try:
        cluster.api("GET", path, token=token)
    except ApiError as exc:
        if exc.status != 403:
            raise
        return False
    return True


# Runs inside the Pod: prints its env and asks the apiserver who it is, using only the
# kubeconfig the kubelet handed over.
WHOAMI = """
import base64, http.client, json, os, ssl, yaml
cfg = yaml.safe_load(open(os.environ["KUBECONFIG"]))
cluster = cfg["clusters"][0]["cluster"]
ctx = ssl.create_default_context(
    cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
host, port = cluster["server"].removeprefix("https://").rsplit(":", 1)
conn = http.client.HTTPSConnection(host, int(port), context=ctx)
conn.request("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews",
             json.dumps({"apiVersion": "authentication.k8s.io/v1",
                         "kind": "SelfSubjectReview"}),
             {"Authorization": "Bearer " + cfg["users"][0]["user"]["token"],
              "Content-Type": "application/json"})
info = json.load(conn.getresponse())["status"]["userInfo"]
print("user=" + info["username"])
print("bound-pod=" + info["extra"]["authentication.kubernetes.io/pod-name"][0])
print("pod=" + os.environ["MY_POD"] + " ns=" + os.environ["MY_NS"])
print("secret=" + os.environ["MY_SECRET"] + " greeting=" + os.environ["GREETING"])
"""


@pytest.mark.kube
@pytest.mark.slow
def test_job_pods_run_via_controller_manager_and_fake_kubelet(
    kube_cluster: TestCluster, fake_kubelet: FakeKubelet, kube_namespace: str
) -> None:
    ns = kube_namespace
    kube_cluster.api(
        "POST",
        f"/api/v1/namespaces/{ns}/secrets",
        {
            "metadata": {"name": "creds"},
            "stringData": {"key": "s3cr3t"},
        },
    )
    env: list[dict[str, Any]] = [
        {"name": "MY_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "MY_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "MY_SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}},
        {"name": "WHO", "value": "world"},
        {"name": "GREETING", "value": "hello-$(WHO)"},
    ]
    kube_cluster.api(
        "POST", f"/apis/batch/v1/namespaces/{ns}/jobs", job_manifest("whoami", WHOAMI, env)
    )

    assert wait_for("Job to finish", lambda: job_condition(kube_cluster, ns, "whoami")) == (
        "Complete"
    )
    [pod] = job_pods(kube_cluster, ns, "whoami")
    name = pod["metadata"]["name"]
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert fake_kubelet.logs(ns, name).splitlines() == [
        f"user=system:serviceaccount:{ns}:default",
        f"bound-pod={name}",
        f"pod={name} ns={ns}",
        "secret=s3cr3t greeting=hello-world",
    ]


@pytest.mark.kube
@pytest.mark.slow
def test_failing_pod_fails_the_job_with_its_exit_code(
    kube_cluster: TestCluster, fake_kubelet: FakeKubelet, kube_namespace: str
) -> None:
    ns = kube_namespace
    kube_cluster.api(
        "POST",
        f"/apis/batch/v1/namespaces/{ns}/jobs",
        job_manifest("fails", "import sys; print('bye'); sys.exit(3)"),
    )
    assert wait_for("Job to finish", lambda: job_condition(kube_cluster, ns, "fails")) == ("Failed")
    [pod] = job_pods(kube_cluster, ns, "fails")
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
    assert fake_kubelet.logs(ns, pod["metadata"]["name"]) == "bye\n"


@pytest.mark.kube
@pytest.mark.slow
def test_parallel_pods_run_exactly_once_with_two_kubelets(
    kube_cluster: TestCluster, fake_kubelet: FakeKubelet, kube_namespace: str, tmp_path: Path
) -> None:
    ns = kube_namespace
    ran = tmp_path / "ran"
    job = job_manifest(
        "fanout", f"import os; open({str(ran)!r}, 'a').write(os.environ['HOSTNAME'] + '\\n')"
    )
    job["spec"].update(completions=4, parallelism=4)
    with FakeKubelet(kube_cluster.kubeconfig_path, namespace=ns):  # competes with the fixture
        kube_cluster.api("POST", f"/apis/batch/v1/namespaces/{ns}/jobs", job)
        assert wait_for("Job to finish", lambda: job_condition(kube_cluster, ns, "fanout")) == (
            "Complete"
        )
    pods = sorted(p["metadata"]["name"] for p in job_pods(kube_cluster, ns, "fanout"))
    assert len(pods) == 4
    assert sorted(ran.read_text().split()) == pods


@pytest.mark.kube
@pytest.mark.slow
def test_deleting_a_job_garbage_collects_and_kills_its_pods(
    kube_cluster: TestCluster, fake_kubelet: FakeKubelet, kube_namespace: str
) -> None:
    ns = kube_namespace
    kube_cluster.api(
        "POST",
        f"/apis/batch/v1/namespaces/{ns}/jobs",
        job_manifest("sleeper", "import os, time; print(os.getpid(), flush=True); time.sleep(600)"),
    )

    def running_pid() -> int | None:
        pods = job_pods(kube_cluster, ns, "sleeper")
        if not pods or pods[0]["status"].get("phase") != "Running":
            return None
        out = fake_kubelet.logs(ns, pods[0]["metadata"]["name"])
        return int(out) if out.strip() else None

    pid = wait_for("Pod to run", running_pid)
    # Background propagation is what kubectl does; the API's default for Jobs is orphan.
    kube_cluster.api(
        "DELETE",
        f"/apis/batch/v1/namespaces/{ns}/jobs/sleeper",
        {"propagationPolicy": "Background"},
    )
    wait_for("GC to delete the Pods", lambda: not job_pods(kube_cluster, ns, "sleeper"))
    wait_for("the process to die", lambda: not _alive(pid), timeout=30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child stays a zombie until the kubelet's loop reaps it; that counts as dead.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


# ------------------------------------------------------------------------------- S3


@pytest.fixture(params=["preferred", "moto-fallback"])
def any_s3_server(request: pytest.FixtureRequest) -> Iterator[S3Server]:
    """The session's server, and moto's server mode that the ensure script falls back to."""
    if request.param == "preferred":
        yield request.getfixturevalue("s3_server")
    else:
        with S3Server(Path(sys.executable).parent / "moto_server") as server:
            yield server


@pytest.mark.s3
@pytest.mark.slow
@pytest.mark.anyio
async def test_s3_server_speaks_the_s3_we_use(any_s3_server: S3Server) -> None:
    s3_server = any_s3_server
    async with get_session().create_client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
        config=Config(s3={"addressing_style": "path"}),
    ) as s3:
        bucket = f"testenv-{uuid.uuid4().hex[:8]}"
        await s3.create_bucket(Bucket=bucket)
        data = bytes(range(256)) * 40
        for i in range(5):
            await s3.put_object(Bucket=bucket, Key=f"runs/part-{i}", Body=data)

        got = await s3.get_object(Bucket=bucket, Key="runs/part-1", Range="bytes=10-19")
        assert await got["Body"].read() == data[10:20]
        assert got["ContentRange"] == f"bytes 10-19/{len(data)}"

        page1 = await s3.list_objects_v2(Bucket=bucket, Prefix="runs/", MaxKeys=3)
        page2 = await s3.list_objects_v2(
            Bucket=bucket, Prefix="runs/", ContinuationToken=page1["NextContinuationToken"]
        )
        keys = [o["Key"] for o in page1["Contents"] + page2["Contents"]]
        assert keys == [f"runs/part-{i}" for i in range(5)]

        part1, part2 = b"a" * (5 * 1024 * 1024), b"tail"
        upload = await s3.create_multipart_upload(Bucket=bucket, Key="big")
        parts = []
        for number, body in enumerate([part1, part2], start=1):
            resp = await s3.upload_part(
                Bucket=bucket, Key="big", PartNumber=number, UploadId=upload["UploadId"], Body=body
            )
            parts.append({"PartNumber": number, "ETag": resp["ETag"]})
        await s3.complete_multipart_upload(
            Bucket=bucket, Key="big", UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
        )
        head = await s3.head_object(Bucket=bucket, Key="big")
        assert head["ContentLength"] == len(part1) + len(part2)
        tail = await s3.get_object(Bucket=bucket, Key="big", Range=f"bytes={len(part1) - 2}-")
        assert await tail["Body"].read() == b"aatail"
