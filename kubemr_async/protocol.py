"""The task state machine as pure code: every transition is a conditional JSON Patch.

No I/O happens here. A worker reads records from a StateStore, asks this module what to
write, and sends the returned :class:`Update`; the store applies it only if its ``test``
operations still hold, so two workers racing for one task cannot both win.

Layout (why it scales): the job has one small record (``job``) and every task has its own
record (``map-00042``, ``reduce-00003``). A claim, a lease renewal or a commit rewrites only
the task's own record, whose size depends neither on the number of tasks nor on the number
of reducers (a key/value map commits the key of its one shuffle object, not a key per
partition), so the cost per write stays flat as jobs grow (the original kubemr rewrote one
ever-growing object per claim, which is why its author abandoned the design).

Task lifecycle::

    pending --claim--> running --commit--> committed
       ^                  |  \\--fail (failures == maxAttempts)--> failed
       |--fail/release----/                                         ^
       |--lease expired (counted as a failure)                      |
       |                                                            |
       \\----reopen----- committed map -----reopen (failures == maxAttempts)
            (a reduce found the run it wrote corrupt; counted as a failure)

    running --backup--> running + twin --commit (either attempt)--> committed (twin cleared;
       ^                   |  |                                   the other attempt's history
       |                   |  |                                   entry ends as ``backup``)
       |                   |  \\--lease expired (neither attempt renewed): a takeover, as
       |                   |      above, clears the twin (both entries end as ``leaseLost``)
       \\---- one left -----/--fail/release by one attempt: only that one stops (holder
                                slot emptied, or twin cleared; only its entry ends); a fail
                                at maxAttempts, or a permanent one, fails the task (and
                                ends the other attempt's entry as ``backup``)

A backup (speculative) attempt of a straggling task (:func:`backup`, chosen by
:meth:`JobView.backup_candidate`) takes the holder slot (``worker``/``attempt``, with a
fresh attempt number) and moves the original into ``twin``. Both run and renew; the first
commit wins and clears the twin, so the other attempt's writes fail its guards and its
output keys (attempt-unique) are never read. ``backups`` counts the launches and
``backupWon`` says, on a committed task, whether the backup's commit was the one.

Every transition that starts or ends an attempt also rewrites the task's ``history``
(:func:`_history`): the latest attempts with their worker, start and end times and
outcome, bounded in bytes beside the counters and skip sample, so the record stays small
and a write's cost flat. Renewals, the most frequent write, leave it alone. A claim and a
backup each open their attempt's entry; an end closes the entry of the attempt that ended,
found by its number (of a backup pair, the one that wrote, holder or twin); a commit, or a
failure that fails the task, also closes the other attempt of the pair as ``backup``
(ended by its twin), and a takeover closes both as ``leaseLost``.

``attempt`` counts claims and backups and names attempt-unique output keys, so a zombie
that lost its lease writes to keys nobody will read; ``failures`` counts failed attempts
(including lost leases and committed map attempts whose run turned out corrupt) against
``maxAttempts``.
Every write bumps ``seq``, and every guarded write tests it, which makes each update a
compare-and-swap on the whole record. That bump is also what a lease is judged by: a
running task may be taken over once an observer has seen its ``seq`` stay the same for
``leaseSeconds`` on its own monotonic clock (:meth:`JobView.lease_lapsed`), so no
machine's wall clock is compared with another's.

Shards (why a worker need not follow every task): each write of a task record is sent by
the API server to every watcher of that record, so if every worker watched every task, the
cost of one task would grow with the number of workers. A job's tasks are therefore dealt
into ``shards`` (:func:`shard_of`, a hash of the key; the job record says how many,
:func:`shard_count`), and a worker follows one shard live and learns about the others by
asking for the unfinished tasks now and then (:meth:`JobView.settle`). Nothing here depends
on who watches what for safety: every write is guarded by the record's ``seq``, so a claim
or takeover decided on a stale view of another shard loses its race and changes nothing.
"""

from __future__ import annotations

import heapq
import json
import random
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from math import inf
from typing import cast

from .counters import total
from .records import (
    Attempt,
    Body,
    Counters,
    JobError,
    JobRecord,
    JobStatus,
    MoreSplit,
    PatchOp,
    Skipped,
    TaskOutputs,
    TaskRecord,
)
from .skips import job_sample
from .spec import JobSpec, JobSpecDict

JOB_KEY = "job"
#: A key/value map's ``outputs``: the key of its one shuffle object (``shuffle``) and that
#: object's size in bytes (``size``, a decimal string: with R, a reducer finds its index
#: entry from the end, see ``shuffle.entry_range``), and the type of the keys the map
#: emitted (``keyType``). A map that emitted nothing commits ``{}``. Keys of two types
#: have no common order, so a map checks its type against the committed maps before
#: committing, and a reduce checks all of them (two maps may commit at one instant).
#: A low-level (JobWorker) map's outputs are its own ``{partition: string}``.
SHUFFLE = "shuffle"
#: One input split a map reads: its input (URL or string) and its byte range
#: ``(start, end)``, or None for the whole input.
Split = tuple[str, tuple[int, int] | None]
SHUFFLE_SIZE = "size"
KEY_TYPE = "keyType"


class TaskState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMMITTED = "committed"
    FAILED = "failed"


class TaskKind(StrEnum):
    MAP = "map"
    REDUCE = "reduce"


class JobPhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobPhase.SUCCEEDED, JobPhase.FAILED, JobPhase.CANCELLED)


class AttemptOutcome(StrEnum):
    """How an attempt ended, as its history entry says."""

    COMMITTED = "committed"
    FAILED = "failed"
    #: Taken over by another worker once its lease lapsed (ended on the claimant's clock).
    LEASE_LOST = "leaseLost"
    #: Given back without counting a failure (shutdown; a reduce that found a corrupt run).
    RELEASED = "released"
    #: One attempt of a backup pair (:func:`backup`: the original or its backup) stopped
    #: by the other: its twin committed first (ended on the committer's clock), or, rarely,
    #: failed the task (a permanent error, or the last allowed failure). Not a failure.
    BACKUP = "backup"


#: JSON bytes a task record may spend on its counters, its skip sample and its history
#: together: the history gets what the other two leave (oldest attempts dropped first), so
#: a task with the most counters and skips there can be still stays under 2 KB on the
#: cluster (tests/test_kube_store.py), while a usual task keeps every attempt.
EXTRA_BYTES = 800
#: Attempts a history keeps at most, whatever room is left (a task released over and over
#: by shutdowns, or retried by `kubemr retry`, has more attempts than ``maxAttempts``).
MAX_HISTORY = 8


@dataclass(frozen=True)
class Update:
    """A conditional write: apply ``ops`` (JSON Patch) to record ``key`` if its tests hold."""

    key: str
    ops: tuple[PatchOp, ...]


def shuffle_outputs(key: str | None, size: int, key_type: str | None) -> dict[str, str]:
    """A key/value map's ``outputs``: its one shuffle object, whatever the reducers."""
    outputs = {} if key is None else {SHUFFLE: key, SHUFFLE_SIZE: str(size)}
    if key_type is not None:
        outputs[KEY_TYPE] = key_type
    return outputs


def map_key(index: int, step: int = 0) -> str:
    return f"{_step_tag(step)}map-{index:05d}"


def reduce_key(partition: int, step: int = 0) -> str:
    return f"{_step_tag(step)}reduce-{partition:05d}"


def _step_tag(step: int) -> str:
    """``s2-`` for step 2 (0-based 1) of a multi-step job: its tasks' keys never meet an
    earlier step's. Step 1's tasks keep the single-step names."""
    return f"s{step + 1}-" if step else ""


def task_step(body: TaskRecord) -> int:
    """The step (0-based) a task belongs to; records without one are step 0's."""
    return int(body.get("step", 0))


def task_name(body: TaskRecord) -> str:
    key = map_key if body["kind"] == TaskKind.MAP else reduce_key
    return key(body["index"], task_step(body))


def job_step(job: JobRecord) -> int:
    """The job's current step (0-based): ``status.step``, else its spec's (a one-step
    record set of `kubemr run`, or a job whose status is not initialised yet)."""
    return int(job.get("step", job["spec"].get("step", 0)))


def step_reducers(spec: JobSpecDict, step: int) -> int:
    """Step ``step``'s reducer count, as :meth:`JobSpec.at_step` gives it."""
    counts = spec.get("stepReducers")
    return int(counts[step]) if counts else int(spec["reducers"])


def step_prefix(prefix: str, spec: JobSpec) -> str:
    """Where step ``spec.step``'s shuffle objects and parts live under a job's blob
    prefix: the prefix itself for a single-step job, ``<prefix>/s<N>`` for step N of
    several (so one step's clean-up is one ``delete_prefix`` that spares the others)."""
    return prefix if spec.steps == 1 else f"{prefix}/s{spec.step + 1}"


# --- initial records ----------------------------------------------------------------


def new_status() -> JobStatus:
    """The job record's state before anything happened (also a MapReduceJob's empty status)."""
    return {"phase": JobPhase.PENDING.value, "maps": 0, "results": [], "error": None, "seq": 0}


def new_job(spec: JobSpec, *, every_step: bool = False, shards: int = 1) -> JobRecord:
    """The job record; it stays Pending until every task record exists.

    ``every_step``: the record set will hold every step of a multi-step job (a
    MapReduceJob), so the record gets ``step`` (the spec's, where it starts) for
    :func:`advance` to test and move. Without it a multi-step spec's record set is the one
    step its spec names (`kubemr run` runs each step as a record set of its own), whose
    verdict is its own. ``shards``: how many shards its tasks are dealt into (see the
    module's docstring; absent means one).
    """
    record = JobRecord(spec=spec.to_dict(cluster=False), **new_status())
    if every_step and spec.steps > 1:
        record["step"] = spec.step
    if shards > 1:
        record["shards"] = shards
    return record


#: Workers that follow each shard live. Each write of a task is delivered to the watchers
#: of its shard, so this bounds what one write costs the API server whatever the number of
#: workers; four is where a job ran before shards existed (4 workers, one shard), and
#: enough that a shard's pending tasks are seen at once by some worker that is free.
WATCHERS_PER_SHARD = 4


def shard_count(workers: int) -> int:
    """How many shards a job run by ``workers`` workers deals its tasks into."""
    return max(1, workers // WATCHERS_PER_SHARD)


def shard_of(key: str, shards: int) -> int:
    """The shard of the record ``key``: a stable hash, so every process agrees."""
    return zlib.crc32(key.encode()) % shards if shards > 1 else 0


def worker_shard(worker: str, ordinal: int | None, shards: int) -> int:
    """The shard a worker follows: its ordinal's (a pod's index in its Indexed Job, so
    every shard gets the same number of workers), or else a hash of its id."""
    if shards <= 1:
        return 0
    return ordinal % shards if ordinal is not None else shard_of(worker, shards)


def own_lane(ordinal: int | None, shards: int) -> Callable[[str], bool] | None:
    """Which of its shard's pending tasks a worker offers first (its lane), or None.

    A shard's WATCHERS_PER_SHARD workers (ordinals dealt round-robin, see worker_shard:
    ``ordinal // shards`` is a worker's place in its shard) would otherwise pick among the
    same pending tasks at random, and while their watches lag (at a job's start, every
    worker reading and claiming at once) pick the same ones: measured, 87% of a 64-worker
    job's lost races came in its first tenth. Each task of a shard is in one lane (a
    stable hash); a worker offers its own lane's first. Only a preference: a lane whose
    worker is gone or slow is still taken by the others. A worker without an ordinal, of
    an unsharded job, or beyond its shard's WATCHERS_PER_SHARD has none."""
    if ordinal is None or shards <= 1 or ordinal // shards >= WATCHERS_PER_SHARD:
        return None
    lane = ordinal // shards
    return lambda key: (zlib.crc32(key.encode()) // shards) % WATCHERS_PER_SHARD == lane


def job_shards(job: JobRecord) -> int:
    """How many shards the job's tasks are dealt into (1: one, every worker sees all)."""
    return int(job.get("shards", 1))


def new_task(kind: TaskKind, index: int, task_input: str | None = None,
             byte_range: tuple[int, int] | None = None, step: int = 0,
             more: Iterable[Split] = ()) -> TaskRecord:
    """A pending task's record; a batched map's splits after the first go in ``more``."""
    record: TaskRecord = {
        "kind": kind.value,
        "index": index,
        "input": task_input,
        "range": list(byte_range) if byte_range else None,
        "state": TaskState.PENDING.value,
        "attempt": 0,
        "failures": 0,
        "worker": "",
        "leaseExpires": 0.0,
        "outputs": None,
        "error": "",
        "seq": 0,
    }
    if step:
        record["step"] = step
    rest = [_more_split(split) for split in more]
    if rest:
        record["moreSplits"] = rest
    return record


def _more_split(split: Split) -> MoreSplit:
    task_input, byte_range = split
    entry = MoreSplit(input=task_input)
    if byte_range is not None:
        entry["range"] = list(byte_range)
    return entry


def _split(task_input: str | None, byte_range: list[int] | None) -> Split:
    return task_input or "", None if byte_range is None else (int(byte_range[0]),
                                                               int(byte_range[1]))


def task_splits(body: TaskRecord) -> list[Split]:
    """A map record's splits in planning order: its own ``input``/``range`` first, then
    a batched map's ``moreSplits`` (the one place each split is written)."""
    return [_split(body["input"], body["range"]),
            *(_split(more["input"], more.get("range")) for more in body.get("moreSplits", ()))]


def split_count(body: TaskRecord) -> int:
    """How many splits a map record holds (1 unless batched)."""
    return 1 + len(body.get("moreSplits", ()))


def inputs_label(body: TaskRecord) -> str:
    """A map's inputs for people: its first input, and how many more splits a batched
    map holds (``in/f001.txt and 7 more``); "" for a reduce."""
    if body["kind"] != TaskKind.MAP:
        return ""
    more = split_count(body) - 1
    return (body["input"] or "") + (f" and {more} more" if more else "")


def start_job(job: JobRecord, map_count: int) -> Update:
    """Pending -> Running, once the planner has written every task record."""
    return Update(JOB_KEY, (
        _test("phase", JobPhase.PENDING.value),
        *_write(job, phase=JobPhase.RUNNING.value, maps=map_count),
    ))


def advance(job: JobRecord, map_count: int) -> Update:
    """A multi-step job moves on from its current step, once the next step's task records
    (``map_count`` maps) exist: workers then claim only those.

    The ``test`` on the old step (and on ``seq``, like every write) makes it happen once:
    two reconciles that both saw the step done cannot both move it, and a retry of one
    that already won is refused.
    """
    step = job_step(job)
    steps = int(job["spec"].get("steps", 1)) if "step" in job else 1
    if step + 1 >= steps:
        raise ValueError(f"step {step + 1} is the job's last (of {steps}); nothing to advance to")
    return Update(JOB_KEY, (_test("phase", JobPhase.RUNNING.value), _test("step", step),
                            *_write(job, step=step + 1, maps=map_count)))


# --- guarded task transitions -------------------------------------------------------


def _test(field: str, value: object) -> PatchOp:
    return {"op": "test", "path": f"/{field}", "value": value}


def _write(body: JobRecord | TaskRecord, **fields: object) -> list[PatchOp]:
    """Replace ``fields`` and bump ``seq``, guarded by a test of the seq we read."""
    ops: list[PatchOp] = [_test("seq", body["seq"])]
    ops += [{"op": "replace", "path": f"/{name}", "value": value} for name, value in fields.items()]
    ops.append({"op": "replace", "path": "/seq", "value": body["seq"] + 1})
    return ops


def millis(now: float) -> int:
    """A history time: Unix milliseconds, an integer (its JSON size is the same for
    centuries)."""
    return round(now * 1000)


def _json_bytes(value: object) -> int:
    return len(json.dumps(value, separators=(",", ":"))) if value else 0


def _ended(body: TaskRecord, now: float, outcomes: Mapping[int, AttemptOutcome]
           ) -> list[Attempt]:
    """The history with the open entry of each attempt in ``outcomes`` (by number) closed
    at ``now`` (the writer's clock) with its outcome. By number, not "the last entry": of
    a backup pair the original's entry comes before the backup's, and either may end
    first. A record written before histories existed has no entry to close."""
    history = list(body.get("history") or [])
    for i, entry in enumerate(history):
        outcome = outcomes.get(entry["attempt"])
        if outcome is not None and "outcome" not in entry:
            history[i] = Attempt(**entry, end=millis(now), outcome=outcome.value)
    return history


def _running_attempts(body: TaskRecord) -> dict[int, str]:
    """A running task's attempts that still run, number to worker: the holder slot's
    (unless emptied, ``worker`` "") and the twin's."""
    running = {body["attempt"]: body["worker"]} if body["worker"] else {}
    twin = body.get("twin")
    if twin:
        running[twin["attempt"]] = twin["worker"]
    return running


def running_attempt(body: TaskRecord, worker: str) -> int | None:
    """The number of ``worker``'s attempt that still runs in ``body`` (in the holder slot
    or as the twin), or None: which attempt a dead worker's failure ends."""
    if body["state"] != TaskState.RUNNING:
        return None
    return next((number for number, holder in _running_attempts(body).items()
                 if holder == worker), None)


def _own_attempt(body: TaskRecord, worker: str) -> int:
    """The number of ``worker``'s attempt in ``body``: the twin's when ``worker`` is the
    twin of a backed-up task (a backup never runs where its original does), else the
    holder slot's."""
    twin = body.get("twin")
    if body["worker"] != worker and twin and twin["worker"] == worker:
        return int(twin["attempt"])
    return int(body["attempt"])


def _ends(body: TaskRecord, worker: str, outcome: AttemptOutcome, *,
          others: bool) -> dict[int, AttemptOutcome]:
    """The history entries a write by ``worker``'s attempt closes: its own with
    ``outcome`` and, when ``others`` (the write ends the task: a commit, or a failure
    that fails it), the other attempt of a backup pair as ``backup``."""
    own = _own_attempt(body, worker)
    ends = {number: AttemptOutcome.BACKUP for number in _running_attempts(body)} if others else {}
    ends[own] = outcome
    return ends


#: A backed-up task's own fields (:func:`backup`).
_BACKUP_FIELDS = ("twin", "backups", "backupAttempt", "backupWon")


def _speculation(body: TaskRecord, **after: object) -> dict[str, object]:
    """A backed-up task's fields (``_BACKUP_FIELDS``) as they stand after a write that
    sets ``after`` (other names ignored); empty for a task never backed up. They take
    their bytes from the history's room, so a record with a backup pair stays as small
    as one without."""
    record = cast(Mapping[str, object], body)
    fields = {name: record[name] for name in _BACKUP_FIELDS if name in record}
    if "backups" not in fields and "backups" not in after:
        return {}
    return {**fields, **{name: value for name, value in after.items()
                         if name in _BACKUP_FIELDS}}


def _history(history: list[Attempt], counters: Counters | None,
             skipped: list[Skipped] | None, speculation: dict[str, object]) -> PatchOp:
    """``add /history`` (added or replaced) with the latest entries that fit in what
    ``counters``, ``skipped`` and the backup fields (``speculation``; all the record's,
    after this write) leave of EXTRA_BYTES."""
    room = (EXTRA_BYTES - _json_bytes(counters) - _json_bytes(skipped)
            - _json_bytes(speculation))
    kept = history[-MAX_HISTORY:]
    while kept and _json_bytes(kept) > room:
        kept = kept[1:]
    return {"op": "add", "path": "/history", "value": kept}


def _held_by(body: TaskRecord, worker: str) -> list[PatchOp]:
    """Tests that the caller still holds the attempt it thinks it holds (the seed's lock):
    the holder slot's, or the twin's when ``body`` names ``worker`` there (a running
    original whose task got a backup)."""
    attempt = _own_attempt(body, worker)
    if attempt != body["attempt"]:
        return [_test("twin/worker", worker), _test("twin/attempt", attempt)]
    return [_test("worker", worker), _test("attempt", attempt)]


class Slot(StrEnum):
    """Which of a running task's two attempts a worker's is (see :func:`backup`)."""

    HOLDER = "holder"
    TWIN = "twin"


def slot(body: TaskRecord, worker: str, attempt: int) -> Slot | None:
    """Where attempt ``attempt`` of ``worker`` stands in ``body``: the holder slot, the
    twin, or None once it holds neither (taken over, or the other attempt committed)."""
    if body["state"] != TaskState.RUNNING:
        return None
    if body["worker"] == worker and body["attempt"] == attempt:
        return Slot.HOLDER
    twin = body.get("twin")
    if twin and twin["worker"] == worker and twin["attempt"] == attempt:
        return Slot.TWIN
    return None


def _no_twin(body: TaskRecord) -> list[PatchOp]:
    """Clear the twin, on a record that has the field (``add`` replaces it whether or not
    it is null); a record that never had a backup is left without it."""
    return [{"op": "add", "path": "/twin", "value": None}] if "twin" in body else []


def _drop_self(body: TaskRecord, worker: str) -> dict[str, object] | None:
    """The fields that end only the caller's attempt while the other one runs on (None
    when there is no other): the holder slot emptied (``worker`` ""), or the twin."""
    twin = body.get("twin")
    if not twin:
        return None
    if body["worker"] == worker:
        return {"worker": ""}
    return {"twin": None} if body["worker"] else None


def backup(body: TaskRecord, worker: str, now: float, lease_seconds: float) -> Update:
    """Start a backup attempt of a running task (speculative execution, MapReduce §3.6).

    The backup takes the holder slot with a fresh attempt number (so its output keys,
    and every later takeover's, are unique) and the original moves to ``twin``; the
    original learns it when its next guarded write fails, and carries on from the twin
    slot. Guarded by ``seq``: a renewal or commit that lands first makes it lose.
    ``now`` (the backup's wall clock) dates its lease and starts its own history entry,
    beside the original's, which stays open.
    """
    key = task_name(body)
    if body["state"] != TaskState.RUNNING or body.get("twin") or not body["worker"]:
        raise ValueError(f"task {key} is not a running task without a backup")
    if body["worker"] == worker:
        raise ValueError(f"task {key} is {worker}'s own: a backup runs elsewhere")
    attempt = body["attempt"] + 1
    history = [*(body.get("history") or []),
               Attempt(attempt=attempt, worker=worker, start=millis(now))]
    fields: dict[str, object] = {
        "twin": {"worker": body["worker"], "attempt": body["attempt"]},
        "backups": body.get("backups", 0) + 1, "backupAttempt": attempt}
    return Update(key, (
        *_write(body, worker=worker, attempt=attempt, leaseExpires=now + lease_seconds),
        *(PatchOp(op="add", path=f"/{name}", value=value) for name, value in fields.items()),
        _history(history, body.get("counters"), body.get("skipped"),
                 _speculation(body, **fields)),
    ))


def lease_expired(body: TaskRecord, now: float) -> bool:
    """The holder's own verdict: ``leaseExpires`` (its wall clock) is before ``now``.

    Only for a reader that has watched nothing (a snapshot in a test or a tool): a worker
    judges by its own observation instead (:meth:`JobView.lease_lapsed`), because two
    machines' wall clocks may disagree by more than a lease.
    """
    return body["state"] == TaskState.RUNNING and float(body["leaseExpires"]) < now


def claim(body: TaskRecord, worker: str, now: float, lease_seconds: float,
          max_attempts: int, *, lapsed: bool | None = None) -> Update:
    """Claim a pending task, or take over one whose holder stopped renewing its lease.

    ``now`` (the claimant's wall clock) only dates the new lease for people reading the
    record. Whether a running task may be taken over is ``lapsed``, the claimant's own
    observation (:meth:`JobView.lease_lapsed`); None falls back to the record's
    ``leaseExpires`` against ``now``. Either way the write is guarded by the ``seq`` that
    was read, so a renewal that lands first makes the takeover lose.

    Taking over counts the lost attempt as a failure (its history entry ends at ``now``
    as ``leaseLost``; of a backup pair, whose lease lapses only when neither renews, both
    entries end so and one failure is counted); if that was the last allowed one the
    update fails the task instead of claiming it.
    """
    key = task_name(body)
    history = list(body.get("history") or [])
    kept = body.get("counters"), body.get("skipped"), _speculation(body, twin=None)
    if body["state"] == TaskState.RUNNING:
        if not (lease_expired(body, now) if lapsed is None else lapsed):
            raise ValueError(f"task {key} is held by {body['worker']} until its lease expires")
        running = _running_attempts(body)
        reason = "lease expired: " + " and ".join(
            f"worker {holder} stopped renewing during attempt {number}"
            for number, holder in sorted(running.items()))
        failures = body["failures"] + 1
        history = _ended(body, now, dict.fromkeys(running, AttemptOutcome.LEASE_LOST))
        if failures >= max_attempts:
            return Update(key, (*_write(body, state=TaskState.FAILED.value, failures=failures,
                                        worker="", error=reason),
                              _history(history, *kept), *_no_twin(body)))
        extra: dict[str, object] = {"failures": failures, "error": reason}
    elif body["state"] == TaskState.PENDING:
        extra = {}
    else:
        raise ValueError(f"task {key} is {body['state']}, not claimable")
    attempt = body["attempt"] + 1
    history.append(Attempt(attempt=attempt, worker=worker, start=millis(now)))
    return Update(key, (*_write(
        body, state=TaskState.RUNNING.value, worker=worker, attempt=attempt,
        leaseExpires=now + lease_seconds, **extra,
    ), _history(history, *kept), *_no_twin(body)))


def renew(body: TaskRecord, worker: str, now: float, lease_seconds: float) -> Update:
    """Extend the holder's lease; fails (lost race) if the task was taken over meanwhile."""
    return Update(task_name(body), (*_held_by(body, worker),
                                    *_write(body, leaseExpires=now + lease_seconds)))


def commit(body: TaskRecord, worker: str, outputs: TaskOutputs,
           counters: Counters | None = None, skipped: list[Skipped] | None = None, *,
           now: float) -> Update:
    """Publish the attempt's outputs and counters; only the current holder's commit can
    succeed, so only the attempt that wins it counts (a zombie's or a failed attempt's
    increments are never written). ``add`` sets ``/counters`` whether or not the record has
    them yet (a map that re-runs after a re-open replaces its earlier attempt's).
    ``skipped`` (skip mode only; None leaves the record without it): the sample of the
    records the attempt skipped, counted only with its commit, too. ``now``: the holder's
    clock, when its history entry ends (and the other attempt's of a backup pair, as
    ``backup``: it lost to this one). Either attempt of a pair may commit: the first wins."""
    ops: list[PatchOp] = [{"op": "add", "path": "/counters", "value": counters or {}}]
    if skipped is not None:
        ops.append({"op": "add", "path": "/skipped", "value": skipped})
    ends = _ends(body, worker, AttemptOutcome.COMMITTED, others=True)
    ops.append(_history(_ended(body, now, ends), counters,
                        body.get("skipped") if skipped is None else skipped,
                        _speculation(body, twin=None, backupWon=False)))
    return Update(task_name(body), (*_held_by(body, worker), *_write(
        body, state=TaskState.COMMITTED.value, outputs=outputs, leaseExpires=0.0),
        *ops, *_winner(body, worker), *_no_twin(body)))


def _winner(body: TaskRecord, worker: str) -> list[PatchOp]:
    """A commit's ops for a task that had a backup: ``backupWon`` (the backup's commit is
    the one), and ``worker`` naming the committer when that is the twin (``attempt``
    stays the highest, so attempt numbers never repeat)."""
    if "backups" not in body:
        return []
    if _own_attempt(body, worker) != body["attempt"]:
        return [{"op": "replace", "path": "/worker", "value": worker},
                {"op": "add", "path": "/backupWon", "value": False}]
    won = body.get("backupAttempt") == body["attempt"]
    return [{"op": "add", "path": "/backupWon", "value": won}]


def fail(body: TaskRecord, worker: str, error: str, max_attempts: int,
         permanent: bool = False, *, now: float) -> Update:
    """Record a failed attempt: back to pending for a retry, or failed for good. While
    the task's other attempt (a backup, or the original it backs up) runs on, a failure
    below ``maxAttempts`` drops only the caller's attempt. ``now``: the writer's clock,
    when the attempt's history entry ends (and, when this failure fails the task, the
    other attempt's, as ``backup``: it is stopped by its twin)."""
    failures = body["failures"] + 1
    final = permanent or failures >= max_attempts
    state = TaskState.FAILED if final else TaskState.PENDING
    alone = None if final else _drop_self(body, worker)
    history = _history(_ended(body, now, _ends(body, worker, AttemptOutcome.FAILED,
                                               others=alone is None)),
                       body.get("counters"), body.get("skipped"),
                       _speculation(body, **(alone or {"twin": None})))
    if alone is not None:  # the task's other attempt runs on
        return Update(task_name(body), (*_held_by(body, worker), *_write(
            body, failures=failures, error=error, **alone), history))
    return Update(task_name(body), (*_held_by(body, worker), *_write(
        body, state=state.value, failures=failures, worker="", leaseExpires=0.0, error=error),
        history, *_no_twin(body)))


def release(body: TaskRecord, worker: str, *, now: float) -> Update:
    """Give a claim back without counting a failure (graceful shutdown, SIGTERM); while
    the task's other attempt runs on, only the caller's attempt is dropped. ``now``: the
    holder's clock, when the attempt's history entry ends."""
    alone = _drop_self(body, worker)
    history = _history(_ended(body, now, _ends(body, worker, AttemptOutcome.RELEASED,
                                               others=False)),
                       body.get("counters"), body.get("skipped"),
                       _speculation(body, **(alone or {"twin": None})))
    if alone is not None:  # the task's other attempt runs on
        return Update(task_name(body), (*_held_by(body, worker), *_write(body, **alone),
                                        history))
    return Update(task_name(body), (*_held_by(body, worker), *_write(
        body, state=TaskState.PENDING.value, worker="", leaseExpires=0.0), history,
        *_no_twin(body)))


def reopen(body: TaskRecord, error: str, max_attempts: int) -> Update:
    """Put a committed map whose run a reduce found corrupt back to pending, outputs cleared.

    Reading a damaged run again cannot help; only the map can write a good one (a new
    attempt, so new keys). The damaged attempt counts as a failure, so a map whose runs keep
    arriving corrupt fails (and with it the job, naming the map) instead of looping. The
    guard is the map's seq and the outputs the reduce read: of several reduces that find
    the same run corrupt only the first re-opens the map, and never after it has re-run.
    """
    key = task_name(body)
    if body["kind"] != TaskKind.MAP or body["state"] != TaskState.COMMITTED:
        raise ValueError(f"only a committed map can be re-opened, not {body['state']} {key}")
    failures = body["failures"] + 1
    state = TaskState.FAILED if failures >= max_attempts else TaskState.PENDING
    return Update(key, (_test("outputs", body["outputs"]), *_write(
        body, state=state.value, failures=failures, outputs=None, error=error)))


# --- reading a whole job ------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    maps_done: int
    maps_total: int
    reduces_done: int
    reduces_total: int
    running: int
    failed: int
    #: Backup attempts launched, and how many of them committed first (the whole job's).
    backups: int = 0
    backups_won: int = 0


class _Sample:
    """A set of keys with O(1) add, remove and random sampling (the claim loop's pick)."""

    def __init__(self) -> None:
        self._keys: list[str] = []
        self._where: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._keys))

    def add(self, key: str) -> None:
        if key not in self._where:
            self._where[key] = len(self._keys)
            self._keys.append(key)

    def discard(self, key: str) -> None:
        where = self._where.pop(key, None)
        if where is not None:
            last = self._keys.pop()
            if where < len(self._keys):
                self._keys[where] = last
                self._where[last] = where

    def sample(self, count: int, rng: random.Random) -> list[str]:
        return rng.sample(self._keys, min(count, len(self._keys)))


#: The backup rule (:meth:`JobView.backup_candidate`): a running task is a straggler once
#: it has run BACKUP_FACTOR times the median of its stage's committed tasks (Spark's
#: ``spark.speculation.multiplier``; a task twice as slow as usual is what one slow node
#: makes), and never before BACKUP_FLOOR seconds, because a backup of a short task costs
#: a claim, a start and a second read of its input for little gain. Judged only once
#: BACKUP_MIN_COMMITTED tasks of the stage committed: a median of fewer says little.
BACKUP_FACTOR = 1.5
BACKUP_FLOOR = 1.0
BACKUP_MIN_COMMITTED = 3


class _Median:
    """The running median of durations: two heaps, O(log n) per add, O(1) per read."""

    def __init__(self) -> None:
        self._low: list[float] = []  # the smaller half, negated (a max-heap)
        self._high: list[float] = []
        self.count = 0

    def add(self, value: float) -> None:
        heapq.heappush(self._low, -value)
        heapq.heappush(self._high, -heapq.heappop(self._low))
        if len(self._high) > len(self._low):
            heapq.heappush(self._low, -heapq.heappop(self._high))
        self.count += 1

    def value(self) -> float:
        if len(self._low) > len(self._high):
            return -self._low[0]
        return (-self._low[0] + self._high[0]) / 2


class JobView:
    """A job's records, indexed so that each change costs O(1), whatever the job's size.

    A worker's watch cache, the operator's progress follower and `kubemr run`'s progress bar
    all feed every change through :meth:`update`; counts, claim candidates and the verdict
    are then read without scanning all tasks (a 10,000-task job sees ~20,000 changes).

    ``followed``: which records the observer follows live (a watch that delivers every
    change), when it does not follow them all: a worker follows its shard and polls the
    rest (see the module's docstring). A record it only polls is offered for claiming after
    the ones it follows, its lease is judged only up to the last poll that showed it, and a
    poll that no longer lists it as unfinished settles it (:meth:`settle`).
    """

    def __init__(self, records: Mapping[str, Body] | None = None,
                 seen: float | None = None, *,
                 followed: Callable[[str], bool] | None = None,
                 own: Callable[[str], bool] | None = None) -> None:
        self.records: dict[str, Body] = {}
        self.tasks: dict[str, TaskRecord] = {}
        self.job: JobRecord | None = None
        self._followed = followed
        self._own = own  # the observer's lane (own_lane): its tasks are offered first
        # For each record polled, not followed: when a poll last showed it.
        self._polled: dict[str, float] = {}
        #: Tasks a poll showed committed that this observer has not read since: counted as
        #: committed, but their outputs are unknown until it reads them (:meth:`settle`).
        self.unread: set[str] = set()
        # Every index is per step (a multi-step job's records of all its steps share one
        # view); the questions below are about the current step only. Pending tasks are
        # kept apart by whether this observer follows them (it offers those first).
        self._counts: Counter[tuple[int, str, str]] = Counter()
        self._pending: dict[tuple[int, str, bool], _Sample] = {}
        # The followed pending tasks of the observer's own lane (own_lane), by step and kind.
        self._own_pending: dict[tuple[int, str], _Sample] = {}
        self._running: dict[str, TaskRecord] = {}
        # When this observer saw each running task's record change (see lease_lapsed).
        self._seen: dict[str, float | None] = {}
        # Committed maps by step and the type of their keys (a clash is two non-empty
        # entries of one step).
        self._key_types: dict[tuple[int, str], set[str]] = {}
        # The backup rule's inputs: when this observer first saw each running task run
        # (kept across a backup or a takeover: it is the task that is slow), and the
        # durations of the committed tasks it saw run, by step and kind.
        self._started: dict[str, float] = {}
        self._durations: dict[tuple[int, str], _Median] = {}
        # Running tasks not heard of since this observer's outage (restart_observation).
        self._unheard: set[str] = set()
        self._backups = self._backups_won = 0
        for key, body in (records or {}).items():
            self.update(key, body, seen)

    def update(self, key: str, body: Body, seen: float | None = None) -> None:
        """Take in the latest body of one record (the key tells a job record from a task's).

        ``seen``: when the caller received it, on the caller's own monotonic clock. A
        running task's lease lapses ``leaseSeconds`` after the last change seen (a new
        ``seq``; a re-delivery of the same one does not restart it). Without ``seen`` the
        holder's ``leaseExpires`` is trusted instead.
        """
        if key == JOB_KEY:
            self.job = self.records[key] = cast(JobRecord, body)
            return
        followed = self.follows(key)
        if not followed and seen is not None:
            self._polled[key] = seen
        self.unread.discard(key)
        old = self.tasks.get(key)
        if old is not None:
            old_step = task_step(old)
            self._counts[(old_step, old["kind"], old["state"])] -= 1
            self._pending_of(old_step, old["kind"], followed).discard(key)
            if self._own is not None:
                self._own_of(old_step, old["kind"]).discard(key)
            self._running.pop(key, None)
            if old["seq"] == body["seq"] and key in self._seen:
                seen = self._seen[key]
            self._seen.pop(key, None)
            old_type = _key_type(old)
            if old_type is not None:
                self._key_types[(old_step, old_type)].discard(key)
        body = cast(TaskRecord, body)
        self._time(key, old, body, seen)
        step = task_step(body)
        self.records[key] = self.tasks[key] = body
        new_type = _key_type(body)
        if new_type is not None:
            self._key_types.setdefault((step, new_type), set()).add(key)
        self._counts[(step, body["kind"], body["state"])] += 1
        if body["state"] == TaskState.PENDING:
            self._pending_of(step, body["kind"], followed).add(key)
            if followed and self._own is not None and self._own(key):
                self._own_of(step, body["kind"]).add(key)
        elif body["state"] == TaskState.RUNNING:
            self._running[key] = body
            self._seen[key] = seen

    def settle(self, unfinished: Iterable[str]) -> None:
        """Take in a poll of the job's unfinished tasks (their bodies already fed to
        :meth:`update`): every task this view holds as unfinished that the poll did not
        list, and that the observer does not follow, has committed since it was read.

        Such a task is counted as committed, so it is no longer offered and the stage can
        end, but its outputs are unknown: it stays in :attr:`unread` until its record is
        read, and nothing that needs outputs (results, shuffle objects, the verdict) is
        answered meanwhile. A task re-opened after the poll reads as committed here until
        the next poll; a write decided on that loses its race on ``seq``.
        """
        listed = set(unfinished)
        for key, body in list(self.tasks.items()):
            if (body["state"] != TaskState.COMMITTED and key not in listed
                    and not self.follows(key)):
                self._settled(key, body)
        if self.job is not None and not self.complete:
            # A view that read only its shard: the current step's other tasks, which the
            # job record names, were not listed as unfinished, so they have committed.
            step = self.step
            for kind, total, key_of in ((TaskKind.MAP, self.map_total, map_key),
                                        (TaskKind.REDUCE, self.reduce_total, reduce_key)):
                for index in range(total):
                    key = key_of(index, step)
                    if key not in self.tasks and key not in listed and not self.follows(key):
                        self._settled(key, new_task(kind, index, step=step))

    def _settled(self, key: str, body: TaskRecord) -> None:
        """Count ``key`` as committed, its outputs unread (``body``: what is known of it)."""
        self.update(key, cast(TaskRecord, {**body, "state": TaskState.COMMITTED.value}))
        self.unread.add(key)

    def needs_reading(self) -> bool:
        """Whether the current step's tasks have all finished but some are known only from
        a poll (:attr:`unread`): the verdict, or the step's results, waits for reading
        them."""
        if not self.unread or self.phase != JobPhase.RUNNING or not self.complete:
            return False
        return not any(self._counts[(self.step, kind.value, state.value)]
                       for kind in TaskKind for state in (TaskState.PENDING, TaskState.RUNNING))

    def stale(self, key: str) -> None:
        """A guarded write to ``key`` lost its race, so this copy is out of date.

        A task the observer follows is not offered again until its watch brings the
        version that won (:meth:`update` offers it again if that one is pending): workers
        that start together read their shard at once and claimed from copies their
        watches had not yet moved past, over and over (measured: one task lost 42 times,
        87% of a 64-worker job's lost races at its start). If the observer only polls
        ``key``, every pending task it knows from polls came from answers as old: none is
        offered until a poll shows it again."""
        body = self.tasks.get(key)
        if body is None:
            return
        if self.follows(key):
            self._pending_of(task_step(body), body["kind"]).discard(key)
            if self._own is not None:
                self._own_of(task_step(body), body["kind"]).discard(key)
            return
        self._polled.pop(key, None)
        for index in self._pending:
            if not index[2]:  # (step, kind, followed)
                self._pending[index] = _Sample()

    def _time(self, key: str, old: TaskRecord | None, body: TaskRecord,
              seen: float | None) -> None:
        """Keep the backup rule's start times, durations and the backup counts: O(log n)."""
        if old is not None:
            self._backups -= old.get("backups", 0)
            self._backups_won -= bool(old.get("backupWon"))
        self._backups += body.get("backups", 0)
        self._backups_won += bool(body.get("backupWon"))
        if old is None or old["seq"] != body["seq"]:  # news, not a re-listing
            self._unheard.discard(key)
        started = self._started.pop(key, None)
        if body["state"] == TaskState.RUNNING:
            ran = old is not None and old["state"] == TaskState.RUNNING
            start = started if ran and started is not None else seen
            if start is not None:
                self._started[key] = start
        elif body["state"] == TaskState.COMMITTED:
            if started is not None and seen is not None:
                ran_for: float | None = seen - started
            elif old is None or old["state"] != TaskState.COMMITTED:
                # Committed before this observer watched it (a worker that started late
                # reads the stage half done): the winning attempt's own duration, start
                # and end both on its worker's clock, so clock skew cancels out. Without
                # it a late starter never knows enough durations to back anything up.
                ran_for = _committed_seconds(body)
            else:
                ran_for = None
            if ran_for is not None:
                median = self._durations.setdefault((task_step(body), body["kind"]),
                                                    _Median())
                median.add(ran_for)

    def follows(self, key: str) -> bool:
        """Whether the observer follows record ``key`` live (else it only polls it)."""
        return self._followed is None or self._followed(key)

    def _pending_of(self, step: int, kind: str, followed: bool = True) -> _Sample:
        return self._pending.setdefault((step, kind, followed), _Sample())

    def _own_of(self, step: int, kind: str) -> _Sample:
        return self._own_pending.setdefault((step, kind), _Sample())

    def _count(self, kind: TaskKind, state: TaskState | None = None) -> int:
        if state is not None:
            return self._counts[(self.step, kind.value, state.value)]
        return sum(self._counts[(self.step, kind.value, s.value)] for s in TaskState)

    def _sorted(self, kind: TaskKind) -> list[TaskRecord]:
        step = self.step
        return sorted((b for b in self.tasks.values()
                       if b["kind"] == kind and task_step(b) == step), key=lambda t: t["index"])

    def every_task(self) -> list[TaskRecord]:
        """Every task of every step, by step, maps before reduces, in index order (a full
        scan: for whole-job questions such as a retry or the job's skipped records)."""
        return sorted(self.tasks.values(), key=lambda t: (task_step(t), t["kind"] != TaskKind.MAP,
                                                          t["index"]))

    @property
    def maps(self) -> list[TaskRecord]:
        """The current step's map records in index order (a full scan: for rare,
        step-wide questions)."""
        return self._sorted(TaskKind.MAP)

    @property
    def reduces(self) -> list[TaskRecord]:
        return self._sorted(TaskKind.REDUCE)

    @property
    def phase(self) -> JobPhase:
        return JobPhase(self.job["phase"]) if self.job else JobPhase.PENDING

    @property
    def step(self) -> int:
        """The current step (0-based; 0 for a single-step job)."""
        return job_step(self.job) if self.job else 0

    @property
    def last_step(self) -> bool:
        """Whether the current step is the last of the record set (its results are the
        job's): always, unless the records hold every step (see :func:`new_job`)."""
        return (self.job is None or "step" not in self.job
                or self.step + 1 >= int(self.job["spec"].get("steps", 1)))

    @property
    def map_total(self) -> int:
        return int(self.job["maps"]) if self.job else self._count(TaskKind.MAP)

    @property
    def reduce_total(self) -> int:
        if self.job is None:
            return self._count(TaskKind.REDUCE)
        return step_reducers(self.job["spec"], self.step)

    @property
    def complete(self) -> bool:
        """Every task record the job record promises has been seen."""
        if self.job is None or self.phase == JobPhase.PENDING:
            return False
        return (self._count(TaskKind.MAP) == self.map_total
                and self._count(TaskKind.REDUCE) == self.reduce_total)

    @property
    def maps_committed(self) -> bool:
        return self.complete and self._count(TaskKind.MAP, TaskState.COMMITTED) == self.map_total

    def progress(self) -> Progress:
        return Progress(
            maps_done=self._count(TaskKind.MAP, TaskState.COMMITTED),
            maps_total=self.map_total,
            reduces_done=self._count(TaskKind.REDUCE, TaskState.COMMITTED),
            reduces_total=self.reduce_total,
            running=len(self._running),
            failed=self._count(TaskKind.MAP, TaskState.FAILED)
            + self._count(TaskKind.REDUCE, TaskState.FAILED),
            backups=self._backups,
            backups_won=self._backups_won,
        )

    def _stage(self) -> TaskKind | None:
        """The kind of task claimable now. A map known unfinished means the maps' stage
        even in a view that has not seen every task (a worker that read only its shard);
        the reduces' stage needs every map seen committed."""
        if self.phase != JobPhase.RUNNING:
            return None
        if any(self._counts[(self.step, TaskKind.MAP.value, state.value)]
               for state in (TaskState.PENDING, TaskState.RUNNING)):
            return TaskKind.MAP
        if not self.complete:
            return None
        return TaskKind.REDUCE if self.maps_committed else TaskKind.MAP

    def claimable(self, now: float) -> list[TaskRecord]:
        """Every task a worker may claim now: maps first, reduces once all maps committed."""
        stage = self._stage()
        if stage is None:
            return []
        expired = self._expired(stage, now)
        pending = [self.tasks[k] for followed in (True, False)
                   for k in self._pending_of(self.step, stage.value, followed)]
        return sorted([*pending, *expired], key=lambda t: t["index"])

    def candidates(self, now: float, count: int, rng: random.Random) -> list[TaskRecord]:
        """Up to ``count`` claimable tasks picked at random, so racing workers spread out.

        Taking over expired leases comes first: those tasks have waited longest. Then the
        pending tasks the observer follows, those of its own lane first (see own_lane),
        and only when there are none, polled ones (others' shards: their own workers are
        likelier to win them).
        """
        stage = self._stage()
        if stage is None:
            return []
        expired = self._expired(stage, now)
        rng.shuffle(expired)
        keys = (self._own_of(self.step, stage.value).sample(count, rng)
                if self._own is not None else [])
        if not keys:
            keys = self._pending_of(self.step, stage.value).sample(count, rng)
        if not keys:
            keys = self._pending_of(self.step, stage.value, False).sample(count, rng)
        picked = [self.tasks[k] for k in keys]
        return [*expired, *picked][:max(count, len(expired))]

    def _expired(self, stage: TaskKind, now: float) -> list[TaskRecord]:
        """The current step's running tasks of ``stage`` whose lease lapsed (lease_lapsed)."""
        return [b for k, b in self._running.items() if b["kind"] == stage
                and task_step(b) == self.step and self.lease_lapsed(k, now)]

    def _lease_end(self, key: str) -> float:
        """When task ``key``'s lease runs out on this observer's clock (see update)."""
        seen = self._seen.get(key)
        if seen is None or self.job is None:
            return float(self._running[key]["leaseExpires"])
        return seen + float(self.job["spec"]["leaseSeconds"])

    def lease_lapsed(self, key: str, now: float) -> bool:
        """Whether running task ``key`` may be taken over at ``now`` (the clock of ``seen``).

        Kubernetes' leader-election rule: the holder's record has not changed for
        ``leaseSeconds`` as this observer measured it, so no other machine's clock is read
        and a skewed one can never make a live lease look expired. A holder that renews
        changes the record every ``leaseSeconds / 3``; a fresh observer waits one whole
        lease from when it first saw the record. A record it only polls is known silent
        only up to the last poll that showed it, so that is the time judged.
        """
        if key not in self._running:
            return False
        judged = now if self.follows(key) else self._polled.get(key, -inf)
        return self._lease_end(key) < judged

    def restart_observation(self, now: float) -> None:
        """Judge every running task's lease, and how long it has run, from ``now``, as an
        observer that has just started watching would: for when this observer could not
        see for a while (its store was out of reach), so a record that did not change then
        proves nothing, and a task whose writes the outage held up is no straggler (its
        backup would be an attempt wasted on every task that was running then).

        Nor is one backed up before its record changes again: its holder retries with a
        backoff (up to seconds after the store is back), so until it is heard of, it may
        be about to commit, or dead, which its lease decides (a takeover, not a backup)."""
        for key in self._running:
            self._seen[key] = now
            if key in self._started:
                self._started[key] = now
                self._unheard.add(key)

    def _straggler_after(self, stage: TaskKind) -> float | None:
        """How long a task of ``stage`` (current step) may run before it is a straggler,
        or None while too few of the stage's tasks committed to judge (see BACKUP_FACTOR)."""
        median = self._durations.get((self.step, stage.value))
        if median is None or median.count < BACKUP_MIN_COMMITTED:
            return None
        return max(BACKUP_FACTOR * median.value(), BACKUP_FLOOR)

    def _backup_targets(self, worker: str) -> tuple[float, list[tuple[float, str]]] | None:
        """The backup rule's precondition and candidates: None unless the job allows
        backups, the stage has nothing pending and the threshold is known; else the
        threshold and (start, key) of the stage's running tasks that ``worker`` may back
        up (not its own, not one with a twin). O(running tasks), asked only by an idle
        worker."""
        stage = self._stage()
        if (stage is None or self.job is None
                or not self.job["spec"].get("speculative", True)
                or len(self._pending_of(self.step, stage.value))):
            return None
        after = self._straggler_after(stage)
        if after is None:
            return None
        return after, [(self._started[k], k) for k, b in self._running.items()
                       if b["kind"] == stage and task_step(b) == self.step
                       and k in self._started and k not in self._unheard
                       and not b.get("twin")
                       and b["worker"] not in ("", worker)]

    def backup_candidate(self, worker: str, now: float) -> TaskRecord | None:
        """The running task idle ``worker`` should start a backup attempt of at ``now``
        (the clock of ``seen``), or None: the documented rule of speculative execution.

        Only when the current stage has nothing left to claim (no pending task, no lapsed
        lease: those come first), the job's ``speculative`` is on, and at least
        BACKUP_MIN_COMMITTED of the stage's tasks committed with a known duration (watched
        by this observer, or from the committed attempt's history):
        a task of that stage that has run longer than max(BACKUP_FACTOR x their median
        duration, BACKUP_FLOOR) on this observer's clock, not held by ``worker`` and
        without a backup yet. The longest-running one first.
        """
        targets = self._backup_targets(worker)
        if targets is None or self._expired(cast(TaskKind, self._stage()), now):
            return None
        after, running = targets
        late = [(start, key) for start, key in running if now - start > after]
        return self.tasks[min(late)[1]] if late else None

    def next_backup_at(self, worker: str) -> float | None:
        """When the next running task becomes a straggler ``worker`` may back up: the
        latest an idle worker should look again."""
        targets = self._backup_targets(worker)
        if targets is None or not targets[1]:
            return None
        after, running = targets
        return min(running)[0] + after

    def next_lease_expiry(self) -> float | None:
        """When the earliest running lease it follows runs out: the latest a waiting worker
        should look (a polled lease can only be found lapsed by a poll)."""
        leases = [self._lease_end(key) for key in self._running if self.follows(key)]
        return min(leases) if leases else None

    def map_outputs(self, partition: int) -> list[tuple[TaskRecord, str]]:
        """Each committed low-level map with its output for one partition, in map order.

        (Key/value maps write one shuffle object each: :meth:`shuffle_objects`.)
        """
        self._require_read(TaskKind.MAP)
        return [(m, outputs[str(partition)]) for m in self.maps
                if isinstance(outputs := m["outputs"], dict) and str(partition) in outputs]

    def shuffle_objects(self) -> list[tuple[TaskRecord, str, int]]:
        """Each committed key/value map with its shuffle object's key and size, in map order.

        Every reducer reads its slice of each; the map's record comes along so that a
        reduce that finds its slice corrupt can re-open exactly the map (and the attempt)
        that wrote it. Maps that emitted nothing have no object.
        """
        self._require_read(TaskKind.MAP)
        return [(m, outputs[SHUFFLE], int(outputs[SHUFFLE_SIZE])) for m in self.maps
                if isinstance(outputs := m["outputs"], dict) and SHUFFLE in outputs]

    def _require_read(self, kind: TaskKind) -> None:
        """Refuse to answer from tasks whose outputs this observer has not read."""
        missing = sorted(k for k in self.unread if self.tasks[k]["kind"] == kind
                         and task_step(self.tasks[k]) == self.step)
        if missing:
            raise RuntimeError(f"outputs of {len(missing)} committed {kind.value} task(s) "
                               f"not read yet (first: {missing[0]}): read the job first")

    def key_type_clash(self, task: str | None = None, key_type: str | None = None) -> str | None:
        """Why the job's keys do not share one type, or None if they do.

        With ``task`` and ``key_type``: whether that map's keys can join the committed
        maps'. Without: the first clash among the committed maps themselves. The clash
        names the first committed map (by name) of each type; O(number of key types).
        """
        firsts = sorted((min(tasks), kind) for (step, kind), tasks in self._key_types.items()
                        if step == self.step and tasks - {task})
        if key_type is not None:
            other = next(((name, kind) for name, kind in firsts if kind != key_type), None)
            return None if other is None else _key_clash(task or "a map", key_type, *other)
        if len(firsts) > 1:
            return _key_clash(*firsts[1], *firsts[0])
        return None

    def verdict(self) -> Update | None:
        """The job's final write, if the tasks have decided it and nobody stamped it yet.

        Any worker (or the operator) may send it; the test on ``seq`` makes it idempotent.
        A failed task of the current step fails the job; success waits for the last step
        (an earlier step's end is :meth:`step_results`, for the operator to advance). Not
        while any task's outputs are :attr:`unread`: the verdict carries them.
        """
        if (self.job is None or self.phase != JobPhase.RUNNING or not self.complete
                or self.unread):
            return None
        if self.progress().failed:
            failed = next(t for t in (*self.maps, *self.reduces)
                          if t["state"] == TaskState.FAILED)
            error: JobError = {"task": task_name(failed), "attempt": failed["attempt"],
                               "message": failed["error"]}
            return Update(JOB_KEY, tuple(_write(self.job, phase=JobPhase.FAILED.value,
                                                error=error)))
        results = self.results()
        if results is None or not self.last_step:
            return None
        return Update(JOB_KEY, (*_write(self.job, phase=JobPhase.SUCCEEDED.value,
                                        results=results),
                                {"op": "add", "path": "/counters", "value": self.counters()},
                                *self._skipped_op()))

    def _skipped_op(self) -> tuple[PatchOp, ...]:
        sample = self.skipped()
        return ({"op": "add", "path": "/skipped", "value": sample},) if sample else ()

    def skipped(self) -> list[Skipped]:
        """A sample of the records skip mode skipped, from the committed tasks (maps, then
        reduces), each task's committed attempt's only. A full scan, like counters()."""
        return job_sample((task_name(t), t.get("input"), t.get("skipped"))
                          for t in self.every_task()
                          if t["state"] == TaskState.COMMITTED and t.get("skipped"))

    def counters(self) -> Counters:
        """The job's counters: the sum over its committed tasks (each counted once, with
        the attempt that committed it). A full scan: asked once, for the verdict."""
        return total(t.get("counters") for t in self.tasks.values()
                     if t["state"] == TaskState.COMMITTED)

    def results(self) -> list[TaskOutputs | None] | None:
        """The job's results once every task they come from has committed, else None.

        The reduces' outputs in partition order, or for a map-only job (no reducers) the
        maps' outputs in map order: what the Succeeded verdict stamps, and what the worker
        that stamps it lists in the result location's manifest first. None too while any
        of them is :attr:`unread`.
        """
        if self.unread:
            return None
        if self.reduce_total == 0:

            return [t["outputs"] for t in self.maps] if self.maps_committed else None
        if self._count(TaskKind.REDUCE, TaskState.COMMITTED) == self.reduce_total:
            return [t["outputs"] for t in self.reduces]
        return None

    def step_results(self) -> list[str] | None:
        """The current step's part URLs (the next step's inputs) once all its tasks have
        committed, if the job is Running and has a next step; else None."""
        if self.phase != JobPhase.RUNNING or self.last_step or not self.complete:
            return None
        results = self.results()
        return None if results is None else [r for r in results if isinstance(r, str)]


def _key_type(body: TaskRecord) -> str | None:
    """The key type a committed map recorded with its outputs (None for any other record)."""
    if body["kind"] != TaskKind.MAP or body["state"] != TaskState.COMMITTED:
        return None
    outputs = body["outputs"]
    return outputs.get(KEY_TYPE) if isinstance(outputs, dict) else None


def _key_clash(task: str, kind: str, other_task: str, other_kind: str) -> str:
    return (f"{task} emitted keys of type {kind} but {other_task} emitted {other_kind}; "
            "a job's keys must share one type")


def abort(job: JobRecord, phase: JobPhase, reason: str) -> Update:
    """End a job from outside the task flow: Cancelled by a user, or Failed for a reason no
    task owns (a job module that does not load, worker pods that cannot run)."""
    return Update(JOB_KEY, (_test("phase", job["phase"]), *_write(
        job, phase=phase.value, error={"task": "", "attempt": 0, "message": reason})))


def retry(view: JobView) -> list[Update]:
    """Re-open a Failed or Cancelled job, keeping every committed task and its outputs.

    A multi-step job stays in its step: the earlier steps' tasks have all committed, so it
    resumes where it failed.

    Failed and unfinished tasks go back to pending with a fresh failure budget (attempt
    numbers keep counting, so new outputs never reuse old keys). Apply the updates in
    order: the job's own update comes last, so no worker starts before the tasks are reset.
    """
    job = view.job
    if job is None or view.phase not in (JobPhase.FAILED, JobPhase.CANCELLED):
        raise ValueError(f"only a Failed or Cancelled job can be retried, not {view.phase.value}")
    updates = [
        Update(task_name(t), (*_write(t, state=TaskState.PENDING.value, worker="",
                                      leaseExpires=0.0, failures=0), *_no_twin(t)))
        for t in view.every_task()
        if t["state"] != TaskState.COMMITTED and (t["state"] != TaskState.PENDING
                                                  or t["failures"])
    ]
    updates.append(Update(JOB_KEY, (_test("phase", job["phase"]), *_write(
        job, phase=JobPhase.RUNNING.value, error=None, results=[]))))
    return updates


def plan(spec: JobSpec, map_inputs: Iterable[Split]) -> list[tuple[str, TaskRecord]]:
    """Every task record of a new job, or of step ``spec.step`` of a multi-step one: one
    map per ``spec.splits_per_task`` consecutive input splits (planning order; the last
    map may hold fewer), one reduce per partition.

    Why batch rather than spread records over more namespaces: a task's coordination cost
    (claim, renewals, commit, each fanned out to the shard's watchers) is per record, so
    a record of K splits pays it once for K splits; more namespaces would only bound the
    objects per namespace, not the writes per split (docs/scaling.md).
    """
    step = spec.step
    splits = list(map_inputs)
    size = spec.splits_per_task
    records = [(map_key(i, step), new_task(TaskKind.MAP, i, *batch[0], step=step,
                                           more=batch[1:]))
               for i, batch in enumerate(splits[at:at + size]
                                         for at in range(0, len(splits), size))]
    records += [(reduce_key(r, step), new_task(TaskKind.REDUCE, r, step=step))
                for r in range(spec.reducers)]
    return records


def map_count(spec: JobSpec, splits: int) -> int:
    """How many map records :func:`plan` makes of ``splits`` input splits."""
    return -(-splits // spec.splits_per_task)


def _committed_seconds(body: TaskRecord) -> float | None:
    """How long the committed attempt of ``body`` ran, from its history entry (start and
    end written by the one worker that claimed and committed it), or None if unknown."""
    for entry in body.get("history") or []:
        if entry.get("outcome") == AttemptOutcome.COMMITTED and "end" in entry:
            return max(entry["end"] - entry["start"], 0) / 1000
    return None


def format_error(error: JobError | None) -> str:
    """The one-line reason of a Failed job, as the CLI and the status print it."""
    if not error:
        return "unknown error"
    if not error.get("task"):  # a hand-written status may lack fields
        return str(error.get("message", ""))
    return f"task {error['task']} attempt {error['attempt']}: {error['message']}"
