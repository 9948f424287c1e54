"""KubeStateStore behaviour beyond the shared contract, against a real API server.

The contract suite (test_state_contract.py) proves the store behaves like every other
backend; these tests cover what only the Kubernetes store has: watches that survive the
server ending the stream, a silent connection, and 410 Gone; the difference between a lost
race (422 from a failed test) and a real error (validation, 403); the operator's path of
a MapReduceJob created with kubectl; and the per-write size staying flat as jobs grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kubemr_async import protocol, skips
from kubemr_async.counters import (
    INT64_MAX,
    MAP_INPUT_BYTES,
    MAP_OUTPUT_RECORDS,
    MAX_COUNTERS,
    SKIPPED_RECORDS,
    TaskCounters,
)
from kubemr_async.crd import GROUP, JOB_PLURAL, LABEL_JOB, TASK_PLURAL, VERSION
from kubemr_async.errors import CounterError, UsageError
from kubemr_async.kube import KubeApiError
from kubemr_async.protocol import Update
from kubemr_async.records import Skipped
from kubemr_async.spec import MAX_SPLITS_PER_TASK, JobSpec
from kubemr_async.state.base import JobNotFound, WatchEvent
from kubemr_async.state.kube import (
    ANNOTATION_OUTPUT_DEFAULTED,
    KubeStateStore,
    _job_record,
    task_namespace_for,
)
from kubemr_async.testing.cluster import TestCluster

from .backends import kube_backend

pytestmark = pytest.mark.anyio


def kube(test: Any) -> Any:
    """Mark a test that needs the real API server (and is slow-ish)."""
    return pytest.mark.kube(pytest.mark.slow(test))


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def job_records(name: str, maps: int, reducers: int = 1) -> list[tuple[str, dict[str, Any]]]:
    spec = JobSpec(name=name, job="job.py", inputs=("s3://data/in",), reducers=reducers,
                   output="s3://results/out")
    return [(protocol.JOB_KEY, protocol.new_job(spec)),
            *protocol.plan(spec, [(f"s3://data/in-{i}", (0, 100)) for i in range(maps)])]


async def open_store(factory: Any) -> KubeStateStore:
    store = await factory()
    assert isinstance(store, KubeStateStore)
    return store


async def collect(events: AsyncIterator[WatchEvent], count: int) -> list[WatchEvent]:
    """The next ``count`` events (30 s at most: a missing event fails, not hangs)."""
    seen: list[WatchEvent] = []

    async def take() -> None:
        async for event in events:
            seen.append(event)
            if len(seen) == count:
                return

    await asyncio.wait_for(take(), 30)
    return seen


# --- naming (no cluster) -------------------------------------------------------------


def test_task_namespace_names_are_valid_unique_and_stable() -> None:
    names = {
        task_namespace_for("a-b", "c"),
        task_namespace_for("a", "b-c"),  # the same text when joined with '-'
        task_namespace_for("default", "wordcount-x7k2p"),
        task_namespace_for("n" * 63, "j" * 63),
        task_namespace_for("n" * 63, "j" * 62 + "k"),  # differs only past the cut
    }
    assert len(names) == 5
    assert all(_DNS_LABEL.match(name) for name in names), names
    assert task_namespace_for("default", "wc") == task_namespace_for("default", "wc")
    assert task_namespace_for("default", "wc").startswith("kubemr-default-wc-")


def test_an_uninitialised_job_reads_as_a_fresh_job_record() -> None:
    """A MapReduceJob created with kubectl has no status yet; it reads as protocol.new_job."""
    spec = JobSpec(name="wc", job="job.py", inputs=("in",), output="s3://results/wc")
    obj = {"metadata": {"name": "wc", "resourceVersion": "7"},
           "spec": {"image": "i", **spec.to_dict()}}
    assert _job_record(obj).body == protocol.new_job(spec)


# --- watches -------------------------------------------------------------------------


@kube
async def test_watch_resumes_after_the_server_ends_the_stream(
        kube_cluster: TestCluster) -> None:
    # timeoutSeconds=1: the API server closes every watch after a second.
    async with kube_backend(kube_cluster, watch_timeout=1) as factory:
        store = await open_store(factory)
        await store.create("resume", job_records("resume", maps=2))
        records, revision = await store.snapshot("resume")
        events = store.watch("resume", revision)
        first = asyncio.ensure_future(collect(events, 1))
        await asyncio.sleep(3.5)
        assert store.stats.watch_connects >= 6, "both streams should have reconnected"
        body = records[protocol.map_key(1)].body
        assert await store.patch("resume", protocol.claim(body, "w1", 1.0, 30.0, 3))
        [event] = await first
        assert (event.type, event.record.key, event.record.body["worker"]) == (
            "PUT", "map-00001", "w1")
        assert store.stats.relists == 0, "resumed from the last version, no re-list"
        await events.aclose()


@kube
async def test_watch_reconnects_when_the_stream_goes_silent(
        kube_cluster: TestCluster) -> None:
    # The server would keep the watch open for a minute; the client gives up after 0.5 s
    # of silence, as it would on a connection that died without a FIN.
    async with kube_backend(kube_cluster, watch_timeout=60,
                            inactivity_timeout=0.5) as factory:
        store = await open_store(factory)
        await store.create("silent", job_records("silent", maps=1))
        records, revision = await store.snapshot("silent")
        events = store.watch("silent", revision)
        first = asyncio.ensure_future(collect(events, 1))
        await asyncio.sleep(2.0)
        assert store.stats.watch_connects >= 4
        body = records[protocol.map_key(0)].body
        assert await store.patch("silent", protocol.claim(body, "w1", 1.0, 30.0, 3))
        [event] = await first
        assert event.record.body["worker"] == "w1"
        await events.aclose()


@kube
async def test_watch_from_an_expired_revision_relists(
        kube_cluster: TestCluster) -> None:
    async with kube_backend(kube_cluster) as factory:
        store = await open_store(factory)
        await store.create("gone", job_records("gone", maps=3))
        records, _ = await store.snapshot("gone")
        # Revision 1 is long compacted out of the watch cache: the server answers 410
        # Gone, and the store re-lists and reports every current record.
        events = store.watch("gone", "1/1")
        relisted = await collect(events, len(records))
        assert store.stats.relists == 2
        assert {e.record.key for e in relisted} == set(records)
        assert all(e.type == "PUT" for e in relisted)
        # ...and then follows changes from the re-listed version.
        body = records[protocol.map_key(2)].body
        assert await store.patch("gone", protocol.claim(body, "w1", 1.0, 30.0, 3))
        [event] = await collect(events, 1)
        assert (event.record.key, event.record.body["worker"]) == ("map-00002", "w1")
        await events.aclose()


@kube
async def test_watch_reports_deleted_tasks_and_rejects_foreign_revisions(
        kube_cluster: TestCluster) -> None:
    async with kube_backend(kube_cluster) as factory:
        store = await open_store(factory)
        await store.create("del", job_records("del", maps=1))
        _, revision = await store.snapshot("del")
        with pytest.raises(ValueError, match="not a revision from this store"):
            await anext(store.watch("del", "42"))
        events = store.watch("del", revision)
        pending = asyncio.ensure_future(collect(events, 1))
        await asyncio.sleep(0.2)
        namespace = await store.task_namespace("del")
        kube_cluster.api("DELETE", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/"
                                   f"{TASK_PLURAL}/del-map-00000")
        [event] = await pending
        assert (event.type, event.record.key) == ("DELETE", "map-00000")
        await events.aclose()


# --- patches: lost races vs errors ---------------------------------------------------


@kube
async def test_failed_test_is_a_lost_race_but_invalid_values_raise(
        kube_cluster: TestCluster) -> None:
    async with kube_backend(kube_cluster) as factory:
        store = await open_store(factory)
        await store.create("race", job_records("race", maps=1))
        stale = (await store.snapshot("race"))[0]["map-00000"].body
        won = await store.patch("race", protocol.claim(stale, "w1", 1.0, 30.0, 3))
        assert won is not None
        assert await store.patch("race", protocol.claim(stale, "w2", 1.0, 30.0, 3)) is None
        assert await store.patch("race", protocol.renew(stale, "w1", 2.0, 30.0)) is None
        assert store.stats.lost_races == 2
        # A value the schema forbids is a bug, not a race: it must surface.
        bogus = Update("map-00000", ({"op": "test", "path": "/seq", "value": 1},
                                     {"op": "replace", "path": "/state", "value": "bogus"}))
        with pytest.raises(KubeApiError, match=r"job race: patching record map-00000.*"
                                               r"status.state: Unsupported value") as err:
            await store.patch("race", bogus)
        assert err.value.status == 422
        with pytest.raises(ValueError, match="unsupported JSON Patch operation"):
            await store.patch("race", Update("map-00000", ({"op": "move", "path": "/seq",
                                                            "from": "/attempt"},)))
        with pytest.raises(JobNotFound, match="job nope"):
            await store.patch("nope", protocol.claim(stale, "w1", 1.0, 30.0, 3))


@kube
async def test_forbidden_writes_raise_naming_job_and_record(
        kube_cluster: TestCluster, tmp_path: Path) -> None:
    async with kube_backend(kube_cluster) as factory:
        admin_store = await open_store(factory)
        namespace = admin_store.namespace
        await admin_store.create("locked", job_records("locked", maps=1))
        records, _ = await admin_store.snapshot("locked")
        # A ServiceAccount that may read this job but has no rights on its tasks, like a
        # worker of another job would be.
        token, kubeconfig = kube_cluster.account_with(namespace, "outsider", [
            {"apiGroups": [GROUP], "resources": [JOB_PLURAL], "resourceNames": ["locked"],
             "verbs": ["get", "list", "watch"]}], tmp_path / "outsider.kubeconfig")
        outsider = await KubeStateStore.connect(namespace, kubeconfig=str(kubeconfig))
        try:
            task = records["map-00000"].body
            with pytest.raises(KubeApiError) as err:
                await outsider.patch("locked", protocol.claim(task, "w1", 1.0, 30.0, 3))
            assert err.value.status == 403
            assert "job locked: patching record map-00000" in str(err.value)
            assert "forbidden" in str(err.value) and token not in str(err.value)
            with pytest.raises(KubeApiError, match=r"job locked: patching record job .*"
                                                   r"HTTP 403"):
                await outsider.patch("locked", protocol.start_job(records["job"].body, 1))
            with pytest.raises(KubeApiError, match=r"job locked: listing its tasks.*HTTP 403"):
                await outsider.snapshot("locked")
            _, revision = await admin_store.snapshot("locked")
            with pytest.raises(KubeApiError, match=r"job locked: watching mapreducetasks.*"
                                                   r"HTTP 403"):
                await asyncio.wait_for(anext(outsider.watch("locked", revision)), 30)
        finally:
            await outsider.aclose()


# --- the operator's path and clean-up ------------------------------------------------


@kube
async def test_create_initialises_a_job_made_with_kubectl(
        kube_cluster: TestCluster) -> None:
    async with kube_backend(kube_cluster) as factory:
        store = await open_store(factory)
        jobs = f"/apis/{GROUP}/{VERSION}/namespaces/{store.namespace}/{JOB_PLURAL}"
        created = kube_cluster.api("POST", jobs, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "MapReduceJob",
            "metadata": {"generateName": "wordcount-"},
            "spec": {"image": "example/wc:1", "inputs": ["s3://data/books/"],
                     "job": "/app/wordcount.py", "output": "s3://results/wc", "reducers": 2,
                     "args": {"lang": "en"}}})
        name = created["metadata"]["name"]
        spec = JobSpec.from_dict(name, {**created["spec"], "image": None})
        records = [(protocol.JOB_KEY, protocol.new_job(spec)), *protocol.plan(spec, [])]
        await store.create(name, records)
        await store.create(name, records)  # a reconcile may run twice
        after = kube_cluster.api("GET", f"{jobs}/{name}")
        assert after["spec"] == created["spec"], "the user's spec is left alone"
        task_ns = after["status"]["taskNamespace"]
        assert task_ns == task_namespace_for(store.namespace, name)
        assert after["status"] == {"phase": "Pending", "maps": 0, "results": [], "error": None,
                                   "seq": 0, "taskNamespace": task_ns}
        snap, _ = await store.snapshot(name)
        assert snap["job"].body == protocol.new_job(spec)
        assert sorted(snap) == ["job", "reduce-00000", "reduce-00001"]
        labels = kube_cluster.api("GET", f"/api/v1/namespaces/{task_ns}")["metadata"]["labels"]
        assert labels[LABEL_JOB] == name
        await store.delete(name)
        assert name not in await store.jobs()
        phase = kube_cluster.api("GET", f"/api/v1/namespaces/{task_ns}").get("status", {})
        assert phase.get("phase") == "Terminating", "the job's task namespace goes with it"


@kube
async def test_output_must_be_given_or_defaulted(kube_cluster: TestCluster) -> None:
    spec = JobSpec(name="no-output", job="job.py", inputs=("in",))
    async with kube_backend(kube_cluster, default_output=None) as factory:
        store = await open_store(factory)
        with pytest.raises(UsageError, match=r"job no-output: spec\.output is empty"):
            await store.create("no-output", [(protocol.JOB_KEY, protocol.new_job(spec))])
    async with kube_backend(kube_cluster, default_output="s3://scratch/jobs") as factory:
        store = await open_store(factory)
        await store.create("no-output", [(protocol.JOB_KEY, protocol.new_job(spec))])
        obj = kube_cluster.api("GET", f"/apis/{GROUP}/{VERSION}/namespaces/{store.namespace}/"
                                      f"{JOB_PLURAL}/no-output")
        assert obj["spec"]["output"] == "s3://scratch/jobs"
        assert obj["metadata"]["annotations"][ANNOTATION_OUTPUT_DEFAULTED] == "true"
        snap, _ = await store.snapshot("no-output")
        assert snap["job"].body["spec"] == spec.to_dict(), "the record keeps output ''"


@kube
async def test_shared_task_namespace_is_not_deleted(kube_cluster: TestCluster) -> None:
    async with kube_backend(kube_cluster) as factory:
        probe = await open_store(factory)
        namespace = probe.namespace
        store = KubeStateStore(probe.kube, namespace, task_namespace=lambda job: namespace)
        await store.create("one", job_records("one", maps=2))
        await store.create("two", job_records("two", maps=1))
        await store.delete("one")
        tasks = kube_cluster.api("GET", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/"
                                        f"{TASK_PLURAL}")["items"]
        assert sorted(t["metadata"]["name"] for t in tasks) == ["two-map-00000",
                                                                 "two-reduce-00000"]
        assert (await store.snapshot("two"))[0]["map-00000"].body["state"] == "pending"


# --- cost per write ------------------------------------------------------------------


def _object_bytes(cluster: TestCluster, namespace: str, name: str) -> int:
    obj = cluster.api("GET", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/"
                             f"{TASK_PLURAL}/{name}")
    return len(json.dumps(obj, separators=(",", ":")))


@kube
async def test_task_object_size_does_not_grow_with_the_job(
        kube_cluster: TestCluster) -> None:
    async with kube_backend(kube_cluster) as factory:
        store = await open_store(factory)
        sizes, written = {}, {}
        for job, maps in (("sz-small", 10), ("sz-large", 1000)):
            started = time.monotonic()
            await store.create(job, job_records(job, maps=maps, reducers=4))
            print(f"\n{job}: created {maps + 4} task objects in "
                  f"{time.monotonic() - started:.2f}s")
            body = (await store.snapshot(job))[0]["map-00003"].body
            before = store.stats.patch_bytes
            held = await store.patch(job, protocol.claim(body, "worker-1", 1.0, 30.0, 3))
            assert held is not None
            outputs = {str(p): f"s3://results/{job}/map/00003/attempt-1/part-{p:05d}"
                       for p in range(4)}
            assert await store.patch(job, protocol.commit(held.body, "worker-1", outputs, now=0.0))
            written[job] = store.stats.patch_bytes - before
            task_ns = await store.task_namespace(job)
            sizes[job] = _object_bytes(kube_cluster, task_ns, f"{job}-map-00003")
        print(f"task object bytes {sizes}; patch bytes {written}")
        assert written["sz-small"] == written["sz-large"]
        # Equal up to the digits of resourceVersion/timestamps, never ~100x like the
        # original's single object.
        assert abs(sizes["sz-small"] - sizes["sz-large"]) <= 16, sizes


@kube
async def test_a_batched_task_object_at_the_cap_stays_far_below_etcd_s_limit(
        kube_cluster: TestCluster) -> None:
    """splitsPerTask at its cap, every split's URL as long as S3 allows (a 63-character
    bucket, a 1,024-byte key): the record is written, claimed and committed, and stays
    under 600 KB (etcd refuses requests over 1.5 MiB)."""
    bucket = "b" * 63
    splits = [(f"s3://{bucket}/" + f"{i:04d}-".ljust(1024, "k"), (0, 1 << 40))
              for i in range(MAX_SPLITS_PER_TASK)]
    spec = JobSpec(name="sz-batch", job="job.py", inputs=("s3://data/in",),
                   output="s3://results/out", splits_per_task=MAX_SPLITS_PER_TASK)
    async with kube_backend(kube_cluster) as factory:
        store = await open_store(factory)
        await store.create("sz-batch", [(protocol.JOB_KEY, protocol.new_job(spec)),
                                        *protocol.plan(spec, splits)])
        body = (await store.snapshot("sz-batch"))[0]["map-00000"].body
        assert protocol.task_splits(body) == splits
        held = await store.patch("sz-batch", protocol.claim(body, "worker-1", 1.0, 30.0, 3))
        assert held is not None
        outputs = protocol.shuffle_outputs("results/sz-batch/map/00000/attempt-1.shuffle",
                                           1 << 30, "bytes")
        assert await store.patch("sz-batch", protocol.commit(held.body, "worker-1", outputs,
                                                             now=2.0))
        size = _object_bytes(kube_cluster, await store.task_namespace("sz-batch"),
                             "sz-batch-map-00000")
        print(f"\nbatched map task object at the cap: {size} bytes")
        assert size < 600_000, size


@kube
async def test_claim_latency(kube_cluster: TestCluster) -> None:
    """Per-claim round trip on the local API server (printed; a loose bound asserted)."""
    async with kube_backend(kube_cluster) as factory:
        store = await open_store(factory)
        await store.create("lat", job_records("lat", maps=100))
        snap, _ = await store.snapshot("lat")
        latencies = []
        for i in range(100):
            body = snap[protocol.map_key(i)].body
            started = time.perf_counter()
            assert await store.patch("lat", protocol.claim(body, "w", 1.0, 30.0, 3))
            latencies.append(time.perf_counter() - started)
        stale = await asyncio.gather(*(
            store.patch("lat", protocol.claim(snap[protocol.map_key(i)].body, "x", 1.0, 30.0, 3))
            for i in range(100)))
        assert stale == [None] * 100
        median = statistics.median(latencies)
        p95 = sorted(latencies)[94]
        print(f"\nclaim latency: median {median * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms")
        assert median < 0.5


@kube
async def test_a_task_object_with_the_most_counters_stays_under_2200_bytes(
        kube_cluster: TestCluster) -> None:
    """The worst a task's counters can do to its record: as many, as long and as large as
    ctx.counter admits, plus every framework counter at 64 bits, on a key/value map; and
    with the worst skip sample too, committed by a backup (its twin, counts and both
    attempts' history entries on the record as well)."""
    kept = TaskCounters("map-00000")
    with contextlib.suppress(CounterError):  # admit until the byte budget refuses
        for i in range(MAX_COUNTERS):
            kept.add(f"g{i % 2}", f"{i:02d}-" + "n" * 30, INT64_MAX)
    for name in (MAP_INPUT_BYTES, MAP_OUTPUT_RECORDS, SKIPPED_RECORDS):
        kept.set_framework(name, INT64_MAX)
    worst = {group: dict.fromkeys(names, -INT64_MAX) for group, names in
             kept.snapshot().items()}
    async with kube_backend(kube_cluster) as factory:
        store = await open_store(factory)
        sizes = {}
        for job, counted, sample, backed_up in (
                ("cnt-none", None, None, False), ("cnt-worst", worst, None, False),
                ("skip-worst", worst, _worst_skipped_sample(kept.user_bytes), False),
                ("skip-only", {"kubemr": worst["kubemr"]}, _worst_skipped_sample(0), False),
                ("backup-worst", worst, _worst_skipped_sample(kept.user_bytes), True)):
            await store.create(job, job_records(job, maps=1, reducers=4))
            body = (await store.snapshot(job))[0]["map-00000"].body
            held = await store.patch(job, protocol.claim(body, "worker-1", 1.0, 30.0, 3))
            assert held is not None
            worker = "worker-1"
            if backed_up:
                worker = "worker-2"
                held = await store.patch(job, protocol.backup(held.body, worker, 2.0, 30.0))
                assert held is not None
            outputs = protocol.shuffle_outputs(
                f"results/{job}/map/00000/attempt-1.shuffle", 1 << 30, "bytes")
            committed = await store.patch(job, protocol.commit(held.body, worker, outputs,
                                                               counted, sample, now=3.0))
            assert committed is not None
            assert committed.task.get("counters") == (counted or {})
            assert committed.task.get("skipped") == sample
            sizes[job] = _object_bytes(kube_cluster, await store.task_namespace(job),
                                       f"{job}-map-00000")
        print(f"\ncommitted map task object bytes: {sizes}")
        # 2 KiB, plus the shard and state labels (~70 bytes) by which a worker watches
        # one shard and polls the unfinished tasks.
        assert sizes["cnt-worst"] < 2200, sizes
        assert sizes["skip-worst"] < 2200, sizes
        assert sizes["skip-only"] < 2200, sizes
        # A backup pair's fields (twin, backups, backupAttempt, backupWon) share the
        # history's room, but here the counters and the sample have left the history none:
        # what they add (and their managedFields entries) stays on top, about 130 bytes.
        assert sizes["backup-worst"] < 2300, sizes


def _worst_skipped_sample(counter_bytes: int) -> list[Skipped]:
    """The largest sample skip mode commits for a task beside user counters taking
    ``counter_bytes``: the longest errors (ASCII: each character a byte on the server), at
    the widest offsets and line numbers."""
    kept = skips.TaskSkips(10**6)
    for i in range(10 * skips.MAX_TASK_SAMPLE):
        kept.skip(skips.map_place(2**62 + i, 2**40), ValueError("x" * 500))
    assert kept.count == 50
    sample = kept.fit(counter_bytes)
    assert sample, "room for one entry at least"
    return sample


# --- shards: what a worker following one shard is sent ------------------------------


@kube
async def test_a_shard_watch_is_sent_only_its_shard_and_labels_follow_the_state(
        kube_cluster: TestCluster) -> None:
    spec = JobSpec(name="shd", job="job.py", inputs=("s3://data/in",), reducers=1,
                   output="s3://results/out")
    tasks = protocol.plan(spec, [(f"s3://data/in-{i}", (0, 100)) for i in range(12)])
    async with kube_backend(kube_cluster) as factory:
        store = await open_store(factory)
        await store.create("shd", [(protocol.JOB_KEY, protocol.new_job(spec, shards=3)),
                                   *tasks])
        _, revision = await store.snapshot("shd")
        namespace = await store.task_namespace("shd")
        objects = kube_cluster.api(
            "GET", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{TASK_PLURAL}")["items"]
        labels = [o["metadata"]["labels"] for o in objects]
        shards = {label[f"{GROUP}/task"]: label[f"{GROUP}/shard"] for label in labels}
        assert shards == {k: str(protocol.shard_of(k, 3)) for k, _ in tasks}
        events = store.watch("shd", revision, shard=1)
        mine = sorted(k for k, _ in tasks if protocol.shard_of(k, 3) == 1)
        chosen: list[int] = []

        def one(job: Any) -> int:
            chosen.append(protocol.job_shards(job))
            return 1

        records, _ = await store.snapshot("shd", shard=one)
        assert chosen == [3], "the shard is chosen from the job record, read first"
        assert sorted(k for k in records if k != protocol.JOB_KEY) == mine
        pending = asyncio.ensure_future(collect(events, len(mine)))
        await asyncio.sleep(0.2)
        other = next(k for k, _ in tasks if protocol.shard_of(k, 3) != 1)
        for key, body in tasks:  # each task is claimed once; one of another shard commits
            claimed = await store.patch("shd", protocol.claim(body, "w", 1.0, 30.0, 3))
            assert claimed is not None
            if key == other:
                done = await store.patch("shd", protocol.commit(claimed.task, "w", {}, now=2.0))
                assert done is not None
        got = await pending
        await events.aclose()
        assert sorted(e.record.key for e in got) == mine, "only shard 1's tasks are sent"
        objects = kube_cluster.api(
            "GET", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{TASK_PLURAL}")["items"]
        states = {o["metadata"]["labels"][f"{GROUP}/state"] == o["status"]["state"]
                  for o in objects}
        assert states == {True}, "the state label is written with every state change"
        assert {o["status"]["state"] for o in objects} == {"running", "committed"}
        expected = {k for k, _ in tasks} - {other}
        for _ in range(100):  # a poll may be a little behind: it catches up
            unfinished = {r.key for r in await store.unfinished("shd")}
            if unfinished == expected:
                break
            await asyncio.sleep(0.1)
        assert unfinished == expected
