"""`kubemr worker`: the runtime inside a worker pod, on the Kubernetes and S3 backends.

Everything comes from the environment the operator sets (job name and namespace, the pod
name as worker id, S3 endpoint and credentials from a Secret, the /metrics port), so the
pod spec stays the only place where a job's wiring is written down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Mapping

import anyio
import anyio.to_thread

from . import metrics, protocol, shuffle
from .api import load_spec_steps
from .deaths import STUCK_EXIT_CODE
from .errors import JobDefinitionError, UsageError
from .kube import PODS, Forbidden, Kube, Listed, list_watch
from .protocol import JobPhase
from .runtime import UserLoop, Worker, container_memory_limit
from .spec import ADOPTED_ANNOTATION, STANDBY_NAMESPACE_ENV, STANDBY_POD_ENV, JobSpec
from .state.base import Record
from .state.kube import KubeStateStore
from .storage.s3 import S3BlobStore
from .storage.urls import job_data_prefix, split_s3

log = logging.getLogger("kubemr.worker")

#: The bucket name a standby's S3 client is made with before it knows its job's; no
#: request names it (``S3BlobStore.warm_up``).
WARM_UP_BUCKET = "kubemr-warm-up"

#: A worker's exit code when SIGTERM stopped it mid-job: 128 + SIGTERM, as a shell reports.
STOPPED_EXIT_CODE = 128 + signal.SIGTERM


def _require(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    if not value:
        raise UsageError(f"environment variable {name} is not set (the operator sets it)")
    return value


async def run_pod_worker(env: Mapping[str, str] = os.environ) -> int:
    """Work on the job named by the environment (or, a warm pool's standby, the job that
    adopts it) until it is decided; the exit code."""
    worker_id = env.get("KUBEMR_WORKER_ID") or socket.gethostname()
    stopped = asyncio.Event()  # SIGTERM: the pod is being stopped
    async with await Kube.connect() as kube:
        ready = None
        if env.get(STANDBY_POD_ENV):
            ready = await _Ready.make()
            adopted = await _standby(kube, _require(env, STANDBY_NAMESPACE_ENV),
                                     env[STANDBY_POD_ENV], stopped)
            if adopted is None:  # stopped before any job adopted it
                await ready.aclose()
                return 0
            namespace, job_name = adopted
        else:
            job_name = _require(env, "KUBEMR_JOB")
            namespace = _require(env, "KUBEMR_NAMESPACE")
        endpoint = _serve_metrics(env, {"job": job_name, "worker": worker_id})
        try:
            code = await _work(kube, job_name, namespace, worker_id, stopped, _ordinal(env),
                               ready)
            if endpoint is not None:
                await _linger(float(env.get(metrics.LINGER_ENV) or 0), stopped)
            return code
        finally:
            if endpoint is not None:
                endpoint.close()


class _Ready:
    """What a standby makes before any job exists, so that its job does not wait for it:
    the loop user code will run on, an S3 client on the worker's loop with its first
    request made (``S3BlobStore.warm_up``; the job's stores are then ``for_bucket`` of
    ``s3``, and a job reads its inputs and writes its outputs on that loop), anyio's
    thread pool (its first use imports its asyncio backend, ~40 ms) and the shuffle's hot
    path (``shuffle.warm_up``). No client is made on the user loop: the worker stops that
    loop before ``s3`` is closed, and a client left on it would be reported unclosed."""

    def __init__(self, s3: S3BlobStore, user: UserLoop) -> None:
        self.s3 = s3
        self.user = user

    @classmethod
    async def make(cls) -> _Ready:
        s3, user = S3BlobStore.from_env(WARM_UP_BUCKET), UserLoop()
        await anyio.to_thread.run_sync(shuffle.warm_up)
        await s3.warm_up()
        return cls(s3, user)

    async def aclose(self) -> None:
        await self.s3.aclose()
        await self.user.aclose()


async def _standby(kube: Kube, namespace: str, pod: str,
                   stopped: asyncio.Event) -> tuple[str, str] | None:
    """A warm pool's standby (operator.pool): wait for a job to adopt it; that job's
    (namespace, name), or None if SIGTERM came first."""
    loop = asyncio.get_running_loop()
    waiting = asyncio.current_task()
    assert waiting is not None

    def on_sigterm() -> None:
        stopped.set()
        waiting.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    log.info("standby waiting", extra={"namespace": namespace, "worker": pod})
    try:
        async for item in list_watch(kube, PODS, namespace, context=f"standby {pod}",
                                     field_selector=f"metadata.name={pod}"):
            for obj in item.items if isinstance(item, Listed) else [item.object]:
                adopted = (obj["metadata"].get("annotations") or {}).get(ADOPTED_ANNOTATION)
                if adopted:
                    job_namespace, _, job_name = adopted.partition("/")
                    log.info("standby adopted", extra={"job": job_name,
                                                       "namespace": job_namespace,
                                                       "worker": pod})
                    return job_namespace, job_name
    except asyncio.CancelledError:
        if stopped.is_set():
            return None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
    return None


async def _linger(seconds: float, stopped: asyncio.Event) -> None:
    """Keep /metrics up a while after the work is done, so that a last scrape sees the
    worker's final counts (Prometheus scrapes every 15 to 60 s; a worker that left at once
    would take its last tasks' counts with it). Ends early on SIGTERM: the operator deletes
    the workers as soon as the job is decided, so this costs a job nothing."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopped.wait(), seconds)


def _serve_metrics(env: Mapping[str, str], context: dict[str, str]) -> metrics.Endpoint | None:
    """/metrics on ``KUBEMR_METRICS_PORT`` while the worker runs, if the operator set it.

    A port that cannot be bound costs the pod its metrics, not the job its worker.
    """
    port = int(env.get(metrics.PORT_ENV) or 0)
    if not port:
        return None
    try:
        return metrics.Endpoint(port)
    except OSError as exc:
        log.warning("cannot serve metrics", extra={**context, "port": port, "error": str(exc)})
        return None


def _ordinal(env: Mapping[str, str]) -> int | None:
    """The pod's index in its Indexed Job (Kubernetes sets it), if it has one."""
    index = env.get("JOB_COMPLETION_INDEX", "")
    return int(index) if index.isdigit() else None


async def _work(kube: Kube, job_name: str, namespace: str, worker_id: str,
                stopped: asyncio.Event, ordinal: int | None, ready: _Ready | None) -> int:
    store = KubeStateStore(kube, namespace)
    job_record = (await _first_read(store, job_name)).job
    if JobPhase(job_record["phase"]).finished:
        return 0
    spec = JobSpec.from_dict(job_name, job_record["spec"])
    context = {"job": job_name, "worker": worker_id}
    try:
        steps = load_spec_steps(spec)
    except JobDefinitionError as exc:
        # Every pod of this image would fail the same way: decide the job instead of
        # letting pods crash until the Job's backoff limit runs out.
        await store.patch(job_name, protocol.abort(job_record, JobPhase.FAILED, str(exc)))
        log.error("job module unusable; job failed", extra={**context, "error": str(exc)})
        return 1
    bucket, _ = split_s3(spec.output)
    blobs = S3BlobStore.from_env(bucket) if ready is None else ready.s3.for_bucket(bucket)
    try:
        prefix = job_data_prefix(spec.output, namespace, job_name)
        worker = Worker(job_name, steps, store, blobs, worker_id, data_prefix=prefix,
                        memory_limit=container_memory_limit(),
                        ordinal=ordinal, user=None if ready is None else ready.user)

        def on_sigterm() -> None:
            stopped.set()
            worker.stop()

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
        phase = await worker.run()
        log.info("worker done", extra={**context, "phase": phase.value,
                                       "count": worker.tasks_done})
    finally:
        await (blobs if ready is None else ready.s3).aclose()
    # Stopped (the pod deleted, its node drained) before the job was decided: exit as
    # a SIGTERMed process does, so the pod is Failed and replaced. A pod that Succeeded
    # would tell the work-queue Job that the work is done: it makes no new pods then.
    if worker.stuck:
        return STUCK_EXIT_CODE
    return STOPPED_EXIT_CODE if stopped.is_set() and not phase.finished else 0



#: How long a standby's first read of its job may be refused: the RoleBindings that name
#: its account are written just after the operator adopts it, and the API server's
#: authorizer sees them a moment later.
ADOPTION_GRACE_SECONDS = 10.0


async def _first_read(store: KubeStateStore, job_name: str) -> Record:
    """The job's record (not its tasks: the worker reads those itself), read once; a
    Forbidden answer is retried for ``ADOPTION_GRACE_SECONDS`` (a standby adopted a moment
    ago), then raised."""
    deadline = asyncio.get_running_loop().time() + ADOPTION_GRACE_SECONDS
    delay = 0.02
    while True:
        try:
            return await store.job_record(job_name)
        except Forbidden:
            if asyncio.get_running_loop().time() + delay > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)
