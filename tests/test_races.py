"""Coordination under stress with real worker processes sharing one SQLite store.

Each job below appends one line per attempt it runs to a log file (O_APPEND, so lines from
concurrent processes never interleave); the tests read that log to see how often each task
really ran, independently of what the store says.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from pathlib import Path

import pytest

from kubemr_async import protocol
from kubemr_async.local import _spawn_worker, _stop_workers
from kubemr_async.protocol import JobPhase, JobView
from kubemr_async.spec import JobSpec
from kubemr_async.state.sqlite import SQLiteStateStore

from .test_local_run import (  # noqa: F401 - the fixture keeps failed runs' logs in tmp
    _failed_run_logs,
    kubemr,
    output_lines,
    reference_lines,
    write_job,
)

pytestmark = pytest.mark.slow

ATTEMPT_LOG = """
import os

def record(ctx, extra=""):
    line = f"{ctx.task} {ctx.attempt} {os.getpid()} {extra}\\n".encode()
    fd = os.open(ctx.args["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, line)
    os.close(fd)
"""

JOB_MANY_TASKS = ATTEMPT_LOG + """
from kubemr_async import JobWorker

class Tiny(JobWorker):
    name = "tiny"

    async def map(self, task_id, input, ctx):
        record(ctx)
        return {task_id % ctx.partitions: input}

    async def reduce(self, partition, inputs, ctx):
        return ",".join(sorted(inputs))

job = Tiny()
"""


def attempts(log: Path) -> Counter[tuple[str, int]]:
    seen: Counter[tuple[str, int]] = Counter()
    for line in log.read_text().splitlines():
        task, attempt = line.split()[:2]
        seen[(task, int(attempt))] += 1
    return seen


def test_concurrent_worker_processes_commit_every_task_exactly_once(tmp_path: Path) -> None:
    log = tmp_path / "attempts.log"
    inputs = [f"item-{i:04d}" for i in range(300)]
    argv = ["run", str(write_job(tmp_path, JOB_MANY_TASKS)), "--output", str(tmp_path / "out"),
            "--workers", "6", "--reducers", "3", "--arg", f"log={log}"]
    for item in inputs:
        argv += ["-i", item]
    result = kubemr(*argv)
    assert result.returncode == 0, result.stderr
    ran = attempts(log)
    maps = {task for task, _ in ran if task.startswith("map-")}
    assert len(maps) == 300
    assert all(count == 1 for count in ran.values()), "a task ran twice: two claims won"
    assert all(attempt == 1 for _, attempt in ran)
    results = json.loads((tmp_path / "out" / "_SUCCESS").read_text())["results"]
    merged = sorted(item for part in results for item in part.split(","))
    assert merged == inputs, "every input reached exactly one reduce exactly once"
    pids = {line.split()[2] for line in log.read_text().splitlines()}
    assert len(pids) > 1, "the work was spread over several processes"


JOB_KILLED = ATTEMPT_LOG + """
import os, signal
from kubemr_async import Job

job = Job("killed")

@job.map(input="bytes")
async def words(chunk, ctx):
    record(ctx)
    if b"die" in chunk and ctx.attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    ctx.emit_batch(chunk.split(), 1)

job.reduce("sum")
"""


def test_sigkilled_worker_task_is_rerun_after_its_lease_expires(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_bytes(b"alpha beta\ngamma alpha\n")
    (data / "b.txt").write_bytes(b"die alpha here\n")
    (data / "c.txt").write_bytes(b"beta beta\n")
    log = tmp_path / "attempts.log"
    out = tmp_path / "out"
    result = kubemr("run", str(write_job(tmp_path, JOB_KILLED)), "-i", str(data), "--output",
                    str(out), "--workers", "2", "--reducers", "2", "--lease-seconds", "1.5",
                    "--arg", f"log={log}")
    assert result.returncode == 0, result.stderr
    assert output_lines(out) == reference_lines(sorted(data.iterdir()))
    ran = attempts(log)
    assert ran[("map-00001", 1)] == 1 and ran[("map-00001", 2)] == 1, ran


JOB_CPU_BOUND = ATTEMPT_LOG + """
import time
from kubemr_async import Job

job = Job("cpu")

@job.map
async def busy(text, ctx):
    record(ctx)
    if "slow" in text:
        # Hold the CPU without ever awaiting, for several lease periods.
        deadline = time.monotonic() + 4 * float(ctx.args["lease"])
        n = 0
        while time.monotonic() < deadline:
            n += 1
    for w in text.split():
        yield w, 1

job.reduce("sum")
"""


def test_heartbeats_keep_the_lease_while_user_code_hogs_the_cpu(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("slow words here\n")
    (data / "b.txt").write_text("quick words\n")
    log = tmp_path / "attempts.log"
    out = tmp_path / "out"
    result = kubemr("run", str(write_job(tmp_path, JOB_CPU_BOUND)), "-i", str(data), "--output",
                    str(out), "--workers", "2", "--lease-seconds", "1",
                    "--arg", f"log={log}", "--arg", "lease=1")
    assert result.returncode == 0, result.stderr
    assert output_lines(out) == reference_lines(sorted(data.iterdir()))
    assert attempts(log) == Counter({("map-00000", 1): 1, ("map-00001", 1): 1}), \
        "the busy task must not be taken over while its worker is alive"


JOB_SLOW_FIRST = ATTEMPT_LOG + """
import asyncio
from pathlib import Path
from kubemr_async import Job

job = Job("slow")

@job.map
async def slow(text, ctx):
    record(ctx)
    if "slow" in text and ctx.attempt == 1:
        Path(ctx.args["started"]).write_text("started")
        await asyncio.sleep(3600)
    for w in text.split():
        yield w, 1

job.reduce("sum")
"""


@pytest.mark.anyio
async def test_sigterm_hands_the_claim_back_at_once(tmp_path: Path) -> None:
    data = tmp_path / "in.txt"
    data.write_text("slow one\n")
    started = tmp_path / "started"
    log = tmp_path / "attempts.log"
    module = write_job(tmp_path, JOB_SLOW_FIRST)
    # A lease far longer than the test: only a release can free the task in time.
    spec = JobSpec(name="slow", job=str(module), inputs=(str(data),), reducers=1,
                   lease_seconds=3600, args={"log": str(log), "started": str(started)})
    store = SQLiteStateStore(tmp_path / "state.db")
    await store.create("slow", [(protocol.JOB_KEY, protocol.new_job(spec))])
    await store.create("slow", protocol.plan(spec, [(str(data), (0, data.stat().st_size))]))
    records, _ = await store.snapshot("slow")
    await store.patch("slow", protocol.start_job(records["job"].body, 1))
    procs = [await _spawn_worker(tmp_path, "slow", i) for i in range(2)]
    try:
        while not started.exists():  # noqa: ASYNC110 - another process creates it
            await asyncio.sleep(0.05)
        records, _ = await store.snapshot("slow")
        holder = records["map-00000"].body["worker"]
        victim = procs[int(holder.rsplit("-", 1)[1])]
        victim.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(victim.wait(), 60) == 0, "clean exit on SIGTERM"
        view = JobView({})
        while not view.phase.finished:
            await asyncio.sleep(0.05)
            records, _ = await store.snapshot("slow")
            view = JobView({k: r.body for k, r in records.items()})
        assert view.phase == JobPhase.SUCCEEDED
        task = records["map-00000"].body
        assert (task["attempt"], task["failures"]) == (2, 0), "released, not expired"
        assert task["worker"] != holder
    finally:
        await _stop_workers(procs)
        await store.aclose()
