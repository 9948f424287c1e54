"""How a worker died, in one line, and when deaths mean a crash loop: shared by `kubemr
run`'s supervisor (worker processes) and the operator (worker pods), so a job fails for
the same reason, in the same words, wherever it runs.

Pure: it reads no process or pod, it is handed what the caller saw.
"""

from __future__ import annotations

import signal

#: Worker deaths in a row with no task committing in between, per worker (counted over
#: all the workers together), after which a job fails instead of starting another worker
#: (a crash loop). A worker killed now and then (a node drained, a pod deleted, a process
#: SIGKILLed) costs a job a lease at most, never the job: tasks commit in between.
CRASH_LOOP_DEATHS = 3
#: A worker's exit code after a task attempt timed out and its user code would not stop
#: (a synchronous callback cannot be interrupted): the attempt was failed first (counted
#: against ``maxAttempts``), and the process left so that no more user code runs beside
#: the stuck thread. Replaced like any dead worker, but not a crash-loop death: the
#: attempts it failed already bound how often it happens. 75 is sysexits' EX_TEMPFAIL.
STUCK_EXIT_CODE = 75


def death_cause(returncode: int, last_line: str, oom_killed: bool) -> str:
    """One line: how a worker process ended (signal name or exit code), "out of memory"
    when that is known, and its last log line.

    ``returncode`` is a process's (negative: the signal that killed it); for a container's
    exit code, see :func:`container_returncode`. Out of memory is known two ways: a
    MemoryError that escaped the worker (its last line), or SIGKILL while the memory
    cgroup's OOM-kill count went up (``oom_killed``).
    """
    if returncode < 0:
        try:
            how = f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"was killed by signal {-returncode}"
    else:
        how = f"exited with code {returncode}"
    if returncode == STUCK_EXIT_CODE:
        how += " (a task attempt timed out and its user code did not stop)"
    if (oom_killed and returncode == -signal.SIGKILL) or last_line.startswith("MemoryError"):
        how += " (out of memory)"
    line = " ".join(last_line.split())[:200]
    return f"{how}; its last log line: {line}" if line else how


def container_returncode(exit_code: int) -> int:
    """A container's exit code as a process's return code: container runtimes report a
    death by signal N as 128 + N (SIGKILL: 137), :func:`death_cause` wants -N."""
    if 128 < exit_code < 128 + signal.NSIG:
        return 128 - exit_code
    return exit_code
