"""Backend factories for the contract suites: each yields fresh clients of one backend.

A contract test asks for ``state_backend`` / ``blob_backend`` and gets every backend in
turn; adding a backend here makes it pass (or fail) the very same tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from kubemr_async.state.base import StateStore
from kubemr_async.state.sqlite import SQLiteStateStore
from kubemr_async.storage.base import BlobStore
from kubemr_async.storage.fs import FileBlobStore

StoreFactory = Callable[[], Awaitable[StateStore]]
BlobFactory = Callable[[], Awaitable[BlobStore]]


@asynccontextmanager
async def sqlite_backend(tmp_path: Path) -> AsyncIterator[StoreFactory]:
    opened: list[StateStore] = []

    async def open_client() -> StateStore:
        store = SQLiteStateStore(tmp_path / "state.db", poll_interval=0.01)
        opened.append(store)
        return store

    try:
        yield open_client
    finally:
        for store in opened:
            await store.aclose()


@asynccontextmanager
async def fs_backend(tmp_path: Path) -> AsyncIterator[BlobFactory]:
    async def open_client() -> BlobStore:
        return FileBlobStore(tmp_path / "blobs")

    yield open_client
