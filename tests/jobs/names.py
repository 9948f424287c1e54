"""A trivial key/value job whose inputs can be batched (``splitsPerTask``), for
``benchmarks/coordination.py --splits-per-task K``.

Each split's input is a generated name that is never read (map input ``name``), and the
map only counts it (counter ``bench/splits``): no blob I/O per split, so what the benchmark
measures is the coordination. The stamped counter equals the number of splits only if
every split was mapped by exactly one committed attempt.
"""

from __future__ import annotations

from kubemr_async import Job, TaskContext

job = Job("names")


@job.map(input="name")
def seen(name: str, ctx: TaskContext) -> None:
    ctx.counter("bench", "splits")


job.reduce("sum")
