"""MapReduceJobs as a user sees them: the typed client layer under the ``kubemr`` CLI.

The CLI only parses flags and prints; everything that talks to the cluster is here. State
changes go through what the rest of the project already trusts: :class:`KubeStateStore`
for the job's and tasks' records (snapshot + watch, guarded JSON Patches) and
:mod:`kubemr_async.protocol` for what to write (``cancel`` is ``protocol.abort``,
``retry`` is ``protocol.retry``), so a user's command makes exactly the conditional write
a worker or the operator would make, and loses a race the same way instead of clobbering
one. Plain ``CustomObjectsApi``/``CoreV1Api`` calls cover what is not a record: creating
and listing resources, the status field the operator owns (``completionTime``), pod logs.

The pure helpers at the bottom (manifests, tables, durations) follow kubectl's
conventions, so the output reads like ``kubectl get`` and scripts can rely on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yaml
from kubernetes_asyncio.client import (
    ApiClient,
    AuthenticationV1Api,
    CoreV1Api,
    CustomObjectsApi,
)
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import ConfigException, list_kube_config_contexts

from . import protocol
from .crd import (
    API_VERSION,
    GROUP,
    JOB_KIND,
    JOB_PLURAL,
    LABEL_JOB,
    VERSION,
)
from .errors import JobFailed, KubemrError, UsageError
from .kube import KubeApiError, KubeObject, api_client, api_error, status_message
from .protocol import JOB_KEY, JobPhase, JobView, Progress, TaskState
from .records import JobRecord
from .spec import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_OUTPUT_FORMAT,
    DEFAULT_REDUCERS,
    DEFAULT_WORKERS,
    InvalidSpec,
    JobSpec,
    OutputFormat,
)
from .state.base import JobNotFound, Record
from .state.kube import KubeStateStore
from .storage.base import BlobNotFound, BlobStore
from .storage.s3 import S3BlobStore
from .storage.urls import is_s3, split_s3

T = TypeVar("T")

#: Where a pod finds its own namespace (what kubectl uses in-cluster).
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
MERGE_PATCH = "application/merge-patch+json"
#: Bytes per ranged GET when streaming a result object: bounded memory for any size.
CAT_CHUNK = 8 * 1024 * 1024
#: Reads answered with 429/5xx are tried this often (about 10 s in all).
READ_ATTEMPTS = 8
#: Guarded writes that lose this many races in a row give up (somebody keeps writing).
WRITE_ATTEMPTS = 10
#: How long `retry` waits for the operator to finish a job that just ended.
SETTLE_SECONDS = 30.0
#: The API server appends 5 characters to a generateName and caps names at 63.
_GENERATE_NAME = re.compile(r"^[a-z0-9][-a-z0-9]{0,57}$")


class NoSuchJob(KubemrError):
    """The MapReduceJob does not exist (404); the message names the job and namespace."""


# --- where the cluster is ------------------------------------------------------------


def default_namespace(kubeconfig: str | None, context: str | None,
                      environ: Mapping[str, str] = os.environ) -> str:
    """The namespace kubectl would use: the kubeconfig context's, a pod's own, else default.

    Follows :func:`kubemr_async.kube.api_client`'s choice between kubeconfig and in-cluster
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
    contexts, current = list_kube_config_contexts(config)
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
        api = await api_client(kubeconfig, context)
    except (ConfigException, yaml.YAMLError) as exc:
        raise KubemrError(f"kubeconfig {kubeconfig or '(default)'}: "
                          f"{' '.join(str(exc).split())}") from None
    try:
        yield JobClient(api, namespace)
    except aiohttp.ClientConnectionError as exc:
        raise KubemrError(f"cannot reach the Kubernetes API server at "
                          f"{api.configuration.host}: {exc}") from None
    except JobNotFound as exc:
        raise NoSuchJob(str(exc)) from None
    finally:
        await api.close()


# --- the client ----------------------------------------------------------------------


class JobClient:
    """The verbs of the CLI on the MapReduceJobs of one namespace."""

    def __init__(self, api: ApiClient, namespace: str) -> None:
        self.namespace = namespace
        self.store = KubeStateStore(api, namespace)
        self._objects = CustomObjectsApi(api)
        self._core = CoreV1Api(api)
        self._auth = AuthenticationV1Api(api)

    def _missing(self, name: str) -> NoSuchJob:
        return NoSuchJob(f"job {name} not found in namespace {self.namespace}")

    async def create(self, manifest: KubeObject) -> KubeObject:
        """POST a MapReduceJob (``generateName`` is the server's to fill); the created object."""
        label = _label(manifest.get("metadata") or {})
        try:
            created: KubeObject = await self._objects.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, JOB_PLURAL, manifest)
        except ApiException as exc:
            if exc.status == 409:
                raise KubemrError(f"job {label} already exists in namespace "
                                  f"{self.namespace}") from None
            if exc.status in (400, 422):  # the CRD schema rejected it: the user's input
                raise UsageError(f"invalid MapReduceJob {label}: "
                                 f"{status_message(exc.body, str(exc.reason))}") from None
            raise api_error(f"creating job {label} in namespace {self.namespace}",
                            exc) from None
        return created

    async def get(self, name: str) -> KubeObject:
        """The MapReduceJob as the API server has it; NoSuchJob if there is none."""
        async def read() -> KubeObject:
            try:
                obj: KubeObject = await self._objects.get_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, JOB_PLURAL, name)
            except ApiException as exc:
                if exc.status == 404:
                    raise self._missing(name) from None
                raise api_error(f"reading job {name} in namespace {self.namespace}",
                                exc) from None
            return obj

        return await _retrying(read)

    async def list(self, all_namespaces: bool = False) -> KubeObject:
        """The MapReduceJobList of this namespace, or of every namespace."""
        where = "all namespaces" if all_namespaces else f"namespace {self.namespace}"

        async def read() -> KubeObject:
            try:
                if all_namespaces:
                    listing: KubeObject = await self._objects.list_cluster_custom_object(
                        GROUP, VERSION, JOB_PLURAL)
                else:
                    listing = await self._objects.list_namespaced_custom_object(
                        GROUP, VERSION, self.namespace, JOB_PLURAL)
            except ApiException as exc:
                raise api_error(f"listing jobs in {where}", exc) from None
            return listing

        return await _retrying(read)

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
        async for event in self.store.watch(name, revision):
            if event.type == "DELETE":
                continue
            view.update(event.record.key, event.record.body)
            yield view
            if view.phase.finished:
                return
        raise NoSuchJob(f"job {name} was deleted from namespace {self.namespace}")

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
            await asyncio.sleep(0.2)  # lost a race (e.g. the operator starting it): re-read
        raise KubemrError(f"job {name} kept changing while being cancelled; try again")

    async def _user(self) -> str | None:
        """Who the API server says we are (SelfSubjectReview), to say who cancelled a job."""
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
        try:
            answer = await self._auth.create_self_subject_review(review)
        except ApiException:  # older servers, or not allowed: the reason names the tool
            return None
        info = answer.status.user_info if answer.status else None
        return str(info.username) if info and info.username else None

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
        try:
            await self._objects.patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, JOB_PLURAL, name,
                {"status": {"completionTime": None}}, _content_type=MERGE_PATCH)
        except ApiException as exc:
            raise api_error(f"job {name}: clearing its completionTime", exc) from None

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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_SECONDS
        while True:
            status = (await self.get(name)).get("status") or {}
            phase = JobPhase(status.get("phase") or JobPhase.PENDING)
            if not phase.finished or status.get("completionTime"):
                return
            if loop.time() > deadline:
                raise KubemrError(f"job {name} is {phase.value} but the operator has not "
                                  f"finished it after {SETTLE_SECONDS:g}s (no "
                                  "status.completionTime); is the operator running?")
            await asyncio.sleep(0.5)

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

    async def logs(self, name: str, follow: bool = False,
                   tail: int | None = None) -> AsyncGenerator[tuple[str, str, bytes], None]:
        """``(pod, container, line)`` from every worker pod of the job, as lines arrive.

        Pods are read concurrently (pods/log API); with ``follow`` until each one ends.
        Worker pods exist while the job runs: the operator removes them once it is decided.
        """
        await self.get(name)
        try:
            pods = await self._core.list_namespaced_pod(
                self.namespace, label_selector=f"{LABEL_JOB}={name}")
        except ApiException as exc:
            raise api_error(f"job {name}: listing its worker pods", exc) from None
        targets = sorted((p.metadata.name, p.spec.containers[0].name) for p in pods.items)
        if not targets:
            raise KubemrError(f"job {name} has no worker pods in namespace {self.namespace} "
                              "(they exist only while the job runs)")
        queue: asyncio.Queue[tuple[str, str, bytes] | BaseException | None] = asyncio.Queue(
            maxsize=1024)

        async def read(pod: str, container: str) -> None:
            try:
                resp = await self._core.read_namespaced_pod_log(
                    pod, self.namespace, container=container, follow=follow,
                    tail_lines=tail, _preload_content=False)
                try:
                    if resp.status != 200:
                        raise KubemrError(f"job {name}: logs of pod {pod}: HTTP {resp.status}: "
                                          f"{status_message(await resp.read())}")
                    while line := await resp.content.readline():
                        await queue.put((pod, container, line))
                finally:
                    resp.release()
                await queue.put(None)
            except Exception as exc:  # handed to the consumer, which raises it
                await queue.put(exc)

        readers = [asyncio.create_task(read(pod, container)) for pod, container in targets]
        try:
            running = len(readers)
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)


async def _retrying(read: Callable[[], Awaitable[T]]) -> T:
    """``read()``, retried while the API server says to come back (429, 5xx).

    It says so while restarting, and for a resource whose storage is still initialising
    right after its CRD was installed; a one-shot command should ride that out, as the
    watches in KubeStateStore do.
    """
    attempt = 0
    while True:
        try:
            return await read()
        except KubeApiError as exc:
            attempt += 1
            if attempt >= READ_ATTEMPTS or not (exc.status == 429 or exc.status >= 500):
                raise
        await asyncio.sleep(min(0.2 * 2 ** attempt, 2.0))


# --- result objects ------------------------------------------------------------------


class ResultReader:
    """Streams result objects (``s3://`` URLs) in bounded chunks, one store per bucket.

    Credentials and endpoint come from the environment (``S3Config.from_env``: the
    standard ``AWS_*`` variables and ``KUBEMR_S3_ENDPOINT``), as for workers.
    """

    def __init__(self) -> None:
        self._stores: dict[str, BlobStore] = {}

    async def copy(self, name: str, partition: int, url: str,
                   write: Callable[[bytes], None], output_format: OutputFormat = "text") -> None:
        """Write one result object to ``write``; a binary parquet part as JSON lines."""
        if not is_s3(url):
            raise UsageError(f"job {name}: the result of partition {partition} is not an "
                             f"s3:// URL ({url[:80]!r}); print it with `kubemr results`")
        bucket, key = split_s3(url)
        store = self._stores.setdefault(bucket, S3BlobStore.from_env(bucket))
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
        for store in self._stores.values():
            await store.aclose()


# --- pure helpers --------------------------------------------------------------------


def final_outputs(view: JobView, start: int) -> list[str]:
    """Outputs of partitions ``start, start+1, ...`` that are final now, in order."""
    if view.phase == JobPhase.SUCCEEDED and view.job is not None:
        return [str(result) for result in view.job["results"][start:]]
    outputs = []
    for partition in range(start, view.reduce_total):
        task = view.tasks.get(protocol.reduce_key(partition))
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


def load_manifest(text: str, source: str) -> KubeObject:
    """The one MapReduceJob in YAML ``text``; UsageError naming ``source`` otherwise."""
    try:
        docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise UsageError(f"{source}: invalid YAML: {' '.join(str(exc).split())}") from None
    if len(docs) != 1:
        raise UsageError(f"{source}: expected one MapReduceJob, found {len(docs)} documents")
    manifest = docs[0]
    if not isinstance(manifest, dict):
        raise UsageError(f"{source}: expected a MapReduceJob object, got "
                         f"{type(manifest).__name__}")
    if manifest.get("apiVersion") != API_VERSION or manifest.get("kind") != JOB_KIND:
        raise UsageError(f"{source}: expected apiVersion {API_VERSION}, kind {JOB_KIND}; got "
                         f"{manifest.get('apiVersion')}, {manifest.get('kind')}")
    meta = manifest.get("metadata")
    if not isinstance(meta, dict) or not (meta.get("name") or meta.get("generateName")):
        raise UsageError(f"{source}: metadata.name or metadata.generateName is required")
    spec = manifest.get("spec")
    if not isinstance(spec, dict):
        raise UsageError(f"{source}: spec is required")
    # What the API server would refuse, refused here in the words it would use.
    name = meta.get("name") or f"{meta['generateName']}00000"  # a generated name's shape
    try:
        JobSpec.from_resource(str(name), spec)
    except InvalidSpec as exc:
        raise UsageError(f"invalid MapReduceJob {_label(meta)}: {exc}") from None
    return manifest


def _label(meta: Mapping[str, Any]) -> str:
    """How messages name a MapReduceJob that may not have its name yet (``wordcount-*``)."""
    return str(meta.get("name") or f"{meta.get('generateName', '')}*")


def manifest_namespace(manifest: Mapping[str, Any], flag: str | None) -> str | None:
    """The namespace to create in: ``-n`` or the manifest's, which must agree (as kubectl)."""
    own = (manifest.get("metadata") or {}).get("namespace")
    if own and flag and own != flag:
        raise UsageError(f"the manifest's namespace {own!r} does not match --namespace {flag!r}")
    return flag or own or None


@dataclass(frozen=True)
class SubmitOptions:
    """A job described by ``kubemr submit`` flags instead of a manifest."""

    image: str
    job: str
    inputs: Sequence[str]
    output: str
    name: str | None = None
    generate_name: str | None = None
    workers: int = DEFAULT_WORKERS
    reducers: int = DEFAULT_REDUCERS
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    args: Mapping[str, str] | None = None
    split_inputs: bool = True
    chunk_size: int = DEFAULT_CHUNK_SIZE
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    output_format: OutputFormat = DEFAULT_OUTPUT_FORMAT


def build_manifest(options: SubmitOptions) -> KubeObject:
    """The MapReduceJob that ``options`` describe; UsageError naming the bad flag.

    The spec is validated by :class:`JobSpec` (every rule of the CRD, as ``kubemr run`` and
    the operator apply them), so bad flags fail here in one line naming the spec field rather
    than as a rejected object; the spec is written out whole, so the manifest says everything
    the job will do.
    Without a name, the job module's last component becomes the ``generateName`` prefix.
    """
    if options.name and options.generate_name:
        raise UsageError("--name and --generate-name cannot be used together")
    prefix = options.generate_name or (None if options.name else _name_prefix(options.job))
    if prefix is not None and not _GENERATE_NAME.match(prefix):
        raise UsageError(f"--generate-name {prefix!r} is invalid: use lowercase letters, "
                         "digits and '-', starting with a letter or digit, at most 58 "
                         "characters")
    spec = JobSpec(
        name=options.name or f"{prefix}00000",  # the shape of a generated name
        job=options.job, inputs=tuple(options.inputs), reducers=options.reducers,
        max_attempts=options.max_attempts, args=dict(options.args or {}),
        output=options.output, split_inputs=options.split_inputs,
        chunk_size=options.chunk_size, lease_seconds=options.lease_seconds,
        output_format=options.output_format, image=options.image, workers=options.workers,
    ).to_dict()
    metadata = {"name": options.name} if options.name else {"generateName": prefix}
    return {"apiVersion": API_VERSION, "kind": JOB_KIND, "metadata": metadata, "spec": spec}


def _name_prefix(job: str) -> str:
    """``examples.wordcount`` / ``/app/wordcount.py`` / ``pkg.mod:job`` -> ``wordcount-``."""
    stem = re.split(r"[./:]", job.removesuffix(".py").rstrip("/"))[-1] if job else ""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-")[:57]
    return f"{cleaned or 'job'}-"


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


def describe(obj: Mapping[str, Any]) -> str:
    """``kubemr status`` as text: phase, progress, error and results, one field a line."""
    meta, status = obj["metadata"], obj.get("status") or {}
    progress = status_progress(obj)
    phase = status.get("phase") or JobPhase.PENDING.value
    fields = [("Name", meta["name"]), ("Namespace", meta["namespace"]), ("Phase", phase),
              ("Maps", f"{progress.maps_done}/{progress.maps_total}"),
              ("Reduces", f"{progress.reduces_done}/{progress.reduces_total}")]
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
    return "\n".join(lines)
