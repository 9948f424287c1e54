"""The BlobStore protocol: atomic writes (whole or streamed), ranged reads, prefix listing.

Intermediate shuffle objects and results are written once under attempt-unique keys and
never modified, so the protocol needs no locking: ``put`` and ``open_writer`` must only
make an object visible complete, never half-written. A streamed write exists so that an
object larger than a worker's memory budget (a map's shuffle object, a reduce's result
part) never has to be held whole; a ranged read exists so that a reducer fetches only its
slice of every map's shuffle object. Every backend passes tests/test_blob_contract.py.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol


class BlobNotFound(FileNotFoundError):
    """The object does not exist."""


class BlobWriter(Protocol):
    """An object being written in pieces (see :meth:`BlobStore.open_writer`)."""

    async def write(self, data: bytes) -> None:
        """Append ``data``; may wait while earlier pieces are still being sent."""


class BlobStore(Protocol):
    async def put(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key``; readers see the old object or the whole new one."""

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of the object (clipped to its size); BlobNotFound if absent."""

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)`` (clipped to the object); BlobNotFound if absent."""

    def open_writer(self, key: str) -> AbstractAsyncContextManager[BlobWriter]:
        """Write ``key`` in pieces: ``async with store.open_writer(key) as w: await w.write(b)``.

        The object appears, whole, only when the block exits normally; if it raises (or is
        cancelled) nothing appears and whatever was sent is discarded.
        """

    async def size(self, key: str) -> int:
        """Length of the object in bytes; BlobNotFound if absent."""

    async def list_sized(self, prefix: str) -> list[tuple[str, int]]:
        """``(key, size)`` of every object starting with ``prefix``, sorted by key.

        One listing gives both, so planning a job's inputs costs one request per prefix
        instead of one per object.
        """

    async def list(self, prefix: str) -> list[str]:
        """Keys starting with ``prefix``, sorted."""

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; returns how many were removed."""

    def url(self, key: str) -> str:
        """Where a user finds the object (a path or an s3:// URL): what results are stamped as."""

    async def aclose(self) -> None: ...
