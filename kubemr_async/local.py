"""`kubemr run`: a whole job on one machine, with no cluster (the embedded default).

The parent plans the job into an SQLite store, starts N worker *processes* (the same
runtime a pod runs, coordinating only through the store), draws progress from a watch on
that store, and publishes the results only once the job has Succeeded: results are moved
into a temporary directory next to the output and renamed into place, so a reader never
sees a partial output directory presented as complete.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from . import formats, logs, protocol
from .api import AnyJob, Job, load_job
from .errors import JobFailed, UsageError
from .inputs import plan_inputs
from .progress import ProgressBar
from .protocol import JobPhase, JobView
from .spec import JobSpec, OutputFormat
from .state.sqlite import SQLiteStateStore
from .storage.fs import FileBlobStore

SUCCESS_MARKER = formats.SUCCESS_MARKER


@dataclass(frozen=True)
class LocalRunResult:
    output: Path
    job: str
    parts: list[Path]
    seconds: float


def job_name_for(job_ref: str, name: str) -> str:
    """A generateName-style unique name: the job's name (or module stem) plus a suffix."""
    base = name or Path(job_ref.partition(":")[0]).stem.rsplit(".", 1)[-1]
    base = re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-")[:50] or "job"
    return f"{base}-{secrets.token_hex(3)}"


def check_output(output: Path, overwrite: bool) -> None:
    if output.exists():
        if not output.is_dir():
            raise UsageError(f"output {output} exists and is not a directory")
        if any(output.iterdir()) and not overwrite:
            raise UsageError(
                f"output directory {output} already holds results; pass --overwrite to replace it")


async def run_local(job_ref: str, inputs: Sequence[str], output: Path, *, workers: int = 2,
                    reducers: int = 1, chunk_size: int, max_attempts: int,
                    lease_seconds: float, overwrite: bool = False,
                    args: dict[str, str] | None = None, progress: bool = True,
                    output_format: OutputFormat = "text") -> LocalRunResult:
    """Run ``job_ref`` over ``inputs`` and publish results in ``output``; JobFailed on failure."""
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    started = time.monotonic()
    output, job, job_ref = await asyncio.to_thread(_prepare, output, overwrite, job_ref)
    name = job_name_for(job_ref, job.name)
    spec = JobSpec(name=name, job=job_ref, inputs=tuple(inputs), reducers=reducers,
                   max_attempts=max_attempts, lease_seconds=lease_seconds,
                   chunk_size=chunk_size, args=args or {}, split_inputs=isinstance(job, Job),
                   output_format=output_format)
    splits = await plan_inputs(spec)

    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.kubemr-", dir=output.parent))
    try:
        store = SQLiteStateStore(work / "state.db")
        try:
            await store.create(name, [(protocol.JOB_KEY, protocol.new_job(spec))])
            await store.create(name, protocol.plan(spec, splits))
            records, _ = await store.snapshot(name)
            await store.patch(name, protocol.start_job(records[protocol.JOB_KEY].body,
                                                       len(splits)))
            view = await _supervise(store, name, work, workers, progress)
        finally:
            await store.aclose()
        if view.phase != JobPhase.SUCCEEDED:
            raise JobFailed(f"job {name} {view.phase.value.lower()}: "
                            f"{protocol.format_error(view.job['error'] if view.job else None)}")
        assert view.job is not None
        parts = _publish(view.job["results"], work, output, name, job_ref,
                         time.monotonic() - started, spec.output_format)
        return LocalRunResult(output, name, parts, time.monotonic() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _prepare(output: Path, overwrite: bool, job_ref: str) -> tuple[Path, AnyJob, str]:
    """Checks that need no worker: the output is free and the job module loads."""
    output = output.resolve()
    check_output(output, overwrite)
    job = load_job(job_ref)  # fail fast, before any process starts
    if job_ref.endswith(".py"):  # workers may run from another directory
        job_ref = str(Path(job_ref).resolve())
    return output, job, job_ref


async def _supervise(store: SQLiteStateStore, name: str, work: Path, count: int,
                     show_progress: bool) -> JobView:
    """Start the workers, follow the job to its verdict, and stop them all either way."""
    procs = [await _spawn_worker(work, name, i) for i in range(count)]
    records, revision = await store.snapshot(name)
    view = JobView({key: rec.body for key, rec in records.items()})
    bar = ProgressBar() if show_progress else None
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted.set)

    async def follow() -> None:
        async for event in store.watch(name, revision):
            view.update(event.record.key, event.record.body)
            if bar:
                bar.update(view.progress())
            if view.phase.finished:
                return

    async def all_exited() -> None:
        await asyncio.gather(*(p.wait() for p in procs))

    waiters = [asyncio.create_task(c) for c in (follow(), all_exited(), interrupted.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await _stop_workers(procs)
        if bar:
            bar.close()
    if interrupted.is_set() and not view.phase.finished:
        raise JobFailed(f"job {name} interrupted")
    if not view.phase.finished:
        # Workers may have stamped the verdict an instant before exiting: read it back.
        records, _ = await store.snapshot(name)
        view = JobView({key: rec.body for key, rec in records.items()})
    if not view.phase.finished:
        codes = ", ".join(str(p.returncode) for p in procs)
        tail = _log_tail(work)
        raise JobFailed(f"job {name}: all {count} workers exited (codes {codes}) before the job "
                        f"finished{': ' + tail if tail else ''}")
    return view


async def _spawn_worker(work: Path, name: str, index: int) -> asyncio.subprocess.Process:
    log = await asyncio.to_thread(open, work / f"worker-{index}.log", "wb")
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kubemr_async.local", "--state", str(work / "state.db"),
            "--blobs", str(work / "blobs"), "--job", name, "--worker-id", f"local-{index}",
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
    finally:
        log.close()


async def _stop_workers(procs: list[asyncio.subprocess.Process]) -> None:
    """SIGTERM (workers hand their claims back), then SIGKILL whatever is left."""
    for proc in procs:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
    try:
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), 10.0)
    except TimeoutError:
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        await asyncio.gather(*(p.wait() for p in procs))


def _log_tail(work: Path) -> str:
    for log in sorted(work.glob("worker-*.log")):
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return lines[-1][-300:]
    return ""


def _publish(results: list[str], work: Path, output: Path, name: str, job_ref: str,
             seconds: float, output_format: OutputFormat = "text") -> list[Path]:
    """Move result files into a fresh directory, then rename it over ``output``."""
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.publish-", dir=output.parent))
    blobs = (work / "blobs").resolve()
    parts = []
    for partition, result in enumerate(results):
        source = Path(result)
        if source.is_absolute() and blobs in source.parents and source.is_file():
            target = staging / formats.part_name(partition, output_format)
            os.replace(source, target)
            parts.append(output / target.name)
    manifest = {"job": name, "module": job_ref, "format": output_format, "results": results,
                "parts": [p.name for p in parts], "seconds": round(seconds, 3)}
    (staging / SUCCESS_MARKER).write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    if output.exists():
        trash = output.with_name(f".{output.name}.old-{secrets.token_hex(3)}")
        output.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    staging.rename(output)
    return parts


# --- the worker process ----------------------------------------------------------------


async def _worker_main(state: str, blobs: str, job_name: str, worker_id: str) -> int:
    from .runtime import Worker

    store = SQLiteStateStore(state)
    try:
        records, _ = await store.snapshot(job_name)
        spec = JobSpec.from_dict(job_name, records[protocol.JOB_KEY].body["spec"])
        worker = Worker(job_name, load_job(spec.job), store, FileBlobStore(blobs), worker_id)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, worker.stop)
        await worker.run()
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
    ns = parser.parse_args(argv)
    logs.setup(os.environ.get("KUBEMR_LOG_LEVEL", "INFO"))
    return asyncio.run(_worker_main(ns.state, ns.blobs, ns.job, ns.worker_id))


if __name__ == "__main__":
    sys.exit(main())
