"""The task state machine, exercised as pure code (no store, no I/O).

An in-memory dict with :func:`apply_patch` stands in for a store here only because the
protocol is pure; the real stores are covered by the contract suite and the race tests.
"""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubemr_async import protocol
from kubemr_async.patch import PatchTestFailed, apply_patch
from kubemr_async.protocol import JobPhase, JobView, TaskKind, TaskState
from kubemr_async.spec import JobSpec

SPEC = JobSpec(name="wc", job="wc.py", inputs=("a",), reducers=2, max_attempts=3,
               lease_seconds=10.0)


def new_records(maps: int = 3) -> dict[str, dict[str, Any]]:
    records = {protocol.JOB_KEY: protocol.new_job(SPEC)}
    records.update(protocol.plan(SPEC, [(f"in-{i}", (0, 10)) for i in range(maps)]))
    upd = protocol.start_job(records[protocol.JOB_KEY], maps)
    records[protocol.JOB_KEY] = apply_patch(records[protocol.JOB_KEY], upd.ops)
    return records


def write(records: dict[str, dict[str, Any]], update: protocol.Update) -> dict[str, Any] | None:
    try:
        records[update.key] = apply_patch(records[update.key], update.ops)
    except PatchTestFailed:
        return None
    return records[update.key]


def test_plan_creates_maps_then_reduces_and_job_waits_for_start() -> None:
    records = dict(protocol.plan(SPEC, [("x", (0, 5)), ("y", None)]))
    assert list(records) == ["map-00000", "map-00001", "reduce-00000", "reduce-00001"]
    assert records["map-00001"]["range"] is None
    pending_job = {protocol.JOB_KEY: protocol.new_job(SPEC), **records}
    assert JobView(pending_job).claimable(0.0) == [], "a Pending job offers no work"


def test_only_one_of_two_claims_on_the_same_read_wins() -> None:
    records = new_records()
    body = records["map-00000"]
    first = write(records, protocol.claim(body, "w1", 0.0, 10.0, 3))
    second = write(records, protocol.claim(body, "w2", 0.0, 10.0, 3))
    assert first is not None and first["worker"] == "w1" and first["attempt"] == 1
    assert second is None
    with pytest.raises(ValueError, match="held by w1"):
        protocol.claim(records["map-00000"], "w2", 5.0, 10.0, 3)


def test_reduces_become_claimable_only_after_every_map_commits() -> None:
    records = new_records(maps=2)
    for i in range(2):
        view = JobView(records)
        assert all(t["kind"] == TaskKind.MAP for t in view.claimable(0.0))
        body = write(records, protocol.claim(records[protocol.map_key(i)], "w", 0.0, 10, 3))
        assert body is not None
        assert write(records, protocol.commit(body, "w", {"0": f"run-{i}"}, now=0.0)) is not None
    view = JobView(records)
    assert [t["kind"] for t in view.claimable(0.0)] == ["reduce", "reduce"]
    assert view.map_outputs(0) == [(records["map-00000"], "run-0"),
                                   (records["map-00001"], "run-1")]
    assert view.map_outputs(1) == []


def test_maps_record_their_key_type_and_clashes_name_both_maps() -> None:
    records = new_records(maps=3)
    types = {0: "str", 1: None, 2: "int"}
    for i, key_type in types.items():
        body = write(records, protocol.claim(records[protocol.map_key(i)], "w", 0.0, 10, 3))
        assert body is not None
        view = JobView(records)
        if i == 2:
            # What a map checks before committing: the committed maps it can see.
            assert view.key_type_clash("map-00002", "int") == (
                "map-00002 emitted keys of type int but map-00000 emitted str; "
                "a job's keys must share one type")
            assert view.key_type_clash("map-00002", "str") is None
        outputs = {"0": f"run-{i}"} | ({protocol.KEY_TYPE: key_type} if key_type else {})
        # Two maps committing at one instant both pass that check; the reduce sees it.
        assert write(records, protocol.commit(body, "w", outputs, now=0.0)) is not None
    view = JobView(records)
    assert [run for _, run in view.map_outputs(0)] == ["run-0", "run-1", "run-2"], \
        "the key type is no partition"
    assert view.key_type_clash() == (
        "map-00002 emitted keys of type int but map-00000 emitted str; "
        "a job's keys must share one type")


def test_expired_lease_is_taken_over_as_a_counted_failure() -> None:
    records = new_records()
    held = write(records, protocol.claim(records["map-00000"], "w1", 0.0, 10.0, 3))
    assert held is not None
    assert JobView(records).claimable(5.0) == [records["map-00001"], records["map-00002"]]
    assert records["map-00000"] in JobView(records).claimable(10.5)
    taken = write(records, protocol.claim(held, "w2", 10.5, 10.0, 3))
    assert taken is not None
    assert (taken["worker"], taken["attempt"], taken["failures"]) == ("w2", 2, 1)
    assert "w1 stopped renewing" in taken["error"]
    # The zombie can neither renew nor commit any more.
    assert write(records, protocol.renew(held, "w1", 11.0, 10.0)) is None
    assert write(records, protocol.commit(held, "w1", {"0": "zombie"}, now=0.0)) is None
    assert records["map-00000"]["outputs"] is None


def test_renew_extends_the_lease_and_keeps_the_holder() -> None:
    records = new_records()
    held = write(records, protocol.claim(records["map-00000"], "w1", 0.0, 10.0, 3))
    assert held is not None
    renewed = write(records, protocol.renew(held, "w1", 8.0, 10.0))
    assert renewed is not None and renewed["leaseExpires"] == 18.0
    assert records["map-00000"] not in JobView(records).claimable(12.0)


def test_failures_retry_until_max_attempts_then_fail_the_job() -> None:
    records = new_records()
    for attempt in range(1, 4):
        body = write(records, protocol.claim(records["map-00001"], "w", 0.0, 10.0, 3))
        assert body is not None and body["attempt"] == attempt
        failed = write(records, protocol.fail(body, "w", f"boom {attempt}", 3, now=0.0))
        assert failed is not None
        expected = TaskState.FAILED if attempt == 3 else TaskState.PENDING
        assert failed["state"] == expected
    verdict = JobView(records).verdict()
    assert verdict is not None
    job = write(records, verdict)
    assert job is not None and job["phase"] == JobPhase.FAILED
    assert job["error"] == {"task": "map-00001", "attempt": 3, "message": "boom 3"}
    assert protocol.format_error(job["error"]) == "task map-00001 attempt 3: boom 3"


def test_permanent_failure_skips_remaining_attempts() -> None:
    records = new_records()
    body = write(records, protocol.claim(records["map-00000"], "w", 0.0, 10.0, 3))
    assert body is not None
    failed = write(records, protocol.fail(body, "w", "bad key", 3, permanent=True, now=0.0))
    assert failed is not None and failed["state"] == TaskState.FAILED


def test_lease_expiry_on_the_last_attempt_fails_the_task() -> None:
    records = new_records()
    spec_max = 1
    held = write(records, protocol.claim(records["map-00000"], "w1", 0.0, 10.0, spec_max))
    assert held is not None
    out = write(records, protocol.claim(held, "w2", 11.0, 10.0, spec_max))
    assert out is not None and out["state"] == TaskState.FAILED and out["worker"] == ""


def test_release_returns_the_task_without_counting_a_failure() -> None:
    records = new_records()
    held = write(records, protocol.claim(records["map-00000"], "w1", 0.0, 10.0, 3))
    assert held is not None
    released = write(records, protocol.release(held, "w1", now=0.0))
    assert released is not None
    assert (released["state"], released["failures"], released["attempt"]) == ("pending", 0, 1)
    again = write(records, protocol.claim(released, "w2", 1.0, 10.0, 3))
    assert again is not None and again["attempt"] == 2, "attempt numbers are never reused"


def commit_maps(records: dict[str, dict[str, Any]], maps: int) -> None:
    for i in range(maps):
        body = write(records, protocol.claim(records[protocol.map_key(i)], "w", 0.0, 10, 3))
        assert body is not None
        assert write(records, protocol.commit(body, "w", {"0": f"run-{i}-{body['attempt']}"},
                now=0.0))


def test_a_corrupt_run_reopens_its_map_and_the_reduce_waits_for_the_new_run() -> None:
    records = new_records(maps=2)
    commit_maps(records, 2)
    reduce = write(records, protocol.claim(records["reduce-00000"], "r", 0.0, 10, 3))
    assert reduce is not None
    writer, run = JobView(records).map_outputs(0)[1]
    assert run == "run-1-1"
    # Two reduces found the same run corrupt: only the first re-opens the map.
    reopen = protocol.reopen(writer, "reduce-00000 read a corrupt run run-1-1: bad crc", 3)
    reopened = write(records, reopen)
    assert write(records, reopen) is None
    assert reopened is not None
    assert (reopened["state"], reopened["outputs"], reopened["failures"]) == ("pending", None, 1)
    assert write(records, protocol.release(reduce, "r", now=0.0)) is not None
    assert records["reduce-00000"]["failures"] == 0, "the reduce did nothing wrong"
    view = JobView(records)
    assert [protocol.task_name(t) for t in view.claimable(1.0)] == ["map-00001"], \
        "no reduce may start before the map has written a new run"
    rerun = write(records, protocol.claim(records["map-00001"], "w", 1.0, 10, 3))
    assert rerun is not None and rerun["attempt"] == 2, "a new attempt: new keys"
    assert write(records, protocol.commit(rerun, "w", {"0": "run-1-2"}, now=0.0)) is not None
    view = JobView(records)
    assert [run for _, run in view.map_outputs(0)] == ["run-0-1", "run-1-2"]
    assert {t["kind"] for t in view.claimable(2.0)} == {"reduce"}
    with pytest.raises(ValueError, match="only a committed map can be re-opened"):
        protocol.reopen(records["reduce-00000"], "x", 3)


def test_a_map_whose_runs_keep_arriving_corrupt_fails_the_job_naming_it() -> None:
    records = new_records(maps=1)
    for attempt in range(1, 4):
        commit_maps(records, 1)
        out = write(records, protocol.reopen(records["map-00000"], f"corrupt {attempt}", 3))
        assert out is not None
        assert out["state"] == (TaskState.FAILED if attempt == 3 else TaskState.PENDING)
    verdict = JobView(records).verdict()
    assert verdict is not None
    job = write(records, verdict)
    assert job is not None and job["phase"] == JobPhase.FAILED
    assert protocol.format_error(job["error"]) == "task map-00000 attempt 3: corrupt 3"


def test_success_verdict_orders_results_by_partition_and_is_idempotent() -> None:
    records = new_records(maps=1)
    for key in ["map-00000", "reduce-00001", "reduce-00000"]:
        body = write(records, protocol.claim(records[key], "w", 0.0, 10.0, 3))
        assert body is not None
        assert write(records, protocol.commit(body, "w", f"out-{key}", now=0.0)) is not None
    view = JobView(records)
    verdict = view.verdict()
    assert verdict is not None
    job = write(records, verdict)
    assert job is not None and job["phase"] == JobPhase.SUCCEEDED
    assert job["results"] == ["out-reduce-00000", "out-reduce-00001"]
    assert write(records, verdict) is None, "a second stamp of the same verdict loses"
    assert JobView(records).verdict() is None


def test_write_size_does_not_grow_with_the_number_of_tasks() -> None:
    sizes = []
    for maps in (10, 1000):
        records = new_records(maps=maps)
        body = records[protocol.map_key(5)]  # the same task in a small and a large job
        claim = protocol.claim(body, "worker-abc", 0.0, 10.0, 3)
        held = write(records, claim)
        assert held is not None
        commit = protocol.commit(held, "worker-abc", {"0": "x/map/00009/attempt-1/part-00000"},
                now=0.0)
        sizes.append((len(orjson.dumps(claim.ops)), len(orjson.dumps(commit.ops)),
                      len(orjson.dumps(records[commit.key]))))
    assert sizes[0] == sizes[1]


# --- randomized interleavings: many workers, one store, arbitrary schedules --------------

ACTIONS = st.lists(st.tuples(st.integers(0, 3), st.sampled_from(
    ["claim", "renew", "commit", "fail", "release", "tick"])), max_size=200)


@settings(max_examples=300, deadline=None)
@given(ACTIONS)
def test_any_schedule_commits_each_task_at_most_once_with_the_winners_output(
        schedule: list[tuple[int, str]]) -> None:
    records = new_records(maps=3)
    now = 0.0
    held: dict[int, dict[str, Any]] = {}  # worker -> the body it believes it holds
    commits: dict[str, str] = {}
    for worker_no, action in schedule:
        worker = f"w{worker_no}"
        if action == "tick":
            now += 4.0
            continue
        if action == "claim" and worker_no not in held:
            options = JobView(records).claimable(now)
            if options:
                body = options[worker_no % len(options)]
                won = write(records, protocol.claim(body, worker, now, 10.0, 3))
                if won is not None and won["state"] == TaskState.RUNNING:
                    held[worker_no] = won
            continue
        body = held.get(worker_no)
        if body is None:
            continue
        key = protocol.task_name(body)
        if action == "renew":
            renewed = write(records, protocol.renew(body, worker, now, 10.0))
            if renewed is None:
                del held[worker_no]
            else:
                held[worker_no] = renewed
        elif action == "commit":
            output = f"{key}@attempt-{body['attempt']}"
            if write(records, protocol.commit(body, worker, output, now=0.0)) is not None:
                assert key not in commits, f"{key} committed twice"
                commits[key] = output
            del held[worker_no]
        elif action == "fail":
            write(records, protocol.fail(body, worker, "boom", 3, now=0.0))
            del held[worker_no]
        elif action == "release":
            write(records, protocol.release(body, worker, now=0.0))
            del held[worker_no]
    for key, output in commits.items():
        final = records[key]
        assert final["state"] == TaskState.COMMITTED
        assert final["outputs"] == output == f"{key}@attempt-{final['attempt']}"
        assert final["failures"] < 3
    for body in records.values():
        if body.get("kind") and body["state"] == TaskState.FAILED:
            assert body["failures"] >= 3


def test_abort_stamps_a_reason_no_task_owns_and_only_once() -> None:
    records = new_records()
    update = protocol.abort(records[protocol.JOB_KEY], JobPhase.FAILED, "image cannot be pulled")
    job = write(records, update)
    assert job is not None and job["phase"] == JobPhase.FAILED
    assert protocol.format_error(job["error"]) == "image cannot be pulled"
    assert write(records, update) is None
    assert JobView(records).claimable(0.0) == [] and JobView(records).verdict() is None


def test_retry_reruns_failed_and_unfinished_tasks_and_keeps_committed_ones() -> None:
    records = new_records(maps=3)
    done = write(records, protocol.claim(records["map-00000"], "w", 0.0, 10.0, 3))
    assert done is not None
    assert write(records, protocol.commit(done, "w", {"0": "kept"}, now=0.0)) is not None
    write(records, protocol.claim(records["map-00002"], "w2", 0.0, 10.0, 3))  # left running
    for _ in range(3):
        body = write(records, protocol.claim(records["map-00001"], "w", 0.0, 10.0, 3))
        assert body is not None
        write(records, protocol.fail(body, "w", "bad input", 3, now=0.0))
    verdict = JobView(records).verdict()
    assert verdict is not None and write(records, verdict) is not None
    with pytest.raises(ValueError, match="Running"):
        protocol.retry(JobView(new_records()))
    updates = protocol.retry(JobView(records))
    assert [u.key for u in updates] == ["map-00001", "map-00002", protocol.JOB_KEY]
    for update in updates:
        assert write(records, update) is not None
    view = JobView(records)
    assert view.phase == JobPhase.RUNNING and view.job is not None
    assert view.job["error"] is None
    assert records["map-00000"]["outputs"] == {"0": "kept"}
    assert records["map-00001"]["failures"] == 0 and records["map-00001"]["attempt"] == 3
    assert {t["index"] for t in view.claimable(0.0)} == {1, 2}
    again = write(records, protocol.claim(records["map-00001"], "w3", 0.0, 10.0, 3))
    assert again is not None and again["attempt"] == 4, "attempt numbers keep counting"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.sampled_from(list(TaskState)),
                          st.floats(0, 20)), max_size=60))
def test_incremental_view_matches_a_view_built_from_scratch(
        changes: list[tuple[int, TaskState, float]]) -> None:
    import random

    records = new_records(maps=3)
    incremental = JobView(records)
    keys = [k for k in records if k != protocol.JOB_KEY]
    for n, (which, state, lease) in enumerate(changes):
        key = keys[which % len(keys)]
        body = {**records[key], "state": state.value, "leaseExpires": lease, "seq": n + 1}
        records[key] = body
        incremental.update(key, body)
    fresh = JobView(records)
    assert incremental.progress() == fresh.progress()
    for now in (0.0, 10.0, 25.0):
        assert incremental.claimable(now) == fresh.claimable(now)
        picked = incremental.candidates(now, 2, random.Random(1))
        assert all(t in fresh.claimable(now) for t in picked)
        assert len(picked) >= min(2, len(fresh.claimable(now)))
    assert incremental.next_lease_expiry() == fresh.next_lease_expiry()
    assert incremental.verdict() == fresh.verdict()


def test_map_only_job_succeeds_with_map_outputs_in_map_order() -> None:
    spec = JobSpec(name="mo", job="mo.py", inputs=("a",), reducers=0)
    records = {protocol.JOB_KEY: protocol.new_job(spec)}
    records.update(protocol.plan(spec, [(f"in-{i}", (0, 10)) for i in range(3)]))
    assert not any(key.startswith("reduce-") for key in records)
    started = protocol.start_job(records[protocol.JOB_KEY], 3)
    records[protocol.JOB_KEY] = apply_patch(records[protocol.JOB_KEY], started.ops)
    for key in ["map-00002", "map-00000"]:
        body = write(records, protocol.claim(records[key], "w", 0.0, 10.0, 3))
        assert body is not None and write(records, protocol.commit(body, "w", f"out-{key}",
                now=0.0))
    assert JobView(records).verdict() is None, "one map is still pending"
    assert JobView(records).results() is None, "no results (and no manifest) before then"
    body = write(records, protocol.claim(records["map-00001"], "w", 0.0, 10.0, 3))
    assert body is not None and write(records, protocol.commit(body, "w", "out-map-00001", now=0.0))
    view = JobView(records)
    assert view.claimable(0.0) == []
    verdict = view.verdict()
    assert verdict is not None
    job = write(records, verdict)
    assert job is not None and job["phase"] == JobPhase.SUCCEEDED
    assert job["results"] == ["out-map-00000", "out-map-00001", "out-map-00002"]


def _bytes(value: object) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


@pytest.mark.parametrize("key_type", ["str", None])
def test_a_map_writes_the_same_bytes_at_one_reducer_and_at_a_thousand(
        key_type: str | None) -> None:
    """Claim, renewal and commit of a key/value map are the same bytes whatever R is."""
    def lifecycle(reducers: int) -> list[bytes]:
        spec = JobSpec(name="wc", job="wc.py", inputs=("a",), reducers=reducers)
        records: dict[str, Any] = {protocol.JOB_KEY: protocol.new_job(spec)}
        records.update(protocol.plan(spec, [("in-0", (0, 10))]))
        body = records["map-00000"]
        written = []
        for update in (lambda b: protocol.claim(b, "w1", 0.0, 10.0, 3),
                       lambda b: protocol.renew(b, "w1", 3.0, 10.0),
                       lambda b: protocol.commit(b, "w1", protocol.shuffle_outputs(
                           "wc/map/00000/attempt-1.shuffle", 123_456, key_type), now=0.0)):
            step = update(body)
            body = write(records, step)
            assert body is not None
            written += [_bytes(step.ops), _bytes(body)]
        view = JobView(records)
        assert view.shuffle_objects() == [(body, "wc/map/00000/attempt-1.shuffle", 123_456)]
        return written

    one, thousand = lifecycle(1), lifecycle(1000)
    assert one == thousand
    assert max(map(len, one)) < 2048


def test_a_map_that_emitted_nothing_has_no_shuffle_object() -> None:
    records = new_records(maps=1)
    body = write(records, protocol.claim(records["map-00000"], "w", 0.0, 10, 3))
    assert body is not None
    assert write(records, protocol.commit(body, "w", protocol.shuffle_outputs(None, 0, None),
            now=0.0))
    assert JobView(records).shuffle_objects() == []


# --- a multi-step job as one record set (a MapReduceJob) -----------------------------------

STEPS = JobSpec(name="three", job="three.py", inputs=("a",), reducers=2, steps=3,
                step_reducers=(2, 3, 1))


def commit_all(records: dict[str, dict[str, Any]], step: int) -> None:
    """Claim and commit every task of ``step`` (maps first), as workers would."""
    for kind in (TaskKind.MAP, TaskKind.REDUCE):
        view = JobView(records)
        assert view.step == step
        for body in view.claimable(0.0):
            assert body["kind"] == kind and body.get("step", 0) == step
            claimed = write(records, protocol.claim(body, "w", 0.0, 10.0, 3))
            assert claimed is not None
            outputs = (protocol.shuffle_outputs(None, 0, None) if kind == TaskKind.MAP
                       else f"s3://b/three/s{step + 1}/output/part-{body['index']:05d}.parquet")
            assert write(records, protocol.commit(claimed, "w", outputs, now=0.0)) is not None


def three_step_records() -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {
        protocol.JOB_KEY: protocol.new_job(STEPS, every_step=True)}
    records.update(protocol.plan(STEPS, [("in-0", (0, 10)), ("in-1", (10, 20))]))
    records[protocol.JOB_KEY] = apply_patch(records[protocol.JOB_KEY],
                                            protocol.start_job(records[protocol.JOB_KEY], 2).ops)
    return records


def test_the_next_step_is_planned_over_the_parts_with_its_own_keys_and_reducers() -> None:
    records = three_step_records()
    assert records[protocol.JOB_KEY]["step"] == 0
    assert "map-00000" in records and "step" not in records["map-00000"], "step 1 unchanged"
    commit_all(records, 0)
    view = JobView(records)
    parts = view.step_results()
    assert parts == ["s3://b/three/s1/output/part-00000.parquet",
                     "s3://b/three/s1/output/part-00001.parquet"]
    assert view.verdict() is None, "an earlier step's end is no verdict"
    planned = dict(protocol.plan(STEPS.at_step(1), [(p, None) for p in parts]))
    assert list(planned) == ["s2-map-00000", "s2-map-00001", "s2-reduce-00000",
                             "s2-reduce-00001", "s2-reduce-00002"]
    assert {body["step"] for body in planned.values()} == {1}
    records.update(planned)
    # Created but not yet current: no worker may claim them.
    assert JobView(records).claimable(0.0) == []
    assert write(records, protocol.advance(JobView(records).job, 2)) is not None
    view = JobView(records)
    assert (view.step, view.map_total, view.reduce_total) == (1, 2, 3)
    assert [protocol.task_name(t) for t in view.claimable(0.0)] == ["s2-map-00000",
                                                                    "s2-map-00001"]
    assert view.step_results() is None and view.progress().maps_done == 0


def test_a_second_advance_from_the_same_step_is_refused() -> None:
    records = three_step_records()
    commit_all(records, 0)
    seen = JobView(records).job  # two reconciles read the same job record
    assert seen is not None
    first = write(records, protocol.advance(seen, 4))
    assert first is not None and first["step"] == 1
    assert write(records, protocol.advance(seen, 4)) is None, "the test on the old step fails"
    # Even with a fresh seq, the step test alone refuses a stale advance.
    stale = {**seen, "seq": records[protocol.JOB_KEY]["seq"]}
    assert write(records, protocol.advance(stale, 4)) is None  # type: ignore[arg-type]
    assert records[protocol.JOB_KEY]["step"] == 1 and records[protocol.JOB_KEY]["maps"] == 4


def test_the_last_step_stamps_the_verdict_and_there_is_no_step_after_it() -> None:
    records = three_step_records()
    for step in range(3):
        commit_all(records, step)
        view = JobView(records)
        if step < 2:
            parts = view.step_results()
            assert parts is not None
            records.update(protocol.plan(STEPS.at_step(step + 1), [(p, None) for p in parts]))
            assert view.job is not None
            assert write(records, protocol.advance(view.job, len(parts))) is not None
    view = JobView(records)
    with pytest.raises(ValueError, match="step 3 is the job's last"):
        protocol.advance(view.job, 1)  # type: ignore[arg-type]
    verdict = view.verdict()
    assert verdict is not None and view.step_results() is None
    job = write(records, verdict)
    assert job is not None and job["phase"] == "Succeeded"
    assert job["results"] == ["s3://b/three/s3/output/part-00000.parquet"]


def test_retry_of_a_failed_later_step_keeps_every_earlier_step() -> None:
    records = three_step_records()
    commit_all(records, 0)
    view = JobView(records)
    parts = view.step_results()
    assert parts is not None and view.job is not None
    records.update(protocol.plan(STEPS.at_step(1), [(p, None) for p in parts]))
    write(records, protocol.advance(view.job, len(parts)))
    body = JobView(records).claimable(0.0)[0]
    claimed = write(records, protocol.claim(body, "w", 0.0, 10.0, 3))
    assert claimed is not None
    write(records, protocol.fail(claimed, "w", "PermanentTaskError: no", 3, permanent=True,
            now=0.0))
    view = JobView(records)
    verdict = view.verdict()
    assert verdict is not None
    job = write(records, verdict)
    assert job is not None and job["phase"] == "Failed"
    assert job["error"]["task"] == "s2-map-00000", "the failed task names its step"
    before = {k: v["seq"] for k, v in records.items() if not k.startswith("s2-")}
    updates = protocol.retry(JobView(records))
    assert [u.key for u in updates] == ["s2-map-00000", protocol.JOB_KEY]
    for update in updates:
        assert write(records, update) is not None
    view = JobView(records)
    assert (view.phase, view.step) == (JobPhase.RUNNING, 1)
    assert {k: records[k]["seq"] for k in before if k != protocol.JOB_KEY} == {
        k: s for k, s in before.items() if k != protocol.JOB_KEY}
    assert [protocol.task_name(t) for t in view.claimable(0.0)] == ["s2-map-00000",
                                                                    "s2-map-00001"]


def test_a_record_set_of_one_step_is_decided_by_that_step() -> None:
    """`kubemr run` gives each step its own record set: its end is its verdict."""
    spec = STEPS.at_step(1)
    records: dict[str, dict[str, Any]] = {protocol.JOB_KEY: protocol.new_job(spec)}
    records.update(protocol.plan(spec, [("part-0", None)]))
    records[protocol.JOB_KEY] = apply_patch(records[protocol.JOB_KEY],
                                            protocol.start_job(records[protocol.JOB_KEY], 1).ops)
    assert "step" not in records[protocol.JOB_KEY]
    commit_all(records, 1)
    view = JobView(records)
    assert view.step_results() is None
    verdict = view.verdict()
    assert verdict is not None
    job = write(records, verdict)
    assert job is not None and job["phase"] == "Succeeded"


# --- attempt history -----------------------------------------------------------------


def test_history_records_each_attempt_with_its_worker_times_and_outcome() -> None:
    records = new_records()
    held = write(records, protocol.claim(records["map-00000"], "w1", 100.0, 10.0, 5))
    assert held is not None
    assert held["history"] == [{"attempt": 1, "worker": "w1", "start": 100_000}]
    held = write(records, protocol.fail(held, "w1", "boom", 5, now=101.5))
    assert held is not None
    held = write(records, protocol.claim(held, "w2", 102.0, 10.0, 5))
    assert held is not None
    held = write(records, protocol.release(held, "w2", now=103.0))
    assert held is not None
    held = write(records, protocol.claim(held, "w3", 104.0, 10.0, 5))
    assert held is not None
    # w3 stops renewing: w4 takes over; the lost attempt ends on w4's clock.
    held = write(records, protocol.claim(held, "w4", 120.0, 10.0, 5, lapsed=True))
    assert held is not None
    held = write(records, protocol.commit(held, "w4", {}, {"g": {"n": 1}}, now=125.25))
    assert held is not None
    assert held["history"] == [
        {"attempt": 1, "worker": "w1", "start": 100_000, "end": 101_500, "outcome": "failed"},
        {"attempt": 2, "worker": "w2", "start": 102_000, "end": 103_000,
         "outcome": "released"},
        {"attempt": 3, "worker": "w3", "start": 104_000, "end": 120_000,
         "outcome": "leaseLost"},
        {"attempt": 4, "worker": "w4", "start": 120_000, "end": 125_250,
         "outcome": "committed"},
    ]


def test_a_zombie_cannot_rewrite_the_history_and_renewals_leave_it_alone() -> None:
    records = new_records()
    held = write(records, protocol.claim(records["map-00000"], "w1", 0.0, 10.0, 3))
    assert held is not None
    renewed = write(records, protocol.renew(held, "w1", 3.0, 10.0))
    assert renewed is not None and renewed["history"] == held["history"]
    assert not any(op["path"] == "/history"
                   for op in protocol.renew(held, "w1", 3.0, 10.0).ops)
    taken = write(records, protocol.claim(renewed, "w2", 30.0, 10.0, 3, lapsed=True))
    assert taken is not None
    assert write(records, protocol.commit(renewed, "w1", {}, now=31.0)) is None
    assert [a.get("outcome") for a in records["map-00000"]["history"]] == ["leaseLost", None]


def test_history_is_bounded_by_count_and_by_what_counters_and_skips_leave() -> None:
    records = new_records()
    body: dict[str, Any] | None = records["map-00000"]
    for i in range(3 * protocol.MAX_HISTORY):  # shutdowns release without failing
        assert body is not None
        body = write(records, protocol.claim(body, f"worker-{i}", float(i), 10.0, 3))
        assert body is not None
        body = write(records, protocol.release(body, f"worker-{i}", now=i + 0.5))
    assert body is not None
    history = body["history"]
    assert len(history) == protocol.MAX_HISTORY
    assert history[-1]["attempt"] == 3 * protocol.MAX_HISTORY, "the latest are kept"
    body = write(records, protocol.claim(body, "w", 99.0, 10.0, 3))
    assert body is not None
    wide = {"g": {f"counter-{i:02d}": 2**62 for i in range(8)}}
    sample = [{"error": "E" * 120, "offset": 2**40} for _ in range(2)]
    body = write(records, protocol.commit(body, "w", {}, wide, sample, now=100.0))
    assert body is not None
    used = sum(len(orjson.dumps(body[f])) for f in ("counters", "skipped", "history"))
    assert used <= protocol.EXTRA_BYTES
    assert 0 < len(body["history"]) < protocol.MAX_HISTORY


# --- a worker that follows one shard -------------------------------------------------


def test_shards_grow_with_workers_and_every_process_deals_keys_alike() -> None:
    assert [protocol.shard_count(w) for w in (1, 4, 7, 8, 64, 1000)] == [1, 1, 1, 2, 16, 250]
    keys = [protocol.map_key(i) for i in range(2000)]
    dealt = [protocol.shard_of(k, 16) for k in keys]
    assert dealt == [protocol.shard_of(k, 16) for k in keys]
    counts = [dealt.count(s) for s in range(16)]
    assert min(counts) > 2000 / 16 / 2, f"shards far from even: {counts}"
    assert {protocol.shard_of(k, 1) for k in keys} == {0}
    assert protocol.job_shards(protocol.new_job(SPEC)) == 1
    assert protocol.job_shards(protocol.new_job(SPEC, shards=5)) == 5


def _followed_view(records: dict[str, dict[str, Any]], mine: set[str],
                   seen: float = 0.0) -> JobView:
    return JobView(records, seen, followed=lambda key: key in mine)


def _commit(records: dict[str, dict[str, Any]], key: str, output: object) -> None:
    body = write(records, protocol.claim(records[key], "other", 0.0, 10.0, 3))
    assert body is not None
    assert write(records, protocol.commit(body, "other", output, now=0.0)) is not None


def test_a_poll_settles_what_committed_elsewhere_but_nothing_is_read_from_it() -> None:
    records = new_records(maps=3)
    mine = {"map-00000"}
    view = _followed_view(records, mine)
    _commit(records, "map-00001", {"0": "run-1"})  # another shard's workers
    _commit(records, "map-00002", {"0": "run-2"})
    unfinished = {k: b for k, b in records.items()
                  if k != protocol.JOB_KEY and b["state"] != TaskState.COMMITTED}
    for key, body in unfinished.items():
        view.update(key, body, seen=1.0)
    view.settle(unfinished)
    assert view.unread == {"map-00001", "map-00002"}
    assert [protocol.task_name(t) for t in view.claimable(1.0)] == ["map-00000"]
    assert not view.needs_reading(), "a map of the step is still pending"
    _commit(records, "map-00000", {"0": "run-0"})
    view.update("map-00000", records["map-00000"], seen=2.0)  # the watch brings its own
    assert [t["kind"] for t in view.claimable(2.0)] == ["reduce", "reduce"]
    with pytest.raises(RuntimeError, match="not read yet"):
        view.map_outputs(0)  # a reduce must never run on outputs it has not read
    for key in ("map-00001", "map-00002"):
        view.update(key, records[key], seen=3.0)
    assert not view.unread
    assert [out for _, out in view.map_outputs(0)] == ["run-0", "run-1", "run-2"]


def test_the_verdict_waits_for_reading_the_settled_tasks() -> None:
    records = new_records(maps=1)
    view = _followed_view(records, {"map-00000", "reduce-00000"})
    for key in ("map-00000", "reduce-00000", "reduce-00001"):
        _commit(records, key, f"out-{key}")
    view.update("map-00000", records["map-00000"], seen=1.0)
    view.update("reduce-00000", records["reduce-00000"], seen=1.0)
    view.settle([])  # a poll found nothing unfinished: reduce-00001 committed elsewhere
    assert view.unread == {"reduce-00001"} and view.needs_reading()
    assert view.verdict() is None and view.results() is None
    view.update("reduce-00001", records["reduce-00001"], seen=2.0)
    assert not view.needs_reading()
    verdict = view.verdict()
    assert verdict is not None
    job = write(records, verdict)
    assert job is not None and job["results"] == ["out-reduce-00000", "out-reduce-00001"]


def test_a_polled_lease_lapses_only_when_two_polls_a_lease_apart_show_it_unchanged() -> None:
    records = new_records(maps=2)
    held = write(records, protocol.claim(records["map-00001"], "holder", 0.0, 10.0, 3))
    assert held is not None
    view = _followed_view(records, {"map-00000"}, seen=0.0)
    assert not view.lease_lapsed("map-00001", 100.0), \
        "no poll has shown it since: silence is not known"
    assert view.next_lease_expiry() is None, "nobody waits on a lease it cannot see"
    view.update("map-00001", held, seen=5.0)  # a poll 5 s later: same seq
    assert not view.lease_lapsed("map-00001", 100.0)
    view.update("map-00001", held, seen=10.5)  # a lease (10 s) after the first sighting
    assert view.lease_lapsed("map-00001", 10.5)
    renewed = write(records, protocol.renew(held, "holder", 11.0, 10.0))
    assert renewed is not None
    view.update("map-00001", renewed, seen=30.0)
    assert not view.lease_lapsed("map-00001", 30.0), "a renewal seen restarts the lease"


def test_a_lost_race_on_a_polled_task_stops_offering_it_until_the_next_poll() -> None:
    records = new_records(maps=2)
    view = _followed_view(records, {"map-00000"})
    claimed = write(records, protocol.claim(records["map-00000"], "me", 0.0, 10.0, 3))
    assert claimed is not None
    view.update("map-00000", claimed, seen=1.0)
    offered = view.candidates(1.0, 8, random.Random(0))
    assert [protocol.task_name(t) for t in offered] == ["map-00001"], \
        "another shard's task is offered once this worker's shard has none"
    view.stale("map-00001")  # its claim lost: somebody took it
    assert view.candidates(1.0, 8, random.Random(0)) == []
    view.update("map-00001", records["map-00001"], seen=2.0)  # the next poll
    assert [protocol.task_name(t) for t in view.candidates(2.0, 8, random.Random(0))] == \
        ["map-00001"]


def test_a_worker_offers_its_own_shard_first() -> None:
    records = new_records(maps=6)
    mine = {"map-00002", "map-00004"}
    view = _followed_view(records, mine)
    for seed in range(20):
        picked = {protocol.task_name(t) for t in view.candidates(0.0, 8, random.Random(seed))}
        assert picked == mine


def test_a_view_of_one_shard_claims_its_maps_and_a_poll_accounts_for_the_rest() -> None:
    records = new_records(maps=4)
    mine = {"map-00001", "reduce-00000"}
    view = _followed_view({k: b for k, b in records.items()
                           if k == protocol.JOB_KEY or k in mine}, mine)
    assert not view.complete
    assert [protocol.task_name(t) for t in view.claimable(0.0)] == ["map-00001"], \
        "a pending map of its own shard is claimable before the rest is known"
    _commit(records, "map-00001", {"0": "run-1"})
    view.update("map-00001", records["map-00001"], seen=1.0)
    assert view.claimable(1.0) == [], "no reduce before every map is known committed"
    for key in ("map-00000", "map-00002", "map-00003"):
        _commit(records, key, {"0": f"run-{key[-1]}"})
    view.settle(["reduce-00001"])  # the poll: only the other reduce is unfinished
    view.update("reduce-00001", records["reduce-00001"], seen=2.0)
    assert view.complete and view.unread == {"map-00000", "map-00002", "map-00003"}
    assert [t["kind"] for t in view.claimable(2.0)] == ["reduce", "reduce"]
    with pytest.raises(RuntimeError, match="not read yet"):
        view.shuffle_objects()


def test_workers_with_an_index_are_dealt_evenly_over_the_shards() -> None:
    shards = protocol.shard_count(64)
    dealt = [protocol.worker_shard(f"pod-{i}", i, shards) for i in range(64)]
    assert [dealt.count(s) for s in range(shards)] == [4] * shards
    assert protocol.worker_shard("pod-x", None, shards) == protocol.shard_of("pod-x", shards)
    assert protocol.worker_shard("pod-x", 5, 1) == 0


@pytest.mark.parametrize(("workers", "shards"), [(64, 16), (10, 2), (8, 2), (1000, 250)])
def test_each_task_of_a_shard_is_in_the_lane_of_one_of_its_workers(
        workers: int, shards: int) -> None:
    keys = [protocol.map_key(i) for i in range(2000)]
    lanes = {i: protocol.own_lane(i, shards) for i in range(workers)}
    for key in keys:
        shard = protocol.shard_of(key, shards)
        owners = [i for i, own in lanes.items()
                  if protocol.worker_shard(f"w{i}", i, shards) == shard
                  and own is not None and own(key)]
        assert len(owners) == 1, (key, owners)
    assert protocol.own_lane(None, shards) is None, "no ordinal, no preference"
    assert protocol.own_lane(3, 1) is None, "an unsharded job: no lanes"
    assert protocol.own_lane(4 * shards, shards) is None, "a fifth worker of a shard"


def test_a_worker_offers_its_own_lane_and_the_others_once_its_own_is_taken() -> None:
    records = new_records(maps=60)
    own = protocol.own_lane(1, 2)  # shard 1's first worker of 4
    assert own is not None
    def mine_key(key: str) -> bool:
        return protocol.shard_of(key, 2) == 1
    view = JobView(records, 0.0, followed=mine_key, own=own)
    lane = {k for k in records if k.startswith("map-") and mine_key(k) and own(k)}
    shard = {k for k in records if k.startswith("map-") and mine_key(k)}
    assert 0 < len(lane) < len(shard)
    rng = random.Random(7)
    for _ in range(20):
        picked = {protocol.task_name(b) for b in view.candidates(0.0, 8, rng)}
        assert picked and picked <= lane, "only its own lane while it has any"
    for key in lane:  # its lane taken by the others
        body = write(records, protocol.claim(records[key], "other", 0.0, 10.0, 3))
        assert body is not None
        view.update(key, body, seen=0.0)
    rest = {protocol.task_name(b) for b in view.candidates(0.0, 8, rng)}
    assert rest and rest <= shard - lane


def test_a_lost_race_on_a_followed_task_is_not_offered_again_until_its_watch_catches_up(
        ) -> None:
    """Workers starting together read their shard at once; one that lost a claim must not
    keep claiming from the copy its watch has not moved past yet."""
    records = new_records(maps=2)
    view = JobView(records, 0.0)
    winner = write(records, protocol.claim(records["map-00000"], "other", 0.0, 10.0, 3))
    assert winner is not None  # the view has not seen it yet
    assert {protocol.task_name(b) for b in view.candidates(0.0, 8, random.Random(1))} == {
        "map-00000", "map-00001"}
    view.stale("map-00000")  # our claim of it lost its race
    assert [protocol.task_name(b) for b in view.candidates(0.0, 8, random.Random(1))] == [
        "map-00001"]
    released = write(records, protocol.release(winner, "other", now=1.0))
    assert released is not None
    view.update("map-00000", released, seen=1.0)  # the watch brings a newer, pending copy
    assert "map-00000" in {protocol.task_name(b)
                           for b in view.candidates(0.0, 8, random.Random(1))}
