"""Reconcile one MapReduceJob: bring the cluster to what the job's phase asks for.

Pending: plan it (task records in its task namespace). Running: make sure its workers exist
(ServiceAccount, Roles, RoleBindings, Secret copy, batch Job), follow its progress, fail
it if its workers cannot run, and move a multi-step job whose step is done to its next.
Decided: stamp it, stop the workers, honour the TTL. Deleted: remove what garbage
collection cannot (the task namespace), then our finalizer.

Every step is idempotent (create-if-missing, guarded patches), so a reconcile can run any
number of times, and an operator restarted at any point converges to the same state
(controller-runtime style). The queue (:mod:`.queue`) makes sure reconciles of one job
never run concurrently; a second operator doing the same is harmless too.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime

from .. import protocol
from ..crd import ADOPTED_REASON, MAPREDUCE_JOBS
from ..errors import KubemrError, UsageError
from ..formats import SUCCESS_MARKER
from ..inputs import Split, plan_inputs
from ..kube import (
    BATCH_JOBS,
    EVENTS,
    JSON_PATCH,
    MERGE_PATCH,
    NAMESPACES,
    PODS,
    ROLE_BINDINGS,
    ROLES,
    SECRETS,
    SERVICE_ACCOUNTS,
    Kube,
    KubeApiError,
    KubeObject,
    NotFound,
    ensure_namespace,
)
from ..protocol import JobPhase, JobView
from ..scrub import scrub
from ..spec import DEFAULT_WORKERS, JobSpec
from ..state.kube import KubeStateStore, task_namespace_for, task_namespace_labels
from ..storage.urls import StoreCache, job_data_prefix, split_s3
from .admission import Admission, Refused, StorageAccess, admit
from .config import OperatorConfig
from .crashloop import DeathWatch, progress_of
from .followers import Followers, Key
from .pool import WarmPool, may_adopt
from .resources import (
    add_finalizer,
    event,
    finished_message,
    invalid_job_status,
    job_key,
    job_role,
    now,
    pods_out_of_memory,
    pods_stuck,
    progress_fields,
    remove_finalizer,
    role_binding,
    service_account,
    status_patch,
    task_role,
    ttl_remaining,
    worker_env,
    worker_job,
    worker_names,
    workers_adopted,
    workers_ended_early,
    workers_failed,
)
from .tenancy import Tenancy

log = logging.getLogger("kubemr.operator")

#: While a job's workers have died since its last commit, it is reconciled again this
#: often (seconds), so a crash loop is judged soon, not at the next resync.
DEATHS_RECHECK_SECONDS = 5.0


def state_store(kube: Kube, namespace: str) -> KubeStateStore:
    """The job records of ``namespace``: the operator's one construction of a state store.

    Until KubeStateStore takes a :class:`Kube` (issue 8, the store's move onto the client
    layer), it is handed the connection's own ApiClient; then this becomes
    ``KubeStateStore(kube, namespace)``.
    """
    return KubeStateStore(kube, namespace)


def check_inputs_outside(splits: list[Split], output: str, namespace: str, name: str) -> None:
    """UsageError if an input lies in the job's own data location.

    Only an earlier job of this name can have left objects there (its parts, a failed
    job's shuffle objects), and an input prefix or glob over ``output`` picks them up.
    This job writes the same keys and deletes its ``map/`` once it succeeds, so it would
    count the earlier job's results as input, and overwrite or delete what it is reading.
    """
    location = f"s3://{split_s3(output)[0]}/{job_data_prefix(output, namespace, name)}/"
    for url, _ in splits:
        if url.startswith(location):
            raise UsageError(f"input {url} lies in this job's own data location {location} "
                             f"(left by an earlier job named {name!r}); delete it there, "
                             f"or give the job another name or output")


class Reconciler:
    """Reconciles jobs; ``requeue_after(key, seconds)`` asks for a later reconcile."""

    def __init__(self, kube: Kube, config: OperatorConfig, followers: Followers,
                 requeue_after: Callable[[Key, float], None],
                 pool: WarmPool | None = None) -> None:
        self.kube = kube
        self.config = config
        #: The warm pool whose standbys new jobs adopt (None: every worker starts cold).
        self.pool = pool
        #: The stores reaching S3 with the platform's credentials (.admission), kept: see
        #: _stores. The operator closes them when it stops (aclose).
        self.platform_stores = StoreCache()
        self.tenancy = Tenancy.of(config)
        self.followers = followers
        self.requeue_after = requeue_after
        #: Running jobs' worker pod deaths since their last commit (.crashloop).
        self.deaths: dict[Key, DeathWatch] = {}

    async def reconcile(self, namespace: str, name: str) -> None:
        """Reconcile job ``name`` in ``namespace`` once (one that is gone is forgotten)."""
        try:
            mrj = await self.kube.get(MAPREDUCE_JOBS, name, namespace)
        except NotFound:
            self.followers.stop((namespace, name))
            self.deaths.pop((namespace, name), None)
            return
        if mrj["metadata"].get("deletionTimestamp"):
            await self._finalize(mrj)
            return
        ops = add_finalizer(mrj)
        if ops is not None:
            await self.kube.patch(MAPREDUCE_JOBS, name, ops, namespace, content_type=JSON_PATCH)
        phase = JobPhase((mrj.get("status") or {}).get("phase") or JobPhase.PENDING)
        store = state_store(self.kube, namespace)
        if phase.finished:
            await self._finish(mrj)
            return
        admission = await self._admit(mrj, store, phase)
        if admission is None:
            return
        fresh = phase == JobPhase.PENDING
        if fresh:
            if not await self._plan(mrj, store, admission.storage):
                return
            phase = JobPhase.RUNNING
        await self._write_status(mrj, phase)
        await self._ensure_workers(mrj, admission.storage, fresh)
        self.followers.follow((namespace, name), store)
        await self._advance(mrj, store, admission.storage)
        await self._check_workers(mrj, store)

    async def aclose(self) -> None:
        """Close what the reconciler keeps between jobs (its S3 clients)."""
        await self.platform_stores.aclose()

    async def event(self, meta: KubeObject, reason: str, message: str,
                    warning: bool = False, related: KubeObject | None = None) -> None:
        """Record an Event about the job with metadata ``meta`` (best effort: an Event that
        cannot be written must not stop a reconcile), scrubbed of anything credential-like."""
        try:
            await self.kube.create(EVENTS, event(meta, reason, scrub(message), warning, now(),
                                                 related), meta["namespace"])
        except KubeApiError as exc:
            log.debug("writing an event failed: %s", exc)

    # --- a new job --------------------------------------------------------------------

    async def _admit(self, mrj: KubeObject, store: KubeStateStore,
                     phase: JobPhase) -> Admission | None:
        """Judge the job before anything is made for it (and again while it runs: the
        namespace's labels or the tenant's Secret may change); None if it was refused,
        which fails it at once with the reason and a Warning Event."""
        try:
            return await admit(self.kube, self.config, self.tenancy, mrj)
        except KubemrError as exc:
            if isinstance(exc, KubeApiError) and exc.transient:
                raise
            reason = f"refused: {exc}" if isinstance(exc, Refused) else f"invalid job: {exc}"
        if phase == JobPhase.PENDING:
            await self._refuse(mrj, reason)
        else:
            await self._fail(mrj, store, reason)
        return None

    async def _refuse(self, mrj: KubeObject, reason: str,
                      secrets: tuple[str, ...] = ()) -> None:
        """Fail a job nothing was planned for: no worker can hold a claim, so a plain
        status write is safe."""
        namespace, name = job_key(mrj)
        reason = scrub(reason, secrets)
        await self.kube.patch(MAPREDUCE_JOBS, name, invalid_job_status(mrj, reason),
                              namespace, content_type=MERGE_PATCH, subresource="status")
        await self.event(mrj["metadata"], "Failed", reason, warning=True)
        log.warning("job refused", extra={"job": name, "namespace": namespace,
                                          "error": reason})

    async def _plan(self, mrj: KubeObject, store: KubeStateStore,
                    storage: StorageAccess) -> bool:
        """Write every task record and start the job, listing its inputs with its own
        credentials; False if planning failed the job."""
        name = mrj["metadata"]["name"]
        try:
            spec = JobSpec.from_dict(name, mrj["spec"])
            async with self._stores(storage) as stores:
                splits = await plan_inputs(spec, stores=stores)
                check_inputs_outside(splits, spec.output, job_key(mrj)[0], name)
                await self._drop_earlier_manifest(spec, job_key(mrj)[0], name, stores,
                                                  storage.secrets)
        except KubemrError as exc:
            await self._refuse(mrj, f"invalid job: {exc}", storage.secrets)
            return False
        await self._ensure_task_namespace(mrj)
        # Shards follow the workers the Job starts: each watches one shard (protocol).
        shards = protocol.shard_count(spec.workers or DEFAULT_WORKERS)
        await store.create(name, [(protocol.JOB_KEY,
                                   protocol.new_job(spec, every_step=True, shards=shards)),
                                  *protocol.plan(spec, splits)])
        records, _ = await store.snapshot(name)
        job = records[protocol.JOB_KEY].job
        if job["phase"] == JobPhase.PENDING:
            maps = protocol.map_count(spec, len(splits))
            await store.patch(name, protocol.start_job(job, maps))
            await self.event(mrj["metadata"], "Planned",
                             f"{maps} map and {spec.reducers} reduce tasks created")
        return True

    async def _drop_earlier_manifest(self, spec: JobSpec, namespace: str, name: str,
                                     stores: StoreCache, secrets: tuple[str, ...]) -> None:
        """Remove the ``_SUCCESS`` an earlier job of this name left (``kubemr delete`` keeps
        results): this job writes the same attempt-unique keys under the same prefix, so
        that manifest would present the parts this job overwrites, or this job's failure,
        as a finished result to ``read_results``. Only the job's own data prefix is touched,
        with the job's own credentials; no worker has written anything yet.

        Best effort: a job whose inputs need no S3 must not be refused over an S3 hiccup
        here (a missing bucket, say, holds no manifest); the workers report S3 problems.
        """
        try:
            blobs, _ = stores.open(spec.output)
            prefix = job_data_prefix(spec.output, namespace, name)
            if await blobs.delete_prefix(f"{prefix}/{SUCCESS_MARKER}"):
                log.info("removed an earlier job's manifest",
                         extra={"job": name, "namespace": namespace})
        except KubemrError as exc:
            log.warning("could not remove an earlier job's manifest",
                        extra={"job": name, "namespace": namespace,
                               "error": scrub(str(exc), secrets)})

    @contextlib.asynccontextmanager
    async def _stores(self, storage: StorageAccess) -> AsyncIterator[StoreCache]:
        """The stores that reach a job's data with its own credentials: with the
        platform's (the operator's own), the ones kept for the operator's life, whose
        clients and connections every such job reuses (a first request costs ~50 ms);
        with a tenant's, stores made for this use and closed after it (a tenant's keys are
        not kept beyond the reconcile that needs them)."""
        if storage.platform:
            yield self.platform_stores
            return
        stores = StoreCache(storage.environ)
        try:
            yield stores
        finally:
            await stores.aclose()

    async def _ensure_task_namespace(self, mrj: KubeObject) -> str:
        namespace, name = job_key(mrj)
        task_ns = task_namespace_for(namespace, name)
        await ensure_namespace(self.kube, task_ns, task_namespace_labels(namespace, name),
                               context=f"job {namespace}/{name}: creating its task namespace")
        return task_ns

    # --- a running job ----------------------------------------------------------------

    async def _advance(self, mrj: KubeObject, store: KubeStateStore,
                       storage: StorageAccess) -> None:
        """A multi-step job whose current step has committed: plan the next step over the
        step's parts (``pairs`` Parquet, split by row group: no job module needed), create
        its tasks, then move ``status.step`` with :func:`protocol.advance`, whose guard lets
        one reconcile (of however many saw the step done) do it. Then the data no step
        will read again goes."""
        namespace, name = job_key(mrj)
        spec = JobSpec.from_dict(name, mrj["spec"])
        if spec.steps == 1:
            return
        records, _ = await store.snapshot(name)
        view = JobView({key: record.body for key, record in records.items()})
        parts = view.step_results()
        if parts is None or view.job is None:
            return
        done, label = view.step, f"step {view.step + 2}/{spec.steps}"
        try:
            step_spec = replace(spec.at_step(done + 1), inputs=tuple(parts))
            # "pairs": the map input of later steps.
            async with self._stores(storage) as stores:
                splits = await plan_inputs(step_spec, "pairs", stores)
        except KubemrError as exc:
            await self._fail(mrj, store, f"planning {label}: {exc}", storage.secrets)
            return
        await store.create(name, protocol.plan(step_spec, splits))
        maps = protocol.map_count(step_spec, len(splits))
        if await store.patch(name, protocol.advance(view.job, maps)) is not None:
            await self.event(mrj["metadata"], "Advanced",
                             f"{label}: {maps} map and {step_spec.reducers} reduce "
                             "tasks created")
        await self._drop_step_data(spec, namespace, name, done, storage)

    async def _drop_step_data(self, spec: JobSpec, namespace: str, name: str,
                              done: int, storage: StorageAccess) -> None:
        """Step ``done`` has committed: its shuffle objects, and the whole previous step
        (the parts it read), will never be read again (a retry keeps committed tasks).
        Deleted with the job's own credentials: never more than the job could delete."""
        async with self._stores(storage) as stores:
            blobs, _ = stores.open(spec.output)
            prefix = job_data_prefix(spec.output, namespace, name)
            removed = await blobs.delete_prefix(
                f"{protocol.step_prefix(prefix, spec.at_step(done))}/map/")
            if done:
                removed += await blobs.delete_prefix(
                    f"{protocol.step_prefix(prefix, spec.at_step(done - 1))}/")
        log.info("removed data of finished steps", extra={"job": name, "count": removed})

    async def _ensure_workers(self, mrj: KubeObject, storage: StorageAccess,
                              fresh: bool) -> None:
        """The workers' identity (a ServiceAccount whose Roles reach only this job's
        objects, with the job's workload identity), their S3 credentials (a reference to
        the tenant's Secret; a copy of the platform's only where the admin allowed it),
        and the batch Job that runs them. A job planned in this reconcile (``fresh``) that
        would run a standby's pod adopts one from the warm pool first, so the RoleBindings
        name its account from the start (.pool)."""
        namespace = mrj["metadata"]["namespace"]
        task_ns = await self._ensure_task_namespace(mrj)
        standby = None
        if self.pool is not None and may_adopt(mrj, self.config, storage):
            standby = await self.pool.adopt(mrj, fresh)
        await self.kube.ensure(SERVICE_ACCOUNTS, service_account(mrj, storage.annotations),
                               namespace)
        subject = None if standby is None else (self.config.pool_namespace, standby)
        for role, where in ((job_role(mrj), namespace), (task_role(mrj, task_ns), task_ns)):
            await self.kube.ensure(ROLES, role, where)
            await self.kube.ensure(ROLE_BINDINGS, role_binding(mrj, role, subject), where)
        if storage.platform_copy is not None:
            await self.kube.ensure(SECRETS, storage.platform_copy, namespace)
        if standby is not None:
            assert self.pool is not None
            await self.pool.assign(mrj, standby)
            if fresh:
                pool = self.config.pool_namespace
                await self.event(mrj["metadata"], ADOPTED_REASON,
                                 f"standby worker {standby} (namespace {pool}) works as one "
                                 f"of its workers", related={
                                     "apiVersion": "v1", "kind": "Pod", "name": standby,
                                     "namespace": pool})
        env = worker_env(mrj, self.config, storage.secret)
        await self.kube.ensure(BATCH_JOBS, worker_job(mrj, self.config, env, standby),
                               namespace)

    async def _check_workers(self, mrj: KubeObject, store: KubeStateStore) -> None:
        """Fail a Running job whose workers cannot run, or keep dying with no task
        committing (a crash loop, .crashloop), instead of letting it hang."""
        key = job_key(mrj)
        namespace, name = key
        _, job_name = worker_names(name)
        workers = await self.kube.find(BATCH_JOBS, job_name, namespace)
        if workers is None:
            return
        failed = workers_failed(workers)
        await self._replace_lost_standby(workers, store, name)
        pods, _ = await self.kube.list(PODS, namespace, label_selector=f"job-name={job_name}")
        deaths = self.deaths.setdefault(key, DeathWatch())
        deaths.observe(progress_of(mrj), pods)
        if failed is None:
            reason = (workers_ended_early(workers) or pods_stuck(pods)
                      or deaths.verdict(JobSpec.from_dict(name, mrj["spec"]).workers
                                        or DEFAULT_WORKERS))
        else:  # the Job controller's reason does not say why the pods died; OOM is common
            oom = pods_out_of_memory(pods)
            reason = failed if oom is None else f"{failed}; {oom}"
        if reason is not None:
            await self._fail(mrj, store, reason)
        elif deaths.since:
            self.requeue_after(key, DEATHS_RECHECK_SECONDS)

    async def _replace_lost_standby(self, workers: KubeObject, store: KubeStateStore,
                                    name: str) -> None:
        """An adopted standby that ended before its job was decided (killed, evicted,
        crashed) is one worker short: its batch Job gets the whole parallelism back, so
        a pod of the job's own takes its place.

        The job's record, not its status, says whether it is decided: a standby exits
        once it has seen the verdict, often before the operator has copied the verdict to
        the status, and taking it for lost then would start a pod for a decided job."""
        standby = workers_adopted(workers)
        wanted = workers["spec"].get("completions") or 0  # an adopting Job is Indexed
        if (standby is None or self.pool is None or workers["spec"]["parallelism"] >= wanted
                or await self.pool.alive(standby)
                or JobPhase((await store.job_record(name)).job["phase"]).finished):
            return
        meta = workers["metadata"]
        await self.kube.patch(BATCH_JOBS, meta["name"], {"spec": {"parallelism": wanted}},
                              meta["namespace"])
        log.warning("adopted standby lost; the job's own pods replace it",
                    extra={"job": meta["name"], "namespace": meta["namespace"],
                           "worker": standby})

    async def _fail(self, mrj: KubeObject, store: KubeStateStore, reason: str,
                    secrets: tuple[str, ...] = ()) -> None:
        name = mrj["metadata"]["name"]
        reason = scrub(reason, secrets)
        records, _ = await store.snapshot(name)
        job = records[protocol.JOB_KEY].job
        if not JobPhase(job["phase"]).finished:  # not decided meanwhile (a stale body)
            await store.patch(name, protocol.abort(job, JobPhase.FAILED, reason))
            await self.event(mrj["metadata"], "Failed", reason, warning=True)
            log.warning("job failed", extra={"job": name, "error": reason})

    # --- the end of a job -------------------------------------------------------------

    async def _finish(self, mrj: KubeObject) -> None:
        """A decided job: stop workers, stamp the time, honour the TTL. A Succeeded job's
        task records go (the results are on the object); a Failed or Cancelled job keeps
        them until it is deleted, so `kubemr retry` can reuse its committed maps."""
        key = job_key(mrj)
        namespace, name = key
        status = mrj.get("status") or {}
        phase = JobPhase(status["phase"])
        if not status.get("completionTime"):
            await self.event(mrj["metadata"], phase.value,
                             finished_message(phase, status.get("error")),
                             warning=phase != JobPhase.SUCCEEDED)
            # Final counts, conditions and completionTime in one write: a reader who sees
            # the time (or waits for the condition) also sees the progress columns complete.
            records, _ = await state_store(self.kube, namespace).snapshot(name)
            progress = JobView({k: r.body for k, r in records.items()}).progress()
            await self._write_status(mrj, phase, {**progress_fields(progress),
                                                  "completionTime": now()})
        else:
            await self._write_status(mrj, phase)
        self.followers.stop(key)
        self.deaths.pop(key, None)
        await self._delete_workers(mrj, keep_tasks=phase != JobPhase.SUCCEEDED)
        remaining = ttl_remaining(mrj, datetime.now(UTC))
        if remaining is not None and remaining <= 0:
            await self.kube.delete(MAPREDUCE_JOBS, name, namespace)
        elif remaining is not None:
            self.requeue_after(key, remaining)

    async def _delete_workers(self, mrj: KubeObject, keep_tasks: bool) -> None:
        """Stop the workers (an adopted standby too); drop task records unless a retry
        may still reuse them."""
        namespace, name = job_key(mrj)
        _, job_name = worker_names(name)
        await self.kube.delete(BATCH_JOBS, job_name, namespace, propagation="Background")
        if self.pool is not None:
            await self.pool.release(mrj["metadata"]["uid"])
        if not keep_tasks:
            await self.kube.delete(NAMESPACES, task_namespace_for(namespace, name))

    async def _finalize(self, mrj: KubeObject) -> None:
        """The job is being deleted: owned objects go by garbage collection; the task
        namespace cannot have a namespaced owner, so it is deleted here."""
        key = job_key(mrj)
        namespace, name = key
        self.followers.stop(key)
        self.deaths.pop(key, None)
        if self.pool is not None:
            await self.pool.release(mrj["metadata"]["uid"])
        await self.kube.delete(NAMESPACES, task_namespace_for(namespace, name))
        ops = remove_finalizer(mrj)
        if ops is None:
            return
        with contextlib.suppress(NotFound):  # gone already: another finalizer was the last
            await self.kube.patch(MAPREDUCE_JOBS, name, ops, namespace, content_type=JSON_PATCH)

    async def _write_status(self, mrj: KubeObject, phase: JobPhase,
                            fields: KubeObject | None = None) -> None:
        """Write ``fields`` and the conditions of ``phase`` (see :func:`.status_patch`)."""
        body = status_patch(mrj, phase, fields, now())
        if body is not None:
            namespace, name = job_key(mrj)
            await self.kube.patch(MAPREDUCE_JOBS, name, body, namespace,
                                  content_type=MERGE_PATCH, subresource="status")
