"""How a job may be written: async or plain callbacks, generators, map-only jobs.

Every case runs the real `kubemr run` (worker processes, the SQLite store, files on disk)
and compares the result files with a reference computed here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from kubemr_async import read_results

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


@pytest.mark.parametrize("sort_values", [False, True])
def test_the_identity_reducer_writes_every_pair_in_key_order(tmp_path: Path,
                                                              sort_values: bool) -> None:
    # Every word with its position: identity keeps each pair (no fold), parts are sorted
    # by key, and with sort_values by key and then value.
    result = run_job(tmp_path, f"""
from kubemr_async import Job
job = Job(sort_values={sort_values})

@job.map
def words(text, ctx):
    for position, word in enumerate(text.split()):
        yield word, -position

job.reduce("identity")
""", "--reducers", "2")
    assert result.returncode == 0, result.stderr
    expected = sorted(f"{w}\t{-i}" for i, w in enumerate(TEXT.split()))
    assert result_lines(tmp_path / "out") == expected
    for part in (tmp_path / "out").glob("part-*"):
        pairs = [line.split("\t") for line in part.read_text().splitlines()]
        keys = [k.encode() for k, _ in pairs]
        assert keys == sorted(keys)
        if sort_values:
            assert pairs == sorted(pairs, key=lambda p: (p[0].encode(), int(p[1])))


def test_workers_start_with_two_malloc_arenas_unless_told_otherwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = """
import os
from kubemr_async import Job
job = Job()

@job.map
def env(text, ctx):
    yield "arenas", os.environ.get("MALLOC_ARENA_MAX", "unset")

job.reduce("identity")
"""
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert run_job(tmp_path, source).returncode == 0
    assert set(result_lines(tmp_path / "out")) == {"arenas\t2"}
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert run_job(tmp_path, source, "--overwrite").returncode == 0
    assert set(result_lines(tmp_path / "out")) == {"arenas\t4"}


def test_identity_is_a_reducer_not_a_combiner() -> None:
    from kubemr_async import Job
    from kubemr_async.errors import JobDefinitionError
    job = Job()
    with pytest.raises(JobDefinitionError, match="unknown built-in combine 'identity'"):
        job.combine("identity")  # type: ignore[arg-type]
    job.reduce("identity")
    assert job.map_side_combiner is None and job.folding_reducer is None


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


MAP_ONLY = """
from kubemr_async import Job
job = Job()

@job.map
def upper(text, ctx):
    for number, line in enumerate(text.splitlines()):
        yield line.upper(), number
"""


def test_map_only_job_writes_each_maps_output_as_a_part_in_map_order(tmp_path: Path) -> None:
    lines = [f"line {i:03d} of the input" for i in range(300)]
    (tmp_path / "job.py").write_text(MAP_ONLY)
    data = tmp_path / "in.txt"
    data.write_text("".join(f"{line}\n" for line in lines))
    out = tmp_path / "out"
    result = kubemr("run", str(tmp_path / "job.py"), "--input", str(data), "--output",
                    str(out), "--reducers", "0", "--chunk-size", "2k", "--workers", "2")
    assert result.returncode == 0, result.stderr
    parts = sorted(out.glob("part-*"))
    assert len(parts) == -(-data.stat().st_size // 2048) > 2, "one part per map"
    keys = [line.split("\t")[0] for part in parts for line in part.read_text().splitlines()]
    assert keys == [line.upper() for line in lines], "map order, then emission order"
    pairs = list(read_results(out))
    assert [key for key, _ in pairs] == keys
    # Each map numbers its own lines from 0: the values restart at every part boundary.
    assert [value for _, value in pairs].count("0") == len(parts)


def test_map_only_ignores_a_defined_reducer_and_honours_the_format(tmp_path: Path) -> None:
    result = run_job(tmp_path, STYLES["plain functions"], "--reducers", "0",
                     "--format", "jsonl")
    assert result.returncode == 0, result.stderr
    pairs = list(read_results(tmp_path / "out"))
    assert sorted(pairs) == sorted((word, 1) for word in TEXT.split()), "no reduce ran"
    assert all(part.name.endswith(".jsonl") for part in (tmp_path / "out").glob("part-*"))


def test_a_low_level_job_cannot_run_map_only(tmp_path: Path) -> None:
    result = run_job(tmp_path, """
from kubemr_async import JobWorker

class W(JobWorker):
    async def map(self, task_id, input, ctx):
        return {}

    async def reduce(self, partition, inputs, ctx):
        return ""

job = W()
""", "--reducers", "0")
    assert result.returncode == 2
    assert "needs at least one reducer" in result.stderr


def run_failing_map(tmp_path: Path, inline: bool) -> subprocess.CompletedProcess[str]:
    """`kubemr run` of ``tmp_path/job.py`` (a map that fails every attempt) on one small
    input, 2 attempts, in worker processes or ``--inline``."""
    (tmp_path / "in.txt").write_text(TEXT)
    return subprocess.run(
        [KUBEMR, "run", str(tmp_path / "job.py"), "--input", str(tmp_path / "in.txt"),
         "--output", str(tmp_path / "out"), "--max-attempts", "2",
         *(["--inline"] if inline else [])],
        capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("call", "raised", "inline"), [
    ("sys.exit(4)", "SystemExit: 4", False), ("sys.exit(0)", "SystemExit: 0", False),
    ("raise KeyboardInterrupt", "KeyboardInterrupt", False),
    # Inline only SystemExit: a KeyboardInterrupt on the main thread is the user's Ctrl-C.
    ("sys.exit(4)", "SystemExit: 4", True)])
def test_sys_exit_in_a_callback_fails_the_task_instead_of_hanging_the_job(
        tmp_path: Path, call: str, raised: str, inline: bool) -> None:
    """SystemExit (and KeyboardInterrupt, on the user thread) used to stop the user
    thread's event loop with the attempt unresolved: the worker renewed its lease for
    ever and `kubemr run` never ended (inline, SystemExit ended it with a traceback)."""
    (tmp_path / "job.py").write_text(f"""
import sys
from kubemr_async import Job
job = Job("exits")

@job.map
def words(text, ctx):
    {call}

job.reduce("sum")
""")
    result = run_failing_map(tmp_path, inline)
    assert result.returncode == 1, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("kubemr: error: job exits-"), result.stderr
    assert "task map-00000 attempt 2: " in last
    assert f"the callback raised {raised} (at {tmp_path / 'job.py'}:8)" in last
    assert not (tmp_path / "out").exists()


def test_sys_exit_while_importing_the_job_module_is_a_usage_error(tmp_path: Path) -> None:
    result = run_job(tmp_path, "import sys\nsys.exit(3)\n")
    assert result.returncode == 2
    assert result.stderr == (f"kubemr: error: job module {tmp_path / 'job.py'} failed to "
                             "import: SystemExit: 3\n")


def test_an_error_raised_inside_the_standard_library_names_the_users_line(
        tmp_path: Path) -> None:
    """The error's place was the last frame outside kubemr: json.loads on a bad line named
    `.../json/decoder.py:355` and os.environ[...] `<frozen os>`, never the user's line."""
    result = run_job(tmp_path, """
import json, os
from kubemr_async import Job
job = Job("stdlib")

@job.map(input="lines")
def parse(line, ctx):
    yield json.loads(line)["k"], os.environ["KUBEMR_NO_SUCH_VARIABLE"]

job.reduce("sum")
""", "--max-attempts", "1")
    assert result.returncode == 1, result.stderr
    assert (f"JSONDecodeError: Expecting value: line 1 column 1 (char 0) "
            f"(at {tmp_path / 'job.py'}:8); log: ") in result.stderr.splitlines()[-1]


def test_sys_exit_in_the_map_while_sampling_for_a_total_order_is_the_jobs_failure(
        tmp_path: Path) -> None:
    """`kubemr run` samples a total-order job's keys by running its map in its own
    process: sys.exit(5) there ended kubemr with exit 5 and no word."""
    result = run_job(tmp_path, """
import sys
from kubemr_async import Job
job = Job("sampled")
job.partition("total-order")

@job.map
def words(text, ctx):
    sys.exit(5)

job.reduce("identity")
""", "--reducers", "2")
    assert result.returncode == 1, result.stderr
    assert re.fullmatch(r"kubemr: error: job sampled-[0-9a-f]{6} failed: sampling keys for "
                        r"the total-order partitioner: SystemExit: 5\n", result.stderr)


@pytest.mark.parametrize("inline", [False, True])
def test_a_cancelled_error_raised_by_a_callback_fails_the_task(tmp_path: Path,
                                                               inline: bool) -> None:
    """It was taken for the worker's own cancellation (a shutdown): the attempt was
    released, not failed, and claimed again for ever; `kubemr run` never ended."""
    (tmp_path / "job.py").write_text("""
import asyncio
from kubemr_async import Job
job = Job("cancels")

@job.map
async def words(text, ctx):
    raise asyncio.CancelledError()

job.reduce("sum")
""")
    result = run_failing_map(tmp_path, inline)
    assert result.returncode == 1, result.stderr
    assert re.fullmatch(
        rf"kubemr: error: job cancels-[0-9a-f]{{6}} failed: task map-00000 attempt 2: "
        rf"CallbackExit: the callback raised CancelledError \(at {re.escape(str(tmp_path))}"
        rf"/job.py:8\)(; log: \S+)?", result.stderr.splitlines()[-1]), result.stderr
