"""Counters: ``ctx.counter`` checks, the exactly-once protocol, and `kubemr run`'s totals.

Only the attempt that commits a task counts: its increments travel in the commit, so a
failed, retried or zombie attempt's increments never reach the job's totals.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kubemr_async import TaskContext, counters, protocol
from kubemr_async.counters import FRAMEWORK_GROUP, MAX_COUNTERS, TaskCounters
from kubemr_async.errors import CounterError, PermanentTaskError
from kubemr_async.protocol import JobPhase, JobView, TaskState

from .test_local_run import ROOT, _failed_run_logs, kubemr, write_job
from .test_protocol import new_records, write

__all__ = ["_failed_run_logs"]  # autouse: failed runs keep their logs in tmp, not ~

DATA = ROOT / "examples" / "data"
COUNTING = "tests.jobs.counting"  # by module name, as a cluster names it

# --- ctx.counter --------------------------------------------------------------------


def test_increments_add_up_per_group_and_name() -> None:
    ctx = TaskContext(job="j", task="map-00000", attempt=1, partitions=1)
    ctx.counter("text", "lines")
    ctx.counter("text", "lines", 4)
    ctx.counter("text", "words", 0)
    ctx.counter("errors", "bad rows", -2)  # Hadoop allows negative increments
    ctx._counters.set_framework(counters.MAP_OUTPUT_RECORDS, 7)
    ctx._counters.set_framework(counters.MAP_INPUT_BYTES, 0)  # zero: left out
    assert ctx._counters.snapshot() == {
        "text": {"lines": 5, "words": 0}, "errors": {"bad rows": -2},
        FRAMEWORK_GROUP: {counters.MAP_OUTPUT_RECORDS: 7}}


@pytest.mark.parametrize(("group", "name", "n", "message"), [
    ("", "x", 1, "group must not be empty"),
    ("g", "", 1, "name must not be empty"),
    (None, "x", 1, "group must be a str, got NoneType"),
    ("g", b"x", 1, "name must be a str, got bytes"),
    ("g", "a\tb", 1, "name 'a\\\\tb' holds a control character"),
    ("g\n", "x", 1, "holds a control character"),
    ("g" * 101, "x", 1, "is 101 characters; the limit is 100"),
    ("g", "x", 1.0, "n must be an int, got float"),
    ("g", "x", True, "n must be an int, got bool"),
    ("g", "x", "3", "n must be an int, got str"),
    ("g", "x", 2**63, "does not fit in 64 bits"),
    (FRAMEWORK_GROUP, "mapInputBytes", 1, "group 'kubemr' is kubemr's own"),
])
def test_bad_calls_raise_one_clear_line(group: Any, name: Any, n: Any, message: str) -> None:
    ctx = TaskContext(job="j", task="map-00003", attempt=1, partitions=1)
    ctx.counter("ok", "x")  # a known group takes the same checks for a new name
    with pytest.raises(CounterError, match=message) as caught:
        ctx.counter(group, name, n)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith("ctx.counter: ")
    assert isinstance(caught.value, PermanentTaskError), "retrying cannot help"
    assert ctx._counters.snapshot() == {"ok": {"x": 1}}, "a refused call changes nothing"


def test_a_bad_amount_for_a_known_counter_is_refused_too() -> None:
    ctx = TaskContext(job="j", task="map-00003", attempt=1, partitions=1)
    ctx.counter("g", "x", 5)
    for bad in (1.5, False, None):
        with pytest.raises(CounterError, match="n must be an int"):
            ctx.counter("g", "x", bad)  # type: ignore[arg-type]
    ctx.counter("g", "x", 2**63 - 6)
    with pytest.raises(CounterError, match="beyond 64 bits"):
        ctx.counter("g", "x")
    assert ctx._counters.snapshot() == {"g": {"x": 2**63 - 1}}


def test_distinct_counters_per_task_are_capped_naming_the_limit() -> None:
    ctx = TaskContext(job="j", task="reduce-00001", attempt=1, partitions=1)
    for i in range(MAX_COUNTERS):
        ctx.counter("g", f"c{i}")
    ctx.counter("g", "c0", 10)  # existing counters still count
    with pytest.raises(CounterError) as caught:
        ctx.counter("g", "one more")
    assert str(caught.value) == (
        f"ctx.counter: too many counters in reduce-00001: g/one more would be number "
        f"{MAX_COUNTERS + 1}; the limit is {MAX_COUNTERS} distinct counters per task")
    assert len(ctx._counters.snapshot()["g"]) == MAX_COUNTERS


def test_long_names_are_capped_by_the_bytes_they_add_to_the_record() -> None:
    kept = TaskCounters("map-00000")
    with pytest.raises(CounterError, match=r"past 512 bytes of the task record"):
        for i in range(MAX_COUNTERS):
            kept.add(f"group-{i}-" + "g" * 80, f"name-{i}-" + "n" * 80)
    # Whatever was admitted, valued at its widest, stays within the budget.
    widest = {g: dict.fromkeys(names, -(2**63 - 1)) for g, names in kept.snapshot().items()}
    assert 0 < len(json.dumps(widest, separators=(",", ":"))) <= counters.MAX_COUNTER_BYTES


def test_totals_sum_groups_and_names_and_read_drops_junk() -> None:
    assert counters.total([{"a": {"x": 1}}, None, {"a": {"x": 2, "y": 1}, "b": {"z": 3}}]) == {
        "a": {"x": 3, "y": 1}, "b": {"z": 3}}
    assert counters.read({"a": {"x": 1, "bad": "2", "flag": True}, "b": 3}) == {"a": {"x": 1}}
    assert counters.read(None) == {}


# --- the protocol: only the committed attempt counts ---------------------------------


def test_commit_carries_counters_and_totals_sum_only_committed_attempts() -> None:
    records = new_records(maps=3)
    # map-00000: attempt 1 fails (its increments are never written), attempt 2 commits.
    held = write(records, protocol.claim(records["map-00000"], "w1", 0.0, 10.0, 3))
    assert held is not None
    assert write(records, protocol.fail(held, "w1", "boom", 3, now=0.0)) is not None
    held = write(records, protocol.claim(records["map-00000"], "w2", 1.0, 10.0, 3))
    assert held is not None and held["attempt"] == 2
    committed = write(records, protocol.commit(held, "w2", {}, {"g": {"x": 5}}, now=0.0))
    assert committed is not None and committed["counters"] == {"g": {"x": 5}}

    # map-00001: w1's lease runs out, w2 takes over; the zombie's commit loses the race.
    zombie = write(records, protocol.claim(records["map-00001"], "w1", 0.0, 10.0, 3))
    assert zombie is not None
    winner = write(records, protocol.claim(records["map-00001"], "w2", 20.0, 10.0, 3))
    assert winner is not None
    assert write(records, protocol.commit(zombie, "w1", {}, {"g": {"x": 1000}}, now=0.0)) is None
    assert write(records, protocol.commit(winner, "w2", {}, {"g": {"x": 7}}, now=0.0)) is not None

    # map-00002 still runs with counters nobody committed: they do not count yet.
    running = write(records, protocol.claim(records["map-00002"], "w3", 30.0, 10.0, 3))
    assert running is not None
    view = JobView(records)
    assert view.counters() == {"g": {"x": 12}}

    # A committed map that a reduce finds corrupt is re-opened: its counters stop counting
    # until the re-run commits, whose counters replace them.
    reopened = write(records, protocol.reopen(records["map-00000"], "corrupt", 3))
    assert reopened is not None and reopened["state"] == TaskState.PENDING
    assert JobView(records).counters() == {"g": {"x": 7}}
    held = write(records, protocol.claim(records["map-00000"], "w1", 40.0, 10.0, 3))
    assert held is not None
    assert write(records, protocol.commit(held, "w1", {}, {"g": {"y": 1}}, now=0.0)) is not None
    assert JobView(records).counters() == {"g": {"x": 7, "y": 1}}


def test_the_succeeded_verdict_stamps_the_totals() -> None:
    records = new_records(maps=2)
    for key, amount in (("map-00000", 1), ("map-00001", 2), ("reduce-00000", 10),
                        ("reduce-00001", 20)):
        if key.startswith("reduce"):
            assert JobView(records).verdict() is None
        held = write(records, protocol.claim(records[key], "w", 0.0, 10.0, 3))
        assert held is not None
        kind = "map" if key.startswith("map") else "reduce"
        assert write(records, protocol.commit(
            held, "w", {} if kind == "map" else f"s3://r/{key}",
            {"g": {kind: amount}, FRAMEWORK_GROUP: {"n": 1}}, now=0.0)) is not None
    verdict = JobView(records).verdict()
    assert verdict is not None
    job = write(records, verdict)
    assert job is not None and job["phase"] == JobPhase.SUCCEEDED
    assert job["counters"] == {"g": {"map": 3, "reduce": 30}, FRAMEWORK_GROUP: {"n": 4}}


# --- `kubemr run` ---------------------------------------------------------------------


def reference() -> dict[str, int]:
    """The counting job's counters computed by plain Python over the same files."""
    words: dict[str, int] = {}
    newlines = size = 0
    for path in sorted(DATA.iterdir()):
        data = path.read_bytes()
        size += len(data)
        text = data.decode("utf-8", "surrogateescape")
        newlines += text.count("\n")
        for line in text.split("\n"):
            for word in line.split():
                words[word] = words.get(word, 0) + 1
    return {"newlines": newlines, "words": sum(words.values()), "distinct": len(words),
            "seen once": sum(1 for n in words.values() if n == 1), "bytes": size}


def expected_totals() -> dict[str, dict[str, int]]:
    ref = reference()
    return {
        FRAMEWORK_GROUP: {"mapInputBytes": ref["bytes"], "mapOutputRecords": ref["words"],
                          "reduceInputGroups": ref["distinct"],
                          "reduceInputRecords": ref["words"],
                          "reduceOutputRecords": ref["distinct"]},
        "text": {"distinct": ref["distinct"], "newlines": ref["newlines"],
                 "seen once": ref["seen once"], "words": ref["words"]},
    }


@pytest.mark.parametrize("extra", [
    ["--workers", "2", "--reducers", "2", "--chunk-size", "16k"],
    ["--inline", "--reducers", "3"],
])
def test_run_totals_are_exact_though_first_attempts_fail(tmp_path: Path,
                                                         extra: list[str]) -> None:
    out = tmp_path / "out"
    failing = "map-00000,map-00002,reduce-00001"
    log = tmp_path / "failed-attempts.log"
    result = kubemr("run", COUNTING, "-i", str(DATA), "--output", str(out),
                    "--arg", f"fail={failing}", "--arg", f"log={log}", *extra)
    assert result.returncode == 0, result.stderr
    # The failures happened: each chosen task's first attempt incremented, then raised.
    failed = sorted(line.split()[0] for line in log.read_text().splitlines())
    assert failed == sorted(failing.split(","))
    expected = expected_totals()
    manifest = json.loads((out / "_SUCCESS").read_text())
    assert manifest["counters"] == expected
    # The summary on stderr: Hadoop's layout, the same numbers.
    lines = result.stderr.splitlines()
    start = lines.index("Counters:")
    shown = lines[start + 1:start + 1 + sum(1 + len(n) for n in expected.values())]
    assert shown == counters.lines(expected)
    assert re.search(r"^job counting-\S+ succeeded in [\d.]+s: \d+ result files$",
                     result.stderr, re.M)


COUNTER_JOB = """
from kubemr_async import Job
job = Job("badcounter")

@job.map
async def m(text, ctx):
    {call}
    yield "k", 1

job.reduce("sum")
"""


@pytest.mark.parametrize(("call", "message"), [
    ('ctx.counter("", "lines")', "CounterError: ctx.counter: group must not be empty"),
    ('ctx.counter("g", "lines", 0.5)', "CounterError: ctx.counter: n must be an int, got float"),
    ('[ctx.counter("g", f"c{i}") for i in range(50)]',
     "CounterError: ctx.counter: too many counters in map-00000: g/c16 would be number 17; "
     "the limit is 16 distinct counters per task"),
])
def test_bad_counter_calls_fail_the_job_at_once_with_one_line(tmp_path: Path, call: str,
                                                              message: str) -> None:
    data = tmp_path / "in.txt"
    data.write_text("x\n")
    job = write_job(tmp_path, COUNTER_JOB.format(call=call))
    result = kubemr("run", str(job), "-i", str(data), "--output", str(tmp_path / "out"),
                    "--workers", "1", "--max-attempts", "5")
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("kubemr: error: job badcounter-"), error
    assert "task map-00000 attempt 1: " in error, "permanent: not retried"
    assert message in error
    assert "Traceback" not in result.stderr


KUBEMR = str(Path(sys.executable).parent / "kubemr")


def test_the_line_stats_example_counts_exactly(tmp_path: Path) -> None:
    # The plain-Python reference reads lines as input="lines" does: split at LF, a CR
    # before it dropped, a last line without LF still a line.
    data_dir = Path(__file__).resolve().parent.parent / "examples" / "data"
    lines: list[bytes] = []
    for path in sorted(data_dir.iterdir()):
        data = path.read_bytes()
        pieces = data.split(b"\n")
        if data.endswith(b"\n"):
            pieces.pop()
        lines += [p[:-1] if p.endswith(b"\r") else p for p in pieces]

    def utf8(line: bytes) -> bool:
        try:
            line.decode()
        except UnicodeDecodeError:
            return False
        return True

    result = subprocess.run(
        [KUBEMR, "run", str(data_dir.parent / "line_stats.py"), "--input", str(data_dir),
         "--output", str(tmp_path / "out"), "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    assert manifest["counters"]["lines"] == {
        "blank": sum(not line.split() for line in lines),
        "bytes": sum(len(line) + 1 for line in lines),
        "not utf-8": sum(not utf8(line) for line in lines)}
    got = dict(line.split("\t") for line in
               (tmp_path / "out" / "part-00000").read_text().splitlines())
    expected = Counter(len(line.split()) for line in lines if line.split())
    assert {int(k): int(v) for k, v in got.items()} == expected
