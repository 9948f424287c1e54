"""How the CLI shows MapReduceJobs: kubectl's conventions (tables, ages, describe).

Pure functions of the objects the API server returns, so the output reads like
``kubectl get``/``describe`` and scripts can rely on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from . import counters, protocol, skips
from .protocol import JobPhase, Progress, TaskKind, TaskState
from .records import TaskRecord

#: Rows of running tasks and of failures `kubemr status` prints at most (then "... N more").
STATUS_ROWS = 10


def human_duration(seconds: float) -> str:
    """kubectl's AGE format (``duration.HumanDuration``): 45s, 5m30s, 3h20m, 3d4h, 2y30d."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m" if s % 60 == 0 else f"{minutes}m{s % 60}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h" if minutes % 60 == 0 else f"{hours}h{minutes % 60}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d" if hours % 24 == 0 else f"{hours // 24}d{hours % 24}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    years, days = hours // (24 * 365), (hours // 24) % 365
    if hours < 24 * 365 * 8:
        return f"{years}y" if days == 0 else f"{years}y{days}d"
    return f"{years}y"


def status_progress(obj: Mapping[str, Any]) -> Progress:
    """Progress from the job's status columns (the operator mirrors task counts there)."""
    status = obj.get("status") or {}
    reduces = status.get("reduces") or (obj.get("spec") or {}).get("reducers") or 0
    return Progress(int(status.get("mapsDone") or 0), int(status.get("maps") or 0),
                    int(status.get("reducesDone") or 0), int(reduces), 0, 0)


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded like kubectl's tabwriter (3 spaces between columns)."""
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    lines = ["   ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
             .rstrip() for row in (header, *rows)]
    return "\n".join(lines)


def list_table(items: Sequence[Mapping[str, Any]], all_namespaces: bool,
               now: datetime | None = None) -> str:
    """``kubectl get``-style table: [NAMESPACE] NAME PHASE MAPS REDUCES AGE."""
    now = now or datetime.now(UTC)
    header = ["NAME", "PHASE", "MAPS", "REDUCES", "AGE"]
    rows = []
    for obj in items:
        meta = obj["metadata"]
        progress = status_progress(obj)
        created = datetime.fromisoformat(str(meta["creationTimestamp"]).replace("Z", "+00:00"))
        row = [meta["name"], (obj.get("status") or {}).get("phase") or JobPhase.PENDING.value,
               f"{progress.maps_done}/{progress.maps_total}",
               f"{progress.reduces_done}/{progress.reduces_total}",
               human_duration((now - created).total_seconds())]
        rows.append([meta["namespace"], *row] if all_namespaces else row)
    return render_table(["NAMESPACE", *header] if all_namespaces else header, rows)


def describe(obj: Mapping[str, Any], tasks: Sequence[TaskRecord] = (),
             now: float | None = None) -> str:
    """``kubemr status`` as text: phase, progress, error and results, one field a line.

    With the job's task ``tasks`` (while its records exist: not once it has Succeeded),
    also each stage's rate and ETA, the backup tasks launched and won, the running
    attempts with their age and worker, the tasks that failed attempts with their last
    error, and the counters of the tasks
    committed so far. Ages and rates compare ``now`` (this machine's clock, Unix seconds)
    with the times workers wrote on theirs (``records.Attempt``).
    """
    meta, status = obj["metadata"], obj.get("status") or {}
    progress = status_progress(obj)
    phase = status.get("phase") or JobPhase.PENDING.value
    fields = [("Name", meta["name"]), ("Namespace", meta["namespace"]), ("Phase", phase)]
    steps = int((obj.get("spec") or {}).get("steps") or 1)
    step = int(status.get("step") or 0)
    if steps > 1:  # the maps and reduces below are the current step's
        fields.append(("Step", f"{step + 1}/{steps}"))
    now_ms = protocol.millis(datetime.now(UTC).timestamp() if now is None else now)
    current = [t for t in tasks if protocol.task_step(t) == step]
    fields += [("Maps", _stage(progress.maps_done, progress.maps_total,
                               [t for t in current if t["kind"] == TaskKind.MAP], now_ms)),
               ("Reduces", _stage(progress.reduces_done, progress.reduces_total,
                                  [t for t in current if t["kind"] == TaskKind.REDUCE],
                                  now_ms))]
    fields += _backups(tasks)
    if status.get("completionTime"):
        fields.append(("Completed", str(status["completionTime"])))
    if status.get("error"):
        fields.append(("Error", protocol.format_error(status["error"])))
    results = status.get("results") or []
    if results:
        fields.append(("Results", ""))
    width = max(len(label) for label, _ in fields) + 3  # "Label:" and two spaces
    lines = [f"{label + ':':<{width}}{value}".rstrip() for label, value in fields]
    lines += [f"  {result}" for result in results]
    lines += _running(tasks, now_ms) + _failures(tasks)
    totals = counters.read(status.get("counters")) or counters.total(
        t.get("counters") for t in tasks if t["state"] == TaskState.COMMITTED)
    if totals:
        lines.append(counters_table(totals))
    sample = skips.read(status.get("skipped"))
    if sample:
        lines.append(skipped_table(sample))
    return "\n".join(lines)


def _stage(done: int, total: int, tasks: Sequence[TaskRecord], now_ms: int) -> str:
    """``5/8   3 running   1.2/s   ETA 3s`` (``8/8   took 7s`` once done): the rate is
    tasks committed per second since the stage's first attempt started."""
    text = f"{done}/{total}"
    starts = [a["start"] for t in tasks for a in t.get("history") or []]
    if not starts:
        return text
    elapsed = max(now_ms - min(starts), 1) / 1000
    if done >= total:
        ends = [a.get("end", now_ms) for t in tasks for a in t.get("history") or []]
        return f"{text}   took {human_duration((max(ends) - min(starts)) / 1000)}"
    running = sum(t["state"] == TaskState.RUNNING for t in tasks)
    text += f"   {running} running"
    if not done:
        return text
    rate = done / elapsed
    return f"{text}   {rate:.2f}/s   ETA {human_duration((total - done) / rate)}"


def _rows(title: str, header: Sequence[str], rows: list[list[str]]) -> list[str]:
    """A titled, indented table of at most STATUS_ROWS rows ("" if there are none)."""
    if not rows:
        return []
    more = len(rows) - STATUS_ROWS
    table = render_table(header, rows[:STATUS_ROWS]).splitlines()
    return [f"{title}:", *(f"  {line}" for line in table),
            *([f"  ... and {more} more"] if more > 0 else [])]


def _running(tasks: Sequence[TaskRecord], now_ms: int) -> list[str]:
    """The running attempts, oldest first, with attempt, worker, age and a map's input (a
    batched map's first, and how many more splits it holds): the open entries
    of the running tasks' histories, so a task with a backup shows both of its attempts
    (a record written before histories shows its holder, age unknown)."""
    attempts: list[tuple[int | None, str, int, str, str]] = []
    for task in tasks:
        if task["state"] != TaskState.RUNNING:
            continue
        name, inputs = protocol.task_name(task), protocol.inputs_label(task) or "-"
        running = [a for a in task.get("history") or [] if "outcome" not in a]
        attempts += ([(a["start"], name, a["attempt"], a["worker"], inputs) for a in running]
                     or [(None, name, task["attempt"], task["worker"], inputs)])
    attempts.sort(key=lambda a: (now_ms if a[0] is None else a[0], a[1], a[2]))
    rows = [[name, str(attempt), worker,
             "-" if start is None else human_duration((now_ms - start) / 1000), inputs]
            for start, name, attempt, worker, inputs in attempts]
    return _rows("Running tasks", ["TASK", "ATTEMPT", "WORKER", "AGE", "INPUT"], rows)


def _backups(tasks: Sequence[TaskRecord]) -> list[tuple[str, str]]:
    """``Backups: 2 launched, 1 won`` once any backup task was launched (the job's tasks'
    ``backups`` and ``backupWon``)."""
    launched = sum(t.get("backups", 0) for t in tasks)
    won = sum(bool(t.get("backupWon")) for t in tasks)
    return [("Backups", f"{launched} launched, {won} won")] if launched else []


def _failures(tasks: Sequence[TaskRecord]) -> list[str]:
    """Tasks that failed attempts: state, failed attempts and the last error (one line)."""
    failing = sorted((t for t in tasks if t["failures"] and t["error"]),
                     key=lambda t: (t["state"] != TaskState.FAILED, protocol.task_name(t)))
    rows = [[protocol.task_name(t), t["state"], str(t["failures"]), skips.one_line(t["error"])]
            for t in failing]  # the failed tasks first
    return _rows("Failures", ["TASK", "STATE", "FAILED", "LAST ERROR"], rows)


def counters_table(totals: Mapping[str, Mapping[str, int]]) -> str:
    """A job's counters as Hadoop prints them: ``Counters:``, each group, its names."""
    return "\n".join(["Counters:", *counters.lines(totals)])


def skipped_table(sample: Sequence[Mapping[str, Any]]) -> str:
    """Skip mode's sample: ``Skipped records (sample):``, then one line per record."""
    return "\n".join(["Skipped records (sample):",
                      *skips.lines(skips.read(list(sample)))])
