"""Check a sort's output in bounded memory: globally ordered, and exactly the input's records.

What valsort does for the sort benchmark, for the 100-byte ASCII records of
``examples/sort.py`` (a 10-byte key, an 89-byte payload, ``\\n``):

* **order**: every record's key is ``>=`` the previous one's, across part boundaries
  (the parts are read in the order given, as one stream);
* **the same records**: the count, and an order-independent checksum, the sum of every
  record's 128-bit hash (two 64-bit lanes, each summed mod 2^64), are equal for the input
  and the output. A dropped, duplicated or altered record changes the sum; a reordering
  does not.

Files are read in blocks of whole lines and hashed with numpy, so memory stays at a few
blocks whatever the file sizes, and 1 GiB validates in seconds, not minutes.

Two line layouts are understood: ``records`` (the record itself, 100 bytes a line: the
input, GNU sort's output) and ``kubemr`` (``kubemr run``'s text output of the sort job:
``key<TAB>payload\\n``, 101 bytes a line); both are checked as the same records.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "KEY_SIZE",
    "RECORD_SIZE",
    "Layout",
    "Summary",
    "ValidationError",
    "check_sorted_copy",
    "summarize",
]

RECORD_SIZE = 100  # bytes per record line, newline included
KEY_SIZE = 10
Layout = Literal["records", "kubemr"]
_LINE = {"records": RECORD_SIZE, "kubemr": RECORD_SIZE + 1}
_BLOCK_LINES = 1 << 16  # ~6.5 MB per block

_MASK = (1 << 64) - 1
_LANES = ((0xCBF29CE484222325, 0x100000001B3), (0x84222325CBF29CE4, 0x100000001B3 * 3 | 1))


class ValidationError(AssertionError):
    """The output is not a sorted copy of the input; the message says where and how."""


@dataclass(frozen=True)
class Summary:
    """What a stream of records amounts to: how many, their checksum, whether in order."""

    records: int
    checksum: int  # the two lanes as one 128-bit number: high lane << 64 | low lane
    sorted: bool
    first_unsorted: str = ""  # "file:line" of the first record whose key went down


def _mix(h: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64's finaliser: every input bit reaches every output bit."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _record_hashes(records: npt.NDArray[np.uint8]) -> tuple[int, int]:
    """The sums (mod 2^64) of the two hash lanes over a block of records (rows).

    Each row is hashed 8 bytes at a time (multiply, xor-shift; the last partial word
    zero-padded), then finalised: a dozen numpy passes per lane, not one per byte.
    """
    rows, width = records.shape
    full = width // 8
    columns = [records[:, :full * 8].view("<u8")[:, i] for i in range(full)]
    if width % 8:
        tail = np.zeros((rows, 8), dtype=np.uint8)
        tail[:, :width % 8] = records[:, full * 8:]
        columns.append(tail.view("<u8")[:, 0])
    sums = []
    with np.errstate(over="ignore"):
        for offset, prime in _LANES:
            h = np.full(rows, offset, dtype=np.uint64)
            for column in columns:
                h ^= column
                h *= np.uint64(prime)
                h ^= h >> np.uint64(29)
            sums.append(int(_mix(h).sum(dtype=np.uint64)))
    return sums[0], sums[1]


def _key_words(keys: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.uint64], ...]:
    """10-byte keys as (first 8 bytes, last 2) big-endian numbers: compared in key order."""
    high = np.ascontiguousarray(keys[:, :8]).view(">u8").ravel().astype(np.uint64)
    low = (keys[:, 8].astype(np.uint64) << np.uint64(8)) | keys[:, 9]
    return high, low


def _blocks(path: Path, layout: Layout) -> Iterator[tuple[int, npt.NDArray[np.uint8]]]:
    """(first line number, records as rows of 100 bytes) per block of a file."""
    width = _LINE[layout]
    line = 1
    with open(path, "rb") as f:
        while True:
            data = f.read(width * _BLOCK_LINES)
            if not data:
                return
            if len(data) % width:
                raise ValidationError(
                    f"{path}: {len(data) % width} trailing bytes: not {width}-byte lines")
            rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, width)
            bad = np.flatnonzero(rows[:, -1] != ord("\n"))
            if layout == "kubemr":
                bad = np.union1d(bad, np.flatnonzero(rows[:, KEY_SIZE] != ord("\t")))
                rows = np.concatenate((rows[:, :KEY_SIZE], rows[:, KEY_SIZE + 1:]), axis=1)
            if bad.size:
                raise ValidationError(
                    f"{path}:{line + int(bad[0])}: malformed line (expected "
                    f"{'key<TAB>payload' if layout == 'kubemr' else 'a record'} of "
                    f"{width} bytes with its newline)")
            yield line, rows
            line += rows.shape[0]


def summarize(paths: Iterable[Path | str], layout: Layout = "records") -> Summary:
    """Count, checksum and key order of the records in ``paths``, read as one stream."""
    count = low_sum = high_sum = 0
    previous: tuple[int, int] | None = None
    first_unsorted = ""
    for path in map(Path, paths):
        for line, records in _blocks(path, layout):
            count += records.shape[0]
            low, high = _record_hashes(records)
            low_sum, high_sum = (low_sum + low) & _MASK, (high_sum + high) & _MASK
            if first_unsorted:
                continue
            hi, lo = _key_words(records[:, :KEY_SIZE])
            if previous is not None:
                # uint64 throughout: a Python int beside uint64 would promote to float64,
                # whose rounding makes distinct keys equal and the order look broken.
                hi = np.concatenate((np.array([previous[0]], dtype=np.uint64), hi))
                lo = np.concatenate((np.array([previous[1]], dtype=np.uint64), lo))
            down = (hi[1:] < hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] < lo[:-1]))
            if down.any():
                at = int(np.flatnonzero(down)[0]) + (0 if previous is not None else 1)
                first_unsorted = f"{path}:{line + at}"
            previous = (int(hi[-1]), int(lo[-1]))
    return Summary(count, (high_sum << 64) | low_sum, not first_unsorted, first_unsorted)


def check_sorted_copy(inputs: Iterable[Path | str], outputs: Iterable[Path | str],
                      layout: Layout = "records", expected: Summary | None = None
                      ) -> Summary:
    """Raise ValidationError unless ``outputs`` (in order) sort exactly ``inputs``' records.

    ``expected`` is the inputs' summary when already computed (one pass per input for
    several outputs); the output's summary is returned.
    """
    want = expected or summarize(inputs)
    got = summarize(outputs, layout)
    if not got.sorted:
        raise ValidationError(f"output is not sorted: the key goes down at {got.first_unsorted}")
    if got.records != want.records:
        raise ValidationError(f"output holds {got.records} records, the input {want.records}")
    if got.checksum != want.checksum:
        raise ValidationError(
            f"output checksum {got.checksum:032x} differs from the input's "
            f"{want.checksum:032x}: records were altered, dropped or duplicated")
    return got
