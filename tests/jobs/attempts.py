"""Test jobs that run inside worker pods: they log every attempt they run to a file.

The log (one line per attempt, appended with O_APPEND so concurrent processes never
interleave) lets a test count real executions independently of what the store says.
``--arg die=always`` makes every map attempt SIGKILL its own worker process (after a last
line on stderr), as a worker that always crashes before committing; ``--arg die=exit0``
ends it with ``os._exit(0)`` instead, as user code that exits "successfully".
``--arg block=SECONDS`` blocks every map's user thread in a synchronous call (which no
cancellation reaches), as a callback stuck in a blocking read.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Mapping

from kubemr_async import JobWorker, TaskContext


def record(ctx: TaskContext) -> None:
    path = ctx.args.get("log")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{ctx.task} {ctx.attempt} {os.getpid()}\n".encode())
        finally:
            os.close(fd)


class Echo(JobWorker):
    """Each map passes its input string to partition task_id % partitions."""

    name = "echo"

    async def map(self, task_id: int, input: str, ctx: TaskContext) -> Mapping[int, str]:
        record(ctx)
        if ctx.args.get("die") == "always":
            print(f"{ctx.task} attempt {ctx.attempt} kills its worker", file=sys.stderr,
                  flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if ctx.args.get("die") == "exit0":
            os._exit(0)
        if ctx.args.get("block"):
            time.sleep(float(ctx.args["block"]))  # noqa: ASYNC251 - the blocking call
        if ctx.args.get("sleep"):
            await asyncio.sleep(float(ctx.args["sleep"]))
        if (ctx.task, ctx.attempt) == (ctx.args.get("slow"), 1):  # one slow first attempt
            await asyncio.sleep(float(ctx.args["slow_seconds"]))
        return {task_id % ctx.partitions: input}

    async def reduce(self, partition: int, inputs: list[str], ctx: TaskContext) -> str:
        record(ctx)
        return ",".join(sorted(inputs))


job = Echo()
