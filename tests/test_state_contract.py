"""The StateStore contract: every backend must pass exactly these tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from kubemr_async import protocol
from kubemr_async.protocol import TaskKind, Update
from kubemr_async.spec import JobSpec
from kubemr_async.state.base import JobNotFound, StateStore
from kubemr_async.testing.cluster import TestCluster

from .backends import StoreFactory, kube_backend, sqlite_backend

pytestmark = pytest.mark.anyio

BACKENDS = ["sqlite", pytest.param("kube", marks=[pytest.mark.kube, pytest.mark.slow])]


@pytest.fixture
def kube_state_backend(kube_cluster: TestCluster
                       ) -> AbstractAsyncContextManager[StoreFactory]:
    """Stores on the session's real API server, in a fresh namespace per test."""
    return kube_backend(kube_cluster)


@pytest.fixture(params=BACKENDS)
async def state_backend(request: pytest.FixtureRequest, tmp_path: Path
                        ) -> AsyncIterator[StoreFactory]:
    if request.param == "sqlite":
        async with sqlite_backend(tmp_path) as factory:
            yield factory
    else:
        # A sync fixture returning the backend's context manager: an async fixture cannot
        # be set up from inside this one's running event loop.
        backend = request.getfixturevalue(f"{request.param}_state_backend")
        async with backend as factory:
            yield factory


def job_record(name: str, reducers: int = 1) -> tuple[str, dict[str, Any]]:
    spec = JobSpec(name=name, job="job.py", inputs=("in",), reducers=reducers)
    return protocol.JOB_KEY, protocol.new_job(spec)


def task(n: int) -> tuple[str, dict[str, Any]]:
    return protocol.map_key(n), protocol.new_task(TaskKind.MAP, n, f"in-{n}", (0, 10))


def claim(body: dict[str, Any], worker: str) -> Update:
    return protocol.claim(body, worker, 1.0, 30.0, 3)


async def test_create_is_idempotent_and_snapshot_reads_everything(
        state_backend: StoreFactory) -> None:
    store = await state_backend()
    await store.create("job-a", [job_record("job-a"), task(0)])
    _, changed = task(0)
    changed["input"] = "changed"
    await store.create("job-a", [(protocol.map_key(0), changed), task(1)])
    records, revision = await store.snapshot("job-a")
    assert sorted(records) == ["job", "map-00000", "map-00001"]
    assert records["map-00000"].body["input"] == "in-0", "create must not overwrite"
    assert revision
    assert "job-a" in await store.jobs()


async def test_snapshot_of_unknown_job_raises(state_backend: StoreFactory) -> None:
    store = await state_backend()
    with pytest.raises(JobNotFound):
        await store.snapshot("no-such-job")


async def test_guarded_patch_applies_or_reports_a_lost_race(state_backend: StoreFactory) -> None:
    store = await state_backend()
    await store.create("job-b", [job_record("job-b"), task(0)])
    before = task(0)[1]
    won = await store.patch("job-b", claim(before, "w1"))
    assert won is not None and won.body["worker"] == "w1" and won.body["seq"] == 1
    lost = await store.patch("job-b", claim(before, "w2"))
    assert lost is None
    records, _ = await store.snapshot("job-b")
    assert records["map-00000"].body["worker"] == "w1"
    with pytest.raises(JobNotFound):
        await store.patch("job-b", claim(task(9999)[1], "w1"))


async def test_concurrent_claims_from_separate_clients_have_one_winner(
        state_backend: StoreFactory) -> None:
    clients = [await state_backend() for _ in range(8)]
    await clients[0].create("job-c", [job_record("job-c"), task(0)])
    results = await asyncio.gather(*(
        c.patch("job-c", claim(task(0)[1], f"w{i}")) for i, c in enumerate(clients)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    records, _ = await clients[-1].snapshot("job-c")
    assert records["map-00000"].body["worker"] == winners[0].body["worker"]


async def test_watch_delivers_later_changes_from_other_clients_in_order(
        state_backend: StoreFactory) -> None:
    reader, writer = await state_backend(), await state_backend()
    await writer.create("job-d", [job_record("job-d"), task(0), task(1)])
    _, revision = await reader.snapshot("job-d")
    seen: list[tuple[str, str]] = []

    async def follow() -> None:
        async for event in reader.watch("job-d", revision):
            seen.append((event.record.key, event.record.body["worker"]))
            if len(seen) == 2:
                return

    watcher = asyncio.create_task(follow())
    await asyncio.sleep(0.1)
    assert await writer.patch("job-d", claim(task(1)[1], "wa")) is not None
    assert await writer.patch("job-d", claim(task(0)[1], "wb")) is not None
    await asyncio.wait_for(watcher, 20)
    assert seen == [("map-00001", "wa"), ("map-00000", "wb")]


async def test_watch_ends_when_the_job_is_deleted(state_backend: StoreFactory) -> None:
    store = await state_backend()
    await store.create("job-e", [job_record("job-e"), task(0)])
    _, revision = await store.snapshot("job-e")

    async def drain() -> None:
        async for _ in store.watch("job-e", revision):
            pass

    watcher = asyncio.create_task(drain())
    await asyncio.sleep(0.1)
    await store.delete("job-e")
    await asyncio.wait_for(watcher, 30)
    with pytest.raises(JobNotFound):
        await store.snapshot("job-e")


async def test_protocol_records_round_trip(state_backend: StoreFactory) -> None:
    """Real task records (floats, None, nested outputs) survive the backend unchanged."""
    store: StateStore = await state_backend()
    spec = JobSpec(name="job-f", job="x.py", inputs=("a",), reducers=2)
    records = [(protocol.JOB_KEY, protocol.new_job(spec)),
               *protocol.plan(spec, [("a", (0, 1))])]
    await store.create("job-f", records)
    snap, _ = await store.snapshot("job-f")
    assert {k: r.body for k, r in snap.items()} == dict(records)
    held = protocol.claim(snap["map-00000"].body, "w", 1.5, 30.0, 3)
    after = await store.patch("job-f", held)
    assert after is not None and after.body["leaseExpires"] == 31.5
    done = await store.patch("job-f", protocol.commit(after.body, "w", {"1": "k"}, now=0.0))
    assert done is not None and done.body["outputs"] == {"1": "k"}
    started = await store.patch("job-f", protocol.start_job(snap[protocol.JOB_KEY].body, 1))
    assert started is not None and started.body["phase"] == "Running"
    assert started.body["spec"] == spec.to_dict(), "the job record keeps its spec"


async def test_a_multi_step_job_advances_once_from_a_step(state_backend: StoreFactory) -> None:
    """Two planners that read the same finished step race to advance: one wins, and the
    step's tasks keep their keys beside the next step's (``s2-``) in one record set."""
    clients = [await state_backend() for _ in range(2)]
    spec = JobSpec(name="job-s", job="job.py", inputs=("in",), reducers=1, steps=3,
                   step_reducers=(1, 2, 1))
    await clients[0].create("job-s", [(protocol.JOB_KEY, protocol.new_job(spec, every_step=True)),
                                      task(0)])
    records, _ = await clients[0].snapshot("job-s")
    started = await clients[0].patch("job-s", protocol.start_job(records[protocol.JOB_KEY].job,
                                                                 1))
    assert started is not None
    read = started.job
    assert read["step"] == 0
    await clients[0].create("job-s", protocol.plan(spec.at_step(1), [("part-0", None)]))
    results = await asyncio.gather(*(c.patch("job-s", protocol.advance(read, 1))
                                     for c in clients))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1 and winners[0].job["step"] == 1
    assert await clients[1].patch("job-s", protocol.advance(read, 1)) is None
    records, _ = await clients[1].snapshot("job-s")
    assert records[protocol.JOB_KEY].job["step"] == 1
    assert sorted(records) == ["job", "map-00000", "s2-map-00000", "s2-reduce-00000",
                               "s2-reduce-00001"]
    assert records["s2-map-00000"].task["step"] == 1


async def test_unfinished_lists_exactly_the_tasks_that_have_not_committed(
        state_backend: StoreFactory) -> None:
    store = await state_backend()
    await store.create("job-u", [job_record("job-u"), task(0), task(1), task(2)])
    running = await store.patch("job-u", claim(task(0)[1], "wa"))
    assert running is not None
    done = await store.patch("job-u", protocol.commit(running.task, "wa", {}, now=2.0))
    assert done is not None and done.task["state"] == "committed"
    assert await store.patch("job-u", claim(task(1)[1], "wb")) is not None
    unfinished = {"map-00001": "running", "map-00002": "pending"}

    async def caught_up(shard: int | None = None) -> dict[str, str]:
        """The answer once it shows the writes above: it may be a little behind (a cache)."""
        for _ in range(100):
            found = {r.key: r.task["state"]
                     for r in await store.unfinished("job-u", shard=shard)}
            if found == unfinished:
                break
            await asyncio.sleep(0.1)
        return found

    assert await caught_up() == unfinished
    assert await caught_up(shard=0) == unfinished, "a job of one shard: all in shard 0"
    [some] = await store.unfinished("job-u", most=1)
    assert some.key in unfinished
    with pytest.raises(JobNotFound):
        await store.unfinished("no-such-job")


async def test_a_shard_watch_delivers_the_changes_of_its_shard(
        state_backend: StoreFactory) -> None:
    spec = JobSpec(name="job-s", job="job.py", inputs=("in",), reducers=1)
    tasks = [task(n) for n in range(8)]
    shard = protocol.shard_of(tasks[0][0], 2)
    mine = [(k, b) for k, b in tasks if protocol.shard_of(k, 2) == shard]
    reader, writer = await state_backend(), await state_backend()
    await writer.create("job-s", [(protocol.JOB_KEY, protocol.new_job(spec, shards=2)),
                                  *tasks])
    records, revision = await reader.snapshot("job-s")
    assert protocol.job_shards(records[protocol.JOB_KEY].job) == 2
    seen: list[str] = []

    async def follow() -> None:
        async for event in reader.watch("job-s", revision, shard=shard):
            if event.record.key in dict(mine):
                seen.append(event.record.key)
            if len(seen) == len(mine):
                return

    watcher = asyncio.create_task(follow())
    await asyncio.sleep(0.1)
    for _key, body in tasks:  # every task changes; the shard's changes must all arrive
        assert await writer.patch("job-s", claim(body, "w")) is not None
    await asyncio.wait_for(watcher, 20)
    assert sorted(seen) == sorted(k for k, _ in mine)


async def test_a_backed_up_task_commits_once_whichever_attempt_races(
        state_backend: StoreFactory) -> None:
    """Speculative execution on the real store: the original and its backup, on separate
    clients, renew and commit at once; each loser re-reads and retries like the runtime
    (protocol.slot), and exactly one commit lands, with its attempt's counters; the
    history keeps both attempts, the winner's committed and the other lost to its twin
    (the CRD's schema admits the ``backup`` outcome)."""
    clients = [await state_backend() for _ in range(2)]
    await clients[0].create("job-b", [job_record("job-b"), task(0)])
    original = await clients[0].patch("job-b", claim(task(0)[1], "w1"))
    assert original is not None
    backup = await clients[1].patch("job-b", protocol.backup(original.task, "w2", 2.0, 30.0))
    assert backup is not None
    assert backup.task["twin"] == {"worker": "w1", "attempt": 1}
    assert backup.task["attempt"] == 2 and backup.task["backups"] == 1

    async def commit(store: StateStore, worker: str, attempt: int,
                     body: dict[str, Any]) -> bool:
        for _ in range(4):  # renew, then commit, re-reading after each lost race
            update = protocol.renew(body, worker, 3.0, 30.0)
            renewed = await store.patch("job-b", update)
            if renewed is None:
                fresh = (await store.snapshot("job-b"))[0]["map-00000"].task
                if protocol.slot(fresh, worker, attempt) is None:
                    return False
                body = fresh
                continue
            done = await store.patch("job-b", protocol.commit(
                renewed.task, worker, f"out@{attempt}", {"g": {"n": attempt}}, now=4.0))
            if done is not None:
                return True
            body = (await store.snapshot("job-b"))[0]["map-00000"].task
            if protocol.slot(body, worker, attempt) is None:
                return False
        raise AssertionError(f"{worker} neither committed nor lost its slot")

    # The original starts from what it read before the backup: its first write fails.
    won = await asyncio.gather(commit(clients[0], "w1", 1, original.task),
                               commit(clients[1], "w2", 2, backup.task))
    assert sorted(won) == [False, True]
    final = (await clients[0].snapshot("job-b"))[0]["map-00000"].task
    winner = 1 if won[0] else 2
    assert final["state"] == "committed" and final["twin"] is None
    assert final["outputs"] == f"out@{winner}" and final["counters"] == {"g": {"n": winner}}
    assert final["backupWon"] is (winner == 2) and final["attempt"] == 2
    assert [(a["attempt"], a["worker"], a.get("outcome"), a.get("end"))
            for a in final["history"]] == [
        (1, "w1", "committed" if winner == 1 else "backup", 4000),
        (2, "w2", "committed" if winner == 2 else "backup", 4000)]
