"""The `kubemr` cluster commands end to end, plus unit tests of their pure parts.

End to end means the installed console script as a subprocess, against the real
kube-apiserver and S3 server, with `kubemr operator` running and worker pods run by the
test kubelet: what a user at a terminal gets. Exit codes and the one-line error contract
are checked as a script would see them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from kubemr_async import cli_render, jobs, manifests
from kubemr_async.errors import JobFailed, KubemrError, UsageError
from kubemr_async.protocol import JobView, TaskKind, new_task, reduce_key
from kubemr_async.testing.cluster import ApiError, TestCluster
from kubemr_async.testing.s3server import S3Server

from .operator_fixtures import BUCKET, DATA, kube_namespace, operator, s3
from .test_local_run import KUBEMR, ROOT

__all__ = ["kube_namespace", "operator", "s3"]  # fixtures used by name

F = TypeVar("F", bound=Callable[..., Any])
GROUP_PATH = "/apis/kubemr.io/v1alpha1"
IMAGE = "kubemr-tests:dev"


def e2e(test: F) -> F:
    """The slow tier: real API server, S3 and operator."""
    return pytest.mark.kube(pytest.mark.s3(pytest.mark.slow(test)))


# --- the CLI as a subprocess -----------------------------------------------------------


@dataclass
class Cli:
    """Runs the console script with the admin kubeconfig, the module's namespace and S3 env."""

    kubeconfig: Path
    namespace: str
    env: dict[str, str]
    operator_log: Path

    def argv(self, args: tuple[str, ...], namespace: bool, kubeconfig: Path | None) -> list[str]:
        argv = [KUBEMR, *args, "--kubeconfig", str(kubeconfig or self.kubeconfig)]
        return [*argv, "-n", self.namespace] if namespace else argv

    def __call__(self, *args: str, stdin: str | None = None, namespace: bool = True,
                 kubeconfig: Path | None = None,
                 timeout: float = 240) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(self.argv(args, namespace, kubeconfig), input=stdin,
                                  capture_output=True, text=True, env=self.env,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            tail = self.operator_log.read_text(errors="replace")[-4000:]
            raise AssertionError(f"kubemr {' '.join(args)} timed out; stdout {exc.stdout!r}, "
                                 f"stderr {exc.stderr!r}; operator log:\n{tail}") from None

    def raw(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.argv(args, True, None), capture_output=True, env=self.env,
                              timeout=timeout)

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(args, True, None), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=self.env)


@pytest.fixture(scope="module")
def cli(kube_cluster: TestCluster, kube_namespace: str, operator: Path, s3: Any,
        s3_server: S3Server) -> Cli:
    env = {**os.environ, "KUBEMR_S3_ENDPOINT": s3_server.endpoint_url,
           "AWS_ACCESS_KEY_ID": s3_server.access_key,
           "AWS_SECRET_ACCESS_KEY": s3_server.secret_key, "AWS_REGION": s3_server.region}
    env.pop("KUBECONFIG", None)
    return Cli(kube_cluster.kubeconfig_path, kube_namespace, env, operator)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The single stderr line of a failed command (the CLI's error contract)."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("kubemr: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[-1].removeprefix("kubemr: error: ")


def submit(cli: Cli, *args: str) -> str:
    return ok(cli("submit", "--image", IMAGE, *args)).strip()


def sleeper(cli: Cli, prefix: str) -> str:
    """A running job of tests.jobs.attempts whose maps sleep a minute: cancel/logs/delete."""
    return submit(cli, "--generate-name", f"{prefix}-", "--job", "tests.jobs.attempts",
                  "--input", "a", "--input", "b", "--no-split-inputs", "--output",
                  f"s3://{BUCKET}/echo", "--arg", "sleep=60")


def job_path(namespace: str, name: str) -> str:
    return f"{GROUP_PATH}/namespaces/{namespace}/mapreducejobs/{name}"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def phase_of(cluster: TestCluster, namespace: str, name: str) -> str | None:
    job = cluster.api("GET", job_path(namespace, name))
    phase: str | None = (job.get("status") or {}).get("phase")
    return phase


def completed(cluster: TestCluster, namespace: str, name: str) -> dict[str, Any]:
    """The job's status once the operator has finished it (completionTime set)."""
    def status() -> dict[str, Any] | None:
        found: dict[str, Any] = cluster.api("GET", job_path(namespace, name)).get("status") or {}
        return found if found.get("completionTime") else None
    result: dict[str, Any] = wait_for(f"{name} to complete", status)
    return result


def worker_pods(cluster: TestCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = cluster.api(
        "GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector=kubemr.io/job%3D{name}"
    )["items"]
    return pods


def gone(cluster: TestCluster, path: str) -> bool:
    try:
        cluster.api("GET", path)
    except ApiError as exc:
        if exc.status == 404:
            return True
        raise
    return False


def wordcount_reference(texts: list[bytes]) -> list[bytes]:
    counts: Counter[bytes] = Counter()
    for text in texts:
        counts.update(text.split())
    return sorted(w + b"\t" + str(n).encode() for w, n in counts.items())


def upload(s3: Any, prefix: str, texts: dict[str, str]) -> str:
    for key, text in texts.items():
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{key}", Body=text.encode())
    return f"s3://{BUCKET}/{prefix}/"


# --- end to end ------------------------------------------------------------------------


@e2e
def test_list_filters_by_label_selector_as_kubectl_does(cli: Cli,
                                                        kube_cluster: TestCluster) -> None:
    names = {}
    for team in ("a", "b"):
        name = submit(cli, "--generate-name", f"team-{team}-", "--job", "tests.jobs.attempts",
                      "--input", "x", "--no-split-inputs", "--output", f"s3://{BUCKET}/echo")
        kube_cluster.api("PATCH", job_path(cli.namespace, name),
                         {"metadata": {"labels": {"team": team, "tier": "batch"}}},
                         content_type="application/merge-patch+json")
        names[team] = name

    def listed(*selector: str) -> set[str]:
        rows = ok(cli("list", *selector)).splitlines()[1:]
        return {line.split()[0] for line in rows} & set(names.values())

    assert listed("-l", "team=a") == {names["a"]}
    assert listed("--selector", "team!=a,tier=batch") == {names["b"]}
    assert listed("-l", "team in (a,b)") == set(names.values())
    assert listed() == set(names.values())
    nothing = cli("list", "-l", "team=c")
    assert nothing.returncode == 0 and nothing.stdout == ""
    assert f"No resources found in {cli.namespace} namespace." in nothing.stderr
    as_json = json.loads(ok(cli("list", "-l", "team=b", "-o", "json")))
    assert [item["metadata"]["name"] for item in as_json["items"]] == [names["b"]]
    error = one_line_error(cli("list", "-l", "team in (a"), 2)
    assert error.startswith("--selector 'team in (a': "), error


@e2e
def test_submit_yaml_wait_then_status_list_and_results(cli: Cli, kube_cluster: TestCluster,
                                                       s3: Any, tmp_path: Path) -> None:
    result = cli("submit", str(ROOT / "examples" / "wordcount.yaml"), "--wait")
    name = ok(result).strip()
    assert re.fullmatch(r"wordcount-[a-z0-9]{5}", name), result.stdout
    assert f"job {name} succeeded" in result.stderr
    status = completed(kube_cluster, cli.namespace, name)

    described = ok(cli("status", name))
    assert re.search(r"^Phase: +Succeeded$", described, re.M), described
    # "took ..." while the task records are still there (their namespace is being deleted)
    assert re.search(r"^Maps: +3/3(   took \S+)?$", described, re.M), described
    assert re.search(r"^Reduces: +2/2(   took \S+)?$", described, re.M), described
    assert all(f"  {url}" in described for url in status["results"])
    as_json = json.loads(ok(cli("status", name, "-o", "json")))
    assert (as_json["kind"], as_json["metadata"]["name"]) == ("MapReduceJob", name)
    assert as_json["status"]["results"] == status["results"]
    as_yaml = yaml.safe_load(ok(cli("status", name, "-o", "yaml")))
    assert as_yaml["spec"] == as_json["spec"] and as_yaml["status"]["phase"] == "Succeeded"

    table = ok(cli("list")).splitlines()
    assert table[0].split() == ["NAME", "PHASE", "MAPS", "REDUCES", "AGE"]
    row = next(line.split() for line in table if line.startswith(name))
    assert row[:4] == [name, "Succeeded", "3/3", "2/2"] and re.fullmatch(r"\d+[smhdy].*", row[4])
    every = ok(cli("list", "-A", namespace=False)).splitlines()
    assert every[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert [cli.namespace, name, "Succeeded"] in [line.split()[:3] for line in every]
    for fmt, parse in (("json", json.loads), ("yaml", yaml.safe_load)):
        listing = parse(ok(cli("list", "-o", fmt)))
        assert name in [item["metadata"]["name"] for item in listing["items"]], fmt

    # Without -n the namespace comes from the kubeconfig's context, as with kubectl.
    config = yaml.safe_load(cli.kubeconfig.read_text())
    config["contexts"][0]["context"]["namespace"] = cli.namespace
    scoped = tmp_path / "kubeconfig"
    scoped.write_text(yaml.safe_dump(config))
    assert name in ok(cli("list", namespace=False, kubeconfig=scoped))

    urls = ok(cli("results", name)).splitlines()
    assert urls == status["results"]
    for partition, url in enumerate(urls):
        assert url.startswith(
            f"s3://{BUCKET}/results/{cli.namespace}/{name}/output/part-{partition:05d}.")
    cat = cli.raw("results", name, "--cat")
    assert cat.returncode == 0, cat.stderr
    parts = [s3.get_object(Bucket=BUCKET, Key=url.removeprefix(f"s3://{BUCKET}/"))["Body"].read()
             for url in urls]
    assert cat.stdout == b"".join(parts), "contents in partition order"
    assert sorted(cat.stdout.splitlines()) == wordcount_reference(
        [path.read_bytes() for path in DATA.iterdir()])

    assert "only a Failed or Cancelled job can be retried, not Succeeded" in one_line_error(
        cli("retry", name), 1)
    assert one_line_error(cli("cancel", name), 1) == (
        f"job {name} is already Succeeded; nothing to cancel")


@e2e
def test_submit_from_flags_wait_exits_1_when_the_job_fails(cli: Cli) -> None:
    result = cli("submit", "--image", IMAGE, "--job", "tests.jobs.broken", "--input", "x",
                 "--no-split-inputs", "--output", f"s3://{BUCKET}/broken", "--wait")
    name = result.stdout.strip()
    assert name.startswith("broken-"), "the job module names the job"
    error = one_line_error(result, 1)
    assert error.startswith(f"job {name} failed: ") and "broken job module" in error
    described = ok(cli("status", name))
    assert re.search(r"^Phase: +Failed$", described, re.M)
    assert re.search(r"^Error: .*this image ships a broken job module", described, re.M)
    assert one_line_error(cli("results", name), 1).startswith(f"job {name} failed: ")
    assert "(partitions complete: 0 of 1)" in one_line_error(cli("results", name, "--cat"), 1)


@e2e
def test_manifest_from_stdin_watch_and_submit_errors(cli: Cli) -> None:
    name = f"stdin-{uuid.uuid4().hex[:6]}"
    manifest = {"apiVersion": "kubemr.io/v1alpha1", "kind": "MapReduceJob",
                "metadata": {"name": name},
                "spec": {"image": IMAGE, "job": "tests.jobs.attempts", "inputs": ["a", "b"],
                         "splitInputs": False, "output": f"s3://{BUCKET}/echo"}}
    assert ok(cli("submit", "-", stdin=yaml.safe_dump(manifest))).strip() == name
    assert one_line_error(cli("submit", "-", stdin=yaml.safe_dump(manifest)), 1) == (
        f"job {name} already exists in namespace {cli.namespace}")
    watched = cli("status", name, "--watch")
    assert re.search(r"^Phase: +Succeeded$", ok(watched), re.M), watched.stderr
    assert ok(cli("results", name)).splitlines() == ["a,b"], "one reducer: one result"

    elsewhere = {**manifest, "metadata": {"name": "x", "namespace": "elsewhere"}}
    assert "does not match --namespace" in one_line_error(
        cli("submit", "-", stdin=yaml.safe_dump(elsewhere)), 2)
    invalid = {**manifest, "metadata": {"generateName": "bad-"},
               "spec": {**manifest["spec"], "reducers": -1}}
    error = one_line_error(cli("submit", "-", stdin=yaml.safe_dump(invalid)), 2)
    assert error.startswith("invalid MapReduceJob bad-*: ") and "spec.reducers" in error


@e2e
def test_results_cat_streams_each_partition_as_its_reduce_commits(
        cli: Cli, kube_cluster: TestCluster, s3: Any, tmp_path: Path) -> None:
    texts = {f"in-{i}.txt": " ".join(f"w{(i * 7 + j) % 40}" for j in range(200))
             for i in range(3)}
    inputs = upload(s3, f"stream-{uuid.uuid4().hex[:6]}", texts)
    release = tmp_path / "release"
    name = submit(cli, "--job", "tests.jobs.poison", "--input", inputs, "--reducers", "2",
                  "--output", f"s3://{BUCKET}/stream", "--arg", "hold=reduce-00001",
                  "--arg", f"release={release}")
    assert name.startswith("poison-")
    proc = cli.popen("results", name, "--cat")
    chunks: list[bytes] = []
    assert proc.stdout is not None
    stdout = proc.stdout
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: stdout.read1(), b"")))
    reader.start()
    try:
        wait_for("partition 0 on stdout", lambda: chunks)
        assert phase_of(kube_cluster, cli.namespace, name) == "Running"
        assert proc.poll() is None, "still following the job"
        partial = b"".join(chunks)
    finally:
        release.touch()
    assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    reader.join()
    output = b"".join(chunks)
    results = ok(cli("results", name)).splitlines()
    first = s3.get_object(Bucket=BUCKET, Key=results[0].removeprefix(f"s3://{BUCKET}/"))
    assert partial == first["Body"].read(), "partition 0 came out while reduce 1 was held"
    assert sorted(output.splitlines()) == wordcount_reference(
        [text.encode() for text in texts.values()])


@e2e
def test_retry_reruns_only_the_tasks_that_had_not_committed(
        cli: Cli, kube_cluster: TestCluster, s3: Any, tmp_path: Path) -> None:
    prefix = f"retry-{uuid.uuid4().hex[:6]}"
    texts = {f"in-{i}.txt": f"alpha beta gamma{i} delta beta" for i in range(4)}
    texts["in-2.txt"] = "alpha poison beta"
    inputs = upload(s3, prefix, texts)
    log = tmp_path / "attempts.log"
    result = cli("submit", "--image", IMAGE, "--generate-name", "poisoned-",
                 "--job", "tests.jobs.poison", "--input", inputs, "--max-attempts", "1",
                 "--workers", "2", "--reducers", "2", "--output", f"s3://{BUCKET}/retried",
                 "--arg", f"log={log}", "--arg", "wait_for=3", "--arg", "settle=2", "--wait")
    name = result.stdout.strip()
    assert "ValueError: poisoned input" in one_line_error(result, 1)
    completed(kube_cluster, cli.namespace, name)

    task_ns = kube_cluster.api("GET", job_path(cli.namespace, name))["status"]["taskNamespace"]
    tasks = kube_cluster.api("GET", f"{GROUP_PATH}/namespaces/{task_ns}/mapreducetasks")["items"]
    maps = {t["metadata"]["labels"]["kubemr.io/task"]: t["status"] for t in tasks
            if t["status"]["kind"] == "map"}
    poisoned = next(key for key, task in maps.items() if task["input"].endswith("in-2.txt"))
    committed = {key for key, task in maps.items() if task["state"] == "committed"}
    assert committed == set(maps) - {poisoned}, "the clean maps committed before the failure"

    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/in-2.txt", Body=b"alpha antidote beta")
    texts["in-2.txt"] = "alpha antidote beta"
    retried = cli("retry", name, "--wait")
    assert retried.returncode == 0, retried.stderr
    assert f"job {name} succeeded" in retried.stderr

    runs = Counter(line.split()[0] for line in log.read_text().splitlines())
    assert all(runs[key] == 1 for key in committed), f"committed maps re-ran: {runs}"
    # The first run's attempt, maybe its backup (it waits while the other maps commit,
    # so an idle worker may back it up: backup tasks are on), and the retry's one run.
    assert runs[poisoned] in (2, 3), runs
    cat = cli.raw("results", name, "--cat")
    assert sorted(cat.stdout.splitlines()) == wordcount_reference(
        [text.encode() for text in texts.values()])


@e2e
def test_retry_refuses_a_job_that_failed_before_planning(cli: Cli,
                                                          kube_cluster: TestCluster) -> None:
    result = cli("submit", "--image", IMAGE, "--job", "tests.jobs.poison", "--input",
                 "s3://no-such-bucket-kubemr/data/", "--output", f"s3://{BUCKET}/never",
                 "--wait")
    name = result.stdout.strip()
    assert "no-such-bucket-kubemr" in one_line_error(result, 1)
    completed(kube_cluster, cli.namespace, name)
    assert "submit it again" in one_line_error(cli("retry", name), 1)


@e2e
def test_cancel_makes_a_running_job_cancelled_and_stops_its_workers(
        cli: Cli, kube_cluster: TestCluster) -> None:
    name = sleeper(cli, "cancelme")
    wait_for("worker pods", lambda: worker_pods(kube_cluster, cli.namespace, name))
    result = cli("cancel", name)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(f"job {name} cancelled by ")
    status = json.loads(ok(cli("status", name, "-o", "json")))["status"]
    assert status["phase"] == "Cancelled"
    assert status["error"]["message"].startswith("cancelled by ")
    wait_for("the worker Job to go", lambda: gone(
        kube_cluster, f"/apis/batch/v1/namespaces/{cli.namespace}/jobs/{name}-workers"))
    wait_for("the worker pods to go",
             lambda: not worker_pods(kube_cluster, cli.namespace, name))
    assert one_line_error(cli("cancel", name), 1) == (
        f"job {name} is already Cancelled; nothing to cancel")
    assert one_line_error(cli("results", name), 1).startswith(f"job {name} cancelled: ")


@e2e
def test_logs_prefix_lines_with_their_pod_and_follow_until_the_pods_end(
        cli: Cli, kube_cluster: TestCluster) -> None:
    name = sleeper(cli, "logged")
    prefix = re.compile(rf"^\[pod/({re.escape(name)}-workers-[a-z0-9-]+)/worker\] ")

    def every_pod_claimed() -> list[str] | None:
        """The log lines once each worker pod has claimed its map (two maps, two pods)."""
        result = cli("logs", name)
        lines = result.stdout.splitlines() if result.returncode == 0 else []
        claimers = {m.group(1) for line in lines if "claimed" in line
                    and (m := prefix.match(line))}
        return lines if len(claimers) == 2 else None

    lines = wait_for("both pods to claim a map", every_pod_claimed, timeout=60)
    assert all(prefix.match(line) for line in lines), lines
    pods = {m.group(1) for line in lines if (m := prefix.match(line))}
    assert pods == {p["metadata"]["name"] for p in worker_pods(kube_cluster, cli.namespace, name)}
    tailed = ok(cli("logs", name, "--tail", "1")).splitlines()
    assert sorted(line.split("]")[0] for line in tailed) == sorted(
        f"[pod/{pod}/worker" for pod in pods), "one line per pod"

    follower = cli.popen("logs", name, "-f")
    time.sleep(2)
    assert follower.poll() is None, "following running pods"
    ok(cli("cancel", name))
    out, err = follower.communicate(timeout=90)
    assert follower.returncode == 0, err
    assert b"claimed" in out
    wait_for("the worker pods to go", lambda: not worker_pods(kube_cluster, cli.namespace, name))
    assert "has no worker pods" in one_line_error(cli("logs", name), 1)


@e2e
def test_delete_wait_and_commands_on_a_missing_job(cli: Cli, kube_cluster: TestCluster) -> None:
    name = sleeper(cli, "doomed")
    wait_for("Running", lambda: phase_of(kube_cluster, cli.namespace, name) == "Running")
    result = cli("delete", name, "--wait")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == f"job {name} deleted"
    assert gone(kube_cluster, job_path(cli.namespace, name))
    for command in (["status"], ["results"], ["results", "--cat"], ["cancel"], ["retry"],
                    ["delete"], ["logs"]):
        assert one_line_error(cli(command[0], name, *command[1:]), 1) == (
            f"job {name} not found in namespace {cli.namespace}"), command


@e2e
def test_status_and_timeline_of_a_straggler_job(cli: Cli, kube_cluster: TestCluster, s3: Any,
                                                tmp_path: Path) -> None:
    """While the straggler runs, `kubemr status` shows it running (age, worker) beside the
    backup an idle worker started (backup tasks are on by default; the backup waits for
    the release too), the map stage's rate and ETA and the failed attempt's reason, and
    `kubemr timeline` draws both attempts from the task records; once Succeeded (records
    deleted) it draws every attempt from what the stamping worker left beside the
    results: the pair's winner committed, the other attempt lost to its twin."""
    inputs = [arg for i in range(8) for arg in ("--input", f"f{i}.txt")]
    release = tmp_path / "release"  # the straggler runs until this exists
    name = submit(cli, "--generate-name", "straggler-", "--job", "tests.jobs.straggler",
                  *inputs, "--no-split-inputs", "--output", f"s3://{BUCKET}/echo",
                  "--workers", "3", "--reducers", "2", "--arg", f"hold={release}")

    def straggling() -> str | None:
        text = ok(cli("status", name))
        alone = re.search(r"^Maps: +7/8   1 running   [0-9.]+/s   ETA \S+$", text, re.M)
        backed_up = re.search(r"^  map-00003 +2 +straggler-\S+ +\d+[sm]\S* +f3\.txt$",
                              text, re.M)
        return text if alone and backed_up else None

    described = wait_for("the straggler to run with its backup", straggling, timeout=300)
    assert re.search(r"^  map-00003 +1 +straggler-\S+ +\d+[sm]\S* +f3\.txt$", described,
                     re.M), described
    assert re.search(r"^Backups: +1 launched, 0 won$", described, re.M), described
    assert re.search(r"^  map-00005 +committed +1 +RuntimeError: the first attempt of f5's map "
                     r"fails \(at \S+straggler\.py:\d+\)$", described, re.M), described
    page = tmp_path / "timeline.html"
    assert ok(cli("timeline", name, "-o", str(page))).strip() == str(page)
    running = page.read_text()
    assert running.count('data-outcome="running"') == 2, "the straggler and its backup"
    assert running.count('data-outcome="failed"') == 1
    assert running.count('data-outcome="committed"') == 7

    release.touch()
    assert completed(kube_cluster, cli.namespace, name)["phase"] == "Succeeded"
    wait_for("the task records to go", lambda: not ok(cli("status", name)).count("map-0"))
    assert s3.get_object(Bucket=BUCKET, Key=f"echo/{cli.namespace}/{name}/_timeline.json")
    ok(cli("timeline", name, "-o", str(page)))  # replaces the page it wrote before
    done = page.read_text()
    assert done.count('class="bar"') == 8 + 1 + 1 + 2, (
        "8 maps, the straggler's backup, f5's failed attempt, 2 reduces")
    assert done.count('data-outcome="committed"') == 10
    pair = dict(re.findall(r'data-outcome="(committed|backup)"><title>map-00003 attempt (\d)',
                           done))
    assert sorted(pair) == ["backup", "committed"] and sorted(pair.values()) == ["1", "2"], pair
    assert f"lost to {'backup' if pair['committed'] == '2' else 'original'} attempt " \
           f"{pair['committed']}" in done
    assert re.search(r"<li>map-00003 attempt [12] on straggler-", done), (
        "the straggler is called out")
    mine = tmp_path / "notes.html"
    mine.write_text("my notes")
    assert one_line_error(cli("timeline", name, "-o", str(mine)), 2) == (
        f"{mine} exists and was not written by kubemr; not overwriting it")
    assert mine.read_text() == "my notes"


# --- bad input, no cluster needed -------------------------------------------------------


def run_kubemr(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KUBEMR, *args], input=stdin, capture_output=True, text=True,
                          timeout=60)


FLAGS = ["submit", "--image", "img", "--job", "tests.jobs.poison", "--input", "s3://b/in"]


@pytest.mark.parametrize(("args", "stdin", "message"), [
    (["submit", "{tmp}/missing.yaml"], None, "{tmp}/missing.yaml: no such file"),
    (["submit", "-"], "spec: [", "stdin: invalid YAML: "),
    (["submit", "-"], "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n",
     "stdin: expected apiVersion kubemr.io/v1alpha1, kind MapReduceJob; got v1, Pod"),
    (["submit", "-"], "apiVersion: kubemr.io/v1alpha1\nkind: MapReduceJob\nspec: {}\n",
     "stdin: metadata.name or metadata.generateName is required"),
    (["submit", str(ROOT / "examples" / "wordcount.yaml"), "--workers", "3"], None,
     "give a manifest FILE or job flags, not both (got --workers)"),
    (FLAGS, None, "missing --output (or give a manifest FILE)"),
    ([*FLAGS, "--output", "/tmp/out"], None,
     "spec.output: must be an S3 URL like s3://bucket/prefix, got '/tmp/out'"),
    ([*FLAGS, "--output", "s3://bucket/out", "--name", "Bad_Name"], None,
     "metadata.name: 'Bad_Name' is invalid"),
    ([*FLAGS, "--output", "s3://bucket/out", "--generate-name", "UP-"], None,
     "--generate-name 'UP-' is invalid"),
    ([*FLAGS, "--output", "s3://bucket/out", "--name", "a", "--generate-name", "b-"], None,
     "--name and --generate-name cannot be used together"),
    (["status", "x", "--kubeconfig", "{tmp}/nope"], None, "kubeconfig {tmp}/nope does not exist"),
    (["status", "x", "--kubeconfig", "{kubeconfig}", "--context", "nope"], None,
     "context 'nope' not found in kubeconfig {kubeconfig}"),
    (["logs", "x", "--tail", "-5"], None, "--tail must be -1 (all lines) or more, got -5"),
])
def test_bad_input_fails_with_one_line_and_exit_2(tmp_path: Path, args: list[str],
                                                  stdin: str | None, message: str) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "config", namespace=None)
    fill = {"tmp": tmp_path, "kubeconfig": kubeconfig}
    result = run_kubemr(*(a.format(**fill) for a in args), stdin=stdin)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("kubemr: error: " + message.format(**fill)), result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--workers", "0"], "spec.workers: must be between 1 and 1000, got 0"),
    (["--reducers", "100000"], "spec.reducers: must be between 0 (map-only) and 10000, got 100000"),
    (["--max-attempts", "0"], "spec.maxAttempts: must be between 1 and 100, got 0"),
    (["--max-attempts", "101"], "spec.maxAttempts: must be between 1 and 100, got 101"),
    (["--lease-seconds", "0.5"], "spec.leaseSeconds: must be at least 1, got 0.5"),
    (["--chunk-size", "lots"], "invalid size 'lots': use bytes or a suffix like 64MiB, 512k, 1G"),
    (["--chunk-size", "0"], "spec.chunkSize: must be at least 1, got 0"),
    (["--arg", "novalue"], "--arg: expected KEY=VALUE, got 'novalue'"),
    (["--format", "csv"], "spec.outputFormat: must be one of text, jsonl, parquet, got 'csv'"),
])
def test_invalid_flag_values_fail_with_one_line_and_exit_2(args: list[str],
                                                           message: str) -> None:
    result = run_kubemr(*FLAGS, "--output", "s3://bkt/o", *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"kubemr: error: {message}\n"


@pytest.mark.parametrize(("args", "option"), [
    (["list", "-o", "xml"], "--output"),
    (["status"], "NAME"),
    (["logs", "x", "--tail", "lots"], "--tail"),
])
def test_malformed_command_lines_are_usage_errors(args: list[str], option: str) -> None:
    """Flags the parser itself rejects (typer's usage message), still exit 2."""
    result = run_kubemr(*args)
    assert result.returncode == 2, result.stderr
    assert option in result.stderr and "Traceback" not in result.stderr


# --- pure parts -------------------------------------------------------------------------


def write_kubeconfig(path: Path, namespace: str | None) -> Path:
    context: dict[str, str] = {"cluster": "c", "user": "u"}
    if namespace:
        context["namespace"] = namespace
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "main",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "main", "context": context},
                     {"name": "other", "context": {**context, "namespace": "team-b"}}]}))
    return path


def test_namespace_defaults_like_kubectl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with_ns = str(write_kubeconfig(tmp_path / "a", namespace="team-a"))
    without = str(write_kubeconfig(tmp_path / "b", namespace=None))
    assert jobs.default_namespace(with_ns, None, {}) == "team-a"
    assert jobs.default_namespace(with_ns, "other", {}) == "team-b"
    assert jobs.default_namespace(without, None, {}) == "default"
    assert jobs.default_namespace(None, None, {"KUBECONFIG": with_ns}) == "team-a"
    pod_namespace = tmp_path / "namespace"
    pod_namespace.write_text("in-pod\n")
    monkeypatch.setattr(jobs, "SERVICE_ACCOUNT_NAMESPACE", pod_namespace)
    assert jobs.default_namespace(None, None, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == "in-pod"
    with pytest.raises(UsageError, match="context 'nope' not found"):
        jobs.default_namespace(with_ns, "nope", {})
    with pytest.raises(KubemrError, match="no kubeconfig at"):
        jobs.default_namespace(None, None, {"KUBECONFIG": str(tmp_path / "none")})


def test_manifest_from_flags() -> None:
    manifest = manifests.build_manifest(manifests.SubmitOptions(
        image="img:1", job="examples.wordcount", inputs=["s3://b/data/"],
        output="s3://bkt/out", reducers=4, args={"k": "v"}))
    assert manifest["apiVersion"] == "kubemr.io/v1alpha1" and manifest["kind"] == "MapReduceJob"
    assert manifest["metadata"] == {"generateName": "wordcount-"}
    assert manifest["spec"] == {
        "image": "img:1", "workers": 2, "job": "examples.wordcount", "inputs": ["s3://b/data/"],
        "reducers": 4, "maxAttempts": 3, "leaseSeconds": 30.0, "chunkSize": 64 * 1024 * 1024,
        "args": {"k": "v"}, "output": "s3://bkt/out", "splitInputs": True,
        "outputFormat": "text"}
    named = manifests.build_manifest(manifests.SubmitOptions(
        image="i", job="/app/My_Job.py", inputs=["x"], output="s3://bkt/o", name="mine",
        split_inputs=False, output_format="parquet"))
    assert named["metadata"] == {"name": "mine"} and named["spec"]["splitInputs"] is False
    assert named["spec"]["outputFormat"] == "parquet"
    timed = manifests.build_manifest(manifests.SubmitOptions(
        image="i", job="j", inputs=["x"], output="s3://bkt/o", task_timeout=2.5))
    assert timed["spec"]["taskTimeoutSeconds"] == 2.5, "unset (above): no field, no limit"
    assert manifests.build_manifest(manifests.SubmitOptions(
        image="i", job="/app/My_Job.py", inputs=["x"], output="s3://bkt/o"),
    )["metadata"] == {"generateName": "my-job-"}
    with pytest.raises(UsageError, match=r"spec\.reducers: must be between"):
        manifests.build_manifest(manifests.SubmitOptions(image="i", job="j", inputs=["x"],
                                               output="s3://bkt/o", reducers=-1))


def test_manifest_of_a_pipeline_found_here_names_its_steps(tmp_path: Path) -> None:
    """submit fills in a pipeline's steps from the module when its source names one; a
    plain job's source is only read, not imported (see manifests._may_be_pipeline)."""
    def spec(job: str) -> dict[str, Any]:
        return manifests.build_manifest(manifests.SubmitOptions(
            image="i", job=job, inputs=["x"], output="s3://bkt/o", reducers=3))["spec"]

    assert (spec("examples.topn_words")["steps"], spec("examples.topn_words")["stepReducers"]) \
        == (2, [3, 1])
    assert "steps" not in spec("examples.wordcount")
    helper = tmp_path / "made.py"  # its pipeline comes from a helper named for it
    helper.write_text("from examples.topn_words import count, top\n"
                      "from kubemr_async import Pipeline as make\n"
                      "job = make('made', [count, top])  # a pipeline\n")
    assert spec(str(helper))["steps"] == 2
    broken = tmp_path / "broken.py"  # names no pipeline: read, never run
    broken.write_text("raise SystemExit('imported')\n")
    assert "steps" not in spec(str(broken))


def test_manifest_from_command_flags_needs_no_job_module() -> None:
    manifest = manifests.build_manifest(manifests.SubmitOptions(
        image="img:1", job="", inputs=["s3://b/data/"], output="s3://bkt/out",
        mapper="cat", combiner="uniq", reducer="uniq -c"))
    assert manifest["metadata"] == {"generateName": "streaming-"}
    spec = manifest["spec"]
    assert "job" not in spec
    assert (spec["mapper"], spec["combiner"], spec["reducer"]) == ("cat", "uniq", "uniq -c")
    result = run_kubemr("submit", "--image", "i", "--input", "s3://b/x", "--output",
                        "s3://bkt/o", "--reducer", "uniq -c")
    assert result.returncode == 2
    assert result.stderr == ("kubemr: error: missing --job (or --mapper) "
                             "(or give a manifest FILE)\n")


def test_load_manifest_and_its_namespace() -> None:
    text = (ROOT / "examples" / "wordcount.yaml").read_text()
    manifest = manifests.load_manifest(text, "wordcount.yaml")
    assert manifest["metadata"] == {"generateName": "wordcount-"}
    assert manifests.manifest_namespace(manifest, None) is None
    assert manifests.manifest_namespace(manifest, "a") == "a"
    placed = {**manifest, "metadata": {"name": "x", "namespace": "b"}}
    assert manifests.manifest_namespace(placed, None) == "b"
    assert manifests.manifest_namespace(placed, "b") == "b"
    with pytest.raises(UsageError, match="does not match --namespace 'a'"):
        manifests.manifest_namespace(placed, "a")
    with pytest.raises(UsageError, match="expected one MapReduceJob, found 2 documents"):
        manifests.load_manifest(text + "\n---\n" + text, "two.yaml")
    with pytest.raises(UsageError, match="expected a MapReduceJob object, got list"):
        manifests.load_manifest("- a\n", "list.yaml")


@pytest.mark.parametrize(("seconds", "age"), [
    (-5, "<invalid>"), (-0.5, "0s"), (1, "1s"), (70, "70s"), (190, "3m10s"), (300, "5m"),
    (70 * 60, "70m"), (200 * 60, "3h20m"), (5 * 3600, "5h"), (47 * 3600, "47h"),
    (49 * 3600, "2d1h"), (72 * 3600, "3d"), ((8 * 24 + 2) * 3600, "8d"),
    (367 * 24 * 3600, "367d"), ((365 * 2 * 24 + 25) * 3600, "2y1d"),
    ((365 * 8 * 24 + 2) * 3600, "8y"),
])
def test_age_reads_like_kubectl(seconds: float, age: str) -> None:
    assert cli_render.human_duration(seconds) == age


def job_object(name: str, namespace: str, created: datetime, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace,
                         "creationTimestamp": created.strftime("%Y-%m-%dT%H:%M:%SZ")},
            "spec": {"reducers": 2}, "status": status}


def test_list_table_and_status_text() -> None:
    now = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    items = [
        job_object("wordcount-abcde", "default", now - timedelta(seconds=90), phase="Running",
                   maps=12, mapsDone=5, reduces=2, reducesDone=0),
        job_object("x", "team-b", now - timedelta(hours=30)),
    ]
    assert cli_render.list_table(items, False, now) == (
        "NAME              PHASE     MAPS   REDUCES   AGE\n"
        "wordcount-abcde   Running   5/12   0/2       90s\n"
        "x                 Pending   0/0    0/2       30h")
    assert cli_render.list_table(items, True, now).splitlines()[0].split() == [
        "NAMESPACE", "NAME", "PHASE", "MAPS", "REDUCES", "AGE"]
    assert cli_render.list_table(items, True, now).splitlines()[2].startswith("team-b      x   ")
    failed = job_object("w", "ns", now, phase="Failed", maps=3, mapsDone=2,
                        error={"task": "map-00001", "attempt": 3, "message": "boom"})
    assert cli_render.describe(failed) == (
        "Name:       w\n"
        "Namespace:  ns\n"
        "Phase:      Failed\n"
        "Maps:       2/3\n"
        "Reduces:    0/2\n"
        "Error:      task map-00001 attempt 3: boom")
    done = job_object("w", "ns", now, phase="Succeeded", results=["s3://b/p0", "s3://b/p1"],
                      completionTime="2025-01-01T12:00:00Z")
    assert cli_render.describe(done).endswith(
        "Completed:  2025-01-01T12:00:00Z\nResults:\n  s3://b/p0\n  s3://b/p1")
    second = {**job_object("t", "ns", now, phase="Running", step=1, maps=4),
              "spec": {"steps": 3, "reducers": 2}}
    assert "Phase:      Running\nStep:       2/3\nMaps:       0/4\n" in cli_render.describe(second)


def test_results_are_final_in_partition_order() -> None:
    job = {"phase": "Running", "maps": 0, "results": [], "error": None, "seq": 1,
           "spec": {"reducers": 3}}
    reduces = {reduce_key(i): new_task_state(i, state) for i, state in
               enumerate(["committed", "running", "committed"])}
    view = JobView({"job": job, **reduces})
    assert jobs.final_outputs(view, 0) == ["out-0"], "partition 2 waits for partition 1"
    view.update(reduce_key(1), new_task_state(1, "committed"))
    assert jobs.final_outputs(view, 1) == ["out-1", "out-2"]
    view.update("job", {**job, "phase": "Succeeded", "results": ["r0", "r1", "r2"]})
    assert jobs.final_outputs(view, 1) == ["r1", "r2"]
    # A multi-step job's earlier step: its committed parts are the next step's input.
    first = {**job, "spec": {"reducers": 3, "steps": 2, "stepReducers": [3, 1]}, "step": 0}
    assert jobs.final_outputs(JobView({"job": first, **reduces}), 0) == []
    last = {**first, "step": 1}
    step_two = {reduce_key(0, 1): {**new_task_state(0, "committed"), "step": 1}}
    assert jobs.final_outputs(JobView({"job": last, **reduces, **step_two}), 0) == ["out-0"]
    with pytest.raises(JobFailed, match="job w cancelled: cancelled by me"):
        jobs.published_results("w", {"status": {"phase": "Cancelled", "error": {
            "task": "", "attempt": 0, "message": "cancelled by me"}}})
    with pytest.raises(KubemrError, match="job w is Running: its results are listed once"):
        jobs.published_results("w", {"status": {"phase": "Running"}})
    assert jobs.published_results("w", {"status": {"phase": "Succeeded", "results": ["a"]}}) == [
        "a"]


def new_task_state(partition: int, state: str) -> dict[str, Any]:
    return {**new_task(TaskKind.REDUCE, partition), "state": state,
            "outputs": f"out-{partition}" if state == "committed" else None}
