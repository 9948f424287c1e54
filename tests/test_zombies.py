"""A zombie worker: paused (SIGSTOP) while it holds a task, past its lease; another worker
takes the task over; then the zombie wakes (SIGCONT) and carries on as if nothing
happened. Its late writes must be refused and the output must not change.

Real processes: `kubemr run` with three workers; the test finds the holder's PID in the
job's own attempt log (``task attempt pid``) and pauses it there.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .test_healing import log_lines
from .test_local_run import KUBEMR, output_lines, reference_lines, write_job
from .test_races import ATTEMPT_LOG

pytestmark = pytest.mark.slow

#: The paused task's first attempt outlives a lease by far; every other attempt is quick.
JOB_ZOMBIE = ATTEMPT_LOG + """
import asyncio, time
from kubemr_async import Job

job = Job("zombie")

@job.map(input="bytes")
async def words(chunk, ctx):
    record(ctx, repr(time.time()))
    await asyncio.sleep(4.0 if (ctx.task, ctx.attempt) == ("map-00002", 1) else 0.1)
    ctx.emit_batch(chunk.split(), 1)

job.reduce("sum")
"""
LEASE = 2.0


def test_a_paused_holder_is_taken_over_and_its_late_writes_are_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(12):
        (data / f"f{i:02d}.txt").write_bytes(f"k{i % 4} shared w{i}\n".encode() * 5)
    log = tmp_path / "attempts.log"
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [KUBEMR, "run", str(write_job(tmp_path, JOB_ZOMBIE)), "-i", str(data), "--output",
         str(out), "--workers", "3", "--reducers", "2", "--lease-seconds", str(LEASE),
         "--arg", f"log={log}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    zombie = 0
    paused_at = taken_over_after = 0.0
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            rows = log_lines(log)
            if not zombie:
                first = [pid for task, attempt, pid, _ in rows
                         if (task, attempt) == ("map-00002", 1)]
                if first:
                    zombie = first[0]
                    os.kill(zombie, signal.SIGSTOP)
                    paused_at = time.monotonic()
            elif not taken_over_after and any(
                    (task, attempt) == ("map-00002", 2) for task, attempt, _, _ in rows):
                taken_over_after = time.monotonic() - paused_at
                time.sleep(1.0)  # the takeover's quick attempt commits meanwhile
                os.kill(zombie, signal.SIGCONT)  # wakes mid-sleep, with a stale claim
                break
            time.sleep(0.02)
        _, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if zombie:
            with contextlib.suppress(ProcessLookupError):  # never left paused
                os.kill(zombie, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert zombie, "map-00002 never started"
    assert taken_over_after, "the paused holder's task was never taken over"
    assert proc.returncode == 0, stderr
    assert output_lines(out) == reference_lines(sorted(data.iterdir()))
    attempts = sorted(a for task, a, _, _ in log_lines(log) if task == "map-00002")
    assert attempts == [1, 2]
    # Only the takeover's attempt counted: the committed counters sum to the input once.
    manifest = json.loads((out / "_SUCCESS").read_text())
    size = sum(path.stat().st_size for path in data.iterdir())
    assert manifest["counters"]["kubemr"]["mapInputBytes"] == size
    # The zombie never committed: on waking its renewal or commit was refused, or (when
    # the job had ended meanwhile) it was stopped and its release was refused.
    zombie_says = [json.loads(line) for path in (out / "_logs").iterdir()
                   for line in path.read_text().splitlines() if line.startswith("{")]
    said = [r["msg"] for r in zombie_says
            if r.get("task") == "map-00002" and r.get("attempt") == 1]
    assert "committed" not in said, said
    refused = [m for m in said if m in ("lease lost; abandoning attempt",
                                        "commit lost: the task was taken over",
                                        "shutting down: the attempt was no longer ours to release"
                                        )] or ["(nothing after waking)"]
    # Nothing the zombie wrote late is left beside the results.
    assert sorted(p.name for p in out.iterdir()) == ["_SUCCESS", "_logs", "part-00000",
                                                    "part-00001"]
    print(f"\nzombie: holder of map-00002 paused; taken over {taken_over_after:.1f}s later "
          f"(lease {LEASE:.0f}s); on waking: {refused[0]!r}; output equal to the reference "
          f"(records lost 0, duplicated 0)")
