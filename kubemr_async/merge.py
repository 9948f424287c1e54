"""K-way merge of sorted streams of shuffle tables, and folding a merge. Pure: no I/O.

Every merge in the shuffle goes through :func:`merge_sorted`: a map merging its spills,
intermediate merge passes on local scratch, and a reducer merging every map's slice.

It never compares rows one at a time in Python. Each step picks a bound no later than any
stream's last row in its current block (every row up to it can precede nothing not yet
read), takes every stream's rows up to the bound, sorts that union stably (stream order
breaks ties) and yields it. The bound is also no later than the row at which a stream's
share of ``chunk_bytes`` ends, so a step's chunk is about ``chunk_bytes`` however many
streams merge: memory is one block per stream plus one bounded chunk (and its sorted
copy), not a chunk as large as all the blocks together.

Rows are ordered by key (``order``'s key order). With ``by_value`` they are ordered by key
and then by value (the secondary sort behind ``sort_values``): every input stream is
already sorted that way (the map sorts its spills by key and value), so the merge only has
to keep it, and a reducer's values arrive sorted however many there are, with nothing
sorted in memory per key.

A key may span chunks: :func:`fold_sorted` (built-in reducers) carries the last key over.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from . import order, shuffle
from .shuffle import Table

__all__ = ["fold_sorted", "merge_sorted"]


def _comparable(table: Table, column: str) -> pa.Array:
    """A column in a form compared bytewise or numerically (str as its bytes)."""
    array = shuffle.single_array(table.column(column))
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        array = array.cast(pa.binary())
    return array


def _order_key(value: Any) -> tuple[bool, Any]:
    # NaN sorts after every number, as Arrow's sort puts it; all NaN are equal.
    return (isinstance(value, float) and math.isnan(value), 0 if value != value else value)


def _rows_at_most(values: pa.Array, bound: Any, *, inclusive: bool = True) -> int:
    """How many leading rows of ascending ``values`` are <= ``bound`` (< with ``inclusive``
    False), by binary search; NaN sorts last."""
    if isinstance(bound, float) and math.isnan(bound):
        if inclusive:
            return len(values)
        return int(np.count_nonzero(~np.isnan(values.to_numpy())))
    if (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)
            or pa.types.is_boolean(values.type)):
        return int(np.searchsorted(values.to_numpy(zero_copy_only=False), bound,
                                   side="right" if inclusive else "left"))
    lo, hi = 0, len(values)
    while lo < hi:
        mid = (lo + hi) // 2
        value = values[mid].as_py()
        if value <= bound if inclusive else value < bound:
            lo = mid + 1
        else:
            hi = mid
    return lo


class _Head:
    """A stream's current block, with its comparable key (and value) columns, and the
    Arrow bytes of its rows (``row_bytes``, kept from the whole block: a slice's own
    size is not cheap to tell)."""

    def __init__(self, table: Table, keys: pa.Array, values: pa.Array | None,
                 row_bytes: float) -> None:
        self.table, self.keys, self.values, self.row_bytes = table, keys, values, row_bytes

    @classmethod
    def of(cls, table: Table, by_value: bool) -> _Head:
        """A new block's head."""
        return cls(table, _comparable(table, "key"),
                   _comparable(table, "value") if by_value else None,
                   table.nbytes / max(1, table.num_rows))

    def rest(self, start: int) -> _Head:
        """The head past its first ``start`` rows (its columns sliced, not converted again)."""
        return _Head(self.table.slice(start), self.keys.slice(start),
                     None if self.values is None else self.values.slice(start), self.row_bytes)

    def last(self, share: float) -> tuple[tuple[bool, Any], ...]:
        """The order position of the block's last row within ``share`` bytes (at least
        its first row)."""
        rows = max(1, math.ceil(share / max(self.row_bytes, 1.0)))
        return self.position(min(rows, len(self.keys)) - 1)

    def position(self, row: int) -> tuple[tuple[bool, Any], ...]:
        """The order position of one row."""
        position: tuple[tuple[bool, Any], ...] = (_order_key(self.keys[row].as_py()),)
        if self.values is not None:
            position += (_order_key(self.values[row].as_py()),)
        return position

    def rows_at_most(self, bound: tuple[Any, ...], *, inclusive: bool) -> int:
        """Leading rows ordered before ``bound`` (or equal to it, with ``inclusive``)."""
        key = bound[0][1] if not bound[0][0] else math.nan
        if self.values is None:
            return _rows_at_most(self.keys, key, inclusive=inclusive)
        lo = _rows_at_most(self.keys, key, inclusive=False)
        hi = _rows_at_most(self.keys, key, inclusive=True)
        if lo == hi:
            return lo
        value = bound[1][1] if not bound[1][0] else math.nan
        return lo + _rows_at_most(self.values.slice(lo, hi - lo), value, inclusive=inclusive)


def merge_sorted(streams: Sequence[Iterable[Table]], *, chunk_bytes: int,
                 by_value: bool = False) -> Iterator[Table]:
    """K-way merge of streams of sorted tables into sorted chunks of about ``chunk_bytes``
    (Arrow size; more when one key's equal rows are more) (module docstring).

    Equal rows come out in stream order, and within a stream in its own order, exactly as
    ``shuffle.merge_runs`` orders one partition's runs. With ``by_value`` the streams are
    sorted by key and value, and so is the result.
    """
    iterators = [iter(stream) for stream in streams]
    heads: dict[int, _Head] = {}

    def advance(i: int) -> None:
        for table in iterators[i]:
            if table.num_rows:
                heads[i] = _Head.of(table, by_value)
                return
        heads.pop(i, None)

    def sort(table: Table) -> Table:
        return order.sort_by_key_and_value(table) if by_value else shuffle.sort_by_key(table)

    for i in range(len(iterators)):
        advance(i)
    while heads:
        if len(heads) == 1:
            (i, head), = heads.items()
            yield head.table
            advance(i)
            continue
        share = chunk_bytes / len(heads)
        # Each stream's last row within its share: the smallest of them bounds the step,
        # and the stream whose whole block ends at it is the one that may continue in its
        # next table.
        bound = min(head.last(share) for head in heads.values())
        lasts = {i: head.position(head.table.num_rows - 1) for i, head in heads.items()}
        taken = []
        # A stream whose head ends at the bound may hold more rows equal to it in its next
        # table: streams after it take only rows below the bound this round, so equal rows
        # still come out in stream order.
        below_only = False
        for i in sorted(heads):
            head = heads[i]
            rows = head.table.num_rows
            if below_only:
                count = head.rows_at_most(bound, inclusive=False)
            elif lasts[i] == bound:
                count, below_only = rows, True
            else:
                count = head.rows_at_most(bound, inclusive=True)
            if count:
                taken.append(head.table.slice(0, count))
            if count == rows:
                advance(i)
            else:
                heads[i] = head.rest(count)
        yield sort(shuffle.concat_tables(taken))


def fold_sorted(chunks: Iterable[Table], combiner: shuffle.Combiner) -> Iterator[Table]:
    """Fold key-sorted chunks with a built-in reducer, carrying a key across chunk edges.

    Like ``shuffle.merge_runs`` it folds with ``shuffle.merge_combiner``: the rows are
    already map-side combined values.
    """
    folding = shuffle.merge_combiner(combiner)
    carry: Table | None = None
    for chunk in chunks:
        if chunk.num_rows == 0:
            continue
        table = chunk if carry is None else shuffle.concat_tables([carry, chunk])
        folded = shuffle.sort_by_key(shuffle.combine(table, folding))
        carry = folded.slice(folded.num_rows - 1)
        if folded.num_rows > 1:
            yield folded.slice(0, folded.num_rows - 1)
    if carry is not None:
        yield carry
