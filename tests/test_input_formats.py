"""Real-data inputs end to end through `kubemr run`: compressed files, hidden files, a
previous job's output directory, and low-level jobs given a directory or a glob."""

from __future__ import annotations

import bz2
import gzip
import lzma
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import pyarrow as pa
import pytest

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
