"""Worker pods that die again and again with no task committing: a crash loop, judged
from the job's progress rather than from a count of deaths.

The workers' batch Job does not count kills (:data:`.resources.POD_FAILURE_POLICY`): a pod
whose worker was SIGKILLed or stopped (exit code 137 or 143) or that was disrupted
(evicted, preempted, its node drained) is replaced without counting toward the Job's
backoff limit, because its tasks are taken over and the job loses a lease at most. The
Job controller counts deaths, not progress, so it would fail a big job killed a dozen
times while its tasks commit fine. Ignored, though, a pod that always dies (killed by its
memory cgroup before any commit, say) would be replaced forever. So the operator counts
those deaths itself, as `kubemr run`'s supervisor does: ``CRASH_LOOP_DEATHS`` per worker in
a row, with no task committing in between, fail the job naming the last death's cause.

Pure: the reconcile hands in the pods it listed and the progress on the job's status.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..deaths import CRASH_LOOP_DEATHS, STUCK_EXIT_CODE, container_returncode, death_cause
from ..kube import KubeObject
from .resources import pods_out_of_memory

#: What moves when a task commits: (step, maps done, reduces done), from the job's status.
Progress = tuple[int, int, int]


def progress_of(mrj: KubeObject) -> Progress:
    """The committed tasks' counts the progress follower writes on the job's status."""
    status = mrj.get("status") or {}
    return (int(status.get("step") or 0), int(status.get("mapsDone") or 0),
            int(status.get("reducesDone") or 0))


def pod_death_cause(pod: KubeObject) -> str:
    """One line on how a worker pod died, from its container's terminated state (exit
    code or signal, out of memory, the last line of the termination message, which
    ``FallbackToLogsOnError`` fills with the log's tail), else from the pod's status."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated")
        if terminated is not None:
            lines = [line for line in (terminated.get("message") or "").splitlines()
                     if line.strip()]
            return death_cause(container_returncode(int(terminated.get("exitCode") or 0)),
                               lines[-1] if lines else "",
                               terminated.get("reason") == "OOMKilled")
    status = pod.get("status") or {}
    return (f"failed ({status.get('reason') or 'no reason'}): "
            f"{status.get('message') or 'no message'}")


@dataclass
class DeathWatch:
    """One job's worker pod deaths as its reconciles saw them, and the verdict.

    Kept in the operator's memory: an operator that starts afresh takes the deaths it
    first sees as past, so it never fails a job for deaths it cannot tell came in a row.
    Deaths first seen in the same look as new progress may have come before the commit,
    so they are not counted either: the rule errs towards letting a job run.
    """

    #: The progress at the last look (None: no look yet).
    progress: Progress | None = None
    #: Every dead pod seen (uids), so a pod is counted once.
    seen: set[str] = field(default_factory=set)
    #: The pods that died since a task last committed, oldest first.
    since: list[KubeObject] = field(default_factory=list)

    def observe(self, progress: Progress, pods: list[KubeObject]) -> None:
        """Take in the job's worker pods and its progress now."""
        dead = sorted((pod for pod in pods
                       if (pod.get("status") or {}).get("phase") == "Failed"
                       and pod["metadata"]["uid"] not in self.seen
                       and _exit_code(pod) != STUCK_EXIT_CODE), key=_finished_at)
        self.seen.update(pod["metadata"]["uid"] for pod in dead)
        self.since += dead
        if progress != self.progress:
            self.since = []
            self.progress = progress

    def verdict(self, workers: int) -> str | None:
        """Why the job must fail: its workers died ``CRASH_LOOP_DEATHS`` times per worker
        in a row with no task committing (naming the last one's cause, and out of memory
        when the memory cgroup killed them); None while that is not so."""
        if len(self.since) < CRASH_LOOP_DEATHS * workers:
            return None
        last = self.since[-1]
        reason = (f"worker pods died {len(self.since)} times in a row with no task "
                  f"committing; the last, {last['metadata']['name']}, "
                  f"{pod_death_cause(last)}")
        oom = pods_out_of_memory(self.since)
        return reason if oom is None else f"{reason}; {oom}"


def _exit_code(pod: KubeObject) -> int | None:
    """The worker container's exit code, if it has terminated. A worker that exits with
    ``STUCK_EXIT_CODE`` failed its timed-out attempt first: ``maxAttempts``, not the
    crash-loop rule, bounds those deaths."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated")
        if terminated is not None:
            return int(terminated.get("exitCode") or 0)
    return None


def _finished_at(pod: KubeObject) -> str:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated")
        if terminated is not None:
            return str(terminated.get("finishedAt") or "")
    return ""
