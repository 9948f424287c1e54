"""`kubemr run`: a whole job on one machine, with no cluster (the embedded default).

The parent plans the job into an SQLite store, starts N worker *processes* (the same
runtime a pod runs, coordinating only through the store), draws progress from a watch on
that store, and publishes the results only once the job has Succeeded: results are staged
in a hidden directory next to the output and renamed into place, so a reader never sees a
partial output directory presented as complete. What may be replaced, and the lock that
keeps two runs off one output, live in :mod:`kubemr_async.outdir`.

Workers' stdout and stderr come back through a pipe: every line goes to the worker's log
file, and what user code printed is shown on stderr prefixed with the worker and task
(framework logs only with ``--verbose``). Workers die with the parent: PR_SET_PDEATHSIG
on Linux and, everywhere, EOF on a stdin pipe whose write end only the parent holds.
``--inline`` runs the same runtime in this process, user code on the main thread, so
``breakpoint()`` and profilers work. ``--metrics-port`` serves the workers' metrics from
this process: worker processes count into prometheus_client's multiprocess files in the
work directory, summed at each scrape (see :mod:`kubemr_async.metrics`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import anyio
import orjson

from . import counters, formats, logs, metrics, protocol, timeline
from .api import AnyJob, Commands, Job, load_spec_job, load_steps, step_reducer_count
from .deaths import CRASH_LOOP_DEATHS, STUCK_EXIT_CODE, death_cause
from .errors import JobFailed, OutputBusy, PermanentTaskError, UsageError
from .formats import SUCCESS_MARKER
from .inputs import Split, plan_inputs
from .outdir import (
    LOCK_STALE_SECONDS,
    LOGS_DIR,
    OutputLock,
    OutputState,
    check_output,
    check_page,
    hidden_path,
    locked,
    remove_stale,
    replace_output,
    write_page,
)
from .progress import ProgressBar
from .protocol import JobPhase, JobView
from .records import Counters, Skipped, TaskOutputs, TaskRecord
from .sampling import prepare_partitioner
from .signals import until_signalled
from .spec import DEFAULT_REDUCERS, MAX_WORKERS, WORKER_PROCESS_ENV, JobSpec, OutputFormat
from .state.sqlite import SQLiteStateStore
from .storage.fs import FileBlobStore
from .storage.urls import check_utf8_path, is_s3

__all__ = ["SUCCESS_MARKER", "LocalRunResult", "run_local"]

T = TypeVar("T")
#: An --inline run may sit in a debugger for as long as the user likes without its single
#: worker's lease running out (its heartbeats share the blocked loop).
INLINE_LEASE_SECONDS = 30 * 24 * 3600.0
#: Failed runs' logs kept under the log directory; older ones are pruned.
KEEP_FAILED_RUNS = 20
_RUN_DIR = re.compile(r"[a-z0-9-]+-[0-9a-f]{6}")
_DRAIN_SECONDS = 5.0
_LINE_LIMIT = 1 << 20


@dataclass(frozen=True)
class LocalRunResult:
    output: Path
    job: str
    parts: list[Path]
    seconds: float
    #: The job's counters (each committed task's, summed): also in the _SUCCESS manifest.
    counters: Counters = field(default_factory=dict)
    #: Skip mode: a sample of the records the job skipped (also in the manifest).
    skipped: list[Skipped] = field(default_factory=list)
    #: Backup attempts of stragglers launched, and those whose commit won (every step's).
    backups: int = 0
    backups_won: int = 0


def job_name_for(job_ref: str, name: str) -> str:
    """A generateName-style unique name: the job's name (or module stem) plus a suffix."""
    base = name or Path(job_ref.partition(":")[0]).stem.rsplit(".", 1)[-1]
    base = re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-")[:50] or "job"
    return f"{base}-{secrets.token_hex(3)}"


async def run_local(job_ref: str, inputs: Sequence[str], output: Path, *, workers: int = 2,
                    reducers: int = DEFAULT_REDUCERS, chunk_size: int, max_attempts: int,
                    lease_seconds: float, overwrite: bool = False,
                    args: dict[str, str] | None = None, progress: bool = True,
                    verbose: bool = False, inline: bool = False,
                    output_format: OutputFormat = "text",
                    memory: int | None = None,
                    commands: Commands | None = None,
                    max_skipped_records: int = 0,
                    splits_per_task: int = 1,
                    metrics_port: int | None = None,
                    timeline_page: Path | None = None,
                    speculative: bool = True,
                    task_timeout: float | None = None) -> LocalRunResult:
    """Run ``job_ref`` over ``inputs`` and publish results in ``output``.

    ``commands``: shell-command steps (``--mapper`` ...) replacing the module's, or the
    whole job with ``job_ref`` empty. ``metrics_port``: serve /metrics on localhost there
    while the job runs. ``timeline_page``: where to write the job's timeline (an HTML page
    of its attempts, :mod:`kubemr_async.timeline`) once it ends, whichever way.

    JobFailed on failure; Interrupted (after stopping workers and cleaning up) on SIGINT or
    SIGTERM. ``workers=0`` means ``inline``.
    """
    return await until_signalled(_run(
        job_ref, inputs, output, workers=workers, reducers=reducers, chunk_size=chunk_size,
        max_attempts=max_attempts, lease_seconds=lease_seconds, overwrite=overwrite,
        args=args or {}, progress=progress, verbose=verbose, inline=inline or workers == 0,
        output_format=output_format, memory=memory, commands=commands,
        max_skipped_records=max_skipped_records, splits_per_task=splits_per_task,
        metrics_port=metrics_port, timeline_page=timeline_page, speculative=speculative,
        task_timeout=task_timeout))


async def _run(job_ref: str, inputs: Sequence[str], output: Path, *, workers: int,
               reducers: int, chunk_size: int, max_attempts: int, lease_seconds: float,
               overwrite: bool, args: dict[str, str], progress: bool, verbose: bool,
               inline: bool, output_format: OutputFormat,
               memory: int | None = None, commands: Commands | None = None,
               max_skipped_records: int = 0, splits_per_task: int = 1,
               metrics_port: int | None = None,
               timeline_page: Path | None = None,
               speculative: bool = True,
               task_timeout: float | None = None) -> LocalRunResult:
    if not 0 <= workers <= MAX_WORKERS:
        raise UsageError(f"--workers must be between 0 (runs --inline) and {MAX_WORKERS}, "
                         f"got {workers}")
    started = time.monotonic()
    if timeline_page is not None:  # refuse a file kubemr did not write before running
        check_page(timeline_page, timeline.MARKER)
    commands = commands or Commands()
    output, (title, steps), job_ref = await asyncio.to_thread(_prepare, output, job_ref,
                                                              reducers, commands)
    job = steps[0]
    name = job_name_for(job_ref, title)
    spec = JobSpec(name=name if len(steps) == 1 else _step_name(name, 0), job=job_ref,
                   inputs=tuple(inputs), reducers=step_reducer_count(job, reducers),
                   mapper=commands.mapper, combiner=commands.combiner,
                   reducer=commands.reducer,
                   max_attempts=max_attempts,
                   lease_seconds=max(lease_seconds, INLINE_LEASE_SECONDS) if inline
                   else lease_seconds,
                   chunk_size=chunk_size, args=args, split_inputs=isinstance(job, Job),
                   output_format=output_format, memory=memory, steps=len(steps),
                   max_skipped_records=max_skipped_records, speculative=speculative,
                   splits_per_task=splits_per_task, task_timeout=task_timeout)
    splits = await plan_inputs(spec, job.map_input if isinstance(job, Job) else None)
    input_paths = _local_paths(inputs, splits)
    check_output(output, overwrite, input_paths)  # refuse before creating anything
    output.parent.mkdir(parents=True, exist_ok=True)
    with locked(output) as lock:
        remove_stale(output)  # what a SIGKILLed run into this output left behind
        expected = check_output(output, overwrite, input_paths)
        work = hidden_path(output, "work")
        work.mkdir()
        endpoint: metrics.Endpoint | None = None
        run: _Run | None = None
        try:
            endpoint, metrics_dir = _serve_metrics(metrics_port, work, inline)
            run = _Run(work, output, (lock, expected), workers, progress, verbose, inline,
                       started, name, reducers, output_format, steps, title, metrics_dir)
            return await run.all_steps(spec, splits)
        finally:
            if endpoint is not None:
                endpoint.close()
            shutil.rmtree(work, ignore_errors=True)
            if timeline_page is not None and run is not None:
                run.write_timeline(timeline_page)


def _serve_metrics(port: int | None, work: Path,
                   inline: bool) -> tuple[metrics.Endpoint | None, Path | None]:
    """The run's /metrics on localhost, and the directory worker processes count into
    (None inline: the worker counts in this process)."""
    if port is None:
        return None, None
    directory = None if inline else work / "metrics"
    try:
        if directory is None:
            return metrics.Endpoint(port, "127.0.0.1"), None
        directory.mkdir()
        registry = metrics.multiprocess_registry(directory)
        return metrics.Endpoint(port, "127.0.0.1", registry), directory
    except OSError as exc:
        raise UsageError(f"--metrics-port {port}: {exc.strerror or exc}") from None


def _prepare(output: Path, job_ref: str, reducers: int,
             commands: Commands) -> tuple[Path, tuple[str, list[AnyJob]], str]:
    """Checks that need no worker: the job module loads, every step of it (fail fast,
    before any process)."""
    try:
        output = output.resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop is a RuntimeError before 3.13
        reason = exc.strerror if isinstance(exc, OSError) else "a symlink loop"
        raise UsageError(f"output {output} cannot be resolved: {reason}") from None
    check_utf8_path(str(output), "output")
    steps = load_steps(job_ref, reducers, commands)
    if job_ref.endswith(".py"):  # workers may run from another directory
        job_ref = str(Path(job_ref).resolve())
        check_utf8_path(job_ref, "job module")
    return output, steps, job_ref


def _step_name(name: str, index: int) -> str:
    """The record set of step ``index`` of a multi-step run (one per step, in one store)."""
    return f"{name}-s{index + 1}"


def _local_paths(inputs: Sequence[str], splits: list[Split]) -> set[Path]:
    """Resolved local inputs: the arguments that name paths, and every expanded file."""
    found = {Path(url).resolve() for url, _ in splits if not is_s3(url)
             and os.path.lexists(url)}
    found |= {Path(text).resolve() for text in inputs if not is_s3(text)
              and os.path.lexists(text)}
    return found


@dataclass
class _Run:
    """One `kubemr run` in its work directory: the job's steps in order, then publishing.

    Each step is a job of its own in the run's store (``<name>-s<N>`` when there are
    several), with its own workers and blob directory; a step's parts (``parquet``) are
    the next step's inputs, read as (key, value) pairs, and are deleted once that step
    has committed. Only the last step's parts are published.
    """

    work: Path
    output: Path
    held: tuple[OutputLock, OutputState]
    workers: int
    progress: bool
    verbose: bool
    inline: bool
    started: float
    name: str
    reducers: int
    output_format: OutputFormat
    steps: list[AnyJob]
    title: str
    #: Where worker processes count their metrics (None: no metrics served).
    metrics_dir: Path | None
    router: _LogRouter = field(init=False)
    #: Every task record of the steps run so far, as they ended (for the timeline).
    tasks: list[TaskRecord] = field(default_factory=list)
    #: How the run ended, for the timeline's subtitle.
    outcome: str = "Interrupted"

    def __post_init__(self) -> None:
        self.router = _LogRouter(self.verbose)

    def write_timeline(self, page: Path) -> None:
        """The run's timeline page: every attempt of every step that ran."""
        text = timeline.render(self.name, timeline.kept(self.tasks), protocol.millis(time.time()),
                               self.outcome)
        write_page(page, text, timeline.MARKER)

    def label(self, index: int) -> str:
        """``step 2/3 (top)``: how progress and errors name a step ("" for one step)."""
        if len(self.steps) == 1:
            return ""
        step_name = self.steps[index].name
        return f"step {index + 1}/{len(self.steps)}" + (f" ({step_name})" if step_name else "")

    async def all_steps(self, spec: JobSpec, splits: list[Split]) -> LocalRunResult:
        step_counters: list[Counters] = []
        skipped: list[Skipped] = []
        previous: Path | None = None
        view: JobView | None = None
        backups = [0, 0]
        for index, job in enumerate(self.steps):
            if view is not None:
                spec = dataclasses.replace(
                    spec, name=_step_name(self.name, index), step=index,
                    inputs=_step_inputs(view, previous),
                    reducers=step_reducer_count(job, self.reducers))
                splits = await plan_inputs(spec, job.map_input if isinstance(job, Job) else None)
            blobs = self.work / ("blobs" if len(self.steps) == 1 else f"blobs-{index + 1}")
            view = await self._step(index, spec, splits, job, blobs)
            if previous is not None:  # this step has committed: its input is no longer needed
                await asyncio.to_thread(shutil.rmtree, previous, True)
            previous = blobs
            assert view.job is not None
            step_counters.append(view.job.get("counters") or {})
            progress = view.progress()
            backups = [backups[0] + progress.backups, backups[1] + progress.backups_won]
            skipped += view.job.get("skipped") or []
        assert view is not None and view.job is not None and previous is not None
        totals = counters.total(step_counters)
        extra: dict[str, object] = (
            {"steps": len(self.steps), "stepCounters": step_counters}
            if len(self.steps) > 1 else {})
        if skipped:
            extra["skipped"] = skipped
        parts = _publish(view.job["results"], self.work, previous, self.output, self.name,
                         spec.job, time.monotonic() - self.started, self.held,
                         spec.output_format, totals, extra)
        return LocalRunResult(self.output, self.name, parts, time.monotonic() - self.started,
                              totals, skipped, *backups)

    async def _step(self, index: int, spec: JobSpec, splits: list[Split], job: AnyJob,
                    blobs: Path) -> JobView:
        """Run one step to its verdict; JobFailed naming the step unless it Succeeded."""
        work, name, label = self.work, spec.name, self.label(index)
        store = SQLiteStateStore(work / "state.db")
        try:
            try:
                # Total-order jobs: sample the keys and write the boundaries before any map.
                spec = await prepare_partitioner(job, spec, splits,
                                                 str(work / f"partition-file-{index + 1}"))
                await store.create(name, [(protocol.JOB_KEY, protocol.new_job(spec))])
                await store.create(name, protocol.plan(spec, splits))
                records, _ = await store.snapshot(name)
                await store.patch(name, protocol.start_job(
                    records[protocol.JOB_KEY].job, protocol.map_count(spec, len(splits))))
                if self.inline:
                    view = await _run_inline(store, name, job, blobs, self.verbose)
                else:
                    view = await _supervise(store, name, work, blobs, self.workers,
                                            self.progress, self.router, label,
                                            self.metrics_dir)
            finally:
                await store.aclose()
        except BaseException:
            _keep_failed_logs(work, self.name)
            raise
        self.tasks += view.every_task()
        self.outcome = view.phase.value
        if view.phase != JobPhase.SUCCEEDED:
            kept = _keep_failed_logs(work, self.name)
            raise JobFailed(_failure(self.name, view, self.workers, self.router, kept, label))
        return view


def _step_inputs(view: JobView, blobs: Path | None) -> tuple[str, ...]:
    """The previous step's committed parts: the next step's inputs."""
    assert view.job is not None and blobs is not None
    parts = tuple(r for r in view.job["results"] if isinstance(r, str))
    return parts or (str(blobs),)


def _failure(name: str, view: JobView, workers: int, router: _LogRouter,
             kept: Path | None, step: str = "") -> str:
    """One line: what failed, and the log that holds the failing attempt."""
    if not view.phase.finished:
        reason = (f"all {workers} workers exited before the job finished"
                  f"{': ' + router.last_line if router.last_line else ''}")
    else:
        reason = protocol.format_error(view.job["error"] if view.job else None)
        reason = f"{view.phase.value.lower()}: {reason}"
    message = f"job {name} {step + ' ' if step else ''}{reason}"
    if kept is None:
        return message
    error = view.job["error"] if view.job else None
    index = router.attempts.get((error["task"], error["attempt"])) if error else None
    log = kept / f"worker-{index}.log" if index is not None else None
    return f"{message}; log: {log}" if log and log.exists() else f"{message}; logs: {kept}"


# --- the worker processes ----------------------------------------------------------------


async def _supervise(store: SQLiteStateStore, name: str, work: Path, blobs: Path, count: int,
                     show_progress: bool, router: _LogRouter, label: str = "",
                     metrics_dir: Path | None = None) -> JobView:
    """Start the workers, replace those that die, follow the job to its verdict, and stop
    them all either way."""
    (work / "logs").mkdir(exist_ok=True)  # a multi-step run's steps append to one per worker
    crew = _Crew(store, name, work, blobs, router, count, metrics_dir)
    bar = ProgressBar(label) if show_progress else None
    try:
        async with anyio.create_task_group() as group:
            for index in range(count):
                group.start_soon(crew.keep, index, group)
            try:
                view = await crew.follow(bar)
            finally:
                crew.stopping = True
                await _stop_workers(list(crew.procs.values()))
                # Pipes close when the workers exit, unless a process they spawned holds
                # one: give the pumps a moment to drain, then cancel what is left.
                group.cancel_scope.deadline = anyio.current_time() + _DRAIN_SECONDS
    finally:
        crew.stopping = True
        await _stop_workers(list(crew.procs.values()))
        if bar:
            bar.close()
    if not view.phase.finished:
        # Workers may have stamped the verdict an instant before exiting: read it back.
        records, _ = await store.snapshot(name)
        view = JobView({key: rec.body for key, rec in records.items()})
    return view


@dataclass
class _Crew:
    """One step's worker processes, each slot restarted when its process dies, as
    Kubernetes restarts a pod's container.

    A dead process can write nothing more, so its claimed tasks are failed at once (a
    guarded ``protocol.fail`` as that worker and attempt, counted against
    ``maxAttempts`` like a lapsed lease) instead of waiting a lease for a takeover.
    Deaths in a row with no commit in between end the job once they reach
    ``CRASH_LOOP_DEATHS`` times the number of slots, naming the last one's cause.
    """

    store: SQLiteStateStore
    name: str
    work: Path
    blobs: Path
    router: _LogRouter
    count: int
    #: Where worker processes count their metrics (None: no metrics served).
    metrics_dir: Path | None = None
    procs: dict[int, asyncio.subprocess.Process] = field(default_factory=dict)
    stopping: bool = False
    view: JobView = field(default_factory=JobView)
    #: Deaths since a task last committed, and the committed count at the last death.
    deaths: int = 0
    committed: int = 0
    _gone: int = 0
    _all_gone: anyio.Event = field(default_factory=anyio.Event)

    async def follow(self, bar: ProgressBar | None) -> JobView:
        """Watch the job until it is decided or every worker has left for good."""
        records, revision = await self.store.snapshot(self.name)
        self.view = view = JobView({key: rec.body for key, rec in records.items()})

        async def watch() -> None:
            async for event in self.store.watch(self.name, revision):
                view.update(event.record.key, event.record.body)
                if bar:
                    bar.update(view.progress())
                if view.phase.finished:
                    return

        # Whichever ends first (the verdict, or the last worker gone) ends the other.
        async with anyio.create_task_group() as group:
            async def first(wait: Callable[[], Awaitable[Any]]) -> None:
                await wait()
                group.cancel_scope.cancel()

            group.start_soon(first, watch)
            group.start_soon(first, self._all_gone.wait)
        return view

    async def keep(self, index: int, group: anyio.abc.TaskGroup) -> None:
        """Run worker slot ``index``: a process, and a new one each time it dies."""
        generation = 0
        try:
            while not self.stopping:
                worker_id = f"local-{index}" + (f"-r{generation}" if generation else "")
                oom_before = _oom_kills()
                self.router.last_lines.pop(index, None)  # not the previous process's line
                proc = await _spawn_worker(self.work, self.name, index, self.blobs,
                                           self.metrics_dir, worker_id)
                self.procs[index] = proc
                pumped = anyio.Event()
                group.start_soon(_pump, proc, index, self.work, self.router, pumped)
                code = await _exited(proc)
                if self.stopping or (code == 0 and await self._decided()):
                    return  # stopped by us, or the job was decided
                if proc.stdin is not None:  # its watchdog pipe: a new process gets its own
                    proc.stdin.close()
                with anyio.move_on_after(1.0):  # its last lines, for the cause
                    await pumped.wait()
                oom = oom_before is not None and (_oom_kills() or 0) > oom_before
                cause = death_cause(code, self.router.last_lines.get(index, ""), oom)
                await self._fail_claims(worker_id, cause)
                if code != STUCK_EXIT_CODE and await self._crash_loop(worker_id, cause):
                    return
                self.router.notice(index, f"worker {worker_id} {cause}; starting another")
                generation += 1
        finally:
            self._gone += 1
            if self._gone == self.count:
                self._all_gone.set()

    async def _decided(self) -> bool:
        """Whether the job has its verdict. A worker exits 0 once it has seen it, so an
        exit 0 before (user code calling ``os._exit(0)``) is a death like any other: taken
        for the end, it left the attempt unfailed and the job ended as "all workers
        exited", naming no task."""
        records, _ = await self.store.snapshot(self.name)
        return JobPhase(records[protocol.JOB_KEY].job["phase"]).finished

    async def _fail_claims(self, worker_id: str, cause: str) -> None:
        """Fail the attempts the dead worker held: it can never renew or commit them."""
        records, _ = await self.store.snapshot(self.name)
        max_attempts = int(records[protocol.JOB_KEY].job["spec"]["maxAttempts"])
        held = [(record.task, attempt) for key, record in records.items()
                if key != protocol.JOB_KEY
                and (attempt := protocol.running_attempt(record.task, worker_id)) is not None]
        for task, attempt in held:
            message = f"worker {worker_id} died during attempt {attempt}: {cause}"
            await self.store.patch(self.name, protocol.fail(task, worker_id, message,
                                                            max_attempts, now=time.time()))

    async def _crash_loop(self, worker_id: str, cause: str) -> bool:
        """Count a death; at the limit fail the job naming the cause. True if it ended."""
        progress = self.view.progress()
        committed = progress.maps_done + progress.reduces_done
        self.deaths = self.deaths + 1 if committed == self.committed else 1
        self.committed = committed
        if self.deaths < CRASH_LOOP_DEATHS * self.count:
            return False
        records, _ = await self.store.snapshot(self.name)
        job = records[protocol.JOB_KEY].job
        if not JobPhase(job["phase"]).finished:
            reason = (f"workers died {self.deaths} times in a row with no task committing; "
                      f"the last, {worker_id}, {cause}")
            await self.store.patch(self.name, protocol.abort(job, JobPhase.FAILED, reason))
        return True


def _oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has killed in this process's cgroup
    (v2 ``memory.events``), or None where that cannot be read."""
    try:
        groups = Path("/proc/self/cgroup").read_text().splitlines()
        path = next(line[3:] for line in groups if line.startswith("0::"))
        for line in Path(f"/sys/fs/cgroup{path}/memory.events").read_text().splitlines():
            field_name, _, value = line.partition(" ")
            if field_name == "oom_kill":
                return int(value)
    except (OSError, StopIteration, ValueError):
        return None
    return None


async def _spawn_worker(work: Path, name: str, index: int, blobs: Path | None = None,
                        metrics_dir: Path | None = None, worker_id: str = ""
                        ) -> asyncio.subprocess.Process:
    """A worker process whose output comes back on one pipe and whose stdin is a watchdog."""
    # print() lines arrive as they happen; the allocator settings keep RSS near the budget.
    env = {**WORKER_PROCESS_ENV, **os.environ, "PYTHONUNBUFFERED": "1"}
    if metrics_dir is not None:
        env[metrics.MULTIPROCESS_ENV] = str(metrics_dir)
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kubemr_async.local", "--state", str(work / "state.db"),
        "--blobs", str(blobs or work / "blobs"), "--job", name,
        "--worker-id", worker_id or f"local-{index}",
        "--parent-pid", str(os.getpid()),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env=env, limit=_LINE_LIMIT,
        process_group=0)  # what its user code starts is killed with it (see _exited)


async def _exited(proc: asyncio.subprocess.Process) -> int:
    """A worker's exit code, once it has exited and its process group has been killed.

    A process its user code started (a ``subprocess.Popen`` a timed-out map was waiting
    for, which the worker cannot stop) is in the worker's process group, and has its
    output pipe: it outlived the worker, and ``proc.wait()``, which returns only once the
    pipes are closed too, kept ``kubemr run`` waiting for it (for ever, for a daemon).
    So the exit itself is watched (a pidfd), and then what is left of the group killed.
    Where there are no pidfds (not Linux), the pipes are waited for as before.
    """
    if proc.returncode is None and hasattr(os, "pidfd_open"):
        with contextlib.suppress(ProcessLookupError):  # already exited and reaped
            pidfd = os.pidfd_open(proc.pid)
            try:
                exited = asyncio.Event()
                loop = asyncio.get_running_loop()
                loop.add_reader(pidfd, exited.set)
                try:
                    await exited.wait()
                finally:
                    loop.remove_reader(pidfd)
            finally:
                os.close(pidfd)
    with contextlib.suppress(ProcessLookupError):  # nothing of the group is left
        os.killpg(proc.pid, signal.SIGKILL)
    return await proc.wait()


async def _stop_workers(procs: list[asyncio.subprocess.Process]) -> None:
    """SIGTERM and the end of stdin (workers hand their claims back; either one stops a
    worker, and a signal can be lost to a full wakeup pipe), then SIGKILL what is left."""
    for proc in procs:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        if proc.stdin is not None:
            proc.stdin.close()
    with anyio.move_on_after(10.0):
        for proc in procs:
            await _exited(proc)
    for proc in procs:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await _exited(proc)


async def _pump(proc: asyncio.subprocess.Process, index: int, work: Path,
                router: _LogRouter, done: anyio.Event) -> None:
    """Copy one worker's output into its log file, showing what the user should see;
    ``done`` once the output ended."""
    try:
        await _copy_output(proc, index, work, router)
    finally:
        done.set()


async def _copy_output(proc: asyncio.subprocess.Process, index: int, work: Path,
                       router: _LogRouter) -> None:
    assert proc.stdout is not None
    stream = proc.stdout
    log = await asyncio.to_thread(open, work / "logs" / f"worker-{index}.log", "ab")
    with log:
        while True:
            try:
                line = await stream.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                line = exc.partial
            except asyncio.LimitOverrunError as exc:
                line = await stream.read(exc.consumed)
            if not line:
                return
            log.write(line)
            log.flush()
            router.route(index, line)


@dataclass
class _LogRouter:
    """Decides what a worker's output line shows on stderr, and tracks who ran what."""

    verbose: bool
    current: dict[int, str] = field(default_factory=dict)
    attempts: dict[tuple[str, int], int] = field(default_factory=dict)
    last_line: str = ""
    #: Each worker slot's last non-blank line (a dead worker's is part of its cause).
    last_lines: dict[int, str] = field(default_factory=dict)
    out: IO[str] | None = None

    def route(self, index: int, raw: bytes) -> None:
        text = raw.decode(errors="replace").rstrip("\r\n")
        entry = _structured(raw)
        if text.strip():
            self.last_line = text[-300:]
            self.last_lines[index] = text[-300:] if entry is None else " ".join(
                f"{name}={entry[name]}" for name in ("level", "msg", "task", "attempt", "error")
                if name in entry)
        if entry is None:  # print(), sys.stderr, a subprocess: the user's own output
            self._show(index, self.current.get(index), text)
            return
        if logs.is_framework(str(entry["logger"])):
            self._track(index, entry)
            if self.verbose:
                self._show(index, entry.get("task"), text)
            return
        message = str(entry.get("msg", ""))
        level = str(entry.get("level", "info"))
        if level not in ("info", "debug"):
            message = f"{level}: {message}"
        if entry.get("exc"):
            message += "\n" + str(entry["exc"])
        for line in message.splitlines() or [""]:
            self._show(index, entry.get("task") or self.current.get(index), line)

    def _track(self, index: int, entry: dict[str, Any]) -> None:
        task, msg = entry.get("task"), entry.get("msg")
        if not isinstance(task, str):
            return
        if msg == "claimed":
            self.current[index] = task
            self.attempts[(task, int(entry.get("attempt", 0)))] = index
        elif self.current.get(index) == task and msg != "lease renewal failed; retrying":
            del self.current[index]  # committed, failed, released or abandoned

    def notice(self, index: int, line: str) -> None:
        """A line from `kubemr run` itself about worker ``index`` (a death, a restart)."""
        self._show(index, None, line)

    def _show(self, index: int, task: Any, line: str) -> None:
        prefix = f"[w{index} {task}]" if isinstance(task, str) and task else f"[w{index}]"
        out = self.out or sys.stderr
        out.write(f"{prefix} {line}\n")
        out.flush()


def _structured(raw: bytes) -> dict[str, Any] | None:
    """A JSON log line written by :mod:`kubemr_async.logs`, or None for anything else."""
    if not raw.startswith(b'{"ts":'):
        return None
    try:
        entry = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("logger"), str):
        return None
    return entry


def log_root() -> Path:
    """Where failed runs keep their worker logs: outside the user's data."""
    configured = os.environ.get("KUBEMR_LOG_DIR")
    if configured:
        return Path(configured)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "kubemr" / "runs"


def _keep_failed_logs(work: Path, name: str) -> Path | None:
    """Move a failed run's worker logs to ``log_root()/<job>/``; prune the oldest runs."""
    source = work / "logs"
    if not source.is_dir() or not any(source.iterdir()):
        return None
    root = log_root()
    target = root / name
    try:
        target.mkdir(parents=True, exist_ok=True)
        for log in source.iterdir():
            shutil.move(str(log), target / log.name)
        runs = sorted((p for p in root.iterdir() if _RUN_DIR.fullmatch(p.name)
                       and stat.S_ISDIR(p.lstat().st_mode)),
                      key=lambda p: p.stat().st_mtime, reverse=True)
        for old in runs[KEEP_FAILED_RUNS:]:
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    except OSError:
        return None
    return target


def _publish(results: Sequence[TaskOutputs | None], work: Path, blob_dir: Path, output: Path,
             name: str, job_ref: str, seconds: float, held: tuple[OutputLock, OutputState],
             output_format: OutputFormat, totals: Counters,
             extra: Mapping[str, object] | None = None) -> list[Path]:
    """Move result files (and the workers' logs) into a staging directory, then swap it in
    (only while this run still holds the output's lock, over what was checked at start)."""
    staging = work / "publish"
    staging.mkdir()
    blobs = blob_dir.resolve()
    parts = []
    # A part's result is where the part will be, not where the workers wrote it (the work
    # directory is removed once the run ends); a low-level job's results are its reduces'
    # own values, kept as they are.
    published: list[object] = []
    for partition, result in enumerate(results):
        source = Path(result) if isinstance(result, str) else None  # parts are file paths
        if (source is not None and source.is_absolute() and blobs in source.parents
                and source.is_file()):
            target = staging / formats.part_name(partition, output_format)
            os.replace(source, target)
            parts.append(output / target.name)
            published.append(str(parts[-1]))
        else:
            published.append(result)
    if (work / "logs").is_dir():
        os.replace(work / "logs", staging / LOGS_DIR)
    (staging / SUCCESS_MARKER).write_bytes(formats.manifest(
        name, output_format, published, [p.name for p in parts],
        [(staging / p.name).stat().st_size for p in parts], module=job_ref,
        seconds=round(seconds, 3), counters=totals, **(extra or {})))
    lock, expected = held
    if not lock.held():
        raise OutputBusy(f"output {output}: this run's lock was taken over (not refreshed for "
                         f"{LOCK_STALE_SECONDS:.0f} s); nothing was replaced")
    replace_output(staging, output, expected)
    return parts


# --- --inline --------------------------------------------------------------------------


async def _run_inline(store: SQLiteStateStore, name: str, job: AnyJob, blobs: Path,
                      verbose: bool) -> JobView:
    """The whole job in this process: one Worker, user callbacks on this thread's loop."""
    from .runtime import Worker

    logs.setup_console(verbose)
    worker = Worker(name, job, store, FileBlobStore(blobs), "inline-0", inline=True)
    await worker.run()
    records, _ = await store.snapshot(name)
    return JobView({key: rec.body for key, rec in records.items()})


# --- the worker process ----------------------------------------------------------------


def _no_breakpoint(*args: Any, **kwargs: Any) -> None:
    """sys.breakpointhook in worker processes: there is no terminal to debug on."""
    raise PermanentTaskError("breakpoint() cannot stop in a worker process; debug the job "
                             "with `kubemr run --inline` (one process, your terminal)")


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGTERM us when the parent dies, then close the race with getppid()."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if parent_pid and os.getppid() != parent_pid:
        sys.exit(0)  # the parent died before the request took effect


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: Any) -> None:
    """EOF on stdin (the parent's pipe) means the parent is gone: stop gracefully."""
    fd = 0
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
    except OSError:
        return

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            stop()

    loop.add_reader(fd, readable)


async def _worker_main(state: str, blobs: str, job_name: str, worker_id: str) -> int:
    from .runtime import Worker

    store = SQLiteStateStore(state)
    try:
        records, _ = await store.snapshot(job_name)
        spec = JobSpec.from_dict(job_name, records[protocol.JOB_KEY].job["spec"])
        job = load_spec_job(spec)
        worker = Worker(job_name, job, store, FileBlobStore(blobs), worker_id)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, worker.stop)
        # asyncio's wakeup pipe also carries a byte per call_soon_threadsafe (every store
        # and file operation done in a thread): on a busy machine it can be full when the
        # SIGTERM comes, and Python then prints a traceback into the user's output. The
        # signal is lost either way; stdin's end (below), which the parent closes with its
        # SIGTERM, stops the worker all the same.
        signal.set_wakeup_fd(signal.set_wakeup_fd(-1), warn_on_full_buffer=False)
        _watch_stdin(loop, worker.stop)
        try:
            await worker.run()
            if worker.stuck:
                return STUCK_EXIT_CODE
        finally:
            # Done: a SIGTERM from now on has nothing to stop. Ignore it before the loop
            # closes its wakeup pipe, or one landing in between prints a traceback.
            loop.remove_signal_handler(signal.SIGTERM)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return 0
    finally:
        await store.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubemr_async.local",
                                     description="one local worker (started by `kubemr run`)")
    parser.add_argument("--state", required=True)
    parser.add_argument("--blobs", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--parent-pid", type=int, default=0)
    ns = parser.parse_args(argv)
    # Ctrl-C reaches the whole process group; the parent decides how workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(ns.parent_pid)
    sys.breakpointhook = _no_breakpoint
    logs.setup(os.environ.get("KUBEMR_LOG_LEVEL", "INFO"))
    logging.captureWarnings(True)
    code = asyncio.run(_worker_main(ns.state, ns.blobs, ns.job, ns.worker_id))
    if code == STUCK_EXIT_CODE:
        from .runtime import exit_stuck

        exit_stuck()
    return code


if __name__ == "__main__":
    sys.exit(main())
