"""Sort 100-byte text records into one total order across all parts (TeraSort's job).

A record is one line of exactly 100 bytes, the ASCII form of the sort benchmark's records
(like ``gensort -a``)::

    bytes 0-9    key: 10 printable ASCII characters (0x20-0x7E; spaces allowed)
    bytes 10-98  payload, 89 bytes: "  ", the record's ordinal as 32 hex digits, "  ",
                 53 filler characters (printable ASCII, never TAB or newline)
    byte  99     "\\n"

The map cuts a split into records (vectorized: no Python per record) and emits the key and
the payload; the built-in ``identity`` reducer writes the merged rows as they come. The
total-order partitioner samples the keys before the maps run, so every key in
``part-00000`` precedes every key in ``part-00001``, and so on, even when a few keys repeat
very often. ``sort_values=True`` orders records with equal keys by their payload (the
maps sort by key and payload, and the merge keeps it), so the output is exactly
``LC_ALL=C sort``'s, line for line (once the TAB the text format puts between key and
value is taken out).

    kubemr run examples/sort.py --input DIR --output /tmp/sorted --reducers 4

Each output line is ``key<TAB>payload``; check the result with
``kubemr_async.validate.check_sorted_copy(input_files, parts, layout="kubemr")``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from kubemr_async import Job, TaskContext
from kubemr_async.errors import PermanentTaskError
from kubemr_async.validate import KEY_SIZE, RECORD_SIZE

job = Job("sort", sort_values=True)
job.partition("total-order", sample=100_000, splits=10)


def _column(rows: np.ndarray) -> pa.Array:
    """Fixed-width byte rows as an Arrow binary column: one copy of the bytes (to make them
    contiguous) and computed offsets, no Python object per row."""
    count, width = rows.shape
    large = count * width >= 2**31  # offsets must fit int32 for pa.binary()
    offsets = np.arange(0, (count + 1) * width, width, dtype=np.int64 if large else np.int32)
    return pa.Array.from_buffers(pa.large_binary() if large else pa.binary(), count,
                                 [None, pa.py_buffer(offsets),
                                  pa.py_buffer(np.ascontiguousarray(rows))])


@job.map(input="bytes")
def records(chunk: bytes, ctx: TaskContext) -> None:
    if len(chunk) % RECORD_SIZE:
        raise PermanentTaskError(
            f"{ctx.input}: {len(chunk)} bytes is not a whole number of {RECORD_SIZE}-byte records")
    rows = np.frombuffer(chunk, dtype=np.uint8).reshape(-1, RECORD_SIZE)
    bad = np.flatnonzero(rows[:, -1] != ord("\n"))
    if bad.size:
        raise PermanentTaskError(f"{ctx.input}: record {int(bad[0])} of the split does not end "
                                 f"with a newline at byte {RECORD_SIZE}")
    ctx.emit_batch(_column(rows[:, :KEY_SIZE]), _column(rows[:, KEY_SIZE:-1]))


# Every record as it comes out of the merge: by key, then payload (sort_values), with no
# Python call per key (the built-in identity reducer).
job.reduce("identity")
