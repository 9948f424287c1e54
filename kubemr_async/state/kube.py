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

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import aiohttp
import orjson
from kubernetes_asyncio.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes_asyncio.client.exceptions import ApiException

from ..crd import (
    API_VERSION,
    GROUP,
    JOB_KIND,
    JOB_PLURAL,
    LABEL_JOB,
    LABEL_JOB_NAMESPACE,
    LABEL_KIND,
    LABEL_TASK,
    TASK_KIND,
    TASK_PLURAL,
    VERSION,
)
from ..errors import UsageError
from ..kube import JSON_PATCH, KubeApiError, api_client, api_error, status_message
from ..protocol import JOB_KEY, Update, new_status, task_name
from ..records import Body, JobRecord, PatchOp, TaskRecord
from ..spec import JobSpec
from .base import JobNotFound, Record, WatchEvent, decode_body

log = logging.getLogger("kubemr.state.kube")
T = TypeVar("T")

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


@dataclass
class KubeStats:
    """What this store sent and followed: the coordination cost the benchmarks report."""

    creates: int = 0
    patches: int = 0
    patch_bytes: int = 0
    lost_races: int = 0
    watch_connects: int = 0
    relists: int = 0


class KubeStateStore:
    """A StateStore on MapReduceJob/MapReduceTask custom resources.

    ``api`` is the process's one ApiClient; the store does not close it unless it opened it
    itself (:meth:`connect`). The ``task_namespace`` argument names the task namespace of a
    job the store creates (default :func:`task_namespace_for`); for an existing job the
    name recorded in its ``status.taskNamespace`` wins (see the method of the same name).

    ``image`` and ``default_output`` only matter when the store creates a MapReduceJob
    itself (``kubemr run``-style callers and tests): the resource requires both, and a
    JobSpec has no image and may have no output. Jobs submitted with kubectl have both.
    """

    def __init__(self, api: ApiClient, namespace: str,
                 task_namespace: Callable[[str], str] | None = None, *,
                 image: str = DEFAULT_IMAGE, default_output: str | None = None,
                 create_concurrency: int = 32, watch_timeout: int = 300,
                 inactivity_timeout: float | None = None, owns_api: bool = False) -> None:
        self.api = api
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
        self.stats = KubeStats()
        self._naming = task_namespace or (lambda job: task_namespace_for(namespace, job))
        self._objects = CustomObjectsApi(api)
        self._core = CoreV1Api(api)
        self._owns_api = owns_api
        self._task_ns: dict[str, str] = {}

    @classmethod
    async def connect(cls, namespace: str, *, kubeconfig: str | None = None,
                      context: str | None = None, **options: Any) -> KubeStateStore:
        """A store with its own ApiClient (see :func:`kubemr_async.kube.api_client`),
        closed by :meth:`aclose`."""
        return cls(await api_client(kubeconfig, context), namespace, owns_api=True, **options)

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
        else:
            task_ns = await self.task_namespace(job, "creating task records")
        tasks = [(key, Record(key, body, "").task) for key, body in records if key != JOB_KEY]

        async def create_task(item: tuple[str, TaskRecord]) -> None:
            key, body = item
            obj = {
                "apiVersion": API_VERSION,
                "kind": TASK_KIND,
                "metadata": {
                    "name": task_object_name(job, key),
                    "labels": {LABEL_JOB: job, LABEL_KIND: str(body["kind"]), LABEL_TASK: key},
                },
                "status": body,
            }
            try:
                await self._objects.create_namespaced_custom_object(
                    GROUP, VERSION, task_ns, TASK_PLURAL, obj)
                self.stats.creates += 1
            except ApiException as exc:
                if exc.status == 404:
                    raise JobNotFound(f"job {job}: task namespace {task_ns} not found "
                                      f"while creating record {key}") from exc
                if exc.status != 409:
                    raise api_error(f"job {job}: creating record {key} in namespace "
                                    f"{task_ns}", exc) from exc

        await _bounded(self.create_concurrency, tasks, create_task)

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
                # (409 when the operator made it already) before we record it.
                await self._ensure_namespace(task_ns, job)
            missing: dict[str, object] = {f: v for f, v in body.items()
                                          if f != "spec" and f not in status}
            if "taskNamespace" not in status:
                missing["taskNamespace"] = task_ns
            if not missing or await self._init_status(job, obj, missing):
                self._task_ns[job] = task_ns
                return task_ns
        raise KubeApiError(f"job {job}: initialising the status of MapReduceJob "
                           f"{self.namespace}/{job}", 409, "kept conflicting with other writers")

    async def _post_job(self, job: str, body: JobRecord) -> dict[str, Any] | None:
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
            created: dict[str, Any] = await self._objects.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, JOB_PLURAL, obj)
        except ApiException as exc:
            if exc.status == 409:
                return None
            raise api_error(f"job {job}: creating MapReduceJob in namespace "
                            f"{self.namespace}", exc) from exc
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
            await self._objects.patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, JOB_PLURAL, job, ops, _content_type=JSON_PATCH)
        except ApiException as exc:
            if _patch_not_applicable(exc):
                return False
            raise api_error(f"job {job}: initialising the status of MapReduceJob "
                            f"{self.namespace}/{job}", exc) from exc
        return True

    async def _ensure_namespace(self, name: str, job: str) -> None:
        """Create the task namespace, labelled as this job's; wait out a terminating one.

        A job deleted and re-created under the same name finds its old namespace still
        terminating, where nothing can be created; we wait until it is gone.
        """
        labels = task_namespace_labels(self.namespace, job)
        context = f"job {job}: creating task namespace {name}"
        deadline = asyncio.get_running_loop().time() + 120
        while True:
            try:
                await self._core.create_namespace({"metadata": {"name": name, "labels": labels}})
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise api_error(context, exc) from exc
            existing = await self._read_namespace(name, context)
            if existing is None:
                continue
            if (existing.get("status") or {}).get("phase") != "Terminating":
                return
            if asyncio.get_running_loop().time() > deadline:
                raise KubeApiError(context, 409, "the namespace is still terminating")
            await asyncio.sleep(0.5)

    async def _read_namespace(self, name: str, context: str) -> dict[str, Any] | None:
        resp = await self._core.read_namespace(name, _preload_content=False)
        try:
            if resp.status == 404:
                return None
            raw = await resp.read()
        finally:
            resp.release()
        if resp.status != 200:
            raise KubeApiError(context, resp.status, status_message(raw))
        result: dict[str, Any] = orjson.loads(raw)
        return result

    # --- reading --------------------------------------------------------------------

    async def _read_job(self, job: str, doing: str) -> dict[str, Any] | None:
        """The MapReduceJob, or None; ``doing`` says why, for the error message."""
        try:
            obj: dict[str, Any] = await self._objects.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, JOB_PLURAL, job)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise api_error(f"job {job}: {doing}: reading MapReduceJob "
                            f"{self.namespace}/{job}", exc) from exc
        return obj

    def _task_namespace_of(self, job: str, obj: Mapping[str, Any]) -> str:
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

    async def _list_job(self, job: str) -> tuple[dict[str, Any] | None, str]:
        """The job (or None) and a list resourceVersion to watch it from.

        A list, not a get: a get returns the object's own (possibly ancient) version, and
        a watch from a compacted version is answered with 410 Gone.
        """
        items, revision = await self._list(self.namespace, JOB_PLURAL,
                                           f"job {job}: listing its job",
                                           field_selector=f"metadata.name={job}")
        return (items[0] if items else None), revision

    async def _list_tasks(self, job: str, task_ns: str) -> tuple[list[dict[str, Any]], str]:
        return await self._list(task_ns, TASK_PLURAL,
                                f"job {job}: listing its tasks in namespace {task_ns}",
                                label_selector=f"{LABEL_JOB}={job}")

    async def _list(self, namespace: str, plural: str, context: str,
                    **selector: str) -> tuple[list[dict[str, Any]], str]:
        """Every matching object (paged) and the list's resourceVersion (a consistent cut)."""
        items: list[dict[str, Any]] = []
        revision = ""
        token = None
        while True:
            try:
                page = await self._objects.list_namespaced_custom_object(
                    GROUP, VERSION, namespace, plural, limit=500, _continue=token, **selector)
            except ApiException as exc:
                raise api_error(context, exc) from exc
            items += page["items"]
            revision = revision or page["metadata"]["resourceVersion"]
            token = page["metadata"].get("continue")
            if not token:
                return items, revision

    async def snapshot(self, job: str) -> tuple[dict[str, Record], str]:
        obj, job_rv = await self._list_job(job)
        if obj is None:
            raise JobNotFound(f"job {job} not found in namespace {self.namespace}")
        task_ns = self._task_namespace_of(job, obj)
        tasks, tasks_rv = await self._list_tasks(job, task_ns)
        records = {JOB_KEY: _job_record(obj)}
        for task in tasks:
            record = _task_record(task)
            records[record.key] = record
        return records, f"{job_rv}/{tasks_rv}"

    async def jobs(self) -> list[str]:
        items, _ = await self._list(self.namespace, JOB_PLURAL,
                                    f"listing MapReduceJobs in namespace {self.namespace}")
        return sorted(item["metadata"]["name"] for item in items)

    # --- writing --------------------------------------------------------------------

    async def patch(self, job: str, update: Update) -> Record | None:
        """Send ``update`` as a JSON Patch under ``/status``; None if a ``test`` failed.

        The API server answers a patch it cannot apply (a failed ``test``, or a path
        missing from the object) with a bare 422 whose message does not say which
        operation failed; validation errors (a 422 too) list their causes. We check the
        operations locally first, so a bare 422 can only mean the object no longer matches
        what the caller read: the lost race the protocol expects.
        """
        ops = [_status_op(op) for op in update.ops]
        if update.key == JOB_KEY:
            what = f"job {job}: patching record {update.key} (MapReduceJob {self.namespace}/{job})"
            call = self._objects.patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, JOB_PLURAL, job, ops, _content_type=JSON_PATCH)
        else:
            task_ns = await self.task_namespace(job, f"patching record {update.key}")
            name = task_object_name(job, update.key)
            what = f"job {job}: patching record {update.key} (MapReduceTask {task_ns}/{name})"
            call = self._objects.patch_namespaced_custom_object(
                GROUP, VERSION, task_ns, TASK_PLURAL, name, ops, _content_type=JSON_PATCH)
        self.stats.patches += 1
        self.stats.patch_bytes += len(orjson.dumps(ops))
        try:
            obj = await call
        except ApiException as exc:
            if exc.status == 404:
                raise JobNotFound(f"job {job}: record {update.key} not found") from exc
            if _patch_not_applicable(exc):
                self.stats.lost_races += 1
                return None
            raise api_error(what, exc) from exc
        return _job_record(obj) if update.key == JOB_KEY else _task_record(obj)

    async def delete(self, job: str) -> None:
        """Delete the MapReduceJob and its tasks (their namespace, if it is this job's)."""
        task_ns = self._task_ns.pop(job, None)
        if task_ns is None:
            obj = await self._read_job(job, "deleting the job")
            task_ns = self._task_namespace_of(job, obj) if obj else self._naming(job)
            self._task_ns.pop(job, None)
        try:
            await self._objects.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, JOB_PLURAL, job,
                propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise api_error(f"job {job}: deleting MapReduceJob {self.namespace}/{job}",
                                exc) from exc
        context = f"job {job}: deleting its tasks in namespace {task_ns}"
        namespace = await self._read_namespace(task_ns, context)
        if namespace is None:
            return
        labels = namespace["metadata"].get("labels") or {}
        try:
            if labels.get(LABEL_JOB) == job and labels.get(LABEL_JOB_NAMESPACE) == self.namespace:
                await self._core.delete_namespace(task_ns)
            else:  # a namespace shared with other things: remove only this job's tasks
                await self._objects.delete_collection_namespaced_custom_object(
                    GROUP, VERSION, task_ns, TASK_PLURAL, label_selector=f"{LABEL_JOB}={job}")
        except ApiException as exc:
            if exc.status != 404:
                raise api_error(context, exc) from exc

    # --- watching -------------------------------------------------------------------

    async def watch(self, job: str, since: str) -> AsyncIterator[WatchEvent]:
        """Merge the job's and its tasks' watch streams; return when the job is deleted.

        Each stream is in order; between the two, events interleave as they arrive (the
        runtime compares ``seq`` per record, so that is all it needs). After a 410 Gone a
        stream re-lists and emits a PUT for every current record, which may repeat ones
        already seen.
        """
        job_rv, sep, tasks_rv = since.partition("/")
        if not sep or not job_rv or not tasks_rv:
            raise ValueError(f"job {job}: {since!r} is not a revision from this store's "
                             "snapshot (expected '<jobRV>/<tasksRV>')")
        try:
            task_ns = await self.task_namespace(job, "watching")
        except JobNotFound:
            return
        queue: asyncio.Queue[WatchEvent | BaseException | None] = asyncio.Queue(maxsize=1024)

        async def job_stream() -> None:
            async def emit(kind: str, obj: dict[str, Any]) -> bool:
                if kind == "DELETED":
                    return False
                await queue.put(WatchEvent("PUT", _job_record(obj)))
                return True

            async def relist() -> str | None:
                obj, revision = await self._list_job(job)
                if obj is None:
                    return None
                await queue.put(WatchEvent("PUT", _job_record(obj)))
                return revision

            await self._follow(job, self.namespace, JOB_PLURAL, job_rv, emit, relist,
                               field_selector=f"metadata.name={job}")

        async def task_stream() -> None:
            async def emit(kind: str, obj: dict[str, Any]) -> bool:
                event: Literal["PUT", "DELETE"] = "DELETE" if kind == "DELETED" else "PUT"
                await queue.put(WatchEvent(event, _task_record(obj)))
                return True

            async def relist() -> str:
                tasks, revision = await self._list_tasks(job, task_ns)
                for task in tasks:
                    await queue.put(WatchEvent("PUT", _task_record(task)))
                return revision

            await self._follow(job, task_ns, TASK_PLURAL, tasks_rv, emit, relist,
                               label_selector=f"{LABEL_JOB}={job}")

        async def run(stream: Callable[[], Awaitable[None]]) -> None:
            try:
                await stream()
                await queue.put(None)
            except Exception as exc:  # handed to the consumer, which raises it
                await queue.put(exc)

        producers = [asyncio.create_task(run(job_stream), name=f"kubemr-watch-{job}-job"),
                     asyncio.create_task(run(task_stream), name=f"kubemr-watch-{job}-tasks")]
        try:
            while True:
                item = await queue.get()
                if item is None:  # only the job stream ends by itself: job deleted
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for producer in producers:
                producer.cancel()
            await asyncio.gather(*producers, return_exceptions=True)

    async def _follow(self, job: str, namespace: str, plural: str, revision: str,
                      emit: Callable[[str, dict[str, Any]], Awaitable[bool]],
                      relist: Callable[[], Awaitable[str | None]], **selector: str) -> None:
        """One list-watch loop: resume from the last version seen, re-list on 410 Gone.

        Returns when ``emit`` returns False (job deleted) or ``relist`` finds no job.
        Transient trouble (server restart, broken or silent stream, 5xx, 429) is retried
        with backoff from the last version seen; an error that retrying cannot fix (403,
        401, 400) is raised with the job in the message.
        """
        what = f"job {job}: watching {plural} in namespace {namespace}"
        backoff = 0.0
        current: str | None = revision
        while current is not None:
            if backoff:
                await asyncio.sleep(backoff)
            backoff = min(max(backoff * 2, 0.2), 5.0)  # reset by events and clean ends
            self.stats.watch_connects += 1
            try:
                resp = await self._objects.list_namespaced_custom_object(
                    GROUP, VERSION, namespace, plural, watch=True, allow_watch_bookmarks=True,
                    resource_version=current, timeout_seconds=self.watch_timeout,
                    _preload_content=False,
                    _request_timeout=aiohttp.ClientTimeout(
                        sock_connect=10, sock_read=self.inactivity_timeout),
                    **selector)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("%s: %s; reconnecting in %.1fs", what, exc, backoff)
                continue
            try:
                if resp.status != 200:
                    code, message = resp.status, status_message(await resp.read())
                else:
                    code, message = 0, ""
                    while True:
                        line = await resp.content.readline()
                        if not line:  # the server ended the watch (timeoutSeconds): resume
                            backoff = 0.0
                            break
                        event = orjson.loads(line)
                        kind, obj = event["type"], event["object"]
                        if kind == "ERROR":
                            code, message = int(obj.get("code") or 0), str(obj.get("message"))
                            break
                        backoff = 0.0
                        current = obj["metadata"]["resourceVersion"]
                        if kind != "BOOKMARK" and not await emit(kind, obj):
                            return
            except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
                log.info("%s: stream interrupted (%s); resuming from %s", what,
                         type(exc).__name__, current)
                continue
            finally:
                resp.release()
            if code == 410:  # our version left the server's window: start from a list
                self.stats.relists += 1
                current = await relist()
                backoff = 0.0
            elif code == 429 or code >= 500:
                log.warning("%s: HTTP %d: %s; retrying in %.1fs", what, code, message, backoff)
            elif code:
                raise KubeApiError(what, code, message)

    async def aclose(self) -> None:
        """Close the ApiClient if this store opened it; a shared one belongs to its owner."""
        if self._owns_api:
            await self.api.close()


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
    return Record(JOB_KEY, body, obj["metadata"]["resourceVersion"])


def _task_record(obj: Mapping[str, Any]) -> Record:
    metadata, body = obj["metadata"], cast(TaskRecord, decode_body(dict(obj["status"])))
    # Objects made by hand may lack the key label; protocol keys follow from the body.
    key = (metadata.get("labels") or {}).get(LABEL_TASK) or task_name(body)
    return Record(key, body, metadata["resourceVersion"])


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


def _patch_not_applicable(exc: ApiException) -> bool:
    """A 422 without causes: the patch did not apply (failed test or missing path)."""
    if exc.status != 422:
        return False
    try:
        status = orjson.loads(exc.body or b"{}")
    except orjson.JSONDecodeError:
        return False
    return isinstance(status, dict) and not (status.get("details") or {}).get("causes")


async def _bounded(limit: int, items: Iterable[T], fn: Callable[[T], Awaitable[None]]) -> None:
    """Run ``fn`` on every item with at most ``limit`` in flight; the first error wins."""
    pending = iter(items)

    async def worker() -> None:
        for item in pending:  # workers share one iterator, so each item runs once
            await fn(item)

    workers = [asyncio.create_task(worker()) for _ in range(limit)]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
