"""Pure: the records of one map split, for the per-record map inputs.

``@job.map(input=...)`` with ``"lines"``, ``"jsonl"``, ``"csv"`` or ``"parquet"`` calls the
map once per record instead of once per split. The runtime reads the split (``inputs``:
the line-aligned bytes and, for CSV, the file's header line; for Parquet, the footer and
the byte span of the split's row groups) and this module turns it into records, one at a
time, without another whole copy of the split:

* ``lines``: each line as str (UTF-8, surrogateescape, like ``"text"``), without its
  terminator: ``\\n``, or ``\\r\\n`` (so a CRLF file gives the same records as an LF one);
  a ``\\r`` anywhere else is kept. A last line without a terminator is a record; empty
  lines are records (``""``).
* ``jsonl``: each non-blank line decoded with :func:`json.loads`.
* ``csv``: each row as a dict keyed by the header (the file's first line, which is not a
  record), parsed by :mod:`csv` (the default ``excel`` dialect: commas, ``"`` quoting).
  Blank lines are skipped. A quoted field may hold a newline only if the split boundary
  does not fall inside it (splits are cut at line starts).
* ``parquet``: ``pyarrow.RecordBatch`` objects of at most :data:`PARQUET_BATCH_ROWS` rows
  from the split's row groups.
* ``pairs``: ``(key, value)`` tuples from a result part in the ``parquet`` format (what a
  multi-step job's steps hand each other), each key and value with the type it was
  emitted with (the part's ``key``/``value`` columns, JSON-coded columns decoded).

A record that does not parse fails the task for good (:class:`BadRecord`, a
:class:`PermanentTaskError`), or with skip mode on is skipped (:func:`placed_records`),
naming the input and where: ``line N`` when the split starts at the beginning of the file (line
numbers are then the file's), else the byte offset of the line in the file and its line
number within the split.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from . import shuffle
from .errors import PermanentTaskError

if TYPE_CHECKING:  # imported when a Parquet input is read, not with every job module
    import pyarrow.parquet as pq

RecordInput = Literal["lines", "jsonl", "csv", "parquet", "pairs"]
RECORD_INPUTS: tuple[RecordInput, ...] = ("lines", "jsonl", "csv", "parquet", "pairs")
#: The record inputs read from Parquet files (planned by row group).
PARQUET_INPUTS: tuple[RecordInput, ...] = ("parquet", "pairs")
#: Rows per RecordBatch handed to a ``parquet`` map.
PARQUET_BATCH_ROWS = 65_536
#: A Parquet file ends with its footer's length (4 bytes, little-endian) and ``PAR1``.
PARQUET_MAGIC = b"PAR1"


@dataclass(frozen=True)
class TextSplit:
    """A split of a text input: whole lines, and where they are in the file."""

    url: str
    data: bytes
    offset: int = 0  # the byte offset of data[0] in the (decompressed) file
    header: bytes | None = None  # csv: the file's first line, when the split is not at 0
    #: A total-order sampling window, not a split: its end may cut a record, which is dropped.
    window: bool = False


@dataclass(frozen=True)
class ParquetSplit:
    """Row groups of one Parquet file: the bytes fetched for them and which groups."""

    url: str
    size: int
    pieces: tuple[tuple[int, bytes], ...]  # (file offset, bytes): the footer, the groups' span
    row_groups: tuple[int, ...]

    def batches(self) -> Iterator[pa.RecordBatch]:
        if not self.row_groups:
            return
        import pyarrow.parquet as pq

        try:
            # The footer is parsed on its own (metadata=), so the reader only reads the groups.
            metadata = parquet_metadata(self.url, self.pieces[0][1])
            reader = pq.ParquetFile(pa.PythonFile(_Pieces(self.size, self.pieces[1:]), mode="r"),
                                    metadata=metadata)
            yield from reader.iter_batches(batch_size=PARQUET_BATCH_ROWS,
                                           row_groups=list(self.row_groups), use_threads=False)
        except (OSError, pa.ArrowException) as exc:
            raise PermanentTaskError(f"input {self.url}: unreadable Parquet data: "
                                     f"{_one_line(exc)}") from exc


def split_bytes(data: bytes | TextSplit | ParquetSplit) -> int:
    """The input bytes a map read (decompressed; a Parquet split's fetched pieces)."""
    if isinstance(data, TextSplit):
        return len(data.data)
    if isinstance(data, ParquetSplit):
        return sum(len(piece) for _, piece in data.pieces)
    return len(data)


def records(kind: RecordInput, split: TextSplit | ParquetSplit) -> Iterator[Any]:
    """The records of ``split`` as the map of input ``kind`` receives them."""
    if isinstance(split, ParquetSplit):
        return _pairs(split) if kind == "pairs" else split.batches()
    if kind == "pairs":
        raise PermanentTaskError(f"input {split.url}: a 'pairs' map reads Parquet result "
                                 "parts, not text")
    if kind == "lines":
        return (line.decode("utf-8", "surrogateescape") for _, _, line in _lines(split.data))
    if kind == "jsonl":
        return _json_lines(split)
    if kind == "csv":
        return _csv_rows(split)
    raise ValueError(f"{kind!r} is not a text record input")


def _pairs(split: ParquetSplit) -> Iterator[tuple[Any, Any]]:
    for batch in split.batches():
        table = pa.Table.from_batches([batch])
        if table.schema.names[:2] != ["key", "value"]:
            raise PermanentTaskError(
                f"input {split.url}: a 'pairs' map reads result parts with key and value "
                f"columns, not {', '.join(table.schema.names)}")
        try:
            keys = shuffle.to_python(table.column("key"), shuffle.column_kind(table, "key"))
            values = shuffle.to_python(table.column("value"),
                                       shuffle.column_kind(table, "value"))
        except shuffle.ShuffleError as exc:
            raise PermanentTaskError(f"input {split.url}: {exc}") from exc
        yield from zip(keys, values, strict=True)


def _lines(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(line number in the split from 1, byte position in ``data``, line without terminator)."""
    pos, number, size = 0, 0, len(data)
    find = data.find
    while pos < size:
        end = find(b"\n", pos)
        number += 1
        if end < 0:
            yield number, pos, data[pos:]
            return
        stop = end - 1 if end > pos and data[end - 1] == 13 else end  # 13: \r
        yield number, pos, data[pos:stop]
        pos = end + 1


def where(split: TextSplit, number: int, pos: int) -> str:
    """Where line ``number`` of the split (at ``pos`` in its data) is, for an error."""
    if split.offset == 0:
        return f"{split.url} line {number}"
    return (f"{split.url} byte {split.offset + pos} (line {number} of the split starting "
            f"at byte {split.offset})")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class BadRecord(PermanentTaskError):
    """A record that does not parse: where (``number``, ``pos``) and why, in one line."""

    def __init__(self, place: str, reason: str, number: int, pos: int) -> None:
        super().__init__(f"{place}: {reason}")
        self.reason, self.number, self.pos = reason, number, pos


#: (line number in the split, byte position in its data, the record or a BadRecord).
Placed = tuple[int, int, Any]


def placed_records(kind: RecordInput, split: TextSplit) -> Iterator[Placed]:
    """Skip mode's records of a text split: each with its place, and a record that does
    not parse as a :class:`BadRecord` in its stead (rather than raised)."""
    if kind == "lines":
        return ((number, pos, line.decode("utf-8", "surrogateescape"))
                for number, pos, line in _lines(split.data))
    if kind == "jsonl":
        return _placed_json_lines(split)
    if kind == "csv":
        return _placed_csv_rows(split)
    raise ValueError(f"{kind!r} is not a text record input")


def _raising(placed: Iterator[Placed]) -> Iterator[Any]:
    for _, _, record in placed:
        if isinstance(record, BadRecord):
            raise record
        yield record


def _json_lines(split: TextSplit) -> Iterator[Any]:
    return _raising(_placed_json_lines(split))


def _placed_json_lines(split: TextSplit) -> Iterator[Placed]:
    loads = json.loads
    for number, pos, line in _lines(split.data):
        if not line.strip():
            continue
        try:
            value = loads(line)
        except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError on bad UTF-8
            value = BadRecord(where(split, number, pos),
                              f"invalid JSON: {_one_line(exc)}: {line[:60]!r}", number, pos)
        yield number, pos, value


def _csv_rows(split: TextSplit) -> Iterator[dict[str, str]]:
    return _raising(_placed_csv_rows(split))


def _placed_csv_rows(split: TextSplit) -> Iterator[Placed]:
    lines = _lines(split.data)
    header_line = split.header
    if header_line is None:  # the split starts the file: its first line is the header
        header_line = next((line for number, _, line in lines), b"")
    header = next(csv.reader([header_line.decode("utf-8", "surrogateescape")]), [])
    if not header:
        raise PermanentTaskError(f"{split.url} line 1: the CSV header is empty")
    header[0] = header[0].removeprefix("\ufeff")  # a UTF-8 byte order mark
    position = [0, 0]  # line number and byte position of the line being parsed
    began: list[int] = []  # those of the first line of the row being parsed
    ended = False

    def text() -> Iterator[str]:
        nonlocal ended
        for number, pos, line in lines:
            position[0], position[1] = number, pos
            began[:] = began or position
            yield line.decode("utf-8", "surrogateescape") + "\n"
        ended = True

    fields = len(header)
    rows = csv.reader(text())
    while True:
        began.clear()
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as exc:  # the reader goes on with the next line
            yield (position[0], position[1],
                   BadRecord(where(split, *position), f"malformed CSV: {_one_line(exc)}",
                             *position))
            continue
        if ended:
            # Every line ends in "\n", so the reader completes a row at the end of the data
            # only inside a quoted field: one whose newline crosses into the next split
            # (which would read the rest as rows of its own), or a truncated file.
            if split.window:
                return
            raise PermanentTaskError(
                f"{where(split, *began)}: a quoted CSV field opened in this row is not "
                "closed before the split ends: a quoted field holding a newline must not "
                "straddle a split (use a larger --chunk-size), or the file is truncated")
        if not row:
            continue
        if len(row) != fields:
            yield (position[0], position[1], BadRecord(
                where(split, *position), f"CSV row has {len(row)} fields, the header has "
                f"{fields}", *position))
            continue
        yield position[0], position[1], dict(zip(header, row, strict=True))


def parquet_footer_length(tail: bytes, url: str) -> int:
    """The footer's length from a file's last 8 bytes; PermanentTaskError if not Parquet."""
    if len(tail) < 8 or tail[-4:] != PARQUET_MAGIC:
        raise PermanentTaskError(f"input {url} is not a Parquet file (no PAR1 footer)")
    return int.from_bytes(tail[-8:-4], "little")


def parquet_metadata(url: str, footer: bytes) -> pq.FileMetaData:
    """A file's metadata from its footer: its last bytes, ending with length and ``PAR1``.

    Parsed as the footer of a file holding nothing else (the offsets it records are not
    read here), so no other byte of the file is needed.
    """
    import pyarrow.parquet as pq

    length = parquet_footer_length(footer[-8:], url)
    try:
        return pq.read_metadata(pa.BufferReader(PARQUET_MAGIC + footer[-8 - length:]))
    except (OSError, pa.ArrowException) as exc:
        raise PermanentTaskError(f"input {url} is not a readable Parquet file: "
                                 f"{_one_line(exc)}") from exc


def row_group_spans(metadata: pq.FileMetaData) -> list[tuple[int, int]]:
    """Each row group's byte range ``[start, end)`` in the file (its column chunks)."""
    spans = []
    for i in range(metadata.num_row_groups):
        group = metadata.row_group(i)
        start, end = None, 0
        for c in range(group.num_columns):
            column = group.column(c)
            first = column.data_page_offset
            if column.has_dictionary_page and column.dictionary_page_offset:
                first = min(first, column.dictionary_page_offset)
            start = first if start is None else min(start, first)
            end = max(end, first + column.total_compressed_size)
        spans.append((start or 0, end))
    return spans


def owned_row_groups(spans: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """The row groups a split ``[start, end)`` owns: those whose midpoint lies in it.

    Planned splits are cut at row-group boundaries, so each owns exactly its groups; plain
    byte ranges (a cluster's planner does not know the map reads Parquet) still give every
    group to exactly one split, as Hadoop's and Spark's Parquet readers do.
    """
    return [i for i, (lo, hi) in enumerate(spans) if start <= (lo + hi) // 2 < end]


class _Pieces(io.RawIOBase):
    """A read-only file of ``size`` bytes of which only some ranges were fetched."""

    def __init__(self, size: int, pieces: tuple[tuple[int, bytes], ...]) -> None:
        super().__init__()
        self._size, self._pieces, self._pos = size, pieces, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        if end <= self._pos:
            return b""
        for offset, data in self._pieces:
            if offset <= self._pos and end <= offset + len(data):
                out = data[self._pos - offset:end - offset]
                self._pos = end
                return out
        raise PermanentTaskError(f"Parquet reader asked for bytes {self._pos}-{end} "
                                 "outside the split's row groups")

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)
