"""The worker: one event loop running a watch, a claim loop, heartbeats and streaming I/O.

There is no master. Every worker follows the job's records through ``StateStore.watch``,
picks a claimable task, and claims it with a guarded patch; losing that race is normal. A
claimed task runs while a heartbeat renews its lease; the result is committed with another
guarded patch that only the current holder can win. Whoever sees the job decided stamps
the verdict.

User callbacks run on a second event loop in a dedicated thread (:class:`UserLoop`): a
callback that computes for 30 s without awaiting blocks only that thread, while this loop
keeps renewing the lease (CPython switches threads every few milliseconds, and numpy/Arrow
release the GIL). Framework I/O (reading splits, fetching and writing runs) stays here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import random
import sys
import sysconfig
import threading
import time
import traceback
import zlib
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import anyio
import orjson

from . import (
    counters,
    execute,
    formats,
    metrics,
    protocol,
    recordio,
    sampling,
    shuffle,
    skips,
    spill,
    timeline,
)
from .api import PARTITION_FILE_ARG, AnyJob, Job, TaskContext
from .deaths import STUCK_EXIT_CODE
from .errors import JobDefinitionError, PermanentTaskError
from .formats import SUCCESS_MARKER
from .inputs import Split, read_map_input, split_size
from .kept import KeptObjects
from .protocol import JobPhase, JobView, TaskKind, TaskState
from .records import Body, Counters, JobRecord, Skipped, TaskOutputs, TaskRecord
from .scrub import own_secrets, scrub
from .spec import TASK_TIMEOUT_FIELD, JobSpec, memory_budget
from .state.base import Record, StateStore, StoreUnavailable
from .storage.base import BlobStore
from .storage.urls import StoreCache

log = logging.getLogger("kubemr.worker")
T = TypeVar("T")

_PERMANENT = (PermanentTaskError, JobDefinitionError, shuffle.ShuffleError)
#: Bytes per ranged GET of a reducer's slice, and per write of an upload.
_FETCH_PIECE = 8 * 1024 * 1024
_UPLOAD_PIECE = 8 * 1024 * 1024
#: Indexes up to this size are read (and kept, see ``kept``) whole rather than one entry at
#: a time, while the worker's share for kept objects has room.
_WHOLE_INDEX = 64 * 1024
#: Shuffle objects up to this size are read whole (and kept, while there is room): every
#: reduce's slice of a small map output then costs at most one request.
_WHOLE_OBJECT = 64 * 1024
#: Seconds between a sharded worker's polls of the tasks it does not follow, when it has
#: nothing to claim: the first gap, and the most it doubles to while polls find nothing.
#: The first is short so a stage's end is seen at once; the last bounds both how late an
#: idle worker notices work elsewhere and what idle workers cost (one small list each).
_POLL_GAPS = (0.25, 2.0)
#: Idle polls per second the whole fleet makes at most, once its workers' gaps have grown:
#: each poll is filtered over every task of the job's namespace in the API server's watch
#: cache (~24 ms of its CPU at 20,000 tasks, measured), so a fixed gap made W idle workers
#: cost W/2 such scans a second (63 workers polling through a long reduce were most of a
#: 20,000-task job's API-server CPU). The last gap therefore grows with the fleet (its
#: shards x WATCHERS_PER_SHARD workers), from _POLL_GAPS[1] up to a third of a lease; a
#: stage's end, which idle workers of other shards learn by polls, is seen that much later
#: (a shard's 4 followers poll at random phases: on average a fifth of the gap).
_FLEET_IDLE_POLLS = 8.0
#: Unfinished tasks a steal asks another shard for: a few claims' worth of candidates.
_STEAL = 16
#: Seconds a timed-out attempt's cancelled user code has to end (a killed shell command
#: reaped, an async callback unwound) before the user thread counts as lost.
_CANCEL_GRACE = 2.0
#: Up to this many result parts, the manifest's sizes come from a HEAD each (concurrent);
#: more, from one listing (a listing of a busy location costs more than a few HEADs).
_HEADED_PARTS = 16


def longest_poll_gap(shards: int, lease_seconds: float) -> float:
    """How far apart an idle worker's polls may grow for a job dealt into ``shards``
    (see _FLEET_IDLE_POLLS): the fleet's idle polls stay near that many a second."""
    fleet = shards * protocol.WATCHERS_PER_SHARD
    return min(max(_POLL_GAPS[1], fleet / _FLEET_IDLE_POLLS),
               max(_POLL_GAPS[1], lease_seconds / 3))


def exit_stuck() -> NoReturn:
    """End a stuck worker's process (``Worker.stuck``) with ``STUCK_EXIT_CODE`` at once.

    A normal exit waits for the process's non-daemon threads, and a stuck callback may
    be blocking one (an executor's): the process would never end."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(STUCK_EXIT_CODE)


def container_memory_limit() -> int | None:
    """This container's memory limit from its cgroup (v2, else v1), or None if unlimited.

    What a worker pod's default budget comes from (``spec.memory_budget``), so that our
    own buffers never get the pod OOMKilled.
    """
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        # "max" (v2) or a huge number (v1, ~2**63 rounded to pages) both mean no limit.
        return int(text) if text.isdigit() and int(text) < 1 << 60 else None
    return None


class CallbackExit(Exception):
    """A callback raised SystemExit (``sys.exit()``), CancelledError of its own or, on the
    user thread, KeyboardInterrupt: the attempt fails, as for any exception a callback
    raises.

    Left as they are, SystemExit and KeyboardInterrupt end the event loop they run on, not
    the attempt: the user thread's loop stopped with the attempt's future never resolved,
    and the worker went on renewing the lease of an attempt that could never end. A
    CancelledError looked like the worker's own shutdown: the attempt was released, not
    failed, and claimed again, for ever.
    """


def _callback_exit(exc: BaseException) -> CallbackExit:
    """``exc`` as a CallbackExit keeping its traceback (the error names the user's line)."""
    detail = f": {exc}" if str(exc) else ""
    return CallbackExit(f"the callback raised {type(exc).__name__}{detail}"
                        ).with_traceback(exc.__traceback__)


async def _contained(coro: Coroutine[Any, Any, T],
                     exits: tuple[type[BaseException], ...]) -> T:
    """``coro``, with ``exits`` and a CancelledError nobody asked for (the task running
    it is not being cancelled) raised by user code turned into a CallbackExit."""
    try:
        return await coro
    except exits as exc:
        raise _callback_exit(exc) from None
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise  # the worker cancelled the attempt (lease lost, shutdown): not a failure
        raise _callback_exit(exc) from None


class UserLoop:
    """A private event loop in a daemon thread where user callbacks run."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kubemr-user",
                                        daemon=True)
        self._thread.start()
        # Set once a cancelled callback failed to end (see ended): the thread is not ours
        # to run anything on any more.
        self.lost = False

    async def ended(self, seconds: float) -> bool:
        """Whether everything on the loop (a cancelled attempt's callbacks) ends within
        ``seconds``; if not, the loop is lost (``lost``).

        Cancelling an attempt's ``run`` returns at once on the caller's side, whatever the
        user thread does: a cancelled async callback or a killed shell command unwinds in
        a moment, but a synchronous callback computing (or blocked in a call) cannot be
        interrupted in Python, and a callback may swallow its cancellation. Either way
        the thread is still running user code that nobody can stop.
        """
        async def others_ended() -> None:
            others = asyncio.all_tasks() - {asyncio.current_task()}
            if others:
                await asyncio.wait(others)

        probe = asyncio.run_coroutine_threadsafe(others_ended(), self.loop)
        try:
            await asyncio.wait_for(asyncio.wrap_future(probe), seconds)
        except TimeoutError:
            self.lost = True
        return not self.lost

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        # No signal reaches this thread: a KeyboardInterrupt here is the callback's own.
        contained = _contained(coro, (SystemExit, KeyboardInterrupt))
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(contained,
                                                                          self.loop))

    async def aclose(self) -> None:
        """Cancel what still runs on the loop and wait (up to a second) for it to finish,
        then stop the loop.

        An attempt cancelled as the worker stops is still unwinding there (a shell command
        being killed and reaped): stopping the loop under it left it pending, and at exit
        Python printed its "Task was destroyed but it is pending!" and "Event loop is
        closed" tracebacks on the user's terminal. A callback still hogging the thread is
        abandoned: the thread is a daemon (at once, once the loop is known to be lost).
        """
        if self.lost:
            return

        async def cancel_all() -> None:
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            # What they start as they unwind is waited for too, not cancelled: a killed
            # command's reaping (streaming's shielded proc.wait) begun after the first
            # look was left pending under a stopped loop.
            while tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
                tasks = asyncio.all_tasks() - {asyncio.current_task()}

        done = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(cancel_all(), self.loop))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done, 1.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=1.0)


class SameLoop:
    """User callbacks on the caller's own loop and thread (``kubemr run --inline``).

    A debugger (``breakpoint()``) or a profiler sees the callback on the main thread with
    the terminal's stdin; the price is that a callback blocking the loop also blocks the
    heartbeats, so an inline run uses a lease far longer than any debugging session.
    """

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        # KeyboardInterrupt is left alone: on the main thread it is the user's Ctrl-C.
        return await _contained(coro, (SystemExit,))

    async def ended(self, seconds: float) -> bool:
        """Always: a cancelled callback on this loop has ended once its attempt's task has
        (which the caller waits for)."""
        return True

    async def aclose(self) -> None:
        pass


class Worker:
    """Runs tasks of one job until the job is decided, deleted, or the worker is stopped.

    ``job`` is the job, or every step of a multi-step job run as one (a MapReduceJob): the
    worker then runs the tasks of whichever step the job record says is current.
    """

    def __init__(self, job_name: str, job: AnyJob | Sequence[AnyJob], store: StateStore,
                 blobs: BlobStore, worker_id: str, *, data_prefix: str = "",
                 io_concurrency: int = 16,
                 clock: Callable[[], float] = time.time, inline: bool = False,
                 memory_limit: int | None = None,
                 monotonic: Callable[[], float] = time.monotonic,
                 ordinal: int | None = None, user: UserLoop | None = None) -> None:
        """``user``: the loop user code runs on, made already (a warm pool's standby made
        it, and its S3 client there, before its job existed); the worker closes it."""
        self.job_name = job_name
        self._user = user
        # This worker's index among the job's workers, if it has one (a pod of an Indexed
        # Job): shards are then dealt to workers evenly (protocol.worker_shard).
        self.ordinal = ordinal

        # inline: callbacks run on this loop (SameLoop) instead of a UserLoop thread.
        self.inline = inline
        self.steps: list[AnyJob] = list(job) if isinstance(job, Sequence) else [job]
        self.job = self.steps[0]
        self.store = store
        self.blobs = blobs
        self.worker_id = worker_id
        # clock: wall time, only to date the leases we write for people reading records.
        # monotonic: when we saw each record change, which alone decides a takeover
        # (JobView.lease_lapsed), so another machine's clock never matters.
        self.clock = clock
        self.monotonic = monotonic
        # The container's memory limit, the default budget when the spec sets none.
        self.memory_limit = memory_limit
        # Where this job's data lives inside ``blobs``: the manifest at the base, each
        # step's runs and outputs (attempt-unique keys) under its own prefix.
        self.base_prefix = data_prefix.rstrip("/") or job_name
        self.prefix = self.base_prefix
        self._step = -1
        self._io = asyncio.Semaphore(io_concurrency)
        self._view = JobView()
        # The shard this worker follows live when the job's tasks are dealt into several
        # (None: one shard, it follows every task); the rest it polls (_poll).
        self._shard: int | None = None
        self._shards = 1
        # When it polls next, and how long it waits after that (see _look_further); when
        # it reads the job whole once everything finished (a spread, see there).
        self._next_poll = 0.0
        self._poll_gap = _POLL_GAPS[0]
        self._read_at: float | None = None

        # Input stores and the stores user code reaches through ctx.fetch/ctx.store.
        self._stores = StoreCache(s3=blobs)
        self._rng = random.Random()
        # The store's last blind spell this worker has judged leases after (last_outage).
        self._outage_seen: float | None = None
        # What this worker keeps of small shuffle objects for its next reduces (its share
        # of the budget is known in run(); each step starts with none kept).
        self._kept = KeptObjects(0)
        self._changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._job_deleted = False
        self._current: asyncio.Task[Any] | None = None
        self.tasks_done = 0
        # An attempt timed out and its user code would not stop (see _time_out): the
        # worker stopped, and its process must exit non-zero (deaths.STUCK_EXIT_CODE).
        self.stuck = False

    # --- lifecycle --------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming and hand the current task back (graceful shutdown on SIGTERM)."""
        self._stopping.set()
        self._changed.set()
        if self._current is not None:
            self._current.cancel()

    async def run(self) -> JobPhase:
        """Work until the job finishes; returns the phase the job was in when we left."""
        def follow(job: JobRecord) -> int | None:
            shards = protocol.job_shards(job)
            return (protocol.worker_shard(self.worker_id, self.ordinal, shards)
                    if shards > 1 else None)

        # A worker of a sharded job reads only its shard: the rest it learns by polling.
        records, revision = await self.store.snapshot(self.job_name, shard=follow)
        job = records[protocol.JOB_KEY].job
        self._shards, self._shard = protocol.job_shards(job), follow(job)
        shards, shard = self._shards, self._shard
        followed = None
        if shard is not None:
            followed = lambda key: protocol.shard_of(key, shards) == shard  # noqa: E731
        self._view = JobView({key: rec.body for key, rec in records.items()},
                             seen=self.monotonic(), followed=followed,
                             own=protocol.own_lane(self.ordinal, shards))
        assert self._view.job is not None
        self.job_spec = JobSpec.from_dict(self.job_name, self._view.job["spec"])
        self.budget = shuffle.ShuffleBudget(memory_budget(self.job_spec.memory,
                                                          self.memory_limit))
        self._enter_step(self._view.step)
        self.user: UserLoop | SameLoop = self._user or (
            SameLoop() if self.inline else UserLoop())
        watcher = asyncio.create_task(self._watch(revision), name="kubemr-watch")
        try:
            return await self._claim_loop()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await self.user.aclose()
            await self._stores.aclose()

    def _enter_step(self, step: int) -> None:
        """Run step ``step``'s tasks from now on: its job, its spec (reducers, part format)
        and its blob prefix. Only the current step's tasks are claimable, so no task of
        the step left behind is still ours (a zombie's commit fails its guard anyway)."""
        self.spec = self.job_spec.at_step(step)
        # A worker given one job runs it whatever the step (`kubemr run` starts fresh
        # workers for each step, each its own record set).
        self.job = self.steps[step] if len(self.steps) > 1 else self.steps[0]
        self.prefix = protocol.step_prefix(self.base_prefix, self.spec)
        self._step = step
        # The last step's shuffle objects are no step's inputs any more.
        self._kept = KeptObjects(self.budget.kept_bytes)

    async def _watch(self, since: str) -> None:
        async for event in self.store.watch(self.job_name, since, shard=self._shard):
            self._remember(event.record.key, event.record.body)
        self._job_deleted = True
        self._changed.set()

    def _remember(self, key: str, body: Body) -> None:
        # Our own writes are applied at once; the watch may deliver them (or older ones) later.
        known = self._view.records.get(key)
        if known is None or body["seq"] >= known["seq"]:
            self._view.update(key, body, seen=self.monotonic())
            self._changed.set()

    async def _write(self, update: protocol.Update, *, resend: bool = True) -> Record | None:
        record = await self.store.patch(self.job_name, update, resend=resend)
        if record is None:
            self._view.stale(update.key)
            return None
        self._remember(record.key, record.body)
        return record

    # --- the claim loop ---------------------------------------------------------------

    async def _claim_loop(self) -> JobPhase:
        view = self._view
        while True:
            if self._job_deleted or view.phase.finished or self._stopping.is_set():
                return view.phase
            if view.step != self._step:
                self._enter_step(view.step)
            verdict = view.verdict()
            if verdict is not None:
                await self._stamp_verdict(view, verdict)
                continue
            self._changed.clear()
            now = self.monotonic()
            outage = self.store.last_outage()
            if outage != self._outage_seen:
                # We could not see for a while, and nobody could renew: a record that did
                # not change then proves nothing. Judge every lease afresh from now.
                self._outage_seen = outage
                view.restart_observation(now)
            # A random few: workers spread over different tasks, so most claims win at once.
            for body in view.candidates(now, 8, self._rng):
                if self._stopping.is_set():
                    break
                update = protocol.claim(
                    body, self.worker_id, self.clock(), self.spec.lease_seconds,
                    self.spec.max_attempts,
                    lapsed=view.lease_lapsed(protocol.task_name(body), now))
                takeover = body["state"] == TaskState.RUNNING
                if takeover:
                    log.warning("taking over a lapsed lease",
                                extra={"job": self.job_name, "task": protocol.task_name(body),
                                       "attempt": body["attempt"], "holder": body["worker"],
                                       "worker": self.worker_id})
                try:
                    # A takeover rests on this view being current: never sent again after
                    # an outage (see StateStore.patch).
                    claimed = await self._write(update, resend=not takeover)
                except StoreUnavailable as exc:
                    # Not applied, and not sent again: the next round judges leases afresh
                    # (the store reports the outage through last_outage).
                    log.warning("takeover not sent again after an outage",
                                extra={"job": self.job_name, "error": str(exc),
                                       "worker": self.worker_id})
                    break
                if claimed is None:
                    metrics.CLAIM_RACES_LOST.labels(body["kind"]).inc()
                    if not view.follows(protocol.task_name(body)):
                        break  # the rest came from the same (stale) poll
                elif claimed.task["state"] == TaskState.RUNNING:
                    metrics.TASKS_CLAIMED.labels(body["kind"]).inc()
                    self._poll_gap = _POLL_GAPS[0]
                    await self._execute(claimed.task)
                    break
            else:
                if not await self._back_up(view, now):
                    await self._look_further(view)

    async def _back_up(self, view: JobView, now: float) -> bool:
        """Idle with nothing to claim: start a backup attempt of a straggler, if the rule
        (JobView.backup_candidate) names one; whether one ran."""
        body = view.backup_candidate(self.worker_id, now)
        if body is None or self._stopping.is_set():
            return False
        task = protocol.task_name(body)
        claimed = await self._write(protocol.backup(body, self.worker_id, self.clock(),
                                                    self.spec.lease_seconds))
        if claimed is None:  # it renewed, committed, or another worker backed it up first
            metrics.CLAIM_RACES_LOST.labels(body["kind"]).inc()
            return False
        log.info("backing up a straggler", extra={
            "job": self.job_name, "task": task, "attempt": claimed.task["attempt"],
            "original": body["worker"], "worker": self.worker_id})
        metrics.BACKUP_ATTEMPTS.labels("launched").inc()
        outcome = await self._execute(claimed.task)
        if outcome in ("committed", "lost"):
            metrics.BACKUP_ATTEMPTS.labels("won" if outcome == "committed" else "lost").inc()
        return True

    async def _look_further(self, view: JobView) -> None:
        """Nothing to claim in this worker's view: read what it has not, poll the shards it
        does not follow, or wait for a change.

        The step's tasks all finished, some only known from a poll (JobView.settle): read
        them all, which the verdict needs. Otherwise a worker following one shard polls
        the unfinished tasks of all, at most every ``_poll_gap`` seconds: the gap doubles
        while polls find nothing and starts small again once the worker has claimed, so
        idle workers cost the API server a small list every few seconds, not a watch
        event per write."""
        now = self.monotonic()
        if view.needs_reading():
            if self._read_at is None:
                # Idle workers' polls find the end at about the same time, and one read
                # (one verdict) is enough: the workers of shard 0 read at once (spread a
                # little), the others only if no verdict came through the job's watch
                # within a lease (shard 0's workers may all be gone).
                wait = 0.0 if self._shard in (None, 0) else self.spec.lease_seconds
                self._read_at = now + wait + self._rng.uniform(0.0, _POLL_GAPS[1])
            if now >= self._read_at:
                self._read_at = now + _POLL_GAPS[1]  # a task deleted meanwhile stays unread
                await self._read_all()
            else:
                await self._wait_for_change(view, self._read_at)
            return
        self._read_at = None
        if self._shard is None:
            await self._wait_for_change(view, now + 2.0)
        elif now < self._next_poll:
            await self._wait_for_change(view, self._next_poll)
        else:
            self._next_poll = now + self._poll_gap
            self._poll_gap = min(self._poll_gap * 2, longest_poll_gap(
                self._shards, self.spec.lease_seconds))
            try:
                await self._poll()
            except StoreUnavailable as exc:  # a busy server: the next poll will do
                log.warning("poll not answered; polling again later",
                            extra={"job": self.job_name, "worker": self.worker_id,
                                   "error": str(exc)})

    async def _poll(self) -> None:
        """Steal first: a few unfinished tasks of another shard picked at random (a small
        list, and stealers spread over the shards). Only when it has nothing pending, the
        unfinished tasks of every shard, which also settles what committed meanwhile."""
        others = [s for s in range(self._shards) if s != self._shard]
        if others:
            found = await self.store.unfinished(self.job_name, shard=self._rng.choice(others),
                                                most=_STEAL)
            self._remember_all(found)
            if any(record.task["state"] == TaskState.PENDING for record in found):
                return
        found = await self.store.unfinished(self.job_name)
        self._remember_all(found)
        self._view.settle(record.key for record in found)

    async def _read_all(self) -> None:
        """Read every record of the job: what a stage's outputs and the verdict need when
        this worker knows some tasks only from polls (JobView.unread)."""
        records, _ = await self.store.snapshot(self.job_name)
        self._remember_all(records.values())

    def _remember_all(self, records: Iterable[Record]) -> None:
        for record in records:
            self._remember(record.key, record.body)

    async def _wait_for_change(self, view: JobView, until: float) -> None:
        expiry = min((t for t in (view.next_lease_expiry(),
                                  view.next_backup_at(self.worker_id)) if t is not None),
                     default=None)
        if expiry is not None:
            until = min(until, expiry + 0.01)
        timeout = max(0.05, until - self.monotonic())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    async def _stamp_verdict(self, view: JobView, verdict: protocol.Update) -> None:
        if view.progress().failed:
            # Decide a failure on a fresh read: the watch brings the job and its tasks on
            # two streams, so a retry's job write (sent after its task resets) can arrive
            # first, and this view would fail the re-opened job again over a task that the
            # retry has reset. A snapshot reads the job, then the tasks: consistent.
            await self._read_all()
            fresh = view.verdict()

            if fresh is None:
                return
            verdict = fresh
        results = view.results()
        if results is not None and isinstance(self.job, Job):
            # Every task the results come from has committed, so the map runs are garbage.
            # Removing them before the stamp makes "Succeeded" also mean "cleaned up"; a
            # Failed job keeps its runs (and gets no manifest) so a retry can reuse the
            # committed maps.
            removed = await self.blobs.delete_prefix(f"{self.prefix}/map/")
            # A multi-step job's earlier steps: every part the last step read (and anything
            # an operator that stopped mid-advance left behind).
            for step in range(self.spec.step):
                removed += await self.blobs.delete_prefix(
                    protocol.step_prefix(self.base_prefix, self.job_spec.at_step(step)) + "/")
            log.info("removed intermediate runs", extra={"job": self.job_name, "count": removed})
            await self._write_manifest([str(result) for result in results], view.counters(),
                                       view.skipped())
            # The operator deletes a Succeeded job's task records: their attempts stay
            # here for `kubemr timeline`.
            await self.blobs.put(f"{self.base_prefix}/{timeline.FILE}",
                                 orjson.dumps(timeline.kept(view.every_task())))
        job = await self._write(verdict)
        if job is not None:
            log.info("job decided", extra={"job": self.job_name, "phase": job.job["phase"],
                                           "worker": self.worker_id})

    async def _write_manifest(self, results: list[str], totals: Counters,
                              skipped: list[Skipped]) -> None:
        """Make the result location self-describing before the job is stamped Succeeded.

        The same shape as `kubemr run`'s ``_SUCCESS``: the format, the result URLs, and the
        parts relative to the manifest with their sizes, which is what ``read_results``
        follows and checks.
        """
        base = self.blobs.url(self.base_prefix).rstrip("/") + "/"
        parts = [url[len(base):] if url.startswith(base) else url for url in results]
        keys = [f"{self.base_prefix}/{part}" for part in parts]
        sizes = await self._part_sizes(keys)
        await self.blobs.put(f"{self.base_prefix}/{SUCCESS_MARKER}", formats.manifest(
            self.job_name, self.spec.output_format, results, parts, sizes, counters=totals,
            **({"skipped": skipped} if skipped else {})))

    async def _part_sizes(self, keys: list[str]) -> list[int]:
        """The result parts' sizes: a HEAD each for a few (a small job's one part), else one
        listing of the directory that holds them all."""
        if len(keys) <= _HEADED_PARTS:
            return list(await asyncio.gather(*(self.blobs.size(key) for key in keys)))
        # More than one part: their common path is the directory, never a part itself.
        listed = dict(await self.blobs.list_sized(posixpath.commonpath(keys) + "/"))
        missing = [self.blobs.url(key) for key in keys if key not in listed]
        if missing:  # committed, yet not there: not a result to stamp Succeeded
            raise RuntimeError(f"job {self.job_name}: committed result parts are missing: "
                               f"{', '.join(missing)}")
        return [listed[key] for key in keys]

    # --- one attempt ------------------------------------------------------------------

    async def _execute(self, body: TaskRecord) -> str:
        started = time.monotonic()
        outcome = await self._attempt(body)
        metrics.TASK_SECONDS.labels(body["kind"], outcome).observe(time.monotonic() - started)
        outcome_counter = _OUTCOME_COUNTERS.get(outcome)
        if outcome_counter is not None:
            outcome_counter.labels(body["kind"]).inc()
        return outcome

    async def _attempt(self, body: TaskRecord) -> str:
        """Run one claimed attempt to its end; its outcome (committed, failed, released,
        lost), as the task metrics name it."""
        task = protocol.task_name(body)
        attempt = int(body["attempt"])
        context = {"job": self.job_name, "task": task, "attempt": attempt,
                   "worker": self.worker_id}
        log.info("claimed", extra=context)
        holder = _Holder(body)
        lost = asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeat(holder, lost), name="kubemr-heartbeat")
        self._current = work = asyncio.create_task(self._perform(body), name=task)
        lost_waiter = asyncio.create_task(lost.wait())
        try:
            done, _ = await asyncio.wait({work, lost_waiter}, timeout=self.spec.task_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                return await self._time_out(work, holder, context)
            if lost.is_set():
                work.cancel()
                log.warning("lease lost; abandoning attempt", extra=context)
                return "lost"
            try:
                outputs, kept, skipped = work.result()
            except asyncio.CancelledError:
                if await self._settle(holder, lambda b: protocol.release(
                        b, self.worker_id, now=self.clock())) is None:
                    log.info("shutting down: the attempt was no longer ours to release",
                             extra=context)
                    return "lost"
                log.info("released on shutdown", extra=context)
                return "released"
            except _MapsNotCommitted as exc:
                # Claimed on a view that was behind (a poll's, or a map re-opened since):
                # running now would read only some maps. Handed back, not a failure.
                log.warning("not every map has committed: reduce handed back",
                            extra={**context, "error": str(exc)})
                await self._settle(holder, lambda b: protocol.release(
                    b, self.worker_id, now=self.clock()))
                return "released"
            except _CorruptRun as exc:
                # The map goes back first, so the released reduce is not claimable again
                # until a new run exists. Losing the re-open race is fine: another reduce
                # re-opened the map, or it has re-run already.
                log.warning("corrupt run: re-running the map that wrote it",
                            extra={**context, "map": protocol.task_name(exc.writer),
                                   "error": exc.message})
                await self._write(protocol.reopen(exc.writer, exc.message,
                                                  self.spec.max_attempts))
                await self._settle(holder, lambda b: protocol.release(
                    b, self.worker_id, now=self.clock()))
                return "released"
            except Exception as exc:
                message = _describe(exc)
                permanent = isinstance(exc, _PERMANENT)
                log.warning("attempt failed", extra={**context, "error": message,
                                                     "permanent": permanent})
                await self._settle(holder, lambda b: protocol.fail(
                    b, self.worker_id, message, self.spec.max_attempts, permanent,
                    now=self.clock()))
                return "failed"
            _count_records(body["kind"], kept)
            # The attempt's counters (and skipped records) go with its commit: counted
            # only if it wins.
            committed = await self._settle(holder, lambda b: protocol.commit(
                b, self.worker_id, outputs, kept, skipped, now=self.clock()))
            if committed is None:
                log.warning("commit lost: the task was taken over, or its other attempt "
                            "committed", extra=context)
                return "lost"
            self.tasks_done += 1
            log.info("committed", extra=context)
            return "committed"
        finally:
            self._current = None
            for helper in (heartbeat, lost_waiter):
                helper.cancel()
            await asyncio.gather(heartbeat, lost_waiter, return_exceptions=True)

    async def _time_out(self, work: asyncio.Task[Any], holder: _Holder,
                        context: dict[str, Any]) -> str:
        """The attempt's work ran past ``spec.taskTimeoutSeconds``: cancel it and fail the
        attempt (retried up to ``maxAttempts``), as Hadoop's ``mapreduce.task.timeout``
        does; the heartbeats alone would keep a hung callback's task running for ever.

        User code that does not stop within ``_CANCEL_GRACE`` (a synchronous callback
        computing or blocked in a call, which Python cannot interrupt) still holds the
        user thread: no more user code may run on it, so this worker stops (``stuck``)
        and its process exits for another to replace it. The attempt is failed first, so
        the retries stay bounded by ``maxAttempts`` however often that happens.
        """
        assert self.spec.task_timeout is not None
        kind = holder.body["kind"]
        work.cancel()
        started = time.monotonic()  # real time, as the waits are (not the injected clock)
        await asyncio.wait({work}, timeout=_CANCEL_GRACE)
        left = max(0.0, _CANCEL_GRACE - (time.monotonic() - started))
        self.stuck = not (work.done() and await self.user.ended(left))
        message = (f"{kind} timed out after {self.spec.task_timeout:g} s "
                   f"({TASK_TIMEOUT_FIELD}) and was cancelled")
        if self.stuck:
            message += (f", but its callback did not stop (a synchronous callback cannot be "
                        f"interrupted): worker {self.worker_id} exits to be replaced")
        log.warning("attempt timed out", extra={**context, "error": message})
        await self._settle(holder, lambda b: protocol.fail(
            b, self.worker_id, message, self.spec.max_attempts, now=self.clock()))
        if self.stuck:
            self._stopping.set()
            self._changed.set()
        return "failed"

    async def _settle(self, holder: _Holder, write: Callable[[TaskRecord], protocol.Update]
                      ) -> Record | None:
        """Send the attempt's final write (commit, fail, release) built from the freshest
        body we hold; None once the attempt holds no slot any more (taken over, or the
        task's other attempt committed)."""
        async with holder.lock:
            while True:
                record = await self._write(write(holder.body))
                if record is not None or not await self._still_held(holder):
                    return record

    async def _still_held(self, holder: _Holder) -> bool:
        """After a guarded write of ours failed: whether our attempt still holds a slot of
        the task (the other attempt of a backed-up task wrote first, or a backup moved us
        to the twin slot), judged on the freshest record the watch brings, waited for at
        most a third of a lease; holder.body is then that record."""
        key = protocol.task_name(holder.body)
        deadline = self.monotonic() + self.spec.lease_seconds / 3
        while (fresh := self._view.tasks.get(key)) is None or fresh["seq"] <= holder.body["seq"]:
            remaining = deadline - self.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()  # the claim loop looks afresh after this attempt anyway
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        if protocol.slot(fresh, self.worker_id, holder.attempt) is None:
            return False
        holder.body = fresh
        return True

    async def _heartbeat(self, holder: _Holder, lost: asyncio.Event) -> None:
        interval = self.spec.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            async with holder.lock:
                while True:
                    try:
                        renewed = await self._write(protocol.renew(
                            holder.body, self.worker_id, self.clock(), self.spec.lease_seconds))
                    except Exception as exc:  # a flaky store: retry before the lease runs out
                        metrics.LEASE_RENEWALS.labels("error").inc()
                        log.warning("lease renewal failed; retrying",
                                    extra={"job": self.job_name, "error": _describe(exc)})
                        break
                    if renewed is not None:
                        metrics.LEASE_RENEWALS.labels("renewed").inc()
                        holder.body = renewed.task
                        break
                    if not await self._still_held(holder):
                        metrics.LEASE_RENEWALS.labels("lost").inc()
                        lost.set()
                        return
                    # The other attempt of a backed-up task wrote first: renew again.

    async def _perform(self, body: TaskRecord
                       ) -> tuple[TaskOutputs, Counters, list[Skipped] | None]:
        """Run one attempt: its outputs, the counters it kept (user's and framework's) and,
        in skip mode, the sample of the records it skipped."""
        ctx = TaskContext(job=self.job_name, task=protocol.task_name(body),
                          attempt=int(body["attempt"]), partitions=self.spec.reducers,
                          input=body["input"] or "", args=self.spec.args,
                          scratch=self.blobs.url(f"{self.prefix}/user/{protocol.task_name(body)}"
                                                 f"/attempt-{body['attempt']}"),
                          stores=self._stores)
        # ctx.log records say which task and attempt they came from.
        ctx.log = logging.LoggerAdapter(logging.getLogger("kubemr.user"), {
            "job": self.job_name, "task": ctx.task, "attempt": ctx.attempt,
            "worker": self.worker_id})
        if self.spec.max_skipped_records:
            ctx._skips = skips.TaskSkips(self.spec.max_skipped_records, ctx.input)
        outputs = await self._outputs(body, ctx)
        sample = (ctx._skips.fit(ctx._counters.user_bytes) if ctx._skips is not None
                  else None)
        return outputs, ctx._counters.snapshot(), sample

    async def _outputs(self, body: TaskRecord, ctx: TaskContext) -> TaskOutputs:
        index = int(body["index"])
        if body["kind"] == TaskKind.REDUCE:
            if self._view.unread:
                await self._read_all()  # a reduce reads every map's outputs
            if not self._view.maps_committed:
                done, total = self._view.progress().maps_done, self._view.map_total
                raise _MapsNotCommitted(f"{done} of {total} maps committed")

        if body["kind"] == TaskKind.MAP:
            if isinstance(self.job, Job):
                return await self._map(self.job, body, ctx)
            if body["range"] is not None or protocol.split_count(body) > 1:
                raise PermanentTaskError(
                    "a low-level JobWorker job gets its inputs verbatim, one per task: set "
                    "splitInputs: false (and splitsPerTask: 1)")
            outputs = await self.user.run(
                execute.run_low_level_map(self.job, index, ctx.input, ctx))
            return {str(p): out for p, out in outputs.items()}
        if isinstance(self.job, Job):
            return await self._reduce(self.job, index, ctx)
        inputs = [output for _, output in self._view.map_outputs(index)]
        return await self.user.run(execute.run_low_level_reduce(self.job, index, inputs, ctx))

    async def _reduce(self, job: Job, index: int, ctx: TaskContext) -> str:
        """Fetch this partition's slice of every map's shuffle object, merge, reduce, upload.

        The slices go to local scratch first (Hadoop's reducers fetch the same way): the
        fetch keeps a bounded number of bytes in flight, checks each slice's checksum as
        it arrives, and the merge then reads one block per input at a time.
        """
        # Maps that committed at the same instant could not see each other's key type.
        clash = self._view.key_type_clash()
        if clash is not None:
            raise PermanentTaskError(clash)
        sources = self._view.shuffle_objects()
        with spill.scratch_dir(f"{ctx.task}-{ctx.attempt}") as directory:
            slices, rows = await self._fetch_slices(sources, index, directory / "slices",
                                                    ctx.task)
            ctx._counters.set_framework(counters.REDUCE_INPUT_RECORDS, rows)
            run = execute.run_reduce(job, slices, ctx, self.spec.part_format, directory,
                                     self.budget)
            try:
                part = await self.user.run(run)
            except execute.CorruptRun as exc:
                writer, key, _ = sources[exc.position]
                raise _CorruptRun(writer, f"{ctx.task} read a corrupt shuffle object "
                                          f"{self.blobs.url(key)}: {exc}") from exc
            return await self._put_part(index, ctx.attempt, part)

    async def _fetch_slices(self, sources: list[tuple[TaskRecord, str, int]], partition: int,
                            path: Path, task: str) -> tuple[list[spill.Slice], int]:
        """Every source's slice of ``partition``, in one local file, in source order, and
        the rows they hold (from the maps' indexes)."""
        reducers = self.spec.reducers

        async def entry(key: str, size: int) -> tuple[shuffle.SliceEntry, bytes | None]:
            """The slice's index entry, and the object's bytes if it was read whole."""
            held = self._kept.get(key)
            if held is not None:
                return held.entry(partition), held.blocks
            start, length = shuffle.entry_range(reducers, partition, size)
            first, _ = shuffle.entry_range(reducers, 0, size)
            if size <= _WHOLE_OBJECT:  # one read serves the entry and the slice
                whole = await self.blobs.get_range(key, 0, size)
                self._kept.keep(key, whole[first:first + reducers * length], reducers, size,
                                blocks=whole[:first])
                return shuffle.decode_entry(whole[start:start + length], partition, size), whole
            if reducers * length <= _WHOLE_INDEX and self._kept.has_room(reducers * length):
                index = await self.blobs.get_range(key, first, reducers * length)
                kept = self._kept.keep(key, index, reducers, size)
                if kept is not None:
                    return kept.entry(partition), None
                data = index[start - first:start - first + length]
            else:
                data = await self.blobs.get_range(key, start, length)
            return shuffle.decode_entry(data, partition, size), None

        entries = await self._gather(
            self._attributed(writer, key, task, entry(key, size))
            for writer, key, size in sources)
        offsets = [0]
        for found, _ in entries:
            offsets.append(offsets[-1] + found.length)
        # Bytes in flight: whole pieces under a budget share (Spark's maxSizeInFlight).
        piece = min(_FETCH_PIECE, self.budget.in_flight)
        slots = anyio.Semaphore(max(1, self.budget.in_flight // piece))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

        async def fetch(position: int) -> None:
            writer, key, _ = sources[position]
            (found, whole), crc = entries[position], 0
            for start in range(0, found.length, piece):
                length = min(piece, found.length - start)
                async with slots:
                    begin = found.offset + start
                    data = (whole[begin:begin + length] if whole is not None
                            else await self.blobs.get_range(key, begin, length))
                    if len(data) != length:
                        raise _CorruptRun(writer, f"{task} read a corrupt shuffle object "
                                                  f"{self.blobs.url(key)}: slice of partition "
                                                  f"{partition} is truncated")
                    crc = zlib.crc32(data, crc)
                    if length <= _WHOLE_OBJECT:  # a small write does not block the loop
                        os.pwrite(fd, data, offsets[position] + start)
                    else:
                        await anyio.to_thread.run_sync(os.pwrite, fd, data,
                                                       offsets[position] + start)
            if crc != found.crc:
                raise _CorruptRun(writer, f"{task} read a corrupt shuffle object "
                                          f"{self.blobs.url(key)}: slice of partition "
                                          f"{partition} fails its checksum (crc32 {crc:#010x}, "
                                          f"index says {found.crc:#010x})")
            metrics.READ_BYTES.labels("shuffle").inc(found.length)

        try:
            async with anyio.create_task_group() as group:
                for position in range(len(sources)):
                    group.start_soon(fetch, position)
        except BaseExceptionGroup as eg:
            raise _first(eg) from None
        finally:
            os.close(fd)
        return ([spill.Slice(path, offsets[i], found.length)
                 for i, (found, _) in enumerate(entries)],
                sum(found.rows for found, _ in entries))

    async def _attributed(self, writer: TaskRecord, key: str, task: str,
                          aw: Awaitable[T]) -> T:
        """``aw``, with a damaged index entry blamed on the map that wrote ``key``."""
        try:
            return await aw
        except shuffle.CorruptRunError as exc:
            raise _CorruptRun(writer, f"{task} read a corrupt shuffle object "
                                      f"{self.blobs.url(key)}: {exc}") from exc

    async def _put_part(self, index: int, attempt: int, part: bytes | Path) -> str:
        """Store result part ``index`` under an attempt-unique key; its URL is the output."""
        # The attempt goes before the extension, so tools that go by it still read it.
        stem, dot, extension = formats.part_name(index, self.spec.part_format).partition(".")
        key = f"{self.prefix}/output/{stem}.attempt-{attempt}{dot}{extension}"
        if isinstance(part, Path):
            await self._put_file(key, part, "output")
        else:
            await self.blobs.put(key, part)
            metrics.WRITTEN_BYTES.labels("output").inc(len(part))
        return self.blobs.url(key)

    async def _put_file(self, key: str, path: Path, sink: str) -> None:
        """Upload a local file piece by piece (multipart on S3), never whole in memory;
        its bytes are counted as written to ``sink``."""
        async with (self._io, self.blobs.open_writer(key) as writer,
                    await anyio.open_file(path, "rb") as f):
            while data := await f.read(_UPLOAD_PIECE):
                await writer.write(data)
                metrics.WRITTEN_BYTES.labels(sink).inc(len(data))

    async def _map(self, job: Job, body: TaskRecord, ctx: TaskContext) -> dict[str, str] | str:
        """Map the record's splits (a batched record's one after another, each fetched
        when the map reaches it) into this attempt's one shuffle object, or its part."""
        splits = self._map_splits(body, job.map_input)
        if self.spec.reducers == 0:  # map-only: this map's output is result part `index`
            part = await self.user.run(
                execute.run_map_only(job, splits, ctx, self.spec.part_format))
            return await self._put_part(int(body["index"]), ctx.attempt, part)
        ctx.args = await self._partition_args(job)
        key: str | None = None
        size = 0
        with spill.scratch_dir(f"{ctx.task}-{ctx.attempt}") as directory:
            written, key_type = await self.user.run(
                execute.run_map(job, splits, ctx, directory, self.budget))
            if written is not None:
                path, size = written
                key = f"{self.prefix}/map/{body['index']:05d}/attempt-{ctx.attempt}.shuffle"
                await self._put_file(key, path, "shuffle")
        # Checked last, against the freshest view: the clash names the map committed first.
        clash = self._view.key_type_clash(ctx.task, key_type)
        if clash is not None:
            raise PermanentTaskError(clash)
        return protocol.shuffle_outputs(key, size, key_type)

    def _map_splits(self, body: TaskRecord, kind: str) -> list[execute.MapSplit]:
        """The record's splits, each read (piece by piece) when the map (on the user loop)
        asks for it: the reads themselves run on this worker's loop, where the stores'
        connections live."""
        loop = asyncio.get_running_loop()

        def reader(split: Split) -> Callable[[], AsyncGenerator[execute.MapData, None]]:
            def read() -> AsyncGenerator[execute.MapData, None]:
                pieces = self._read_input(split, kind)
                if asyncio.get_running_loop() is loop:  # inline: user code on this loop
                    return pieces
                return _stepped_on(loop, pieces)
            return read

        return [execute.MapSplit(split[0], reader(split)) for split in protocol.task_splits(body)]

    async def _partition_args(self, job: Job) -> Mapping[str, str]:
        """The maps' ctx.args, naming the partition file of a total-order job.

        ``kubemr run`` samples before it plans and names the file in the spec. A cluster's
        operator cannot (it imports no job module), so the first map of a total-order job
        in this process samples, or loads what another worker sampled, from a file beside
        the shuffle objects: removed with them on success, kept for a retry on failure.
        """
        args = self.spec.args
        if not job.needs_boundaries(self.spec.reducers) or PARTITION_FILE_ARG in args:
            return args
        key = f"{self.prefix}/map/{sampling.PARTITION_FILE}"
        url = self.blobs.url(key)
        if job.partition_file != url:
            boundaries = await self.user.run(sampling.ensure_partition_file(
                job, self._splits, self.spec.reducers, self.blobs, key, self._stores))
            assert boundaries is not None  # the job needs them
            job.use_total_order(boundaries, source=url)
        return {**args, PARTITION_FILE_ARG: url}

    def _splits(self) -> list[Split]:
        """Every map task's splits, in task order: the splits it was planned on."""
        return [split for body in self._view.maps for split in protocol.task_splits(body)]

    async def _read_input(self, split: Split,
                          kind: str) -> AsyncGenerator[execute.MapData, None]:
        """One split (or, for unsplit inputs, the whole object) as a map of input ``kind``
        reads it, in pieces (a compressed object's decoded stream: see
        inputs.read_map_input); each piece's read takes a turn of the I/O bound."""
        url, byte_range = split
        source, key = self._stores.open(url)
        async with contextlib.aclosing(read_map_input(source, key, byte_range, kind,
                                                      split_size(self.spec))) as pieces:
            while True:
                async with self._io:
                    data = await anext(pieces, None)
                if data is None:
                    return
                metrics.READ_BYTES.labels("input").inc(recordio.split_bytes(data))
                yield data
                del data  # before the next piece is read

    async def _gather(self, jobs: Any) -> list[Any]:
        async def bounded(aw: Awaitable[T]) -> T:
            async with self._io:
                return await aw

        return list(await asyncio.gather(*(bounded(aw) for aw in jobs)))


async def _stepped_on(loop: asyncio.AbstractEventLoop,
                      pieces: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    """``pieces``, which belong to ``loop`` (another thread's), iterated from this loop:
    every step, and the close, runs on ``loop``."""
    async def step() -> T | None:
        return await anext(pieces, None)

    async def close() -> None:
        await pieces.aclose()

    try:
        while (piece := await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(step(), loop))) is not None:
            yield piece
            del piece
    finally:
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(close(), loop))


#: The counter of each outcome of an attempt (a lost one counts only in the histogram).
_OUTCOME_COUNTERS = {"committed": metrics.TASKS_COMMITTED, "failed": metrics.TASKS_FAILED,
                     "released": metrics.TASKS_RELEASED}
#: The framework counters that are records read or written, by task kind.
_RECORD_METRICS = ((counters.REDUCE_INPUT_RECORDS, metrics.RECORDS_READ),
                   (counters.MAP_OUTPUT_RECORDS, metrics.RECORDS_WRITTEN),
                   (counters.REDUCE_OUTPUT_RECORDS, metrics.RECORDS_WRITTEN))


def _count_records(kind: str, kept: Counters) -> None:
    """An attempt that finished its work: its records read and written, from the
    framework counters it kept (whether or not its commit then wins)."""
    framework = kept.get(counters.FRAMEWORK_GROUP) or {}
    for name, metric in _RECORD_METRICS:
        if name in framework:
            metric.labels(kind).inc(framework[name])


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception a task group's failure stands for: the first that is not a group."""
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


class _MapsNotCommitted(Exception):
    """A reduce's view, read whole, shows maps of its step not committed."""


class _CorruptRun(Exception):
    """A reduce input written by map ``writer`` (its record as read) is damaged."""

    def __init__(self, writer: TaskRecord, message: str) -> None:
        super().__init__(message)
        self.writer = writer
        self.message = message


class _Holder:
    """The latest body of the task we hold an attempt of (``attempt``: its number, in the
    holder slot or, once a backup moved it there, the twin); heartbeats and the final
    write take turns."""

    def __init__(self, body: TaskRecord) -> None:
        self.body = body
        self.attempt = int(body["attempt"])
        self.lock = asyncio.Lock()


_PACKAGE_DIR = str(Path(__file__).resolve().parent)
#: Python's own library, where a callback's error is raised but never written (json.loads
#: on a bad line): the user's line that called it is the place to name. Installed packages
#: (a job package too) may live below it, in site-packages: they are not skipped.
_STDLIB_DIRS = tuple({sysconfig.get_paths()[name] for name in ("stdlib", "platstdlib")})
_INSTALLED_DIRS = tuple({sysconfig.get_paths()[name] for name in ("purelib", "platlib")})


def _is_stdlib(filename: str) -> bool:
    return filename.startswith("<frozen ") or (
        filename.startswith(_STDLIB_DIRS) and not filename.startswith(_INSTALLED_DIRS))


def _describe(exc: BaseException) -> str:
    """One line: the exception and the last place in the *user's* code it passed through.

    Frames inside kubemr_async itself would only point at the framework (an input that
    fails to decompress is about the file, not about a line of ours), so they are skipped,
    and so are the standard library's below the user's own (``KeyError`` from
    ``os.environ[...]`` is about the user's line, not ``<frozen os>``).
    """
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_PACKAGE_DIR)]
    while len(frames) > 1 and _is_stdlib(frames[-1].filename):
        frames.pop()
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    # The error goes into the task record, the job's status and its Events: never the
    # worker's own keys, even if user code put its environment into a message.
    return scrub(f"{type(exc).__name__}: {exc}{where}", own_secrets(os.environ))
