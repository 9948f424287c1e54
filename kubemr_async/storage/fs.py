"""BlobStore on a local directory, with atomic writes (temp file, fsync, rename)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

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

    def _temp(self, key: str) -> tuple[Path, Path]:
        """The object's path and a hidden temp file beside it (listings skip those)."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path, path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")

    def _put(self, key: str, data: bytes) -> None:
        path, tmp = self._temp(key)
        with open(tmp, "wb") as f:
            f.write(data)
            _publish(f, tmp, path)

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._put, key, data)

    @contextlib.asynccontextmanager
    async def open_writer(self, key: str) -> AsyncIterator[_FileWriter]:
        """A temp file written piece by piece, fsynced and renamed into place on success."""
        path, tmp = await asyncio.to_thread(self._temp, key)
        f = await asyncio.to_thread(open, tmp, "wb")
        try:
            yield _FileWriter(f)
            await asyncio.to_thread(_publish, f, tmp, path)
        finally:
            f.close()
            tmp.unlink(missing_ok=True)

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

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"negative range ({offset}, {length}) for {key!r}")
        return await asyncio.to_thread(self._get, key, offset, offset + length)

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


def _publish(f: BinaryIO, tmp: Path, path: Path) -> None:
    """Make a fully written temp file durable, then visible under its name in one step."""
    f.flush()
    os.fsync(f.fileno())
    os.replace(tmp, path)


class _FileWriter:
    def __init__(self, f: BinaryIO) -> None:
        self._file = f

    async def write(self, data: bytes) -> None:
        await asyncio.to_thread(self._file.write, data)
