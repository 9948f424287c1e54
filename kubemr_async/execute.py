"""Run one task's user code and the shuffle on bytes already fetched: compute, no framework I/O.

The runtime fetches inputs and writes outputs on its own event loop; these coroutines run
on the separate user loop (see runtime.UserLoop) so a callback that hogs the CPU cannot
starve heartbeats. Built-in reducers never call into per-record Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import types
from collections.abc import (
    AsyncGenerator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ParamSpec, TypeVar

import pyarrow as pa

from . import (
    allocators,
    counters,
    formats,
    merge,
    metrics,
    order,
    recordio,
    shuffle,
    skips,
    spill,
    streaming,
)
from .api import HookFn, Job, JobWorker, Shell, TaskContext, call_user, iter_user
from .errors import PermanentTaskError
from .recordio import ParquetSplit, TextSplit
from .spec import PartFormat

_Source = spill.Source
#: A generous bound on how much larger a stored (lz4) block is as Arrow data.
_ARROW_PER_STORED_BYTE = 4
P = ParamSpec("P")
T = TypeVar("T")
#: What a map task reads: a split's bytes, or (per-record inputs) a text or Parquet split.
MapData = bytes | TextSplit | ParquetSplit


@dataclass(frozen=True)
class MapSplit:
    """One split of a map attempt: its input (``ctx.input`` while it is mapped) and how
    to fetch it, in pieces. A batched map (``splitsPerTask``) has several splits, fetched
    one at a time as the map reaches them, so only one split is ever held in memory; a
    split is one piece, but a compressed input's is its decoded stream, a piece (about a
    split's size) at a time (``inputs.read_map_input``)."""

    input: str
    read: Callable[[], AsyncGenerator[MapData, None]]

    @classmethod
    def held(cls, url: str, data: MapData) -> MapSplit:
        """A split already in memory (a sample window, a test's bytes)."""
        async def read() -> AsyncGenerator[MapData, None]:
            yield data

        return cls(url, read)


#: Output rows of a Python reduce collected before they are written to the part.
_OUTPUT_ROWS = 65_536


class CorruptRun(Exception):
    """Run ``position`` of a reduce's inputs failed its checks (``shuffle.decode_run``).

    Reading it again cannot help, so the runtime re-opens the map that wrote it instead of
    counting a failure against the reduce; ``position`` says which map that is.
    """

    def __init__(self, position: int, error: shuffle.CorruptRunError) -> None:
        super().__init__(str(error))
        self.position = position


def _map_argument(job: Job, data: bytes | TextSplit | ParquetSplit, ctx: TaskContext) -> object:
    if isinstance(data, TextSplit):
        data = data.data
    if isinstance(data, ParquetSplit):
        raise PermanentTaskError(f"a {job.map_input!r} map cannot read a Parquet split")
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


@contextlib.asynccontextmanager
async def _read_split(job: Job, split: MapSplit,
                      ctx: TaskContext) -> AsyncGenerator[AsyncGenerator[MapData, None], None]:
    """The next split of the attempt, made ``ctx.input``: its pieces, each fetched when
    the map reaches it, and each counted towards the attempt's map input (a ``name`` map
    reads nothing: one empty piece). What is not read yet is given up on leaving."""
    ctx.input = split.input
    async with contextlib.aclosing(split.read()) as pieces:
        yield _counted(job, pieces, ctx)


async def _counted(job: Job, pieces: AsyncGenerator[MapData, None],
                   ctx: TaskContext) -> AsyncGenerator[MapData, None]:
    if job.map_input == "name":
        yield b""
        return
    async for data in pieces:
        ctx._counters.add_framework(counters.MAP_INPUT_BYTES, recordio.split_bytes(data))
        yield data
        del data  # before the next piece is fetched


async def _run_user_map(job: Job, splits: Sequence[MapSplit], ctx: TaskContext) -> None:
    """One map attempt's user code on its splits: setup, the map (once per split, or once
    per record) on each split in turn, teardown; what they yield is emitted as it comes."""
    assert job.map_fn is not None
    fn = job.map_fn
    if isinstance(fn, Shell):
        await _run_shell_maps(job, fn, splits, ctx)
        return
    await _setup(job.map_setup_fn, ctx)
    try:
        for split in splits:
            async with _read_split(job, split, ctx) as pieces:
                async for data in pieces:
                    await _map_split(job, fn, data, ctx)
                    del data
    except Exception:
        await _teardown_after_failure(job.map_teardown_fn, ctx)
        raise
    await _teardown(job.map_teardown_fn, ctx)


@dataclass(frozen=True)
class _ShellCombining:
    """A shell combiner taking a shell mapper's stdout lines unparsed
    (``streaming.run_mapper_combined``): the combiner, the buffer's size, its spill."""

    combiner: Shell
    buffer_bytes: int
    spill: Callable[[shuffle.Table, int], None]


async def _run_shell_maps(job: Job, mapper: Shell, splits: Sequence[MapSplit],
                          ctx: TaskContext, combining: _ShellCombining | None = None) -> None:
    """A shell mapper on each split (each piece of a compressed one) in turn; with
    ``combining``, a text split's stdout goes straight through the shell combiner (a pairs
    split's batches cannot: they are parsed)."""
    for split in splits:
        async with _read_split(job, split, ctx) as pieces:
            async for data in pieces:
                lines = data.data if isinstance(data, TextSplit) else data
                if combining is not None and isinstance(lines, bytes):
                    await streaming.run_mapper_combined(mapper, combining.combiner, lines, ctx,
                                                        combining.buffer_bytes, combining.spill)
                else:
                    await _run_shell_map(job, mapper, data, ctx)
                del data, lines  # the piece's bytes go before the next one is read


async def _run_shell_map(job: Job, fn: Shell, data: MapData, ctx: TaskContext) -> None:
    """A shell mapper on one split: its lines, or a pairs split's batches, on stdin."""
    if isinstance(data, ParquetSplit):
        if job.map_input != "pairs":
            raise PermanentTaskError("a shell mapper reads text lines, not a Parquet split")
        tables = (pa.Table.from_batches([batch]) for batch in data.batches())
        await streaming.run_mapper(fn, tables, ctx)
        return
    await streaming.run_mapper(fn, data.data if isinstance(data, TextSplit) else data, ctx)


async def _map_split(job: Job, fn: Any, data: MapData, ctx: TaskContext) -> None:
    """The user's map on one split: called once, or once per record."""
    if job.map_input not in recordio.RECORD_INPUTS:
        await _emit_results("map", fn(_map_argument(job, data, ctx), ctx), ctx)
        return
    if isinstance(data, bytes):  # a sample window, or an unsplit read
        data = TextSplit(ctx.input, data)
    if ctx._skips is not None and isinstance(data, TextSplit):
        await _map_skipping(fn, job.map_input, data, ctx, ctx._skips)
        return
    for record in recordio.records(job.map_input, data):
        result = fn(record, ctx)
        if result is not None:
            await _emit_results("map", result, ctx)


async def _map_skipping(fn: Any, kind: recordio.RecordInput, data: TextSplit,
                        ctx: TaskContext, skipping: skips.TaskSkips) -> None:
    """Skip mode's map loop: a record whose call raises (or that does not parse) is
    skipped, what its call emitted dropped, and counted; past the limit the attempt fails.
    A PermanentTaskError (a bad pair, a bad counter) and a failed spill still fail it."""
    for number, pos, record in recordio.placed_records(kind, data):
        if isinstance(record, recordio.BadRecord):
            _skip_map_record(data, number, pos, record.reason, ctx, skipping)
            continue
        mark = _mark(ctx, skipping)
        try:
            result = fn(record, ctx)
            if result is not None:
                await _emit_results("map", result, ctx)
        except PermanentTaskError:
            raise
        except Exception as exc:
            if skipping.framework_error is not None:
                raise
            _drop_since(mark, ctx, skipping)
            _skip_map_record(data, number, pos, exc, ctx, skipping)


def _skip_map_record(data: TextSplit, number: int, pos: int, error: BaseException | str,
                     ctx: TaskContext, skipping: skips.TaskSkips) -> None:
    line = number if data.offset == 0 else None
    # A batched map's later splits name their own input (the record names its first).
    other = ctx.input if ctx.input != skipping.where else None
    skipping.skip(skips.map_place(data.offset + pos, line, other), error)
    ctx._counters.set_framework(counters.SKIPPED_RECORDS, skipping.count)
    ctx.log.warning("skipped a record at %s: %s", recordio.where(data, number, pos),
                    skips.one_line(error))


_Mark = tuple[int, int, int]


def _mark(ctx: TaskContext, skipping: skips.TaskSkips) -> _Mark:
    """What is buffered before a call, so that a skipped call's pairs can be dropped."""
    return len(ctx._keys), len(ctx._tables), skipping.spills


def _drop_since(mark: _Mark, ctx: TaskContext, skipping: skips.TaskSkips) -> None:
    """Drop the pairs a failed call emitted, unless a spill (or a batch made of the pairs
    before it) took them already."""
    keys, tables, spills = mark
    if skipping.spills != spills or len(ctx._keys) < keys:
        return
    del ctx._keys[keys:], ctx._values[keys:]
    for table in ctx._tables[tables:]:
        ctx._buffered -= table.nbytes
    del ctx._tables[tables:]


async def _setup(hook: HookFn | None, ctx: TaskContext) -> None:
    if hook is not None:
        async for _ in iter_user(hook, ctx):  # a setup's return value means nothing
            pass


async def _teardown(hook: HookFn | None, ctx: TaskContext) -> None:
    """A teardown: what it yields (or returns) is emitted, like a map's pairs."""
    if hook is not None:
        await _emit_results("teardown", hook(ctx), ctx)


async def _teardown_after_failure(hook: HookFn | None, ctx: TaskContext) -> None:
    """The teardown of an attempt whose user code raised: it releases what setup took;
    its pairs go nowhere, and its own error is logged so the first one is reported."""
    if hook is None:
        return
    try:
        async for _ in iter_user(hook, ctx):
            pass
    except Exception as exc:
        ctx.log.warning("teardown after a failure raised %s: %s", type(exc).__name__, exc)
    ctx._keys, ctx._values, ctx._tables, ctx._buffered = [], [], [], 0  # the attempt fails


async def _emit_results(role: str, result: Any, ctx: TaskContext) -> None:
    """Emit what one call of a map (or teardown) produced: ``result`` is its return value,
    a coroutine, or a (sync or async) generator of ``(key, value)`` pairs."""
    if isinstance(result, types.CoroutineType) or inspect.isawaitable(result):
        result = await result
        if result is None:
            return
    if inspect.isasyncgen(result):
        async for item in result:
            _emit_pair(role, item, ctx, returned=False)
    elif isinstance(result, types.GeneratorType) or inspect.isgenerator(result):
        for item in result:
            _emit_pair(role, item, ctx, returned=False)
    elif result is not None:
        _emit_pair(role, result, ctx, returned=True)


def _emit_pair(role: str, item: Any, ctx: TaskContext, *, returned: bool) -> None:
    if not (isinstance(item, tuple) and len(item) == 2):
        how = (f"returned a {type(item).__name__}" if returned
               else f"yielded a {type(item).__name__}: {item!r:.80}")
        raise PermanentTaskError(
            f"{role} must yield (key, value) tuples or call ctx.emit; it {how}")
    ctx.emit(*item)


async def _map_table(job: Job, splits: Sequence[MapSplit], ctx: TaskContext) -> shuffle.Table:
    """Call the user's map on its splits: everything it emitted, in emission order."""
    await _run_user_map(job, splits, ctx)
    return ctx._emitted()


class _MapSpills:
    """A map's sorted spills on local scratch, and the one shuffle object they become."""

    def __init__(self, job: Job, ctx: TaskContext, directory: Path,
                 budget: shuffle.ShuffleBudget) -> None:
        self.job, self.ctx, self.directory, self.budget = job, ctx, directory, budget
        self.files: list[Path] = []
        self.key_types: dict[str, int] = {}
        self.rows = 0  # pairs the map emitted (before any combiner)

    def spill(self, table: shuffle.Table) -> None:
        """Combine, partition, sort and write one full buffer (or the last) as a spill."""
        if table.num_rows == 0:
            return
        self.rows += table.num_rows
        combiner = self.job.map_side_combiner
        if isinstance(combiner, str):
            table = shuffle.combine(table, combiner)
        elif combiner is not None:
            self._write(self._combine(combiner, table), combined=True)
            return
        self._write(table)

    def combined(self, table: shuffle.Table, rows: int) -> None:
        """Spill a buffer of ``rows`` pairs the map has combined itself (a shell mapper's
        lines through a shell combiner, ``streaming.run_mapper_combined``)."""
        self.rows += rows
        self._write(table, combined=True)

    def _write(self, table: shuffle.Table, *, combined: bool = False) -> None:
        """Partition, sort and write one buffer as a spill; the output of a user combiner
        (``combined``) is not sorted again when it is in key order already."""
        kind = shuffle.key_type(table)
        if kind is not None:
            self.key_types.setdefault(kind, len(self.files))
            if len(self.key_types) > 1:
                first, second = list(self.key_types)[:2]
                raise PermanentTaskError(f"{self.ctx.task} emitted keys of type {first} and "
                                         f"{second}; a job's keys must share one type")
        path = self.directory / f"spill-{len(self.files):05d}"
        presorted = self.job.sort_values
        if presorted:
            # The secondary sort: rows by key, then value, so that every merge keeps values
            # in order and a reducer gets them sorted without sorting anything itself.
            table = order.sort_by_key_and_value(table)
        elif combined:
            presorted = shuffle.in_key_order(table)
        parts = shuffle.partition(table, self.ctx.partitions, self.job.partition_ids,
                                  presorted=presorted)
        spill.write_shuffle_file(path, [[part] for part in parts], self.budget.block_bytes)
        self.files.append(path)
        metrics.SPILLS.inc()
        metrics.SPILLED_BYTES.inc(path.stat().st_size)

    def _combine(self, fn: object, table: shuffle.Table) -> shuffle.Table:
        """A user combiner (or Shell command) on one buffer, as Hadoop runs it on every spill.

        A spill can happen inside ``ctx.emit``, where nothing can be awaited, so the
        combiner (``async def`` or plain) runs to completion on a private event loop in a
        helper thread while the map waits: user code still runs one call at a time. Pairs
        the combiner emits join its output rather than triggering another spill.
        """
        ctx = self.ctx
        spill, ctx._spill = ctx._spill, None
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="kubemr-combine") as pool:
                combined = (streaming.run_combiner(fn, shuffle.sort_by_key(table), ctx)
                            if isinstance(fn, Shell)
                            else _apply_user_reduce(fn, shuffle.sort_by_key(table), ctx))
                return pool.submit(asyncio.run, combined).result()
        finally:
            ctx._spill = spill

    def merge(self) -> tuple[Path, int] | None:
        """The spills merged into one shuffle object: path and size (None if no rows)."""
        if not self.files:
            return None
        if len(self.files) == 1:
            return self.files[0], self.files[0].stat().st_size
        combiner = self.job.map_side_combiner
        builtin = combiner if isinstance(combiner, str) else None
        indexes = [spill.read_index(path, self.ctx.partitions) for path in self.files]
        path = self.directory / "shuffle"
        with open(path, "wb") as f:
            writer = spill.ShuffleFileWriter(f, self.ctx.partitions, self.budget.block_bytes)
            for partition in range(self.ctx.partitions):
                slices = [index[partition] for index in indexes]
                for chunk in _merged(slices, self.directory / f"p{partition}", self.budget,
                                     builtin, self.job.sort_values, reduce_inputs=False):
                    writer.add(partition, chunk)
            size = writer.finish()
        return path, size


def _reader(source: spill.Slice, position: int | None = None) -> _Source:
    """A sorted input of a merge, read when the merge gets to it; a damaged block names
    the reduce input (``position``) it came from."""
    def read() -> Iterator[shuffle.Table]:
        try:
            yield from spill.read_blocks(source)
        except shuffle.CorruptRunError as exc:
            if position is None:
                raise
            raise CorruptRun(position, exc) from exc

    return read


def _merged(slices: list[spill.Slice], directory: Path, budget: shuffle.ShuffleBudget,
            combiner: shuffle.Combiner | None, by_value: bool, *,
            reduce_inputs: bool) -> Iterator[shuffle.Table]:
    """Sorted chunks of all ``slices`` (by key, or by key and value with ``by_value``),
    folded by ``combiner`` if it is a built-in; a damaged block of a reduce input raises
    :class:`CorruptRun` naming its position.

    Inputs that fit a small share of the budget together are read at once and sorted as
    one table (stable, so equal rows keep the inputs' order, as the merge keeps it): a
    reduce over thousands of tiny map outputs would otherwise spend its time stepping a
    k-way merge of thousands of streams in Python.
    """
    sources = [_reader(piece, position if reduce_inputs else None)
               for position, piece in enumerate(slices)]
    if sum(piece.length for piece in slices) * _ARROW_PER_STORED_BYTE <= budget.map_buffer:
        tables = [block for source in sources for block in source()]
        if by_value and combiner is None:
            table = order.sort_by_key_and_value(shuffle.concat_tables(tables))
        else:  # a fold leaves one row per key, so its order by value is moot
            table = shuffle.merge_runs(tables, combiner)
        return iter([table] if table.num_rows else [])
    if len(sources) > budget.merge_factor:
        directory.mkdir(exist_ok=True)
        sources = spill.merge_passes(sources, directory, budget, combiner, by_value=by_value)
    chunks = merge.merge_sorted([source() for source in sources],
                                chunk_bytes=budget.merge_chunk, by_value=by_value)
    return chunks if combiner is None else merge.fold_sorted(chunks, combiner)


def _releasing_memory(
        fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """A task's compute that hands its freed memory back to the OS when it ends (see
    ``allocators``), so the next task on this worker starts from what it needs."""
    @functools.wraps(fn)
    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        finally:
            allocators.release_unused()

    return run


@_releasing_memory
async def run_map(job: Job, splits: Sequence[MapSplit], ctx: TaskContext, directory: Path,
                  budget: shuffle.ShuffleBudget) -> tuple[tuple[Path, int] | None, str | None]:
    """Map the attempt's splits (one, or a batch's, in order) into one shuffle object in
    ``directory``: sort and spill, then merge.

    Emitted pairs are buffered up to the budget's map share; a full buffer is combined,
    partitioned, sorted and spilled (``_MapSpills.spill``), and the spills merge into one
    object. A shell mapper with a shell combiner buffers its stdout lines unparsed instead
    (``streaming.run_mapper_combined``), outside skip mode and multi-step pair inputs.
    Returns the object's path and size (None if the map emitted nothing) and the type of
    the keys, which the runtime checks against the other maps' before it commits.
    """
    await job.prepare_map(ctx)  # the total-order partition file, if the job has one
    spills = _MapSpills(job, ctx, directory, budget)
    ctx._spill, ctx._spill_bytes = spills.spill, budget.map_buffer
    if ctx._skips is not None:
        ctx._spill = _watched_spill(spills, ctx._skips)
    mapper, combiner = job.map_fn, job.map_side_combiner
    try:
        if (isinstance(mapper, Shell) and isinstance(combiner, Shell)
                and ctx._skips is None):
            await _run_shell_maps(job, mapper, splits, ctx, _ShellCombining(
                combiner, budget.map_buffer, spills.combined))
        else:
            await _run_user_map(job, splits, ctx)
    finally:
        ctx._spill = None
    spills.spill(ctx._emitted())
    ctx._counters.set_framework(counters.MAP_OUTPUT_RECORDS, spills.rows)
    kind = next(iter(spills.key_types), None)
    return spills.merge(), kind


def _watched_spill(spills: _MapSpills,
                   skipping: skips.TaskSkips) -> Callable[[shuffle.Table], None]:
    """Skip mode's spill: counted (a skipped call's pairs cannot be dropped past one), and
    its failure kept, so the map does not skip the record whose emit triggered it."""
    def spill(table: shuffle.Table) -> None:
        skipping.spills += 1
        try:
            spills.spill(table)
        except BaseException as exc:
            skipping.framework_error = exc
            raise

    return spill


@_releasing_memory
async def run_map_only(job: Job, splits: Sequence[MapSplit], ctx: TaskContext,
                       output_format: PartFormat) -> bytes:
    """Map the attempt's splits of a map-only job (no reducers): its result part, in
    emission order (a batch's splits in planning order).

    As in Hadoop, a map-only job has no shuffle, so no combiner runs and nothing is sorted;
    keys of different types in different maps are fine, as no reduce compares them.
    """
    table = await _map_table(job, splits, ctx)
    ctx._counters.set_framework(counters.MAP_OUTPUT_RECORDS, table.num_rows)
    return formats.encode(table, output_format)


@_releasing_memory
async def run_reduce(job: Job, sources: list[spill.Slice], ctx: TaskContext,
                     output_format: PartFormat, directory: Path,
                     budget: shuffle.ShuffleBudget) -> Path:
    """Reduce one partition from every map's slice (local files, in map order).

    The slices are k-way merged (in passes through ``directory`` when there are more than
    one pass holds) and fed to the reducer as they merge; the part is written to a file
    in ``directory`` chunk by chunk, whose path is returned. A damaged slice raises
    :class:`CorruptRun` with its position in ``sources``.
    """
    builtin = job.folding_reducer
    part = spill.PartWriter(directory / "part", output_format)
    try:
        await _setup(job.reduce_setup_fn, ctx)
        try:
            chunks = _merged(sources, directory / "merge", budget, builtin, job.sort_values,
                             reduce_inputs=True)
            if isinstance(job.reducer, Shell):
                await streaming.run_reducer(job.reducer, chunks, ctx, part)
            elif isinstance(job.reducer, str):  # a fold, or "identity": the rows as they merge
                for chunk in chunks:
                    part.write(chunk)
            else:
                groups = await _reduce_groups(job.reducer, chunks, ctx, part, directory, budget)
                ctx._counters.set_framework(counters.REDUCE_INPUT_GROUPS, groups)
        except Exception:
            await _teardown_after_failure(job.reduce_teardown_fn, ctx)
            raise
        await _teardown(job.reduce_teardown_fn, ctx)
        part.write(ctx._emitted())  # the teardown's rows (and any the setup emitted) end it
    except BaseException:
        part.abort()
        raise
    part.close()
    ctx._counters.set_framework(counters.REDUCE_OUTPUT_RECORDS, part.rows)
    return part.path


async def _reduce_groups(fn: object, chunks: Iterator[shuffle.Table], ctx: TaskContext,
                         part: spill.PartWriter, directory: Path,
                         budget: shuffle.ShuffleBudget) -> int:
    """Call a Python reduce once per key as the merged chunks arrive (see ``_Group``);
    returns how many keys (groups) it reduced.

    Values come in the merge's order: sorted within their key when the job sorts values.
    """
    out = _Output(part)
    group: _Group | None = None
    for chunk in chunks:
        for block in shuffle.blocks(chunk, budget.block_bytes):
            starts = shuffle.group_starts(block)
            ends = [*starts[1:].tolist(), block.num_rows]
            keys = shuffle.to_python(block.column("key").take(starts),
                                     shuffle.column_kind(block, "key"))
            values = shuffle.to_python(block.column("value"),
                                       shuffle.column_kind(block, "value"))
            row_bytes = block.nbytes / block.num_rows
            for key, start, end in zip(keys, starts.tolist(), ends, strict=True):
                if group is None or not _same_key(group.key, key):
                    if group is not None:
                        await out.reduce(fn, group, ctx)
                    group = _Group(key, directory, budget.group_values)
                group.add(values, start, end, block, row_bytes)
    if group is not None:
        await out.reduce(fn, group, ctx)
    out.flush()
    part.write(ctx._emitted())  # already PermanentTaskError for what cannot be shuffled
    return out.groups


def _same_key(left: Any, right: Any) -> bool:
    # A key spanning blocks is one group; NaN keys are one group although NaN != NaN.
    return bool(left == right or (left != left and right != right))


class _Group:
    """One key's values: a list while they fit the budget's share, else a scratch file."""

    __slots__ = ("_bytes", "_directory", "_file", "_limit", "_path", "_values", "key")

    def __init__(self, key: Any, directory: Path, limit: int) -> None:
        self.key = key
        self._directory, self._limit = directory, limit
        self._values: list[Any] = []
        self._bytes = 0.0
        self._file: BinaryIO | None = None
        self._path: Path | None = None

    def add(self, values: list[Any], start: int, end: int, block: shuffle.Table,
            row_bytes: float) -> None:
        """Rows ``start:end`` of ``block`` (their Python ``values``) belong to this key."""
        if self._file is None:
            if end - start == 1:
                self._values.append(values[start])
            else:
                self._values += values[start:end]
            self._bytes += (end - start) * row_bytes
            if self._bytes <= self._limit:
                return
            # Too big to hold: what is held so far goes to disk, and everything after it.
            self._path = self._directory / "group"
            self._file = open(self._path, "wb")  # noqa: SIM115 - closed in values()
            rows = shuffle.pairs_to_table([self.key] * len(self._values), self._values)
            self._values = []
        else:
            rows = block.slice(start, end - start)
        for piece in shuffle.blocks(rows, 1 << 20):
            self._file.write(shuffle.encode_run(piece))

    def values(self) -> list[Any] | LazyValues:
        if self._file is None or self._path is None:
            return self._values
        self._file.close()
        return LazyValues(spill.Slice(self._path, 0, self._path.stat().st_size))


class LazyValues(Iterable[Any]):
    """The values of a key too large for memory, read from local scratch as iterated.

    It can be iterated ONCE (a second pass raises RuntimeError): ``reduce`` gets it instead
    of a list only for a key whose values exceed the worker's budget share. With
    ``sort_values`` they come sorted, like a list would.
    """

    def __init__(self, source: spill.Slice) -> None:
        self._source = source
        self._used = False

    def __iter__(self) -> Iterator[Any]:
        if self._used:
            raise RuntimeError("the values of a key larger than memory can be iterated once")
        self._used = True
        return spill.values_of([self._source])


class _Output:
    """A reduce's output rows, written to the part every ``_OUTPUT_ROWS`` rows."""

    def __init__(self, part: spill.PartWriter) -> None:
        self.part = part
        self.keys: list[Any] = []
        self.values: list[Any] = []
        self.groups = 0

    async def reduce(self, fn: object, group: _Group, ctx: TaskContext) -> None:
        self.groups += 1
        skipping = ctx._skips
        if skipping is None:
            produced = await call_user(fn, group.key, group.values(), ctx)  # type: ignore[arg-type]
        else:
            mark = _mark(ctx, skipping)
            try:
                produced = await call_user(fn, group.key, group.values(), ctx)  # type: ignore[arg-type]
            except PermanentTaskError:
                raise
            except Exception as exc:
                _drop_since(mark, ctx, skipping)
                skipping.skip(skips.key_place(group.key), exc)
                ctx._counters.set_framework(counters.SKIPPED_RECORDS, skipping.count)
                ctx.log.warning("skipped key %s: %s", skips.key_place(group.key).get("key"),
                                skips.one_line(exc))
                return
        if len(produced) == 1:
            self.keys.append(group.key)
            self.values.append(produced[0])
        elif produced:
            self.keys += [group.key] * len(produced)
            self.values += produced
        if len(self.keys) >= _OUTPUT_ROWS:
            self.flush()

    def flush(self) -> None:
        try:
            table = shuffle.pairs_to_table(self.keys, self.values)
        except shuffle.ShuffleError as exc:
            raise PermanentTaskError(str(exc)) from exc
        self.part.write(table)
        self.keys, self.values = [], []


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
