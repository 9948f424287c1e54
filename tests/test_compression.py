"""The codec module: extension lookup, magic check, strict whole-file decompression."""

from __future__ import annotations

import bz2
import gzip
import lzma
from collections.abc import Callable

import pyarrow as pa
import pytest

from kubemr_async.compression import (
    CODECS,
    InvalidCompressedData,
    check_magic,
    codec_for,
    decompress,
)

DATA = b"".join(b"line %d of the input \xe9\n" % i for i in range(5000))


def zstd(data: bytes) -> bytes:
    return bytes(pa.Codec("zstd").compress(data, asbytes=True))


COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    ".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress, ".zst": zstd}
EXTENSIONS = sorted(COMPRESS)


def test_codec_by_extension() -> None:
    assert codec_for("/d/a.txt.gz") is CODECS[".gz"]
    assert codec_for("s3://b/k/a.LOG.BZ2") is CODECS[".bz2"]
    assert codec_for("a.xz") is CODECS[".xz"] and codec_for("a.zst") is CODECS[".zst"]
    assert codec_for("a.txt") is None and codec_for("a.gzip") is None
    assert codec_for("archive.tgz") is None  # a tar, not a line-oriented text input


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_round_trip(ext: str) -> None:
    assert decompress(CODECS[ext], COMPRESS[ext](DATA), "a" + ext) == DATA


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_concatenated_members_decode_fully(ext: str) -> None:
    compress = COMPRESS[ext]
    joined = compress(DATA) + compress(b"second member\n") + compress(b"")
    assert decompress(CODECS[ext], joined, "a" + ext) == DATA + b"second member\n"


@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize("cut", [1, 7, 0.5])
def test_truncated_data_is_an_error(ext: str, cut: float) -> None:
    whole = COMPRESS[ext](DATA)
    keep = int(len(whole) * cut) if isinstance(cut, float) else len(whole) - cut
    with pytest.raises(InvalidCompressedData, match=rf"^input /d/a{ext} is not valid "
                                                   rf"{CODECS[ext].name} data: .*truncated"):
        decompress(CODECS[ext], whole[:keep], f"/d/a{ext}")


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
def test_trailing_garbage_is_an_error(ext: str, tail: bytes) -> None:
    if tail.startswith(b"\x1f\x8b") and ext == ".gz":
        tail = b"\x1f\x8b\x08\x00garbage"  # a second member that breaks off
    with pytest.raises(InvalidCompressedData) as info:
        decompress(CODECS[ext], COMPRESS[ext](DATA) + tail, "/d/a" + ext)
    assert str(info.value).startswith(f"input /d/a{ext} is not valid {CODECS[ext].name} data")
    assert "\n" not in str(info.value)


def test_nul_padding_is_accepted_only_where_the_format_allows_it() -> None:
    assert decompress(CODECS[".gz"], gzip.compress(DATA) + b"\0" * 5, "a.gz") == DATA
    assert decompress(CODECS[".xz"], lzma.compress(DATA) + b"\0" * 8, "a.xz") == DATA
    with pytest.raises(InvalidCompressedData, match="padding"):
        decompress(CODECS[".xz"], lzma.compress(DATA) + b"\0" * 3, "a.xz")
    with pytest.raises(InvalidCompressedData, match="trailing garbage"):
        decompress(CODECS[".bz2"], bz2.compress(DATA) + b"\0" * 4, "a.bz2")
    # xz allows stream padding between streams too (xz -d reads both; it was refused).
    padded = lzma.compress(DATA) + b"\0" * 8 + lzma.compress(b"second\n")
    assert decompress(CODECS[".xz"], padded, "a.xz") == DATA + b"second\n"
    with pytest.raises(InvalidCompressedData, match="trailing garbage"):
        decompress(CODECS[".xz"], lzma.compress(DATA) + b"\0" * 3 + lzma.compress(b"x"), "a.xz")
    with pytest.raises(InvalidCompressedData, match="trailing garbage"):
        decompress(CODECS[".gz"], gzip.compress(DATA) + b"\0" + gzip.compress(b"x"), "a.gz")


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_corrupted_body_is_an_error(ext: str) -> None:
    whole = bytearray(COMPRESS[ext](DATA))
    middle = len(whole) // 2
    whole[middle:middle + 16] = bytes(b ^ 0x5A for b in whole[middle:middle + 16])
    with pytest.raises(InvalidCompressedData, match=f"not valid {CODECS[ext].name} data"):
        decompress(CODECS[ext], bytes(whole), "a" + ext)
