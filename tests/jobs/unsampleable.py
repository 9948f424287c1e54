"""A total-order job whose map raises on every input, so sampling its keys fails the job."""

from __future__ import annotations

from kubemr_async import Job, TaskContext

job = Job("unsampleable")
job.partition("total-order")


@job.map
def every_line(text: str, ctx: TaskContext) -> None:
    raise ValueError("bad record")


job.reduce("count")
