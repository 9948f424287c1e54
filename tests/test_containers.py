"""The images built for real, and Pods run as real containers (slow tier).

hack/ensure-container-tools.sh installs podman and makes the local Debian base image;
hack/build-images.sh builds the project image and the examples image from the repository's
Dockerfiles on it (both cached; CI runs them before pytest, the fixtures here run them
again, which reuses everything). Then:

* the project image runs ``kubemr version`` and the examples image a local word count, as
  uid 10001 on a read-only root filesystem with only /tmp writable;
* a Pod shaped by the Helm chart's Deployment (its securityContext, limits and /tmp
  emptyDir) runs in the test kubelet's container mode: env from fieldRef and secretKeyRef,
  the ServiceAccount token where in-cluster clients read it, the limits in its cgroup, the
  root filesystem refusing a write, the exit code in its status and its output in pods/log;
* the Helm-installed operator runs from the project image as a container and runs the word
  count with its workers as containers of the examples image (byte-exact results); a job
  whose map allocates far beyond its workers' memory limit has them OOMKilled, retried,
  and fails saying they ran out of memory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import tomllib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubemr_async.testing import free_port
from kubemr_async.testing.cluster import TestCluster
from kubemr_async.testing.kubelet import FakeKubelet
from kubemr_async.testing.podman import Podman
from kubemr_async.testing.s3server import S3Server

from .test_chart import (
    BUCKET,
    CHART,
    Tools,
    create_namespace,
    delete_namespace,
    eventually,
    installed,
    jobs_path,
    tools,  # noqa: F401 - the fixture
    upload_example_data,
)
from .test_metrics import wait_for_status
from .test_testenv import get_log

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
#: The container-mode kubelet's Node carries this label; Pods select it with nodeSelector,
#: so the session's process-mode kubelet leaves them alone.
RUNTIME = {"kubemr.io/test-runtime": "podman"}
#: A read-only root filesystem and a writable /tmp, as the chart and the operator set up.
READ_ONLY = ["--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp"]
#: The job for the out-of-memory scenario: a map that holds 2 GiB, in a tiny image layer.
HOG = '''"""A map that allocates far more than its worker's memory limit."""
from kubemr_async import Job, TaskContext

job = Job("hog")


@job.map(input="bytes")
async def hog(chunk: bytes, ctx: TaskContext) -> None:
    hoard = b"x" * (2 << 30)  # filled, so every page is really used
    ctx.emit(chunk[:1], len(hoard))


job.reduce("sum")
'''

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def podman() -> Podman:
    return Podman.ensure()


@pytest.fixture(scope="session")
def images(podman: Podman) -> tuple[str, str]:
    """(project image, examples image), built from the repository's Dockerfiles."""
    return podman.build_images()


def run(podman: Podman, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``podman args...``; output as text (bytes that are not UTF-8 escaped)."""
    return subprocess.run(["podman", *args], env=podman.env(), capture_output=True, text=True,
                          errors="surrogateescape", timeout=timeout)


def reference_lines() -> list[bytes]:
    counts: Counter[bytes] = Counter()
    for path in DATA.iterdir():
        counts.update(path.read_bytes().split())
    return sorted(w + b"\t" + str(n).encode() for w, n in counts.items())


# ------------------------------------------------------------------ the images alone


def test_project_image_runs_kubemr_as_uid_10001_on_a_read_only_root(
        podman: Podman, images: tuple[str, str]) -> None:
    project, _ = images
    version = run(podman, "run", "--rm", *READ_ONLY, project, "version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == VERSION
    who = run(podman, "run", "--rm", *READ_ONLY, "--entrypoint", "id", project)
    assert who.stdout.split()[:2] == ["uid=10001(kubemr)", "gid=10001(kubemr)"], who
    write = run(podman, "run", "--rm", *READ_ONLY, "--entrypoint", "sh", project, "-c",
                "touch /app/x")
    assert write.returncode != 0 and "Read-only file system" in write.stderr, write


def test_examples_image_runs_the_word_count_locally(podman: Podman,
                                                    images: tuple[str, str]) -> None:
    _, examples = images
    script = ("kubemr run examples.wordcount --input /app/examples/data --output /tmp/out "
              "--workers 2 --reducers 2 --no-progress >&2 && cat /tmp/out/part-*")
    proc = run(podman, "run", "--rm", *READ_ONLY, "--entrypoint", "sh", examples, "-c", script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(proc.stdout.encode(errors="surrogateescape").splitlines()) == reference_lines()


# --------------------------------------------------------- Pods in container mode


@pytest.fixture(scope="module")
def container_kubelet(kube_cluster: TestCluster, podman: Podman, images: tuple[str, str],
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeKubelet]:
    """A test kubelet in container mode, for the Pods that select :data:`RUNTIME`."""
    with FakeKubelet(kube_cluster.kubeconfig_path, podman=podman, node_labels=RUNTIME,
                     log_dir=tmp_path_factory.mktemp("container-logs")) as kubelet:
        yield kubelet


def chart_values(project: str, **values: Any) -> dict[str, Any]:
    repository, _, tag = project.rpartition(":")
    return {"image": {"repository": repository, "tag": tag}, "nodeSelector": RUNTIME, **values}


def rendered_pod_spec(helm: Tools, project: str, tmp_path: Path) -> dict[str, Any]:
    """The operator Deployment's pod spec as the chart renders it for this image."""
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(chart_values(project)))
    docs = yaml.safe_load_all(helm.helm("template", "x", str(CHART), "--values",
                                         str(values)).stdout)
    deployment = next(d for d in docs if d and d["kind"] == "Deployment")
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def wait_finished(cluster: TestCluster, ns: str, name: str) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        pod: dict[str, Any] = cluster.api("GET", f"/api/v1/namespaces/{ns}/pods/{name}")
        return pod if pod.get("status", {}).get("phase") in ("Succeeded", "Failed") else None

    pod: dict[str, Any] = eventually(finished, f"pod {ns}/{name} to finish", timeout=120)
    return pod


PROBE = """
id -u
cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/cpu/cpu.cfs_quota_us
echo "namespace=$MY_NAMESPACE"
[ "$(printf %s "$MY_SECRET" | sha256sum | cut -c1-64)" = "$EXPECTED_SECRET_SHA" ] && echo secret-ok
cat /var/run/secrets/kubernetes.io/serviceaccount/namespace; echo
python3 -c 'import asyncio
from kubemr_async.kube import Kube
async def main():
    async with await Kube.connect() as kube:
        print("server", (await kube.request("GET", "/version", context="probe"))["gitVersion"])
asyncio.run(main())'
touch /probe 2>&1 || echo root-refused
touch /tmp/probe && echo tmp-ok
exit 3
"""


@pytest.mark.kube
def test_a_pod_with_the_charts_settings_runs_as_a_real_container(
        kube_cluster: TestCluster, container_kubelet: FakeKubelet, images: tuple[str, str],
        tools: Tools, kube_namespace: str, tmp_path: Path) -> None:  # noqa: F811 - fixture
    ns = kube_namespace
    secret = "s3cr3t-value"
    kube_cluster.api("POST", f"/api/v1/namespaces/{ns}/secrets", {
        "metadata": {"name": "probe"}, "data": {"key": base64.b64encode(secret.encode()).decode()}})
    spec = rendered_pod_spec(tools, images[0], tmp_path)
    spec["serviceAccountName"] = "default"
    container = spec["containers"][0]
    container["command"], container["args"] = ["sh", "-c", PROBE], []
    container["env"] = [
        {"name": "MY_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "MY_SECRET", "valueFrom": {"secretKeyRef": {"name": "probe", "key": "key"}}},
        {"name": "EXPECTED_SECRET_SHA", "value": hashlib.sha256(secret.encode()).hexdigest()}]
    limits = container["resources"]["limits"]
    kube_cluster.api("POST", f"/api/v1/namespaces/{ns}/pods",
                     {"metadata": {"name": "probe"}, "spec": spec})
    pod = wait_finished(kube_cluster, ns, "probe")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    status, raw = get_log(kube_cluster, ns, "probe")
    log = raw.decode()
    assert status == 200, log
    assert (pod["status"]["phase"], terminated["exitCode"], terminated["reason"]) == (
        "Failed", 3, "Error"), log
    lines = log.splitlines()
    assert lines[0] == str(spec["containers"][0]["securityContext"]["runAsUser"]) == "10001"
    assert limits["memory"] == "512Mi" and lines[1] == str(512 << 20), "the memory limit holds"
    assert limits["cpu"] == "1" and lines[2] == "100000", "1 CPU: a 100 ms quota per 100 ms"
    assert f"namespace={ns}" in lines and "secret-ok" in lines and ns in lines
    assert secret not in log
    assert any(line.startswith("server v") for line in lines), log  # in-cluster client works
    assert "touch: cannot touch '/probe': Read-only file system" in lines, log
    assert "root-refused" in lines and "tmp-ok" in lines


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def hog_image(podman: Podman, images: tuple[str, str],
              tmp_path_factory: pytest.TempPathFactory) -> str:
    """The examples image plus the memory-hungry job, built in a context of its own."""
    context = tmp_path_factory.mktemp("hog")
    (context / "hog.py").write_text(HOG)
    (context / "Containerfile").write_text(
        "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nCOPY hog.py /app/hog.py\n")
    name = f"localhost/kubemr-hog:{VERSION}"
    built = run(podman, "build", "--quiet", "--build-arg", f"BASE_IMAGE={images[1]}", "-t",
                name, str(context))
    assert built.returncode == 0, built.stderr
    return name


def create_job(cluster: TestCluster, ns: str, image: str, module: str,
               **spec: Any) -> str:
    manifest = yaml.safe_load((ROOT / "examples" / "wordcount.yaml").read_text())
    manifest["spec"].update(image=image, job=module, **spec)
    template = manifest["spec"].setdefault("template", {"spec": {}})
    template["spec"]["nodeSelector"] = RUNTIME
    return str(cluster.api("POST", jobs_path(ns), manifest)["metadata"]["name"])


def finished_job(cluster: TestCluster, ns: str, name: str, kubelet: FakeKubelet,
                 operator_pod: tuple[str, str]) -> dict[str, Any]:
    def decided() -> dict[str, Any] | None:
        job: dict[str, Any] = cluster.api("GET", jobs_path(ns, name))
        return job if (job.get("status") or {}).get("phase") in ("Succeeded", "Failed") else None

    try:
        job: dict[str, Any] = eventually(decided, f"job {name} to finish", timeout=300)
    except AssertionError as exc:
        raise AssertionError(f"{cluster.api('GET', jobs_path(ns, name)).get('status')}\n"
                             f"operator:\n{kubelet.logs(*operator_pod)[-4000:]}") from exc
    return job


@pytest.mark.kube
@pytest.mark.s3
def test_helm_installed_operator_runs_jobs_with_containers(
        kube_cluster: TestCluster, crds: None, container_kubelet: FakeKubelet,
        images: tuple[str, str], hog_image: str, tools: Tools,  # noqa: F811 - fixture
        s3_server: S3Server, tmp_path: Path) -> None:
    project, examples = images
    operator_ns = create_namespace(kube_cluster, "kubemr-op")
    jobs_ns = create_namespace(kube_cluster, "kubemr-jobs")
    s3 = upload_example_data(s3_server)
    http_port = free_port()
    values = chart_values(
        project, replicaCount=1, watchNamespace=jobs_ns,
        operator={"logLevel": "DEBUG", "workerBackoffLimit": 1, "httpPort": http_port},
        metrics={"enabled": False},
        # The jobs name no storage of their own: the admin lets this namespace's use the
        # platform's (docs/security.md).
        tenancy={"platformCredentialsNamespaces": f"kubernetes.io/metadata.name={jobs_ns}"},
        s3={"endpoint": s3_server.endpoint_url, "region": s3_server.region,
            "accessKeyId": s3_server.access_key, "secretAccessKey": s3_server.secret_key})
    try:
        with installed(tools, kube_cluster, values, operator_ns, tmp_path):
            # The operator's pod runs from the project image (host network: its probes'
            # endpoint is on this machine's loopback).
            wait_for_status(f"http://127.0.0.1:{http_port}/readyz", 200)
            pods = kube_cluster.api("GET", f"/api/v1/namespaces/{operator_ns}/pods")["items"]
            (pod,) = pods
            assert pod["spec"]["containers"][0]["image"] == project
            assert pod["status"]["phase"] == "Running"
            operator_pod = (operator_ns, pod["metadata"]["name"])

            name = create_job(kube_cluster, jobs_ns, examples, "examples.wordcount")
            # The worker pods' images, read while they exist: the operator deletes them as
            # soon as the job is decided, so a list after the verdict may find none.
            images_run: set[str] = set()

            def worker_images() -> set[str]:
                pods = kube_cluster.api("GET", f"/api/v1/namespaces/{jobs_ns}/pods")["items"]
                images_run.update(p["spec"]["containers"][0]["image"] for p in pods)
                return images_run

            eventually(worker_images, f"job {name}'s worker pods")
            status = finished_job(kube_cluster, jobs_ns, name, container_kubelet,
                                  operator_pod)["status"]
            assert status["phase"] == "Succeeded", status
            lines: list[bytes] = []
            for url in status["results"]:
                key = url[len(f"s3://{BUCKET}/"):]
                lines += s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().splitlines()
            assert sorted(lines) == reference_lines()
            assert worker_images() == {examples}

            limit = "256Mi"
            name = create_job(kube_cluster, jobs_ns, hog_image, "hog", workers=1, template={
                "spec": {"containers": [{"name": "worker",
                                         "resources": {"limits": {"memory": limit}}}]}})
            status = finished_job(kube_cluster, jobs_ns, name, container_kubelet,
                                  operator_pod)["status"]
            assert status["phase"] == "Failed", status
            # Killed, retried (the Job controller made a new pod), killed again; the
            # operator says so (and has deleted the worker pods with the failed job).
            message = json.dumps(status)
            found = re.search(r"(\d+) of (\d+) worker pods ran out of memory "
                              rf"\(OOMKilled; memory limit {re.escape(limit)}\)", message)
            assert found is not None, message
            assert int(found.group(1)) == int(found.group(2)) >= 2, message
    finally:
        delete_namespace(kube_cluster, jobs_ns)
        delete_namespace(kube_cluster, operator_ns)
