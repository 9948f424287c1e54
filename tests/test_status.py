"""`kubemr status` as a person reads it: rates and ETA per stage, running tasks with their
age and worker, failures with their reasons, counters so far. Pure rendering here, from
records the protocol wrote; tests/test_cli.py runs it against the real API server."""

from __future__ import annotations

from typing import Any

from kubemr_async import cli_render, protocol
from kubemr_async.patch import apply_patch
from kubemr_async.records import TaskRecord
from kubemr_async.spec import JobSpec

SPEC = JobSpec(name="wc", job="wc.py", inputs=("a",), reducers=2, max_attempts=3)
T0 = 1_800_000_000.0


def job_object(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "wc", "namespace": "team"}, "spec": {"reducers": 2},
            "status": {"phase": "Running", "maps": 4, "mapsDone": 2, "reduces": 2,
                       "reducesDone": 0, **status}}


def records() -> dict[str, TaskRecord]:
    tasks: dict[str, Any] = dict(protocol.plan(SPEC, [(f"in-{i}", None) for i in range(4)]))

    def write(update: protocol.Update) -> TaskRecord:
        tasks[update.key] = apply_patch(tasks[update.key], update.ops)
        body: TaskRecord = tasks[update.key]
        return body

    for i in (0, 1):  # two maps committed 10 s in
        held = write(protocol.claim(tasks[f"map-0000{i}"], f"w{i}", T0, 30, 3))
        write(protocol.commit(held, f"w{i}", {}, {"kubemr": {"mapOutputRecords": 5}},
                              now=T0 + 10))
    held = write(protocol.claim(tasks["map-00002"], "w0", T0 + 10, 30, 3))
    held = write(protocol.fail(held, "w0", "ValueError: bad\nrecord  in line 7", 3,
                               now=T0 + 12))
    write(protocol.claim(held, "pod-abc", T0 + 13, 30, 3))
    write(protocol.claim(tasks["map-00003"], "w1", T0 + 19, 30, 3))
    return tasks


def test_status_shows_rates_eta_running_tasks_failures_and_counters_so_far() -> None:
    text = cli_render.describe(job_object(), list(records().values()), now=T0 + 20)
    lines = text.splitlines()
    # 2 maps done in the 20 s since the first started: 0.1/s, 2 to go: 20 s.
    assert "Maps:       2/4   2 running   0.10/s   ETA 20s" in lines
    assert "Reduces:    0/2" in lines
    start = lines.index("Running tasks:")
    assert [line.split() for line in lines[start + 1:start + 4]] == [
        ["TASK", "ATTEMPT", "WORKER", "AGE", "INPUT"],
        ["map-00002", "2", "pod-abc", "7s", "in-2"], ["map-00003", "1", "w1", "1s", "in-3"]]
    start = lines.index("Failures:")
    assert lines[start + 1].split() == ["TASK", "STATE", "FAILED", "LAST", "ERROR"]
    assert lines[start + 2].split(None, 3) == ["map-00002", "running", "1",
                                               "ValueError: bad record in line 7"]
    assert lines[-3:] == ["Counters:", "  kubemr", "    mapOutputRecords=10"]


def test_a_finished_stage_says_how_long_it_took_and_a_job_without_records_is_unchanged(
        ) -> None:
    tasks = records()
    done = [t for k, t in tasks.items() if k in ("map-00000", "map-00001")]
    obj = job_object(maps=2, mapsDone=2)
    assert "Maps:       2/2   took 10s" in cli_render.describe(obj, done, now=T0 + 99)
    plain = cli_render.describe(obj)
    assert "Maps:       2/2" in plain.splitlines()
    assert "Running tasks:" not in plain and "Failures:" not in plain


def test_long_lists_are_cut_and_errors_stay_on_one_line() -> None:
    spec = JobSpec(name="big", job="b.py", inputs=("a",), reducers=0)
    tasks: list[Any] = []
    for key, body in protocol.plan(spec, [(f"in-{i}", None) for i in range(25)]):
        held = apply_patch(body, protocol.claim(body, "w", T0, 30, 3).ops)
        tasks.append(apply_patch(held, protocol.fail(held, "w", "x" * 500 + "\nboom", 1,
                                                     now=T0 + 1).ops))
        assert key
    lines = cli_render.describe(job_object(maps=25, mapsDone=0), tasks, now=T0 + 2).splitlines()
    start = lines.index("Failures:")
    assert lines[start + 2 + cli_render.STATUS_ROWS] == "  ... and 15 more"
    assert all(len(line) < 200 for line in lines)
