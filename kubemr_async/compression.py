"""Compressed inputs, recognised by extension: which codec, is it really that, decompress.

A compressed stream cannot be entered in the middle, so a compressed input is one map task
and is decompressed whole, **in memory** (streaming decompression is a separate issue: a
task's memory is the decompressed size, not the split size). Decoding is strict, because
presenting half a file as a result is worse than failing: every member of a multi-member
gzip / multi-stream bz2, xz or zstd file is decoded, and a truncated member, a file that is
not what its extension says, or bytes after the last member are :class:`InvalidCompressedData`.
The only tolerated extra bytes are NUL padding after the last gzip member (gzip(1) and
Python's gzip module accept it) and xz stream padding (NULs in multiples of four, part of the
xz format). gzip, bz2 and xz use the standard library; zstd uses pyarrow's codec, already a
dependency. This module is pure: no I/O, so planning and the runtime share it.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class InvalidCompressedData(ValueError):
    """An input that does not decode as its extension says; the message is one line."""


@dataclass(frozen=True)
class Codec:
    name: str
    extension: str
    magics: tuple[bytes, ...]
    # A fresh one-member decompressor: decompress(data) -> bytes, .eof, .unused_data.
    member: Callable[[], Any] | None
    # How many trailing NUL bytes may follow the last member (0: none, 1: any count).
    pad_multiple: int = 0


_ZSTD_SKIPPABLE = tuple(bytes([0x50 + i, 0x2A, 0x4D, 0x18]) for i in range(16))

CODECS: dict[str, Codec] = {c.extension: c for c in (
    Codec("gzip", ".gz", (b"\x1f\x8b",), lambda: zlib.decompressobj(wbits=31), pad_multiple=1),
    Codec("bzip2", ".bz2", tuple(b"BZh" + bytes([d]) for d in b"123456789"),
          bz2.BZ2Decompressor),
    Codec("xz", ".xz", (b"\xfd7zXZ\x00",), lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ),
          pad_multiple=4),
    Codec("zstd", ".zst", (b"\x28\xb5\x2f\xfd", *_ZSTD_SKIPPABLE), None),
)}
MAGIC_BYTES = max(len(m) for c in CODECS.values() for m in c.magics)


def codec_for(name: str) -> Codec | None:
    """The codec a file or object name's extension names (case-insensitive), or None."""
    lowered = name.lower()
    for extension, codec in CODECS.items():
        if lowered.endswith(extension):
            return codec
    return None


def _invalid(codec: Codec, where: str, reason: str) -> InvalidCompressedData:
    return InvalidCompressedData(f"input {where} is not valid {codec.name} data: {reason}")


def check_magic(codec: Codec, head: bytes, where: str) -> None:
    """Cheap planning-time check of a file's first bytes (at least MAGIC_BYTES of them)."""
    if not head:
        raise _invalid(codec, where, "the file is empty")
    if not any(head.startswith(magic) for magic in codec.magics):
        raise _invalid(codec, where, f"it does not start with the {codec.name} magic bytes "
                                     f"(starts with {head[:MAGIC_BYTES]!r})")


def decompress(codec: Codec, data: bytes, where: str) -> bytes:
    """Every member of ``data`` decoded; InvalidCompressedData naming ``where`` otherwise."""
    check_magic(codec, data[:MAGIC_BYTES], where)
    if codec.member is None:
        return _zstd(codec, data, where)
    out: list[bytes] = []
    rest = data
    while rest:
        if out and codec.pad_multiple and not rest.strip(b"\0"):
            if len(rest) % codec.pad_multiple == 0:
                break
            raise _invalid(codec, where, f"{len(rest)} NUL bytes of padding after the data")
        member = codec.member()
        try:
            out.append(member.decompress(rest))
        except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as exc:
            which = f" (in member {len(out) + 1})" if out else ""
            raise _invalid(codec, where, f"{exc}{which}") from None
        if not member.eof:
            raise _invalid(codec, where, "the file is truncated (it ends inside a "
                                         "compressed member)")
        rest = member.unused_data
        if codec.pad_multiple > 1:  # xz: stream padding may also sit between two streams
            body = rest.lstrip(b"\0")
            if body and (len(rest) - len(body)) % codec.pad_multiple == 0:
                rest = body
        if rest and not any(rest.startswith(m) for m in codec.magics) and (
                not codec.pad_multiple or rest.strip(b"\0")):
            raise _invalid(codec, where, f"{len(rest)} bytes of trailing garbage after the "
                                         f"last member")
    return b"".join(out)


def _zstd(codec: Codec, data: bytes, where: str) -> bytes:
    import pyarrow as pa

    try:
        with pa.CompressedInputStream(pa.BufferReader(data), "zstd") as stream:
            return bytes(stream.read())
    except (OSError, pa.ArrowException) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "Truncated" in reason:
            reason = "the file is truncated (it ends inside a compressed frame)"
        raise _invalid(codec, where, reason) from None
