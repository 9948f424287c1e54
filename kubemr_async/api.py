"""The user's face of kubemr-async: a :class:`Job` with ``async def`` (or plain) callbacks.

Two ways to write a job:

* key/value (most users): decorate ``map`` (emits ``(key, value)`` pairs), optionally
  ``combine``, and ``reduce``; the framework partitions, shuffles, sorts and writes the
  results in the job's output format (``key<TAB>value`` lines by default; see formats).
  ``sum``/``count``/``min``/``max`` are built in and run vectorized on both sides of the
  shuffle. Callbacks may be ``async def`` or plain ``def``, each either returning or
  yielding; plain functions run on the user thread. A job without a reducer is map-only
  (run with ``reducers`` 0).
* low level (the seed's interface, full control): subclass :class:`JobWorker` with
  ``map(task_id, input) -> {partition: output string}`` and
  ``reduce(partition, inputs) -> output string``; inputs and outputs are plain strings whose
  meaning is up to you, and :class:`TaskContext` offers helpers to fetch and store objects.

A job module defines one module-level ``Job`` or ``JobWorker`` instance, or a
:class:`Pipeline` of ``Job`` steps (a multi-step job); workers import the module by path or
name and find it (see :func:`load_job`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import sys
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from . import counters, order, shuffle, skips
from .errors import JobDefinitionError, PermanentTaskError
from .recordio import RECORD_INPUTS
from .spec import InvalidSpec, JobSpec
from .storage.urls import StoreCache

#: Pairs from ctx.emit collected in Python lists before they become a table the map's
#: spill can measure (only when spilling; without it they stay lists to the end).
_PAIRS_PER_TABLE = 65_536

#: ``identity`` writes every (key, value) row as it comes out of the merge (Hadoop's
#: IdentityReducer); the others fold each key's values and also combine map-side.
Builtin = shuffle.Combiner | Literal["identity"]
COMBINERS: tuple[shuffle.Combiner, ...] = ("sum", "count", "min", "max")
BUILTINS: tuple[Builtin, ...] = (*COMBINERS, "identity")
MapInput = Literal["text", "bytes", "name", "lines", "jsonl", "csv", "parquet", "pairs"]
#: Inputs handed to the map once per split; the others (recordio) once per record.
SPLIT_INPUTS: tuple[MapInput, ...] = ("text", "bytes", "name")

# Callbacks may be ``async def`` (plain or generators) or plain ``def`` (plain or generators).
MapFn = Callable[[Any, "TaskContext"], Awaitable[None] | AsyncIterator[tuple[Any, Any]]
                 | Iterator[tuple[Any, Any]] | None]
ReduceFn = Callable[[Any, list[Any], "TaskContext"], Awaitable[Any] | AsyncIterator[Any]
                    | Iterator[Any] | Any]
# Setup and teardown hooks: ``fn(ctx)``, plain or async; a teardown may yield pairs.
HookFn = Callable[["TaskContext"], Any]
# A partitioner: per key ``fn(key, partitions) -> int``, or vectorized
# ``fn(keys: pyarrow.Array, partitions) -> sequence of ints``.
PartitionFn = Callable[[Any, int], Any]

# ctx.args key under which the planner tells maps where the total-order partition file is.
PARTITION_FILE_ARG = "kubemr.partition-file"


@dataclass(frozen=True)
class Shell:
    """A shell command as a map, combine or reduce step, with Hadoop Streaming's protocol.

    ``job.map(Shell("tr -s ' ' '\\n'"))``, ``job.combine(Shell(...))``,
    ``job.reduce(Shell("uniq -c"))``: the command runs under ``/bin/sh -c`` once per task
    (a combiner: once per spill buffer). A mapper reads its split's lines on stdin and
    writes ``key<TAB>value`` lines (no TAB: the line is the key, the value empty); a
    combiner or reducer reads ``key<TAB>value`` lines sorted by key, each key's lines
    contiguous. A reducer's stdout lines are its result part's lines as they are (text
    format). Keys and values are UTF-8 text; ``reporter:counter:GROUP,NAME,N`` and
    ``reporter:status:MSG`` lines on stderr update the task's counters and status. See
    :mod:`kubemr_async.streaming`.
    """

    command: str

    def __post_init__(self) -> None:
        if not isinstance(self.command, str) or not self.command.strip():
            raise JobDefinitionError(f"Shell needs a command, got {self.command!r}")

    def __str__(self) -> str:
        return self.command


@dataclass(frozen=True)
class TotalOrderSampling:
    """How the total-order partitioner samples keys before the maps run (as TeraSort does).

    ``splits`` evenly spaced input splits are read in ``per_split`` evenly spaced windows of
    ``window`` bytes each; the job's own map runs on those bytes, and ``sample`` of the keys
    it emits (chosen deterministically) become the sample the boundaries are cut from.
    Sampling the map's *output* keys, not raw input, is what makes any map shape work.
    """

    sample: int = 100_000
    splits: int = 10
    per_split: int = 8
    window: int = 128 << 10


@dataclass
class TaskContext:
    """What a callback knows about the attempt it runs in, and how it emits and does I/O."""

    job: str
    task: str
    attempt: int
    partitions: int
    input: str = ""
    args: Mapping[str, str] = field(default_factory=dict)
    scratch: str = ""
    stores: StoreCache = field(default_factory=StoreCache, repr=False)
    log: logging.LoggerAdapter[logging.Logger] = field(
        default_factory=lambda: logging.LoggerAdapter(logging.getLogger("kubemr.user"), {}))
    #: The attempt's own state, shared by its setup, its map or reduce calls and its
    #: teardown (a fresh dict per attempt: a retry starts from an empty one).
    state: dict[str, Any] = field(default_factory=dict)
    _keys: list[Any] = field(default_factory=list, repr=False)
    _values: list[Any] = field(default_factory=list, repr=False)
    _tables: list[shuffle.Table] = field(default_factory=list, repr=False)
    # The map's sort-and-spill: once the buffered pairs pass _spill_bytes (Arrow size),
    # _spill takes them (see execute.run_map); None keeps everything (reduce, map-only).
    _spill: Callable[[shuffle.Table], None] | None = field(default=None, repr=False)
    _spill_bytes: int = field(default=0, repr=False)
    _buffered: int = field(default=0, repr=False)
    # This attempt's counters: written with its commit, so only a committed attempt counts.
    _counters: counters.TaskCounters = field(default_factory=counters.TaskCounters,
                                             repr=False)
    # Skip mode (spec.maxSkippedRecords > 0): this attempt's skipped records; None: off.
    _skips: skips.TaskSkips | None = field(default=None, repr=False)

    #: The latest status a callback or a command (``reporter:status:``) set.
    status: str = ""

    def __post_init__(self) -> None:
        self._counters.task = self.task

    def counter(self, group: str, name: str, n: int = 1) -> None:
        """Add ``n`` (an int, may be negative) to counter ``name`` of ``group``.

        Hadoop's and mrjob's counters: the job's totals (``status.counters``, the
        ``_SUCCESS`` manifest, ``kubemr run``'s summary) sum the increments of the attempt
        that committed each task, exactly once: a failed, retried or abandoned attempt's
        increments never count. Names are 1-100 characters without control characters;
        a task may keep at most 16 distinct counters (see :mod:`kubemr_async.counters`).
        A bad call raises :class:`~kubemr_async.errors.CounterError`, failing the task.
        """
        self._counters.add(group, name, n)

    def emit(self, key: Any, value: Any) -> None:
        """Emit one pair (fine for modest volumes; prefer :meth:`emit_batch` in hot loops)."""
        self._keys.append(key)
        self._values.append(value)
        if self._spill is not None and len(self._keys) >= _PAIRS_PER_TABLE:
            keys, values, self._keys, self._values = self._keys, self._values, [], []
            self.emit_batch(keys, values)

    def emit_batch(self, keys: Any, values: Any) -> None:
        """Emit many pairs at once: sequences, numpy or Arrow arrays; ``values`` may be a scalar."""
        try:
            self._append(shuffle.pairs_to_table(keys, values))
        except shuffle.ShuffleError as exc:
            raise PermanentTaskError(str(exc)) from exc

    def _append(self, table: shuffle.Table) -> None:
        self._tables.append(table)
        self._buffered += table.nbytes
        if self._spill is not None and self._buffered > self._spill_bytes:
            self._spill(self._emitted())

    def _emitted(self) -> shuffle.Table:
        tables = list(self._tables)
        try:
            if self._keys or not tables:
                tables.insert(0, shuffle.pairs_to_table(self._keys, self._values))
            return shuffle.concat_tables(tables)
        except shuffle.ShuffleError as exc:
            raise PermanentTaskError(str(exc)) from exc
        finally:
            self._keys, self._values, self._tables, self._buffered = [], [], [], 0

    def output_url(self, name: str) -> str:
        """A location in the job's storage that belongs to this attempt alone.

        Low-level jobs write their outputs here: a zombie attempt that lost its lease writes
        to its own URLs, so it can never overwrite what the winning attempt committed.
        """
        return f"{self.scratch.rstrip('/')}/{name}"

    async def fetch(self, url: str) -> bytes:
        """Read a whole object: a local path or an ``s3://bucket/key`` URL."""
        store, key = self.stores.open(url)
        return await store.get(key)

    async def store(self, url: str, data: bytes | str) -> str:
        """Write an object atomically and return its URL (what a low-level job returns)."""
        store, key = self.stores.open(url)
        await store.put(key, data.encode() if isinstance(data, str) else data)
        return store.url(key)


class Job:
    """A key/value MapReduce job built from decorated ``async def`` callbacks."""

    def __init__(self, name: str = "", *, sort_values: bool = False,
                 reducers: int | None = None) -> None:
        self.name = name
        if reducers is not None and (isinstance(reducers, bool) or not isinstance(reducers, int)
                                     or reducers < 0):
            raise JobDefinitionError(
                f"job {name or '(unnamed)'}: reducers must be an int >= 0, got {reducers!r}")
        #: The job's own reducer count (a top-N step needs exactly 1): it wins over
        #: ``--reducers`` in ``kubemr run``; a cluster spec must agree (see check).
        self.reducers = reducers
        self.map_fn: MapFn | Shell | None = None
        self.map_input: MapInput = "text"
        self.map_setup_fn: HookFn | None = None
        self.map_teardown_fn: HookFn | None = None
        self.reduce_setup_fn: HookFn | None = None
        self.reduce_teardown_fn: HookFn | None = None
        self.combiner: shuffle.Combiner | ReduceFn | Shell | None = None
        self.reducer: Builtin | ReduceFn | Shell | None = None
        # Values reach reduce sorted (in the key order of their type) within each key.
        self.sort_values = sort_values
        self.partitioner: Literal["hash"] | TotalOrderSampling | PartitionFn = "hash"
        self.partition_vectorized = False
        # The total-order boundaries once a partition file is loaded, and that file's URL.
        self.total_order: order.TotalOrder | None = None
        self._partition_file: str | None = None

    def map(self, fn: MapFn | Shell | None = None, *, input: MapInput = "text") -> Any:
        """Register the map callback: ``async def fn(input, ctx)`` (or a plain ``def``),
        or a :class:`Shell` command reading the split on stdin.

        ``input`` chooses what the callback receives. ``"pairs"``: a ``(key, value)``
        tuple per record of a ``parquet`` result part (what every step of a
        :class:`Pipeline` after the first reads). Once per input split: ``"text"``
        (str, undecodable bytes kept via surrogateescape), ``"bytes"``, or ``"name"`` (the
        input string itself, for callbacks that do their own I/O). Once per record
        (``kubemr_async.recordio``): ``"lines"`` (a str line without its ``\n`` or
        ``\r\n``), ``"jsonl"`` (a decoded JSON value per non-blank line), ``"csv"`` (a row
        as a dict keyed by the file's header line) or ``"parquet"`` (a
        ``pyarrow.RecordBatch``; files are split by row group). The callback either yields
        ``(key, value)`` pairs or calls ``ctx.emit``/``ctx.emit_batch``.
        """
        kinds = (*SPLIT_INPUTS, *RECORD_INPUTS)
        if input not in kinds:
            raise JobDefinitionError(
                f"map input must be one of {', '.join(map(repr, kinds))}, got {input!r}")

        def register(func: MapFn | Shell) -> MapFn | Shell:
            if isinstance(func, Shell):  # its stdin is the split's bytes, whatever input says
                self.map_fn, self.map_input = func, "bytes"
                return func
            _require_callable("map", func)
            self.map_fn, self.map_input = func, input
            return func

        return register(fn) if fn is not None else register

    def map_setup(self, fn: HookFn) -> HookFn:
        """Register ``fn(ctx)`` (plain or async), run once per map attempt before its input.

        Keep what the map and the teardown need in ``ctx.state`` (a dict per attempt).
        """
        _require_callable("map_setup", fn)
        self.map_setup_fn = fn
        return fn

    def map_teardown(self, fn: HookFn) -> HookFn:
        """Register ``fn(ctx)``, run once per map attempt after its last record or split.

        It may emit final pairs (``ctx.emit``, or yield ``(key, value)``). It also runs when
        the map raised (to release resources; what it emits is then discarded, and an
        error of its own is logged, not raised over the map's).
        """
        _require_callable("map_teardown", fn)
        self.map_teardown_fn = fn
        return fn

    def reduce_setup(self, fn: HookFn) -> HookFn:
        """Register ``fn(ctx)``, run once per reduce attempt before its first key."""
        _require_callable("reduce_setup", fn)
        self.reduce_setup_fn = fn
        return fn

    def reduce_teardown(self, fn: HookFn) -> HookFn:
        """Register ``fn(ctx)``, run once per reduce attempt after its last key; the
        ``(key, value)`` rows it emits or yields end the partition's part."""
        _require_callable("reduce_teardown", fn)
        self.reduce_teardown_fn = fn
        return fn

    def combine(self, fn: shuffle.Combiner | ReduceFn | Shell) -> Any:
        """Register a map-side combiner: a built-in name, ``async def fn(key, values, ctx)``
        or a :class:`Shell` command (run on every spill buffer, sorted by key)."""
        self.combiner = _builtin_or_callable("combine", fn, COMBINERS)
        return fn

    def reduce(self, fn: Builtin | ReduceFn | Shell, *,
               sort_values: bool | None = None) -> Any:
        """Register the reducer: a built-in name, ``async def fn(key, values, ctx)`` or a
        :class:`Shell` command reading the partition's sorted ``key<TAB>value`` lines.

        A callable returns (or yields) the value(s) written for the key in the job's output
        format; returning None writes nothing for that key. ``sort_values=True`` (also
        ``Job(sort_values=True)``) hands each key's values over sorted, as mrjob's
        ``SORT_VALUES`` and Hadoop's secondary sort do; otherwise their order is unspecified.
        """
        self.reducer = _builtin_or_callable("reduce", fn, BUILTINS)
        if sort_values is not None:
            self.sort_values = sort_values
        return fn

    def partition(self, fn: Literal["hash", "total-order"] | PartitionFn | None = None, *,
                  vectorized: bool = False, sample: int = TotalOrderSampling.sample,
                  splits: int = TotalOrderSampling.splits) -> Any:
        """Choose how keys are assigned to reduce partitions.

        * ``"hash"`` (default): the stable FNV-1a hash of the key's bytes
          (``shuffle.partition_ids``); spreads keys evenly, no order across parts.
        * ``"total-order"``: part 0's keys all precede part 1's, and so on, so the parts
          concatenated are sorted. Keys are sampled before the maps run (``sample`` keys
          from ``splits`` input splits; see :class:`TotalOrderSampling`), and the
          boundaries are balanced even when a few keys repeat very often
          (``kubemr_async.order``).
        * a callable ``fn(key, partitions) -> int`` (per key, Python), or with
          ``vectorized=True`` ``fn(keys, partitions)`` taking a pyarrow array and returning
          one int per key (numpy array or sequence). Must be deterministic: every map must
          send a key to the same partition. Usable as a decorator, bare (``@job.partition``)
          or with options (``@job.partition(vectorized=True)``): without ``fn`` this
          returns the decorator, as :meth:`map` does.
        """
        if fn is None:
            def register(func: PartitionFn) -> PartitionFn:
                return self.partition(func, vectorized=vectorized)  # type: ignore[no-any-return]
            return register
        if fn == "hash":
            self.partitioner = "hash"
        elif fn == "total-order":
            if sample < 1 or splits < 1:
                raise JobDefinitionError(
                    f"total-order sample and splits must be positive, got {sample}, {splits}")
            self.partitioner = TotalOrderSampling(sample=sample, splits=splits)
        elif isinstance(fn, str):
            raise JobDefinitionError(
                f"unknown partitioner {fn!r}; use 'hash', 'total-order' or a callable")
        else:
            _require_callable("partition", fn)
            self.partitioner = fn
        self.partition_vectorized = vectorized
        self.total_order, self._partition_file = None, None
        return fn

    @property
    def total_order_sampling(self) -> TotalOrderSampling | None:
        """The sampling settings when the job wants a total order, else None."""
        p = self.partitioner
        return p if isinstance(p, TotalOrderSampling) else None

    def needs_boundaries(self, partitions: int) -> bool:
        """Whether maps into ``partitions`` parts need a partition file (sampled boundaries)."""
        return self.total_order_sampling is not None and partitions > 1

    @property
    def partition_file(self) -> str | None:
        """The URL of the partition file whose boundaries are installed (None: none yet)."""
        return self._partition_file

    def use_total_order(self, boundaries: order.TotalOrder | bytes,
                        source: str | None = None) -> None:
        """Install the boundaries (a partition file's bytes, or a TotalOrder) for the maps.

        ``source`` is the partition file's URL they came from, so :meth:`prepare_map` does
        not load it again.
        """
        if self.total_order_sampling is None:
            raise JobDefinitionError("the job does not use the total-order partitioner")
        self.total_order = (boundaries if isinstance(boundaries, order.TotalOrder)
                            else order.TotalOrder.from_bytes(boundaries))
        self._partition_file = source

    async def prepare_map(self, ctx: TaskContext) -> None:
        """Before a map partitions: load the partition file, once per process.

        ``ctx.args[PARTITION_FILE_ARG]`` names it: ``kubemr run`` samples before planning
        (``sampling.prepare_partitioner``); on a cluster the worker samples, or loads what
        another worker sampled, before its first map (``sampling.ensure_partition_file``).
        A job that needs none returns at once.
        """
        url = ctx.args.get(PARTITION_FILE_ARG)
        if not self.needs_boundaries(ctx.partitions) or url is None:
            return
        if self._partition_file != url:
            self.use_total_order(await ctx.fetch(url), source=url)

    def partition_ids(self, keys: pa.Array | pa.ChunkedArray, reducers: int
                      ) -> npt.NDArray[np.int64]:
        """The reduce partition of every key: the one function the map side calls.

        ``keys`` is the key column of a shuffle table (Arrow); the result holds one id in
        ``[0, reducers)`` per key. Raises PermanentTaskError for a partitioner that cannot
        answer (a total order whose boundaries were never loaded, a callable returning a
        bad id), since running the map again would give the same answer.
        """
        if reducers < 1:
            raise ValueError(f"reducers must be at least 1, got {reducers}")
        p = self.partitioner
        try:
            if p == "hash":  # one partition holds every key: nothing to hash
                return (np.zeros(len(keys), dtype=np.int64) if reducers == 1
                        else shuffle.partition_ids(keys, reducers))
            if isinstance(p, TotalOrderSampling):
                if reducers == 1:
                    return np.zeros(len(keys), dtype=np.int64)
                if self.total_order is None:
                    raise PermanentTaskError(
                        "the total-order partitioner has no boundaries: the map ran before "
                        "the job's keys were sampled (sampling.prepare_partitioner, or "
                        "sampling.ensure_partition_file before the first map)")
                return self.total_order.partition_ids(keys, reducers)
            return _checked_ids(p, keys, reducers, self.partition_vectorized)
        except shuffle.ShuffleError as exc:
            raise PermanentTaskError(str(exc)) from exc

    def check(self, where: str, reducers: int | None = None) -> None:
        """Refuse a job that cannot run with ``reducers`` partitions (None: not known yet).

        A job without a reducer is a map-only job: it runs only with ``reducers`` 0, where
        each map's output is a result part (a reducer, if defined, is then not used).
        """
        if self.map_fn is None:
            raise JobDefinitionError(f"{where}: the job has no map callback (use @job.map)")
        if self.reducers is not None and reducers is not None and reducers != self.reducers:
            raise JobDefinitionError(
                f"{where}: the job fixes reducers={self.reducers} but the spec has "
                f"reducers: {reducers}")
        if self.reducer is None and reducers:
            raise JobDefinitionError(
                f"{where}: the job has no reducer; add one (job.reduce(...); --reducer CMD "
                "for shell commands) or run it map-only with --reducers 0 (reducers: 0 in "
                "the job spec)")

    @property
    def map_side_combiner(self) -> shuffle.Combiner | ReduceFn | Shell | None:
        """Built-in folds are associative, so they also combine map-side by default."""
        return self.combiner if self.combiner is not None else self.folding_reducer

    @property
    def folding_reducer(self) -> shuffle.Combiner | None:
        """The built-in fold the reduce side applies as it merges (None: not a fold)."""
        return self.reducer if self.reducer in COMBINERS else None


def _checked_ids(fn: PartitionFn, keys: pa.Array | pa.ChunkedArray, reducers: int,
                 vectorized: bool) -> npt.NDArray[np.int64]:
    """Call a user partitioner and refuse an answer that is not one valid id per key."""
    if vectorized:
        ids = np.asarray(fn(keys, reducers))
    else:
        ids = np.asarray([fn(key, reducers) for key in keys.to_pylist()])
    if ids.shape != (len(keys),) or (len(keys) and ids.dtype.kind not in "iu"):
        raise PermanentTaskError(
            f"the partitioner must return one int per key; for {len(keys)} keys it returned "
            f"an array of shape {ids.shape} and dtype {ids.dtype}")
    bad = np.flatnonzero((ids < 0) | (ids >= reducers))
    if bad.size:
        key = keys[int(bad[0])].as_py()
        raise PermanentTaskError(
            f"the partitioner sent key {key!r:.60} to partition {int(ids[bad[0]])}; "
            f"expected an int in [0, {reducers})")
    return ids.astype(np.int64, copy=False)


class JobWorker:
    """The seed's low-level interface: partition and do I/O yourself; strings in and out."""

    name = ""

    async def map(self, task_id: int, input: str, ctx: TaskContext) -> Mapping[int, str]:
        raise NotImplementedError

    async def reduce(self, partition: int, inputs: list[str], ctx: TaskContext) -> str:
        raise NotImplementedError


AnyJob = Job | JobWorker


class Pipeline:
    """A multi-step job (mrjob's ``MRStep`` list): ``Pipeline("topn", [count, top])``.

    Every step is a :class:`Job` (map, optional combine and reduce: callbacks, built-ins or
    :class:`Shell` commands), run in order as one job. Each step after the first reads the
    previous step's output as ``(key, value)`` pairs (map input ``"pairs"``), with the
    types they were written with: every step but the last writes its parts in the
    ``parquet`` format into the run's own space (never the output), and they are deleted
    once the next step has committed. A step's ``Job(reducers=N)`` fixes its reducer count
    (a top-N step wants 1); other steps use the run's. A module that defines a Pipeline is
    that job (its steps' Jobs may be module-level too).
    """

    def __init__(self, name: str, steps: Sequence[Job]) -> None:
        self.name = name
        what = f"pipeline {name or '(unnamed)'}"
        if isinstance(steps, str | bytes) or not isinstance(steps, Sequence):
            raise JobDefinitionError(f"{what}: steps must be a list of Jobs, "
                                     f"got {type(steps).__name__}")
        if not steps:
            raise JobDefinitionError(f"{what} has no steps; give it a list of at least one Job")
        first: dict[int, int] = {}
        for number, step in enumerate(steps, 1):
            if not isinstance(step, Job):
                raise JobDefinitionError(
                    f"{what}: step {number} is a {type(step).__name__}, not a kubemr_async.Job")
            if id(step) in first:
                raise JobDefinitionError(
                    f"{what}: step {number} is step {first[id(step)]}'s Job again; "
                    "define a Job per step")
            first[id(step)] = number
            if step.map_fn is None:
                raise JobDefinitionError(
                    f"{what}: step {number} ({step.name or 'unnamed'}) has no map callback "
                    "(use @job.map before building the Pipeline)")
            if number > 1:
                # A later step reads pairs: a Python map per pair, a Shell map as lines.
                if step.map_input not in ("text", "pairs") and not isinstance(step.map_fn, Shell):
                    raise JobDefinitionError(
                        f"{what}: step {number} ({step.name or 'unnamed'}) reads step "
                        f"{number - 1}'s (key, value) pairs; its map input must be 'pairs', "
                        f"not {step.map_input!r}")
                step.map_input = "pairs"
        self.steps: tuple[Job, ...] = tuple(steps)

    def __len__(self) -> int:
        return len(self.steps)

    def step(self, index: int, where: str) -> Job:
        """Step ``index`` (0-based); a one-line error naming ``where`` if there is none."""
        if not 0 <= index < len(self.steps):
            raise JobDefinitionError(
                f"{where}: step {index + 1} does not exist (pipeline {self.name} has "
                f"{len(self.steps)} step{'s' if len(self.steps) > 1 else ''})")
        return self.steps[index]

    def label(self, index: int) -> str:
        """How messages and progress name a step: ``step 2/3 (top)``."""
        name = self.steps[index].name
        return f"step {index + 1}/{len(self.steps)}" + (f" ({name})" if name else "")


def _require_callable(role: str, fn: Any) -> None:
    if not callable(fn):
        raise JobDefinitionError(f"{role} callback must be callable, got {type(fn).__name__}")


def _builtin_or_callable(role: str, fn: Any, builtins: tuple[str, ...]) -> Any:
    if isinstance(fn, Shell):
        return fn
    if isinstance(fn, str):
        if fn not in builtins:
            raise JobDefinitionError(
                f"unknown built-in {role} {fn!r}; choose one of {', '.join(builtins)}")
        return fn
    _require_callable(role, fn)
    return fn


async def call_user(fn: Callable[..., Any], *args: Any) -> list[Any]:
    """Call a callback written any supported way and collect what it produced.

    Returns the yielded items, or ``[value]`` for a non-None return value (see
    :func:`iter_user`).
    """
    # Once per key in a Python reduce: the common shapes are checked first and without an
    # async generator in between (iter_user's laziness is for maps).
    result = fn(*args)
    if isinstance(result, types.GeneratorType):
        return list(result)
    if isinstance(result, types.CoroutineType) or inspect.isawaitable(result):
        result = await result
    elif inspect.isasyncgen(result):
        return [item async for item in result]
    if isinstance(result, types.GeneratorType):
        return list(result)
    return [] if result is None else [result]


async def iter_user(fn: Callable[..., Any], *args: Any) -> AsyncIterator[Any]:
    """Call a callback written any supported way and yield what it produces, as it does.

    ``async def`` returning a value or an awaitable, an async generator, a plain ``def``
    returning a value, or a generator function: the caller is already on the user thread
    (see runtime.UserLoop), so plain functions run there and block nothing but user code.
    Lazily, so a map that yields more pairs than fit in memory can be spilled as it goes.
    """
    result = fn(*args)
    if inspect.isasyncgen(result):
        async for item in result:
            yield item
        return
    if inspect.isawaitable(result):
        result = await result
    if inspect.isgenerator(result):
        for item in result:
            yield item
    elif result is not None:
        yield result


@dataclass(frozen=True)
class Commands:
    """Shell-command steps from the job spec (``mapper``, ``combiner``, ``reducer``)."""

    mapper: str | None = None
    combiner: str | None = None
    reducer: str | None = None

    def __bool__(self) -> bool:
        return bool(self.mapper or self.combiner or self.reducer)


def load_job(ref: str, reducers: int | None = None, commands: Commands | None = None,
             *, step: int = 0, steps: int = 1) -> AnyJob:
    """Import a job module (a ``.py`` path, or ``package.module`` with an optional ``:attr``).

    ``commands`` (the spec's shell steps) replace the module's steps they name; with no
    module (``ref`` empty) they are the whole job (``Job("streaming")``).
    A module that defines a :class:`Pipeline` gives its step ``step`` (0-based), and must
    have ``steps`` steps (the spec's count); a single job is one step.
    Raises JobDefinitionError with a one-line reason: missing file, import failure, no job,
    several jobs without ``:attr`` to choose, a step count that does not match, or a job
    that cannot run with ``reducers`` partitions (when given).
    """
    if commands:
        job = Job("streaming") if not ref else _import_target(ref)
        if isinstance(job, Pipeline):
            raise JobDefinitionError(
                f"{ref}: --mapper/--combiner/--reducer cannot replace a step of a multi-step "
                "job; use Shell(...) in its steps")
        if not isinstance(job, Job):
            raise JobDefinitionError(
                f"{ref}: a JobWorker job cannot take --mapper/--combiner/--reducer commands")
        if commands.mapper:
            job.map(Shell(commands.mapper))
        if commands.combiner:
            job.combine(Shell(commands.combiner))
        if commands.reducer:
            job.reduce(Shell(commands.reducer))
        return _checked(_single(job, ref or "the shell-command job", step, steps),
                        ref or "the shell-command job", reducers)
    found = _import_target(ref)
    if isinstance(found, Pipeline):
        return _pipeline_step(found, ref, step, steps, reducers)
    return _checked(_single(found, ref, step, steps), ref, reducers)


def _pipeline_step(found: Pipeline, ref: str, step: int, steps: int,
                   reducers: int | None) -> AnyJob:
    """Step ``step`` of ``found``, checked with its reducer count; the pipeline must have
    the ``steps`` steps the spec says."""
    if len(found) != steps:
        hint = ("; give spec.steps (kubemr submit fills it from the module)"
                if steps == 1 else "")
        raise JobDefinitionError(
            f"{ref}: pipeline {found.name} has {len(found)} steps but the job spec says "
            f"steps: {steps}{hint}")
    where = f"{ref} {found.label(step)}" if 0 <= step < len(found) else ref
    return _checked(found.step(step, ref), where, reducers)


def load_steps(ref: str, reducers: int, commands: Commands | None = None
               ) -> tuple[str, list[AnyJob]]:
    """The name and every step of a job module, each checked with its reducer count (a
    step's own ``Job(reducers=N)``, else ``reducers``): a single job is one step."""
    found = _import_target(ref) if ref and not commands else None
    if not isinstance(found, Pipeline):
        # Checked with the count it will run with (its own, as a pipeline's step is), not
        # ``reducers``: a single job's ``Job(reducers=N)`` wins over --reducers too.
        job = load_job(ref, None, commands)
        _checked(job, ref or "the shell-command job", step_reducer_count(job, reducers))
        return job.name, [job]
    for index, step in enumerate(found.steps):
        _checked(step, f"{ref} {found.label(index)}", step_reducer_count(step, reducers))
    return found.name, list(found.steps)


def step_reducer_count(job: AnyJob, reducers: int) -> int:
    """A step's reducer count: its own ``Job(reducers=N)``, else the run's (``reducers``)."""
    return job.reducers if isinstance(job, Job) and job.reducers is not None else reducers


def _batch_refusal(steps: Sequence[AnyJob], splits_per_task: int) -> str | None:
    """Why ``spec.splitsPerTask`` cannot batch these steps (a low-level JobWorker gets one
    input per map), or None: what `kubemr submit` and the workers both check."""
    if splits_per_task > 1 and not all(isinstance(step, Job) for step in steps):
        return ("must be 1 for a low-level JobWorker job (it maps one input per task), "
                f"got {splits_per_task}")
    return None


def pipeline_reducers(ref: str, reducers: int, commands: Commands | None = None,
                      splits_per_task: int = 1) -> tuple[int, ...]:
    """Each step's reducer count of a multi-step job module (``spec.stepReducers``; their
    number is ``spec.steps``), or () for a single job. Every step is checked, as by
    `kubemr run`, so a broken pipeline fails before it is submitted; with
    ``splits_per_task`` above 1, also that no step is a low-level JobWorker (which gets
    one input per map), a refusal the operator could not make without the module."""
    _, steps = load_steps(ref, reducers, commands)
    if (refusal := _batch_refusal(steps, splits_per_task)) is not None:
        raise InvalidSpec("spec.splitsPerTask", refusal)
    return tuple(step_reducer_count(step, reducers) for step in steps) if len(steps) > 1 else ()


def _single(job: AnyJob, ref: str, step: int, steps: int) -> AnyJob:
    if steps != 1 or step != 0:
        raise JobDefinitionError(
            f"{ref} defines a single-step job but the job spec says steps: {steps}, "
            f"step: {step + 1}")
    return job


def load_spec_job(spec: JobSpec) -> AnyJob:
    """The job a spec describes: its module, its shell commands, or both (see load_job);
    for a multi-step job, the spec's step."""
    return load_job(spec.job, spec.reducers,
                    Commands(spec.mapper, spec.combiner, spec.reducer),
                    step=spec.step, steps=spec.steps)


def load_spec_steps(spec: JobSpec) -> list[AnyJob]:
    """Every step a spec describes, the module imported once and each step checked with
    its own reducer count: a MapReduceJob's workers run whichever step is current. A
    single-step spec gives its one job (see load_spec_job).

    Also refused here, before any task is claimed, what only the module can tell: a
    low-level JobWorker step asked to batch its inputs (`kubemr submit` says so when it
    can load the module; a manifest applied with kubectl is only checked here)."""
    if spec.steps == 1 or Commands(spec.mapper, spec.combiner, spec.reducer):
        steps = [load_spec_job(spec)]  # commands cannot replace a pipeline's steps: it says so
    else:
        found = _import_target(spec.job)
        if not isinstance(found, Pipeline):
            steps = [_single(found, spec.job, 0, spec.steps)]  # refuses: the counts differ
        else:
            steps = [_pipeline_step(found, spec.job, step, spec.steps,
                                    spec.at_step(step).reducers) for step in range(spec.steps)]
    if (refusal := _batch_refusal(steps, spec.splits_per_task)) is not None:
        raise JobDefinitionError(f"spec.splitsPerTask: {refusal}")
    return steps


def _import_target(ref: str) -> AnyJob | Pipeline:
    target, _, attr = ref.partition(":") if not ref.endswith(".py") else (ref, "", "")
    module: Any
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise JobDefinitionError(f"job module {target} does not exist")
        name = f"kubemr_user_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise JobDefinitionError(f"job module {target} cannot be imported")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except JobDefinitionError as exc:  # a Pipeline or Job refused at import: say why
            raise JobDefinitionError(f"job module {target}: {exc}") from exc
        except (Exception, SystemExit) as exc:  # sys.exit() at import too: say so, not exit
            raise JobDefinitionError(
                f"job module {target} failed to import: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except JobDefinitionError as exc:
            raise JobDefinitionError(f"job module {target}: {exc}") from exc
        except (Exception, SystemExit) as exc:  # sys.exit() at import too: say so, not exit
            raise JobDefinitionError(
                f"job module {target} failed to import: {type(exc).__name__}: {exc}") from exc
    if attr:
        found = getattr(module, attr, None)
        if not isinstance(found, Job | JobWorker | Pipeline):
            raise JobDefinitionError(
                f"{ref}: {attr} is not a kubemr_async Job, JobWorker or Pipeline")
        return found
    pipelines = [v for v in vars(module).values() if isinstance(v, Pipeline)]
    if len(pipelines) > 1:
        raise JobDefinitionError(
            f"job module {ref} defines several pipelines; name one as {ref}:NAME")
    if pipelines:  # the steps' Jobs are its parts, not jobs of their own
        return pipelines[0]
    jobs: Sequence[AnyJob] = [v for v in vars(module).values() if isinstance(v, Job | JobWorker)]
    if not jobs:
        raise JobDefinitionError(
            f"job module {ref} defines no job (expected a module-level kubemr_async.Job, "
            "JobWorker or Pipeline instance)")
    if len(jobs) > 1:
        raise JobDefinitionError(f"job module {ref} defines several jobs; name one as {ref}:NAME")
    return jobs[0]


def _checked(job: AnyJob, ref: str, reducers: int | None) -> AnyJob:
    if isinstance(job, Job):
        job.check(ref, reducers)
    elif reducers == 0:
        raise JobDefinitionError(
            f"{ref}: a JobWorker job partitions its own output and needs at least one reducer")
    return job
