"""Read a finished job's results back as Python pairs, in any format (like mrjob's cat_output).

A result location is self-describing: `kubemr run`'s output directory and a cluster job's
data prefix on S3 both hold a ``_SUCCESS`` manifest naming the format and the parts (paths
relative to the manifest), which is written only once the job has succeeded. Reading
follows the manifest, never a directory listing, so stray or partial files are not results.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import formats
from .errors import UsageError
from .formats import SUCCESS_MARKER
from .storage.urls import is_s3, open_url

__all__ = ["read_results"]


def read_results(location: str | os.PathLike[str]) -> Iterator[tuple[Any, Any]]:
    """Yield every ``(key, value)`` of a job's results, part by part, in part order.

    ``location`` is a local result directory or an ``s3://bucket/prefix`` holding a
    ``_SUCCESS`` manifest. text parts give str keys and values (surrogateescape, split on
    the first TAB); jsonl parts the decoded JSON; parquet parts the typed values. A location
    without a manifest, or a part whose size is not the one the manifest records, raises
    UsageError. Parts are read one at a time.
    """
    where = str(location).rstrip("/")
    manifest_url = f"{where}/{SUCCESS_MARKER}"
    try:
        manifest = formats.read_manifest(_read(manifest_url))
    except (FileNotFoundError, NotADirectoryError):
        raise UsageError(f"{where}: no {SUCCESS_MARKER} manifest, so not the results of a "
                         "finished kubemr job") from None
    except ValueError as exc:
        raise UsageError(f"{manifest_url}: not a kubemr manifest: {exc}") from None
    sizes = manifest.sizes or (None,) * len(manifest.parts)
    for part, size in zip(manifest.parts, sizes, strict=True):
        url = _part_url(where, part, manifest_url)
        data = _read(url)
        if size is not None and len(data) != size:
            raise UsageError(f"{url}: {len(data)} bytes where the job wrote {size}: the part "
                             "was cut short or changed since, so these are not its results")
        yield from formats.decode(data, manifest.format)


def _part_url(where: str, part: str, manifest_url: str) -> str:
    """Where a manifest's part is: relative to the manifest, or an absolute location.

    An S3 manifest never names a local path (kubemr writes none), and following one
    would read a file of whoever reads the results, with their rights, as results.
    """
    if is_s3(part):
        return part
    if Path(part).is_absolute():
        if is_s3(where):
            raise UsageError(f"{manifest_url}: not a kubemr manifest: it names the local "
                             f"file {part!r} as a part")
        return part
    return f"{where}/{part}"


def _read(url: str) -> bytes:
    if not is_s3(url):
        return Path(url).read_bytes()

    async def get() -> bytes:
        store, key = open_url(url)
        try:
            return await store.get(key)  # BlobNotFound is a FileNotFoundError
        finally:
            await store.aclose()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(get())
    # Called from async code: its loop is busy running us, so fetch on a loop of our own.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, get()).result()
