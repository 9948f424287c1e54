"""Backup tasks (speculative execution) as pure code: every transition and guard of a task
that runs two attempts, the history entry each of them opens and closes, and the rule that
picks a straggler (JobView.backup_candidate).

An in-memory dict with :func:`apply_patch` stands in for a store, as in test_protocol.py,
because the protocol is pure; the stores themselves run the same updates in
tests/test_state_contract.py, and real workers in tests/test_backup_run.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubemr_async import protocol
from kubemr_async.protocol import BACKUP_FLOOR, BACKUP_MIN_COMMITTED, JobView, Slot, TaskState

from .test_protocol import new_records, write

LEASE = 10.0
NOW = 3.0  # when an attempt ends, on the writer's clock (claims at 0 s, backups at 1 s)


def outcomes(body: dict[str, Any]) -> dict[int, tuple[str, str | None]]:
    """The task's history as attempt number -> (worker, outcome; None while running)."""
    return {a["attempt"]: (a["worker"], a.get("outcome")) for a in body["history"]}


def ends(body: dict[str, Any]) -> dict[int, int | None]:
    """Each attempt's end (Unix ms) in the task's history; None while running."""
    return {a["attempt"]: a.get("end") for a in body["history"]}


def running(records: dict[str, dict[str, Any]], key: str = "map-00000",
            worker: str = "w1") -> dict[str, Any]:
    body = write(records, protocol.claim(records[key], worker, 0.0, LEASE, 3))
    assert body is not None
    return body


def backed_up(records: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """map-00000 run by w1 (attempt 1), then backed up by w2 (attempt 2): (w1's stale
    body, the record now)."""
    original = running(records)
    backup = write(records, protocol.backup(original, "w2", 1.0, LEASE))
    assert backup is not None
    return original, backup


def test_a_backup_takes_the_holder_slot_with_a_fresh_attempt_and_the_original_twins() -> None:
    records = new_records()
    original, body = backed_up(records)
    assert (body["state"], body["worker"], body["attempt"]) == (TaskState.RUNNING, "w2", 2)
    assert body["twin"] == {"worker": "w1", "attempt": 1}
    assert (body["backups"], body["backupAttempt"]) == (1, 2)
    assert protocol.slot(body, "w2", 2) == Slot.HOLDER
    assert protocol.slot(body, "w1", 1) == Slot.TWIN
    assert protocol.slot(body, "w1", 2) is None and protocol.slot(body, "w3", 1) is None
    # The backup opened an entry of its own, at its start; the original's stays open.
    assert outcomes(body) == {1: ("w1", None), 2: ("w2", None)}
    assert [a["start"] for a in body["history"]] == [0, 1000]
    # The original's next write, built on what it last read, fails its guard; on the
    # fresh record (the runtime waits for it) it renews from the twin slot.
    assert write(records, protocol.renew(original, "w1", 2.0, LEASE)) is None
    renewed = write(records, protocol.renew(body, "w1", 2.0, LEASE))
    assert renewed is not None and renewed["seq"] == body["seq"] + 1
    assert renewed["worker"] == "w2" and renewed["twin"] == {"worker": "w1", "attempt": 1}
    # The two attempts' renewals race on seq: the loser re-reads and renews again.
    assert write(records, protocol.renew(body, "w2", 2.0, LEASE)) is None
    assert write(records, protocol.renew(renewed, "w2", 2.0, LEASE)) is not None


def test_a_backup_is_refused_for_its_own_task_a_twinned_one_and_a_pending_one() -> None:
    records = new_records()
    original = running(records)
    with pytest.raises(ValueError, match="w1's own"):
        protocol.backup(original, "w1", 1.0, LEASE)
    _, body = backed_up(new_records())
    with pytest.raises(ValueError, match="without a backup"):
        protocol.backup(body, "w3", 1.0, LEASE)
    with pytest.raises(ValueError, match="without a backup"):
        protocol.backup(records["map-00001"], "w3", 1.0, LEASE)
    # Two workers backing up the same read: one wins.
    assert write(records, protocol.backup(original, "w2", 1.0, LEASE)) is not None
    assert write(records, protocol.backup(original, "w3", 1.0, LEASE)) is None


@pytest.mark.parametrize(("winner", "attempt", "loser"), [("w2", 2, "w1"), ("w1", 1, "w2")])
def test_the_first_commit_wins_and_the_other_attempts_is_then_refused(
        winner: str, attempt: int, loser: str) -> None:
    records = new_records()
    _, body = backed_up(records)
    won = write(records, protocol.commit(body, winner, f"out@{attempt}", {"g": {"n": attempt}},
                                         now=NOW))
    assert won is not None
    # The committer is named; the attempt stays the highest issued (2) whoever won, so a
    # later attempt (after a re-open) is 3, never a number already used.
    assert (won["state"], won["outputs"], won["worker"], won["attempt"]) == (
        TaskState.COMMITTED, f"out@{attempt}", winner, 2)
    assert won["twin"] is None and won["backupWon"] is (winner == "w2")
    assert protocol.slot(won, "w1", 1) is None and protocol.slot(won, "w2", 2) is None
    # The loser commits on the body it held, or on the freshest: both refused.
    for read in (body, won):
        lost = protocol.commit(read, loser, "lost", {"g": {"n": 9}}, now=NOW)
        assert write(records, lost) is None
    assert records["map-00000"]["outputs"] == f"out@{attempt}"
    assert records["map-00000"]["counters"] == {"g": {"n": attempt}}
    # The winner's entry (found by its attempt number, whichever slot it held) ends
    # committed, the loser's as lost to its twin, both at the winner's clock.
    loser_attempt = 3 - attempt
    assert outcomes(records["map-00000"]) == {attempt: (winner, "committed"),
                                              loser_attempt: (loser, "backup")}
    assert ends(records["map-00000"]) == {1: 3000, 2: 3000}
    reopened = write(records, protocol.reopen(won, "corrupt", 3))
    assert reopened is not None
    again = write(records, protocol.claim(reopened, "w3", 5.0, LEASE, 3))
    assert again is not None and again["attempt"] == 3


def test_a_takeover_clears_the_twin_and_neither_zombie_can_commit() -> None:
    records = new_records()
    _, body = backed_up(records)
    view = JobView(records, seen=0.0)
    assert not view.lease_lapsed("map-00000", LEASE - 1)
    assert view.lease_lapsed("map-00000", LEASE + 1), "neither attempt renewed"
    taken = write(records, protocol.claim(body, "w3", 20.0, LEASE, 3, lapsed=True))
    assert taken is not None
    assert (taken["worker"], taken["attempt"], taken["twin"]) == ("w3", 3, None)
    assert taken["failures"] == 1
    assert taken["error"] == ("lease expired: worker w1 stopped renewing during attempt 1 "
                              "and worker w2 stopped renewing during attempt 2")
    assert outcomes(taken) == {1: ("w1", "leaseLost"), 2: ("w2", "leaseLost"), 3: ("w3", None)}
    for worker in ("w1", "w2"):
        assert protocol.slot(taken, worker, 1) is None and protocol.slot(taken, worker, 2) is None
        assert write(records, protocol.commit(body, worker, "zombie", now=NOW)) is None
        assert write(records, protocol.commit(taken, worker, "zombie", now=NOW)) is None
    assert write(records, protocol.commit(taken, "w3", "out@3", now=NOW)) is not None


def test_a_renewal_by_either_attempt_keeps_the_lease_alive() -> None:
    records = new_records()
    _, body = backed_up(records)
    view = JobView(records, seen=0.0)
    renewed = write(records, protocol.renew(body, "w1", 8.0, LEASE))  # only the twin renews
    assert renewed is not None
    view.update("map-00000", renewed, seen=8.0)
    assert not view.lease_lapsed("map-00000", 15.0)
    assert view.lease_lapsed("map-00000", 18.5)


def test_a_failing_attempt_drops_only_itself_while_the_other_runs() -> None:
    records = new_records()
    _, body = backed_up(records)
    after = write(records, protocol.fail(body, "w2", "boom", 3, now=NOW))  # the backup fails
    assert after is not None
    assert (after["state"], after["worker"], after["failures"]) == (TaskState.RUNNING, "", 1)
    assert after["twin"] == {"worker": "w1", "attempt": 1}
    assert protocol.slot(after, "w1", 1) == Slot.TWIN
    # Only the backup's entry (attempt 2, the last one) ended; the original's runs on.
    assert outcomes(after) == {1: ("w1", None), 2: ("w2", "failed")}
    # Nobody may back it up again (it has a twin) nor claim it while the twin renews.
    assert JobView(records, seen=0.0).backup_candidate("w3", 100.0) is None
    won = write(records, protocol.commit(after, "w1", "out@1", now=4.0))
    assert won is not None and won["state"] == TaskState.COMMITTED and won["worker"] == "w1"
    assert won["backupWon"] is False and won["twin"] is None
    assert outcomes(won) == {1: ("w1", "committed"), 2: ("w2", "failed")}
    assert ends(won) == {1: 4000, 2: 3000}

    records = new_records()
    _, body = backed_up(records)
    after = write(records, protocol.fail(body, "w1", "boom", 3, now=NOW))  # the original fails
    assert after is not None
    assert (after["state"], after["worker"], after["twin"]) == (TaskState.RUNNING, "w2", None)
    # The original's entry (attempt 1, not the last one) ended; the backup's runs on.
    assert outcomes(after) == {1: ("w1", "failed"), 2: ("w2", None)}
    # Then the backup fails too: nobody runs it any more, so it goes back to pending.
    last = write(records, protocol.fail(after, "w2", "boom", 3, now=4.0))
    assert last is not None
    assert (last["state"], last["worker"], last["failures"]) == (TaskState.PENDING, "", 2)
    assert last["twin"] is None
    assert outcomes(last) == {1: ("w1", "failed"), 2: ("w2", "failed")}
    assert ends(last) == {1: 3000, 2: 4000}


def test_a_failure_at_max_attempts_or_a_permanent_one_fails_the_task() -> None:
    records = new_records()
    original = running(records)
    body = write(records, protocol.fail(original, "w1", "boom", 3, now=NOW))
    assert body is not None
    body = running(records)
    body = write(records, protocol.backup(body, "w2", 1.0, LEASE))
    assert body is not None and body["failures"] == 1
    after = write(records, protocol.fail(body, "w1", "boom", 2, now=NOW))
    assert after is not None and after["state"] == TaskState.FAILED and after["twin"] is None
    # The failing original's entry ends failed; the backup it stopped, as ended by its twin.
    assert outcomes(after) == {1: ("w1", "failed"), 2: ("w1", "failed"), 3: ("w2", "backup")}
    records = new_records()
    _, body = backed_up(records)
    after = write(records, protocol.fail(body, "w2", "bad job", 3, permanent=True, now=NOW))
    assert after is not None and after["state"] == TaskState.FAILED
    assert outcomes(after) == {1: ("w1", "backup"), 2: ("w2", "failed")}


def test_a_release_drops_only_itself_without_a_failure() -> None:
    records = new_records()
    _, body = backed_up(records)
    after = write(records, protocol.release(body, "w1", now=NOW))
    assert after is not None
    assert (after["state"], after["worker"], after["twin"], after["failures"]) == (
        TaskState.RUNNING, "w2", None, 0)
    assert outcomes(after) == {1: ("w1", "released"), 2: ("w2", None)}
    last = write(records, protocol.release(after, "w2", now=NOW))
    assert last is not None and last["state"] == TaskState.PENDING and last["failures"] == 0
    assert outcomes(last) == {1: ("w1", "released"), 2: ("w2", "released")}


# --- the rule -------------------------------------------------------------------------


def straggling(maps: int = 6, committed: int = BACKUP_MIN_COMMITTED,
               duration: float = 2.0) -> tuple[dict[str, dict[str, Any]], JobView]:
    """A view (observer clock) of ``maps`` maps where ``committed`` ran ``duration``
    seconds each and the rest were claimed at 0 by workers a, b, ... and still run."""
    records = new_records(maps=maps)
    view = JobView(records, seen=0.0)
    for i in range(maps):
        key = protocol.map_key(i)
        body = write(records, protocol.claim(records[key], f"w{i}", 0.0, LEASE, 3))
        assert body is not None
        view.update(key, body, seen=0.0)
        if i < committed:
            done = write(records, protocol.commit(body, f"w{i}", f"out-{i}", now=NOW))
            assert done is not None
            view.update(key, done, seen=duration)
    return records, view


def test_a_worker_that_starts_late_times_the_stage_from_the_attempts_histories() -> None:
    """Three maps committed before this observer read the job (a worker that started
    late): their durations come from their committed attempts' histories (NOW - 0 s on
    each writer's clock), so the straggler still gets its backup."""
    records = new_records(maps=4)
    for i in range(4):
        key = protocol.map_key(i)
        body = write(records, protocol.claim(records[key], f"w{i}", 0.0, LEASE, 3))
        assert body is not None
        if i < BACKUP_MIN_COMMITTED:
            assert write(records, protocol.commit(body, f"w{i}", f"out-{i}", now=NOW))
    view = JobView(records, seen=100.0)  # everything first seen at 100 s, observer clock
    threshold = max(protocol.BACKUP_FACTOR * NOW, BACKUP_FLOOR)
    assert view.backup_candidate("late", 100.0 + threshold - 0.1) is None
    picked = view.backup_candidate("late", 100.0 + threshold + 0.1)
    assert picked is not None and protocol.task_name(picked) == "map-00003"


def test_a_task_running_across_an_outage_is_timed_from_its_end() -> None:
    """The observer could not see (its store was out of reach): the running task's time
    is counted afresh, so the outage alone makes no straggler of it; nor is it backed up
    until its holder is heard of again (it may be waiting out a retry's backoff with its
    commit in hand), however long that takes: its lease decides if it never is."""
    records, view = straggling(maps=4)  # three committed after 2 s; map-00003 runs on
    threshold = max(protocol.BACKUP_FACTOR * 2.0, BACKUP_FLOOR)
    view.restart_observation(60.0)  # back after a minute of outage
    assert view.backup_candidate("idle", 60.0 + threshold + 5.0) is None
    assert view.next_backup_at("idle") is None
    view.update("map-00003", records["map-00003"], seen=61.0)  # a re-listing: no news
    assert view.backup_candidate("idle", 60.0 + threshold + 5.0) is None
    renewed = write(records, protocol.renew(records["map-00003"], "w3", 61.0, LEASE))
    assert renewed is not None
    view.update("map-00003", renewed, seen=61.0)  # its holder renews: alive, and slow
    assert view.backup_candidate("idle", 60.0 + threshold - 0.1) is None
    assert view.next_backup_at("idle") == pytest.approx(60.0 + threshold)
    picked = view.backup_candidate("idle", 60.0 + threshold + 0.1)
    assert picked is not None and protocol.task_name(picked) == "map-00003"


def test_an_idle_worker_backs_up_only_a_task_slower_than_the_rule() -> None:
    records, view = straggling(maps=4)  # three committed after 2 s; map-00003 runs on
    threshold = max(protocol.BACKUP_FACTOR * 2.0, BACKUP_FLOOR)
    assert view.backup_candidate("idle", threshold - 0.1) is None
    assert view.next_backup_at("idle") == pytest.approx(threshold)
    picked = view.backup_candidate("idle", threshold + 0.1)
    assert picked is not None and protocol.task_name(picked) == "map-00003"
    assert view.backup_candidate("w3", threshold + 0.1) is None, "not its own task"
    body = write(records, protocol.backup(picked, "idle", 5.0, LEASE))
    assert body is not None
    view.update("map-00003", body, seen=threshold + 0.2)
    assert view.backup_candidate("other", 100.0) is None, "one backup per task"
    assert view.progress().backups == 1 and view.progress().backups_won == 0
    won = write(records, protocol.commit(body, "idle", "out-3", now=NOW))
    assert won is not None
    view.update("map-00003", won, seen=threshold + 1)
    assert (view.progress().backups, view.progress().backups_won) == (1, 1)


def test_no_backup_while_tasks_are_pending_too_few_committed_or_speculation_is_off() -> None:
    _, view = straggling(maps=4, committed=BACKUP_MIN_COMMITTED - 1)
    assert view.backup_candidate("idle", 1000.0) is None, "too few durations to judge"
    records = new_records(maps=5)
    view = JobView(records, seen=0.0)
    for i in range(4):  # map-00004 stays pending
        key = protocol.map_key(i)
        body = write(records, protocol.claim(records[key], "w", 0.0, LEASE, 3))
        assert body is not None
        view.update(key, body, seen=0.0)
        if i < 3:
            done = write(records, protocol.commit(body, "w", "x", now=NOW))
            assert done is not None
            view.update(key, done, seen=1.0)
    assert view.backup_candidate("idle", 1000.0) is None, "a pending task comes first"
    _, view = straggling(maps=4)
    assert view.job is not None
    view.job["spec"]["speculative"] = False
    assert view.backup_candidate("idle", 1000.0) is None
    assert view.next_backup_at("idle") is None


def test_the_floor_spares_short_tasks() -> None:
    _, view = straggling(maps=4, duration=0.1)  # median 0.1 s: 1.5x is below the floor
    assert view.backup_candidate("idle", BACKUP_FLOOR - 0.01) is None
    assert view.backup_candidate("idle", BACKUP_FLOOR + 0.01) is not None


def test_backup_counts_in_an_incremental_view_match_a_fresh_one() -> None:
    records, view = straggling(maps=4)
    picked = view.backup_candidate("idle", 10.0)
    assert picked is not None
    body = write(records, protocol.backup(picked, "idle", 5.0, LEASE))
    assert body is not None
    view.update("map-00003", body, seen=10.0)
    won = write(records, protocol.commit(body, "w3", "out-3", now=NOW))  # the original wins
    assert won is not None
    view.update("map-00003", won, seen=11.0)
    assert view.progress() == JobView(records).progress()
    assert (view.progress().backups, view.progress().backups_won) == (1, 0)


# --- any schedule ---------------------------------------------------------------------

ACTIONS = st.sampled_from(["claim", "backup", "renew", "commit", "fail", "release", "tick"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), ACTIONS), max_size=80))
def test_any_schedule_with_backups_commits_once_with_a_running_attempts_output(
        schedule: list[tuple[int, str]]) -> None:
    """Workers claim, back up, renew, commit, fail and release in any order, each on the
    body it last read, re-reading like the runtime when a write of its fails: each task
    commits at most once, with the output (and counters) of an attempt that was running,
    no attempt number is ever issued twice, and the history has one entry per attempt,
    open exactly while that attempt runs, the committed one's closed as committed."""
    records = new_records(maps=2)
    now = 0.0
    held: dict[int, tuple[dict[str, Any], int]] = {}  # worker -> (body read, its attempt)
    issued: dict[str, list[int]] = {}
    commits: dict[str, str] = {}

    def fresh(worker_no: int) -> dict[str, Any] | None:
        """The runtime's _still_held: the current record if this attempt holds a slot."""
        body, attempt = held[worker_no]
        current = records[protocol.task_name(body)]
        if protocol.slot(current, f"w{worker_no}", attempt) is None:
            del held[worker_no]
            return None
        held[worker_no] = (current, attempt)
        return current

    for worker_no, action in schedule:
        worker = f"w{worker_no}"
        if action == "tick":
            now += 4.0
            continue
        if action in ("claim", "backup"):
            if worker_no in held:
                continue
            view = JobView(records)
            options = (view.claimable(now) if action == "claim"
                       else [t for t in view.tasks.values() if t["state"] == TaskState.RUNNING
                             and not t.get("twin") and t["worker"] not in ("", worker)])
            if options:
                body = options[worker_no % len(options)]
                update = (protocol.claim(body, worker, now, LEASE, 3) if action == "claim"
                          else protocol.backup(body, worker, now, LEASE))
                won = write(records, update)
                if won is not None and won["state"] == TaskState.RUNNING:
                    issued.setdefault(protocol.task_name(won), []).append(won["attempt"])
                    held[worker_no] = (won, won["attempt"])
            continue
        if worker_no not in held:
            continue
        body, attempt = held[worker_no]
        key = protocol.task_name(body)
        output = f"{key}@attempt-{attempt}"
        current: dict[str, Any] | None = body
        while current is not None:
            result = write(records, build(action, current, worker, now, output))
            if result is not None:
                break
            current = fresh(worker_no)
        if current is None:
            continue
        if action == "commit":
            assert key not in commits, f"{key} committed twice"
            commits[key] = output
        if action == "renew":
            held[worker_no] = (records[key], attempt)
        else:
            held.pop(worker_no, None)
    for key, attempts in issued.items():
        assert len(attempts) == len(set(attempts)), f"{key} reused an attempt: {attempts}"
    for key, output in commits.items():
        final = records[key]
        assert final["state"] == TaskState.COMMITTED and not final.get("twin")
        assert final["outputs"] == output and final["counters"] == {"g": {output: 1}}
        assert int(output.rsplit("-", 1)[1]) in issued[key]
        committed = [n for n, (_, outcome) in outcomes(final).items() if outcome == "committed"]
        assert committed == [int(output.rsplit("-", 1)[1])]
    for key, attempts in issued.items():
        final = records[key]
        history = final["history"]
        assert [a["attempt"] for a in history] == attempts[-protocol.MAX_HISTORY:]
        running_now = ({final["attempt"]} if final["worker"] else set()) | (
            {final["twin"]["attempt"]} if final.get("twin") else set())
        if final["state"] != TaskState.RUNNING:
            running_now = set()
        assert {a["attempt"] for a in history if "outcome" not in a} == running_now


def build(action: str, body: dict[str, Any], worker: str, now: float,
          output: str) -> protocol.Update:
    """The write ``action`` of ``worker``'s attempt, on ``body`` (its latest read)."""
    if action == "renew":
        return protocol.renew(body, worker, now, LEASE)
    if action == "commit":
        return protocol.commit(body, worker, output, {"g": {output: 1}}, now=now)
    if action == "fail":
        return protocol.fail(body, worker, "boom", 3, now=now)
    return protocol.release(body, worker, now=now)


def test_a_retry_clears_the_twin_of_a_task_left_running() -> None:
    records = new_records()
    backed_up(records)
    job = records[protocol.JOB_KEY]
    aborted = write(records, protocol.abort(job, protocol.JobPhase.CANCELLED, "stop"))
    assert aborted is not None
    for update in protocol.retry(JobView(records)):
        assert write(records, update) is not None
    body = records["map-00000"]
    assert (body["state"], body["worker"], body["twin"]) == (TaskState.PENDING, "", None)
    again = write(records, protocol.claim(body, "w3", 0.0, LEASE, 3))
    assert again is not None and again["attempt"] == 3
