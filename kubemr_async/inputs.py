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
  (:mod:`.compression`) cannot be entered mid-stream, so each is one map task ``(0, size)``.
  Its map reads it as a stream (:func:`read_compressed`): fetched in ranged windows,
  decoded as it comes and cut into line-aligned pieces of about the split size, which the
  map gets one at a time, as a batched map gets its splits. So a task holds about a split
  of it however large it inflates (a compressed Parquet file, read by offsets from its
  footer, is the exception: it is decoded whole, in memory).
"""

from __future__ import annotations

import asyncio
import fnmatch
import glob
import itertools
import os
import stat
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import compression, recordio, shuffle
from .errors import PermanentTaskError, UsageError
from .protocol import Split as Split
from .recordio import ParquetSplit, TextSplit
from .spec import JobSpec
from .storage.base import BlobNotFound, BlobStore
from .storage.urls import StoreCache, check_utf8_path, is_s3, split_s3

if TYPE_CHECKING:
    from .storage.s3 import S3Config

_WINDOW = 64 * 1024
#: Compressed bytes fetched per ranged read of a compressed input.
_COMPRESSED_WINDOW = 4 * 1024 * 1024
_GLOB_CHARS = set("*?[")
HIDDEN_NOTE = "names starting with _ or . are skipped"


def is_hidden(name: str) -> bool:
    """Hadoop's rule: a file or directory name starting with ``_`` or ``.`` is not data."""
    return name.startswith(("_", "."))


def _hidden_match(pattern_parts: Sequence[str], match_parts: Sequence[str]) -> bool:
    """Whether a glob match passes through a hidden name that the pattern did not spell out.

    Every name from the first wildcard component on counts (``out/**/*.txt`` must not
    reach into ``out/_logs/``), except names the pattern writes literally there
    (``data/*/_meta/*.txt`` asked for ``_meta``).
    """
    first = next(i for i, part in enumerate(pattern_parts) if _GLOB_CHARS & set(part))
    spelled = {part for part in pattern_parts[first:] if not _GLOB_CHARS & set(part)}
    return any(is_hidden(part) and part not in spelled for part in match_parts[first:])


def expand_local(pattern: str, *, split: bool = True) -> list[tuple[str, int]]:
    """Files named by a path, a directory (recursively) or a glob; hidden files skipped.

    ``split``: the files are data kubemr reads by size (False: a low-level job's inputs,
    which it opens itself).
    """
    if _GLOB_CHARS & set(pattern):
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise UsageError(f"input glob {pattern!r} matches no files")
        pattern_parts = Path(pattern).parts
        paths = [Path(p) for p in matches if not _hidden_match(pattern_parts, Path(p).parts)]
        if not paths:
            raise UsageError(f"input glob {pattern!r} matches no data files ({HIDDEN_NOTE})")
    else:
        path = Path(pattern)
        if not path.exists():
            raise UsageError(f"input {pattern} does not exist")
        if path.is_dir():
            entries = sorted(p for p in path.rglob("*") if not p.is_dir())
            files = {p for p in entries if p.is_file()}
            visible = [p for p in entries
                       if not any(is_hidden(part) for part in p.relative_to(path).parts)]
            paths = [p for p in visible if p in files]
            _refuse_unreadable([p for p in visible if p not in files], path)
            if not files:
                raise UsageError(f"input directory {pattern} contains no files")
            if not paths:
                raise UsageError(f"input directory {pattern} contains no data files "
                                 f"({HIDDEN_NOTE})")
        else:
            paths = [path]
    # One file reached by several names (a symlink to it, or to a directory above it) is
    # read once: a glob's ** follows symlinked directories, so a link back up the tree
    # named every file below it again at each of ~40 levels until the path was too long.
    unique: dict[tuple[int, int], tuple[Path, os.stat_result]] = {}
    for p in paths:
        info = p.stat()
        unique.setdefault((info.st_dev, info.st_ino), (p, info))
    return [_local_file(p, info, split) for p, info in unique.values()]


def _refuse_unreadable(others: Sequence[Path], directory: Path) -> None:
    """UsageError naming the first of ``others``, the data entries of ``directory`` that
    are not files to read: a symlink to nothing, a pipe, a socket or a device. Skipped, it
    would be an input silently left out of the job."""
    if others:
        entry = others[0]
        what = ("a symlink to nothing" if entry.is_symlink() and not entry.exists()
                else "not a regular file (a pipe, a socket or a device)")
        raise UsageError(f"input {entry} (in directory {directory}) is {what}; remove it or "
                         "name the files to read")


def _local_file(path: Path, info: os.stat_result, split: bool) -> tuple[str, int]:
    """One local input (``info``: its stat) as ``(resolved path, size)``; UsageError if it
    cannot be read as data.

    Splits are planned from the size and read back by ranged reads, so only a regular file
    whose size is its content will do: a pipe or device (``/dev/stdin``, a FIFO) has no
    size to plan with, and a ``/proc`` or ``/sys`` file says 0 bytes whatever it holds, which
    would be read as an empty input. Its name must be UTF-8 text, as every name in a task
    record is.
    """
    resolved = str(path.resolve())
    check_utf8_path(resolved, "input")
    if not os.access(path, os.R_OK):
        raise UsageError(f"input {path} is not readable")
    if not split:
        return resolved, info.st_size
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"input {path} is not a regular file (a pipe or a device has no "
                         "size to split by); copy it to a file first")
    if info.st_size == 0:
        with open(path, "rb") as f:
            if f.read(1):
                raise UsageError(f"input {path} reports a size of 0 bytes but holds data "
                                 "(a /proc or /sys file?); copy it to a file first")
    return resolved, info.st_size


async def expand_inputs(patterns: Sequence[str],
                        stores: StoreCache | None = None) -> list[tuple[str, int]]:
    """Every input object with its size, in a stable order; UsageError if any names nothing.

    ``stores``: the stores to list S3 with (their credentials; default: this process's).
    """
    found: list[tuple[str, int]] = []
    for pattern in patterns:
        if is_s3(pattern):
            found += await expand_s3(pattern, stores=stores)
        else:
            found += expand_local(pattern)
    return found


async def expand_s3(pattern: str, config: S3Config | None = None, *,
                    stores: StoreCache | None = None) -> list[tuple[str, int]]:
    """The objects an ``s3://`` input names, as ``(url, size)``, without reading any data.

    ``s3://bucket/key`` is one object (or, if absent, the prefix ``key/``);
    ``s3://bucket/prefix/`` is every object below it; a key with ``*?[`` is a glob matched
    per path segment. Objects whose name below a prefix (or, for a glob, whose own last
    segment) starts with ``_`` or ``.`` are skipped, as for local inputs; an object named
    exactly is read whatever its name. Anything that names nothing is a UsageError with a
    one-line reason, raised before a job starts. The listing uses ``stores`` (whose
    clients the caller keeps) if given, else a store of its own with ``config``.
    """
    # Imported here: a job with local inputs never loads aiobotocore.
    from .storage.s3 import S3BlobStore, S3Config, S3Error, valid_bucket_name

    bucket, key = split_s3(pattern)
    if "@" in bucket:  # s3://KEY:SECRET@bucket/...: never echo what is before the @
        shown = f"s3://***@{bucket.rpartition('@')[2]}/{key}"
        raise UsageError(f"invalid S3 URL {shown!r}: credentials do not belong in it; "
                         "give them as AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if not valid_bucket_name(bucket):
        raise UsageError(f"invalid S3 URL {pattern!r}: {bucket!r} is not a bucket name")
    if stores is None:
        store = S3BlobStore(bucket, config if config is not None else S3Config.from_env())
    else:
        opened = stores.open(f"s3://{bucket}")[0]
        assert isinstance(opened, S3BlobStore)  # what a StoreCache opens for s3://
        store = opened
    try:
        return await expand_store(store, pattern, key)
    except _EmptyPrefix:
        # An empty listing does not say whether the bucket exists; HeadBucket does.
        if await store.bucket_missing():
            raise UsageError(f"input {pattern}: bucket {bucket!r} does not exist") from None
        raise
    except S3Error as exc:
        if exc.bucket_missing:
            raise UsageError(f"input {pattern}: bucket {bucket!r} does not exist") from None
        if exc.access_denied:
            raise UsageError(f"input {pattern}: access denied ({exc.code}); check the S3 "
                             f"credentials and the bucket policy") from None
        raise
    finally:
        if stores is None:
            await store.aclose()


class _EmptyPrefix(UsageError):
    """A prefix lists nothing at all: the caller may know a better reason (no such bucket)."""


async def expand_store(store: BlobStore, pattern: str, key: str) -> list[tuple[str, int]]:
    """What ``key`` (an object, a prefix, or a glob) names in ``store``, as ``(url, size)``.

    Only :meth:`BlobStore.list_sized` and ``size`` are used, so the rules are the same on
    every backend; ``pattern`` is the user's spelling, for error messages.
    """
    if _GLOB_CHARS & set(key):
        literal = key[:min(key.index(c) for c in _GLOB_CHARS if c in key)]
        matched = [(k, n) for k, n in await store.list_sized(literal)
                   if not _folder_marker(k, n) and _glob_match(key, k)]
        if not matched:
            raise UsageError(f"input glob {pattern!r} matches no objects")
        found = [(k, n) for k, n in matched if not _hidden_match(key.split("/"), k.split("/"))]
        if not found:
            raise UsageError(f"input glob {pattern!r} matches no data objects ({HIDDEN_NOTE})")
    elif key == "" or key.endswith("/"):
        listed = await store.list_sized(key)
        found = [(k, n) for k, n in listed if _visible(k, n, key)]
        if not found:
            if any(not _folder_marker(k, n) for k, n in listed):
                raise UsageError(f"input prefix {pattern} contains no data objects "
                                 f"({HIDDEN_NOTE})")
            raise _EmptyPrefix(f"input prefix {pattern} contains no objects")
    else:
        try:
            found = [(key, await store.size(key))]
        except BlobNotFound:
            listed = await store.list_sized(key + "/")
            found = [(k, n) for k, n in listed if _visible(k, n, key + "/")]
            if not found:
                if any(not _folder_marker(k, n) for k, n in listed):
                    raise UsageError(f"input prefix {pattern}/ contains no data objects "
                                     f"({HIDDEN_NOTE})") from None
                raise UsageError(f"input {pattern} does not exist") from None
    return [(store.url(k), n) for k, n in found]


def _folder_marker(key: str, size: int) -> bool:
    """Zero-byte ``name/`` objects are folders that S3 consoles create, not data."""
    return key.endswith("/") and size == 0


def _glob_match(pattern: str, key: str) -> bool:
    """Match like a local ``glob(recursive=True)``, so S3 and local inputs agree.

    Per '/' segment: ``*``/``?``/``[..]`` stay inside a segment, a ``**`` segment spans any
    number of segments, and hidden segments (``.name``) only match a pattern segment that
    itself starts with '.'.
    """
    parts = key.split("/")
    reach = {0}  # how many key segments the pattern so far can have consumed
    for pat in pattern.split("/"):
        if pat == "**":
            spans = set()
            for j in reach:
                spans.add(j)
                while j < len(parts) and not parts[j].startswith("."):
                    j += 1
                    spans.add(j)
            reach = spans
        else:
            reach = {j + 1 for j in reach if j < len(parts)
                     and (pat.startswith(".") or not parts[j].startswith("."))
                     and fnmatch.fnmatchcase(parts[j], pat)}
        if not reach:
            return False
    return len(parts) in reach


def _visible(key: str, size: int, prefix: str) -> bool:
    """Whether a listed object is an input, like a file in a local input directory.

    Keys with a hidden segment below the prefix (``.staging/x``, ``_SUCCESS``,
    ``_temporary/x``) are skipped as local directory inputs skip hidden files.
    """
    if _folder_marker(key, size):
        return False
    return not any(is_hidden(part) for part in key[len(prefix):].split("/"))


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


async def plan_inputs(spec: JobSpec, map_input: str | None = None,
                      stores: StoreCache | None = None) -> list[Split]:
    """The map tasks' inputs: data splits, or (unsplit jobs) one input string per map.

    ``map_input`` is the job's map input when the planner knows it (``kubemr run``):
    ``"parquet"`` plans Parquet files by row group (:func:`plan_parquet_splits`). A
    planner that does not know it (the operator imports no job module) cuts every file
    into byte ranges, which a Parquet map reads by row-group midpoints just as well.
    ``stores`` reach S3 with the credentials to plan with (the operator: the job's own;
    default: this process's, with stores made and closed here).
    """
    if stores is None:
        stores = StoreCache()
        try:
            return await plan_inputs(spec, map_input, stores)
        finally:
            await stores.aclose()
    if not spec.split_inputs:
        return [(text, None) for pattern in spec.inputs
                for text in await _unsplit(pattern, stores)]
    objects = await expand_inputs(spec.inputs, stores)
    check_local_compressed(objects)
    chunk = split_size(spec)
    if map_input in recordio.PARQUET_INPUTS:
        return await plan_parquet_splits(objects, chunk, stores)
    return plan_splits(objects, chunk)


def split_size(spec: JobSpec) -> int:
    """The input bytes of one map split: the chunk size, within the memory budget's share.
    A compressed input (one split) is read in pieces of this size."""
    if spec.memory is None:
        return spec.chunk_size
    return min(spec.chunk_size, shuffle.ShuffleBudget(spec.memory).split_bytes)


async def plan_parquet_splits(objects: Sequence[tuple[str, int]], chunk_size: int,
                              stores: StoreCache | None = None) -> list[Split]:
    """Cut Parquet files at row-group boundaries into splits of about ``chunk_size`` bytes.

    Only each file's footer is read. Consecutive row groups join a split until the next
    would take it past ``chunk_size`` (a group larger than that is a split of its own); a
    file without row groups, and a compressed file, is one split. A file that is not
    Parquet is a UsageError naming it, before any task runs.
    """
    cache = stores or StoreCache()
    splits: list[Split] = []
    try:
        for url, size in objects:
            if size == 0 or compression.codec_for(url) is not None:
                splits.append((url, (0, size)))
                continue
            store, key = cache.open(url)
            try:
                spans = recordio.row_group_spans(await _parquet_metadata(store, key, size))
            except PermanentTaskError as exc:
                raise UsageError(str(exc)) from None
            starts = [0]
            for lo, hi in spans[1:]:  # the split so far begins at its first group's start
                if hi - max(starts[-1], spans[0][0]) > chunk_size:
                    starts.append(lo)
            bounds = [*starts, size]
            splits += [(url, (a, b)) for a, b in itertools.pairwise(bounds)]
    finally:
        if stores is None:
            await cache.aclose()
    return splits


async def _parquet_footer(store: BlobStore, key: str, size: int) -> bytes:
    """A Parquet file's footer (with its length and magic): usually one ranged read."""
    url = store.url(key)
    if size < 12:
        raise PermanentTaskError(f"input {url} is not a Parquet file (too short)")
    tail = await store.get(key, max(0, size - _WINDOW), size)
    length = recordio.parquet_footer_length(tail, url)
    if length + 8 > size - 4:
        raise PermanentTaskError(f"input {url} is not a Parquet file (footer length "
                                 f"{length} past its start)")
    if length + 8 > len(tail):
        tail = await store.get(key, size - 8 - length, size)
    return tail[len(tail) - 8 - length:]


async def _parquet_metadata(store: BlobStore, key: str, size: int) -> Any:
    return recordio.parquet_metadata(store.url(key),
                                     await _parquet_footer(store, key, size))


async def read_parquet_split(store: BlobStore, key: str,
                             byte_range: tuple[int, int] | None) -> ParquetSplit:
    """The row groups a split owns (midpoint in its range): the footer and their bytes.

    A compressed file (one split) is decoded whole, in memory: Parquet is read by offsets
    from its footer, at its end, so it cannot be read as a stream.
    """
    url = store.url(key)
    if compression.codec_for(key) is not None:
        data = b"".join([piece async for _, piece in
                         read_compressed(store, key, byte_range, _COMPRESSED_WINDOW)])
        size = len(data)
        footer_length = recordio.parquet_footer_length(data[-8:], url)
        footer = data[max(0, size - 8 - footer_length):]
        groups = recordio.parquet_metadata(url, footer).num_row_groups
        return ParquetSplit(url, size, ((size - len(footer), footer), (0, data)),
                            tuple(range(groups)))
    size = await store.size(key)
    check_planned_size(store, key, byte_range, size)
    footer = await _parquet_footer(store, key, size)
    spans = recordio.row_group_spans(recordio.parquet_metadata(url, footer))
    start, end = byte_range if byte_range is not None else (0, size)
    owned = recordio.owned_row_groups(spans, start, end)
    if not owned:
        return ParquetSplit(url, size, ((size - len(footer), footer),), ())
    lo, hi = min(spans[i][0] for i in owned), max(spans[i][1] for i in owned)
    return ParquetSplit(url, size, ((size - len(footer), footer),
                                    (lo, await store.get(key, lo, hi))), tuple(owned))


async def read_text_split(store: BlobStore, key: str, byte_range: tuple[int, int] | None,
                          kind: str) -> TextSplit:
    """A text split of an uncompressed input for a per-record map: its lines, offset, and
    (csv) the file's header."""
    if byte_range is None:
        return TextSplit(store.url(key), await read_task_input(store, key, byte_range))
    size = await store.size(key)
    check_planned_size(store, key, byte_range, size)
    begin, data = await read_split_at(store, key, byte_range[0], byte_range[1], size)
    return await text_split(store, key, begin, data, kind, size)


async def text_split(store: BlobStore, key: str, begin: int, data: bytes, kind: str,
                     size: int) -> TextSplit:
    """``data`` (whole lines from ``begin``) as a TextSplit; a CSV split not at byte 0
    gets the file's first line as its header, by ranged reads from the start."""
    header = None
    if kind == "csv" and begin > 0:
        header = await _first_line(store, key, size)
    return TextSplit(store.url(key), data, begin, header)


async def _first_line(store: BlobStore, key: str, size: int) -> bytes:
    """The file's first line, without its terminator (``\n`` or ``\r\n``)."""
    line = b""
    while len(line) < size:
        window = await store.get(key, len(line), min(size, len(line) + _WINDOW))
        if not window:
            break
        found = window.find(b"\n")
        if found >= 0:
            line += window[:found]
            break
        line += window
    return line.removesuffix(b"\r")


async def read_map_input(store: BlobStore, key: str, byte_range: tuple[int, int] | None,
                         kind: str, piece_bytes: int,
                         ) -> AsyncGenerator[bytes | TextSplit | ParquetSplit, None]:
    """What a map of input ``kind`` reads, in pieces that it gets one at a time: the
    split's bytes (``"text"``/``"bytes"``), a TextSplit (``"lines"``, ``"jsonl"``,
    ``"csv"``) or a ParquetSplit.

    A split is one piece. A compressed object (one split) is its decoded stream in
    line-aligned pieces of about ``piece_bytes`` (:func:`read_compressed`), each placed at
    its offset in that stream, and for CSV with the stream's first line as its header.
    """
    if kind in recordio.PARQUET_INPUTS:
        yield await read_parquet_split(store, key, byte_range)
    elif compression.codec_for(key) is None:
        yield await (read_text_split(store, key, byte_range, kind)
                     if kind in recordio.RECORD_INPUTS else read_task_input(store, key, byte_range))
    else:
        header: bytes | None = None
        async for offset, piece in read_compressed(store, key, byte_range, piece_bytes):
            data: bytes | TextSplit = piece
            if kind in recordio.RECORD_INPUTS:
                data = TextSplit(store.url(key), piece, offset, header if offset else None)
                if kind == "csv" and header is None:
                    header = piece.partition(b"\n")[0].removesuffix(b"\r")
            del piece  # each piece goes before the next is decoded
            yield data
            del data


async def _unsplit(text: str, stores: StoreCache) -> list[str]:
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
            return [url for url, _ in await expand_s3(text, stores=stores)]
        return [text]
    return _unsplit_local(text)


def _unsplit_local(text: str) -> list[str]:
    if _GLOB_CHARS & set(text):
        if not any(os.path.isfile(p) for p in glob.glob(text, recursive=True)):
            return [text]
    elif not os.path.exists(text):
        return [text]
    return [path for path, _ in expand_local(text, split=False)]


async def read_task_input(store: BlobStore, key: str,
                          byte_range: tuple[int, int] | None) -> bytes:
    """The bytes of an uncompressed split: its lines, or (``byte_range`` None, an unsplit
    job) the whole object."""
    if byte_range is None:
        return await store.get(key)
    start, end = byte_range
    size = await store.size(key)
    check_planned_size(store, key, byte_range, size)
    return await read_split(store, key, start, end, size)


async def read_compressed(store: BlobStore, key: str, byte_range: tuple[int, int] | None,
                          piece_bytes: int) -> AsyncGenerator[tuple[int, bytes], None]:
    """A compressed object's decoded stream in line-aligned pieces, each with its offset
    in the stream: the lines that begin in the next ``piece_bytes`` bytes (one line longer
    than that is a piece of its own). An empty stream is one empty piece, as an empty
    file is one empty split.

    The object is fetched in ranged windows and decoded as the pieces are asked for, so
    what is held is a window, a piece and the decoder's bounded output, whatever the
    decoded size. Decoding runs off the event loop (which must keep renewing the lease),
    one piece per step. Data that does not decode is a PermanentTaskError naming the
    object, as retrying cannot fix it.
    """
    codec = compression.codec_for(key)
    assert codec is not None
    if byte_range is not None and byte_range[0] != 0:
        raise PermanentTaskError(f"input {store.url(key)} is {codec.name}-compressed and "
                                 f"cannot be read from offset {byte_range[0]}")
    size = await store.size(key)
    # A compressed object is planned as one split (0, its size): any other size now means
    # it was replaced, and it is read to its end, so growth counts too.
    if byte_range is not None and size != byte_range[1]:
        raise PermanentTaskError(_changed(store, key, byte_range[1], size))
    decoder = compression.decoder(codec, store.url(key))
    pieces = _LinePieces(decoder.read, piece_bytes)
    fed = offset = 0
    ended = False
    try:
        while True:
            try:
                piece = await asyncio.to_thread(pieces.next, ended)
            except compression.InvalidCompressedData as exc:
                raise PermanentTaskError(str(exc)) from None
            if piece or (ended and offset == 0):
                length = len(piece)
                yield offset, piece
                del piece  # before the next is decoded
                if not length:
                    return
                offset += length
            elif fed < size:
                window = await store.get(key, fed, min(size, fed + _COMPRESSED_WINDOW))
                if not window:  # shorter now than a moment ago: replaced while read
                    raise PermanentTaskError(_changed(store, key, size, fed))
                decoder.feed(window)
                fed += len(window)
            elif not ended:
                decoder.end()
                ended = True
            else:
                return
    finally:
        decoder.close()


class _LinePieces:
    """Decoded bytes (``read()``: the next, b"" when it needs more input) cut into pieces of
    whole lines: the lines that begin in the next ``size`` bytes."""

    def __init__(self, read: Callable[[], bytes], size: int) -> None:
        self._read, self._size = read, size
        self._buffer = bytearray()
        self._searched = 0  # no line ends in the buffer from size - 1 up to here

    def next(self, ended: bool) -> bytes:
        """The next piece, or b"" if ``read`` needs more input first; once the input has
        ``ended``, the last piece may lack a line end, and b"" is the end. Blocking (it
        decodes): run it in a thread."""
        while True:
            cut = self._buffer.find(b"\n", max(self._searched, self._size - 1))
            if cut >= 0:
                return self._take(cut + 1)
            self._searched = len(self._buffer)
            out = self._read()
            if not out:
                return self._take(len(self._buffer)) if ended else b""
            self._buffer += out

    def _take(self, length: int) -> bytes:
        with memoryview(self._buffer) as view:
            piece = view[:length].tobytes()
        del self._buffer[:length]
        self._searched = 0
        return piece


def check_planned_size(store: BlobStore, key: str, byte_range: tuple[int, int] | None,
                       size: int) -> None:
    """PermanentTaskError if the object is now shorter than the split planned on it.

    Splits are cut from the sizes listed at planning; an object truncated or replaced by
    a shorter one since would otherwise give its missing splits no lines at all, and the
    job would succeed on part of its input.
    """
    if byte_range is not None and byte_range[1] > size:
        raise PermanentTaskError(_changed(store, key, byte_range[1], size))


def _changed(store: BlobStore, key: str, planned: int, size: int) -> str:
    return (f"input {store.url(key)} changed after the job was planned: it is {size} bytes "
            f"now, and a split planned on it ends at byte {planned}")


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
    return (await read_split_at(store, key, start, end, size))[1]


async def read_split_at(store: BlobStore, key: str, start: int, end: int,
                        size: int) -> tuple[int, bytes]:
    """Where the first line beginning in ``[start, end)`` starts, and those lines."""
    lo = max(0, start - 1)
    data = await store.get(key, lo, min(size, end + _WINDOW))
    begin = await _line_start(store, key, start, size, data, lo)
    stop = await _line_start(store, key, end, size, data[end - 1 - lo:] if end > lo else b"",
                             end - 1)
    if begin >= stop:
        return begin, b""
    if stop <= lo + len(data):
        return begin, data[begin - lo:stop - lo]
    return begin, await store.get(key, begin, stop)
