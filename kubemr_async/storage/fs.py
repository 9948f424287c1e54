"""BlobStore on a local directory, with atomic writes (temp file, fsync, rename)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import uuid
from pathlib import Path

from .base import BlobNotFound


class FileBlobStore:
    """Objects are files below ``root``; keys use '/' and must not escape the root."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if path != self.root and self.root not in path.parents:
            raise ValueError(f"blob key {key!r} escapes the store root {self.root}")
        return path

    def _put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._put, key, data)

    def _get(self, key: str, start: int, end: int | None) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                if start:
                    f.seek(start)
                return f.read() if end is None else f.read(max(0, end - start))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise BlobNotFound(f"no object {key!r} in {self.root}") from None

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        return await asyncio.to_thread(self._get, key, start, end)

    async def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise BlobNotFound(f"no object {key!r} in {self.root}")
        return path.stat().st_size

    def _list(self, prefix: str) -> list[str]:
        # Walk only the deepest directory the prefix names, not the whole store.
        base = self._path(prefix.rsplit("/", 1)[0]) if "/" in prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _, files in os.walk(base):
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def _list_sized(self, prefix: str) -> list[tuple[str, int]]:
        found = []
        for key in self._list(prefix):
            with contextlib.suppress(FileNotFoundError):  # deleted since it was listed
                found.append((key, self._path(key).stat().st_size))
        return found

    async def list_sized(self, prefix: str) -> list[tuple[str, int]]:
        return await asyncio.to_thread(self._list_sized, prefix)

    async def list(self, prefix: str) -> list[str]:
        return await asyncio.to_thread(self._list, prefix)

    def _delete_prefix(self, prefix: str) -> int:
        keys = self._list(prefix)
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        if prefix.endswith("/") and self._path(prefix).is_dir():
            shutil.rmtree(self._path(prefix), ignore_errors=True)
        return len(keys)

    async def delete_prefix(self, prefix: str) -> int:
        return await asyncio.to_thread(self._delete_prefix, prefix)

    def url(self, key: str) -> str:
        return str(self._path(key))

    async def aclose(self) -> None:
        return None
