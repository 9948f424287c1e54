"""The total-order partitioner on a cluster: the workers sample, the parts sort globally.

The operator imports no job module, so it cannot sample a job's keys; the worker pods do,
before their first map, through a partition file beside the job's shuffle objects. A sort
of skewed 100-byte records (examples/sort.py) on S3 must come out as one sorted copy of its
input across 4 parts, and the partition file must go with the other intermediate objects.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from kubemr_async.testing.cluster import TestCluster
from kubemr_async.validate import check_sorted_copy

from .operator_fixtures import BUCKET, kube_namespace, operator, s3
from .test_local_run import ROOT
from .test_operator_e2e import create_job, wait_for_completion, wait_for_phase

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.sort import render_records

__all__ = ["kube_namespace", "operator", "s3"]  # fixtures, used by name
pytestmark = [pytest.mark.kube, pytest.mark.s3, pytest.mark.slow]

FILES, RECORDS, REDUCERS = 3, 3000, 4


def sort_job(prefix: str, module: str, inputs: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "kubemr.io/v1alpha1", "kind": "MapReduceJob",
            "metadata": {"generateName": f"{prefix}-"},
            "spec": {"image": "kubemr-tests:dev", "job": module, "inputs": [inputs],
                     "output": f"s3://{BUCKET}/results", **spec}}


def test_a_total_order_job_sorts_globally_on_a_cluster(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path, s3: Any,
        tmp_path: Path) -> None:
    # Skewed keys: about half the records carry one of a few hot keys, the rest are distinct.
    base = f"sort-input/{uuid.uuid4().hex[:8]}"
    inputs = []
    for i in range(FILES):
        path = tmp_path / f"records-{i:05d}.txt"
        path.write_bytes(render_records(21, i, i * RECORDS, RECORDS, skew=0.5).tobytes())
        s3.put_object(Bucket=BUCKET, Key=f"{base}/{path.name}", Body=path.read_bytes())
        inputs.append(path)
    # 40 kB splits: 8 maps per file, so several workers each sample before their first map.
    name = create_job(kube_cluster, kube_namespace, sort_job(
        "sort", "examples.sort", f"s3://{BUCKET}/{base}/", workers=3, reducers=REDUCERS,
        chunkSize=40_000))
    job = wait_for_phase(kube_cluster, kube_namespace, name, operator, timeout=420)
    assert job["status"]["phase"] == "Succeeded", job["status"]
    status = wait_for_completion(kube_cluster, kube_namespace, name)
    results = status["results"]
    assert len(results) == REDUCERS and status["maps"] == FILES * 8
    parts = []
    for partition, url in enumerate(results):  # ordered by partition
        part = tmp_path / f"part-{partition:05d}"
        part.write_bytes(s3.get_object(Bucket=BUCKET, Key=url[len(f"s3://{BUCKET}/"):])
                         ["Body"].read())
        parts.append(part)
    check_sorted_copy(inputs, parts, layout="kubemr")
    sizes = [p.stat().st_size for p in parts]
    assert min(sizes) > 0 and max(sizes) < 0.6 * sum(sizes), sizes  # sampled, not all in one
    leftover = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"results/{kube_namespace}/{name}/map/")
    assert leftover.get("KeyCount", 0) == 0, "the partition file went with the shuffle objects"


def test_a_map_failing_on_the_sample_fails_the_cluster_job_naming_the_sampling(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path, s3: Any) -> None:
    name = create_job(kube_cluster, kube_namespace, sort_job(
        "unsampleable", "tests.jobs.unsampleable", f"s3://{BUCKET}/data/", workers=2,
        reducers=2))
    job = wait_for_phase(kube_cluster, kube_namespace, name, operator)
    assert job["status"]["phase"] == "Failed", job["status"]
    message = job["status"]["error"]["message"]
    assert "sampling keys for the total-order partitioner: ValueError: bad record" in message
    assert job["status"]["error"]["task"].startswith("map-")
