"""`kubemr run` heals: worker processes SIGKILLed mid-task are replaced and their tasks
re-run, and workers that keep dying fail the job with a one-line cause.

Real processes throughout: the test starts `kubemr run`, reads the worker PIDs from the
job's own attempt log (each attempt appends ``task attempt pid time``), and kills them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest

from kubemr_async.deaths import death_cause

from .test_local_run import (
    KUBEMR,
    _failed_run_logs,  # noqa: F401 - failed runs' logs stay in tmp
    kubemr,
    output_lines,
    reference_lines,
    write_job,
)
from .test_races import ATTEMPT_LOG

pytestmark = pytest.mark.slow

JOB_SLOW = ATTEMPT_LOG + """
import asyncio, time
from kubemr_async import Job

job = Job("slow")

@job.map(input="bytes")
async def words(chunk, ctx):
    record(ctx, repr(time.time()))
    await asyncio.sleep(0.5)  # long enough that a kill lands mid-task
    ctx.emit_batch(chunk.split(), 1)

job.reduce("sum")
"""


def log_lines(log: Path) -> list[tuple[str, int, int, float]]:
    """(task, attempt, pid, started) per attempt, in the order they began."""
    if not log.exists():
        return []
    rows = []
    for line in log.read_text().splitlines():
        task, attempt, pid, started = line.split()
        rows.append((task, int(attempt), int(pid), float(started)))
    return rows


def test_sigkilled_workers_are_replaced_and_every_task_commits_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(24):
        (data / f"f{i:02d}.txt").write_bytes(f"k{i % 5} shared w{i} k{i % 3}\n".encode() * 3)
    log = tmp_path / "attempts.log"
    out = tmp_path / "out"
    # A lease far longer than the test: the kills are recovered by the supervisor, which
    # knows the process is dead, not by a takeover.
    proc = subprocess.Popen(
        [KUBEMR, "run", str(write_job(tmp_path, JOB_SLOW)), "-i", str(data), "--output",
         str(out), "--workers", "3", "--reducers", "2", "--lease-seconds", "600",
         "--arg", f"log={log}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kills: list[tuple[str, int, float]] = []  # (task, attempt, when) killed mid-attempt
    killed: set[int] = set()
    deadline = time.monotonic() + 240
    try:
        while len(kills) < 3 and proc.poll() is None and time.monotonic() < deadline:
            rows = log_lines(log)
            # The newest attempt of a live worker we have not killed: it is mid-task
            # (every map sleeps 0.5 s after its log line).
            fresh = [row for row in rows[-3:] if row[2] not in killed
                     and time.time() - row[3] < 0.2 and len(rows) >= 4 * (len(kills) + 1)]
            if fresh:
                task, attempt, pid, _ = fresh[-1]
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
                kills.append((task, attempt, time.time()))
            time.sleep(0.02)
        _, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(kills) == 3, f"the job ended before 3 kills: {kills}"
    assert proc.returncode == 0, stderr
    assert output_lines(out) == reference_lines(sorted(data.iterdir()))
    rows = log_lines(log)
    attempts: dict[str, list[int]] = defaultdict(list)
    for task, attempt, _, _ in rows:
        attempts[task].append(attempt)
    assert sorted(attempts) == [f"map-{i:05d}" for i in range(24)]
    recovered = []
    for task, attempt, when in kills:
        later = [started for t, a, _, started in rows if t == task and a == attempt + 1]
        assert later, f"{task} attempt {attempt} was killed and never re-run"
        recovered.append(later[0] - when)
    # Committed once each: the committed attempts' counters sum to the input, exactly.
    manifest = json.loads((out / "_SUCCESS").read_text())
    size = sum(path.stat().st_size for path in data.iterdir())
    assert manifest["counters"]["kubemr"]["mapInputBytes"] == size
    assert manifest["counters"]["kubemr"]["reduceOutputRecords"] == len(output_lines(out))
    deaths = re.findall(r"worker local-\S+ was killed by SIGKILL; its last log line: .*; "
                        r"starting another", stderr)
    assert len(deaths) == 3, stderr
    print(f"\nkubemr run, 24 maps, 3 workers: SIGKILLed 3 worker processes mid-task; "
          f"{len(rows)} map attempts for 24 maps; killed tasks re-run after "
          f"{', '.join(f'{s:.2f}' for s in recovered)} s; output equal to the reference "
          f"(records lost 0, duplicated 0)")


JOB_ALWAYS_DIES = """
import os, signal
from kubemr_async import Job

job = Job("dies")

@job.map(input="bytes")
async def words(chunk, ctx):
    print("about to die", flush=True)
    if ctx.args["how"] == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(0 if ctx.args["how"] == "exit0" else 3)

job.reduce("sum")
"""


def run_failing(tmp_path: Path, job: str, *extra: str) -> tuple[str, float]:
    """Run ``job`` with 2 workers on one line of input; it must fail: its error line and
    how long it took."""
    data = tmp_path / "in.txt"
    data.write_text("a b c\n")
    started = time.monotonic()
    result = kubemr("run", str(write_job(tmp_path, job)), "-i", str(data),
                    "--output", str(tmp_path / "out"), "--workers", "2", *extra)
    seconds = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    return result.stderr.strip().splitlines()[-1], seconds


@pytest.mark.parametrize(("how", "cause"), [
    ("sigkill", "was killed by SIGKILL"),
    ("exit3", "exited with code 3"),
    # An exit 0 before the verdict is a death too: it was taken for the end of the job,
    # which failed as "all 2 workers exited before the job finished", naming no task.
    ("exit0", "exited with code 0"),
])
def test_workers_that_keep_dying_fail_the_job_naming_the_cause(tmp_path: Path, how: str,
                                                               cause: str) -> None:
    error, seconds = run_failing(tmp_path, JOB_ALWAYS_DIES, "--max-attempts", "3",
                                 "--arg", f"how={how}")
    assert re.fullmatch(
        rf"kubemr: error: job dies-[0-9a-f]{{6}} failed: task map-00000 attempt 3: "
        rf"worker local-\d(-r\d+)? died during attempt 3: {cause}; its last log line: "
        rf"about to die; log: .+", error), error
    print(f"\nworkers always dying ({how}): the job failed in {seconds:.1f} s: {error}")


JOB_WORKERS_CRASH_AT_START = """
import os, sys
from kubemr_async import Job

if sys.argv[0].endswith("local.py"):  # only in a worker process: `kubemr run` plans fine
    print("cannot start", flush=True)
    os._exit(5)

job = Job("crash")

@job.map
async def words(text, ctx):
    yield text, 1

job.reduce("sum")
"""


def test_workers_dying_before_any_task_end_in_a_crash_loop_not_a_hang(tmp_path: Path) -> None:
    error, seconds = run_failing(tmp_path, JOB_WORKERS_CRASH_AT_START)
    assert re.fullmatch(
        r"kubemr: error: job crash-[0-9a-f]{6} failed: workers died 6 times in a row with "
        r"no task committing; the last, local-\d-r\d, exited with code 5; its last log "
        r"line: cannot start; logs: .+", error), error
    print(f"\nworkers crashing at start: the job failed in {seconds:.1f} s: {error}")


def test_a_worker_death_is_described_in_one_line() -> None:
    assert death_cause(-9, "", oom_killed=True) == "was killed by SIGKILL (out of memory)"
    assert death_cause(-9, "", oom_killed=False) == "was killed by SIGKILL"
    assert death_cause(-15, "", oom_killed=True) == "was killed by SIGTERM", \
        "only the OOM killer's signal means out of memory"
    assert death_cause(1, "MemoryError", oom_killed=False) == (
        "exited with code 1 (out of memory); its last log line: MemoryError")
    assert death_cause(3, "a\tb  " + "x" * 300, oom_killed=False) == (
        "exited with code 3; its last log line: a b " + "x" * 196)
