"""Progress followers on the SQLite store (any StateStore serves): the printer columns, and
a verdict left to the workers for a grace period before the operator stamps it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from kubemr_async import protocol
from kubemr_async.kube import Kube, KubeObject, Resource
from kubemr_async.operator.followers import Followers
from kubemr_async.protocol import JobPhase
from kubemr_async.spec import JobSpec
from kubemr_async.state.sqlite import SQLiteStateStore

pytestmark = pytest.mark.anyio

KEY = ("team", "wc")


class StatusKube(Kube):
    """Records the status patches a follower sends (the progress columns)."""

    def __init__(self) -> None:
        self.patches: list[Any] = []

    async def patch(self, resource: Resource, name: str, body: object,
                    namespace: str | None = None, **options: Any) -> KubeObject:
        self.patches.append(body)
        return {}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStateStore]:
    state = SQLiteStateStore(tmp_path / "state.db", poll_interval=0.01)
    yield state
    await state.aclose()


async def decided_job(store: SQLiteStateStore) -> None:
    """A started job whose only map failed for good: decided (Failed), not yet stamped."""
    spec = JobSpec(name="wc", job="wc.py", inputs=("a",), reducers=1)
    await store.create("wc", [(protocol.JOB_KEY, protocol.new_job(spec)),
                              *protocol.plan(spec, [("a", None)])])
    records, _ = await store.snapshot("wc")
    await store.patch("wc", protocol.start_job(records[protocol.JOB_KEY].body, 1))
    records, _ = await store.snapshot("wc")
    claimed = await store.patch("wc", protocol.claim(records["map-00000"].body, "w", 0.0, 60, 3))
    assert claimed is not None
    assert await store.patch("wc", protocol.fail(claimed.body, "w", "boom", 3, permanent=True,
            now=0.0))


async def phase(store: SQLiteStateStore) -> str:
    records, _ = await store.snapshot("wc")
    return str(records[protocol.JOB_KEY].body["phase"])


async def follow(store: SQLiteStateStore, grace: float,
                 meanwhile: Callable[[], Any] | None = None) -> tuple[float, StatusKube]:
    """Follow the job until the follower reports it decided; how long that took."""
    kube = StatusKube()
    finished = anyio.Event()
    followers = Followers(kube, lambda key: finished.set(), verdict_grace=grace)
    start = anyio.current_time()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(followers.run)
            await anyio.sleep(0.01)
            followers.follow(KEY, store)  # type: ignore[arg-type]  # any StateStore
            assert len(followers) == 1
            if meanwhile is not None:
                await meanwhile()
            await finished.wait()
            group.cancel_scope.cancel()
    assert len(followers) == 0, "a follower is dropped when it ends"
    return anyio.current_time() - start, kube


async def test_an_unstamped_verdict_is_left_to_the_workers_then_stamped(
        store: SQLiteStateStore) -> None:
    await decided_job(store)
    took, kube = await follow(store, grace=0.3)
    assert took >= 0.3, "not at once: the workers clean up before they stamp"
    assert await phase(store) == JobPhase.FAILED
    assert kube.patches and kube.patches[0]["status"]["mapsDone"] == 0


async def test_a_verdict_stamped_by_a_worker_is_not_stamped_again(
        store: SQLiteStateStore) -> None:
    await decided_job(store)
    stamped = []

    async def worker_stamps() -> None:
        await anyio.sleep(0.1)
        records, _ = await store.snapshot("wc")
        view = protocol.JobView({k: r.body for k, r in records.items()})
        verdict = view.verdict()
        assert verdict is not None
        stamped.append(await store.patch("wc", verdict))

    took, _ = await follow(store, grace=5.0, meanwhile=worker_stamps)
    assert stamped[0] is not None and took < 5.0, "the follower saw the worker's verdict"
    assert await phase(store) == JobPhase.FAILED
