"""The test environment is real: these tests pin down the behaviour other tests rely on.

If one of these fails, end-to-end failures elsewhere are probably the environment's fault,
not the code under test.
"""

from __future__ import annotations

import datetime
import http.client
import io
import json
import os
import re
import ssl
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

from kubemr_async.testing.cluster import ApiError, TestCluster, pinned_versions
from kubemr_async.testing.kubelet import FakeKubelet
from kubemr_async.testing.logserver import stamp_lines, tail_offset
from kubemr_async.testing.node import NODE_LEASE_NAMESPACE
from kubemr_async.testing.pki import (
    _make_pki_cryptography,
    _make_pki_openssl,
    _self_signed_cryptography,
    _self_signed_openssl,
)
from kubemr_async.testing.podrunner import expand_refs, local_argv
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
    # The cert the apiserver presents to kubelets: a client cert from the same CA.
    verify = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            "ca.crt",
            "-purpose",
            "sslclient",
            "apiserver-kubelet-client.crt",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert {p.name for p in tmp_path.iterdir()} >= {"ca.crt", "ca.key", "sa.key", "sa.pub"}


@pytest.mark.parametrize("make_cert", [_self_signed_cryptography, _self_signed_openssl])
def test_self_signed_serving_cert_is_usable_for_loopback(
    make_cert: Callable[[Path, str, str, tuple[str, ...], tuple[str, ...]], None],
    tmp_path: Path,
) -> None:
    make_cert(tmp_path, "kubelet", "fake-kubelet-x", ("127.0.0.1",), ("localhost",))
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
        tmp_path / "kubelet.crt", tmp_path / "kubelet.key"
    )
    text = subprocess.run(
        ["openssl", "x509", "-in", "kubelet.crt", "-noout", "-text"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "IP Address:127.0.0.1" in text
    assert "TLS Web Server Authentication" in text


@pytest.mark.parametrize(
    ("content", "lines", "expected"),
    [
        (b"a\nb\nc\n", 2, b"b\nc\n"),
        (b"a\nb\nc\n", 3, b"a\nb\nc\n"),
        (b"a\nb\nc\n", 10, b"a\nb\nc\n"),
        (b"a\nb\nc", 1, b"c"),  # a partial last line counts as a line
        (b"a\nb\nc", 2, b"b\nc"),
        (b"a\n\nc\n", 2, b"\nc\n"),  # empty lines count
        (b"a\nb\n", 0, b""),
        (b"", 5, b""),
        (b"x" * 70000 + b"\n" + b"y" * 70000 + b"\n", 1, b"y" * 70000 + b"\n"),  # blocks
    ],
)
def test_tail_offset_finds_the_last_lines(content: bytes, lines: int, expected: bytes) -> None:
    f = io.BytesIO(content)
    f.seek(tail_offset(f, lines))
    assert f.read() == expected


def test_stamp_lines_prefixes_each_line_once_across_chunks() -> None:
    out1, at_start = stamp_lines(b"one\ntw", True)
    out2, at_start = stamp_lines(b"o\nthree\n", at_start)
    assert at_start
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z "
    assert re.fullmatch(f"{stamp}one\n{stamp}two\n{stamp}three\n", (out1 + out2).decode())


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
print("colour=" + os.environ["MY_COLOUR"] + " cfg_size=" + os.environ["CFG_size"]
      + " missing=" + str("MY_OPTIONAL" in os.environ))
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
    kube_cluster.api(
        "POST",
        f"/api/v1/namespaces/{ns}/configmaps",
        {"metadata": {"name": "settings"}, "data": {"colour": "blue", "size": "9"}},
    )
    env: list[dict[str, Any]] = [
        {"name": "MY_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "MY_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "MY_SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}},
        {"name": "WHO", "value": "world"},
        {"name": "GREETING", "value": "hello-$(WHO)"},
        {
            "name": "MY_COLOUR",
            "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "colour"}},
        },
        {
            "name": "MY_OPTIONAL",
            "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k", "optional": True}},
        },
    ]
    job = job_manifest("whoami", WHOAMI, env)
    job["spec"]["template"]["spec"]["containers"][0]["envFrom"] = [
        {"configMapRef": {"name": "settings"}, "prefix": "CFG_"}
    ]
    kube_cluster.api("POST", f"/apis/batch/v1/namespaces/{ns}/jobs", job)

    outcome = wait_for("Job to finish", lambda: job_condition(kube_cluster, ns, "whoami"))
    [pod] = job_pods(kube_cluster, ns, "whoami")
    assert outcome == "Complete", fake_kubelet.logs(ns, pod["metadata"]["name"])
    name = pod["metadata"]["name"]
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert fake_kubelet.logs(ns, name).splitlines() == [
        f"user=system:serviceaccount:{ns}:default",
        f"bound-pod={name}",
        f"pod={name} ns={ns}",
        "secret=s3cr3t greeting=hello-world",
        "colour=blue cfg_size=9 missing=False",
    ]
    # Status is patched as a kubelet patches it: the binding's PodScheduled condition stays.
    conditions = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert conditions["PodScheduled"] == "True" and conditions["Ready"] == "False"


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
    # competes with the fixture
    with FakeKubelet(kube_cluster.kubeconfig_path, namespace=ns, log_dir=tmp_path) as other:
        kube_cluster.api("POST", f"/apis/batch/v1/namespaces/{ns}/jobs", job)
        assert wait_for("Job to finish", lambda: job_condition(kube_cluster, ns, "fanout")) == (
            "Complete"
        )
    items = job_pods(kube_cluster, ns, "fanout")
    pods = sorted(p["metadata"]["name"] for p in items)
    assert len(pods) == 4
    assert sorted(ran.read_text().split()) == pods
    assert {p["spec"]["nodeName"] for p in items} <= {fake_kubelet.node_name, other.node_name}
    # A stopped FakeKubelet takes its Node (and so its Lease) with it.
    assert not _exists(kube_cluster, f"/api/v1/nodes/{other.node_name}")


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
    # Bound to the kubelet's Node, so deleting it is graceful: the object stays until the
    # kubelet has killed the process and confirms with a zero-grace delete.
    [pod] = job_pods(kube_cluster, ns, "sleeper")
    assert pod["spec"]["nodeName"] == fake_kubelet.node_name
    # Background propagation is what kubectl does; the API's default for Jobs is orphan.
    kube_cluster.api(
        "DELETE",
        f"/apis/batch/v1/namespaces/{ns}/jobs/sleeper",
        {"propagationPolicy": "Background"},
    )
    wait_for("GC to delete the Pods", lambda: not job_pods(kube_cluster, ns, "sleeper"))
    wait_for("the process to die", lambda: not _alive(pid), timeout=30)


@pytest.mark.kube
@pytest.mark.slow
def test_deleting_a_namespace_with_a_running_pod_finishes(
    kube_cluster: TestCluster, fake_kubelet: FakeKubelet
) -> None:
    ns = f"t-{uuid.uuid4().hex[:10]}"
    kube_cluster.create_namespace(ns)
    kube_cluster.api(
        "POST",
        f"/apis/batch/v1/namespaces/{ns}/jobs",
        job_manifest("sleeper", "import time; time.sleep(600)"),
    )
    wait_for(
        "Pod to run",
        lambda: [
            p for p in job_pods(kube_cluster, ns, "sleeper") if p["status"]["phase"] == "Running"
        ],
    )
    kube_cluster.api("DELETE", f"/api/v1/namespaces/{ns}")
    wait_for("the namespace to go", lambda: not _exists(kube_cluster, f"/api/v1/namespaces/{ns}"))


@pytest.mark.kube
@pytest.mark.slow
def test_stopping_a_kubelet_kills_its_processes_and_removes_its_node(
    kube_cluster: TestCluster, kube_namespace: str, tmp_path: Path
) -> None:
    ns = kube_namespace
    pod = {
        "metadata": {"name": "sleeper"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "python:3.11-slim",
                    "command": ["python", "-c", SLEEPER],
                }
            ],
        },
    }
    with FakeKubelet(kube_cluster.kubeconfig_path, namespace=ns, log_dir=tmp_path) as kubelet:
        # Created bound to this kubelet's Node, so no other kubelet takes it.
        pod["spec"]["nodeName"] = kubelet.node_name
        kube_cluster.api("POST", f"/api/v1/namespaces/{ns}/pods", pod)

        def pid() -> int | None:
            try:
                out = kubelet.logs(ns, "sleeper")
            except FileNotFoundError:
                return None
            return int(out) if out.strip() else None

        running = wait_for("the process to start", pid)
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 15  # SIGTERM, then SIGKILL after at most 2 s
    assert not _alive(running)
    assert not _exists(kube_cluster, f"/api/v1/nodes/{kubelet.node_name}")


# Ignores SIGTERM, so only the SIGKILL after the grace period ends it.
SLEEPER = """
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(os.getpid(), flush=True)
time.sleep(600)
"""


def _exists(cluster: TestCluster, path: str) -> bool:
    try:
        cluster.api("GET", path)
    except ApiError as exc:
        if exc.status != 404:
            raise
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child stays a zombie until the kubelet's loop reaps it; that counts as dead.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


# Prints three lines (one to stderr), waits for a file to appear, prints three more.
LOGGER = """
import os, sys, time
print("line 0", flush=True)
print("line 1", file=sys.stderr, flush=True)
print("line 2", flush=True)
while not os.path.exists(os.environ["TRIGGER"]):
    time.sleep(0.05)
for i in range(3):
    print(f"later {i}", flush=True)
    time.sleep(0.2)
"""


def _api_connection(cluster: TestCluster, timeout: float = 30) -> http.client.HTTPSConnection:
    context = ssl.create_default_context(cafile=str(cluster.ca_file))
    return http.client.HTTPSConnection("127.0.0.1", cluster.port, context=context, timeout=timeout)


def get_log(cluster: TestCluster, ns: str, pod: str, query: str = "") -> tuple[int, bytes]:
    """GET pods/log through the apiserver, which proxies it to the Pod's kubelet."""
    conn = _api_connection(cluster)
    try:
        conn.request(
            "GET",
            f"/api/v1/namespaces/{ns}/pods/{pod}/log?{query}",
            headers={"Authorization": f"Bearer {cluster.admin_token}"},
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.kube
@pytest.mark.slow
def test_pod_logs_are_served_through_the_api_server(
    kube_cluster: TestCluster, fake_kubelet: FakeKubelet, kube_namespace: str, tmp_path: Path
) -> None:
    ns = kube_namespace
    trigger = tmp_path / "go"
    job = job_manifest("logger", LOGGER, [{"name": "TRIGGER", "value": str(trigger)}])
    kube_cluster.api("POST", f"/apis/batch/v1/namespaces/{ns}/jobs", job)
    [pod] = wait_for("the Pod", lambda: job_pods(kube_cluster, ns, "logger") or None)
    name = pod["metadata"]["name"]

    def first_lines() -> bytes | None:
        # 400 "waiting to start" until the kubelet has bound and started the Pod; 204 (the
        # API server's answer to an empty log) while it has started but printed nothing.
        status, body = get_log(kube_cluster, ns, name)
        assert status in (200, 204, 400), (status, body)
        return body if status == 200 and body.count(b"\n") == 3 else None

    assert wait_for("the first lines", first_lines) == b"line 0\nline 1\nline 2\n"
    assert get_log(kube_cluster, ns, name, "tailLines=1") == (200, b"line 2\n")
    assert get_log(kube_cluster, ns, name, "tailLines=0") == (200, b"")
    assert get_log(kube_cluster, ns, name, "limitBytes=9") == (200, b"line 0\nli")
    status, stamped = get_log(kube_cluster, ns, name, "timestamps=true&tailLines=2")
    assert status == 200
    assert [line.split(" ", 1)[1] for line in stamped.decode().splitlines()] == [
        "line 1",
        "line 2",
    ]
    for line in stamped.decode().splitlines():
        datetime.datetime.fromisoformat(line.split(" ", 1)[0])
    # The kubelet's own errors come back through the apiserver, status and message intact.
    status, body = get_log(kube_cluster, ns, name, "previous=true")
    assert status == 400 and b"previous terminated container" in body, body

    # follow=true streams what is written later and ends when the process exits.
    conn = _api_connection(kube_cluster)
    try:
        conn.request(
            "GET",
            f"/api/v1/namespaces/{ns}/pods/{name}/log?follow=true&tailLines=1",
            headers={"Authorization": f"Bearer {kube_cluster.admin_token}"},
        )
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.readline() == b"line 2\n"
        trigger.touch()
        rest = resp.read()  # to EOF: the stream ends once the process has exited
    finally:
        conn.close()
    assert rest == b"later 0\nlater 1\nlater 2\n"

    assert wait_for("Job to finish", lambda: job_condition(kube_cluster, ns, "logger")) == (
        "Complete"
    )
    # A finished Pod's log stays readable, and following it returns at once.
    everything = b"line 0\nline 1\nline 2\nlater 0\nlater 1\nlater 2\n"
    assert get_log(kube_cluster, ns, name) == (200, everything)
    assert get_log(kube_cluster, ns, name, "follow=true") == (200, everything)


@pytest.mark.kube
@pytest.mark.slow
def test_kubelet_log_server_wants_the_apiservers_client_cert(
    kube_cluster: TestCluster, fake_kubelet: FakeKubelet
) -> None:
    def request(cert: bool) -> tuple[int, bytes]:
        # The serving cert is self-signed; like the apiserver, don't verify it.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if cert:
            pki = kube_cluster.root / "pki"
            context.load_cert_chain(
                pki / "apiserver-kubelet-client.crt", pki / "apiserver-kubelet-client.key"
            )
        conn = http.client.HTTPSConnection(
            "127.0.0.1", fake_kubelet.port, context=context, timeout=10
        )
        try:
            conn.request("GET", "/containerLogs/default/no-such-pod/main")
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    status, body = request(cert=True)
    assert status == 404 and b"does not exist" in body, body
    with pytest.raises((ssl.SSLError, ConnectionError)):
        request(cert=False)


@pytest.mark.kube
@pytest.mark.slow
def test_node_is_registered_and_kept_alive(kube_cluster: TestCluster, tmp_path: Path) -> None:
    with FakeKubelet(kube_cluster.kubeconfig_path, heartbeat_seconds=0.5,
                     log_dir=tmp_path) as kubelet:
        node_path = f"/api/v1/nodes/{kubelet.node_name}"
        lease_path = (
            f"/apis/coordination.k8s.io/v1/namespaces/{NODE_LEASE_NAMESPACE}"
            f"/leases/{kubelet.node_name}"
        )
        node = kube_cluster.api("GET", node_path)
        assert node["status"]["addresses"] == [{"type": "InternalIP", "address": "127.0.0.1"}]
        assert node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] == kubelet.port
        assert node["status"]["allocatable"]["cpu"] == "64"
        lease = kube_cluster.api("GET", lease_path)
        assert lease["metadata"]["ownerReferences"][0]["uid"] == node["metadata"]["uid"]
        renewals = {lease["spec"]["renewTime"]}
        heartbeats = {_ready(node)["lastHeartbeatTime"]}
        deadline = time.monotonic() + 30
        # Several renew periods, and two distinct heartbeats (which have 1 s resolution).
        while len(renewals) < 4 or len(heartbeats) < 2:
            assert time.monotonic() < deadline, (renewals, heartbeats)
            time.sleep(0.3)
            renewals.add(kube_cluster.api("GET", lease_path)["spec"]["renewTime"])
            heartbeats.add(_ready(kube_cluster.api("GET", node_path))["lastHeartbeatTime"])
        node = kube_cluster.api("GET", node_path)
        assert _ready(node)["status"] == "True"
        assert not node["spec"].get("taints")  # the node-lifecycle controller is content
    assert not _exists(kube_cluster, node_path)


def _ready(node: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in node["status"]["conditions"] if c["type"] == "Ready")


@pytest.mark.kube
@pytest.mark.slow
def test_session_node_stays_ready_and_untainted(
    kube_cluster: TestCluster, fake_kubelet: FakeKubelet
) -> None:
    """The long-lived Node as the node-lifecycle controller sees it (its grace period is
    50 s, so late in a session this checks that heartbeats really keep it Ready)."""
    node = kube_cluster.api("GET", f"/api/v1/nodes/{fake_kubelet.node_name}")
    assert _ready(node)["status"] == "True"
    assert not node["spec"].get("taints")


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
