"""The shapes of the protocol's records, as TypedDicts, so mypy checks every reader and writer.

A job has one job record (key ``job``) and one task record per task (``map-00042``). The
protocol (:mod:`kubemr_async.protocol`) builds and transitions them; every store keeps them
as JSON (the SQLite store as a row, the Kubernetes store under ``.status`` of a
``MapReduceJob`` or ``MapReduceTask``; :mod:`kubemr_async.crd` holds their schemas). The
field names are the JSON names, so a record is the stored document itself (kopf's
``_cogs/structs/bodies.py`` types Kubernetes bodies the same way).
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

from .spec import JobSpecDict

#: A committed task's outputs: a key/value map's ``{"shuffle": key, "size": bytes,
#: "keyType": type}`` (the same few fields whatever the number of reducers), a low-level
#: map's ``{partition: output}``, or one string (a reduce's result, a map-only map's part).
TaskOutputs = dict[str, str] | str

#: Counters, ``{group: {name: amount}}``: a committed attempt's, or a job's totals
#: (:mod:`kubemr_async.counters`).
Counters = dict[str, dict[str, int]]


class Skipped(TypedDict):
    """A record skip mode skipped (:mod:`kubemr_async.skips`): where it was and why.

    A map's record: its byte ``offset`` in the (decompressed) input, and its ``line``
    number when the split starts the file; a reduce's: its ``key`` (a short repr). On the
    job (``status.skipped``, the ``_SUCCESS`` manifest) it also names its ``task`` and, for
    a map, its ``input`` URL.
    """

    error: str
    offset: NotRequired[int]
    line: NotRequired[int]
    key: NotRequired[str]
    task: NotRequired[str]
    input: NotRequired[str]


class Attempt(TypedDict):
    """One attempt of a task, as its history keeps it (``protocol.AttemptOutcome``).

    Times are Unix milliseconds on the clock of the worker that wrote them (the claimant
    for ``start``; for ``end`` the holder that committed, failed or released, or the
    claimant that took over a lapsed lease): machines' clocks may disagree a little, so a
    timeline drawn from several workers is as true as their clocks are. Integers, so an
    entry's size does not depend on the time. A running attempt has no ``end`` or
    ``outcome`` yet.
    """

    attempt: int
    worker: str
    start: int
    end: NotRequired[int]
    outcome: NotRequired[str]  # an AttemptOutcome value
class Twin(TypedDict):
    """The other running attempt of a task that has a backup (``protocol.backup``)."""

    worker: str
    attempt: int


class JobError(TypedDict):
    """Why a job failed: the task and attempt that decided it ("" and 0 for none)."""

    task: str
    attempt: int
    message: str


class JobStatus(TypedDict):
    """The job record's changing part (a MapReduceJob keeps it in ``.status``)."""

    phase: str  # a JobPhase value
    maps: int
    #: Result parts in order once Succeeded: the reduces' outputs (maps' for map-only jobs).
    results: list[TaskOutputs | None]
    error: JobError | None
    seq: int
    #: The sum of the committed tasks' counters, stamped with the Succeeded verdict.
    counters: NotRequired[Counters]
    #: A sample of the records skip mode skipped, over the committed tasks (their number
    #: is counter kubemr/skippedRecords), stamped with the Succeeded verdict.
    skipped: NotRequired[list[Skipped]]
    #: A multi-step job's current step (0-based): only its tasks are claimable, and
    #: ``maps`` counts its maps. Moved on by ``protocol.advance`` (absent: one step).
    step: NotRequired[int]
    #: How many shards the tasks are dealt into (``protocol.shard_of``); absent: one.
    shards: NotRequired[int]


class JobRecord(JobStatus):
    """The job-wide record: fixed spec plus the state every worker and the operator share."""

    spec: JobSpecDict


class MoreSplit(TypedDict):
    """A batched map's split after its first (``protocol.task_splits``): its input and,
    for a split of part of the input, the byte range ``[start, end)``."""

    input: str
    range: NotRequired[list[int]]


class TaskRecord(TypedDict):
    """One task's record; every transition is a guarded JSON Patch of it."""

    kind: str  # a TaskKind value
    index: int
    input: str | None
    range: list[int] | None
    state: str  # a TaskState value
    attempt: int
    failures: int
    worker: str
    leaseExpires: float
    outputs: TaskOutputs | None
    error: str
    seq: int
    #: A batched map (``splitsPerTask`` > 1): its splits after the first, which ``input``
    #: and ``range`` hold (so every split is written once, and a reader of the first split
    #: alone still names the record's start). Absent: one split.
    moreSplits: NotRequired[list[MoreSplit]]
    #: The counters of the attempt that committed, written with the commit (only then).
    counters: NotRequired[Counters]
    #: Skip mode only: a sample of the records the committed attempt skipped.
    skipped: NotRequired[list[Skipped]]
    #: The step (0-based) of a multi-step job this task belongs to; absent for step 0, so
    #: a single-step job's records are unchanged.
    step: NotRequired[int]
    #: The latest attempts, oldest first, as many as fit beside the counters and the skip
    #: sample (``protocol.HISTORY_BYTES``): what ``kubemr timeline`` draws.
    history: NotRequired[list[Attempt]]
    #: Speculative execution (``protocol.backup``): the original attempt while a backup
    #: holds ``worker``/``attempt`` (null once one of them ends), the backups launched,
    #: the latest backup's attempt, and on commit whether that backup's commit won.
    twin: NotRequired[Twin | None]
    backups: NotRequired[int]
    backupAttempt: NotRequired[int]
    backupWon: NotRequired[bool]


#: Any record's body; a key tells which (``job`` is the job record, every other key a task).
Body = JobRecord | TaskRecord


class PatchOp(TypedDict):
    """One RFC 6902 operation of the kinds the protocol sends."""

    op: Literal["test", "add", "replace", "remove"]
    path: str
    value: NotRequired[object]
