"""Turn the user's inputs into map splits, and read one map task's input back.

Planning only lists and sizes inputs (no data is read), cutting each file into byte ranges
of ``chunk_size``. A reader of range ``[start, end)`` owns exactly the lines that *begin*
inside it (Hadoop's rule): it skips the partial line at ``start`` and reads past ``end`` to
finish its last line, so every line is processed once and one big file still parallelises.

Two more of Hadoop's rules keep real directories safe to name as inputs:

* **Hidden files are not data.** A name starting with ``_`` or ``.`` (``_SUCCESS``,
  ``.staging/``, editor swap files) is skipped when a directory or S3 prefix is expanded
  (any path component below the named directory hides the file) and in glob results (the
  file's own name), so a previous job's output directory is a valid input without its
  manifest being counted as data. A file named explicitly is still read: the user asked.
* **Compressed files are one split.** ``.gz``/``.bz2``/``.xz``/``.zst`` inputs
  (:mod:`.compression`) cannot be entered mid-stream, so each is one map task ``(0, size)``
  that is decompressed whole, in memory, when read.
"""

from __future__ import annotations

import asyncio
import glob
import os
from collections.abc import Sequence
from pathlib import Path

from . import compression
from .errors import PermanentTaskError, UsageError
from .spec import JobSpec
from .storage.base import BlobStore
from .storage.urls import is_s3

Split = tuple[str, tuple[int, int] | None]
_WINDOW = 64 * 1024
_GLOB_CHARS = set("*?[")
HIDDEN_NOTE = "names starting with _ or . are skipped"


def is_hidden(name: str) -> bool:
    """Hadoop's rule: a file or directory name starting with ``_`` or ``.`` is not data."""
    return name.startswith(("_", "."))


def expand_local(pattern: str) -> list[tuple[str, int]]:
    """Files named by a path, a directory (recursively) or a glob; hidden files skipped."""
    if _GLOB_CHARS & set(pattern):
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise UsageError(f"input glob {pattern!r} matches no files")
        paths = [Path(p) for p in matches if not is_hidden(Path(p).name)]
        if not paths:
            raise UsageError(f"input glob {pattern!r} matches no data files ({HIDDEN_NOTE})")
    else:
        path = Path(pattern)
        if not path.exists():
            raise UsageError(f"input {pattern} does not exist")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            paths = [p for p in files
                     if not any(is_hidden(part) for part in p.relative_to(path).parts)]
            if not files:
                raise UsageError(f"input directory {pattern} contains no files")
            if not paths:
                raise UsageError(f"input directory {pattern} contains no data files "
                                 f"({HIDDEN_NOTE})")
        else:
            paths = [path]
    result = []
    for p in paths:
        if not os.access(p, os.R_OK):
            raise UsageError(f"input {p} is not readable")
        result.append((str(p.resolve()), p.stat().st_size))
    return result


async def expand_inputs(patterns: Sequence[str]) -> list[tuple[str, int]]:
    """Every input object with its size, in a stable order; UsageError if any names nothing."""
    found: list[tuple[str, int]] = []
    for pattern in patterns:
        if is_s3(pattern):
            from .storage.s3 import expand_s3

            found += await expand_s3(pattern)
        else:
            found += expand_local(pattern)
    return found


def plan_splits(objects: Sequence[tuple[str, int]], chunk_size: int) -> list[Split]:
    """Cut every object into ``chunk_size`` ranges; an empty object still gets one split.

    A compressed object is one split ``(0, size)`` whatever its size: it cannot be split.
    """
    splits: list[Split] = []
    for url, size in objects:
        if size == 0 or compression.codec_for(url) is not None:
            splits.append((url, (0, size)))
            continue
        for start in range(0, size, chunk_size):
            splits.append((url, (start, min(size, start + chunk_size))))
    return splits


def check_local_compressed(objects: Sequence[tuple[str, int]]) -> None:
    """UsageError for a local file whose magic bytes are not its extension's codec.

    Reading a few bytes per compressed file is cheap and turns "a .gz that is not gzip"
    into an error before any worker starts; truncation only shows when a task reads it.
    """
    for url, _ in objects:
        codec = compression.codec_for(url)
        if codec is None or is_s3(url):
            continue
        with open(url, "rb") as f:
            head = f.read(compression.MAGIC_BYTES)
        try:
            compression.check_magic(codec, head, url)
        except compression.InvalidCompressedData as exc:
            raise UsageError(str(exc)) from None


async def plan_inputs(spec: JobSpec) -> list[Split]:
    """The map tasks' inputs: data splits, or (unsplit jobs) one input string per map."""
    if not spec.split_inputs:
        return [(text, None) for pattern in spec.inputs for text in await _unsplit(pattern)]
    objects = await expand_inputs(spec.inputs)
    check_local_compressed(objects)
    return plan_splits(objects, spec.chunk_size)


async def _unsplit(text: str) -> list[str]:
    """What one input of an unsplit (low-level) job stands for, as map input strings.

    Files are expanded so ``--input dir`` or a glob gives one map per data file (absolute
    paths: workers may run elsewhere); an S3 prefix (``s3://b/p/``) or S3 glob gives one
    map per object URL. Anything else (an ID, a URL, a path that does not exist) is passed
    verbatim, since low-level jobs may take arbitrary strings. Compressed files are passed
    as their path too: the job does its own I/O.
    """
    if is_s3(text):
        key = text[len("s3://"):].partition("/")[2]
        if text.endswith("/") or _GLOB_CHARS & set(key):
            from .storage.s3 import expand_s3

            return [url for url, _ in await expand_s3(text)]
        return [text]
    return _unsplit_local(text)


def _unsplit_local(text: str) -> list[str]:
    if _GLOB_CHARS & set(text):
        if not any(os.path.isfile(p) for p in glob.glob(text, recursive=True)):
            return [text]
    elif not os.path.exists(text):
        return [text]
    return [path for path, _ in expand_local(text)]


async def read_task_input(store: BlobStore, key: str,
                          byte_range: tuple[int, int] | None) -> bytes:
    """The bytes one map task processes: its line-aligned split, or a whole object.

    ``byte_range`` None (an unsplit job) reads the whole object. A compressed object is
    read and decompressed whole, in memory (off the event loop, which must keep renewing
    the lease); data that does not decode is a PermanentTaskError naming the object, as
    retrying cannot fix it.
    """
    codec = compression.codec_for(key)
    if codec is None:
        if byte_range is None:
            return await store.get(key)
        start, end = byte_range
        return await read_split(store, key, start, end, await store.size(key))
    if byte_range is not None and byte_range[0] != 0:
        raise PermanentTaskError(f"input {store.url(key)} is {codec.name}-compressed and "
                                 f"cannot be read from offset {byte_range[0]}")
    data = await store.get(key)
    try:
        return await asyncio.to_thread(compression.decompress, codec, data, store.url(key))
    except compression.InvalidCompressedData as exc:
        raise PermanentTaskError(str(exc)) from None


async def _line_start(store: BlobStore, key: str, pos: int, size: int,
                      head: bytes, head_offset: int) -> int:
    """The first line start >= pos (a line starts at 0 or right after b'\\n')."""
    if pos <= 0:
        return 0
    if pos >= size:
        return size
    offset = pos - 1
    while offset < size:
        if head_offset <= offset < head_offset + len(head):
            window = head[offset - head_offset:]
        else:
            window = await store.get(key, offset, offset + _WINDOW)
        found = window.find(b"\n")
        if found >= 0:
            return offset + found + 1
        offset += len(window)
        if not window:
            break
    return size


async def read_split(store: BlobStore, key: str, start: int, end: int, size: int) -> bytes:
    """The lines that begin in ``[start, end)``; one ranged read in the common case."""
    lo = max(0, start - 1)
    data = await store.get(key, lo, min(size, end + _WINDOW))
    begin = await _line_start(store, key, start, size, data, lo)
    stop = await _line_start(store, key, end, size, data[end - 1 - lo:] if end > lo else b"",
                             end - 1)
    if begin >= stop:
        return b""
    if stop <= lo + len(data):
        return data[begin - lo:stop - lo]
    return await store.get(key, begin, stop)
