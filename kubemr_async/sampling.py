"""Sample a job's keys before its maps run, and hand the total-order boundaries to the maps.

TeraSort's recipe: read a few records from a few input splits, cut the sorted sample into
R balanced ranges, write the R-1 boundaries to a partition file that every map reads. Here
the *job's own map* runs on the sampled bytes, so the sample holds the keys the maps will
emit (whatever the map does to its input), not raw input records.

Entry points:

* :func:`plan_total_order` (``job``, the planned ``splits``, ``partitions``) -> the
  boundaries, or None when the job needs none (not total-order, or one partition).
* :func:`write_partition_file` does that and writes the partition file; both ways of
  running a job go through it:

  - ``kubemr run`` samples where it plans the job, before the job record is created:
    :func:`prepare_partitioner` (called by ``local._run_in``) writes the file into the
    run's work directory and returns the spec with ``args[PARTITION_FILE_ARG]`` naming it.
  - On a cluster the operator plans the job but never imports job modules, so the
    *workers* sample: before its first map of a total-order job (``runtime.Worker``), a
    worker calls :func:`ensure_partition_file` on ``<job prefix>/map/PARTITION_FILE``
    (beside the shuffle objects, so it is removed with them when the job succeeds, and
    kept, for a retry to reuse, when it fails). An existing file is loaded; otherwise the
    worker samples from the map tasks' splits, writes the file, and uses what it reads
    back. Every worker that samples gets the same bytes, so two writing at once is
    harmless. A map that raises on the sample fails its task for good
    (:class:`SamplingFailed`), and with it the job.

* Each map calls ``await job.prepare_map(ctx)`` before partitioning (it loads the file
  named in ``ctx.args`` once per process), then partitions with
  ``job.partition_ids(keys, reducers)``.

The sample is deterministic: the same splits give the same windows (``order.sample_windows``)
and the same subsample (a fixed seed), so a re-planned job, or every worker of a cluster
job, gets the same boundaries -- provided the map is deterministic, which re-running a
failed map already assumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence

import pyarrow as pa

from . import compression, order, recordio, shuffle
from .api import PARTITION_FILE_ARG, Job, TaskContext, TotalOrderSampling
from .errors import JobFailed, PermanentTaskError
from .execute import MapData, MapSplit
from .execute import _map_table as map_table  # the map exactly as a map task runs it
from .inputs import Split, read_map_input, read_split, read_split_at, text_split
from .spec import JobSpec
from .storage.base import BlobNotFound, BlobStore
from .storage.urls import StoreCache

log = logging.getLogger(__name__)

__all__ = ["PARTITION_FILE", "SamplingFailed", "ensure_partition_file", "plan_total_order",
           "prepare_partitioner", "sample_keys", "write_partition_file"]

SAMPLE_SEED = 0
#: The partition file's name under a cluster job's intermediate prefix (``<prefix>/map/``).
PARTITION_FILE = "_partition-file"


class SamplingFailed(PermanentTaskError):
    """The job's map raised on the sampled input; running it again would raise again."""


def _sampling_failure(exc: BaseException) -> str:
    return f"sampling keys for the total-order partitioner: {type(exc).__name__}: {exc}"


async def sample_keys(job: Job, splits: Sequence[Split], settings: TotalOrderSampling,
                      stores: StoreCache | None = None) -> tuple[pa.Array, str | None]:
    """Run the job's map on deterministic windows of the inputs; the sampled key column.

    Returns at most ``settings.sample`` keys and their Python type name (None: no keys).
    Splits that cannot be read in windows are read from their start: a Parquet split whole
    (by its row groups), an unsplit input's or a compressed input's stream in pieces of a
    window's size until they hold as many bytes as its windows span (reaching further
    windows of a compressed stream would mean decoding all that comes before them).
    """
    stores = stores or StoreCache()
    sizes = [(rng[1] - rng[0]) if rng is not None else 1 for _, rng in splits]
    windows = order.sample_windows(sizes, settings.splits, settings.per_split, settings.window)
    spans: dict[int, int] = {}
    for index, begin, end in windows:
        spans[index] = spans.get(index, 0) + end - begin
    tables = []
    for index, begin, end in windows:
        url, rng = splits[index]
        store, key = stores.open(url)
        data: MapData
        if (rng is None or job.map_input in ("name", "parquet", "pairs")
                or compression.codec_for(key) is not None):
            span = spans.pop(index, None)
            if span is None:  # read from its start already
                continue
            if job.map_input == "name":
                tables.append(await _map_sample(job, url, b"", stores))
                continue
            taken = 0
            async with contextlib.aclosing(read_map_input(
                    store, key, rng, job.map_input, settings.window)) as pieces:
                async for data in pieces:
                    tables.append(await _map_sample(job, url, data, stores))
                    taken += recordio.split_bytes(data)
                    if taken >= span:
                        break
            continue
        if job.map_input in recordio.RECORD_INPUTS:  # a window of records (CSV: + header)
            size = await store.size(key)
            start, window = await read_split_at(store, key, rng[0] + begin, rng[0] + end, size)
            data = dataclasses.replace(
                await text_split(store, key, start, window, job.map_input, size), window=True)
        else:
            offset = rng[0]
            data = await read_split(store, key, offset + begin, offset + end,
                                    await store.size(key))
        tables.append(await _map_sample(job, url, data, stores))
    table = shuffle.concat_tables(tables)
    keys = order.subsample(table.column("key"), settings.sample, seed=SAMPLE_SEED)
    if isinstance(keys, pa.Array):
        keys = keys.cast(table.schema.field("key").type)
    return pa.array(keys), shuffle.key_type(table)


async def _map_sample(job: Job, url: str, data: MapData,
                      stores: StoreCache) -> shuffle.Table:
    """The job's map on sampled input from ``url``: what it emitted."""
    ctx = TaskContext(job=job.name, task="sample", attempt=1, partitions=1, input=url,
                      stores=stores)
    try:
        return await map_table(job, [MapSplit.held(url, data)], ctx)
    # The user's map: name the sampling in the job's failure. SystemExit too: `kubemr
    # run` samples in its own process, which sys.exit() in the map ended silently.
    except (Exception, SystemExit) as exc:
        raise SamplingFailed(_sampling_failure(exc)) from exc


async def plan_total_order(job: Job, splits: Sequence[Split], partitions: int,
                           stores: StoreCache | None = None) -> order.TotalOrder | None:
    """The boundaries for ``partitions`` parts; None if the job needs no sample."""
    settings = job.total_order_sampling
    if settings is None or partitions <= 1:
        return None
    keys, key_type = await sample_keys(job, splits, settings, stores)
    if len(keys) == 0:
        # The input is empty, or the sampled windows emit nothing: no boundaries, so every
        # key goes to part 0. Still a total order, whatever the keys' type.
        log.warning("total-order sample is empty; every key goes to the first partition")
        return order.TotalOrder(pa.array([], pa.binary()), partitions, "bytes", "")
    try:
        return order.TotalOrder.from_sample(keys, partitions, key_type or "")
    except shuffle.ShuffleError as exc:
        raise PermanentTaskError(f"cannot choose total-order boundaries: {exc}") from exc


async def write_partition_file(job: Job, splits: Sequence[Split], partitions: int,
                               store: BlobStore, key: str,
                               stores: StoreCache | None = None) -> bool:
    """Sample and write the boundaries to ``key`` in ``store``; False if none are needed."""
    boundaries = await plan_total_order(job, splits, partitions, stores)
    if boundaries is None:
        return False
    await store.put(key, boundaries.to_bytes())
    log.info("total-order boundaries written", extra={"job": job.name, "url": store.url(key)})
    return True


async def prepare_partitioner(job: object, spec: JobSpec, splits: Sequence[Split],
                              url: str, stores: StoreCache | None = None) -> JobSpec:
    """Sample, write the partition file to ``url``, and return the spec that names it.

    A job that needs no partition file (not a key/value job, not total-order, at most one
    reducer) gets ``spec`` back unchanged and nothing is written. Any failure while sampling
    is the job's: JobFailed, naming the sampling.
    """
    if not isinstance(job, Job):
        return spec
    stores = stores or StoreCache()
    store, key = stores.open(url)
    try:
        written = await write_partition_file(job, splits, spec.reducers, store, key, stores)
    except Exception as exc:
        reason = str(exc) if isinstance(exc, SamplingFailed) else _sampling_failure(exc)
        raise JobFailed(f"job {spec.name} failed: {reason}") from exc
    if not written:
        return spec
    return dataclasses.replace(spec, args={**spec.args, PARTITION_FILE_ARG: store.url(key)})


async def ensure_partition_file(job: Job, splits: Callable[[], Sequence[Split]],
                                partitions: int, store: BlobStore, key: str,
                                stores: StoreCache | None = None) -> order.TotalOrder | None:
    """The boundaries in the partition file at ``key``, sampling and writing it if absent.

    A cluster's workers call this before their first map (the operator cannot sample: it
    imports no job module). An existing file is loaded as is; an absent one is sampled from
    ``splits()`` (every map task's input and byte range, in task order), written, and read
    back, so every worker uses what is stored. The sample is deterministic, so workers that
    sample at once write identical bytes. None when the job needs no boundaries.
    """
    if not job.needs_boundaries(partitions):
        return None
    try:
        data = await store.get(key)
    except BlobNotFound:
        log.info("sampling keys for the total-order partitioner",
                 extra={"job": job.name, "url": store.url(key)})
        await write_partition_file(job, splits(), partitions, store, key, stores)
        data = await store.get(key)
    try:
        return order.TotalOrder.from_bytes(data)
    except shuffle.ShuffleError as exc:
        raise PermanentTaskError(
            f"the partition file {store.url(key)} is unreadable: {exc}") from exc
