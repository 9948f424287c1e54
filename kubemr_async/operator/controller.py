"""The operator process: watch MapReduceJobs, queue their keys, reconcile them.

Five loops run in one anyio task group: the jobs' list-watch (feeding the queue), a
periodic resync (every job, whatever the watch said), the reconcile workers (draining the
queue), the progress followers and the health heartbeat; with leader election, a sixth
renews the Lease, and the others start only once this operator holds it; with a warm pool
(``config.warm_workers``), another keeps its standbys (.pool). If one fails, the
task group cancels the others and :meth:`Operator.run` raises that one error: nothing is
left running behind it. With ``config.metrics_port`` set, /metrics, /healthz and /readyz are served
(:class:`~kubemr_async.metrics.Endpoint`) for as long as :meth:`Operator.run` runs.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import anyio

from .. import metrics
from ..crd import MAPREDUCE_JOBS
from ..errors import UsageError
from ..kube import Kube, KubeApiError, KubeObject, Listed, list_watch
from ..protocol import JobPhase
from .config import OperatorConfig
from .followers import Followers, Key
from .leader import LeaderElector
from .pool import WarmPool
from .queue import WorkQueue, run_workers
from .reconcile import Reconciler
from .resources import job_key

log = logging.getLogger("kubemr.operator")

Fingerprint = tuple[Any, ...]


class Operator:
    """Reconciles the MapReduceJobs of one namespace (``config.namespace``) or of all.

    ``kube`` is the caller's connection, which the operator does not close.
    """

    def __init__(self, kube: Kube, config: OperatorConfig) -> None:
        self.kube = kube
        self.config = config
        self.queue: WorkQueue[Key] = WorkQueue(retry_maximum=config.resync_seconds)
        self.followers = Followers(kube, self.queue.add)
        #: Standby workers for new jobs to adopt (config.warm_workers; None: none).
        self.pool = WarmPool(kube, config, self.queue.add) if config.warm_workers else None
        self.reconciler = Reconciler(kube, config, self.followers, self.queue.add_after,
                                     self.pool)
        self.changes = ChangeFilter()
        self.health = metrics.Health()
        #: With leader election, only the holder of the Lease reconciles; a standby waits
        #: (its /readyz says ``[-]leader``) and takes over when the lease runs out.
        self.elector = (LeaderElector(kube, config.leader_election)
                        if config.leader_election else None)
        if self.elector is not None:
            self.health.add_readiness("leader", self.elector.leading)
        #: Readiness: the jobs' watch is current.
        self.watch_current = metrics.Recent(config.watch_ready_seconds)
        self.health.add_readiness("watch", self.watch_current)

    async def run(self) -> None:
        """Watch MapReduceJobs and reconcile each change; resync everything periodically.

        Runs until cancelled, or until a loop fails with what retrying cannot fix (say, a
        403 on the watch): then every loop is stopped and that error is raised. With leader
        election it first waits to hold the lease, and losing it is such an error
        (:class:`~.leader.LeadershipLost`: reconciling stops at once, and the process exits
        as controller-runtime's does); a clean stop (cancellation) releases the lease.
        """
        metrics.QUEUE_DEPTH.set_function(lambda: len(self.queue))
        endpoint = self._serve() if self.config.metrics_port else None
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self.health.heartbeat, name="kubemr-operator-heartbeat")
                if self.elector is not None:
                    await self.elector.acquire()
                    group.start_soon(self.elector.hold, name="kubemr-operator-lease")
                else:
                    metrics.LEADER.set(1)
                group.start_soon(self._watch_jobs, name="kubemr-operator-watch")
                group.start_soon(self._resync, name="kubemr-operator-resync")
                group.start_soon(self.followers.run, name="kubemr-operator-followers")
                if self.pool is not None:
                    group.start_soon(self.pool.run, name="kubemr-operator-warm-pool")
                group.start_soon(run_workers, self.queue, self._reconcile_key,
                                 self.config.reconcile_workers, name="kubemr-operator-workers")
        except BaseExceptionGroup as failed:
            raise _sole(failed) from None
        finally:
            metrics.LEADER.set(0)
            with anyio.CancelScope(shield=True):
                await self.reconciler.aclose()
            if self.elector is not None:  # every loop has stopped: hand the lease on
                with anyio.CancelScope(shield=True), anyio.move_on_after(
                        self.elector.config.renew_deadline):
                    await self.elector.release()
            if endpoint is not None:
                endpoint.close()

    def _serve(self) -> metrics.Endpoint:
        """/metrics, /healthz and /readyz on ``config.metrics_port``; a port that cannot
        be bound is a usage error (one line), not a traceback."""
        port = self.config.metrics_port
        try:
            return metrics.Endpoint(port, health=self.health)
        except OSError as exc:
            raise UsageError(f"--metrics-port {port}: {exc.strerror or exc}") from None

    async def reconcile(self, namespace: str, name: str) -> None:
        """Reconcile one job now, outside the queue (tests; the queue calls it too)."""
        await self.reconciler.reconcile(namespace, name)

    async def _reconcile_key(self, key: Key) -> None:
        namespace, name = key
        started = time.monotonic()
        try:
            await self.reconcile(namespace, name)
        except Exception as exc:
            metrics.RECONCILES.labels("error").inc()
            metrics.RECONCILE_ERRORS.inc()
            # Retried with backoff by the queue; the Event tells `kubectl describe` readers
            # why the job is not moving (e.g. a permission the operator lacks).
            log.exception("reconcile failed", extra={"job": f"{namespace}/{name}"})
            await self.reconciler.event({"name": name, "namespace": namespace, "uid": ""},
                                        "ReconcileError", f"{type(exc).__name__}: {exc}",
                                        warning=True)
            raise
        else:
            metrics.RECONCILES.labels("success").inc()
        finally:
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)

    async def _watch_jobs(self) -> None:
        """List, then watch from the list's version (:func:`~kubemr_async.kube.list_watch`:
        bookmarks, resume, re-list after 410, backoff on transient trouble such as the 429
        of a freshly installed CRD whose storage initialises)."""
        async for item in list_watch(self.kube, MAPREDUCE_JOBS, self.config.namespace,
                                     context="watching MapReduceJobs",
                                     on_progress=self.watch_current.mark):
            if isinstance(item, Listed):  # a fresh cut: every job is reconciled
                self.changes.relisted(item.items)
                for obj in item.items:
                    self.queue.add(job_key(obj))
            elif self.changes.changed(item.type, item.object):
                self.queue.add(job_key(item.object))
            else:
                continue
            phases = self.changes.phases()
            for phase in JobPhase:
                metrics.JOBS.labels(phase.value).set(phases[phase.value])

    async def _resync(self) -> None:
        while True:
            await anyio.sleep(self.config.resync_seconds)
            try:
                items, _ = await self.kube.list(MAPREDUCE_JOBS, self.config.namespace,
                                                context="resyncing MapReduceJobs")
            except KubeApiError as exc:  # the watch reports lasting trouble
                log.warning("resync failed; retrying later", extra={"error": str(exc)})
                continue
            for obj in items:
                self.queue.add(job_key(obj))


class ChangeFilter:
    """Which watch events of MapReduceJobs a reconcile must see.

    Progress and lease traffic rewrite the status many times a second on a busy job;
    reconciling each of those would repeat a dozen API calls for nothing. An event passes
    when it changes what a reconcile acts on (generation, deletion, finalizers, phase,
    completion); the periodic resync still reconciles every job, whatever changed.
    """

    def __init__(self) -> None:
        self._seen: dict[Key, Fingerprint] = {}

    def __len__(self) -> int:
        """How many jobs the filter remembers."""
        return len(self._seen)

    def phases(self) -> Counter[str]:
        """How many of the jobs remembered are in each phase (a new one is Pending)."""
        return Counter(fingerprint[3] or JobPhase.PENDING.value
                       for fingerprint in self._seen.values())

    def relisted(self, items: list[KubeObject]) -> None:
        """A fresh list (each of its jobs is reconciled anyway): remember exactly these, so
        jobs deleted while nobody watched are forgotten."""
        self._seen = {job_key(obj): _fingerprint(obj) for obj in items}

    def changed(self, event_type: str, obj: KubeObject) -> bool:
        """Whether a watch event changes anything a reconcile acts on."""
        key = job_key(obj)
        if event_type == "DELETED":
            self._seen.pop(key, None)
            return True
        fingerprint = _fingerprint(obj)
        if self._seen.get(key) == fingerprint:
            return False
        self._seen[key] = fingerprint
        return True


def _fingerprint(obj: KubeObject) -> Fingerprint:
    """What a reconcile acts on: generation, deletion, finalizers, phase, completion."""
    meta, status = obj["metadata"], obj.get("status") or {}
    return (meta.get("generation"), bool(meta.get("deletionTimestamp")),
            tuple(meta.get("finalizers") or ()), status.get("phase"),
            status.get("completionTime"))


def _sole(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error that ended the task group (its siblings were only cancelled; nested
    task groups wrap it once more), or the group itself if several loops failed at once."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending += exc.exceptions
        else:
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else group
