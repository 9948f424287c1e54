"""Progress followers: one per Running job, mirroring its tasks into the job's status.

A follower watches the job's records (the state store's watch), keeps a
:class:`~kubemr_async.protocol.JobView` of them, writes the progress counts behind the
printer columns at most once per interval, and stamps the verdict if the workers died right
after the last commit (the same guarded patch any worker would send). When the job is
decided it asks for one more reconcile, which finishes the job; when a step of a multi-step
job is done, it asks for one that plans the next step (the reconcile's, so that planning
and advancing share the queue's one-reconcile-per-job rule).

The verdict is the workers' to stamp: the one that does removes the intermediate runs and
writes the result manifest first, which the operator cannot do. So a follower waits
``verdict_grace`` seconds after the last commit before it stamps a verdict nobody stamped;
stamping at once would race the workers' clean-up and win, leaving the runs behind.

Followers run in the operator's task group (:meth:`Followers.run`): when the operator stops,
they stop with it. A follower that fails is logged and dropped; the job's next reconcile
starts a new one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from math import inf

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectSendStream

from .. import protocol
from ..crd import MAPREDUCE_JOBS
from ..kube import MERGE_PATCH, Kube, KubeApiError
from ..protocol import JobView
from ..state.base import WatchEvent
from ..state.kube import KubeStateStore
from .resources import progress_fields

log = logging.getLogger("kubemr.operator")

Key = tuple[str, str]  # (namespace, name) of a MapReduceJob

PROGRESS_INTERVAL = 1.0
# Progress writes resend the whole job object (spec.inputs included) to every watcher, so
# big jobs report less often: one second per this many tasks, capped.
TASKS_PER_PROGRESS_SECOND = 1000
MAX_PROGRESS_INTERVAL = 15.0
#: How long a decided but unstamped job is left to its workers before a follower stamps it.
VERDICT_GRACE = 30.0
#: Watch events buffered between the store's watch and a follower; the watch waits beyond.
WATCH_BUFFER = 1024


class Followers:
    """The progress followers of the jobs being run, at most one per job.

    ``reconcile`` is called with a job's key when its follower saw it decided, or saw a
    step of it done; ``verdict_grace`` is how long the workers have to stamp a verdict
    themselves.
    """

    def __init__(self, kube: Kube, reconcile: Callable[[Key], None],
                 verdict_grace: float = VERDICT_GRACE) -> None:
        self.kube = kube
        self.reconcile = reconcile
        self.verdict_grace = verdict_grace
        self._running: dict[Key, anyio.CancelScope] = {}
        self._group: TaskGroup | None = None

    def __len__(self) -> int:
        return len(self._running)

    async def run(self) -> None:
        """Host the followers until cancelled; then every follower is cancelled too."""
        async with anyio.create_task_group() as group:
            self._group = group
            try:
                await anyio.sleep_forever()
            finally:
                self._group = None
                self._running.clear()

    def follow(self, key: Key, store: KubeStateStore) -> None:
        """Start following job ``key`` unless a follower is on it already.

        Nothing happens while :meth:`run` is not running (a reconcile called on its own,
        as tests and a second operator do): following is the running operator's job.
        """
        if self._group is None or key in self._running:
            return
        scope = anyio.CancelScope()
        self._running[key] = scope
        self._group.start_soon(self._follow, key, store, scope)

    def stop(self, key: Key) -> None:
        """Stop following job ``key`` (finished or deleted)."""
        scope = self._running.pop(key, None)
        if scope is not None:
            scope.cancel()

    async def _follow(self, key: Key, store: KubeStateStore, scope: anyio.CancelScope) -> None:
        try:
            with scope:
                if await self._mirror(key, store):
                    self.reconcile(key)
        except Exception:
            log.exception("following progress failed", extra={"job": "/".join(key)})
        finally:
            if self._running.get(key) is scope:
                del self._running[key]

    async def _mirror(self, key: Key, store: KubeStateStore) -> bool:
        """Mirror job ``key``'s progress until it is decided (True) or deleted (False)."""
        namespace, name = key
        records, revision = await store.snapshot(name)
        view = JobView({k: rec.body for k, rec in records.items()})
        interval = min(MAX_PROGRESS_INTERVAL, max(
            PROGRESS_INTERVAL, (view.map_total + view.reduce_total) / TASKS_PER_PROGRESS_SECOND))
        shown: protocol.Progress | None = None
        last = -inf
        decided_at = inf  # when the view first held a verdict nobody had stamped
        asked_step = -1  # the last step whose end asked for a reconcile (to advance)
        send, receive = anyio.create_memory_object_stream[WatchEvent | None](WATCH_BUFFER)
        async with anyio.create_task_group() as group, receive:
            # The watch runs in its own task, so waiting for its next event can time out
            # (to write throttled progress) without cancelling the watch itself.
            group.start_soon(_watch, store, name, revision, send)
            while not view.phase.finished:
                if asked_step != view.step and view.step_results() is not None:
                    asked_step = view.step
                    self.reconcile(key)
                verdict = view.verdict()
                decided_at = inf if verdict is None else min(decided_at, anyio.current_time())
                if verdict is not None and anyio.current_time() - decided_at >= self.verdict_grace:
                    await store.patch(name, verdict)  # the workers did not: they are gone
                progress = view.progress()
                if progress != shown and anyio.current_time() - last >= interval:
                    await self._set_progress(namespace, name, progress)
                    shown, last = progress, anyio.current_time()
                with anyio.move_on_after(PROGRESS_INTERVAL):
                    event = await receive.receive()
                    if event is None:  # the job was deleted
                        group.cancel_scope.cancel()
                        return False
                    view.update(event.record.key, event.record.body)
            group.cancel_scope.cancel()
        return True

    async def _set_progress(self, namespace: str, name: str, progress: protocol.Progress) -> None:
        try:
            await self.kube.patch(MAPREDUCE_JOBS, name, {"status": progress_fields(progress)},
                                  namespace, content_type=MERGE_PATCH, subresource="status")
        except KubeApiError as exc:  # the next change writes it again
            log.debug("writing progress failed: %s", exc)


async def _watch(store: KubeStateStore, name: str, revision: str,
                 send: MemoryObjectSendStream[WatchEvent | None]) -> None:
    """Forward the store's watch of job ``name`` into ``send``; None when it ends."""
    changes = store.watch(name, revision)
    async with send:
        try:
            async for event in changes:
                await send.send(event)
            await send.send(None)
        finally:
            # Cancelled while handing an event over, the watch sits at its yield: close it
            # (which stops its streams) even though our scope is being cancelled.
            with anyio.CancelScope(shield=True):
                await changes.aclose()
