"""Map a user-facing location (local path or ``s3://bucket/key``) to a BlobStore and key."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from .base import BlobStore
from .fs import FileBlobStore


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise UsageError(f"invalid S3 URL {url!r}: expected s3://bucket/key")
    return bucket, key


def open_url(url: str) -> tuple[BlobStore, str]:
    """A store that can read ``url`` and the key to read; the caller closes the store."""
    if is_s3(url):
        from .s3 import S3BlobStore

        bucket, key = split_s3(url)
        return S3BlobStore.from_env(bucket), key
    path = Path(url).resolve()
    return FileBlobStore(path.anchor), path.relative_to(path.anchor).as_posix()
