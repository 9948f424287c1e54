"""Real-data inputs end to end through `kubemr run`: compressed files, hidden files, a
previous job's output directory, and low-level jobs given a directory or a glob."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import subprocess
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import pyarrow as pa
import pytest

from .test_inputs import MEMBERS

ROOT = Path(__file__).resolve().parents[1]
KUBEMR = str(Path(sys.executable).parent / "kubemr")
DATA = ROOT / "examples" / "data"
WORDCOUNT = str(ROOT / "examples" / "wordcount.py")
COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    ".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
    ".zst": lambda data: bytes(pa.Codec("zstd").compress(data, asbytes=True))}


def kubemr(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KUBEMR, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def word_counts(texts: Iterable[bytes]) -> Counter[bytes]:
    counts: Counter[bytes] = Counter()
    for text in texts:
        counts.update(text.split())
    return counts


def output_counts(out: Path) -> Counter[bytes]:
    """The job's result as a Counter; a word appearing twice would be a shuffle bug."""
    counts: Counter[bytes] = Counter()
    for part in sorted(out.glob("part-*")):
        for line in part.read_bytes().splitlines():
            word, _, count = line.rpartition(b"\t")
            assert word not in counts, f"{word!r} appears in two output lines"
            counts[word] = int(count)
    return counts


def plain_files() -> list[Path]:
    return sorted(DATA.iterdir())


def test_wordcount_over_every_codec_matches_the_plain_files(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in plain_files():
        data = path.read_bytes()
        for ext, compress in COMPRESS.items():
            (inputs / f"{path.name}{ext}").write_bytes(compress(data))
    # Concatenated gzip members, as `cat a.gz b.gz` makes: both must be read.
    story = (DATA / "kubemr-story.txt").read_bytes()
    (inputs / "joined.txt.gz").write_bytes(gzip.compress(story[:1000]) +
                                           gzip.compress(story[1000:]))
    out = tmp_path / "out"
    # A chunk size far below the files' sizes: compressed files must stay whole anyway.
    result = kubemr("run", WORDCOUNT, "--input", str(inputs), "--output", str(out),
                    "--chunk-size", "1k", "--reducers", "2", "--workers", "2")
    assert result.returncode == 0, result.stderr
    expected = word_counts(p.read_bytes() for p in plain_files() for _ in COMPRESS)
    expected.update(story.split())
    assert output_counts(out) == expected


PIECES_JOB = """
from kubemr_async import Job
job = Job("pieces")

@job.map(input="bytes")
def piece(data, ctx):
    name = ctx.input.rsplit("/", 1)[-1]
    yield name + " pieces", 1
    yield name + " bytes", len(data)
    yield name + " lines", data.count(b"\\n")
    yield name + " short", int(len(data) < 1024)  # only the last piece may be

job.reduce("sum")
"""
LINES_JOB = """
from kubemr_async import Job
job = Job("lines")

@job.map(input="lines")
def line(text, ctx):
    yield ctx.input.rsplit("/", 1)[-1], len(text.encode("utf-8", "surrogateescape"))

job.reduce("sum")
"""
#: Lines of every length up to a few pieces', CRLF and LF, and a last line without an end.
TEXT = b"".join(b"%d %s%s" % (i, b"ab" * ((i * 37) % 900), b"\r\n" if i % 3 else b"\n")
                for i in range(300)) + b"no line end"


def test_a_compressed_input_is_mapped_a_piece_at_a_time(tmp_path: Path) -> None:
    """With a chunk size of 1 KiB, each compressed file (several members, frames or xz
    streams) is mapped in pieces of whole lines of at least that size, each once: a
    bytes map once per piece, a lines map once per line, a shell mapper once per piece;
    the map input counted is the decoded size."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for ext, compress in MEMBERS.items():
        (inputs / f"t{ext}").write_bytes(compress(TEXT))
    (tmp_path / "pieces.py").write_text(PIECES_JOB)
    (tmp_path / "lines.py").write_text(LINES_JOB)
    runs = {"pieces": [str(tmp_path / "pieces.py")], "lines": [str(tmp_path / "lines.py")],
            "shell": ["--mapper", "awk 'END { print \"lines\\t\" NR }'", "--reducer",
                      "awk -F'\\t' '{ n += $2 } END { print \"lines\\t\" n }'"]}
    for name, job in runs.items():
        result = kubemr("run", *job, "--input", str(inputs), "--output", str(tmp_path / name),
                        "--chunk-size", "1k", "--reducers", "1", "--workers", "2")
        assert result.returncode == 0, result.stderr
    pieces = dict(line.split(b"\t") for line in (tmp_path / "pieces" / "part-00000")
                  .read_bytes().splitlines())
    lines = TEXT.splitlines()
    for ext in MEMBERS:
        assert int(pieces[f"t{ext} bytes".encode()]) == len(TEXT)
        assert int(pieces[f"t{ext} lines".encode()]) == TEXT.count(b"\n")
        assert int(pieces[f"t{ext} pieces".encode()]) > 100
        assert int(pieces[f"t{ext} short".encode()]) <= 1
    totals = json.loads((tmp_path / "pieces" / "_SUCCESS").read_text())["counters"]
    assert totals["kubemr"]["mapInputBytes"] == len(TEXT) * len(MEMBERS)
    assert output_counts(tmp_path / "lines") == {
        f"t{ext}".encode(): sum(map(len, lines)) for ext in MEMBERS}
    shell = (tmp_path / "shell" / "part-00000").read_bytes()
    assert shell == b"lines\t%d\n" % (len(lines) * len(MEMBERS))  # awk counts the last too


BOMB_LINE = b"the quick brown fox jumps over the lazy dog 0123456789\n"
LINE_COUNT_JOB = """
from kubemr_async import Job
job = Job("line-count")

@job.map(input="bytes")
def count(data, ctx):
    ctx.emit("lines", data.count(b"\\n"))

job.reduce("sum")
"""


def _count_gzip_lines(tmp_path: Path, blocks: int) -> int:
    """Count the lines of ``blocks`` MiB of one repeated line, gzipped (written a mebibyte
    at a time: the test never holds it), with ``kubemr run`` and a 4 MiB chunk size; the
    peak RSS of the run and its worker (wait4: every process it waited for)."""
    block = BOMB_LINE * ((1 << 20) // len(BOMB_LINE))
    packer = zlib.compressobj(1, wbits=31)
    work = tmp_path / f"bomb-{blocks}"
    work.mkdir()
    with open(work / "bomb.txt.gz", "wb") as f:
        for _ in range(blocks):
            f.write(packer.compress(block))
        f.write(packer.flush())
    (work / "count.py").write_text(LINE_COUNT_JOB)
    with open(work / "log", "wb") as log:
        proc = subprocess.Popen(
            [KUBEMR, "run", str(work / "count.py"), "--input", str(work / "bomb.txt.gz"),
             "--output", str(work / "out"), "--chunk-size", "4m", "--workers", "1",
             "--reducers", "1"], stdout=log, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, (work / "log").read_text()
    lines = len(block) * blocks // len(BOMB_LINE)
    assert (work / "out" / "part-00000").read_bytes() == b"lines\t%d\n" % lines
    return int(usage.ru_maxrss) * 1024


def test_a_gzip_bomb_is_mapped_in_bounded_memory(tmp_path: Path) -> None:
    """600 MiB of one repeated line, 4 MiB gzipped: every line is counted, and the peak
    RSS is that of a 16 MiB file's run, give or take (it was above the decoded size, the
    file being decompressed whole). Compared with a small run on the same machine, not
    with a fixed figure: what the interpreter and its libraries hold differs between
    environments, what the decoded size adds must not."""
    small = _count_gzip_lines(tmp_path, 16)
    large = _count_gzip_lines(tmp_path, 600)
    assert large < small + (128 << 20), \
        f"peak RSS {large >> 20} MiB for 600 MiB decoded, {small >> 20} MiB for 16 MiB"


def _truncated(data: bytes) -> bytes:
    return gzip.compress(data)[:-30]


def _not_gzip(data: bytes) -> bytes:
    return data


def _trailing_garbage(data: bytes) -> bytes:
    return gzip.compress(data) + b"this is not gzip\n"


@pytest.mark.parametrize(("make", "code", "reason"), [
    (_truncated, 1, "the file is truncated"),
    (_not_gzip, 2, "it does not start with the gzip magic bytes"),
    (_trailing_garbage, 1, "17 bytes of trailing garbage after the last member"),
])
def test_a_bad_gzip_input_fails_the_run_naming_the_file(
        tmp_path: Path, make: Callable[[bytes], bytes], code: int, reason: str) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "good.txt").write_bytes(b"fine words\n")
    bad = inputs / "bad.txt.gz"
    bad.write_bytes(make((DATA / "kubemr-story.txt").read_bytes()))
    out = tmp_path / "out"
    result = kubemr("run", WORDCOUNT, "--input", str(inputs), "--output", str(out),
                    "--max-attempts", "3")
    assert result.returncode == code, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("kubemr: error:")]
    assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1]
    assert f"input {bad} is not valid gzip data: {reason}" in errors[0]
    assert "Traceback" not in result.stderr
    if code == 1:  # found by the task reading it: permanent, so not retried
        assert "attempt 1" in errors[0]
    assert not out.exists(), "nothing may be published"
    assert not list(tmp_path.glob(".out.*")), "the work directory is cleaned up"


def test_a_previous_output_directory_and_hidden_files(tmp_path: Path) -> None:
    first = tmp_path / "first"
    result = kubemr("run", WORDCOUNT, "--input", str(DATA / "kubemr-story.txt"),
                    "--output", str(first), "--reducers", "2")
    assert result.returncode == 0, result.stderr
    assert (first / "_SUCCESS").is_file()
    (first / ".part-00000.crc").write_bytes(b"HIDDENCRC\n")
    assert (first / "_logs").is_dir(), "kubemr run keeps its workers' logs in _logs/"
    (first / "_logs" / "history.txt").write_bytes(b"LOGGED\n")
    more = tmp_path / "more"
    more.mkdir()
    files = {"a.txt": b"alpha beta\n", "_skipped.txt": b"SKIPPED\n", ".dot.txt": b"DOTTED\n",
             "_explicit.txt": b"explicit beta\n"}
    for name, text in files.items():
        (more / name).write_bytes(text)
    out = tmp_path / "out"
    # A directory, a quoted glob, and a hidden file named explicitly (read: it was asked for).
    result = kubemr("run", WORDCOUNT, "--input", str(first), "--input", str(more / "*.txt"),
                    "--input", str(more / "_explicit.txt"), "--output", str(out))
    assert result.returncode == 0, result.stderr
    expected = word_counts([*(p.read_bytes() for p in sorted(first.glob("part-*"))),
                            files["a.txt"], files["_explicit.txt"]])
    counts = output_counts(out)
    assert counts == expected
    assert counts[b"beta"] == 2 and counts[b"explicit"] == 1
    assert not {b"SKIPPED", b"DOTTED", b"LOGGED", b"HIDDENCRC", b'"parts":'} & set(counts)


@pytest.mark.parametrize("pattern", ["examples/data", "examples/data/*.txt"])
def test_lowlevel_example_takes_a_directory_or_a_quoted_glob(tmp_path: Path,
                                                             pattern: str) -> None:
    # Exactly the command lines the example's docstring gives, run from the repository.
    out = tmp_path / "wc-ll"
    result = kubemr("run", "examples/wordcount_lowlevel.py", "--input", pattern,
                    "--output", str(out), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert output_counts(out) == word_counts(p.read_bytes() for p in plain_files())
