"""Many maps x many reducers on the real API server and S3: constant-size records, M objects.

A word count whose M maps each get one line of one S3 object (chunkSize = line length)
and whose words spread over R reducers. The test follows the task objects with a watch
from before the job exists (the operator deletes them after the verdict) and lists the
job's intermediate prefix on the S3 server while the job runs (intermediate objects are
deleted just before the verdict), so it can check that

* every task record stays small (under 2 KB) and map records do not grow with R, and
* the job writes M shuffle objects, not M x R: the distinct objects ever listed under the
  job's prefix are at most M + R plus a constant per map.

CI runs M=200 x R=50; ``KUBEMR_SHUFFLE_SCALE=full`` runs the issue's 2,000 x 500.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kubemr_async.state.kube import task_namespace_for
from kubemr_async.testing.cluster import TestCluster

from .operator_fixtures import BUCKET, kube_namespace, operator, s3
from .test_scale import TaskRecorder, jobs_path

__all__ = ["kube_namespace", "operator", "s3"]  # fixtures used by name
pytestmark = [pytest.mark.kube, pytest.mark.s3, pytest.mark.slow]

FULL = os.environ.get("KUBEMR_SHUFFLE_SCALE") == "full"
MAPS, REDUCERS = (2000, 500) if FULL else (200, 50)
WORKERS = 4
LINE = 32  # bytes per input line, newline included: one map each
# Seconds between listings: a listing of thousands of keys is pages of work for the S3
# server the job shares 2 cores with; maps write their objects long before the cleanup.
LIST_INTERVAL = 5.0 if FULL else 0.2


class Lister:
    """Lists a prefix on the S3 server over and over; keeps every key it ever saw."""

    def __init__(self, s3: Any, prefix: str, interval: float) -> None:
        self.s3, self.prefix, self.interval = s3, prefix, interval
        self.seen: set[str] = set()
        self.largest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Lister:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stop.is_set():
            keys = []
            for page in self.s3.get_paginator("list_objects_v2").paginate(
                    Bucket=BUCKET, Prefix=self.prefix):
                keys += [obj["Key"] for obj in page.get("Contents", ())]
            self.seen.update(keys)
            self.largest = max(self.largest, len(keys))
            time.sleep(self.interval)


def test_many_maps_and_reducers_keep_records_small_and_write_one_object_per_map(
        kube_cluster: TestCluster, kube_namespace: str, operator: Path, s3: Any) -> None:
    words = [f"w{i % 997:04d}" for i in range(MAPS * 3)]
    lines = [" ".join(words[3 * m:3 * m + 3]).ljust(LINE - 1).encode() + b"\n"
             for m in range(MAPS)]
    input_key = f"scale-input/{uuid.uuid4().hex[:8]}.txt"
    s3.put_object(Bucket=BUCKET, Key=input_key, Body=b"".join(lines))
    name = f"shuffle-{uuid.uuid4().hex[:6]}"
    manifest = {"apiVersion": "kubemr.io/v1alpha1", "kind": "MapReduceJob",
                "metadata": {"name": name},
                "spec": {"image": "kubemr-tests:dev", "job": "examples.wordcount",
                         "inputs": [f"s3://{BUCKET}/{input_key}"], "chunkSize": LINE,
                         "reducers": REDUCERS, "workers": WORKERS,
                         "output": f"s3://{BUCKET}/results"}}
    prefix = f"results/{kube_namespace}/{name}/"
    started = time.monotonic()
    with (TaskRecorder(kube_cluster, task_namespace_for(kube_namespace, name)) as recorder,
          Lister(s3, prefix, LIST_INTERVAL) as lister):
        kube_cluster.api("POST", jobs_path(kube_namespace), manifest)
        deadline = started + (7200 if FULL else 600)
        while True:
            status = kube_cluster.api("GET", jobs_path(kube_namespace, name)).get("status") or {}
            if status.get("phase") in ("Succeeded", "Failed", "Cancelled"):
                break
            assert time.monotonic() < deadline, f"job {name} stuck: {status}"
            time.sleep(0.5)
        seconds = time.monotonic() - started
        assert status["phase"] == "Succeeded", status
        tasks = recorder.wait_for(lambda seen: len(seen) == MAPS + REDUCERS and all(
            t["status"]["state"] == "committed" for t in seen.values()), timeout=300)

    def size(obj: dict[str, Any]) -> int:
        return len(json.dumps(obj, separators=(",", ":")))

    largest = max(size(t) for t in tasks.values())
    maps = [t["status"] for t in tasks.values() if t["status"]["kind"] == "map"]
    assert len(maps) == MAPS
    objects = {t["outputs"]["shuffle"] for t in maps}
    intermediate = {k for k in lister.seen if k.startswith(prefix + "map/")}
    written = len(lister.seen)
    print(f"\n{MAPS} maps x {REDUCERS} reducers: Succeeded in {seconds:.0f}s; largest task "
          f"object {largest} bytes; objects listed under the job: {written} "
          f"({len(intermediate)} intermediate, at most {lister.largest} at once)")
    assert largest < 2048, largest
    assert len(objects) == MAPS, "one shuffle object per map"
    assert objects <= intermediate, "the listing saw every map's object"
    assert written <= MAPS + REDUCERS + 2 * MAPS, written
    assert not [k for k in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "map/")
                .get("Contents", ())], "intermediate objects are cleaned up"
    counts: Counter[str] = Counter(words)
    got: dict[str, int] = {}
    for url in status["results"]:
        body = s3.get_object(Bucket=BUCKET, Key=url[len(f"s3://{BUCKET}/"):])["Body"].read()
        for line in body.decode().splitlines():
            word, count = line.split("\t")
            got[word] = int(count)
    assert got == dict(counts)
