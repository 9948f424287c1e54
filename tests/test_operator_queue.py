"""The operator's work queue and task group, without a cluster: coalescing, one reconcile
per job at a time, delayed and retried keys, nothing retained, nothing left running."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import pytest

from kubemr_async.kube import Forbidden, Kube, KubeObject, NotFound, Resource, ServerError
from kubemr_async.operator import Operator, OperatorConfig
from kubemr_async.operator.queue import WorkQueue, run_workers

pytestmark = pytest.mark.anyio


async def test_a_key_added_many_times_is_pending_once() -> None:
    queue: WorkQueue[str] = WorkQueue()
    for key in ("a", "b", "a", "a", "b"):
        queue.add(key)
    assert len(queue) == 2
    assert [await queue.get(), await queue.get()] == ["a", "b"]
    assert len(queue) == 0


async def test_a_key_being_processed_is_not_handed_out_again_until_done() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("a")
    assert await queue.get() == "a"
    queue.add("a")
    queue.add("a")
    assert len(queue) == 0, "dirty, but held back while a worker has it"
    with anyio.move_on_after(0.05) as scope:
        await queue.get()
    assert scope.cancelled_caught
    queue.done("a")
    assert len(queue) == 1, "added during processing: once more, after"
    assert await queue.get() == "a"
    queue.done("a")
    assert len(queue) == 0 and queue.retained == 0


async def test_nothing_is_retained_once_keys_are_done() -> None:
    queue: WorkQueue[tuple[str, str]] = WorkQueue()
    keys = [("ns", f"job-{i}") for i in range(100)]
    for key in keys:
        queue.add(key)
    for _ in keys:
        key = await queue.get()
        queue.forget(key)
        queue.done(key)
    assert queue.retained == 0 and not any(key in queue for key in keys)


async def test_add_after_waits_and_keeps_the_earliest_wake_up() -> None:
    queue: WorkQueue[str] = WorkQueue()
    start = anyio.current_time()
    queue.add_after("late", 0.3)
    queue.add_after("soon", 0.5)
    queue.add_after("soon", 0.1)  # earlier: wins
    queue.add_after("soon", 5.0)  # later: the earlier one stands
    assert len(queue) == 0 and "soon" in queue
    with anyio.fail_after(2):
        assert await queue.get() == "soon"
        assert anyio.current_time() - start >= 0.09
        assert await queue.get() == "late"
        assert anyio.current_time() - start >= 0.29
    queue.done("soon")
    queue.done("late")
    assert queue.retained == 0
    queue.add_after("now", 0)
    assert len(queue) == 1, "no delay: added at once"


async def test_a_waiting_get_wakes_for_a_new_delay() -> None:
    """A worker asleep on an empty queue notices a delayed add made after it slept."""
    queue: WorkQueue[str] = WorkQueue()
    got: list[str] = []

    async def take() -> None:
        got.append(await queue.get())

    with anyio.fail_after(2):
        async with anyio.create_task_group() as group:
            group.start_soon(take)
            await anyio.sleep(0.05)
            queue.add_after("k", 0.05)
    assert got == ["k"]


async def test_failures_retry_with_growing_delays_until_a_success() -> None:
    queue: WorkQueue[str] = WorkQueue(retry_initial=0.05, retry_maximum=0.1)
    delays = []
    for _ in range(5):
        start = anyio.current_time()
        queue.add_rate_limited("k")
        with anyio.fail_after(2):
            assert await queue.get() == "k"
        delays.append(anyio.current_time() - start)
        queue.done("k")
    assert delays[0] >= 0.045 and delays[1] >= 0.095 and delays[2] >= 0.095
    assert delays[4] < 0.5, "capped at retry_maximum (else 0.8)"
    assert "k" in queue, "the failure count is kept"
    queue.forget("k")
    assert queue.retained == 0


async def test_workers_never_run_one_key_twice_at_once_and_rerun_a_dirtied_key() -> None:
    queue: WorkQueue[str] = WorkQueue(retry_initial=0.01)
    running: Counter[str] = Counter()
    runs: Counter[str] = Counter()
    overlap: list[str] = []
    first_run = anyio.Event()
    release = anyio.Event()

    async def reconcile(key: str) -> None:
        running[key] += 1
        if running[key] > 1:
            overlap.append(key)
        runs[key] += 1
        try:
            if key == "a" and runs[key] == 1:
                first_run.set()
                await release.wait()
            elif key == "boom" and runs[key] == 1:
                raise RuntimeError("transient")
            await anyio.sleep(0.01)
        finally:
            running[key] -= 1

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(run_workers, queue, reconcile, 4)
            queue.add("a")
            await first_run.wait()
            for _ in range(10):  # while "a" is reconciled: one more run, after it
                queue.add("a")
            queue.add("b")
            queue.add("boom")
            await anyio.sleep(0.05)
            assert runs["a"] == 1, "not concurrently with itself, though workers are free"
            release.set()
            await until(lambda: runs["a"] == 2 and runs["boom"] == 2 and not queue.retained)
            group.cancel_scope.cancel()
    assert overlap == []
    assert runs == {"a": 2, "b": 1, "boom": 2}, "a failure is retried, then forgotten"


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(400):
        if condition():
            return
        await anyio.sleep(0.01)
    raise AssertionError("condition never held")


# --- the operator's task group ------------------------------------------------------


class FakeKube(Kube):
    """A Kube that lists one job, then cannot watch (403) once a reconcile is underway;
    reading the job blocks forever (a reconcile in the middle of its work)."""

    def __init__(self) -> None:
        self.reconciling = anyio.Event()

    async def list(self, resource: Resource, namespace: str | None = None,
                   **options: Any) -> tuple[list[KubeObject], str]:
        return [{"metadata": {"namespace": "ns", "name": "job", "resourceVersion": "1"}}], "1"

    async def open(self, method: str, path: str, **options: Any) -> Any:
        await self.reconciling.wait()
        raise Forbidden("watching MapReduceJobs", 403, "forbidden")

    async def get(self, resource: Resource, name: str, namespace: str | None = None,
                  **options: Any) -> KubeObject:
        self.reconciling.set()
        await anyio.sleep_forever()
        raise NotFound("unreachable", 404, "")


async def test_a_failing_watch_stops_every_loop_and_is_raised() -> None:
    before = asyncio.all_tasks()  # the test runner's own
    kube = FakeKube()
    operator = Operator(kube, OperatorConfig(namespace="ns"))
    with anyio.fail_after(5), pytest.raises(Forbidden, match="watching MapReduceJobs"):
        await operator.run()
    assert kube.reconciling.is_set(), "a reconcile was running when the watch failed"
    assert asyncio.all_tasks() == before, "nothing left running"
    assert len(operator.followers) == 0


class FlakyKube(Kube):
    """A Kube that lists one job and then watches nothing; reading the job fails (500)."""

    def __init__(self) -> None:
        self.reads: list[float] = []
        self.events: list[KubeObject] = []

    async def list(self, resource: Resource, namespace: str | None = None,
                   **options: Any) -> tuple[list[KubeObject], str]:
        return [{"metadata": {"namespace": "ns", "name": "job", "resourceVersion": "1"}}], "1"

    async def open(self, method: str, path: str, **options: Any) -> Any:
        await anyio.sleep_forever()

    async def get(self, resource: Resource, name: str, namespace: str | None = None,
                  **options: Any) -> KubeObject:
        self.reads.append(anyio.current_time())
        raise ServerError(f"reading {name}", 500, "etcd is sad")

    async def create(self, resource: Resource, body: Mapping[str, Any],
                     namespace: str | None = None, **options: Any) -> KubeObject:
        self.events.append(dict(body))
        return dict(body)


async def test_a_failing_reconcile_is_reported_and_retried_with_backoff() -> None:
    kube = FlakyKube()
    operator = Operator(kube, OperatorConfig(namespace="ns"))
    operator.queue.retry_initial = 0.05
    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(operator.run)
            await until(lambda: len(kube.reads) >= 3)
            group.cancel_scope.cancel()
    first, second, third = kube.reads[:3]
    assert second - first >= 0.045 and third - second >= 0.095, "delays double"
    assert {e["reason"] for e in kube.events} == {"ReconcileError"}
    assert "etcd is sad" in kube.events[0]["message"]
    assert kube.events[0]["involvedObject"]["name"] == "job"
