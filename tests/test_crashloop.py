"""The operator's crash-loop rule (kubemr_async.operator.crashloop), a pure function of the
pods and progress it is shown: deaths in a row with no task committing fail a job, naming
the cause; kills between commits never do. The rule on a real cluster:
tests/test_kills_cluster.py."""

from __future__ import annotations

from typing import Any

from kubemr_async.deaths import STUCK_EXIT_CODE, container_returncode
from kubemr_async.operator.crashloop import DeathWatch, pod_death_cause, progress_of


def pod(uid: str, phase: str = "Failed", exit_code: int = 137, reason: str = "Error",
        message: str = "", finished: str = "2026-12-02T10:00:00Z") -> dict[str, Any]:
    terminated = {"exitCode": exit_code, "reason": reason, "message": message,
                  "finishedAt": finished}
    state = {"terminated": terminated} if phase == "Failed" else {"running": {}}
    return {"metadata": {"name": f"wc-workers-0-{uid}", "uid": uid},
            "spec": {"containers": [{"name": "worker",
                                     "resources": {"limits": {"memory": "64Mi"}}}]},
            "status": {"phase": phase, "containerStatuses": [{"state": state}]}}


def test_deaths_in_a_row_with_no_commit_fail_the_job_naming_the_last() -> None:
    watch = DeathWatch()
    watch.observe((0, 0, 0), [pod("a", "Running"), pod("b", "Running")])
    watch.observe((0, 0, 0), [pod("a", finished="...01Z"), pod("b", "Running")])
    assert watch.verdict(workers=2) is None
    deaths = [pod(str(i), finished=f"2026-12-02T10:00:0{i}Z",
                  message=f"line one\n{{\"msg\": \"map-0000{i}\"}}\n") for i in range(1, 6)]
    watch.observe((0, 0, 0), [pod("a", finished="...01Z"), *deaths])
    assert watch.verdict(workers=2) == (
        "worker pods died 6 times in a row with no task committing; the last, "
        'wc-workers-0-5, was killed by SIGKILL; its last log line: {"msg": "map-00005"}')
    assert watch.verdict(workers=3) is None, "3 per worker"


def test_a_commit_between_deaths_starts_the_count_again() -> None:
    watch = DeathWatch()
    watch.observe((0, 0, 0), [])
    watch.observe((0, 0, 0), [pod("a"), pod("b")])
    watch.observe((0, 3, 0), [pod("a"), pod("b"), pod("c")])  # c may have died first
    assert watch.since == []
    watch.observe((0, 3, 0), [pod("a"), pod("b"), pod("c"), pod("d")])
    assert [p["metadata"]["uid"] for p in watch.since] == ["d"]
    watch.observe((1, 0, 0), [pod("e")])  # a multi-step job's next step is progress too
    assert watch.since == [] and watch.verdict(workers=1) is None


def test_deaths_before_the_first_look_are_not_counted() -> None:
    """An operator started afresh cannot tell whether the pods it finds dead died in a
    row: they are past, and only deaths it sees come after them count."""
    watch = DeathWatch()
    watch.observe((0, 5, 0), [pod(str(i)) for i in range(10)])
    assert watch.since == [] and watch.verdict(workers=1) is None


def test_out_of_memory_deaths_say_so_with_the_limit() -> None:
    watch = DeathWatch()
    watch.observe((0, 0, 0), [])
    watch.observe((0, 0, 0), [pod(str(i), reason="OOMKilled") for i in range(3)])
    verdict = watch.verdict(workers=1)
    assert verdict is not None
    assert "was killed by SIGKILL (out of memory)" in verdict
    assert verdict.endswith("3 of 3 worker pods ran out of memory (OOMKilled; memory limit "
                            "64Mi): raise the workers' memory limit")


def test_a_worker_that_left_stuck_after_a_task_timeout_is_no_crash_loop_death() -> None:
    """It failed its timed-out attempt before leaving (maxAttempts bounds those), so
    taking it for a crash would fail a job whose stuck attempts had retries left."""
    watch = DeathWatch()
    watch.observe((0, 0, 0), [])
    watch.observe((0, 0, 0), [pod(str(i), exit_code=STUCK_EXIT_CODE) for i in range(5)])
    assert watch.since == [] and watch.verdict(workers=1) is None
    assert pod_death_cause(pod("a", exit_code=STUCK_EXIT_CODE)) == (
        "exited with code 75 (a task attempt timed out and its user code did not stop)")


def test_a_death_cause_from_a_pod() -> None:
    assert pod_death_cause(pod("a", exit_code=143)) == "was killed by SIGTERM"
    assert pod_death_cause(pod("a", exit_code=2, message="usage: kubemr\n\n")) == (
        "exited with code 2; its last log line: usage: kubemr")
    lost = {"status": {"phase": "Failed", "reason": "NodeLost", "message": "node gone"}}
    assert pod_death_cause(lost) == "failed (NodeLost): node gone"
    assert container_returncode(137) == -9 and container_returncode(1) == 1
    assert container_returncode(255) == 255  # not a signal's


def test_progress_is_read_from_the_status_the_follower_writes() -> None:
    assert progress_of({"status": {"mapsDone": 3, "reducesDone": 1, "step": 1}}) == (1, 3, 1)
    assert progress_of({}) == (0, 0, 0)
