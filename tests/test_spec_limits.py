"""One set of limits, three judges: `kubemr run`, `kubemr submit` and the API server (CRD).

Each case is one invalid value, given to every surface that takes it; each must refuse it and
name the field the way the API server does (``spec.reducers``), so a user meets the same rule
and the same words whether the job runs on a laptop or on a cluster.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubemr_async.crd import GROUP, JOB_PLURAL, VERSION, ensure_crds
from kubemr_async.kube import Kube
from kubemr_async.spec import MAX_ATTEMPTS_LIMIT, MAX_REDUCERS, MAX_WORKERS
from kubemr_async.testing.cluster import ApiError, TestCluster

from .test_cli import run_kubemr
from .test_local_run import ROOT

JOBS = f"/apis/{GROUP}/{VERSION}/namespaces/{{ns}}/{JOB_PLURAL}"
SUBMIT = ["submit", "--image", "img:1", "--job", "examples.wordcount",
          "--input", "s3://data/in", "--output", "s3://results/out"]


@dataclass(frozen=True)
class Case:
    id: str
    flags: list[str] | None  # the same for run and submit; None: only a manifest can say it
    field: str  # as the API server names it
    value: Any
    run: bool = True  # False: `kubemr run` has no such flag (names are generated, workers
    #                   are local processes, output is a directory)


CASES = [
    Case("reducers above the max", ["--reducers", str(MAX_REDUCERS + 1)], "spec.reducers",
         MAX_REDUCERS + 1),
    Case("negative reducers", ["--reducers", "-1"], "spec.reducers", -1),
    Case("zero max attempts", ["--max-attempts", "0"], "spec.maxAttempts", 0),
    Case("max attempts above the max", ["--max-attempts", str(MAX_ATTEMPTS_LIMIT + 1)],
         "spec.maxAttempts", MAX_ATTEMPTS_LIMIT + 1),
    Case("lease below the minimum", ["--lease-seconds", "0.5"], "spec.leaseSeconds", 0.5),
    Case("chunk size 0", ["--chunk-size", "0"], "spec.chunkSize", 0),
    Case("task timeout 0", ["--task-timeout", "0"], "spec.taskTimeoutSeconds", 0),
    Case("negative task timeout", ["--task-timeout", "-1.5"], "spec.taskTimeoutSeconds",
         -1.5),
    Case("bad output format", ["--format", "csv"], "spec.outputFormat", "csv"),
    Case("bad name", ["--name", "Bad_Name"], "metadata.name", "Bad_Name", run=False),
    Case("workers above the max", ["--workers", str(MAX_WORKERS + 1)], "spec.workers",
         MAX_WORKERS + 1, run=False),
    Case("output not an S3 URL", ["--output", "s3://UPPER/x"], "spec.output", "s3://UPPER/x",
         run=False),
    # Values of the wrong kind: read as-is they would mean something else.
    Case("splitInputs a string", None, "spec.splitInputs", "false", run=False),
    Case("inputs a string", None, "spec.inputs", "s3://data/in", run=False),
    Case("reducers a string", None, "spec.reducers", "2", run=False),
    Case("reducers a fraction", None, "spec.reducers", 2.5, run=False),
    Case("an args value not a string", None, "spec.args", {"n": 3}, run=False),
    Case("task timeout a string", None, "spec.taskTimeoutSeconds", "30s", run=False),
]


def manifest(case: Case) -> dict[str, Any]:
    """A valid MapReduceJob with the case's one invalid value."""
    obj: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "MapReduceJob",
        "metadata": {"generateName": "limits-"},
        "spec": {"image": "img:1", "job": "examples.wordcount", "inputs": ["s3://data/in"],
                 "output": "s3://results/out"},
    }
    section, _, key = case.field.partition(".")
    obj[section][key] = case.value
    if case.field == "metadata.name":
        del obj["metadata"]["generateName"]
    return obj


def refused(result: Any, field: str) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"{field}: " in result.stderr, result.stderr
    return str(result.stderr)


@pytest.mark.parametrize("case", [c for c in CASES if c.run], ids=lambda c: c.id)
def test_kubemr_run_refuses(case: Case, tmp_path: Path) -> None:
    data = tmp_path / "in.txt"
    data.write_text("a b a\n")
    out = tmp_path / "out"
    result = run_kubemr("run", str(ROOT / "examples" / "wordcount.py"), "-i", str(data),
                        "--output", str(out), *(case.flags or []))
    refused(result, case.field)
    assert not out.exists(), "refused before anything was created"


@pytest.mark.parametrize(("flags", "field"), [
    (["--arg", "k=caf\udce9"], "spec.args"),
    (["--input", "caf\udce9.txt"], "spec.inputs"),
    (["--mapper", "grep caf\udce9", "--reducer", "cat"], "spec.mapper"),
])
def test_command_line_bytes_that_are_not_utf8_are_refused(flags: list[str], field: str,
                                                          tmp_path: Path) -> None:
    """They reached the job record and failed `kubemr run` with orjson's traceback."""
    data = tmp_path / "in.txt"
    data.write_text("a b a\n")
    out = tmp_path / "out"
    job = [] if "--mapper" in flags else [str(ROOT / "examples" / "wordcount.py")]
    result = run_kubemr("run", *job, "-i", str(data), "--output", str(out), *flags)
    assert "is not valid UTF-8 text" in refused(result, field)
    assert not out.exists(), "refused before anything was created"
    submit = run_kubemr(*SUBMIT, *flags)
    assert "is not valid UTF-8 text" in refused(submit, field)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kubemr_submit_refuses_flags_and_manifests(case: Case, tmp_path: Path) -> None:
    """No cluster is reachable here: the refusal must come before any API call."""
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    if case.flags is not None:
        refused(run_kubemr(*SUBMIT, *case.flags, "--kubeconfig", str(kubeconfig)), case.field)
    from_file = refused(run_kubemr("submit", "-", "--kubeconfig", str(kubeconfig),
                                   stdin=yaml.safe_dump(manifest(case))), case.field)
    assert "invalid MapReduceJob" in from_file, "the words of the API server's refusal"


@pytest.mark.parametrize(("flags", "field"), [
    (["--lease-seconds", "nan"], "spec.leaseSeconds"),
    (["--lease-seconds", "inf"], "spec.leaseSeconds"),
    (["--chunk-size", "99999999TiB"], "spec.chunkSize"),
    (["--task-timeout", "nan"], "spec.taskTimeoutSeconds"),
    (["--task-timeout", "inf"], "spec.taskTimeoutSeconds"),
], ids=["lease NaN", "lease infinite", "chunk size beyond int64", "task timeout NaN",
        "task timeout infinite"])
def test_values_no_manifest_can_hold_are_refused_by_run_and_submit(
        flags: list[str], field: str, tmp_path: Path) -> None:
    """A NaN or infinite lease passed every comparison: `kubemr run` started workers that
    died reading it back from the job record (JSON has neither) until the crash loop
    failed the job; a size beyond the CRD's int64 ended in a TypeError traceback."""
    data = tmp_path / "in.txt"
    data.write_text("a b a\n")
    out = tmp_path / "out"
    refused(run_kubemr("run", str(ROOT / "examples" / "wordcount.py"), "-i", str(data),
                       "--output", str(out), *flags), field)
    assert not out.exists()
    refused(run_kubemr(*SUBMIT, *flags, "--kubeconfig", str(tmp_path / "none")), field)


@pytest.mark.parametrize("command", ["run", "submit"])
def test_a_task_timeout_that_is_not_a_number_is_a_one_line_usage_error(
        command: str, tmp_path: Path) -> None:
    """Refused by the flag's own parsing, before any spec exists: the flag is named."""
    data = tmp_path / "in.txt"
    data.write_text("a b a\n")
    args = (["run", str(ROOT / "examples" / "wordcount.py"), "-i", str(data), "--output",
             str(tmp_path / "out")] if command == "run"
            else [*SUBMIT, "--kubeconfig", str(tmp_path / "none")])
    result = run_kubemr(*args, "--task-timeout", "30s")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "--task-timeout" in result.stderr and "'30s' is not a valid float" in result.stderr
    assert not (tmp_path / "out").exists()


def test_kubemr_run_refuses_a_memory_budget_beyond_int64(tmp_path: Path) -> None:
    data = tmp_path / "in.txt"
    data.write_text("a b a\n")
    refused(run_kubemr("run", str(ROOT / "examples" / "wordcount.py"), "-i", str(data),
                       "--output", str(tmp_path / "out"), "--memory", "99999999TiB"),
            "spec.memory")


@pytest.fixture(scope="module")
def namespace(kube_cluster: TestCluster) -> Iterator[str]:
    async def install() -> None:
        async with await Kube.connect(str(kube_cluster.kubeconfig_path)) as kube:
            await ensure_crds(kube)

    asyncio.run(install())
    name = f"limits-{uuid.uuid4().hex[:8]}"
    kube_cluster.create_namespace(name)
    yield name
    kube_cluster.api("DELETE", f"/api/v1/namespaces/{name}")


@pytest.mark.kube
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_api_server_refuses(case: Case, kube_cluster: TestCluster, namespace: str) -> None:
    with pytest.raises(ApiError) as rejected:
        kube_cluster.api("POST", JOBS.format(ns=namespace), manifest(case))
    assert rejected.value.status == 422, rejected.value.body
    assert case.field in rejected.value.body, rejected.value.body


@pytest.mark.kube
@pytest.mark.slow
def test_api_server_accepts_the_valid_manifest(kube_cluster: TestCluster,
                                               namespace: str) -> None:
    """The cases differ from an accepted object by their one value only."""
    valid = manifest(Case("valid", [], "spec.reducers", 2))
    created = kube_cluster.api("POST", JOBS.format(ns=namespace), valid)
    assert created["spec"]["reducers"] == 2
