"""The BlobStore protocol: whole-object writes that are atomic, ranged reads, prefix listing.

Intermediate runs and results are written once under attempt-unique keys and never
modified, so the protocol needs no locking: ``put`` must only make an object visible
complete, never half-written. Every backend passes tests/test_blob_contract.py.
"""

from __future__ import annotations

from typing import Protocol


class BlobNotFound(FileNotFoundError):
    """The object does not exist."""


class BlobStore(Protocol):
    async def put(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key``; readers see the old object or the whole new one."""

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of the object (clipped to its size); BlobNotFound if absent."""

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
