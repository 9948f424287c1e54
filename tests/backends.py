"""Backend factories for the contract suites: each yields fresh clients of one backend.

A contract test asks for ``state_backend`` / ``blob_backend`` and gets every backend in
turn; adding a backend here makes it pass (or fail) the very same tests.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from kubemr_async.crd import ensure_crds
from kubemr_async.kube import Kube
from kubemr_async.state.base import StateStore
from kubemr_async.state.kube import KubeStateStore
from kubemr_async.state.sqlite import SQLiteStateStore
from kubemr_async.storage.base import BlobStore
from kubemr_async.storage.fs import FileBlobStore
from kubemr_async.storage.s3 import S3BlobStore, S3Config
from kubemr_async.testing.cluster import ApiError, TestCluster
from kubemr_async.testing.s3server import S3Server

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
async def kube_backend(cluster: TestCluster, **options: Any) -> AsyncIterator[StoreFactory]:
    """Stores on the real API server, each with its own connection (like separate processes).

    Every use gets a fresh namespace for its MapReduceJobs; afterwards the jobs are deleted
    through the store (which removes their task namespaces) and then the namespace itself.
    ``options`` go to KubeStateStore.
    """
    namespace = f"t-{uuid.uuid4().hex[:10]}"
    options.setdefault("default_output", "s3://bucket/prefix")
    opened: list[KubeStateStore] = []

    async def open_client() -> StateStore:
        store = await KubeStateStore.connect(namespace, kubeconfig=str(cluster.kubeconfig_path),
                                             **options)
        opened.append(store)
        return store

    async with await Kube.connect(str(cluster.kubeconfig_path)) as admin:
        await ensure_crds(admin)
        await asyncio.to_thread(cluster.create_namespace, namespace)
        try:
            yield open_client
        finally:
            for store in opened:
                await store.aclose()
            cleaner = KubeStateStore(admin, namespace)
            for job in await cleaner.jobs():
                await cleaner.delete(job)
            await asyncio.to_thread(_delete_namespace, cluster, namespace)


def _delete_namespace(cluster: TestCluster, namespace: str) -> None:
    try:
        cluster.api("DELETE", f"/api/v1/namespaces/{namespace}")
    except ApiError as exc:
        if exc.status != 404:
            raise


@asynccontextmanager
async def fs_backend(tmp_path: Path) -> AsyncIterator[BlobFactory]:
    async def open_client() -> BlobStore:
        return FileBlobStore(tmp_path / "blobs")

    yield open_client


@asynccontextmanager
async def s3_backend(server: S3Server, **options: Any) -> AsyncIterator[BlobFactory]:
    """Clients of a fresh bucket on the real S3 server; the bucket is emptied and removed.

    ``options`` override S3Config fields (e.g. a low multipart threshold).
    """
    config = s3_config(server, **options)
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    admin = S3BlobStore(bucket, config)
    client = await admin._client()
    await client.create_bucket(Bucket=bucket)
    opened: list[S3BlobStore] = [admin]

    async def open_client() -> BlobStore:
        store = S3BlobStore(bucket, config)
        opened.append(store)
        return store

    try:
        yield open_client
    finally:
        await admin.delete_prefix("")
        await client.delete_bucket(Bucket=bucket)
        for store in opened:
            await store.aclose()


def s3_config(server: S3Server, **options: Any) -> S3Config:
    """A config pointing at the test server with its fixed test credentials."""
    values: dict[str, Any] = {
        "endpoint_url": server.endpoint_url, "region": server.region,
        "access_key_id": server.access_key, "secret_access_key": server.secret_key}
    return S3Config(**(values | options))
