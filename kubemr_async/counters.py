"""Counters (Hadoop's and mrjob's): named integer sums kept per task attempt, counted once.

Pure: no I/O. A callback calls ``ctx.counter(group, name, n)``; the increments live in the
attempt's :class:`TaskCounters` and go into the task record with the attempt's commit
(:func:`kubemr_async.protocol.commit`), so only the attempt that wins the commit counts.
A failed, retried or zombie attempt never commits, and its increments vanish with it. Job
totals (:func:`total`) are the sum over committed tasks, stamped on the job with the
Succeeded verdict.

A record holds ``{group: {name: amount}}``. It travels in every write of the task record,
so one task's counters are capped (:data:`MAX_COUNTERS` distinct, :data:`MAX_COUNTER_BYTES`
of record) and a task record stays under 2 KB on the cluster.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import CounterError
from .records import Counters

#: The framework's own counters (Hadoop's TaskCounter, short names); users may not use it.
FRAMEWORK_GROUP = "kubemr"
MAP_INPUT_BYTES = "mapInputBytes"
MAP_OUTPUT_RECORDS = "mapOutputRecords"
REDUCE_INPUT_RECORDS = "reduceInputRecords"
REDUCE_INPUT_GROUPS = "reduceInputGroups"
REDUCE_OUTPUT_RECORDS = "reduceOutputRecords"
#: Records (or reduce keys) skip mode skipped (``maxSkippedRecords``; :mod:`.skips`).
SKIPPED_RECORDS = "skippedRecords"

#: A group or a name: 1 to this many characters, no control characters.
MAX_NAME_CHARS = 100
#: Distinct user counters per task (Hadoop allows 120 per job; ours travel in the record).
MAX_COUNTERS = 16
#: The most a task's user counters may add to its record, each valued at its widest
#: (20 characters: every amount is a 64-bit integer): JSON names, quotes and separators.
MAX_COUNTER_BYTES = 512
#: Amounts are 64-bit, as in Hadoop and in the Kubernetes API's integers.
INT64_MAX = 2**63 - 1
_VALUE_CHARS = 20
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def check_name(what: str, value: object) -> str:
    """``value`` as a group or counter name, or a one-line CounterError saying why not."""
    if not isinstance(value, str):
        raise CounterError(f"ctx.counter: {what} must be a str, got {type(value).__name__}")
    if not value:
        raise CounterError(f"ctx.counter: {what} must not be empty")
    if len(value) > MAX_NAME_CHARS:
        raise CounterError(f"ctx.counter: {what} {value[:24]!r}... is {len(value)} characters; "
                           f"the limit is {MAX_NAME_CHARS}")
    if _CONTROL.search(value):
        raise CounterError(f"ctx.counter: {what} {value!r} holds a control character")
    return value


def check_amount(value: object) -> int:
    """``n`` as an increment: an int (not a bool, not a float) within 64 bits."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise CounterError(f"ctx.counter: n must be an int, got {type(value).__name__} "
                           f"{value!r:.40}")
    if not -INT64_MAX <= value <= INT64_MAX:
        raise CounterError(f"ctx.counter: n={value} does not fit in 64 bits")
    return value


def _json_chars(text: str) -> int:
    """An upper bound of ``text``'s size as a JSON string in UTF-8 (quotes included)."""
    return len(text.encode("utf-8", "surrogateescape")) + 2


class TaskCounters:
    """One attempt's counters: user increments checked as they come, framework ones added."""

    __slots__ = ("_bytes", "_user", "framework", "task")

    def __init__(self, task: str = "") -> None:
        self.task = task
        self._user: Counters = {}
        self._bytes = 2  # the braces
        self.framework: dict[str, int] = {}

    def add(self, group: object, name: object, n: object = 1) -> None:
        """``ctx.counter``: add ``n`` to counter ``name`` of ``group``."""
        if type(n) is not int or not -INT64_MAX <= n <= INT64_MAX:
            n = check_amount(n)  # raises; the common case costs a dict lookup or two
        names = self._user.get(group) if type(group) is str else None
        if names is None or type(name) is not str or name not in names:
            group, name = check_name("group", group), check_name("name", name)
            if group == FRAMEWORK_GROUP:
                raise CounterError(f"ctx.counter: group {FRAMEWORK_GROUP!r} is kubemr's own")
            self._admit(group, name, names is None)
            names = self._user.setdefault(group, {})
            names[name] = 0
        value = names[name] + n
        if not -INT64_MAX <= value <= INT64_MAX:
            raise CounterError(f"ctx.counter: {group}/{name} would reach {value}, beyond 64 bits")
        names[name] = value

    def _admit(self, group: str, name: str, new_group: bool) -> None:
        count = sum(len(names) for names in self._user.values())
        where = f" in {self.task}" if self.task else ""
        if count >= MAX_COUNTERS:
            raise CounterError(
                f"ctx.counter: too many counters{where}: {group}/{name} would be number "
                f"{count + 1}; the limit is {MAX_COUNTERS} distinct counters per task")
        # "name":<20 digits>, plus for a new group "group":{} and the commas.
        cost = _json_chars(name) + 1 + _VALUE_CHARS + 1
        if new_group:
            cost += _json_chars(group) + 4
        if self._bytes + cost > MAX_COUNTER_BYTES:
            raise CounterError(
                f"ctx.counter: counters{where} too large: {group}/{name} would take them past "
                f"{MAX_COUNTER_BYTES} bytes of the task record (names plus 22 bytes each); "
                f"use fewer or shorter names")
        self._bytes += cost

    @property
    def user_bytes(self) -> int:
        """What the user's counters may take of the record, each valued at its widest."""
        return self._bytes

    def set_framework(self, name: str, value: int) -> None:
        """A framework counter of this attempt (counted by the framework, not user code)."""
        self.framework[name] = value

    def add_framework(self, name: str, value: int) -> None:
        """Add to a framework counter of this attempt (a batched map's splits, one by one)."""
        self.framework[name] = self.framework.get(name, 0) + value

    def snapshot(self) -> Counters:
        """What the commit writes: the user's groups and the framework's (non-zero) ones."""
        out = {group: dict(names) for group, names in self._user.items()}
        framework = {name: value for name, value in self.framework.items() if value}
        if framework:
            out[FRAMEWORK_GROUP] = framework
        return out


def total(parts: Iterable[Mapping[str, Mapping[str, int]] | None]) -> Counters:
    """The sum of several tasks' counters, groups and names sorted (a stable display)."""
    sums: dict[str, dict[str, int]] = {}
    for counters in parts:
        for group, names in (counters or {}).items():
            into = sums.setdefault(group, {})
            for name, value in names.items():
                into[name] = into.get(name, 0) + int(value)
    return {group: dict(sorted(sums[group].items())) for group in sorted(sums)}


def read(value: Any) -> Counters:
    """Counters from a stored document (a status, a manifest), dropping what is not one."""
    if not isinstance(value, Mapping):
        return {}
    return {str(group): {str(name): amount for name, amount in names.items()
                         if isinstance(amount, int) and not isinstance(amount, bool)}
            for group, names in value.items() if isinstance(names, Mapping)}


def lines(counters: Mapping[str, Mapping[str, int]], indent: str = "  ") -> list[str]:
    """Counters for people: ``group`` then ``name=amount`` lines under it, in order."""
    out: list[str] = []
    for group, names in counters.items():
        out.append(f"{indent}{group}")
        out += [f"{indent}  {name}={value}" for name, value in names.items()]
    return out
