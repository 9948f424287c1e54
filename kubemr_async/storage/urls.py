"""Map a user-facing location (local path or ``s3://bucket/key``) to a BlobStore and key."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..errors import UsageError
from .base import BlobStore
from .fs import FileBlobStore


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def check_utf8_path(path: str, role: str) -> None:
    """UsageError unless a local path's name is UTF-8 text: the names of inputs and outputs
    travel in task records (JSON) and become store keys, which are text."""
    shown = os.fsencode(path).decode("utf-8", "backslashreplace")
    if shown != path:
        raise UsageError(f"{role} {shown} has a name that is not valid UTF-8; use a UTF-8 name")


def split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise UsageError(f"invalid S3 URL {url!r}: expected s3://bucket/key")
    return bucket, key


def job_data_prefix(output: str, namespace: str, job: str) -> str:
    """The key under which a cluster job's workers keep its data in the ``output`` bucket.

    The namespace is part of it: jobs of the same name in two namespaces (two tenants)
    sharing an output location never see or delete each other's data.
    """
    _, key = split_s3(output)
    return f"{key.strip('/')}/{namespace}/{job}".lstrip("/")


def _locate(url: str) -> tuple[str, str]:
    """(store identity, key): an S3 bucket or a filesystem root, and the key inside it."""
    if is_s3(url):
        bucket, key = split_s3(url)
        return f"s3://{bucket}", key
    path = Path(url).resolve()
    return path.anchor, path.relative_to(path.anchor).as_posix()


def _new_store(identity: str, environ: Mapping[str, str] | None = None,
               base: BlobStore | None = None) -> BlobStore:
    """The store for ``identity``; over ``base``'s clients if it is an S3 store with the
    same configuration."""
    if is_s3(identity):
        from .s3 import S3BlobStore, S3Config

        bucket, config = split_s3(identity)[0], S3Config.from_env(environ)
        if isinstance(base, S3BlobStore) and base.config == config:
            return base.for_bucket(bucket)
        return S3BlobStore(bucket, config)
    return FileBlobStore(identity)


def open_url(url: str) -> tuple[BlobStore, str]:
    """A new store that can read ``url`` and the key to read; the caller closes the store."""
    identity, key = _locate(url)
    return _new_store(identity), key


class StoreCache:
    """One store per bucket (or filesystem root) for a worker's whole life.

    An S3 store owns a client and a connection pool; building one per task or per object
    would throw both away each time. With ``s3`` (a worker's own store), the buckets it
    opens with the same settings and credentials share that store's clients, and their
    warm connections, instead of making their own.
    """

    def __init__(self, environ: Mapping[str, str] | None = None,
                 s3: BlobStore | None = None) -> None:
        """``environ``: where S3 settings and credentials come from (default: this
        process's environment; the operator passes a job's own credentials)."""
        self._stores: dict[str, BlobStore] = {}
        self._environ = environ
        self._s3 = s3

    def open(self, url: str) -> tuple[BlobStore, str]:
        """The shared store for ``url`` and the key inside it (do not close the store)."""
        identity, key = _locate(url)
        if identity not in self._stores:
            self._stores[identity] = _new_store(identity, self._environ, self._s3)
        return self._stores[identity], key

    async def aclose(self) -> None:
        stores, self._stores = list(self._stores.values()), {}
        for store in stores:
            await store.aclose()
