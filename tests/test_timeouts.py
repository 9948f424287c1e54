"""The per-task timeout (``spec.taskTimeoutSeconds``, ``--task-timeout``): a hung attempt is
cancelled and failed, retried up to ``maxAttempts``, and the job fails naming the timeout
instead of renewing a hung task's lease for ever.

The `kubemr run` cases run the real CLI (worker processes, SQLite, files); the in-process
ones drive ``runtime.Worker`` to see a retry succeed and a stuck worker leave.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import uuid
from pathlib import Path

import pytest

from kubemr_async import TaskContext, protocol, read_results
from kubemr_async.protocol import JobPhase, TaskState
from kubemr_async.runtime import Worker
from kubemr_async.state.sqlite import SQLiteStateStore
from kubemr_async.storage.fs import FileBlobStore

from .test_callbacks import KUBEMR, TEXT, result_lines, word_counts
from .test_worker import records, store, submit, word_count

__all__ = ["store"]  # a fixture, used by name

TIMEOUT = "spec.taskTimeoutSeconds"


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`kubemr run` over one small input into ``tmp_path/out``; a hang fails the test."""
    data = tmp_path / "in.txt"
    data.write_text(TEXT)
    return subprocess.run([KUBEMR, "run", *args, "--input", str(data),
                           "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)


def failed_by_timeout(result: subprocess.CompletedProcess[str], attempts: int,
                      tmp_path: Path) -> str:
    """The one-line CLI error of a job whose map timed out on every attempt."""
    assert result.returncode == 1, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("kubemr: error: job "), result.stderr
    assert (f"failed: task map-00000 attempt {attempts}: map timed out after 1 s ({TIMEOUT})"
            in last), result.stderr
    assert not (tmp_path / "out").exists()
    return last


def test_a_hung_async_map_is_cancelled_and_the_job_fails_naming_the_timeout(
        tmp_path: Path) -> None:
    (tmp_path / "job.py").write_text("""
import asyncio
from kubemr_async import Job
job = Job("hangs")

@job.map
async def words(text, ctx):
    await asyncio.sleep(1000)
    yield text, 1

job.reduce("sum")
""")
    result = run(tmp_path, str(tmp_path / "job.py"), "--task-timeout", "1",
                 "--max-attempts", "2")
    assert "and was cancelled; log: " in failed_by_timeout(result, 2, tmp_path)


def test_a_hung_shell_mapper_is_killed_and_the_job_fails_naming_the_timeout(
        tmp_path: Path) -> None:
    marker = f"1000.{uuid.uuid4().int % 10**9:09d}"  # the shell's and sleep's own argument
    result = run(tmp_path, "--mapper", f"sleep {marker}; echo x", "--reducers", "0",
                 "--task-timeout", "1", "--max-attempts", "2")
    failed_by_timeout(result, 2, tmp_path)
    left = [pid for pid in os.listdir("/proc") if pid.isdigit()
            and marker.encode() in _cmdline(pid)]
    assert not left, "the command's process group was killed"


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_a_sync_callback_stuck_computing_ends_the_job_not_hangs_it(tmp_path: Path) -> None:
    """Python cannot interrupt it: each worker fails its attempt, exits 75 and is replaced.
    One worker and 3 attempts: 3 deaths in a row would be a crash loop, but these are not
    counted as one, so the job fails for the timeout, on its last attempt."""
    (tmp_path / "job.py").write_text("""
from kubemr_async import Job
job = Job("stuck")

@job.map
def words(text, ctx):
    while True:
        pass
    yield text, 1

job.reduce("sum")
""")
    result = run(tmp_path, str(tmp_path / "job.py"), "--task-timeout", "1",
                 "--max-attempts", "3", "--workers", "1")
    last = failed_by_timeout(result, 3, tmp_path)
    assert "but its callback did not stop (a synchronous callback cannot be interrupted)" \
        in last
    assert "exited with code 75 (a task attempt timed out and its user code did not stop)" \
        in result.stderr, "the replaced worker's notice"


def test_a_child_process_a_stuck_map_started_does_not_outlive_its_worker(
        tmp_path: Path) -> None:
    """The map waits on a `sleep` it started: the worker exits 75 and the child, which has
    the worker's output pipe, is killed with it, instead of `kubemr run` waiting for it."""
    marker = f"1000.{uuid.uuid4().int % 10**9:09d}"
    (tmp_path / "job.py").write_text(f"""
import subprocess
from kubemr_async import Job
job = Job("child")

@job.map
def words(text, ctx):
    subprocess.Popen(["sleep", "{marker}"]).wait()
    yield text, 1

job.reduce("sum")
""")
    result = run(tmp_path, str(tmp_path / "job.py"), "--task-timeout", "1",
                 "--max-attempts", "2")
    failed_by_timeout(result, 2, tmp_path)
    left = [pid for pid in os.listdir("/proc") if pid.isdigit()
            and marker.encode() in _cmdline(pid) and not _zombie(pid)]
    assert not left, "the worker's process group was killed"


def _zombie(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def test_a_job_whose_tasks_finish_in_time_succeeds(tmp_path: Path) -> None:
    (tmp_path / "job.py").write_text("""
import asyncio
from kubemr_async import Job
job = Job("timely")

@job.map
async def words(text, ctx):
    await asyncio.sleep(0.1)
    for word in text.split():
        yield word, 1

job.reduce("sum")
""")
    result = run(tmp_path, str(tmp_path / "job.py"), "--task-timeout", "30",
                 "--reducers", "2")
    assert result.returncode == 0, result.stderr
    assert result_lines(tmp_path / "out") == word_counts()


# --- in process ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_reduce_that_hangs_once_times_out_and_its_retry_commits(
        store: SQLiteStateStore, tmp_path: Path) -> None:
    spec = await submit(store, tmp_path, task_timeout=1.0)
    job = word_count()

    @job.reduce
    async def total(key: str, values: list[int], ctx: TaskContext) -> int:
        if ctx.attempt == 1:
            await asyncio.sleep(1000)
        return sum(values)

    worker = Worker(spec.name, job, store, FileBlobStore(tmp_path / "blobs"), "w")
    assert await worker.run() == JobPhase.SUCCEEDED
    assert not worker.stuck
    reduce = (await records(store, spec.name))["reduce-00000"]
    assert (reduce["attempt"], reduce["failures"]) == (2, 1)
    assert reduce["error"] == f"reduce timed out after 1 s ({TIMEOUT}) and was cancelled"
    counts = {k: int(v) for k, v in read_results(tmp_path / "blobs" / spec.name)}
    assert counts == {"apple": 3, "pear": 2, "plum": 1, "fig": 2}


@pytest.mark.anyio
async def test_a_worker_whose_callback_will_not_stop_fails_the_attempt_and_leaves(
        store: SQLiteStateStore, tmp_path: Path) -> None:
    """The user thread is lost: the worker runs no more user code on it, and another
    worker finishes the job with the retry."""
    spec = await submit(store, tmp_path, task_timeout=1.0)
    job = word_count()
    assert job.map_fn is not None
    words = job.map_fn
    blocked, release = threading.Event(), threading.Event()

    async def block_the_first_call(chunk: bytes, ctx: TaskContext) -> None:
        if not blocked.is_set():
            blocked.set()
            release.wait(60)  # synchronous: cancelling cannot reach it
        await words(chunk, ctx)

    job.map_fn = block_the_first_call
    blobs = FileBlobStore(tmp_path / "blobs")
    stuck = Worker(spec.name, job, store, blobs, "stuck")
    try:
        assert await stuck.run() == JobPhase.RUNNING, "it left the job running"
        assert stuck.stuck and stuck.tasks_done == 0
        failed = [body for key, body in (await records(store, spec.name)).items()
                  if key != protocol.JOB_KEY and body["failures"]]
        assert len(failed) == 1 and failed[0]["state"] == TaskState.PENDING
        assert failed[0]["error"] == (
            f"map timed out after 1 s ({TIMEOUT}) and was cancelled, but its callback did "
            "not stop (a synchronous callback cannot be interrupted): worker stuck exits "
            "to be replaced")
        other = Worker(spec.name, job, store, blobs, "other")
        assert await other.run() == JobPhase.SUCCEEDED
    finally:
        release.set()
