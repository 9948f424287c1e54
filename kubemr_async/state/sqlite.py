"""Embedded StateStore on SQLite in WAL mode, shared by worker processes on one machine.

SQLite gives real atomicity across processes: a guarded patch runs inside a
``BEGIN IMMEDIATE`` transaction (one writer at a time), reads the record, checks the JSON
Patch tests and writes, so exactly one of several racing claimants wins. Each write stamps
a store-wide, monotonically increasing revision that watchers poll from; polling an index
every few milliseconds is cheap and keeps the store free of any daemon.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from ..patch import PatchTestFailed, apply_patch
from ..protocol import JOB_KEY, TaskState, Update, job_shards, shard_of
from ..records import Body
from .base import JobNotFound, Record, ShardChoice, WatchEvent, decode_body

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    job TEXT NOT NULL,
    key TEXT NOT NULL,
    body BLOB NOT NULL,
    rev INTEGER NOT NULL,
    PRIMARY KEY (job, key)
);
CREATE INDEX IF NOT EXISTS records_by_rev ON records (job, rev);
CREATE TABLE IF NOT EXISTS revision (id INTEGER PRIMARY KEY CHECK (id = 0), rev INTEGER NOT NULL);
INSERT OR IGNORE INTO revision VALUES (0, 0);
"""


class SQLiteStateStore:
    """A StateStore in one SQLite file; safe for many processes, each with its own instance."""

    def __init__(self, path: str | Path, poll_interval: float = 0.02) -> None:
        self.path = str(path)
        self.poll_interval = poll_interval
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # Idempotent DDL: several processes may open a fresh file at the same moment.
        self._db.executescript(_SCHEMA)

    async def _run(self, fn: Any, *args: Any) -> Any:
        # sqlite3 blocks (busy waits included), so it runs off the event loop.
        return await asyncio.to_thread(self._locked, fn, *args)

    def _locked(self, fn: Any, *args: Any) -> Any:
        with self._lock:
            return fn(*args)

    def _next_rev(self) -> int:
        self._db.execute("UPDATE revision SET rev = rev + 1 WHERE id = 0")
        row = self._db.execute("SELECT rev FROM revision WHERE id = 0").fetchone()
        return int(row[0])

    def _create(self, job: str, records: Sequence[tuple[str, Body]]) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for key, body in records:
                exists = self._db.execute("SELECT 1 FROM records WHERE job=? AND key=?",
                                          (job, key)).fetchone()
                if not exists:
                    self._db.execute("INSERT INTO records VALUES (?, ?, ?, ?)",
                                     (job, key, orjson.dumps(body), self._next_rev()))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    async def create(self, job: str, records: Sequence[tuple[str, Body]]) -> None:
        await self._run(self._create, job, records)

    def _snapshot(self, job: str) -> tuple[dict[str, Record], str]:
        self._db.execute("BEGIN")
        try:
            rows = self._db.execute("SELECT key, body, rev FROM records WHERE job=?",
                                    (job,)).fetchall()
            rev = self._db.execute("SELECT rev FROM revision WHERE id = 0").fetchone()[0]
        finally:
            self._db.execute("COMMIT")
        if not rows:
            raise JobNotFound(f"job {job} not found in {self.path}")
        records = {k: Record(k, decode_body(orjson.loads(b)), str(r)) for k, b, r in rows}
        return records, str(rev)

    async def snapshot(self, job: str, *, shard: ShardChoice | None = None
                       ) -> tuple[dict[str, Record], str]:
        # Reading everything costs a local file little: every shard is returned.
        result: tuple[dict[str, Record], str] = await self._run(self._snapshot, job)
        return result

    def _changes(self, job: str, since: int) -> tuple[list[tuple[str, bytes, int]], bool]:
        rows = self._db.execute(
            "SELECT key, body, rev FROM records WHERE job=? AND rev>? ORDER BY rev",
            (job, since)).fetchall()
        alive = self._db.execute("SELECT 1 FROM records WHERE job=? LIMIT 1",
                                 (job,)).fetchone() is not None
        return rows, alive

    async def unfinished(self, job: str, *, shard: int | None = None,
                         most: int | None = None) -> list[Record]:
        records, _ = await self.snapshot(job)
        shards = job_shards(records[JOB_KEY].job)
        found = [record for key, record in sorted(records.items())
                 if key != JOB_KEY and record.task["state"] != TaskState.COMMITTED
                 and (shard is None or shard_of(key, shards) == shard)]
        return found[:most]


    async def watch(self, job: str, since: str, *,
                    shard: int | None = None) -> AsyncIterator[WatchEvent]:
        # One process's file: a watcher costs no writer anything, so every change is
        # delivered whatever the shard.
        last = int(since)

        while True:
            rows, alive = await self._run(self._changes, job, last)
            for key, body, rev in rows:
                last = rev
                yield WatchEvent("PUT", Record(key, decode_body(orjson.loads(body)), str(rev)))
            if not alive:
                return
            if not rows:
                await asyncio.sleep(self.poll_interval)

    def _patch(self, job: str, update: Update) -> Record | None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute("SELECT body FROM records WHERE job=? AND key=?",
                                   (job, update.key)).fetchone()
            if row is None:
                raise JobNotFound(f"job {job}: record {update.key} not found")
            try:
                body = apply_patch(orjson.loads(row[0]), update.ops)
            except PatchTestFailed:
                self._db.execute("ROLLBACK")
                return None
            rev = self._next_rev()
            self._db.execute("UPDATE records SET body=?, rev=? WHERE job=? AND key=?",
                             (orjson.dumps(body), rev, job, update.key))
            self._db.execute("COMMIT")
            return Record(update.key, decode_body(body), str(rev))
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    async def patch(self, job: str, update: Update, *, resend: bool = True) -> Record | None:
        # A local file is never out of reach: nothing to send again.
        result: Record | None = await self._run(self._patch, job, update)
        return result

    def last_outage(self) -> float | None:
        return None  # a local file is never out of reach

    async def delete(self, job: str) -> None:
        await self._run(self._db.execute, "DELETE FROM records WHERE job=?", (job,))

    async def jobs(self) -> list[str]:
        rows = await self._run(lambda: self._db.execute(
            "SELECT DISTINCT job FROM records ORDER BY job").fetchall())
        return [r[0] for r in rows]

    async def aclose(self) -> None:
        await self._run(self._db.close)
