"""The codec module: extension lookup, magic check, strict streaming decompression."""

from __future__ import annotations

import bz2
import gzip
import lzma
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pytest

from kubemr_async.compression import (
    CODECS,
    OUTPUT_BYTES,
    Codec,
    InvalidCompressedData,
    check_magic,
    codec_for,
    decoder,
)

DATA = b"".join(b"line %d of the input \xe9\n" % i for i in range(5000))


def zstd(data: bytes) -> bytes:
    return bytes(pa.Codec("zstd").compress(data, asbytes=True))


COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    ".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress, ".zst": zstd}
EXTENSIONS = sorted(COMPRESS)


def decompress(codec: Codec, data: bytes, where: str, step: int = 1 << 16) -> bytes:
    """``data`` decoded as a reader decodes it: fed ``step`` bytes at a time, every read
    drained after each, no read above OUTPUT_BYTES."""
    return b"".join(decoded(codec, (data[i:i + step] for i in range(0, len(data), step)),
                            where))


def decoded(codec: Codec, windows: Iterator[bytes], where: str) -> Iterator[bytes]:
    stream = decoder(codec, where)
    try:
        for window in windows:
            stream.feed(window)
            while out := stream.read():
                assert len(out) <= OUTPUT_BYTES
                yield out
        stream.end()
        while out := stream.read():
            assert len(out) <= OUTPUT_BYTES
            yield out
    finally:
        stream.close()


def test_codec_by_extension() -> None:
    assert codec_for("/d/a.txt.gz") is CODECS[".gz"]
    assert codec_for("s3://b/k/a.LOG.BZ2") is CODECS[".bz2"]
    assert codec_for("a.xz") is CODECS[".xz"] and codec_for("a.zst") is CODECS[".zst"]
    assert codec_for("a.txt") is None and codec_for("a.gzip") is None
    assert codec_for("archive.tgz") is None  # a tar, not a line-oriented text input


@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize("step", [13, 1 << 30])
def test_round_trip(ext: str, step: int) -> None:
    assert decompress(CODECS[ext], COMPRESS[ext](DATA), "a" + ext, step) == DATA


@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize("step", [1, 5, 1 << 30])
def test_concatenated_members_decode_fully(ext: str, step: int) -> None:
    """Members (zstd: frames) end and begin anywhere in the fed windows, a byte at a time
    too: the next magic is told from its first bytes only once they have all come."""
    compress = COMPRESS[ext]
    joined = compress(DATA[:2000]) + compress(b"second member\n") + compress(b"")
    assert decompress(CODECS[ext], joined, "a" + ext, step) == DATA[:2000] + b"second member\n"


@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize("cut", [1, 7, 0.5])
@pytest.mark.parametrize("step", [3, 1 << 30])
def test_truncated_data_is_an_error(ext: str, cut: float, step: int) -> None:
    whole = COMPRESS[ext](DATA)
    keep = int(len(whole) * cut) if isinstance(cut, float) else len(whole) - cut
    with pytest.raises(InvalidCompressedData, match=rf"^input /d/a{ext} is not valid "
                                                   rf"{CODECS[ext].name} data: .*truncated"):
        decompress(CODECS[ext], whole[:keep], f"/d/a{ext}", step)


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_wrong_magic_and_empty_files_are_errors(ext: str) -> None:
    codec = CODECS[ext]
    with pytest.raises(InvalidCompressedData, match=r"does not start with the .* magic bytes"):
        decompress(codec, DATA, "a" + ext)
    with pytest.raises(InvalidCompressedData, match="does not start with"):
        check_magic(codec, b"plain text", "a" + ext)
    with pytest.raises(InvalidCompressedData, match="the file is empty"):
        check_magic(codec, b"", "a" + ext)
    check_magic(codec, COMPRESS[ext](DATA)[:8], "a" + ext)  # the real thing passes


@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize("tail", [b"garbage!", b"\x00\x01", COMPRESS[".gz"](b"x")[:5]])
@pytest.mark.parametrize("step", [1, 1 << 30])
def test_trailing_garbage_is_an_error(ext: str, tail: bytes, step: int) -> None:
    if tail.startswith(b"\x1f\x8b") and ext == ".gz":
        tail = b"\x1f\x8b\x08\x00garbage"  # a second member that breaks off
    with pytest.raises(InvalidCompressedData) as info:
        decompress(CODECS[ext], COMPRESS[ext](DATA[:500]) + tail, "/d/a" + ext, step)
    assert str(info.value).startswith(f"input /d/a{ext} is not valid {CODECS[ext].name} data")
    assert "\n" not in str(info.value)
    if ext != ".zst" and not tail.startswith(b"\x1f"):  # counted to the end, however fed
        assert str(info.value).endswith(f": {len(tail)} bytes of trailing garbage after the "
                                        "last member")


@pytest.mark.parametrize("step", [1, 2, 1 << 30])
def test_nul_padding_is_accepted_only_where_the_format_allows_it(step: int) -> None:
    assert decompress(CODECS[".gz"], gzip.compress(DATA) + b"\0" * 5, "a.gz", step) == DATA
    assert decompress(CODECS[".xz"], lzma.compress(DATA) + b"\0" * 8, "a.xz", step) == DATA
    with pytest.raises(InvalidCompressedData, match="padding"):
        decompress(CODECS[".xz"], lzma.compress(DATA) + b"\0" * 3, "a.xz", step)
    with pytest.raises(InvalidCompressedData, match="trailing garbage"):
        decompress(CODECS[".bz2"], bz2.compress(DATA) + b"\0" * 4, "a.bz2", step)
    # xz allows stream padding between streams too (xz -d reads both; it was refused).
    padded = lzma.compress(DATA) + b"\0" * 8 + lzma.compress(b"second\n")
    assert decompress(CODECS[".xz"], padded, "a.xz", step) == DATA + b"second\n"
    with pytest.raises(InvalidCompressedData, match="trailing garbage"):
        decompress(CODECS[".xz"], lzma.compress(DATA) + b"\0" * 3 + lzma.compress(b"x"), "a.xz",
                   step)
    with pytest.raises(InvalidCompressedData, match="trailing garbage"):
        decompress(CODECS[".gz"], gzip.compress(DATA) + b"\0" + gzip.compress(b"x"), "a.gz",
                   step)


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_corrupted_body_is_an_error(ext: str) -> None:
    whole = bytearray(COMPRESS[ext](DATA))
    middle = len(whole) // 2
    whole[middle:middle + 16] = bytes(b ^ 0x5A for b in whole[middle:middle + 16])
    with pytest.raises(InvalidCompressedData, match=f"not valid {CODECS[ext].name} data"):
        decompress(CODECS[ext], bytes(whole), "a" + ext)


def _bomb(ext: str, size: int) -> bytes:
    """``size`` zero bytes compressed, a mebibyte at a time (never held whole)."""
    zeros = bytes(1 << 20)
    if ext == ".zst":
        sink = pa.BufferOutputStream()
        with pa.CompressedOutputStream(sink, "zstd") as out:
            for _ in range(size >> 20):
                out.write(zeros)
        return bytes(sink.getvalue())
    packers: dict[str, Callable[[], Any]] = {
        ".gz": lambda: zlib.compressobj(wbits=31), ".bz2": bz2.BZ2Compressor,
        ".xz": lambda: lzma.LZMACompressor(preset=0)}
    packer = packers[ext]()
    return b"".join([*(packer.compress(zeros) for _ in range(size >> 20)), packer.flush()])


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_a_compression_bomb_is_decoded_within_bounded_memory(ext: str) -> None:
    """256 MiB of zeros, a few hundred kilobytes compressed, fed whole: every read is at
    most OUTPUT_BYTES, and the Python heap never holds more than a few of them."""
    size = 256 << 20
    packed = _bomb(ext, size)
    assert len(packed) < size // 500
    tracemalloc.start()
    try:
        total = sum(len(out) for out in decoded(CODECS[ext], iter([packed]), "bomb" + ext))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == size
    assert peak < 4 * OUTPUT_BYTES, f"{peak} bytes held decoding {size}"
