"""Local scratch: sorted spills, shuffle objects as local files, merge passes, result parts.

Everything a worker holds that could outgrow its memory budget goes through files here:
a map's spills and the one shuffle object they merge into, a reducer's fetched slices
and its intermediate merge passes, a key's values that do not fit, and the result part
before it is uploaded. The formats are :mod:`kubemr_async.shuffle`'s (checksummed blocks,
the shuffle object's index); this module only adds the files. Calls are synchronous:
they run on the user-code thread (see ``runtime.UserLoop``) next to the compute they
serve, and local disk is what makes the budget hold.

Scratch lives under ``$KUBEMR_SCRATCH_DIR`` (an ``emptyDir`` on Kubernetes) or the
system temp directory, one directory per attempt, removed when the attempt ends.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow.parquet as pq

from . import formats, merge, shuffle
from .spec import PartFormat

SCRATCH_ENV = "KUBEMR_SCRATCH_DIR"
#: Arrow bytes of a result chunk encoded and written at once (PartWriter).
_WRITE_PIECE = 4 << 20


@contextmanager
def scratch_dir(label: str) -> Iterator[Path]:
    """A private directory for one attempt's scratch files, removed on the way out."""
    root = os.environ.get(SCRATCH_ENV) or None
    if root is not None:
        Path(root).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"kubemr-{label}-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class Slice:
    """A run of consecutive blocks in a local file (one partition of a spill or object)."""

    path: Path
    offset: int
    length: int


class ShuffleFileWriter:
    """Writes a shuffle object (``shuffle`` module docstring) to a local file.

    Partitions are added in order; each partition's tables in key order.
    """

    def __init__(self, f: BinaryIO, partitions: int, block_bytes: int) -> None:
        self._file = f
        self._partitions = partitions
        self._block_bytes = block_bytes
        self._entries: list[shuffle.SliceEntry] = []
        self._position = 0
        self._current = -1
        self._start = self._rows = self._crc = 0

    def _close_partition(self) -> None:
        if self._current >= 0:
            self._entries.append(shuffle.SliceEntry(
                self._start, self._position - self._start, self._rows, self._crc))
        self._current += 1
        self._start, self._rows, self._crc = self._position, 0, 0

    def add(self, partition: int, table: shuffle.Table) -> None:
        if partition < self._current:
            raise ValueError(f"partition {partition} added after {self._current}")
        while self._current < partition:
            self._close_partition()
        for block in shuffle.blocks(table, self._block_bytes):
            data = shuffle.encode_run(block)
            self._file.write(data)
            self._position += len(data)
            self._rows += block.num_rows
            self._crc = _crc(data, self._crc)

    def finish(self) -> int:
        """Write the index and footer; returns the object's size."""
        while self._current < self._partitions:
            self._close_partition()
        tail = shuffle.encode_index(self._entries, self._position)
        self._file.write(tail)
        return self._position + len(tail)


def _crc(data: bytes, crc: int) -> int:
    return zlib.crc32(data, crc)


def write_shuffle_file(path: Path, parts: Sequence[Iterable[shuffle.Table]],
                       block_bytes: int) -> int:
    """A shuffle object with partition ``i``'s sorted tables from ``parts[i]``; its size."""
    with open(path, "wb") as f:
        writer = ShuffleFileWriter(f, len(parts), block_bytes)
        for partition, tables in enumerate(parts):
            for table in tables:
                writer.add(partition, table)
        return writer.finish()


def read_index(path: Path, partitions: int) -> list[Slice]:
    """Every partition's slice of a local shuffle object."""
    size = path.stat().st_size
    slices = []
    with open(path, "rb") as f:
        for partition in range(partitions):
            offset, length = shuffle.entry_range(partitions, partition, size)
            f.seek(offset)
            entry = shuffle.decode_entry(f.read(length), partition, size)
            slices.append(Slice(path, entry.offset, entry.length))
    return slices


def read_blocks(source: Slice) -> Iterator[shuffle.Table]:
    """The tables of a slice, one block in memory at a time; CorruptRunError if damaged."""
    with open(source.path, "rb") as f:
        position, end = source.offset, source.offset + source.length
        while position < end:
            header = os.pread(f.fileno(), shuffle.RUN_HEADER_SIZE, position)
            length = shuffle.run_length(header)
            if position + length > end:
                raise shuffle.CorruptRunError(
                    f"block at {position} runs past the end of its slice ({end})")
            yield shuffle.decode_run(os.pread(f.fileno(), length, position))
            position += length


def write_slice(path: Path, tables: Iterable[shuffle.Table], block_bytes: int) -> Slice:
    """Sorted tables as one slice of blocks in a file of its own (a merge pass's output)."""
    length = 0
    with open(path, "wb") as f:
        for table in tables:
            for block in shuffle.blocks(table, block_bytes):
                data = shuffle.encode_run(block)
                f.write(data)
                length += len(data)
    return Slice(path, 0, length)


#: A sorted input of a merge, opened (a generator of tables) only when the merge reaches it.
Source = Callable[[], Iterator[shuffle.Table]]


def merge_passes(sources: list[Source], directory: Path, budget: shuffle.ShuffleBudget,
                 combiner: shuffle.Combiner | None = None, *,
                 by_value: bool = False) -> list[Source]:
    """Merge groups of sorted inputs into fewer, until one pass can hold them all open.

    Hadoop's merge factor: while there are more inputs than
    :attr:`ShuffleBudget.merge_factor`, consecutive groups of that many are merged into
    intermediate slices on local disk (each pass reads and writes every row once). A
    built-in ``combiner`` folds keys as it goes. Each intermediate takes its inputs'
    place, so equal keys keep the inputs' order. ``by_value``: the inputs are sorted by key
    and value (``merge.merge_sorted``), and so are the intermediates.
    """
    factor = budget.merge_factor
    number = 0
    while len(sources) > factor:
        merged: list[Source] = []
        for start in range(0, len(sources), factor):
            group = sources[start:start + factor]
            if len(group) == 1:
                merged += group
                continue
            chunks = merge.merge_sorted([source() for source in group],
                                        chunk_bytes=budget.merge_chunk, by_value=by_value)
            if combiner is not None:
                chunks = merge.fold_sorted(chunks, combiner)
            number += 1
            written = write_slice(directory / f"merge-{number:05d}", chunks, budget.block_bytes)
            merged.append(partial(read_blocks, written))
        sources = merged
    return sources


class PartWriter:
    """A result part written chunk by chunk to a local file, in the job's format.

    text and jsonl are encoded per row, so chunks are encoded as they come. A parquet
    file has one schema, but value types can differ between chunks (a JSON-kind chunk
    after an int one), so parquet chunks wait as blocks on disk until every kind is
    known, then are converted to the common one and written.
    """

    def __init__(self, path: Path, fmt: PartFormat) -> None:
        self.path = path
        self.fmt = fmt
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._tables: list[shuffle.Table] = []
        self.rows = 0  # rows written (the reduce's output records)

    def write(self, table: shuffle.Table) -> None:
        if table.num_rows == 0:
            return
        self.rows += table.num_rows
        # Encoded a few MiB at a time: the text of a whole merged chunk (and its copy as
        # bytes) would be two more chunk-sized buffers on top of the chunk.
        for piece in shuffle.blocks(table, _WRITE_PIECE):
            if self.fmt not in formats.PARQUET_FORMATS:
                self._file.write(formats.encode(piece, self.fmt))
            else:
                self._file.write(shuffle.encode_run(piece))

    def write_bytes(self, data: bytes) -> None:
        """Bytes written to a text part as they are (a shell reducer's output lines)."""
        assert self.fmt == "text", "only a text part takes raw lines"
        self._file.write(data)

    def close(self) -> None:
        self._file.close()
        if self.fmt not in formats.PARQUET_FORMATS:
            return
        lossless = self.fmt == "pairs"
        staged = self.path.with_name(self.path.name + ".blocks")
        self.path.rename(staged)
        source = Slice(staged, 0, staged.stat().st_size)
        empty = shuffle.concat_tables([block.slice(0, 0) for block in read_blocks(source)])
        schema = formats.parquet_table(empty, lossless=lossless).schema
        with pq.ParquetWriter(self.path, schema) as writer:
            for block in read_blocks(source):
                writer.write_table(formats.parquet_table(shuffle.concat_tables([empty, block]),
                                                         lossless=lossless))
        staged.unlink()

    def abort(self) -> None:
        self._file.close()


def values_of(sources: Sequence[Slice]) -> Iterator[Any]:
    """The values of the blocks in ``sources`` as Python objects, one block at a time."""
    for source in sources:
        for block in read_blocks(source):
            yield from shuffle.to_python(block.column("value"),
                                         shuffle.column_kind(block, "value"))
