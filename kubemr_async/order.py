"""The key order, defined once, and the total-order partitioner. Pure: no I/O.

The key order
-------------
A job's keys share one type (``shuffle`` refuses a table, and the runtime a job, whose keys
mix types), so the order only has to be total *within* a type. Every key maps to one of
three *domains*, and the order is the domain's:

=============================  =========  ==================================================
key kind (see ``shuffle``)     domain     order
=============================  =========  ==================================================
str, strbytes, bytes, JSON     bytes      bytewise (unsigned, shorter prefix first) on the
                                          key's bytes: a str is its UTF-8 bytes under the
                                          ``surrogateescape`` rule (``shuffle.str_to_bytes``),
                                          a JSON key its canonical encoding
int, bool                      int        numeric (int64; False < True)
float                          float      numeric; -0.0 equals 0.0; NaN after +inf, all NaN
                                          equal (the map side already canonicalises them)
=============================  =========  ==================================================

Bytewise is the order ``LC_ALL=C sort``, Hadoop's ``BytesWritable`` and Spark's binary type
use; for valid UTF-8 it equals code point order, so str keys sort as Python sorts them. Keys
of different domains are not compared: asking is an error naming both types, the same rule
``shuffle.concat_tables`` applies. ``shuffle.sort_by_key`` (the map-side sort and the
reduce-side merge) orders keys this way; ``tests/test_order.py`` checks that the two agree.

The total-order partitioner
---------------------------
Hash partitioning scatters neighbouring keys, so the concatenated parts are not sorted.
TeraSort's answer is to sample keys before the maps run, choose R-1 *boundaries* from the
sample, and send key ``k`` to the number of boundaries ``<= k`` (a binary search). Then
every key of part ``i`` precedes every key of part ``i+1``, and equal keys always meet in
one part, because the partition is a function of the key alone.

Choosing boundaries as plain sample quantiles fails on skewed data: when one key is half
the sample, several quantiles equal it, the part it starts gets it *and* whatever follows.
:func:`choose_boundaries` works on the distinct sample keys weighted by their counts and
places the cuts one by one: each cut's ideal position is what is left of the sample divided
by the parts left, moved to the nearer edge of the key it falls in (a key is never split),
and at least one key past the previous cut. A cut thus misses its ideal by at most half of
one key's weight, so a part holds about ``n / R`` sampled rows plus at most the heaviest
key (the property tests check ``<= n / R + heaviest``); a key heavier than a part's share
ends up alone in its part, and since the ideal is recomputed after every cut, the parts
after a heavy key share what is left instead of staying empty. Parts are empty only when
the sample has fewer distinct keys than R; they are still written, so part numbers stay
``0 .. R-1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from . import shuffle

__all__ = [
    "Domain",
    "OrderError",
    "TotalOrder",
    "choose_boundaries",
    "compare",
    "domain_of",
    "is_sorted",
    "key_and_value_order",
    "partition_by_boundaries",
    "sample_windows",
    "searchsorted",
    "sort_by_key_and_value",
    "sort_indices",
    "sort_keys",
    "subsample",
]

Domain = Literal["bytes", "int", "float"]
Keys: TypeAlias = "pa.Array | pa.ChunkedArray | npt.NDArray[Any] | Sequence[Any]"
# An Arrow binary array (bytes domain) or a numpy int64/float64 array; pyarrow is untyped.
_Normal: TypeAlias = Any

# Byte keys up to this long are searched as fixed-width numpy strings (fast); longer ones
# through one Arrow sort of keys and boundaries together (any length).
FIXED_WIDTH_LIMIT = 64
_LENGTH_BYTES = 4

_FILE_KIND = b"kubemr.partitioner"
_FILE_PARTITIONS = b"kubemr.partitions"
_FILE_DOMAIN = b"kubemr.domain"
_FILE_KEY_TYPE = b"kubemr.key-type"


class OrderError(shuffle.ShuffleError):
    """Keys that cannot be ordered together, or a damaged partition file."""


# --------------------------------------------------------------------------- domains


def domain_of(keys: Keys) -> Domain:
    """The order domain of a key column (see the module docstring)."""
    return _normalise(keys)[0]


def _normalise(keys: Keys) -> tuple[Domain, _Normal]:
    """Keys as one array of their domain: Arrow binary, or numpy int64 / float64."""
    if isinstance(keys, pa.ChunkedArray):
        keys = shuffle.single_array(keys)
    if not isinstance(keys, pa.Array):
        # The map side's own conversion rules (and its canonical floats).
        keys = shuffle.single_array(shuffle.pairs_to_table(keys, None).column("key"))
    kind = keys.type
    if keys.null_count and not pa.types.is_null(kind):
        raise OrderError("null keys have no place in the key order")
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "bytes", keys.view(pa.large_binary() if pa.types.is_large_string(kind)
                                  else pa.binary())
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "bytes", keys
    if pa.types.is_boolean(kind) or pa.types.is_integer(kind):
        return "int", np.asarray(keys.to_numpy(zero_copy_only=False), dtype=np.int64)
    if pa.types.is_floating(kind):
        return "float", np.asarray(keys.to_numpy(zero_copy_only=False), dtype=np.float64)
    if pa.types.is_null(kind):
        return "bytes", pa.array([], pa.binary())
    raise OrderError(f"keys of Arrow type {kind} have no defined order")


def _same_domain(left: Domain, right: Domain, what: str) -> None:
    if left != right:
        raise OrderError(f"cannot order {right} keys against {what} of the {left} domain; "
                         "a job's keys share one type")


# --------------------------------------------------------------------------- sort, compare


def sort_indices(keys: Keys) -> npt.NDArray[np.int64]:
    """The stable ascending order of ``keys`` in the key order (indices into ``keys``)."""
    domain, values = _normalise(keys)
    if domain == "bytes":
        # Bytewise, unsigned; by 8-byte prefixes first, ties through Arrow's stable sort.
        return shuffle.prefix_order(values)
    # numpy's sort puts NaN last, as the key order does.
    return np.argsort(values, kind="stable").astype(np.int64, copy=False)


def sort_keys(keys: Keys) -> _Normal:
    """The keys in ascending key order (byte keys as Arrow binary, numbers as numpy)."""
    domain, values = _normalise(keys)
    order = sort_indices(values)
    return values.take(pa.array(order)) if domain == "bytes" else values[order]


def compare(left: Keys, right: Keys) -> npt.NDArray[np.int8]:
    """Element-wise -1, 0 or 1 as ``left[i]`` sorts before, with or after ``right[i]``."""
    domain, a = _normalise(left)
    other, b = _normalise(right)
    _same_domain(domain, other, "keys")
    if len(a) != len(b):
        raise ValueError(f"compare takes arrays of one length, got {len(a)} and {len(b)}")
    if domain == "bytes":
        less = pc.less(a, b).to_numpy(zero_copy_only=False)
        greater = pc.greater(a, b).to_numpy(zero_copy_only=False)
    elif domain == "float":
        a_nan, b_nan = np.isnan(a), np.isnan(b)
        less = (a < b) | (b_nan & ~a_nan)
        greater = (a > b) | (a_nan & ~b_nan)
    else:
        less, greater = a < b, a > b
    result: npt.NDArray[np.int8] = greater.astype(np.int8) - less.astype(np.int8)
    return result


def is_sorted(keys: Keys) -> bool:
    """Whether the keys are in non-descending key order."""
    _, values = _normalise(keys)
    if len(values) < 2:
        return True
    return not bool((compare(values[:-1], values[1:]) > 0).any())


def sort_by_key_and_value(table: shuffle.Table) -> shuffle.Table:
    """A shuffle table ordered by key, then by value: what ``sort_values`` asks for.

    Values follow the key order of their own kind (bytewise for str, bytes and JSON values,
    numerically for numbers); a column of mixed value types is JSON, so mixed values
    order by their canonical JSON bytes. Equal (key, value) rows keep their order.
    """
    if table.num_rows < 2:
        return table
    return table.take(pa.array(key_and_value_order(table)))


def key_and_value_order(table: shuffle.Table) -> npt.NDArray[np.int64]:
    """The stable order of ``table``'s rows by key, then value (indices into the table).

    The keys are sorted alone (fast for distinct keys: see ``shuffle.prefix_order``); only
    rows whose key repeats are sorted again, by (key rank, value, row).
    """
    if table.num_rows < 2:
        return np.arange(table.num_rows, dtype=np.int64)
    domain, keys = _normalise(table.column("key"))
    by_key = sort_indices(keys)
    ranked = keys.take(pa.array(by_key)) if domain == "bytes" else keys[by_key]
    same = _equal_neighbours(domain, ranked)
    if not same.any() or table.schema.field("value").type == pa.null():
        return by_key
    in_tie = np.zeros(len(by_key), dtype=np.bool_)
    in_tie[1:] = same
    in_tie[:-1] |= same
    tied = np.flatnonzero(in_tie)
    members = by_key[tied]
    run = np.cumsum(np.concatenate(([True], ~same)))[tied]
    _, values = _normalise(table.column("value").take(pa.array(members)))
    rows = pa.table({"run": run, "value": values, "row": members})
    by = [("run", "ascending"), ("value", "ascending"), ("row", "ascending")]
    # Arrow sorts binary bytewise and puts NaN after every number, as the key order does.
    by_key[tied] = members[pc.sort_indices(rows, sort_keys=by).to_numpy()]
    return by_key


def _equal_neighbours(domain: Domain, ranked: _Normal) -> npt.NDArray[np.bool_]:
    """Whether each row of sorted ``ranked`` equals the next (NaN equals NaN)."""
    if domain == "bytes":
        equal = pc.equal(ranked.slice(1), ranked.slice(0, len(ranked) - 1))
        return np.asarray(equal.to_numpy(zero_copy_only=False), dtype=np.bool_)
    same: npt.NDArray[np.bool_] = ranked[1:] == ranked[:-1]
    if domain == "float":
        same |= np.isnan(ranked[1:]) & np.isnan(ranked[:-1])
    return same


# --------------------------------------------------------------------------- searching


def searchsorted(boundaries: Keys, keys: Keys) -> npt.NDArray[np.int64]:
    """For each key, how many of the (ascending) ``boundaries`` are ``<=`` it.

    numpy's ``searchsorted(boundaries, keys, side="right")`` in the key order, for any
    domain; byte keys of any length (numpy's own fixed-width strings would ignore trailing
    NUL bytes, so each key is padded and followed by its length, which keeps the order).
    """
    domain, bounds = _normalise(boundaries)
    other, values = _normalise(keys)
    _same_domain(domain, other, "boundaries")
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    if len(bounds) == 0:
        return np.zeros(len(values), dtype=np.int64)
    if domain != "bytes":
        return np.asarray(np.searchsorted(bounds, values, side="right"), dtype=np.int64)
    width = max(_longest(bounds), _longest(values))
    if width <= FIXED_WIDTH_LIMIT:
        fixed_bounds = _fixed_width(bounds, width)
        return np.asarray(np.searchsorted(fixed_bounds, _fixed_width(values, width),
                                          side="right"), dtype=np.int64)
    return _merge_rank(bounds, values)


def _layout(array: pa.Array) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64],
                                      npt.NDArray[np.uint8]]:
    """Start and length of each byte string in the data buffer."""
    large = pa.types.is_large_binary(array.type)
    offset_type = np.dtype(np.int64 if large else np.int32)
    _, offset_buffer, data_buffer = array.buffers()
    offsets = np.frombuffer(offset_buffer, dtype=offset_type, count=len(array) + 1,
                            offset=array.offset * offset_type.itemsize).astype(np.int64)
    data = np.frombuffer(data_buffer or b"", dtype=np.uint8)
    return offsets[:-1], np.diff(offsets), data


def _longest(array: pa.Array) -> int:
    return int(pc.max(pc.binary_length(array)).as_py() or 0) if len(array) else 0


def _fixed_width(array: pa.Array, width: int) -> npt.NDArray[np.bytes_]:
    """Each string zero-padded to ``width`` and followed by its length, big-endian.

    (padded bytes, length) orders exactly as the strings do bytewise, and numpy compares
    equal-width ``S`` items as memcmp does, so searchsorted on these is the key order.
    """
    starts, lengths, data = _layout(array)
    rows = len(array)
    out = np.zeros((rows, width + _LENGTH_BYTES), dtype=np.uint8)
    last = max(data.size - 1, 0)
    for position in range(width):
        present = lengths > position
        if not present.any():
            break
        out[:, position] = np.where(present, data[np.minimum(starts + position, last)]
                                    if data.size else 0, 0)
    out[:, width:] = lengths.astype(">u4").view(np.uint8).reshape(rows, _LENGTH_BYTES)
    return out.view(f"S{width + _LENGTH_BYTES}").ravel()


def _merge_rank(bounds: pa.Array, values: pa.Array) -> npt.NDArray[np.int64]:
    """searchsorted by one stable sort of boundaries followed by keys (long byte keys)."""
    combined = pa.concat_arrays([bounds.cast(pa.large_binary()), values.cast(pa.large_binary())])
    order = np.asarray(pc.sort_indices(combined).to_numpy(), dtype=np.int64)
    # Stable: a boundary equal to a key comes first, so it counts as "<=".
    is_bound = order < len(bounds)
    ranks = np.cumsum(is_bound)
    result = np.empty(len(values), dtype=np.int64)
    result[order[~is_bound] - len(bounds)] = ranks[~is_bound]
    return result


# --------------------------------------------------------------------------- boundaries


def _distinct_counts(domain: Domain, values: _Normal) -> tuple[_Normal, npt.NDArray[np.int64]]:
    """The distinct keys in ascending order and how often each occurs."""
    ordered = sort_keys(values)
    if domain == "bytes":
        if len(ordered) == 0:
            return ordered, np.zeros(0, dtype=np.int64)
        changed = pc.not_equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1))
        starts = np.concatenate(([0], np.flatnonzero(
            changed.to_numpy(zero_copy_only=False)) + 1)).astype(np.int64)
        counts = np.diff(np.append(starts, len(ordered)))
        return ordered.take(pa.array(starts)), counts.astype(np.int64)
    # equal_nan groups every (canonical) NaN into one key, as the reduce side does.
    distinct, counts = np.unique(ordered, return_counts=True, equal_nan=True)
    return distinct, counts.astype(np.int64)


def _successor(domain: Domain, largest: Any) -> Any:
    """The smallest key above ``largest`` (or ``largest`` itself where there is none)."""
    if domain == "bytes":
        return largest + b"\x00"
    if domain == "int":
        return largest + 1 if largest < np.iinfo(np.int64).max else largest
    with np.errstate(over="ignore"):
        return float(np.nextafter(largest, np.inf)) if np.isfinite(largest) else largest


def _cut_edges(counts: npt.NDArray[np.int64], partitions: int) -> npt.NDArray[np.int64]:
    """Where the ``partitions - 1`` cuts go, as edges between distinct keys (0 .. D).

    Cut by cut, the ideal position is what is left divided by the parts left, so a heavy
    key that fills one part does not leave the parts after it empty; each cut moves to the
    nearer edge of the key it falls in (never splitting a key), and at least one key past
    the previous cut while keys remain.
    """
    edges = np.concatenate(([0], np.cumsum(counts)))
    total, size = int(edges[-1]), len(counts)
    cuts = np.zeros(partitions - 1, dtype=np.int64)
    previous = 0
    for i in range(partitions - 1):
        done = int(edges[previous])
        ideal = done + (total - done) / (partitions - i)
        inside = min(int(np.searchsorted(edges, ideal, side="right")) - 1, size - 1)
        start, end = edges[inside], edges[inside + 1]
        edge = inside if ideal - start <= end - ideal else inside + 1
        previous = cuts[i] = min(max(edge, previous + 1), size)
    return cuts


def choose_boundaries(sample: Keys, partitions: int) -> _Normal:
    """``partitions - 1`` ascending boundaries balancing ``sample`` (module docstring).

    Part ``i`` gets the keys ``k`` with ``boundaries[i-1] <= k < boundaries[i]``. The
    boundaries may repeat (an empty part between them) but never decrease. An empty sample
    is an error: there is nothing to balance (an empty input needs no total order).
    """
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    domain, values = _normalise(sample)
    if partitions == 1:
        return values.slice(0, 0) if domain == "bytes" else values[:0]
    if len(values) == 0:
        raise OrderError("cannot choose partition boundaries from an empty sample")
    distinct, counts = _distinct_counts(domain, values)
    edge = _cut_edges(counts, partitions)
    size = len(distinct)
    if domain == "bytes":
        items = [*distinct.to_pylist(), _successor(domain, distinct[size - 1].as_py())]
        return pa.array([items[e] for e in edge.tolist()], pa.binary())
    extended = np.append(distinct, _successor(domain, distinct[-1].item())).astype(
        distinct.dtype)
    return extended[edge]


def partition_by_boundaries(keys: Keys, boundaries: Keys, partitions: int
                            ) -> npt.NDArray[np.int64]:
    """The part of each key: how many boundaries are ``<=`` it (``< partitions``)."""
    ids = searchsorted(boundaries, keys)
    if len(ids) and int(ids.max()) >= partitions:
        raise OrderError(f"{len(boundaries)} boundaries do not fit {partitions} partitions")
    return ids


# --------------------------------------------------------------------------- the partition file


@dataclass(frozen=True)
class TotalOrder:
    """Boundaries for ``partitions`` parts, and how they travel to every map.

    ``to_bytes`` writes a *partition file* (TeraSort's ``_partition.lst``): a checksummed
    shuffle run (``shuffle.encode_run``) whose key column holds the boundaries, with the
    partition count, the domain and the sampled key type in its schema metadata.
    """

    boundaries: _Normal
    partitions: int
    domain: Domain
    key_type: str = ""

    @classmethod
    def from_sample(cls, sample: Keys, partitions: int, key_type: str = "") -> TotalOrder:
        domain, values = _normalise(sample)
        return cls(choose_boundaries(values, partitions), partitions, domain, key_type)

    def partition_ids(self, keys: Keys, partitions: int) -> npt.NDArray[np.int64]:
        """The part of each key; ``partitions`` must be the count the boundaries are for."""
        if partitions != self.partitions:
            raise OrderError(f"the total-order boundaries are for {self.partitions} "
                             f"partitions, the job has {partitions}")
        domain, values = _normalise(keys)
        if len(self.boundaries) == 0:  # an empty sample: one part holds every key
            return np.zeros(len(values), dtype=np.int64)
        if domain != self.domain:
            raise OrderError(
                f"the total-order sample's keys are of the {self.domain} domain "
                f"({self.key_type or 'unknown type'}) but the map emitted {domain} keys; "
                "a job's keys share one type")
        return partition_by_boundaries(values, self.boundaries, partitions)

    def to_bytes(self) -> bytes:
        bounds = pa.array(self.boundaries) if isinstance(self.boundaries, np.ndarray) \
            else self.boundaries
        metadata = {_FILE_KIND: b"total-order",
                    _FILE_PARTITIONS: str(self.partitions).encode(),
                    _FILE_DOMAIN: self.domain.encode(),
                    _FILE_KEY_TYPE: self.key_type.encode()}
        table = pa.table({"key": bounds, "value": pa.nulls(len(bounds))}).replace_schema_metadata(
            metadata)
        return shuffle.encode_run(table)

    @classmethod
    def from_bytes(cls, data: bytes) -> TotalOrder:
        try:
            table = shuffle.decode_run(data)
        except shuffle.CorruptRunError as exc:
            raise OrderError(f"partition file is damaged: {exc}") from exc
        metadata = table.schema.metadata or {}
        if metadata.get(_FILE_KIND) != b"total-order":
            raise OrderError("not a total-order partition file")
        domain = metadata[_FILE_DOMAIN].decode()
        if domain not in ("bytes", "int", "float"):
            raise OrderError(f"partition file names an unknown domain {domain!r}")
        _, bounds = _normalise(table.column("key"))
        return cls(bounds, int(metadata[_FILE_PARTITIONS]), domain,
                   metadata.get(_FILE_KEY_TYPE, b"").decode())


# --------------------------------------------------------------------------- sampling plan


def sample_windows(sizes: Sequence[int], splits: int, per_split: int, window: int
                   ) -> list[tuple[int, int, int]]:
    """Where to read a deterministic sample: ``(split index, start, end)`` byte ranges.

    ``splits`` evenly spaced input splits (all when there are fewer), and in each
    ``per_split`` evenly spaced windows of ``window`` bytes (offsets relative to the split;
    a split smaller than the windows is read whole). Reading from several places in a
    split, not only its head, keeps a sorted or clustered input from biasing the sample.
    The same sizes always give the same windows, so every planner agrees.
    """
    if splits < 1 or per_split < 1 or window < 1:
        raise ValueError("splits, per_split and window must be positive")
    count = len(sizes)
    take = min(splits, count)
    chosen = sorted({(2 * i + 1) * count // (2 * take) for i in range(take)})
    plan: list[tuple[int, int, int]] = []
    for index in chosen:
        size = sizes[index]
        if size <= window * per_split:
            plan.append((index, 0, size))
            continue
        step = (size - window) / max(per_split - 1, 1)
        for w in range(per_split):
            begin = int(w * step)
            plan.append((index, begin, min(size, begin + window)))
    return plan


def subsample(keys: Keys, count: int, seed: int = 0) -> _Normal:
    """At most ``count`` of the keys, chosen uniformly and deterministically by ``seed``."""
    domain, values = _normalise(keys)
    if len(values) <= count:
        return values
    chosen = np.sort(np.random.default_rng(seed).choice(len(values), count, replace=False))
    return values.take(pa.array(chosen)) if domain == "bytes" else values[chosen]
