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

from . import metrics, protocol
from .api import load_spec_steps
from .deaths import STUCK_EXIT_CODE
from .errors import JobDefinitionError, UsageError
from .kube import Kube
from .protocol import JobPhase
from .runtime import Worker, container_memory_limit
from .spec import JobSpec
from .state.kube import KubeStateStore
from .storage.s3 import S3BlobStore
from .storage.urls import job_data_prefix, split_s3

log = logging.getLogger("kubemr.worker")

#: A worker's exit code when SIGTERM stopped it mid-job: 128 + SIGTERM, as a shell reports.
STOPPED_EXIT_CODE = 128 + signal.SIGTERM


def _require(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    if not value:
        raise UsageError(f"environment variable {name} is not set (the operator sets it)")
    return value


async def run_pod_worker(env: Mapping[str, str] = os.environ) -> int:
    """Work on the job named by the environment until it is decided; the exit code."""
    job_name = _require(env, "KUBEMR_JOB")
    namespace = _require(env, "KUBEMR_NAMESPACE")
    worker_id = env.get("KUBEMR_WORKER_ID") or socket.gethostname()
    endpoint = _serve_metrics(env, {"job": job_name, "worker": worker_id})
    stopped = asyncio.Event()  # SIGTERM: the pod is being stopped
    try:
        code = await _work(job_name, namespace, worker_id, stopped, _ordinal(env))
        if endpoint is not None:
            await _linger(float(env.get(metrics.LINGER_ENV) or 0), stopped)
        return code
    finally:
        if endpoint is not None:
            endpoint.close()


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


async def _work(job_name: str, namespace: str, worker_id: str, stopped: asyncio.Event,
                ordinal: int | None) -> int:
    async with await Kube.connect() as kube:
        store = KubeStateStore(kube, namespace)
        job_record = (await store.job_record(job_name)).job  # not the tasks: the worker's
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
        blobs = S3BlobStore.from_env(bucket)
        try:
            prefix = job_data_prefix(spec.output, namespace, job_name)
            worker = Worker(job_name, steps, store, blobs, worker_id, data_prefix=prefix,
                            memory_limit=container_memory_limit(),
                            ordinal=ordinal)


            def on_sigterm() -> None:
                stopped.set()
                worker.stop()

            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
            phase = await worker.run()
            log.info("worker done", extra={**context, "phase": phase.value,
                                           "count": worker.tasks_done})
        finally:
            await blobs.aclose()
        # Stopped (the pod deleted, its node drained) before the job was decided: exit as
        # a SIGTERMed process does, so the pod is Failed and replaced. A pod that Succeeded
        # would tell the work-queue Job that the work is done: it makes no new pods then.
        if worker.stuck:
            return STUCK_EXIT_CODE
        return STOPPED_EXIT_CODE if stopped.is_set() and not phase.finished else 0

