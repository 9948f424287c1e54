"""StateStore on the Kubernetes API: a MapReduceJob for the job, a MapReduceTask per task.

Mapping (see :mod:`kubemr_async.crd` for the schemas):

* Record ``job`` is the ``MapReduceJob`` in the store's namespace. Its body is
  ``{"spec": <JobSpec.to_dict() read from the resource's spec>, phase, maps, results,
  error, seq}``; the last five live in ``.status`` and every patch of the record goes to
  the status subresource with the paths prefixed by ``/status``.
* Every other record is a ``MapReduceTask`` named ``<job>-<key>`` (labels
  ``kubemr.io/job``, ``kubemr.io/kind``, ``kubemr.io/task=<key>``) whose ``.status`` is the
  record body. Tasks live in the job's *task namespace* (``status.taskNamespace``), one per
  job, because RBAC cannot restrict list/watch by label: a namespace is the unit that lets
  the operator give a job's workers access to exactly that job's tasks.

Coordination is the API server's JSON Patch ``test`` operation, as in the original kubemr:
a patch whose tests fail is rejected as a whole with HTTP 422, which this store reports as
``None`` (a lost race). Each write touches one small object, so bytes per claim, renewal or
commit do not grow with the job. Watches follow two streams (the job by name, the tasks by
label), resume from the last resourceVersion they saw, and re-list after 410 Gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import anyio
import orjson
from anyio.abc import ObjectSendStream

from ..crd import (
    API_VERSION,
    GROUP,
    JOB_KIND,
    JOB_PLURAL,
    LABEL_JOB,
    LABEL_JOB_NAMESPACE,
    LABEL_KIND,
    LABEL_SHARD,
    LABEL_STATE,
    LABEL_TASK,
    MAPREDUCE_JOBS,
    MAPREDUCE_TASKS,
    TASK_KIND,
    TASK_PLURAL,
)
from ..errors import UsageError, first_error
from ..kube import (
    JSON_PATCH,
    NAMESPACES,
    Backoff,
    Conflict,
    Kube,
    KubeApiError,
    KubeObject,
    Listed,
    NotFound,
    Resource,
    Unprocessable,
    ensure_namespace,
    list_watch,
    transient_after_outage,
)
from ..patch import writes_hold
from ..protocol import (
    JOB_KEY,
    TaskState,
    Update,
    job_shards,
    new_status,
    shard_of,
    task_name,
)
from ..records import Body, JobRecord, PatchOp, TaskRecord
from ..spec import JobSpec
from ..streams import merge
from .base import (
    JobNotFound,
    Record,
    ShardChoice,
    StoreUnavailable,
    WatchEvent,
    decode_body,
)

log = logging.getLogger("kubemr.state.kube")

DEFAULT_IMAGE = "kubemr-async:dev"
#: Set on a MapReduceJob whose creator gave no output (``JobSpec.output == ""``, the
#: embedded default): the resource carries the store's ``default_output`` to pass the
#: schema, and the record reads back ``""`` so the spec round-trips unchanged.
ANNOTATION_OUTPUT_DEFAULTED = f"{GROUP}/output-defaulted"

_PATCH_OPS = frozenset({"test", "add", "replace", "remove"})


def task_namespace_for(namespace: str, job: str) -> str:
    """The namespace holding the tasks of job ``job`` in ``namespace``: a valid DNS label.

    ``kubemr-<namespace>-<job>`` (truncated) plus a hash of the pair: the hash keeps names
    unique, since joining with '-' is ambiguous ("a-b"/"c" vs "a"/"b-c") and truncation
    would collide; the readable part tells a person whose namespace it is.
    """
    digest = hashlib.sha256(f"{namespace}/{job}".encode()).hexdigest()[:8]
    stem = f"kubemr-{namespace}-{job}"[: 63 - len(digest) - 1].rstrip("-")
    return f"{stem}-{digest}"


def task_namespace_labels(namespace: str, job: str) -> dict[str, str]:
    """The labels of job ``job``'s task namespace: whose it is, and that kubemr made it.

    :meth:`KubeStateStore.delete` deletes a task namespace only when these say it is the
    job's own; otherwise it removes just the job's task objects from it.
    """
    return {LABEL_JOB: job, LABEL_JOB_NAMESPACE: namespace,
            "app.kubernetes.io/name": "kubemr-async",
            "app.kubernetes.io/managed-by": "kubemr-async"}


def task_object_name(job: str, key: str) -> str:
    """Object name of record ``key``; job names are DNS labels (<= 63), so this stays valid."""
    return f"{job}-{key}"


#: Seconds a write waits for an API server that does not answer: a control-plane upgrade
#: restarts API servers one by one (a few seconds each, minutes in all on a managed
#: cluster), and a worker that gave up sooner would fail its task for nothing.
DEFAULT_OUTAGE_TOLERANCE = 300.0


@dataclass
class KubeStats:
    """What this store sent and followed: the coordination cost the benchmarks report."""

    creates: int = 0
    patches: int = 0
    patch_bytes: int = 0
    lost_races: int = 0
    watch_connects: int = 0
    relists: int = 0
    #: Reads of every record of a job (a worker's start, and what a poll left unread).
    snapshots: int = 0
    #: Polls of the unfinished tasks (a worker that follows one shard looks at the rest).
    polls: int = 0
    #: Writes sent again because the API server did not answer.
    outage_retries: int = 0


@dataclass(frozen=True)
class _Target:
    """The object one record lives in, and how errors about it read."""

    resource: Resource
    namespace: str
    name: str
    subresource: str | None
    key: str
    context: str


class KubeStateStore:
    """A StateStore on MapReduceJob/MapReduceTask custom resources.

    ``kube`` is the process's one :class:`~kubemr_async.kube.Kube`; the store does not
    close it unless it opened it itself (:meth:`connect`). The ``task_namespace`` argument
    names the task namespace of a job the store creates (default
    :func:`task_namespace_for`); for an existing job the name recorded in its
    ``status.taskNamespace`` wins (see the method of the same name).

    ``image`` and ``default_output`` only matter when the store creates a MapReduceJob
    itself (``kubemr run``-style callers and tests): the resource requires both, and a
    JobSpec has no image and may have no output. Jobs submitted with kubectl have both.
    """

    def __init__(self, kube: Kube, namespace: str,
                 task_namespace: Callable[[str], str] | None = None, *,
                 image: str = DEFAULT_IMAGE, default_output: str | None = None,
                 create_concurrency: int = 32, watch_timeout: int = 300,
                 inactivity_timeout: float | None = None, owns_kube: bool = False,
                 outage_tolerance: float = DEFAULT_OUTAGE_TOLERANCE) -> None:
        self.kube = kube
        self.namespace = namespace
        self.image = image
        self.default_output = default_output
        self.create_concurrency = create_concurrency
        #: Server-side limit of one watch request (timeoutSeconds); we reconnect after it.
        self.watch_timeout = watch_timeout
        #: Client-side limit on silence in a watch stream: catches connections that died
        #: without a FIN. Must exceed the gap between events/bookmarks the server sends.
        self.inactivity_timeout = (inactivity_timeout if inactivity_timeout is not None
                                   else watch_timeout + 15.0)
        #: How long a write waits out an API server that does not answer before it fails.
        self.outage_tolerance = outage_tolerance
        self.stats = KubeStats()
        self._naming = task_namespace or (lambda job: task_namespace_for(namespace, job))
        self._owns_kube = owns_kube
        self._task_ns: dict[str, str] = {}
        self._shards: dict[str, int] = {}
        self._last_outage: float | None = None

    @classmethod
    async def connect(cls, namespace: str, *, kubeconfig: str | None = None,
                      context: str | None = None, **options: Any) -> KubeStateStore:
        """A store with its own connection (see :meth:`Kube.connect`), closed by
        :meth:`aclose`."""
        return cls(await Kube.connect(kubeconfig, context), namespace, owns_kube=True,
                   **options)

    # --- creating -------------------------------------------------------------------

    async def create(self, job: str, records: Sequence[tuple[str, Body]]) -> None:
        """Create the job (if ``records`` holds ``job``) and then its task objects.

        Existing objects are left alone (409 is skipped), except that a MapReduceJob with
        an empty status (created by ``kubectl``) gets its status initialised. Task objects
        are created with bounded concurrency, so planning 10,000 tasks takes seconds.
        """
        job_body = next((Record(key, body, "").job for key, body in records if key == JOB_KEY),
                        None)
        if job_body is not None:
            task_ns = await self._create_job(job, job_body)
            shards = job_shards(job_body)
        else:
            task_ns = await self.task_namespace(job, "creating task records")
            shards = await self._job_shards(job)
        pending = iter([(key, Record(key, body, "").task)
                        for key, body in records if key != JOB_KEY])

        async def create_task(key: str, body: TaskRecord) -> None:
            obj = {
                "apiVersion": API_VERSION,
                "kind": TASK_KIND,
                "metadata": {
                    "name": task_object_name(job, key),
                    "labels": {LABEL_JOB: job, LABEL_KIND: str(body["kind"]), LABEL_TASK: key,
                               LABEL_SHARD: str(shard_of(key, shards)),
                               LABEL_STATE: str(body["state"])},
                },
                "status": body,
            }
            try:
                await self.kube.create(
                    MAPREDUCE_TASKS, obj, task_ns,
                    context=f"job {job}: creating record {key} in namespace {task_ns}")
                self.stats.creates += 1
            except NotFound as exc:
                raise JobNotFound(f"job {job}: task namespace {task_ns} not found "
                                  f"while creating record {key}") from exc
            except Conflict:
                pass

        async def creator() -> None:
            for key, body in pending:  # creators share one iterator: each record once
                await create_task(key, body)

        # At most create_concurrency requests in flight; the first error cancels the rest.
        with first_error():
            async with anyio.create_task_group() as group:
                for _ in range(self.create_concurrency):
                    group.start_soon(creator)

    async def _create_job(self, job: str, body: JobRecord) -> str:
        """Make sure the MapReduceJob exists with an initialised status; its task namespace."""
        for _ in range(10):
            obj = await self._read_job(job, "creating the job record")
            if obj is None:
                obj = await self._post_job(job, body)
                if obj is None:  # somebody else created it meanwhile: read theirs
                    continue
            status = obj.get("status") or {}
            task_ns = status.get("taskNamespace") or self._naming(job)
            if "taskNamespace" not in status:
                # Not recorded yet, so nobody can rely on it existing: make sure it does
                # (it exists when the operator made it already) before we record it.
                await ensure_namespace(self.kube, task_ns,
                                       task_namespace_labels(self.namespace, job),
                                       context=f"job {job}: creating task namespace {task_ns}")
            missing: dict[str, object] = {f: v for f, v in body.items()
                                          if f != "spec" and f not in status}
            if "taskNamespace" not in status:
                missing["taskNamespace"] = task_ns
            if not missing or await self._init_status(job, obj, missing):
                self._task_ns[job] = task_ns
                return task_ns
        raise KubeApiError(f"job {job}: initialising the status of MapReduceJob "
                           f"{self.namespace}/{job}", 409, "kept conflicting with other writers")

    async def _post_job(self, job: str, body: JobRecord) -> KubeObject | None:
        spec = body["spec"].copy()
        annotations = {}
        if not spec["output"]:
            if self.default_output is None:
                raise UsageError(f"job {job}: spec.output is empty; a MapReduceJob needs an "
                                 "s3:// output URL (or a KubeStateStore default_output)")
            spec["output"] = self.default_output
            annotations[ANNOTATION_OUTPUT_DEFAULTED] = "true"
        obj = {
            "apiVersion": API_VERSION,
            "kind": JOB_KIND,
            "metadata": {"name": job, "annotations": annotations},
            "spec": {"image": self.image, **spec},
        }
        try:
            created = await self.kube.create(
                MAPREDUCE_JOBS, obj, self.namespace,
                context=f"job {job}: creating MapReduceJob in namespace {self.namespace}")
        except Conflict:
            return None
        self.stats.creates += 1
        return created

    async def _init_status(self, job: str, obj: Mapping[str, Any],
                           fields: Mapping[str, Any]) -> bool:
        """Add the missing status fields unless the object changed since we read it."""
        ops: list[dict[str, Any]] = [{"op": "test", "path": "/metadata/resourceVersion",
                                      "value": obj["metadata"]["resourceVersion"]}]
        if "status" not in obj:
            ops.append({"op": "add", "path": "/status", "value": dict(fields)})
        else:
            ops += [{"op": "add", "path": f"/status/{f}", "value": v} for f, v in fields.items()]
        try:
            await self.kube.patch(
                MAPREDUCE_JOBS, job, ops, self.namespace, content_type=JSON_PATCH,
                subresource="status", context=f"job {job}: initialising the status of "
                f"MapReduceJob {self.namespace}/{job}")
        except Unprocessable as exc:
            if exc.lost_race:
                return False
            raise
        return True

    # --- reading --------------------------------------------------------------------

    async def job_record(self, job: str) -> Record:
        """The job record alone (one GET): what a pod reads before it works, without the
        tasks; JobNotFound if there is none."""
        obj = await self._read_job(job, "reading the job")
        if obj is None:
            raise JobNotFound(f"job {job} not found in namespace {self.namespace}")
        self._task_namespace_of(job, obj)
        return _job_record(obj)

    async def _read_job(self, job: str, doing: str) -> KubeObject | None:

        """The MapReduceJob, or None; ``doing`` says why, for the error message."""
        return await self.kube.find(
            MAPREDUCE_JOBS, job, self.namespace,
            context=f"job {job}: {doing}: reading MapReduceJob {self.namespace}/{job}")

    def _task_namespace_of(self, job: str, obj: Mapping[str, Any]) -> str:
        self._shards[job] = int((obj.get("status") or {}).get("shards", 1))
        recorded = (obj.get("status") or {}).get("taskNamespace")
        if recorded:
            self._task_ns[job] = recorded
            return str(recorded)
        return self._naming(job)

    async def task_namespace(self, job: str, doing: str = "finding its task namespace") -> str:
        """The namespace holding ``job``'s task objects; JobNotFound if there is no job."""
        cached = self._task_ns.get(job)
        if cached is not None:
            return cached
        obj = await self._read_job(job, doing)
        if obj is None:
            raise JobNotFound(f"job {job}: {doing}: job not found in namespace "
                              f"{self.namespace}")
        return self._task_namespace_of(job, obj)

    async def _job_shards(self, job: str) -> int:
        """How many shards the job's tasks are dealt into (read from the job once)."""
        if job not in self._shards:
            await self.job_record(job)  # reading the job notes its shards
        return self._shards[job]

    async def unfinished(self, job: str, *, shard: int | None = None,
                         most: int | None = None) -> list[Record]:
        """The job's tasks not committed, by label (``state!=committed`` also matches a
        task written before the label existed; its body decides). The API server filters
        them, so a poll at a stage's tail, when few are left, costs little."""
        task_ns = await self.task_namespace(job, "polling its unfinished tasks")
        context = f"job {job}: listing its unfinished tasks in namespace {task_ns}"
        try:
            # From the watch cache: a label-filtered list from etcd makes the server read
            # and decode every task of the namespace (measured: 64 workers' polls of a
            # 2,000-task job cost it more than the job's writes). The cache may be a little
            # behind: every write a poll leads to is guarded, and what a poll settles is
            # read whole, consistently, before anything uses it (JobView.unread).
            tasks, _ = await self.kube.list(
                MAPREDUCE_TASKS, task_ns, most=most, cached=True, context=context,
                label_selector=f"{_task_selector(job, shard)},"
                               f"{LABEL_STATE}!={TaskState.COMMITTED.value}")
        except KubeApiError as exc:
            if not transient_after_outage(exc, self._since_outage()):
                raise
            self._troubled()  # the caller's view may be behind: leases judged afresh
            raise StoreUnavailable(f"{context}: {exc.reason}") from None


        self.stats.polls += 1
        records = [_task_record(task) for task in tasks]
        # The watch cache may answer a limited list whole.
        return [r for r in records if r.task["state"] != TaskState.COMMITTED][:most]

    async def snapshot(self, job: str, *, shard: ShardChoice | None = None
                       ) -> tuple[dict[str, Record], str]:
        # A list, not a get: a get returns the object's own (possibly ancient) version, and
        # a watch from a compacted version is answered with 410 Gone.
        jobs, job_rv = await self.kube.list(
            MAPREDUCE_JOBS, self.namespace, field_selector=f"metadata.name={job}",
            context=f"job {job}: listing its job")
        if not jobs:
            raise JobNotFound(f"job {job} not found in namespace {self.namespace}")
        task_ns = self._task_namespace_of(job, jobs[0])
        job_record = _job_record(jobs[0])
        chosen = shard(job_record.job) if shard is not None else None
        # One shard's tasks from the watch cache (as an informer lists): its watch resumes
        # from the cache's revision, so nothing is missed, and the server does not decode
        # every task of the namespace from etcd to find the shard's.
        tasks, tasks_rv = await self.kube.list(
            MAPREDUCE_TASKS, task_ns, label_selector=_task_selector(job, chosen),
            cached=chosen is not None,
            context=f"job {job}: listing its tasks in namespace {task_ns}")
        if chosen is None:
            self.stats.snapshots += 1
        records = {JOB_KEY: job_record}
        for task in tasks:
            record = _task_record(task)
            records[record.key] = record
        return records, f"{job_rv}/{tasks_rv}"

    async def jobs(self) -> list[str]:
        items, _ = await self.kube.list(
            MAPREDUCE_JOBS, self.namespace,
            context=f"listing MapReduceJobs in namespace {self.namespace}")
        return sorted(item["metadata"]["name"] for item in items)

    # --- writing --------------------------------------------------------------------

    async def patch(self, job: str, update: Update, *, resend: bool = True) -> Record | None:
        """Send ``update`` as a JSON Patch under ``/status``; None if a ``test`` failed.

        The API server answers a patch it cannot apply (a failed ``test``, or a path
        missing from the object) with a bare 422 whose message does not say which
        operation failed; validation errors (a 422 too) list their causes. We check the
        operations locally first, so a bare 422 (:attr:`Unprocessable.lost_race`) can only
        mean the object no longer matches what the caller read: the lost race the protocol
        expects.

        An API server that is restarting (no answer, 429, 5xx) is waited out, with backoff,
        for up to ``outage_tolerance`` seconds (see :meth:`StateStore.patch` for
        ``resend``). No answer, or a 5xx, may hide a patch the server applied: the next
        refusal is then checked against the object itself (:func:`writes_hold`).
        """
        ops = [_status_op(op) for op in update.ops]
        if update.key != JOB_KEY:
            ops += _state_label_ops(update.ops)
        if update.key == JOB_KEY:
            resource, namespace, name, subresource = (
                MAPREDUCE_JOBS, self.namespace, job, "status")
        else:
            resource, subresource = MAPREDUCE_TASKS, None
            namespace = await self.task_namespace(job, f"patching record {update.key}")
            name = task_object_name(job, update.key)
        context = f"job {job}: patching record {update.key} ({resource.kind} {namespace}/{name})"
        target = _Target(resource, namespace, name, subresource, update.key, context)
        self.stats.patches += 1
        self.stats.patch_bytes += len(orjson.dumps(ops))
        backoff = Backoff()
        deadline: float | None = None
        maybe_applied = False
        while True:
            if maybe_applied and not resend:
                return await self._landed_or_unavailable(target, ops, deadline)
            await backoff.wait()
            try:
                obj = await self.kube.patch(resource, name, ops, namespace,
                                            content_type=JSON_PATCH, subresource=subresource,
                                            context=context)
            except NotFound as exc:
                raise JobNotFound(f"job {job}: record {update.key} not found") from exc
            except Unprocessable as exc:
                if not exc.lost_race:
                    raise
                if maybe_applied and (landed := await self._landed(target, ops)) is not None:
                    return landed
                self.stats.lost_races += 1
                return None
            except KubeApiError as exc:
                if not transient_after_outage(exc, self._since_outage()):
                    raise
                deadline = deadline or time.monotonic() + self.outage_tolerance
                self._wait_out(exc, context, deadline)
                maybe_applied = maybe_applied or exc.status != 429  # 429: never started
                if not resend and not maybe_applied:
                    raise StoreUnavailable(f"{context}: {exc.reason}; not sent again "
                                           "after an outage") from None
                continue
            return self._record(update.key, obj)

    def _wait_out(self, exc: KubeApiError, context: str, deadline: float) -> None:
        """Log one transient failure, or raise StoreUnavailable once the tolerance is spent."""
        if time.monotonic() > deadline:
            raise StoreUnavailable(f"{context}: the API server has not answered for "
                                   f"{self.outage_tolerance:.0f}s ({exc.reason})") from None
        self.stats.outage_retries += 1
        self._troubled()
        log.warning("API server unavailable; waiting it out",
                    extra={"context": context, "error": exc.reason})

    async def _landed(self, target: _Target, ops: list[PatchOp]) -> Record | None:
        """The record, if it shows that ``ops`` landed (an answer we never got); else None."""
        obj = await self.kube.find(target.resource, target.name, target.namespace,
                                   context=f"{target.context}: checking whether it landed")
        if obj is None or not writes_hold(obj, ops):
            return None
        return self._record(target.key, obj)

    async def _landed_or_unavailable(self, target: _Target, ops: list[PatchOp],
                                     deadline: float | None) -> Record:
        """For a write that may not be sent again: wait until the server answers, then
        return the record if the write landed, else raise StoreUnavailable."""
        backoff = Backoff()
        while True:
            await backoff.wait()
            try:
                landed = await self._landed(target, ops)
            except KubeApiError as exc:
                if not transient_after_outage(exc, self._since_outage()):
                    raise
                self._wait_out(exc, target.context, deadline or time.monotonic())
                continue
            if landed is not None:
                return landed
            raise StoreUnavailable(f"{target.context}: not applied during an outage of the "
                                   "API server; not sent again")

    def _record(self, key: str, obj: Mapping[str, Any]) -> Record:
        return _job_record(obj) if key == JOB_KEY else _task_record(obj)

    async def delete(self, job: str) -> None:
        """Delete the MapReduceJob and its tasks (their namespace, if it is this job's)."""
        task_ns = self._task_ns.pop(job, None)
        if task_ns is None:
            obj = await self._read_job(job, "deleting the job")
            task_ns = self._task_namespace_of(job, obj) if obj else self._naming(job)
            self._task_ns.pop(job, None)
        await self.kube.delete(
            MAPREDUCE_JOBS, job, self.namespace,
            context=f"job {job}: deleting MapReduceJob {self.namespace}/{job}")
        context = f"job {job}: deleting its tasks in namespace {task_ns}"
        namespace = await self.kube.find(NAMESPACES, task_ns, context=context)
        if namespace is None:
            return
        labels = namespace["metadata"].get("labels") or {}
        try:
            if labels.get(LABEL_JOB) == job and labels.get(LABEL_JOB_NAMESPACE) == self.namespace:
                await self.kube.delete(NAMESPACES, task_ns, context=context)
            else:  # a namespace shared with other things: remove only this job's tasks
                await self.kube.delete_collection(
                    MAPREDUCE_TASKS, task_ns, label_selector=f"{LABEL_JOB}={job}",
                    context=context)
        except NotFound:
            pass

    # --- watching -------------------------------------------------------------------

    async def watch(self, job: str, since: str, *,
                    shard: int | None = None) -> AsyncGenerator[WatchEvent, None]:
        """Merge the job's and its tasks' watch streams; return when the job is deleted.

        With ``shard``, the task stream selects that shard's label: the API server then
        sends each task write only to the watchers of its shard.

        Each stream is in order; between the two, events interleave as they arrive (the
        runtime compares ``seq`` per record, so that is all it needs). After a 410 Gone a
        stream re-lists and emits a PUT for every current record, which may repeat ones
        already seen.

        The two streams run concurrently under :func:`~kubemr_async.streams.merge`: a
        failing one cancels the other, and nothing is left running once the consumer
        stops.
        """
        job_rv, sep, tasks_rv = since.partition("/")
        if not sep or not job_rv or not tasks_rv:
            raise ValueError(f"job {job}: {since!r} is not a revision from this store's "
                             "snapshot (expected '<jobRV>/<tasksRV>')")
        try:
            task_ns = await self.task_namespace(job, "watching")
        except JobNotFound:
            return

        async def job_stream(send: ObjectSendStream[WatchEvent]) -> None:
            events = list_watch(
                self.kube, MAPREDUCE_JOBS, self.namespace, since=job_rv,
                field_selector=f"metadata.name={job}",
                context=f"job {job}: watching {JOB_PLURAL} in namespace {self.namespace}",
                **self._watch_options())
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, Listed):
                        if not event.items:  # re-listed after 410: the job is gone
                            return
                        await send.send(WatchEvent("PUT", _job_record(event.items[0])))
                    elif event.type == "DELETED":
                        return
                    else:
                        await send.send(WatchEvent("PUT", _job_record(event.object)))

        async def task_stream(send: ObjectSendStream[WatchEvent]) -> None:
            events = list_watch(
                self.kube, MAPREDUCE_TASKS, task_ns, since=tasks_rv,
                label_selector=_task_selector(job, shard),
                context=f"job {job}: watching {TASK_PLURAL} in namespace {task_ns}",
                **self._watch_options())
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, Listed):
                        for task in event.items:
                            await send.send(WatchEvent("PUT", _task_record(task)))
                    else:
                        await send.send(WatchEvent(
                            "DELETE" if event.type == "DELETED" else "PUT",
                            _task_record(event.object)))

        # Only the job stream ends by itself (the job is gone), and that ends the watch.
        events = merge([job_stream, task_stream], first_ends=True, name=f"kubemr-watch-{job}")
        async with contextlib.aclosing(events):
            async for event in events:
                yield event

    def _watch_options(self) -> dict[str, Any]:
        return {"timeout_seconds": self.watch_timeout,
                "inactivity_timeout": self.inactivity_timeout, "counters": self.stats,
                "on_trouble": self._troubled}

    def _troubled(self) -> None:
        self._last_outage = time.monotonic()

    def _since_outage(self) -> float | None:
        return None if self._last_outage is None else time.monotonic() - self._last_outage

    def last_outage(self) -> float | None:
        """When (``time.monotonic``) the API server last failed to answer a write or a
        watch of this store; None if it never has."""
        return self._last_outage

    async def aclose(self) -> None:
        """Close the connection if this store opened it; a shared one belongs to its owner."""
        if self._owns_kube:
            await self.kube.aclose()


# --- mapping objects <-> records -----------------------------------------------------


def _job_record(obj: Mapping[str, Any]) -> Record:
    """The job record of a MapReduceJob: its spec read by JobSpec (the one mapping, the CRD's
    defaults), its status fields or a fresh job's where nobody initialised them yet."""
    status = obj.get("status") or {}
    defaulted = (obj["metadata"].get("annotations") or {}).get(ANNOTATION_OUTPUT_DEFAULTED)
    spec = {**obj["spec"], **({"output": ""} if defaulted == "true" else {})}
    fresh = new_status()  # what nobody initialised yet reads as a fresh job's
    body = JobRecord(
        spec=JobSpec.from_dict(obj["metadata"]["name"], spec).to_dict(cluster=False),
        phase=status.get("phase", fresh["phase"]), maps=status.get("maps", fresh["maps"]),
        results=status.get("results", fresh["results"]),
        error=status.get("error", fresh["error"]), seq=status.get("seq", fresh["seq"]))
    if "counters" in status:
        body["counters"] = status["counters"]
    if "skipped" in status:
        body["skipped"] = status["skipped"]
    if "step" in status:
        body["step"] = status["step"]
    if "shards" in status:
        body["shards"] = status["shards"]
    return Record(JOB_KEY, body, obj["metadata"]["resourceVersion"])


def _task_record(obj: Mapping[str, Any]) -> Record:
    metadata, body = obj["metadata"], cast(TaskRecord, decode_body(dict(obj["status"])))
    # Objects made by hand may lack the key label; protocol keys follow from the body.
    key = (metadata.get("labels") or {}).get(LABEL_TASK) or task_name(body)
    return Record(key, body, metadata["resourceVersion"])


def _task_selector(job: str, shard: int | None) -> str:
    """The label selector of ``job``'s tasks, or of one shard of them."""
    return f"{LABEL_JOB}={job}" + (f",{LABEL_SHARD}={shard}" if shard is not None else "")


def _state_label_ops(ops: Sequence[PatchOp]) -> list[PatchOp]:
    """The write of the state label that goes with a protocol write of ``/state``, in the
    same patch, so the label can never disagree with the record."""
    return [{"op": "add", "path": "/metadata/labels/" + LABEL_STATE.replace("/", "~1"),
             "value": op["value"]}
            for op in ops if op["path"] == "/state" and op["op"] in ("add", "replace")]


def _status_op(op: PatchOp) -> PatchOp:

    """Move a protocol operation under ``/status``; refuse ones the server would 422 on.

    Checking here is what lets :meth:`KubeStateStore.patch` read a bare 422 as a lost race.
    """
    path = op.get("path")
    if op.get("op") not in _PATCH_OPS or not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"unsupported JSON Patch operation for a record: {dict(op)!r}")
    if op["op"] != "remove" and "value" not in op:
        raise ValueError(f"JSON Patch operation without a value: {dict(op)!r}")
    return {**op, "path": "/status" + path}
