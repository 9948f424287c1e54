"""``runtime.Worker`` in-process on the SQLite store and files: what needs a hand on the job.

Running workers in this process (instead of `kubemr run`'s subprocesses) lets a test step
between the maps and the reduce (damage a run on disk) and drive the worker's injected
clock, so a lease expires without the test waiting for it.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from kubemr_async import Job, TaskContext, protocol, read_results
from kubemr_async.inputs import plan_inputs
from kubemr_async.protocol import Body, JobPhase
from kubemr_async.runtime import Worker, longest_poll_gap
from kubemr_async.shuffle import ShuffleBudget, split_words
from kubemr_async.spec import JobSpec
from kubemr_async.state.base import Record, ShardChoice, StateStore, WatchEvent
from kubemr_async.state.sqlite import SQLiteStateStore
from kubemr_async.storage.fs import FileBlobStore

pytestmark = pytest.mark.anyio

TEXT = [b"apple pear apple\n", b"pear plum\n", b"apple fig fig\n"]


def word_count() -> Job:
    job = Job("wc")

    @job.map(input="bytes")
    async def words(chunk: bytes, ctx: TaskContext) -> None:
        ctx.emit_batch(split_words(chunk), 1)

    job.reduce("sum")
    return job


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStateStore]:
    state = SQLiteStateStore(tmp_path / "state.db", poll_interval=0.01)
    yield state
    await state.aclose()


async def submit(store: StateStore, tmp_path: Path, shards: int = 1,
                 **spec_fields: object) -> JobSpec:
    """Write a new word-count job's records (one map per input file) and start it."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, text in enumerate(TEXT):
        (inputs / f"part-{i}.txt").write_bytes(text)
    spec = JobSpec(name="wc", job="wc.py", inputs=(str(inputs),),
                   **{"reducers": 1, **spec_fields})  # type: ignore[arg-type]
    splits = await plan_inputs(spec)
    assert len(splits) == len(TEXT)
    await store.create(spec.name, [(protocol.JOB_KEY, protocol.new_job(spec, shards=shards))])
    await store.create(spec.name, protocol.plan(spec, splits))
    records, _ = await store.snapshot(spec.name)
    await store.patch(spec.name, protocol.start_job(records[protocol.JOB_KEY].body, len(splits)))
    return spec


async def records(store: SQLiteStateStore, name: str) -> dict[str, Body]:
    snapshot, _ = await store.snapshot(name)
    return {key: record.body for key, record in snapshot.items()}


class DamagingStore(FileBlobStore):
    """Flips a byte inside map-00001's first block on disk just before a reduce reads it.

    ``times`` bounds how many distinct shuffle objects (attempts) are damaged; each once.
    """

    def __init__(self, root: Path, times: int) -> None:
        super().__init__(root)
        self.times = times
        self.damaged: list[str] = []

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        if ("/map/00001/" in key and key not in self.damaged
                and len(self.damaged) < self.times):
            path = self._path(key)
            data = bytearray(path.read_bytes())
            data[30] ^= 0xFF
            path.write_bytes(bytes(data))
            self.damaged.append(key)
        return await super().get_range(key, offset, length)


async def test_a_corrupt_run_reruns_the_map_that_wrote_it(
        store: SQLiteStateStore, tmp_path: Path) -> None:
    spec = await submit(store, tmp_path)
    blobs = DamagingStore(tmp_path / "blobs", times=1)
    worker = Worker(spec.name, word_count(), store, blobs, "w-1")
    assert await worker.run() == JobPhase.SUCCEEDED
    assert blobs.damaged == ["wc/map/00001/attempt-1.shuffle"]
    bodies = await records(store, spec.name)
    rerun = bodies["map-00001"]
    assert (rerun["attempt"], rerun["failures"]) == (2, 1)
    assert rerun["error"].startswith(
        "reduce-00000 read a corrupt shuffle object "
        f"{blobs.url('wc/map/00001/attempt-1.shuffle')}: slice of partition 0 fails its "
        "checksum")
    reduce = bodies["reduce-00000"]
    assert (reduce["attempt"], reduce["failures"]) == (2, 0), \
        "the reduce gave its claim back without a failure and read the new run"
    [result] = bodies[protocol.JOB_KEY]["results"]
    assert Path(result).name == "part-00000.attempt-2"
    part = (await blobs.get("wc/output/part-00000.attempt-2")).decode()
    expected = Counter(w for text in TEXT for w in text.decode().split())
    assert part == "".join(f"{w}\t{n}\n" for w, n in sorted(expected.items()))


async def test_a_map_whose_runs_keep_arriving_corrupt_fails_the_job_naming_it(
        store: SQLiteStateStore, tmp_path: Path) -> None:
    spec = await submit(store, tmp_path, max_attempts=2)
    blobs = DamagingStore(tmp_path / "blobs", times=10)
    worker = Worker(spec.name, word_count(), store, blobs, "w-1")
    assert await worker.run() == JobPhase.FAILED
    assert blobs.damaged == [f"wc/map/00001/attempt-{n}.shuffle" for n in (1, 2)]
    job = (await records(store, spec.name))[protocol.JOB_KEY]
    message = protocol.format_error(job["error"])
    assert message.startswith(
        "task map-00001 attempt 2: reduce-00000 read a corrupt shuffle object")


class CountingStore(FileBlobStore):
    """Counts the ranged reads of each shuffle object."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: Counter[str] = Counter()

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        if "/map/" in key:
            self.reads[key] += 1
        return await super().get_range(key, offset, length)


async def test_a_worker_reads_each_small_shuffle_object_once_for_all_its_reduces(
        store: SQLiteStateStore, tmp_path: Path) -> None:
    # Without keeping small objects whole each reduce would read every map's index entry
    # and slice: 2 x maps x reducers requests; kept, one read per map serves them all.
    spec = await submit(store, tmp_path, reducers=5)
    blobs = CountingStore(tmp_path / "blobs")
    worker = Worker(spec.name, word_count(), store, blobs, "w-1")
    assert await worker.run() == JobPhase.SUCCEEDED
    assert len(blobs.reads) == len(TEXT)
    assert set(blobs.reads.values()) == {1}
    counts: Counter[str] = Counter()
    for url in (await records(store, spec.name))[protocol.JOB_KEY]["results"]:
        key = str(Path(url).relative_to(tmp_path / "blobs"))
        for line in (await blobs.get(key)).decode().splitlines():
            word, n = line.split("\t")
            counts[word] += int(n)
    assert counts == Counter(w for text in TEXT for w in text.decode().split())


async def test_a_small_object_not_kept_is_read_once_per_reduce_not_twice(
        store: SQLiteStateStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No share to keep objects in: each reduce reads each small object whole, once, and
    # takes both its index entry and its slice from that one read.
    monkeypatch.setattr(ShuffleBudget, "in_flight", property(lambda self: 2))
    spec = await submit(store, tmp_path, reducers=5)
    blobs = CountingStore(tmp_path / "blobs")
    worker = Worker(spec.name, word_count(), store, blobs, "w-1")
    assert await worker.run() == JobPhase.SUCCEEDED
    assert len(worker._kept) == 0
    assert sorted(blobs.reads.values()) == [5] * len(TEXT)


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_an_expired_lease_is_taken_over_and_the_late_commit_loses(
        store: SQLiteStateStore, tmp_path: Path) -> None:
    """Worker A claims a map and hangs; once B has watched A's record stay unchanged for a
    lease on the fake clock, B takes the map over as attempt 2 and finishes the job; A's
    commit then loses."""
    lease = 600.0  # A's heartbeat sleeps lease/3 of real time: it never renews here
    spec = await submit(store, tmp_path, lease_seconds=lease)
    clock = FakeClock(1000.0)
    started, unblock = threading.Event(), threading.Event()
    job = word_count()
    assert job.map_fn is not None
    words = job.map_fn

    async def hang_on_first_attempt(chunk: bytes, ctx: TaskContext) -> None:
        if ctx.attempt == 1 and ctx.task == "map-00000":
            started.set()
            unblock.wait(timeout=60)  # blocks A's user thread, not its event loop
        await words(chunk, ctx)

    job.map_fn = hang_on_first_attempt
    blobs = FileBlobStore(tmp_path / "blobs")
    a = Worker(spec.name, job, store, blobs, "a", clock=clock, monotonic=clock)
    running_a = asyncio.create_task(a.run())
    try:
        assert await asyncio.to_thread(started.wait, 60)
        done_before_hang = a.tasks_done  # A may have run other maps first
        held = (await records(store, spec.name))["map-00000"]
        assert (held["worker"], held["attempt"], held["leaseExpires"]) == ("a", 1, 1000 + lease)

        # B's first reading dates its snapshot (A's claim, seen at 1000); every later one
        # is a lease past it, so B has watched the record stay unchanged for a lease.
        readings = [clock.now]

        def b_monotonic() -> float:
            return readings.pop() if readings else clock.now + lease + 1

        b = Worker(spec.name, job, store, blobs, "b", clock=clock, monotonic=b_monotonic)
        assert await b.run() == JobPhase.SUCCEEDED
        taken = (await records(store, spec.name))["map-00000"]
        assert (taken["worker"], taken["attempt"], taken["failures"]) == ("b", 2, 1)
        assert taken["error"] == "lease expired: worker a stopped renewing during attempt 1"
    finally:
        unblock.set()
    assert await running_a == JobPhase.SUCCEEDED
    assert a.tasks_done == done_before_hang, "A's late commit lost"
    final = await records(store, spec.name)
    assert final["map-00000"]["worker"] == "b" and final["map-00000"]["attempt"] == 2
    [result] = final[protocol.JOB_KEY]["results"]
    assert Path(result).name == "part-00000.attempt-1", "B's reduce, its first attempt"
    # A wrote its late run under its own attempt's key, which nobody reads: the committed
    # outputs name attempt 2's keys only. (Whether A's file still exists depends on whether
    # it landed before or after the verdict's cleanup, so it is not asserted.)
    outputs = final["map-00000"]["outputs"]
    assert isinstance(outputs, dict)
    assert all("/attempt-2/" in key for name, key in outputs.items() if name.isdigit())


async def test_a_map_only_job_lists_its_maps_parts_in_the_manifest(
        store: SQLiteStateStore, tmp_path: Path) -> None:
    # The worker that stamps the verdict makes the result location self-describing; for a
    # map-only job the parts are the maps' outputs, in map order.
    spec = await submit(store, tmp_path, reducers=0)
    blobs = FileBlobStore(tmp_path / "blobs")
    worker = Worker(spec.name, word_count(), store, blobs, "a")
    assert await worker.run() == JobPhase.SUCCEEDED
    job = (await records(store, spec.name))[protocol.JOB_KEY]
    assert len(job["results"]) == len(TEXT)
    manifest = orjson.loads(await blobs.get(f"{spec.name}/_SUCCESS"))
    assert manifest["results"] == job["results"]
    assert manifest["parts"] == [f"output/part-{i:05d}.attempt-1" for i in range(len(TEXT))]
    words = Counter(key for key, _ in read_results(tmp_path / "blobs" / spec.name))
    assert words == Counter(w.decode() for text in TEXT for w in text.split())


class ShardWatchStore(SQLiteStateStore):
    """SQLite, but a shard's snapshot and watch hold only that shard's tasks, as the API
    server's label selectors make them (the real ones: tests/test_kube_store.py), so the
    workers below must find everything else by polling."""

    def __init__(self, path: Path, shards: int) -> None:
        super().__init__(path, poll_interval=0.01)
        self.shards = shards
        self.polled = 0

    async def watch(self, job: str, since: str, *,
                    shard: int | None = None) -> AsyncIterator[WatchEvent]:
        async for event in super().watch(job, since):
            key = event.record.key
            if (shard is None or key == protocol.JOB_KEY
                    or protocol.shard_of(key, self.shards) == shard):
                yield event

    async def snapshot(self, job: str, *, shard: ShardChoice | None = None
                       ) -> tuple[dict[str, Record], str]:
        records, revision = await super().snapshot(job)
        chosen = shard(records[protocol.JOB_KEY].job) if shard is not None else None
        if chosen is not None:
            records = {key: record for key, record in records.items()
                       if key == protocol.JOB_KEY or protocol.shard_of(key, self.shards) == chosen}
        return records, revision

    async def unfinished(self, job: str, *, shard: int | None = None,
                         most: int | None = None) -> list[Record]:
        self.polled += 1
        return await super().unfinished(job, shard=shard, most=most)


async def test_workers_that_each_follow_one_shard_finish_the_job_exactly(
        tmp_path: Path) -> None:
    store = ShardWatchStore(tmp_path / "state.db", shards=3)
    try:
        spec = await submit(store, tmp_path, shards=3, reducers=4)
        blobs = FileBlobStore(tmp_path / "blobs")
        workers = [Worker(spec.name, word_count(), store, blobs, f"w-{i}") for i in range(4)]
        phases = await asyncio.gather(*(w.run() for w in workers))
        assert phases == [JobPhase.SUCCEEDED] * 4
        bodies = await records(store, spec.name)
        tasks = {k: b for k, b in bodies.items() if k != protocol.JOB_KEY}
        assert {(b["state"], b["attempt"]) for b in tasks.values()} == {("committed", 1)}
        assert sum(w.tasks_done for w in workers) == len(TEXT) + 4
        assert store.polled > 0, "the workers polled the shards they do not follow"
        counts = {k: int(v) for k, v in read_results(tmp_path / "blobs" / spec.name)}
        assert counts == Counter(w.decode() for text in TEXT for w in text.split())
    finally:
        await store.aclose()


def test_idle_polls_grow_apart_with_the_fleet_up_to_a_third_of_a_lease() -> None:
    """Each idle poll scans the job's task namespace in the API server's watch cache, so a
    bigger fleet polls less often each (about 8 polls a second in all), but never less
    often than a third of a lease, and never more often than every 2 s once idle."""
    assert longest_poll_gap(1, 30.0) == 2.0  # 4 workers: as before
    assert longest_poll_gap(4, 30.0) == 2.0  # 16 workers
    assert longest_poll_gap(16, 30.0) == 8.0  # 64 workers: 8 polls a second in all
    assert longest_poll_gap(250, 30.0) == 10.0  # 1,000 workers: a third of the lease
    assert longest_poll_gap(250, 3.0) == 2.0  # a short lease keeps the floor
