"""Exceptions that carry the context a user needs to act on them (job, task, attempt).

Every error that reaches the CLI is rendered as one line, so each class formats its
context into its message instead of relying on a traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class KubemrError(Exception):
    """Base class: anything kubemr-async raises on purpose."""


class UsageError(KubemrError):
    """Bad input from the user (flags, paths, job modules); reported before any work starts."""


class JobDefinitionError(UsageError):
    """A job module that cannot be loaded or defines no usable job."""


class PermanentTaskError(KubemrError):
    """Raised inside a task when retrying cannot help (e.g. a key that cannot be serialised).

    The runtime fails the task at once instead of burning the remaining attempts.
    """


class JobFailed(KubemrError):
    """The job reached the Failed (or Cancelled) phase; the message is the stamped reason."""


class OutputBusy(KubemrError):
    """Another `kubemr run` holds the output's lock."""


class Interrupted(KubemrError):
    """The run was stopped by a signal (SIGINT, SIGTERM) after cleaning up."""

    def __init__(self, signum: int) -> None:
        super().__init__("interrupted")
        self.signum = signum


@contextlib.contextmanager
def first_error() -> Iterator[None]:
    """Raise a task group's first real failure, not a group of it and its cancelled siblings.

    ``with first_error(): async with anyio.create_task_group() as tg: ...`` keeps the typed
    error (NotFound, JobNotFound...) that callers catch.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup) and first.exceptions:
            first = first.exceptions[0]
        raise first from None


class CounterError(PermanentTaskError, ValueError):
    """A bad ``ctx.counter`` call (a name, an amount, too many counters): one line saying why.

    Permanent: the same code would make the same call again.
    """


class SkipLimitExceeded(KubemrError):
    """Skip mode met more bad records in one task than ``maxSkippedRecords`` allows.

    The attempt fails as any failure does (retried up to ``maxAttempts``); the message says
    the limit and the last record's place and error.
    """


class PermanentSkipLimitExceeded(SkipLimitExceeded, PermanentTaskError):
    """The skip limit, exceeded on a record that cannot parse: retrying cannot help."""
