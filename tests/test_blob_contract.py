"""The BlobStore contract: every backend must pass exactly these tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from kubemr_async.storage.base import BlobNotFound
from kubemr_async.testing.s3server import S3Server

from .backends import BlobFactory, fs_backend, s3_backend

pytestmark = pytest.mark.anyio

BACKENDS = ["fs", pytest.param("s3", marks=[pytest.mark.s3, pytest.mark.slow])]


@pytest.fixture
def s3_blob_backend(s3_server: S3Server) -> AbstractAsyncContextManager[BlobFactory]:
    """A fresh bucket per test on the session's real S3 server (made on entry).

    Small multipart thresholds, so that the multipart paths (put and the streamed writer)
    run in the contract tests too.
    """
    return s3_backend(s3_server, multipart_threshold=1024 * 1024,
                      multipart_part_size=5 * 1024 * 1024)


@pytest.fixture(params=BACKENDS)
async def blob_backend(request: pytest.FixtureRequest, tmp_path: Path
                       ) -> AsyncIterator[BlobFactory]:
    if request.param == "fs":
        async with fs_backend(tmp_path) as factory:
            yield factory
    else:
        # Other backends register a *sync* fixture ``<name>_blob_backend`` returning an
        # async context manager that yields a factory: an async fixture cannot be requested
        # dynamically from inside this running async one (anyio refuses to re-enter).
        backend = request.getfixturevalue(f"{request.param}_blob_backend")
        async with backend as factory:
            yield factory


async def test_put_get_ranges_and_size(blob_backend: BlobFactory) -> None:
    store = await blob_backend()
    data = bytes(range(256)) * 1000
    await store.put("job/map/00000/attempt-1/part-00000.run", data)
    key = "job/map/00000/attempt-1/part-00000.run"
    assert await store.get(key) == data
    assert await store.get(key, 10, 20) == data[10:20]
    assert await store.get(key, 255_990) == data[255_990:]
    assert await store.get(key, 255_990, 999_999) == data[255_990:]
    assert await store.size(key) == len(data)
    await store.aclose()


async def test_missing_objects_raise_blob_not_found(blob_backend: BlobFactory) -> None:
    store = await blob_backend()
    with pytest.raises(BlobNotFound):
        await store.get("nope/missing")
    with pytest.raises(BlobNotFound):
        await store.size("nope/missing")
    await store.aclose()


async def test_overwrite_replaces_whole_object(blob_backend: BlobFactory) -> None:
    store = await blob_backend()
    await store.put("k/obj", b"a" * 100_000)
    await store.put("k/obj", b"short")
    assert await store.get("k/obj") == b"short"
    await store.aclose()


async def test_list_and_delete_prefix(blob_backend: BlobFactory) -> None:
    store = await blob_backend()
    keys = ["j/map/00000/a", "j/map/00001/b", "j/output/part-00000", "jx/other"]
    await asyncio.gather(*(store.put(k, k.encode()) for k in keys))
    assert await store.list("j/map/") == keys[:2]
    assert await store.list("j/") == keys[:3]
    assert await store.delete_prefix("j/map/") == 2
    assert await store.list("j/") == ["j/output/part-00000"]
    assert await store.list("missing/") == []
    await store.aclose()


async def test_list_sized_gives_every_key_with_its_size(blob_backend: BlobFactory) -> None:
    store = await blob_backend()
    objects = {"in/b/two": b"22", "in/a": b"1", "in/empty": b"", "inx/other": b"333"}
    await asyncio.gather(*(store.put(k, v) for k, v in objects.items()))
    assert await store.list_sized("in/") == [("in/a", 1), ("in/b/two", 2), ("in/empty", 0)]
    assert await store.list_sized("in") == [("in/a", 1), ("in/b/two", 2), ("in/empty", 0),
                                            ("inx/other", 3)]
    assert await store.list_sized("missing/") == []
    await store.aclose()


async def test_concurrent_puts_are_never_torn(blob_backend: BlobFactory) -> None:
    store = await blob_backend()
    payloads = [bytes([i]) * 300_000 for i in range(8)]
    await asyncio.gather(*(store.put("race/obj", p) for p in payloads))
    assert await store.get("race/obj") in payloads
    await store.aclose()


async def test_url_names_the_object(blob_backend: BlobFactory) -> None:
    store = await blob_backend()
    await store.put("u/obj", b"x")
    assert store.url("u/obj").endswith("u/obj")
    await store.aclose()


async def test_get_range_reads_exactly_the_range_clipped(blob_backend: BlobFactory) -> None:
    store = await blob_backend()
    data = bytes(range(256)) * 100
    await store.put("r/obj", data)
    assert await store.get_range("r/obj", 0, 10) == data[:10]
    assert await store.get_range("r/obj", 1000, 300) == data[1000:1300]
    assert await store.get_range("r/obj", len(data) - 5, 100) == data[-5:]
    assert await store.get_range("r/obj", len(data), 10) == b""
    assert await store.get_range("r/obj", 7, 0) == b""
    with pytest.raises(BlobNotFound):
        await store.get_range("r/missing", 0, 10)
    await store.aclose()


@pytest.mark.parametrize("sizes", [[], [0], [10, 0, 5], [3_000_000, 4_000_000, 1]],
                         ids=["nothing", "empty-piece", "small", "multipart"])
async def test_a_streamed_write_appears_whole(blob_backend: BlobFactory,
                                            sizes: list[int]) -> None:
    store = await blob_backend()
    pieces = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    async with store.open_writer("w/obj") as writer:
        for piece in pieces:
            await writer.write(piece)
        assert await store.list("w/") == [], "nothing is visible before the block ends"
    assert await store.get("w/obj") == b"".join(pieces)
    await store.aclose()


async def test_a_failed_streamed_write_leaves_nothing(blob_backend: BlobFactory) -> None:
    store = await blob_backend()
    await store.put("w/old", b"old")
    with pytest.raises(RuntimeError, match="boom"):
        async with store.open_writer("w/old") as writer:
            await writer.write(b"x" * 6_000_000)
            await writer.write(b"y" * 100)
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        async with store.open_writer("w/new") as writer:
            await writer.write(b"z")
            raise RuntimeError("boom")
    assert await store.list("w/") == ["w/old"]
    assert await store.get("w/old") == b"old"
    await store.aclose()
