"""How a job may be written: async or plain callbacks, generators, map-only jobs.

Every case runs the real `kubemr run` (worker processes, the SQLite store, files on disk)
and compares the result files with a reference computed here.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

KUBEMR = str(Path(sys.executable).parent / "kubemr")
TEXT = "the cat saw the dog\nthe dog ran\n" * 50


def kubemr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KUBEMR, *args], capture_output=True, text=True, timeout=300)


def run_job(tmp_path: Path, source: str, *extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "job.py").write_text(source)
    data = tmp_path / "in.txt"
    data.write_text(TEXT)
    return kubemr("run", str(tmp_path / "job.py"), "--input", str(data),
                  "--output", str(tmp_path / "out"), "--workers", "2", *extra)


def result_lines(out: Path) -> list[str]:
    return sorted(line for part in sorted(out.glob("part-*"))
                  for line in part.read_text().splitlines())


def word_counts() -> list[str]:
    return sorted(f"{word}\t{n}" for word, n in Counter(TEXT.split()).items())


STYLES = {
    "plain functions": """
from kubemr_async import Job
job = Job()

@job.map
def words(text, ctx):
    for word in text.split():
        ctx.emit(word, 1)

@job.reduce
def total(key, values, ctx):
    return sum(values)
""",
    "plain generators": """
from kubemr_async import Job
job = Job()

@job.map
def words(text, ctx):
    for word in text.split():
        yield word, 1

@job.reduce
def total(key, values, ctx):
    yield sum(values)
""",
    "async generators": """
from kubemr_async import Job
job = Job()

@job.map
async def words(text, ctx):
    for word in text.split():
        yield word, 1

@job.reduce
async def total(key, values, ctx):
    yield sum(values)
""",
    "plain combiner": """
from kubemr_async import Job
job = Job()

@job.map
async def words(text, ctx):
    for word in text.split():
        yield word, 1

@job.combine
def partial(key, values, ctx):
    return sum(values)

job.reduce("sum")
""",
}


@pytest.mark.parametrize("style", sorted(STYLES))
def test_callbacks_may_be_async_or_plain_functions_or_generators(tmp_path: Path,
                                                                 style: str) -> None:
    result = run_job(tmp_path, STYLES[style], "--reducers", "2")
    assert result.returncode == 0, result.stderr
    assert result_lines(tmp_path / "out") == word_counts()


def test_a_map_that_returns_instead_of_yielding_is_named_clearly(tmp_path: Path) -> None:
    result = run_job(tmp_path, """
from kubemr_async import Job
job = Job()

@job.map
def words(text, ctx):
    return [(w, 1) for w in text.split()]

job.reduce("sum")
""")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "map must yield (key, value) tuples or call ctx.emit" in result.stderr
    assert "returned a list" in result.stderr


def test_a_job_without_a_reducer_needs_reducers_zero(tmp_path: Path) -> None:
    result = run_job(tmp_path, """
from kubemr_async import Job
job = Job()

@job.map
async def words(text, ctx):
    yield text, 1
""", "--reducers", "2")
    assert result.returncode == 2
    assert "has no reducer" in result.stderr and "--reducers 0" in result.stderr
    assert not (tmp_path / "out").exists()
