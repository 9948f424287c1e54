"""Data bigger than memory: jobs run under an enforced memory cap (RLIMIT_DATA).

Each job runs inline (one process) in a subprocess that first runs a tiny warm-up job, so
the interpreter, numpy, Arrow and kubemr are loaded and their pools made, then caps its
own data segment (private writable memory: heap, anonymous mappings, thread stacks) at
what it uses then plus twice the worker's budget, and runs the real job. The allocator is
told to give memory back (Arrow on the system allocator, large blocks as their own
mappings, two malloc arenas, 1 MiB thread stacks): otherwise the cap would measure
glibc's retention and 8 MiB stack reservations that are never touched, not our buffers.
The job's single reduce partition is several times the budget, so without spilling and
streaming it could not fit; the output must still be exact. The child prints its budget,
cap and peak RSS for the report.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
BUDGET = 16 * MiB

_CHILD = textwrap.dedent("""
    import asyncio, json, resource, sys, threading
    from pathlib import Path

    threading.stack_size(1 << 20)
    from kubemr_async.local import run_local

    job, inputs, out, warm, budget, chunk = sys.argv[1:7]

    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    async def run(inputs, out):
        await run_local(job, [inputs], Path(out), workers=0, chunk_size=int(chunk),
                        max_attempts=1, lease_seconds=600, progress=False,
                        memory=int(budget), reducers=1)

    asyncio.run(run(warm, out + "-warm"))
    warm_rss = status("VmHWM")
    cap = status("VmData") + 2 * int(budget)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    asyncio.run(run(inputs, out))
    # VmHWM, not ru_maxrss: that one counts the forked parent's pages from before exec.
    print(json.dumps({"budget": int(budget), "cap": cap, "warm_rss": warm_rss,
                      "peak_rss": status("VmHWM")}))
""")


def run_capped(tmp_path: Path, job: str, inputs: Path, warm: Path, chunk: int) -> dict[str, int]:
    job_path = tmp_path / "job.py"
    job_path.write_text(textwrap.dedent(job))
    env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system",
           "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "2",
           "KUBEMR_SCRATCH_DIR": str(tmp_path / "scratch"),
           "KUBEMR_LOG_DIR": str(tmp_path / "logs")}
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(job_path), str(inputs), str(tmp_path / "out"),
         str(warm), str(BUDGET), str(chunk)],
        capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    figures: dict[str, int] = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\nbudget {figures['budget'] / MiB:.0f} MiB, data cap "
          f"{figures['cap'] / MiB:.0f} MiB, peak RSS {figures['peak_rss'] / MiB:.0f} MiB "
          f"(after the warm-up job {figures['warm_rss'] / MiB:.0f} MiB)")
    return figures


def digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            sha.update(chunk)
    return sha.hexdigest()


UNIQUE_WORDS = """
    from kubemr_async import Job
    from kubemr_async.shuffle import split_words

    job = Job("unique")

    @job.map(input="bytes")
    def words(chunk, ctx):
        ctx.emit_batch(split_words(chunk), 1)

    job.reduce("sum")
"""


def test_a_reduce_partition_five_times_the_budget_is_exact(tmp_path: Path) -> None:
    # Every word is unique, so combining shrinks nothing: the one reduce partition holds
    # ~5x the budget in Arrow (words, offsets, counts) and the output ~3x as text.
    count = 3_000_000
    words = np.char.mod("%016x", np.random.default_rng(7).permutation(count))
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "words.txt").write_bytes("\n".join(words.tolist()).encode() + b"\n")
    warm = tmp_path / "warm.txt"
    warm.write_text("a b a\n")
    figures = run_capped(tmp_path, UNIQUE_WORDS, inputs, warm, chunk=2 * MiB)
    expected = hashlib.sha256()
    for start in range(0, count, 100_000):
        expected.update("".join(f"{i:016x}\t1\n"
                                for i in range(start, min(count, start + 100_000))).encode())
    assert digest(tmp_path / "out" / "part-00000") == expected.hexdigest()
    assert figures["peak_rss"] < figures["warm_rss"] + 4 * BUDGET


ONE_KEY = """
    import numpy as np
    from kubemr_async import Job

    job = Job("onekey", sort_values=SORT_VALUES)

    @job.map(input="bytes")
    def values(chunk, ctx):
        numbers = np.array(chunk.split(), dtype=np.int64)
        ctx.emit_batch(np.full(numbers.size, b"k"), numbers)

    @job.reduce
    def total(key, values, ctx):
        count = total = descents = 0
        previous = None
        for value in values:
            count += 1
            total += value
            descents += previous is not None and value < previous
            previous = value
        yield f"{count} {total} {descents}"
"""


@pytest.mark.parametrize("sort_values", [False, True])
def test_one_key_with_more_values_than_fit_still_reduces(tmp_path: Path,
                                                         sort_values: bool) -> None:
    # With sort_values the values arrive sorted although they cannot all be held: the
    # maps sort by key and value, and the merge keeps that order.
    count = 4_000_000
    numbers = np.random.default_rng(8).integers(0, 10**9, count)
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "numbers.txt").write_bytes("\n".join(map(str, numbers.tolist())).encode() + b"\n")
    warm = tmp_path / "warm.txt"
    warm.write_text("1\n2\n")
    run_capped(tmp_path, ONE_KEY.replace("SORT_VALUES", str(sort_values)), inputs, warm,
               chunk=2 * MiB)
    count_, total, descents = (tmp_path / "out" / "part-00000").read_text().split("\t")[1].split()
    assert (int(count_), int(total)) == (count, int(numbers.sum()))
    if sort_values:
        assert int(descents) == 0
    else:
        assert int(descents) > 0  # the same data unsorted: the check above can fail
