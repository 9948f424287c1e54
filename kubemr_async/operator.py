"""`kubemr operator`: reconcile each MapReduceJob into task records, RBAC and a worker Job.

The operator is not a master: it never assigns work. It plans a job once (task records in
the job's task namespace), creates the workers (a batch/v1 Job whose pods run
`kubemr worker`) with a ServiceAccount that may touch only this job's objects, mirrors
progress into the status for printer columns, and cleans up when the job is decided.
Workers coordinate among themselves through the API server.

Every step is idempotent (create-if-missing, guarded patches), so a reconcile can run any
number of times, and an operator restarted at any point converges to the same state
(controller-runtime style). Reconciles of one job never run concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from . import protocol
from .conditions import job_conditions
from .crd import GROUP, JOB_PLURAL, TASK_PLURAL, VERSION
from .errors import KubemrError
from .inputs import plan_inputs
from .kube import KubeObject
from .protocol import JobPhase, JobView
from .spec import DEFAULT_WORKERS, JobSpec
from .state.kube import KubeStateStore, task_namespace_for, task_namespace_labels

log = logging.getLogger("kubemr.operator")

FINALIZER = "kubemr.io/cleanup"
PROGRESS_INTERVAL = 1.0
# Progress writes resend the whole job object (spec.inputs included) to every watcher, so
# big jobs report less often: one second per this many tasks, capped.
TASKS_PER_PROGRESS_SECOND = 1000
MAX_PROGRESS_INTERVAL = 15.0
RESYNC_SECONDS = 30.0
# Reasons a pod can sit in Waiting forever; the Job controller never fails such pods.
STUCK_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                 "CreateContainerConfigError", "CreateContainerError"}


@dataclass
class OperatorConfig:
    """How workers reach storage; credentials come from a Secret, never from a job spec."""

    namespace: str | None = None  # None: every namespace
    operator_namespace: str = "kubemr-system"
    s3_secret: str | None = None  # Secret (in operator_namespace) with AWS_* keys
    s3_endpoint: str = ""
    s3_region: str = "us-east-1"
    worker_command: list[str] = field(default_factory=lambda: ["kubemr", "worker"])
    # Failed worker pods tolerated before the job fails (workers crash, they do not err).
    worker_backoff_limit: int = 4
    image_pull_policy: str = "IfNotPresent"


def _owner(mrj: KubeObject) -> KubeObject:
    meta = mrj["metadata"]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MapReduceJob", "name": meta["name"],
            "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}


def _labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "kubemr-async", "app.kubernetes.io/component": "worker",
            "kubemr.io/job": name}


def worker_names(name: str) -> tuple[str, str]:
    """(service account / role name, batch Job name) for a MapReduceJob."""
    return f"kubemr-worker-{name}"[:63].rstrip("-"), f"{name}-workers"[:63].rstrip("-")


def _deep_merge(base: KubeObject, override: KubeObject) -> KubeObject:
    """Overlay a user's pod template; lists of containers merge by name, other lists replace."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        elif key == "containers" and isinstance(value, list):
            by_name = {c.get("name"): c for c in merged.get(key, [])}
            for container in value:
                name = container.get("name", "worker")
                by_name[name] = _deep_merge(by_name.get(name, {}), container)
            merged[key] = list(by_name.values())
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class Operator:
    def __init__(self, api: client.ApiClient, config: OperatorConfig) -> None:
        self.api = api
        self.config = config
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.rbac = client.RbacAuthorizationV1Api(api)
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._followers: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._seen: dict[tuple[str, str], tuple[Any, ...]] = {}

    # --- the watch loop ---------------------------------------------------------------

    async def run(self) -> None:
        """Watch MapReduceJobs and reconcile each change; resync everything periodically."""
        try:
            await asyncio.gather(self._watch_jobs(), self._resync())
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Stop progress followers and pending reconciles (the API client is the caller's)."""
        tasks = [*self._followers.values(), *self._tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _list_jobs(self, **kwargs: Any) -> KubeObject:
        if self.config.namespace:
            result: KubeObject = await self.custom.list_namespaced_custom_object(
                GROUP, VERSION, self.config.namespace, JOB_PLURAL, **kwargs)
        else:
            result = await self.custom.list_cluster_custom_object(
                GROUP, VERSION, JOB_PLURAL, **kwargs)
        return result

    async def _watch_jobs(self) -> None:
        """List, then watch from the list's version; on any failure back off and re-list.

        The API server answers 429 while a freshly installed CRD's storage initialises, and
        watches end or break routinely: none of that may stop the operator.
        """
        version = ""
        backoff = 0.5
        fn = (self.custom.list_namespaced_custom_object if self.config.namespace
              else self.custom.list_cluster_custom_object)
        args = ((GROUP, VERSION, self.config.namespace, JOB_PLURAL)
                if self.config.namespace else (GROUP, VERSION, JOB_PLURAL))
        while True:
            stream = watch.Watch()
            try:
                if not version:
                    listing = await self._list_jobs()
                    version = listing["metadata"]["resourceVersion"]
                    for item in listing["items"]:
                        self.schedule(item["metadata"]["namespace"], item["metadata"]["name"])
                async for event in stream.stream(fn, *args, resource_version=version,
                                                 allow_watch_bookmarks=True,
                                                 timeout_seconds=300):
                    backoff = 0.5
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        version = ""  # 410 Gone: start over from a fresh list
                        break
                    version = obj["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK" and self._changed(event["type"], obj):
                        self.schedule(obj["metadata"]["namespace"], obj["metadata"]["name"])
            except (ApiException, aiohttp.ClientError, TimeoutError) as exc:
                if not (isinstance(exc, ApiException) and exc.status == 410):
                    log.warning("listing or watching jobs failed; retrying",
                                extra={"error": f"{type(exc).__name__}: {exc}"})
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                version = ""
            finally:
                await stream.close()

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(RESYNC_SECONDS)
            with contextlib.suppress(ApiException, aiohttp.ClientError, TimeoutError):
                for item in (await self._list_jobs())["items"]:
                    self.schedule(item["metadata"]["namespace"], item["metadata"]["name"])

    def _changed(self, event_type: str, obj: KubeObject) -> bool:
        """Whether a watch event changes anything a reconcile acts on.

        Progress and lease traffic rewrite the status many times a second on a busy job;
        reconciling each of those would repeat a dozen API calls for nothing. The periodic
        resync still reconciles every job, whatever changed.
        """
        meta, status = obj["metadata"], obj.get("status") or {}
        key = (meta["namespace"], meta["name"])
        if event_type == "DELETED":
            self._seen.pop(key, None)
            return True
        fingerprint = (meta.get("generation"), bool(meta.get("deletionTimestamp")),
                       tuple(meta.get("finalizers") or ()), status.get("phase"),
                       status.get("completionTime"))
        if self._seen.get(key) == fingerprint:
            return False
        self._seen[key] = fingerprint
        return True

    def schedule(self, namespace: str, name: str) -> None:
        task = asyncio.create_task(self._guarded(namespace, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, namespace: str, name: str) -> None:
        lock = self._locks.setdefault((namespace, name), asyncio.Lock())
        async with lock:
            try:
                await self.reconcile(namespace, name)
            except Exception as exc:
                # Retried on the next event or resync; the Event tells `kubectl describe`
                # readers why the job is not moving (e.g. a permission the operator lacks).
                log.exception("reconcile failed", extra={"job": f"{namespace}/{name}"})
                meta = {"name": name, "namespace": namespace, "uid": ""}
                await self._event({"metadata": meta}, "ReconcileError",
                                  f"{type(exc).__name__}: {exc}", warning=True)

    # --- reconcile --------------------------------------------------------------------

    async def reconcile(self, namespace: str, name: str) -> None:
        try:
            mrj: KubeObject = await self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, JOB_PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                self._stop_follower(namespace, name)
                return
            raise
        meta = mrj["metadata"]
        if meta.get("deletionTimestamp"):
            await self._finalize(mrj)
            return
        if FINALIZER not in meta.get("finalizers", []):
            await self._patch_job(mrj, [{"op": "add", "path": "/metadata/finalizers",
                                         "value": [*meta.get("finalizers", []), FINALIZER]}],
                                  status=False)
        phase = JobPhase((mrj.get("status") or {}).get("phase") or JobPhase.PENDING)
        store = KubeStateStore(self.api, namespace)
        if phase == JobPhase.PENDING:
            if not await self._plan(mrj, store):
                return
            phase = JobPhase.RUNNING
        if phase == JobPhase.RUNNING:
            await self._write_status(mrj, phase)
            await self._ensure_workers(mrj)
            self._follow(namespace, name, store)
            await self._check_workers(mrj, store)
        else:
            await self._finish(mrj)

    async def _plan(self, mrj: KubeObject, store: KubeStateStore) -> bool:
        """Write every task record and start the job; False if planning failed the job."""
        name = mrj["metadata"]["name"]
        try:
            spec = JobSpec.from_dict(name, mrj["spec"])
            splits = await plan_inputs(spec)
        except KubemrError as exc:
            # Nothing was planned, so no worker can hold a claim: a plain status write is safe.
            reason = f"invalid job: {exc}"
            await self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, mrj["metadata"]["namespace"], JOB_PLURAL, name,
                {"status": {**protocol.new_status(), "phase": JobPhase.FAILED.value,
                            "error": {"task": "", "attempt": 0, "message": reason},
                            "seq": int((mrj.get("status") or {}).get("seq") or 0) + 1}},
                _content_type="application/merge-patch+json")
            await self._event(mrj, "Failed", reason, warning=True)
            return False
        await self._ensure_task_namespace(mrj)
        await store.create(name, [(protocol.JOB_KEY, protocol.new_job(spec)),
                                  *protocol.plan(spec, splits)])
        records, _ = await store.snapshot(name)
        job = records[protocol.JOB_KEY].job
        if job["phase"] == JobPhase.PENDING:
            await store.patch(name, protocol.start_job(job, len(splits)))
            await self._event(mrj, "Planned", f"{len(splits)} map and {spec.reducers} reduce "
                              "tasks created")
        return True

    async def _fail(self, mrj: KubeObject, store: KubeStateStore, reason: str) -> None:
        name = mrj["metadata"]["name"]
        records, _ = await store.snapshot(name)
        job = records[protocol.JOB_KEY].job
        if not JobPhase(job["phase"]).finished:
            await store.patch(name, protocol.abort(job, JobPhase.FAILED, reason))
            await self._event(mrj, "Failed", reason, warning=True)
        log.warning("job failed", extra={"job": name, "error": reason})

    async def _ensure_task_namespace(self, mrj: KubeObject) -> str:
        namespace, name = mrj["metadata"]["namespace"], mrj["metadata"]["name"]
        task_ns = task_namespace_for(namespace, name)
        await _create(self.core.create_namespace, {
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": task_ns, "labels": task_namespace_labels(namespace, name)}})
        return task_ns

    async def _ensure_workers(self, mrj: KubeObject) -> None:
        namespace, name = mrj["metadata"]["namespace"], mrj["metadata"]["name"]
        account, job_name = worker_names(name)
        owner = [_owner(mrj)]
        labels = _labels(name)
        task_ns = await self._ensure_task_namespace(mrj)
        meta = {"name": account, "namespace": namespace, "labels": labels,
                "ownerReferences": owner}
        await _create(self.core.create_namespaced_service_account, namespace,
                      {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta})
        await _create(self.rbac.create_namespaced_role, namespace, {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta,
            "rules": [{"apiGroups": [GROUP], "resources": [JOB_PLURAL],
                       "resourceNames": [name], "verbs": ["get", "list", "watch", "patch"]},
                      {"apiGroups": [GROUP], "resources": [f"{JOB_PLURAL}/status"],
                       "resourceNames": [name], "verbs": ["get", "patch"]}]})
        binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                               "name": account},
                   "subjects": [{"kind": "ServiceAccount", "name": account,
                                 "namespace": namespace}]}
        await _create(self.rbac.create_namespaced_role_binding, namespace,
                      {**binding, "metadata": meta})
        task_meta = {"name": account, "namespace": task_ns, "labels": labels}
        await _create(self.rbac.create_namespaced_role, task_ns, {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": task_meta,
            "rules": [{"apiGroups": [GROUP], "resources": [TASK_PLURAL],
                       "verbs": ["get", "list", "watch", "patch"]}]})
        await _create(self.rbac.create_namespaced_role_binding, task_ns,
                      {**binding, "metadata": task_meta})
        env = await self._worker_env(mrj, owner)
        await _create(self.batch.create_namespaced_job, namespace,
                      self.worker_job(mrj, job_name, account, env))

    async def _worker_env(self, mrj: KubeObject, owner: list[KubeObject]) -> list[KubeObject]:
        namespace, name = mrj["metadata"]["namespace"], mrj["metadata"]["name"]
        env: list[KubeObject] = [
            {"name": "KUBEMR_JOB", "value": name},
            {"name": "KUBEMR_NAMESPACE", "value": namespace},
            {"name": "KUBEMR_WORKER_ID",
             "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "AWS_REGION", "value": self.config.s3_region},
        ]
        if self.config.s3_endpoint:
            env.append({"name": "KUBEMR_S3_ENDPOINT", "value": self.config.s3_endpoint})
        if self.config.s3_secret:
            # Pods can only reference Secrets in their own namespace: copy it, owned by the job.
            source = await self.core.read_namespaced_secret(self.config.s3_secret,
                                                            self.config.operator_namespace)
            copy_name = f"{name}-s3"[:63].rstrip("-")
            await _create(self.core.create_namespaced_secret, namespace, {
                "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": copy_name, "namespace": namespace,
                             "labels": _labels(name), "ownerReferences": owner},
                "data": source.data})
            env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": copy_name, "key": key}}}
                    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
        return env

    def worker_job(self, mrj: KubeObject, job_name: str, account: str,
                   env: list[KubeObject]) -> KubeObject:
        """The batch/v1 Job whose pods are the workers (a work-queue Job: no completions)."""
        name = mrj["metadata"]["name"]
        spec = JobSpec.from_dict(name, mrj["spec"])
        pod: KubeObject = {
            "metadata": {"labels": _labels(name)},
            "spec": {
                "serviceAccountName": account,
                "restartPolicy": "Never",
                "containers": [{
                    "name": "worker", "image": spec.image,
                    "imagePullPolicy": self.config.image_pull_policy,
                    "command": list(self.config.worker_command), "env": env,
                    "securityContext": {"allowPrivilegeEscalation": False,
                                        "runAsNonRoot": True},
                }],
                # Workers hand their claims back on SIGTERM; give them time to do it.
                "terminationGracePeriodSeconds": 30,
            },
        }
        if spec.template:
            pod = _deep_merge(pod, dict(spec.template))
            # A job may shape its pods, but never choose their identity: the account is the
            # one whose Role reaches only this job's objects.
            pod["spec"]["serviceAccountName"] = account
            pod["spec"].pop("serviceAccount", None)
        return {
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": job_name, "namespace": mrj["metadata"]["namespace"],
                         "labels": _labels(name), "ownerReferences": [_owner(mrj)]},
            "spec": {"parallelism": spec.workers or DEFAULT_WORKERS,
                     "backoffLimit": self.config.worker_backoff_limit, "template": pod},
        }

    async def _check_workers(self, mrj: KubeObject, store: KubeStateStore) -> None:
        """Fail a Running job whose workers cannot run, instead of letting it hang."""
        namespace, name = mrj["metadata"]["namespace"], mrj["metadata"]["name"]
        _, job_name = worker_names(name)
        try:
            workers = await self.batch.read_namespaced_job(job_name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        for condition in workers.status.conditions or []:
            if condition.type == "Failed" and condition.status == "True":
                await self._fail(mrj, store, f"worker pods failed ({condition.reason}): "
                                 f"{condition.message or 'no message'}")
                return
        pods = await self.core.list_namespaced_pod(
            namespace, label_selector=f"job-name={job_name}")
        stuck = []
        for pod in pods.items:
            for status in (pod.status.container_statuses or []) if pod.status else []:
                waiting = status.state.waiting if status.state else None
                if waiting is not None and waiting.reason in STUCK_REASONS:
                    stuck.append(f"{waiting.reason}: {waiting.message or ''}".strip())
        if pods.items and len(stuck) == len(pods.items):
            await self._fail(mrj, store, f"worker pods cannot start: {stuck[0]}")

    # --- progress and the end of a job ------------------------------------------------

    def _follow(self, namespace: str, name: str, store: KubeStateStore) -> None:
        key = (namespace, name)
        if key not in self._followers or self._followers[key].done():
            self._followers[key] = asyncio.create_task(self._progress(namespace, name, store))

    def _stop_follower(self, namespace: str, name: str) -> None:
        follower = self._followers.pop((namespace, name), None)
        if follower is not None:
            follower.cancel()

    async def _progress(self, namespace: str, name: str, store: KubeStateStore) -> None:
        """Mirror task progress into the job's status (printer columns), at most once a second.

        The follower also stamps the verdict if the workers died right after the last
        commit: the write is the same guarded patch any worker would send.
        """
        records, revision = await store.snapshot(name)
        view = JobView({key: rec.body for key, rec in records.items()})
        shown: protocol.Progress | None = None
        last = 0.0
        interval = min(MAX_PROGRESS_INTERVAL, max(
            PROGRESS_INTERVAL,
            (view.map_total + view.reduce_total) / TASKS_PER_PROGRESS_SECOND))
        changes = store.watch(name, revision)
        while True:
            if view.phase.finished:
                break
            verdict = view.verdict()
            if verdict is not None:
                await store.patch(name, verdict)
            progress = view.progress()
            if progress != shown and time.monotonic() - last >= interval:
                await self._set_progress(namespace, name, progress)
                shown, last = progress, time.monotonic()
            try:
                event = await asyncio.wait_for(anext(changes), PROGRESS_INTERVAL)
            except TimeoutError:
                continue
            except StopAsyncIteration:
                return
            view.update(event.record.key, event.record.body)
        self._followers.pop((namespace, name), None)
        self.schedule(namespace, name)

    async def _set_progress(self, namespace: str, name: str, progress: protocol.Progress) -> None:
        patch = {"status": _progress_fields(progress)}
        with contextlib.suppress(ApiException):
            await self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, JOB_PLURAL, name, patch,
                _content_type="application/merge-patch+json")

    async def _finish(self, mrj: KubeObject) -> None:
        """A decided job: stop workers, stamp the time, honour the TTL. A Succeeded job's
        task records go (the results are on the object); a Failed or Cancelled job keeps
        them until it is deleted, so `kubemr retry` can reuse its committed maps."""
        namespace, name = mrj["metadata"]["namespace"], mrj["metadata"]["name"]
        status = mrj.get("status") or {}
        phase = JobPhase(status["phase"])
        if not status.get("completionTime"):
            await self._event(mrj, phase.value, f"job {phase.value.lower()}"
                              + (f": {protocol.format_error(status.get('error'))}"
                                 if phase != JobPhase.SUCCEEDED else ""),
                              warning=phase != JobPhase.SUCCEEDED)
            # Final counts, conditions and completionTime in one write: a reader who sees
            # the time (or waits for the condition) also sees the progress columns complete.
            records, _ = await KubeStateStore(self.api, namespace).snapshot(name)
            progress = JobView({k: r.body for k, r in records.items()}).progress()
            await self._write_status(mrj, phase, {**_progress_fields(progress),
                                                  "completionTime": _now()})
        else:
            await self._write_status(mrj, phase)
        self._stop_follower(namespace, name)
        await self._delete_workers(namespace, name, keep_tasks=status.get("phase")
                                   != JobPhase.SUCCEEDED)
        ttl = JobSpec.from_dict(name, mrj["spec"]).ttl_seconds_after_finished
        if ttl is not None:
            finished = datetime.fromisoformat(
                (status.get("completionTime") or _now()).replace("Z", "+00:00"))
            remaining = ttl - (datetime.now(UTC) - finished).total_seconds()
            if remaining <= 0:
                await _ignore_missing(self.custom.delete_namespaced_custom_object(
                    GROUP, VERSION, namespace, JOB_PLURAL, name))
            else:
                self._later(remaining, namespace, name)

    def _later(self, seconds: float, namespace: str, name: str) -> None:
        async def wake() -> None:
            await asyncio.sleep(seconds)
            self.schedule(namespace, name)

        task = asyncio.create_task(wake())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _delete_workers(self, namespace: str, name: str, keep_tasks: bool) -> None:
        """Stop the workers; drop task records unless a retry may still reuse them."""
        _, job_name = worker_names(name)
        await _ignore_missing(self.batch.delete_namespaced_job(
            job_name, namespace, propagation_policy="Background"))
        if not keep_tasks:
            await _ignore_missing(self.core.delete_namespace(task_namespace_for(namespace, name)))

    async def _finalize(self, mrj: KubeObject) -> None:
        """The job is being deleted: owned objects go by garbage collection; the task
        namespace cannot have a namespaced owner, so it is deleted here."""
        namespace, name = mrj["metadata"]["namespace"], mrj["metadata"]["name"]
        self._stop_follower(namespace, name)
        await _ignore_missing(self.core.delete_namespace(task_namespace_for(namespace, name)))
        finalizers = [f for f in mrj["metadata"].get("finalizers", []) if f != FINALIZER]
        if len(finalizers) != len(mrj["metadata"].get("finalizers", [])):
            await _ignore_missing(self._patch_job(mrj, [
                {"op": "test", "path": "/metadata/finalizers",
                 "value": mrj["metadata"]["finalizers"]},
                {"op": "replace", "path": "/metadata/finalizers", "value": finalizers}],
                status=False))

    # --- small API helpers ------------------------------------------------------------

    async def _write_status(self, mrj: KubeObject, phase: JobPhase,
                            fields: KubeObject | None = None) -> None:
        """Write ``fields`` and the conditions of ``phase`` into the status (a merge patch);
        nothing when there are no fields and the conditions on the object are current."""
        status = mrj.get("status") or {}
        previous = status.get("conditions") or []
        conditions = job_conditions(phase, status.get("error"),
                                    int(mrj["metadata"].get("generation") or 0), previous, _now())
        if not fields and conditions == previous:
            return
        await self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, mrj["metadata"]["namespace"], JOB_PLURAL, mrj["metadata"]["name"],
            {"status": {**(fields or {}), "conditions": conditions}},
            _content_type="application/merge-patch+json")

    async def _patch_job(self, mrj: KubeObject, ops: list[KubeObject], status: bool) -> None:
        fn = (self.custom.patch_namespaced_custom_object_status if status
              else self.custom.patch_namespaced_custom_object)
        await fn(GROUP, VERSION, mrj["metadata"]["namespace"], JOB_PLURAL,
                 mrj["metadata"]["name"], ops, _content_type="application/json-patch+json")

    async def _event(self, mrj: KubeObject, reason: str, message: str,
                     warning: bool = False) -> None:
        meta = mrj["metadata"]
        now = _now()
        with contextlib.suppress(ApiException):
            await self.core.create_namespaced_event(meta["namespace"], {
                "apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
                "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MapReduceJob",
                                   "name": meta["name"], "namespace": meta["namespace"],
                                   **({"uid": meta["uid"]} if meta.get("uid") else {})},
                "reason": reason, "message": message[:1024],
                "type": "Warning" if warning else "Normal",
                "firstTimestamp": now, "lastTimestamp": now, "count": 1,
                "source": {"component": "kubemr-operator"},
            })


def _progress_fields(progress: protocol.Progress) -> KubeObject:
    return {"mapsDone": progress.maps_done, "reduces": progress.reduces_total,
            "reducesDone": progress.reduces_done}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _create(fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """Create an object; one that already exists is what a repeated reconcile expects."""
    try:
        await fn(*args)
    except ApiException as exc:
        if exc.status != 409:
            raise


async def _ignore_missing(call: Awaitable[Any]) -> None:
    try:
        await call
    except ApiException as exc:
        if exc.status != 404:
            raise
