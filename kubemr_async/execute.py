"""Run one task's user code and the shuffle on bytes already fetched: compute, no framework I/O.

The runtime fetches inputs and writes outputs on its own event loop; these coroutines run
on the separate user loop (see runtime.UserLoop) so a callback that hogs the CPU cannot
starve heartbeats. Built-in reducers never call into per-record Python.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from . import formats, order, shuffle
from .api import Job, JobWorker, TaskContext, call_user
from .errors import PermanentTaskError
from .spec import OutputFormat


class CorruptRun(Exception):
    """Run ``position`` of a reduce's inputs failed its checks (``shuffle.decode_run``).

    Reading it again cannot help, so the runtime re-opens the map that wrote it instead of
    counting a failure against the reduce; ``position`` says which map that is.
    """

    def __init__(self, position: int, error: shuffle.CorruptRunError) -> None:
        super().__init__(str(error))
        self.position = position


def _map_argument(job: Job, data: bytes, ctx: TaskContext) -> object:
    if job.map_input == "bytes":
        return data
    if job.map_input == "name":
        return ctx.input
    # surrogateescape keeps undecodable bytes: encoding the str back yields the input exactly.
    return data.decode("utf-8", "surrogateescape")


async def _apply_user_reduce(fn: object, table: shuffle.Table, ctx: TaskContext) -> shuffle.Table:
    """Call a Python reduce/combine once per key group; their values become the output rows."""
    keys: list[object] = []
    values: list[object] = []
    for key, group in shuffle.iter_groups(table):
        for value in await call_user(fn, key, group, ctx):  # type: ignore[arg-type]
            keys.append(key)
            values.append(value)
    try:
        return shuffle.concat_tables([shuffle.pairs_to_table(keys, values), ctx._emitted()])
    except shuffle.ShuffleError as exc:
        raise PermanentTaskError(str(exc)) from exc


async def _map_table(job: Job, data: bytes, ctx: TaskContext) -> shuffle.Table:
    """Call the user's map on one split: everything it emitted, in emission order."""
    assert job.map_fn is not None
    pairs = await call_user(job.map_fn, _map_argument(job, data, ctx), ctx)
    returned = inspect.isfunction(job.map_fn) and not (
        inspect.isgeneratorfunction(job.map_fn) or inspect.isasyncgenfunction(job.map_fn))
    for item in pairs:
        if not (isinstance(item, tuple) and len(item) == 2):
            how = (f"returned a {type(item).__name__}" if returned
                   else f"yielded a {type(item).__name__}: {item!r:.80}")
            raise PermanentTaskError(
                f"map must yield (key, value) tuples or call ctx.emit; it {how}")
        ctx.emit(*item)
    return ctx._emitted()


async def run_map(job: Job, data: bytes,
                  ctx: TaskContext) -> tuple[dict[int, bytes], str | None]:
    """Map one split: user map, map-side combine, partition.

    Returns the encoded non-empty runs and the type of the keys (None if no keys), which
    the runtime checks against the other maps' before it commits.
    """
    table = await _map_table(job, data, ctx)
    combiner = job.map_side_combiner
    if isinstance(combiner, str):
        table = shuffle.combine(table, combiner)
    elif combiner is not None:
        table = await _apply_user_reduce(combiner, shuffle.sort_by_key(table), ctx)
    await job.prepare_map(ctx)  # the total-order partition file, if the job has one
    parts = shuffle.partition(table, ctx.partitions, job.partition_ids)
    runs = {r: shuffle.encode_run(part) for r, part in enumerate(parts) if part.num_rows}
    return runs, shuffle.key_type(table)


async def run_map_only(job: Job, data: bytes, ctx: TaskContext,
                       output_format: OutputFormat) -> bytes:
    """Map one split of a map-only job (no reducers): its result part, in emission order.

    As in Hadoop, a map-only job has no shuffle, so no combiner runs and nothing is sorted;
    keys of different types in different maps are fine, as no reduce compares them.
    """
    return formats.encode(await _map_table(job, data, ctx), output_format)


async def run_reduce(job: Job, runs: list[bytes], ctx: TaskContext,
                     output_format: OutputFormat) -> bytes:
    """Reduce one partition from every map's run; returns the part in ``output_format``."""
    tables = []
    for position, run in enumerate(runs):
        try:
            tables.append(shuffle.decode_run(run))
        except shuffle.CorruptRunError as exc:
            raise CorruptRun(position, exc) from exc
    if isinstance(job.reducer, str):
        return formats.encode(shuffle.merge_runs(tables, job.reducer), output_format)
    # A map-side built-in combiner already merged counts; merge_runs finishes that merge.
    merged = shuffle.merge_runs(tables, None)
    if job.sort_values:
        merged = order.sort_by_key_and_value(merged)
    return formats.encode(await _apply_user_reduce(job.reducer, merged, ctx), output_format)


async def run_low_level_map(worker: JobWorker, index: int, task_input: str,
                            ctx: TaskContext) -> dict[int, str]:
    outputs = await worker.map(index, task_input, ctx)
    if not isinstance(outputs, Mapping):
        raise PermanentTaskError(
            f"JobWorker.map must return a mapping of partition -> output string, "
            f"got {type(outputs).__name__}")
    checked: dict[int, str] = {}
    for partition, output in outputs.items():
        if not isinstance(partition, int) or not 0 <= partition < ctx.partitions:
            raise PermanentTaskError(
                f"JobWorker.map returned partition {partition!r}; "
                f"expected an int in [0, {ctx.partitions})")
        if not isinstance(output, str):
            raise PermanentTaskError(
                f"JobWorker.map output for partition {partition} must be str, "
                f"got {type(output).__name__}")
        checked[partition] = output
    return checked


async def run_low_level_reduce(worker: JobWorker, partition: int, inputs: list[str],
                               ctx: TaskContext) -> str:
    output = await worker.reduce(partition, inputs, ctx)
    if not isinstance(output, str):
        raise PermanentTaskError(
            f"JobWorker.reduce must return an output string, got {type(output).__name__}")
    return output
