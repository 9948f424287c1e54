"""Sample a job's keys before its maps run, and hand the total-order boundaries to the maps.

TeraSort's recipe: read a few records from a few input splits, cut the sorted sample into
R balanced ranges, write the R-1 boundaries to a partition file that every map reads. Here
the *job's own map* runs on the sampled bytes, so the sample holds the keys the maps will
emit (whatever the map does to its input), not raw input records.

Entry points, in the order a planner calls them:

* :func:`plan_total_order` (``job``, the planned ``splits``, ``partitions``) -> the
  boundaries, or None when the job needs none (not total-order, or one partition).
* :func:`prepare_partitioner` does that, writes the partition file to a URL every worker
  can read, and returns the spec with ``args[PARTITION_FILE_ARG]`` naming it. Call it
  where the job's tasks are planned, before the job record is created (``kubemr run``:
  ``local._run_in``; on a cluster: before ``protocol.plan`` in the operator, or as a
  sampling task, since the operator does not import job modules).
* Each map calls ``await job.prepare_map(ctx)`` before partitioning (it loads the file once
  per process), then partitions with ``job.partition_ids(keys, reducers)``.

The sample is deterministic: the same splits give the same windows (``order.sample_windows``)
and the same subsample (a fixed seed), so a re-planned job gets the same boundaries.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import pyarrow as pa

from . import compression, order, shuffle
from .api import PARTITION_FILE_ARG, Job, TaskContext, TotalOrderSampling
from .errors import JobFailed, PermanentTaskError
from .execute import _map_table as map_table  # the map exactly as a map task runs it
from .inputs import Split, read_split, read_task_input
from .spec import JobSpec
from .storage.urls import StoreCache

log = logging.getLogger(__name__)

__all__ = ["plan_total_order", "prepare_partitioner", "sample_keys"]

SAMPLE_SEED = 0


async def sample_keys(job: Job, splits: Sequence[Split], settings: TotalOrderSampling,
                      stores: StoreCache | None = None) -> tuple[pa.Array, str | None]:
    """Run the job's map on deterministic windows of the inputs; the sampled key column.

    Returns at most ``settings.sample`` keys and their Python type name (None: no keys).
    Compressed inputs and unsplit inputs are read whole (they cannot be read in windows).
    """
    stores = stores or StoreCache()
    sizes = [(rng[1] - rng[0]) if rng is not None else 1 for _, rng in splits]
    windows = order.sample_windows(sizes, settings.splits, settings.per_split, settings.window)
    tables = []
    whole: set[int] = set()
    for index, begin, end in windows:
        url, rng = splits[index]
        store, key = stores.open(url)
        if rng is None or job.map_input == "name" or compression.codec_for(key) is not None:
            if index in whole:
                continue
            whole.add(index)
            data = (b"" if job.map_input == "name"
                    else await read_task_input(store, key, rng))
        else:
            offset = rng[0]
            data = await read_split(store, key, offset + begin, offset + end,
                                    await store.size(key))
        ctx = TaskContext(job=job.name, task="sample", attempt=1, partitions=1, input=url,
                          stores=stores)
        tables.append(await map_table(job, data, ctx))
    table = shuffle.concat_tables(tables)
    keys = order.subsample(table.column("key"), settings.sample, seed=SAMPLE_SEED)
    if isinstance(keys, pa.Array):
        keys = keys.cast(table.schema.field("key").type)
    return pa.array(keys), shuffle.key_type(table)


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


async def prepare_partitioner(job: object, spec: JobSpec, splits: Sequence[Split],
                              url: str, stores: StoreCache | None = None) -> JobSpec:
    """Sample, write the partition file to ``url``, and return the spec that names it.

    A job that needs no partition file (not a key/value job, not total-order, at most one
    reducer) gets ``spec`` back unchanged and nothing is written.
    """
    if not isinstance(job, Job):
        return spec
    stores = stores or StoreCache()
    try:
        boundaries = await plan_total_order(job, splits, spec.reducers, stores)
    except Exception as exc:  # the user's map ran here: report it as the job's failure
        raise JobFailed(f"job {spec.name} failed: sampling keys for the total-order "
                        f"partitioner: {type(exc).__name__}: {exc}") from exc
    if boundaries is None:
        return spec
    store, key = stores.open(url)
    await store.put(key, boundaries.to_bytes())
    log.info("total-order boundaries written", extra={"job": spec.name, "url": url})
    return dataclasses.replace(spec, args={**spec.args, PARTITION_FILE_ARG: store.url(key)})
