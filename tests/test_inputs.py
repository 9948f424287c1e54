"""Input expansion and line-aligned splits, on real files."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubemr_async import inputs, recordio
from kubemr_async.errors import PermanentTaskError, UsageError
from kubemr_async.inputs import (
    expand_inputs,
    expand_local,
    expand_store,
    plan_inputs,
    plan_splits,
    read_map_input,
    read_split,
    read_task_input,
)
from kubemr_async.recordio import TextSplit
from kubemr_async.spec import JobSpec
from kubemr_async.storage.fs import FileBlobStore


def test_expand_paths_directories_and_globs(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ["d/b.txt", "d/a.txt", "d/sub/c.log", "d/.hidden"]:
        (tmp_path / name).write_bytes(b"x\n")
    names = [Path(p).name for p, _ in expand_local(str(tmp_path / "d"))]
    assert names == ["a.txt", "b.txt", "c.log"]
    assert [Path(p).name for p, _ in expand_local(str(tmp_path / "d" / "*.txt"))] == \
        ["a.txt", "b.txt"]
    assert [Path(p).name for p, _ in expand_local(str(tmp_path / "d/**/*.log"))] == ["c.log"]
    assert expand_local(str(tmp_path / "d" / "a.txt"))[0][1] == 2


@pytest.mark.parametrize(("setup", "pattern", "message"), [
    (None, "missing.txt", "does not exist"),
    (None, "*.nothing", "matches no files"),
    ("emptydir", "emptydir", "contains no files"),
    ("emptydir/_SUCCESS", "emptydir", "contains no data files \\(names starting with _ or"),
    ("emptydir/_x", "emptydir/*", "matches no data files \\(names starting with _ or"),
])
def test_bad_inputs_name_the_problem(tmp_path: Path, setup: str | None, pattern: str,
                                     message: str) -> None:
    if setup:
        (tmp_path / setup.split("/")[0]).mkdir()
        if "/" in setup:
            (tmp_path / setup).write_text("hidden\n")
    with pytest.raises(UsageError, match=message):
        expand_local(str(tmp_path / pattern))


def test_unreadable_input_is_rejected(tmp_path: Path) -> None:
    import os

    path = tmp_path / "secret.txt"
    path.write_text("x")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: use a dangling symlink instead
        path = tmp_path / "dangling.txt"
        path.symlink_to(tmp_path / "gone")
        with pytest.raises(UsageError, match="does not exist"):
            expand_local(str(path))
    else:
        with pytest.raises(UsageError, match="not readable"):
            expand_local(str(path))


def test_an_input_name_that_is_not_utf8_is_refused_naming_it(tmp_path: Path) -> None:
    """It used to reach the task record and fail `kubemr run` with orjson's traceback."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "ok.txt").write_bytes(b"a\n")
    (d / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"b\n")
    message = "input .*caf\\\\xe9.txt has a name that is not valid UTF-8; use a UTF-8 name"
    for pattern in [str(d), str(d / "*.txt"), os.fsdecode(os.fsencode(d) + b"/caf\xe9.txt")]:
        with pytest.raises(UsageError, match=message):
            expand_local(pattern)


def test_inputs_whose_size_is_not_their_content_are_refused(tmp_path: Path) -> None:
    """A /proc file (size 0, yet it holds data) used to be read as an empty input, and a
    pipe failed every attempt of its map with BlobNotFound."""
    with pytest.raises(UsageError, match="input /proc/self/status reports a size of 0 bytes "
                                         "but holds data"):
        expand_local("/proc/self/status")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/null"):
        with pytest.raises(UsageError, match=f"input {path} is not a regular file"):
            expand_local(path)
    (tmp_path / "empty.txt").write_bytes(b"")
    assert expand_local(str(tmp_path / "empty.txt")) == [(str(tmp_path / "empty.txt"), 0)]
    # A low-level job opens its inputs itself: a pipe is its business.
    assert expand_local(str(fifo), split=False) == [(str(fifo), 0)]


def test_a_directory_entry_that_cannot_be_read_is_refused_not_skipped(tmp_path: Path) -> None:
    """A dangling symlink or a FIFO inside an input directory was skipped in silence: an
    input left out of the job. Hidden ones stay skipped, as every hidden file is."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.txt").write_bytes(b"a\n")
    (d / ".gone").symlink_to(tmp_path / "nowhere")
    assert [Path(p).name for p, _ in expand_local(str(d))] == ["a.txt"]
    (d / "b.txt").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UsageError, match=rf"^input {d}/b.txt \(in directory {d}\) is a "
                                         "symlink to nothing"):
        expand_local(str(d))
    (d / "b.txt").unlink()
    os.mkfifo(d / "pipe")
    with pytest.raises(UsageError, match=r"pipe .* is not a regular file"):
        expand_local(str(d))


def test_a_file_reached_by_several_names_is_read_once(tmp_path: Path) -> None:
    """A glob's ** follows symlinked directories: a link back up the tree used to name
    every file again at each of ~40 levels (3,000 files became 243,000 splits, and the
    run never got going); a symlink to a file counted it twice."""
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_bytes(b"a\n")
    (d / "sub" / "b.txt").write_bytes(b"b\n")
    (d / "link-to-a.txt").symlink_to(d / "a.txt")
    (d / "loop").symlink_to(d)
    (d / "sub-again").symlink_to(d / "sub")
    for pattern in [str(d), str(d / "**" / "*.txt")]:
        assert sorted(path for path, _ in expand_local(pattern)) == \
            [str(d / "a.txt"), str(d / "sub" / "b.txt")], pattern


def test_plan_splits_cuts_by_chunk_size() -> None:
    splits = plan_splits([("a", 10), ("b", 0), ("c", 4)], 4)
    assert splits == [("a", (0, 4)), ("a", (4, 8)), ("a", (8, 10)), ("b", (0, 0)), ("c", (0, 4))]


def test_a_compressed_object_is_one_split_whatever_its_size() -> None:
    splits = plan_splits([("a.gz", 10), ("s3://b/c.ZST", 9), ("d.bz2", 3), ("e.xz", 0)], 4)
    assert splits == [("a.gz", (0, 10)), ("s3://b/c.ZST", (0, 9)), ("d.bz2", (0, 3)),
                      ("e.xz", (0, 0))]


def test_hidden_files_are_skipped_below_directories_and_in_globs(tmp_path: Path) -> None:
    d = tmp_path / "d"
    for name in ["a.txt", "_SUCCESS", ".a.txt.crc", "_logs/x.txt", "sub/_tmp/y.txt",
                 "sub/.cache/z.txt", "sub/b.txt", "sub/_c.txt"]:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text("w\n")
    assert [p for p, _ in expand_local(str(d))] == [str(d / "a.txt"), str(d / "sub/b.txt")]
    assert [p for p, _ in expand_local(str(d / "*"))] == [str(d / "a.txt")]
    assert [p for p, _ in expand_local(str(d / "sub/*.txt"))] == [str(d / "sub/b.txt")]
    assert [p for p, _ in expand_local(str(d / "**/*.txt"))] == [
        str(d / "a.txt"), str(d / "sub/b.txt")], "a glob does not reach into hidden folders"
    # ... unless the pattern spells the hidden name out, before or after the wildcard.
    assert [p for p, _ in expand_local(str(d / "_logs/*.txt"))] == [str(d / "_logs/x.txt")]
    assert [p for p, _ in expand_local(str(d / "*/_tmp/*.txt"))] == [str(d / "sub/_tmp/y.txt")]
    # Named explicitly, a hidden file is read: the user asked for it.
    assert [p for p, _ in expand_local(str(d / "_SUCCESS"))] == [str(d / "_SUCCESS")]
    # Hidden components *above* the named directory do not hide anything.
    assert len(expand_local(str(d / "_logs"))) == 1


@pytest.mark.anyio
async def test_object_store_expansion_over_a_listing(tmp_path: Path) -> None:
    """The S3 rules (object, else prefix; per-segment globs; hidden names) need only
    ``list_sized`` and ``size``, so they are checked here on files, without a server."""
    store = FileBlobStore(tmp_path)
    objects = {"logs/2024-01.txt": b"a\n", "logs/2024-02.txt": b"bb\n",
               "logs/2023-12.txt": b"c\n", "logs/2024-sub/x.txt": b"e\n",
               "logs/.hidden.txt": b"h\n", "data/part-1": b"1", "data/part-0": b"22",
               "data/.staging/part-9": b"9", "data/_tmp/part-5": b"5", "data/_SUCCESS": b"{}",
               "only/_SUCCESS": b"{}"}
    for key, data in objects.items():
        await store.put(key, data)

    async def expand(key: str) -> list[tuple[str, int]]:
        return [(url[len(str(tmp_path)) + 1:], n) for url, n in
                await expand_store(store, f"x://{key}", key)]

    assert await expand("data/part-1") == [("data/part-1", 1)]
    assert await expand("data/_SUCCESS") == [("data/_SUCCESS", 2)], "named: read"
    assert await expand("data/") == [("data/part-0", 2), ("data/part-1", 1)]
    assert await expand("data") == [("data/part-0", 2), ("data/part-1", 1)]
    assert await expand("logs/2024-*.txt") == [("logs/2024-01.txt", 2), ("logs/2024-02.txt", 3)]
    assert [k for k, _ in await expand("logs/**/*.txt")] == [
        "logs/2023-12.txt", "logs/2024-01.txt", "logs/2024-02.txt", "logs/2024-sub/x.txt"]
    with pytest.raises(UsageError, match="matches no data objects"):
        await expand("data/*/part-*")  # only data/_tmp/part-5: not data
    assert [k for k, _ in await expand("data/_tmp/part-*")] == ["data/_tmp/part-5"]
    for key, message in [("logs/*.csv", "input glob 'x://logs/\\*.csv' matches no objects$"),
                         ("logs/.*", "matches no data objects"),
                         ("only/_*", "matches no data objects \\(names starting with _"),
                         ("only/", "^input prefix x://only/ contains no data objects"),
                         ("only", "^input prefix x://only/ contains no data objects"),
                         ("nothing/", "^input prefix x://nothing/ contains no objects$"),
                         ("missing.txt", "^input x://missing.txt does not exist$")]:
        with pytest.raises(UsageError, match=message):
            await expand(key)


@pytest.mark.anyio
async def test_a_local_file_that_is_not_its_codec_fails_planning(tmp_path: Path) -> None:
    good = gzip.compress(b"a\n")
    (tmp_path / "good.gz").write_bytes(good)
    (tmp_path / "bad.gz").write_bytes(b"plain text, not gzip\n")
    spec = JobSpec(name="j", job="j.py", inputs=(str(tmp_path / "good.gz"),))
    assert await plan_inputs(spec) == [(str(tmp_path / "good.gz"), (0, len(good)))]
    bad = JobSpec(name="j", job="j.py", inputs=(str(tmp_path),))
    with pytest.raises(UsageError, match=f"^input {tmp_path}/bad.gz is not valid gzip data: "
                                         "it does not start with the gzip magic bytes"):
        await plan_inputs(bad)


#: Each codec in more than one member (xz: with stream padding between; zstd: frames).
MEMBERS: dict[str, Callable[[bytes], bytes]] = {
    ".gz": lambda data: gzip.compress(data[:5000]) + gzip.compress(data[5000:]),  # 2 members
    ".bz2": bz2.compress,
    ".xz": lambda data: lzma.compress(data[:7000]) + b"\0" * 8 + lzma.compress(data[7000:]),
    ".zst": lambda data: b"".join(bytes(pa.Codec("zstd").compress(data[i:i + 6000],
                                                                  asbytes=True))
                                  for i in range(0, max(len(data), 1), 6000)),  # frames
}


async def pieces(store: FileBlobStore, key: str, byte_range: tuple[int, int] | None,
                 kind: str, piece_bytes: int) -> list[Any]:
    return [data async for data in read_map_input(store, key, byte_range, kind, piece_bytes)]


def line_pieces(text: bytes, size: int) -> list[bytes]:
    """The reference cut: the lines that begin in each next ``size`` bytes, found by
    splitting the whole text into lines."""
    out: list[bytes] = []
    for line in text.splitlines(keepends=True):
        if out and len(out[-1]) < size:
            out[-1] += line
        else:
            out.append(line)
    return out


@pytest.fixture(params=sorted(MEMBERS))
def ext(request: pytest.FixtureRequest) -> str:
    return str(request.param)


TEXT = b"".join(b"line %d %s\r\n" % (i, b"x" * (i % 37)) if i % 5 == 0
                else b"line %d %s\n" % (i, b"y" * (i % 53)) for i in range(600))
TEXT += b"z" * 700 + b"\n"  # a line longer than a piece: a piece of its own
TEXT += b"the last line has no line end"


@pytest.mark.anyio
@pytest.mark.parametrize("piece_bytes", [1, 100, 4096, 1 << 20])
async def test_a_compressed_input_is_read_in_line_aligned_pieces(
        tmp_path: Path, ext: str, piece_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fetched in small windows (members and frames end inside them), the decoded stream
    comes in the pieces a plain split of it would: whole lines, the ones beginning in the
    next ``piece_bytes`` bytes, each TextSplit at its offset in the decoded stream."""
    monkeypatch.setattr(inputs, "_COMPRESSED_WINDOW", 777)
    packed = MEMBERS[ext](TEXT)
    (tmp_path / f"in{ext}").write_bytes(packed)
    store = FileBlobStore(tmp_path)
    want = line_pieces(TEXT, piece_bytes)
    assert await pieces(store, f"in{ext}", (0, len(packed)), "text", piece_bytes) == want
    assert await pieces(store, f"in{ext}", None, "bytes", piece_bytes) == want
    splits = await pieces(store, f"in{ext}", (0, len(packed)), "lines", piece_bytes)
    offsets = [sum(map(len, want[:i])) for i in range(len(want))]
    assert splits == [TextSplit(store.url(f"in{ext}"), piece, offset)
                      for piece, offset in zip(want, offsets, strict=True)]
    lines = [line for split in splits for line in recordio.records("lines", split)]
    assert lines == TEXT.decode().splitlines()


@pytest.mark.anyio
async def test_a_compressed_csv_gives_every_piece_the_header(tmp_path: Path, ext: str) -> None:
    text = b"name,count\r\n" + b"".join(b'"word, %d",%d\r\n' % (i, i) for i in range(300))
    (tmp_path / f"in.csv{ext}").write_bytes(MEMBERS[ext](text))
    store = FileBlobStore(tmp_path)
    splits = await pieces(store, f"in.csv{ext}", None, "csv", 500)
    assert len(splits) > 5
    assert [split.header for split in splits] == [None] + [b"name,count"] * (len(splits) - 1)
    rows = [row for split in splits for row in recordio.records("csv", split)]
    assert rows == list(csv.DictReader(io.StringIO(text.decode())))


@pytest.mark.anyio
async def test_a_bad_record_in_a_compressed_input_is_placed_in_the_decoded_stream(
        tmp_path: Path, ext: str) -> None:
    good = b"".join(b'{"n": %d}\n' % i for i in range(1000))
    (tmp_path / f"in.jsonl{ext}").write_bytes(MEMBERS[ext](good + b"{broken\n"))
    store = FileBlobStore(tmp_path)
    splits = await pieces(store, f"in.jsonl{ext}", None, "jsonl", 1000)
    assert len(splits) > 5
    last = splits[-1]
    number = last.data.count(b"\n")  # the bad line is the last piece's last
    records = []
    with pytest.raises(PermanentTaskError, match=(
            rf"in.jsonl{ext} byte {len(good)} \(line {number} of the split "
            rf"starting at byte {last.offset}\): invalid JSON")):
        for split in splits:
            for record in recordio.records("jsonl", split):
                records.append(record)
    assert records == [json.loads(line) for line in good.splitlines()]


@pytest.mark.anyio
async def test_an_empty_compressed_stream_is_one_empty_piece(tmp_path: Path, ext: str) -> None:
    (tmp_path / f"in{ext}").write_bytes(MEMBERS[ext](b""))
    store = FileBlobStore(tmp_path)
    assert await pieces(store, f"in{ext}", None, "text", 10) == [b""]


@pytest.mark.anyio
async def test_a_compressed_input_that_does_not_decode_or_changed_is_an_error(
        tmp_path: Path) -> None:
    text = b"".join(b"word %d\n" % i for i in range(20000))
    packed = gzip.compress(text[:50000]) + gzip.compress(text[50000:])
    (tmp_path / "in.gz").write_bytes(packed)
    (tmp_path / "cut.gz").write_bytes(packed[:-20])
    (tmp_path / "in.txt").write_bytes(text)
    store = FileBlobStore(tmp_path)
    assert await read_task_input(store, "in.txt", None) == text
    assert await read_task_input(store, "in.txt", (0, 10)) == b"word 0\nword 1\n"
    with pytest.raises(PermanentTaskError, match=f"^input {tmp_path}/cut.gz is not valid gzip "
                                                 "data: the file is truncated"):
        await pieces(store, "cut.gz", (0, len(packed) - 20), "lines", 1000)
    with pytest.raises(PermanentTaskError, match="cannot be read from offset 10"):
        await pieces(store, "in.gz", (10, 20), "text", 1000)
    for planned in (len(packed) - 1, len(packed) + 1):
        with pytest.raises(PermanentTaskError, match=(
                f"^input {tmp_path}/in.gz changed after the job was planned: it is "
                f"{len(packed)} bytes now, and a split planned on it ends at byte {planned}")):
            await pieces(store, "in.gz", (0, planned), "text", 1000)


@pytest.mark.anyio
async def test_unsplit_inputs_expand_files_and_pass_other_strings_verbatim(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "data"
    d.mkdir()
    for name in ["b.txt", "a.txt.gz", "_SUCCESS", ".swp"]:
        (d / name).write_bytes(b"x\n")
    monkeypatch.chdir(tmp_path)
    spec = JobSpec(name="j", job="j.py", split_inputs=False, inputs=(
        "data", "data/*.txt", "data/_SUCCESS", "user-42", "https://example.com/x",
        "missing/*.txt", "missing.txt"))
    absolute = [str(d / "a.txt.gz"), str(d / "b.txt"), str(d / "b.txt"), str(d / "_SUCCESS")]
    assert await plan_inputs(spec) == [
        (text, None) for text in [*absolute, "user-42", "https://example.com/x",
                                  "missing/*.txt", "missing.txt"]]
    os.chdir(d)  # relative to wherever the planner runs, resolved to absolute paths
    spec = JobSpec(name="j", job="j.py", split_inputs=False, inputs=("b.txt",))
    assert await plan_inputs(spec) == [(str(d / "b.txt"), None)]


@pytest.mark.anyio
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400).map(lambda b: b.replace(b"\r", b"\n")),
       chunk=st.integers(1, 64))
async def test_splits_cover_every_line_exactly_once(tmp_path: Path, data: bytes,
                                                    chunk: int) -> None:
    path = tmp_path / "in.txt"
    path.write_bytes(data)
    store = FileBlobStore("/")
    key = str(path)[1:]
    pieces = [await read_split(store, key, start, end, len(data))
              for _, (start, end) in plan_splits([(str(path), len(data))], chunk)]  # type: ignore[misc]
    assert b"".join(pieces) == data
    consumed = 0
    for piece in pieces:  # only the piece that reaches EOF may end without a newline
        consumed += len(piece)
        assert piece == b"" or piece.endswith(b"\n") or consumed == len(data)


@pytest.mark.anyio
async def test_long_lines_cross_the_read_window(tmp_path: Path) -> None:
    data = b"a" * 200_000 + b"\n" + b"b" * 10 + b"\n" + b"c" * 150_000
    path = tmp_path / "long.txt"
    path.write_bytes(data)
    store = FileBlobStore("/")
    splits = plan_splits(await expand_inputs([str(path)]), 1000)
    pieces = [await read_split(store, str(path)[1:], s, e, len(data))
              for _, (s, e) in splits]  # type: ignore[misc]
    assert b"".join(pieces) == data
    # Lines belong to the split they begin in: b and c both begin in [200000, 201000).
    assert [p for p in pieces if p] == [b"a" * 200_000 + b"\n",
                                        b"b" * 10 + b"\n" + b"c" * 150_000]


@pytest.mark.anyio
async def test_splits_are_no_larger_than_an_eighth_of_the_memory_budget(tmp_path: Path) -> None:
    # A map holds its split whole, so the budget caps the chunk size; without a budget in
    # the spec, the chunk size is taken as given.
    MiB = 1 << 20
    path = tmp_path / "big.txt"
    path.write_bytes(b"x" * (10 * MiB))
    spec = JobSpec(name="j", job="j.py", inputs=(str(path),), chunk_size=8 * MiB,
                   memory=32 * MiB)
    assert {end - start for _, (start, end) in await plan_inputs(spec)} == {4 * MiB, 2 * MiB}
    unbudgeted = JobSpec(name="j", job="j.py", inputs=(str(path),), chunk_size=8 * MiB)
    assert [rng for _, rng in await plan_inputs(unbudgeted)] == [(0, 8 * MiB),
                                                                 (8 * MiB, 10 * MiB)]
