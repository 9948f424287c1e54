"""A word count for batched map tasks (``splitsPerTask``), where one split can fail once.

``--arg fail=NAME`` makes a map raise on its first attempt when it reaches the split whose
input's file name is NAME, after the batch's earlier splits have been mapped and counted,
so the job's result and counters are exact only if a failed attempt counts for nothing
and the retry maps the whole batch again. ``--arg log=PATH`` appends each attempt that
raises there (tests.jobs.attempts.record). ``--arg splits=PATH`` appends
``task attempt input`` for every split a map is handed (the order a batch's splits reach
the map). Counter ``text/splits`` counts the splits mapped by committed attempts.
"""

from __future__ import annotations

import os

from kubemr_async import Job, TaskContext
from kubemr_async.shuffle import split_words
from tests.jobs.attempts import record

job = Job("batched")


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@job.map(input="bytes")
def words(chunk: bytes, ctx: TaskContext) -> None:
    if ctx.args.get("splits"):
        _append(ctx.args["splits"], f"{ctx.task} {ctx.attempt} {ctx.input}\n")
    ctx.counter("text", "splits")
    ctx.emit_batch(split_words(chunk), 1)
    if ctx.attempt == 1 and os.path.basename(ctx.input) == ctx.args.get("fail"):
        record(ctx)
        raise RuntimeError(f"{ctx.task} fails its first attempt at {ctx.input} on purpose")


job.reduce("sum")
