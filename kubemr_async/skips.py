"""Skip mode (Hadoop's SkipBadRecords): bad records skipped, counted and sampled per task.

Pure: no I/O. With ``maxSkippedRecords`` N > 0, a per-record map call (or a per-key reduce
call) that raises, and a JSONL or CSV record that does not parse, is skipped instead of
failing the attempt: :class:`TaskSkips` counts it (framework counter
``kubemr/skippedRecords``) and keeps a small sample (where, and the one-line error). The
N+1st skip in one task raises :class:`~kubemr_async.errors.SkipLimitExceeded`, failing
the attempt as any error would.

Hadoop narrows a bad range down over retries, because its records are opaque to the
task; we call user code once per record, so the failing record is known at once and
skipped in the same attempt.

The sample travels in the task record with the commit (only the committed attempt's
skips count, like counters), so it is bounded: :data:`MAX_TASK_SAMPLE` entries of at most
:data:`MAX_ERROR_CHARS` and :data:`MAX_KEY_CHARS` characters, :data:`MAX_SAMPLE_BYTES` in
all, and less beside many user counters (:data:`SHARED_BYTES`), keeping a task record
under 2 KB on the cluster. The job's sample (:func:`job_sample`) keeps at most
:data:`MAX_JOB_SAMPLE` of them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, cast

from .errors import PermanentSkipLimitExceeded, PermanentTaskError, SkipLimitExceeded
from .records import Skipped

#: Skipped records kept (as a sample) per task, and per job.
MAX_TASK_SAMPLE = 5
MAX_JOB_SAMPLE = 20
#: A sample's error, and a reduce key's repr, are cut to this many characters.
MAX_ERROR_CHARS = 120
MAX_KEY_CHARS = 60
#: The most a task's sample may add to its record (ASCII-escaped JSON, never less than
#: the server's UTF-8): entries past it are counted but not kept.
MAX_SAMPLE_BYTES = 640
#: What the sample shares with the user's counters (as ``TaskCounters`` accounts them, at
#: most ``counters.MAX_COUNTER_BYTES``): a task record with the worst of both (and every
#: framework counter at 64 bits) stays under 2 KB on the cluster (tests/test_kube_store).
SHARED_BYTES = 730


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def one_line(error: BaseException | str) -> str:
    """An error as a sample shows it: ``Type: message`` on one line, cut short."""
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
    return _cut(" ".join(text.split()), MAX_ERROR_CHARS)


def map_place(offset: int, line: int | None, url: str | None = None) -> Skipped:
    """Where a map's record was: its byte offset in the input (and file line, if known);
    ``url`` names the input when it is not the task's first (a batched map's later split)."""
    place = Skipped(error="", offset=offset)
    if line is not None:
        place["line"] = line
    if url is not None:
        place["input"] = url
    return place


def key_place(key: Any) -> Skipped:
    """Where a reduce's record was: its key, as a short repr."""
    return Skipped(error="", key=_cut(repr(key), MAX_KEY_CHARS))


def describe(place: Skipped) -> str:
    """``line 17``, ``byte 123456`` or ``key 'x'``: where a skipped record was."""
    if "key" in place:
        return f"key {place['key']}"
    if "line" in place:
        return f"line {place['line']}"
    return f"byte {place.get('offset', 0)}"


class TaskSkips:
    """One attempt's skipped records: the count, a sample, and the limit."""

    __slots__ = ("_bytes", "_costs", "count", "framework_error", "limit", "sample", "spills",
                 "where")

    def __init__(self, limit: int, where: str = "") -> None:
        self.limit = limit
        self.where = where  # the input URL of a map (in the limit's message)
        self.count = 0
        self.sample: list[Skipped] = []
        self._bytes = 2  # the brackets
        self._costs: list[int] = []
        #: A spill (framework work inside ``ctx.emit``) that failed: never skipped.
        self.framework_error: BaseException | None = None
        self.spills = 0  # spills so far: a record's pairs cannot be dropped past one

    def skip(self, place: Skipped, error: BaseException | str) -> None:
        """Skip one record; SkipLimitExceeded (from ``error``) past the limit."""
        self.count += 1
        message = one_line(error)
        if self.count > self.limit:
            where = place.get("input", self.where)
            at = f"{where} " if where else ""
            kind = (PermanentSkipLimitExceeded
                    if isinstance(error, PermanentTaskError | str) else SkipLimitExceeded)
            raise kind(f"skip limit {self.limit} exceeded (maxSkippedRecords): record "
                       f"{self.count} to skip, at {at}{describe(place)}: {message}")
        if len(self.sample) < MAX_TASK_SAMPLE:
            entry = Skipped(**{**place, "error": message})
            # ASCII-escaped JSON: never shorter than the UTF-8 the server stores.
            cost = len(json.dumps(entry, separators=(",", ":"))) + 1
            if self._bytes + cost <= MAX_SAMPLE_BYTES:
                self.sample.append(entry)
                self._costs.append(cost)
                self._bytes += cost

    def fit(self, counter_bytes: int) -> list[Skipped]:
        """The sample to commit: its last entries dropped while it and the user's counters
        (``counter_bytes``) would pass :data:`SHARED_BYTES`."""
        while self.sample and self._bytes + counter_bytes > SHARED_BYTES:
            self.sample.pop()
            self._bytes -= self._costs.pop()
        return self.sample


def job_sample(tasks: Iterable[tuple[str, str | None, list[Skipped] | None]]) -> list[Skipped]:
    """The job's sample from its committed tasks' ``(name, input, skipped)``, in order."""
    out: list[Skipped] = []
    for name, url, skipped in tasks:
        for entry in skipped or ():
            if len(out) >= MAX_JOB_SAMPLE:
                return out
            item = Skipped(**{**entry, "task": name})
            if url and "key" not in entry and "input" not in entry:
                item["input"] = url  # a batched map's later split names its own
            out.append(item)
    return out


def read(value: Any) -> list[Skipped]:
    """A sample from a stored document (a status, a manifest), dropping what is not one."""
    if not isinstance(value, list):
        return []
    return [cast(Skipped, entry) for entry in value
            if isinstance(entry, dict) and isinstance(entry.get("error"), str)]


def lines(sample: Iterable[Skipped], indent: str = "  ") -> list[str]:
    """A sample for people: ``task input place: error``, one line each."""
    out = []
    for entry in sample:
        where = " ".join(part for part in (entry.get("task", ""), entry.get("input", ""),
                                           describe(entry)) if part)
        out.append(f"{indent}{where}: {entry['error']}")
    return out
