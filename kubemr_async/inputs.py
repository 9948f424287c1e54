"""Turn the user's inputs into map splits, and read one split back line-aligned.

Planning only lists and sizes inputs (no data is read), cutting each file into byte ranges
of ``chunk_size``. A reader of range ``[start, end)`` owns exactly the lines that *begin*
inside it (Hadoop's rule): it skips the partial line at ``start`` and reads past ``end`` to
finish its last line, so every line is processed once and one big file still parallelises.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from .errors import UsageError
from .spec import JobSpec
from .storage.base import BlobStore
from .storage.urls import is_s3

Split = tuple[str, tuple[int, int] | None]
_WINDOW = 64 * 1024
_GLOB_CHARS = set("*?[")


def expand_local(pattern: str) -> list[tuple[str, int]]:
    """Files named by a path, a directory (recursively, hidden files skipped) or a glob."""
    if _GLOB_CHARS & set(pattern):
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise UsageError(f"input glob {pattern!r} matches no files")
        paths = [Path(p) for p in matches]
    else:
        path = Path(pattern)
        if not path.exists():
            raise UsageError(f"input {pattern} does not exist")
        if path.is_dir():
            paths = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not paths:
                raise UsageError(f"input directory {pattern} contains no files")
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
    """Cut every object into ``chunk_size`` ranges; an empty object still gets one split."""
    splits: list[Split] = []
    for url, size in objects:
        if size == 0:
            splits.append((url, (0, 0)))
        for start in range(0, size, chunk_size):
            splits.append((url, (start, min(size, start + chunk_size))))
    return splits


async def plan_inputs(spec: JobSpec) -> list[Split]:
    """The map tasks' inputs: data splits, or the input strings themselves."""
    if not spec.split_inputs:
        return [(text, None) for text in spec.inputs]
    return plan_splits(await expand_inputs(spec.inputs), spec.chunk_size)


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
