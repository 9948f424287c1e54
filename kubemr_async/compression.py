"""Compressed inputs, recognised by extension: which codec, is it really that, decode it.

A compressed stream cannot be entered in the middle, so a compressed input is one map task.
It is decoded as a stream (:func:`decoder`): compressed bytes are pushed in as they are
read, and decoded bytes come out at most :data:`OUTPUT_BYTES` at a time, so a task's memory
does not grow with the decompressed size, even for a compression bomb (a gigabyte of zeros
is a megabyte of gzip). Decoding is strict, because presenting half a file as a result is
worse than failing: every member of a multi-member gzip / multi-stream bz2, xz or zstd file
is decoded, and a truncated member, a file that is not what its extension says, or bytes
after the last member are :class:`InvalidCompressedData`. The only tolerated extra bytes
are NUL padding after the last gzip member (gzip(1) and Python's gzip module accept it) and
xz stream padding (NULs in multiples of four, part of the xz format). gzip, bz2 and xz use
the standard library; zstd uses pyarrow's codec, already a dependency. This module is pure:
no I/O, so planning and the runtime share it.
"""

from __future__ import annotations

import bz2
import io
import lzma
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


class InvalidCompressedData(ValueError):
    """An input that does not decode as its extension says; the message is one line."""


@dataclass(frozen=True)
class Codec:
    name: str
    extension: str
    magics: tuple[bytes, ...]
    # A fresh one-member decompressor: decompress(data, max_length) -> bytes, .eof,
    # .unused_data, and .unconsumed_tail (zlib) or .needs_input (bz2, lzma).
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
#: The most decoded bytes one :meth:`Decoder.read` returns.
OUTPUT_BYTES = 1 << 20
#: The most compressed bytes handed to a member at once: what zlib copies back (its
#: unconsumed tail) each time the output limit stops it, which a bomb makes often.
_FEED_BYTES = 64 * 1024


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


class Decoder(Protocol):
    """A file's strict decoding, pushed in pieces: :meth:`feed` the compressed bytes in
    order, :meth:`end` after the last, and :meth:`read` the decoded bytes after each."""

    def feed(self, data: bytes) -> None:
        """The next compressed bytes of the file."""

    def end(self) -> None:
        """The file has no more bytes."""

    def read(self) -> bytes:
        """The next decoded bytes (at most :data:`OUTPUT_BYTES`), or b"": feed more (after
        :meth:`end`: the data is all decoded). InvalidCompressedData if it does not decode."""

    def close(self) -> None:
        """Stop decoding (done, or given up): nothing is left running."""


def decoder(codec: Codec, where: str) -> Decoder:
    """A strict streaming decoder of a ``codec`` file named ``where`` (for its errors)."""
    if codec.member is None:
        return _ZstdDecoder(codec, where)
    return _MemberDecoder(codec, where, codec.member)


class _MemberDecoder:
    """gzip, bz2 and xz: a standard-library decompressor per member, and the rules for
    what may come between members and after the last (magic bytes, padding, garbage)."""

    def __init__(self, codec: Codec, where: str, member: Callable[[], Any]) -> None:
        self._codec, self._where, self._new_member = codec, where, member
        self._rest = b""  # compressed bytes fed and not yet given to a member, from _pos
        self._pos = 0
        self._ended = False
        self._member: Any = None
        self._members = 0  # members decoded to their end
        self._nuls = 0  # NUL bytes after the last member so far (dropped once counted)
        self._garbage: int | None = None  # bytes of trailing garbage so far

    def feed(self, data: bytes) -> None:
        self._rest = self._rest[self._pos:] + data
        self._pos = 0

    def end(self) -> None:
        self._ended = True

    def close(self) -> None:
        self._member, self._rest, self._pos = None, b"", 0

    def read(self) -> bytes:
        while True:
            member = self._member or self._next_member()
            if member is None:
                return b""
            tail = getattr(member, "unconsumed_tail", None)
            if tail or (tail is None and not member.needs_input):
                data = tail or b""  # what the member has not taken yet (bz2, xz: it holds it)
            else:
                data = memoryview(self._rest)[self._pos:self._pos + _FEED_BYTES]
                self._pos += len(data)
            try:
                out: bytes = member.decompress(data, OUTPUT_BYTES)
            except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as exc:
                which = f" (in member {self._members + 1})" if self._members else ""
                raise self._error(f"{exc}{which}") from None
            if member.eof:
                # What it did not use is the end of what it was given: give it back.
                self._pos -= len(member.unused_data)
                self._member = None
                self._members += 1
            elif not out and not data:  # it needs more than the file has had so far
                if self._ended:
                    raise self._error("the file is truncated (it ends inside a compressed "
                                      "member)")
                return b""
            if out:
                return out

    def _next_member(self) -> Any:
        """A decompressor for the member that starts the unread bytes, or None: none yet
        (more bytes are needed to tell), or none left (padding is checked at the end).
        Only a few bytes are looked at (copied): the unread ones may be a whole window."""
        codec = self._codec
        if self._garbage is not None:  # counted to the end, to say how many bytes it is
            self._garbage += len(self._rest) - self._pos
            self._rest, self._pos = b"", 0
            if self._ended:
                raise self._error(f"{self._garbage} bytes of trailing garbage after the "
                                  "last member")
            return None
        if not self._members:
            head = self._rest[self._pos:self._pos + MAGIC_BYTES]
            if len(head) < MAGIC_BYTES and not self._ended:
                return None
            check_magic(codec, head, self._where)
            return self._start()
        while self._rest[self._pos:self._pos + 1] == b"\0":  # NULs: counted, and skipped
            head = self._rest[self._pos:self._pos + _FEED_BYTES]
            nuls = len(head) - len(head.lstrip(b"\0"))
            self._nuls += nuls
            self._pos += nuls
        body = self._rest[self._pos:self._pos + MAGIC_BYTES]
        if not body:
            if not self._ended or not self._nuls:
                return None
            if not codec.pad_multiple:
                raise self._error(f"{self._nuls} bytes of trailing garbage after the last "
                                  "member")
            if self._nuls % codec.pad_multiple:
                raise self._error(f"{self._nuls} NUL bytes of padding after the data")
            return None
        # xz: stream padding may also sit between two streams; other NULs before more
        # data make the whole rest garbage (no magic starts with a NUL).
        skipped = codec.pad_multiple > 1 and self._nuls % codec.pad_multiple == 0
        if self._nuls and not skipped:
            self._garbage = self._nuls
            return self._next_member()
        if any(body.startswith(m) for m in codec.magics):
            self._nuls = 0
            return self._start()
        if not self._ended and any(m.startswith(body) for m in codec.magics):
            return None  # a magic's first bytes: the rest of it has not come yet
        self._garbage = 0
        return self._next_member()

    def _start(self) -> Any:
        self._member = self._new_member()
        return self._member

    def _error(self, reason: str) -> InvalidCompressedData:
        return _invalid(self._codec, self._where, reason)


class _ZstdDecoder:
    """zstd through pyarrow's codec, which only pulls (``pa.CompressedInputStream``, every
    frame in turn): it runs in a thread of its own, reading the fed bytes as a file
    (:meth:`take`) and leaving each decoded window for :meth:`read`, one at a time."""

    def __init__(self, codec: Codec, where: str) -> None:
        self._codec, self._where = codec, where
        self._state = threading.Condition()
        self._input = b""  # fed and not yet taken by the thread, from _taken
        self._taken = 0
        self._ended = self._closed = self._starving = self._done = False
        self._output: bytes | None = None
        self._failure: str | None = None
        self._thread: threading.Thread | None = None

    def feed(self, data: bytes) -> None:
        with self._state:
            self._input, self._taken = self._input[self._taken:] + data, 0
            self._state.notify_all()

    def end(self) -> None:
        with self._state:
            self._ended = True
            self._state.notify_all()

    def close(self) -> None:
        with self._state:
            self._closed = True
            self._state.notify_all()

    def read(self) -> bytes:
        with self._state:
            if self._thread is None:
                if len(self._input) < MAGIC_BYTES and not self._ended:
                    return b""
                check_magic(self._codec, self._input[:MAGIC_BYTES], self._where)
                self._thread = threading.Thread(target=self._decode, name="zstd-decoder",
                                                daemon=True)
                self._thread.start()
            while True:
                if self._output is not None:
                    out, self._output = self._output, None
                    self._state.notify_all()
                    return out
                if self._failure is not None:
                    raise _invalid(self._codec, self._where, self._failure)
                if self._done or (self._starving and not self._ended
                                  and self._taken == len(self._input)):
                    return b""  # it waits for bytes not fed yet
                self._state.wait()

    def take(self, size: int = -1) -> bytes:
        """The thread's read: the next fed bytes, b"" only at the end of the file; it
        waits for :meth:`feed` when there are none yet."""
        with self._state:
            while self._taken == len(self._input) and not self._ended and not self._closed:
                self._starving = True
                self._state.notify_all()
                self._state.wait()
            self._starving = False
            if self._closed:
                raise _Closed
            end = len(self._input) if size < 0 else self._taken + size
            data = self._input[self._taken:end]
            self._taken += len(data)
            return data

    def _decode(self) -> None:
        import pyarrow as pa

        try:
            with pa.CompressedInputStream(pa.PythonFile(_File(self.take), mode="r"),
                                          "zstd") as stream:
                while out := stream.read(OUTPUT_BYTES):
                    with self._state:
                        self._output = out
                        self._state.notify_all()
                        while self._output is not None and not self._closed:
                            self._state.wait()
                        if self._closed:
                            return
        except (OSError, pa.ArrowException, _Closed) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "Truncated" in reason:
                reason = "the file is truncated (it ends inside a compressed frame)"
            with self._state:
                self._failure = reason
                self._state.notify_all()
            return
        with self._state:
            self._done = True
            self._state.notify_all()


class _Closed(Exception):
    """The decoder was closed: its thread stops reading."""


class _File(io.RawIOBase):
    """A readable file whose bytes come from ``take(size)``."""

    def __init__(self, take: Callable[[int], bytes]) -> None:
        super().__init__()
        self._take = take

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._take(size)
