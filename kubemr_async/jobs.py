"""MapReduceJobs as a user sees them: the cluster client under the ``kubemr`` CLI.

The CLI only parses flags and prints (its rendering is :mod:`kubemr_async.cli_render`,
its manifests :mod:`kubemr_async.manifests`); everything that talks to the cluster is
here. State changes go through what the rest of the project already trusts:
:class:`KubeStateStore` for the job's and tasks' records (snapshot + watch, guarded JSON
Patches) and :mod:`kubemr_async.protocol` for what to write (``cancel`` is
``protocol.abort``, ``retry`` is ``protocol.retry``), so a user's command makes exactly the
conditional write a worker or the operator would make, and loses a race the same way
instead of clobbering one. Plain :class:`~kubemr_async.kube.Kube` calls cover what is not
a record: creating and listing resources, the status field the operator owns
(``completionTime``), pod logs.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    Sequence,
)
from pathlib import Path
from typing import Any, TypeVar

import anyio
import orjson
import yaml
from anyio.abc import ObjectSendStream

from . import protocol, timeline
from .crd import ADOPTED_REASON, LABEL_JOB, MAPREDUCE_JOBS
from .errors import JobFailed, KubemrError, UsageError
from .kube import (
    EVENTS,
    MERGE_PATCH,
    PODS,
    SELF_SUBJECT_REVIEWS,
    Backoff,
    BadRequest,
    Conflict,
    Forbidden,
    Kube,
    KubeApiError,
    KubeconfigError,
    KubeObject,
    NotFound,
    Unprocessable,
    Unreachable,
    kubeconfig_contexts,
)
from .manifests import job_label
from .protocol import JOB_KEY, JobPhase, JobView, Progress, TaskState
from .records import JobRecord, TaskRecord
from .spec import OutputFormat
from .state.base import JobNotFound, Record
from .state.kube import KubeStateStore
from .storage.base import BlobNotFound
from .storage.urls import StoreCache, is_s3, job_data_prefix, split_s3
from .streams import Producer, merge
from .timeline import TaskAttempts

T = TypeVar("T")

#: Where a pod finds its own namespace (what kubectl uses in-cluster).
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
#: Bytes per ranged GET when streaming a result object: bounded memory for any size.
CAT_CHUNK = 8 * 1024 * 1024
#: Reads answered with 429/5xx (or no answer) are tried this often (about 10 s in all)...
READ_ATTEMPTS = 8
#: ... but none is started this many seconds after the first: a server that does not
#: answer makes each try wait for its connect or read timeout (30 s, 75 s), and eight of
#: those kept a `kubemr status` waiting for minutes.
READ_DEADLINE = 30.0
#: Guarded writes that lose this many races in a row give up (somebody keeps writing).
WRITE_ATTEMPTS = 10
#: How long `retry` waits for the operator to finish a job that just ended.
SETTLE_SECONDS = 30.0


class NoSuchJob(KubemrError):
    """The MapReduceJob does not exist (404); the message names the job and namespace."""


# --- where the cluster is ------------------------------------------------------------


def default_namespace(kubeconfig: str | None, context: str | None,
                      environ: Mapping[str, str] = os.environ) -> str:
    """The namespace kubectl would use: the kubeconfig context's, a pod's own, else default.

    Follows :meth:`kubemr_async.kube.Kube.connect`'s choice between kubeconfig and in-cluster
    credentials, so the namespace comes from the same place as the cluster; a kubeconfig
    that is missing is reported here, in one line, before the client library logs about it.
    """
    if kubeconfig is not None and not Path(kubeconfig).expanduser().is_file():
        raise UsageError(f"kubeconfig {kubeconfig} does not exist")
    explicit = kubeconfig is not None or context is not None or environ.get("KUBECONFIG")
    if not explicit and environ.get("KUBERNETES_SERVICE_HOST"):
        with contextlib.suppress(OSError):
            return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
        return "default"
    config = kubeconfig or environ.get("KUBECONFIG") or "~/.kube/config"
    if not any(Path(path).expanduser().is_file() for path in config.split(os.pathsep) if path):
        raise KubemrError(f"no kubeconfig at {config}: pass --kubeconfig or set KUBECONFIG")
    contexts, current = kubeconfig_contexts(config)
    chosen = current
    if context is not None:
        chosen = next((c for c in contexts if c.get("name") == context), None)
        if chosen is None:
            raise UsageError(f"context {context!r} not found in kubeconfig {config}")
    return str(((chosen or {}).get("context") or {}).get("namespace") or "default")


@contextlib.asynccontextmanager
async def connect(kubeconfig: str | None = None, context: str | None = None,
                  namespace: str | None = None) -> AsyncIterator[JobClient]:
    """A :class:`JobClient` for ``namespace`` (default: :func:`default_namespace`).

    Turns what the Kubernetes client raises on its own (kubeconfig trouble, an unreachable
    server, a job deleted under our feet) into one-line KubemrErrors for the CLI.
    """
    try:
        fallback = default_namespace(kubeconfig, context)  # also checks the kubeconfig
        namespace = namespace or fallback
        kube = await Kube.connect(kubeconfig, context)
    except (KubeconfigError, yaml.YAMLError) as exc:
        raise KubemrError(f"kubeconfig {kubeconfig or '(default)'}: "
                          f"{' '.join(str(exc).split())}") from None
    try:
        yield JobClient(kube, namespace)
    except Unreachable as exc:
        raise KubemrError(f"cannot reach the Kubernetes API server at "
                          f"{kube.host}: {exc.reason}") from None
    except JobNotFound as exc:
        raise NoSuchJob(str(exc)) from None
    except NotFound as exc:
        if exc.body:  # a Status object: what the request named does not exist
            raise
        # A bare 404 page: the API server does not serve the resource at all.
        raise KubemrError(f"{exc.context}: the API server at {kube.host} does not serve "
                          "MapReduceJobs; install kubemr-async's CRDs and operator (its "
                          "Helm chart) on this cluster") from None
    finally:
        await kube.aclose()


# --- the client ----------------------------------------------------------------------


class JobClient:
    """The verbs of the CLI on the MapReduceJobs of one namespace."""

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.namespace = namespace
        self.kube = kube
        self.store = KubeStateStore(kube, namespace)

    def _missing(self, name: str) -> NoSuchJob:
        return NoSuchJob(f"job {name} not found in namespace {self.namespace}")

    async def create(self, manifest: KubeObject) -> KubeObject:
        """POST a MapReduceJob (``generateName`` is the server's to fill); the created object."""
        label = job_label(manifest.get("metadata") or {})
        try:
            return await self.kube.create(
                MAPREDUCE_JOBS, manifest, self.namespace,
                context=f"creating job {label} in namespace {self.namespace}")
        except Conflict:
            raise KubemrError(f"job {label} already exists in namespace "
                              f"{self.namespace}") from None
        except (BadRequest, Unprocessable) as exc:  # the CRD schema rejected the user's input
            raise UsageError(f"invalid MapReduceJob {label}: {exc.reason}") from None

    async def get(self, name: str) -> KubeObject:
        """The MapReduceJob as the API server has it; NoSuchJob if there is none."""
        try:
            return await _retrying(lambda: self.kube.get(
                MAPREDUCE_JOBS, name, self.namespace,
                context=f"reading job {name} in namespace {self.namespace}"))
        except NotFound as exc:
            if not exc.body:  # no Status object: no such resource, not no such job
                raise
            raise self._missing(name) from None

    async def list(self, all_namespaces: bool = False, selector: str | None = None
                   ) -> KubeObject:
        """The MapReduceJobList of this namespace, or of every namespace; only the jobs
        whose labels match ``selector`` (a label selector, as kubectl's ``-l``) if given.
        The API server parses the selector: one it refuses is a usage error."""
        where = "all namespaces" if all_namespaces else f"namespace {self.namespace}"
        path = MAPREDUCE_JOBS.path(None if all_namespaces else self.namespace)
        try:
            return await _retrying(lambda: self.kube.request(
                "GET", path, query={"labelSelector": selector},
                context=f"listing jobs in {where}"))
        except BadRequest as exc:
            raise UsageError(f"--selector {selector!r}: {exc.reason}") from None

    async def _records(self, name: str) -> tuple[dict[str, Record], str]:
        try:
            return await _retrying(lambda: self.store.snapshot(name))
        except JobNotFound:
            raise self._missing(name) from None

    async def follow(self, name: str) -> AsyncGenerator[JobView, None]:
        """The job's view now, then again after every change, ending with the decided view.

        The same (updated) view is yielded each time. Task records that disappear are
        kept as last seen: the operator removes a decided job's records, and a reader
        still wants the counts it had. NoSuchJob if the job is deleted meanwhile.
        """
        records, revision = await self._records(name)
        view = JobView({key: record.body for key, record in records.items()})
        yield view
        if view.phase.finished:
            return
        async with contextlib.aclosing(self.store.watch(name, revision)) as events:
            async for event in events:
                if event.type == "DELETE":
                    continue
                view.update(event.record.key, event.record.body)
                yield view
                if view.phase.finished:
                    return
        raise NoSuchJob(f"job {name} was deleted from namespace {self.namespace}")

    async def tasks(self, name: str) -> Sequence[TaskRecord]:
        """The job's task records as they are now (none once the job has Succeeded: the
        operator deletes them)."""
        records, _ = await self._records(name)
        return [record.task for key, record in records.items() if key != JOB_KEY]

    async def timeline(self, name: str) -> tuple[KubeObject, Sequence[TaskAttempts]]:
        """The job and every task's attempts, for its timeline page.

        From the task records while they exist (a running, failed or cancelled job); a
        Succeeded job's records are gone (the operator deletes them), so then from the
        attempts the worker that stamped it left beside its results (``timeline.FILE``,
        read with the standard ``AWS_*`` variables and ``KUBEMR_S3_ENDPOINT``).
        """
        obj = await self.get(name)
        tasks = await self.tasks(name)
        phase = JobPhase((obj.get("status") or {}).get("phase") or JobPhase.PENDING)
        if tasks or phase != JobPhase.SUCCEEDED:
            return obj, timeline.kept(tasks)
        output = str((obj.get("spec") or {}).get("output") or "")
        url = f"s3://{split_s3(output)[0]}/" + job_data_prefix(output, self.namespace, name)
        stores = StoreCache()
        try:
            store, key = stores.open(f"{url}/{timeline.FILE}")
            data = await store.get(key)
        except BlobNotFound:
            raise KubemrError(f"job {name} succeeded but its attempts are gone: neither "
                              f"task records nor {url}/{timeline.FILE}") from None
        finally:
            await stores.aclose()
        return obj, orjson.loads(data)

    async def cancel(self, name: str) -> str:
        """Stamp the job Cancelled (``protocol.abort``); the operator then stops its workers.

        Returns the reason written. A job that is already decided is an error: there is
        nothing to cancel, and its verdict must not change.
        """
        reason = f"cancelled by {await self._user() or 'kubemr cancel'}"
        for _ in range(WRITE_ATTEMPTS):
            records, _ = await self._records(name)
            job = records[JOB_KEY].job
            phase = JobPhase(job["phase"])
            if phase.finished:
                raise KubemrError(f"job {name} is already {phase.value}; nothing to cancel")
            update = protocol.abort(job, JobPhase.CANCELLED, reason)
            if await self.store.patch(name, update) is not None:
                return reason
            await anyio.sleep(0.2)  # lost a race (e.g. the operator starting it): re-read
        raise KubemrError(f"job {name} kept changing while being cancelled; try again")

    async def _user(self) -> str | None:
        """Who the API server says we are (SelfSubjectReview), to say who cancelled a job."""
        review = {"apiVersion": SELF_SUBJECT_REVIEWS.api_version,
                  "kind": SELF_SUBJECT_REVIEWS.kind}
        try:
            answer = await self.kube.create(SELF_SUBJECT_REVIEWS, review,
                                            context="asking who we are")
        except KubeApiError:  # older servers, or not allowed: the reason names the tool
            return None
        username = ((answer.get("status") or {}).get("userInfo") or {}).get("username")
        return str(username) if username else None

    async def delete(self, name: str, wait: bool = False) -> None:
        """Delete the job (its workers, records and task namespace go with it).

        With ``wait``, return once the API server no longer has it: the operator's
        finalizer holds it until the task namespace is being removed.
        """
        await self.get(name)
        await self.store.delete(name)
        if not wait:
            return
        try:
            _, revision = await self._records(name)
        except NoSuchJob:
            return
        async for _ in self.store.watch(name, revision):
            pass  # the watch ends when the job is deleted

    async def retry(self, name: str) -> None:
        """Re-open a Failed or Cancelled job, keeping every committed task and its outputs.

        Applies ``protocol.retry``'s updates in order (tasks first, the job last, so no
        worker starts before the tasks are reset), then clears ``completionTime``: the
        operator keys its end-of-job handling (events, the timestamp, TTL) on it, and
        recreates the workers when it sees the job Running again.
        """
        await self._wait_settled(name)
        records, _ = await self._records(name)
        view = JobView({key: record.body for key, record in records.items()})
        try:
            updates = protocol.retry(view)
        except ValueError as exc:
            raise KubemrError(f"job {name}: {exc}") from None
        if not view.complete:
            progress = view.progress()
            found = len(view.records) - 1
            raise KubemrError(
                f"job {name} cannot be retried: it has {found} of "
                f"{progress.maps_total + progress.reduces_total} task records (it failed "
                "before its tasks were planned); submit it again")
        for update in updates:
            if await self.store.patch(name, update) is None:
                raise KubemrError(f"job {name} changed while being retried (record "
                                  f"{update.key}); run kubemr retry again")
        await self.kube.patch(MAPREDUCE_JOBS, name, {"status": {"completionTime": None}},
                              self.namespace, content_type=MERGE_PATCH, subresource="status",
                              context=f"job {name}: clearing its completionTime")

    async def wait(self, name: str,
                   on_progress: Callable[[Progress], None] | None = None) -> JobRecord:
        """Follow the job to its verdict; its final job record, or JobFailed with the reason.

        ``on_progress`` sees the maps and reduces done after every change (progress bars).
        """
        view: JobView | None = None
        async with contextlib.aclosing(self.follow(name)) as views:
            async for view in views:
                if on_progress is not None:
                    on_progress(_decided_progress(view))
        if view is None or view.job is None or view.phase != JobPhase.SUCCEEDED:
            raise JobFailed(verdict_message(name, view.job if view and view.job else {}))
        return view.job

    async def _wait_settled(self, name: str) -> None:
        """Wait until the operator has handled a decided job's end (``completionTime``).

        Re-opening the job before that races the operator's clean-up of the run that just
        ended: it could stamp the old completionTime onto the new run.
        """
        deadline = anyio.current_time() + SETTLE_SECONDS
        while True:
            status = (await self.get(name)).get("status") or {}
            phase = JobPhase(status.get("phase") or JobPhase.PENDING)
            if not phase.finished or status.get("completionTime"):
                return
            if anyio.current_time() > deadline:
                raise KubemrError(f"job {name} is {phase.value} but the operator has not "
                                  f"finished it after {SETTLE_SECONDS:g}s (no "
                                  "status.completionTime); is the operator running?")
            await anyio.sleep(0.5)

    async def results(self, name: str) -> AsyncGenerator[tuple[int, str], None]:
        """``(partition, output)`` in partition order, each as soon as it is final.

        A reduce's committed output is final (it is what the verdict will list), so
        partition ``p`` is yielded once reduces ``0..p`` have committed, while the job may
        still run. If the job fails or is cancelled, JobFailed after what was complete.
        """
        done = 0
        total = 0
        view: JobView | None = None
        async with contextlib.aclosing(self.follow(name)) as views:
            async for view in views:
                total = view.reduce_total
                for output in final_outputs(view, done):
                    yield done, output
                    done += 1
        if view is not None and view.phase != JobPhase.SUCCEEDED:
            raise JobFailed(f"{verdict_message(name, view.job or {})} (partitions complete: "
                            f"{done} of {total})")

    async def logs(self, name: str, follow: bool = False, tail: int | None = None,
                   on_unreadable: Callable[[str], None] = lambda note: None,
                   ) -> AsyncGenerator[tuple[str, str, bytes], None]:
        """``(pod, container, line)`` from every worker pod of the job, as lines arrive.

        Pods are read concurrently (pods/log API); with ``follow`` until each one ends.
        Worker pods exist while the job runs: the operator removes them once it is decided.
        A warm pool's standby that the job adopted (its ``Adopted`` Event names the pod)
        is read too where the caller may read the pool's namespace; where it may not,
        ``on_unreadable`` is told, in one line.
        """
        await self.get(name)
        pods, _ = await self.kube.list(PODS, self.namespace, label_selector=f"{LABEL_JOB}={name}",
                                       context=f"job {name}: listing its worker pods")
        targets = sorted((self.namespace, p["metadata"]["name"],
                          p["spec"]["containers"][0]["name"]) for p in pods)
        for namespace, pod in await self._standbys(name):
            try:
                found = await self.kube.get(PODS, pod, namespace)
            except Forbidden:
                on_unreadable(f"the standby worker {pod} that job {name} adopted runs in "
                              f"namespace {namespace}, whose logs you may not read")
                continue
            except NotFound:
                continue  # removed with the job's end
            targets.append((namespace, pod, found["spec"]["containers"][0]["name"]))
        if not targets:
            raise KubemrError(f"job {name} has no worker pods in namespace {self.namespace} "
                              "(they exist only while the job runs)")

        def reader(namespace: str, pod: str,
                   container: str) -> Producer[tuple[str, str, bytes]]:
            async def read(send: ObjectSendStream[tuple[str, str, bytes]]) -> None:
                context = f"job {name}: logs of pod {pod}"
                resp = await self.kube.open(
                    "GET", PODS.path(namespace, pod, "log"), context=context,
                    query={"container": container, "follow": follow, "tailLines": tail})
                try:
                    while line := await resp.content.readline():
                        await send.send((pod, container, line))
                finally:
                    resp.release()
            return read

        lines = merge([reader(*target) for target in targets],
                      name=f"kubemr-logs-{name}")
        async with contextlib.aclosing(lines):
            async for line in lines:
                yield line

    async def _standbys(self, name: str) -> Sequence[tuple[str, str]]:
        """(namespace, pod) of the warm pool's standbys the job adopted, from its
        ``Adopted`` Events' related pod; none if Events cannot be listed here."""
        try:
            events, _ = await self.kube.list(
                EVENTS, self.namespace, context=f"job {name}: listing its Events",
                field_selector=f"involvedObject.name={name},reason={ADOPTED_REASON}")
        except Forbidden:
            return []
        related = (event.get("related") or {} for event in events)
        return sorted({(obj["namespace"], obj["name"]) for obj in related
                       if obj.get("kind") == "Pod" and obj.get("name")
                       and obj.get("namespace")})


async def _retrying(read: Callable[[], Awaitable[T]]) -> T:
    """``read()``, retried while the API server says to come back (429, 5xx).

    It says so while restarting, and for a resource whose storage is still initialising
    right after its CRD was installed; a one-shot command should ride that out, as the
    watches in KubeStateStore do.
    """
    backoff = Backoff(initial=0.4, maximum=2.0)
    deadline = time.monotonic() + READ_DEADLINE
    for attempt in range(1, READ_ATTEMPTS + 1):
        await backoff.wait()  # the first try does not wait
        try:
            return await read()
        except KubeApiError as exc:
            if attempt == READ_ATTEMPTS or not exc.transient or time.monotonic() > deadline:
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")


# --- result objects ------------------------------------------------------------------


class ResultReader:
    """Streams result objects (``s3://`` URLs) in bounded chunks, one store per bucket.

    Credentials and endpoint come from the environment (``S3Config.from_env``: the
    standard ``AWS_*`` variables and ``KUBEMR_S3_ENDPOINT``), as for workers.
    """

    def __init__(self) -> None:
        self._stores = StoreCache()

    async def copy(self, name: str, partition: int, url: str,
                   write: Callable[[bytes], None], output_format: OutputFormat = "text") -> None:
        """Write one result object to ``write``; a binary parquet part as JSON lines."""
        if not is_s3(url):
            raise UsageError(f"job {name}: the result of partition {partition} is not an "
                             f"s3:// URL ({url[:80]!r}); print it with `kubemr results`")
        store, key = self._stores.open(url)
        start = 0
        try:
            if output_format == "parquet":  # a parquet file is only readable whole
                from . import formats  # pyarrow: imported only when needed

                write(formats.printable(await store.get(key), output_format))
                return
            while True:
                data = await store.get(key, start, start + CAT_CHUNK)
                write(data)
                if len(data) < CAT_CHUNK:
                    return
                start += len(data)
        except BlobNotFound:
            raise KubemrError(f"job {name}: the result of partition {partition} ({url}) "
                              "does not exist") from None

    async def aclose(self) -> None:
        await self._stores.aclose()


# --- pure helpers --------------------------------------------------------------------


def final_outputs(view: JobView, start: int) -> list[str]:
    """Outputs of partitions ``start, start+1, ...`` that are final now, in order (only
    the last step's: an earlier step's parts are the next step's input, not results)."""
    if view.phase == JobPhase.SUCCEEDED and view.job is not None:
        return [str(result) for result in view.job["results"][start:]]
    if not view.last_step:
        return []
    outputs = []
    for partition in range(start, view.reduce_total):
        task = view.tasks.get(protocol.reduce_key(partition, view.step))
        if task is None or task["state"] != TaskState.COMMITTED:
            break
        outputs.append(str(task["outputs"]))
    return outputs


def verdict_message(name: str, job: Mapping[str, Any]) -> str:
    """``job NAME failed: <reason>`` / ``job NAME cancelled: <reason>``: one line."""
    phase = str(job.get("phase") or JobPhase.PENDING.value)
    return f"job {name} {phase.lower()}: {protocol.format_error(job.get('error'))}"


def _decided_progress(view: JobView) -> Progress:
    """The view's progress, complete for a Succeeded job (whose task events may lag)."""
    progress = view.progress()
    if view.phase != JobPhase.SUCCEEDED:
        return progress
    return Progress(progress.maps_total, progress.maps_total, progress.reduces_total,
                    progress.reduces_total, 0, 0)


def published_results(name: str, obj: Mapping[str, Any]) -> list[str]:
    """The results a Succeeded job lists; JobFailed or KubemrError saying why there are none."""
    status = obj.get("status") or {}
    phase = JobPhase(status.get("phase") or JobPhase.PENDING)
    if phase in (JobPhase.FAILED, JobPhase.CANCELLED):
        raise JobFailed(verdict_message(name, status))
    if phase != JobPhase.SUCCEEDED:
        raise KubemrError(f"job {name} is {phase.value}: its results are listed once it "
                          "succeeds (--cat streams them as reduces finish)")
    return [str(result) for result in status.get("results") or []]
