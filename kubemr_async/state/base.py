"""The StateStore protocol: the only thing workers need from a coordination backend.

Four verbs are enough for masterless coordination: read everything once (``snapshot``),
follow changes (``watch``), create records, and apply a guarded JSON Patch (``patch``) where
a failed ``test`` is a normal lost race reported as ``None``, not an exception. A fifth,
``unfinished``, lets a worker that follows only its shard (``watch(..., shard=)``, see
:mod:`kubemr_async.protocol`) poll the rest cheaply. Every backend passes the same
contract suite (tests/test_state_contract.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

from ..errors import KubemrError
from ..protocol import JOB_KEY, Update
from ..records import Body, JobRecord, TaskRecord


class JobNotFound(LookupError):
    """The job (or one of its records) does not exist, e.g. it was deleted."""


class StoreUnavailable(KubemrError):
    """The store did not answer for longer than it waits (its outage tolerance), or a
    write that may not be sent again met an outage; either way the write was not applied."""


@dataclass(frozen=True)
class Record:
    """One record of a job: its key, its JSON body, and the store's version of it."""

    key: str
    body: Body
    revision: str

    @property
    def job(self) -> JobRecord:
        """The body as the job record; TypeError if this is a task's record."""
        if self.key != JOB_KEY:
            raise TypeError(f"record {self.key} is a task record, not the job record")
        return cast(JobRecord, self.body)

    @property
    def task(self) -> TaskRecord:
        """The body as a task record; TypeError if this is the job record."""
        if self.key == JOB_KEY:
            raise TypeError("record job is the job record, not a task record")
        return cast(TaskRecord, self.body)


#: Which shard a reader wants, given the job record (None: all of them).
ShardChoice = Callable[[JobRecord], int | None]


@dataclass(frozen=True)
class WatchEvent:
    type: Literal["PUT", "DELETE"]
    record: Record


class StateStore(Protocol):
    async def create(self, job: str, records: Sequence[tuple[str, Body]]) -> None:
        """Create records that do not exist yet; existing ones are left alone (idempotent)."""

    async def snapshot(self, job: str, *, shard: ShardChoice | None = None
                       ) -> tuple[dict[str, Record], str]:
        """All records of ``job`` and the revision to watch from; JobNotFound if none.

        ``shard``: read only the tasks of one shard (and the job record), the shard
        chosen from the job record, which is read first (None: every task); a store may
        return more. What a worker that follows one shard starts from."""

    def watch(self, job: str, since: str, *,
              shard: int | None = None) -> AsyncIterator[WatchEvent]:
        """Changes to ``job``'s records after ``since``, in order, until the job is deleted.

        ``shard``: the caller follows only the tasks of that shard (``protocol.shard_of``
        with the job record's ``shards``) and the job record; a store may deliver more
        (one that costs nothing per watcher delivers everything)."""

    async def unfinished(self, job: str, *, shard: int | None = None,
                         most: int | None = None) -> list[Record]:
        """``job``'s task records that have not committed, read now: what a worker that
        follows one shard polls to find work elsewhere and to learn that the rest has
        committed (JobView.settle). JobNotFound if there is no job.

        ``shard``: only that shard's; ``most``: at most that many (which ones is the
        store's choice). Either makes the answer partial: good for stealing a few tasks,
        not for settling. Any answer may be a little behind the latest writes (what it
        settles is read whole before it is used). A store that cannot answer now raises
        StoreUnavailable (a poll can wait for the next)."""




    async def patch(self, job: str, update: Update, *, resend: bool = True) -> Record | None:
        """Apply ``update`` atomically; ``None`` if a test failed (another writer won).

        A store that can be out of reach (the API server restarting) sends the write again
        until it lands or the outage outlasts the store's tolerance (StoreUnavailable), and
        if an answer was lost it checks whether the write landed, so a lost answer is never
        reported as a lost race. ``resend=False`` is for a decision that rests on how fresh
        the caller's view is (taking over a lapsed lease): after an outage it is returned if
        it landed, and otherwise not sent again but raised as StoreUnavailable, so the
        caller looks again at what happened meanwhile."""

    def last_outage(self) -> float | None:
        """When (``time.monotonic``) the store was last found out of reach, by a write or
        by the watch; None if never. A worker judges no lease across such a blind spell."""

    async def delete(self, job: str) -> None:
        """Remove the job and all its records."""

    async def jobs(self) -> list[str]:
        """Names of the jobs in this store."""

    async def aclose(self) -> None: ...


def decode_body(raw: Any) -> Body:
    """A stored body, checked only to be a JSON object: stores write what the protocol built."""
    if not isinstance(raw, dict):
        raise TypeError(f"record body must be a JSON object, got {type(raw).__name__}")
    return cast(Body, raw)
