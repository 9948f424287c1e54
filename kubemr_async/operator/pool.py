"""The warm pool: standby workers already running when a job is created.

A cold worker pod spends most of a small job's time starting: the Job controller and the
kubelet, then ~0.5 s of imports and the first S3 client's set-up (docs/scaling.md, "A
small job's latency"). A standby has done all that before the job exists, and is adopted
by it within a watch event of the job being planned.

A standby's life::

    created ─► waiting: imported, connected, watching its own pod; its account may read
      │        that pod and nothing else (resources.standby_role)
      │ adopt: a new job that would run exactly its pod (may_adopt) labels it, guarded
      │        by the pod's resourceVersion (one job wins it); the job's RoleBindings
      │        then name its account beside the job's own, and only then is the job
      │        written in its annotation, which the standby is watching for
      ▼
    working: one of the job's workers, with the job's rights (a Forbidden at first only
      │      means the authorizer has not seen the RoleBindings yet: it retries a moment)
      │ the job decided: the worker exits, and the operator deletes the pod (a decided
      │ or deleted job releases its standby)
      ▼
    gone:  the pod, its account, Role and RoleBinding are deleted; a fresh standby (a new
           random name: a job's RoleBinding never names a later pod's account) replaces it

Why a standby serves one job only: user code ran in it, and nothing of one tenant's job
(its files, its child processes, its credentials) may outlive it into another's. Why only
identical pods: a standby cannot become what its pod spec does not say (another image, a
template's resources or volumes, a tenant's own Secret, a workload identity), and
adopting it anyway would run the job with a pod the job did not ask for. Its S3 keys are
the platform's (the pool's copy of ``s3_secret``), which is why only jobs that use the
platform's credentials may adopt one.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

import anyio

from .. import metrics
from ..kube import (
    NAMESPACES,
    PODS,
    ROLE_BINDINGS,
    ROLES,
    SECRETS,
    SERVICE_ACCOUNTS,
    Conflict,
    Kube,
    KubeApiError,
    KubeObject,
    NotFound,
    ensure_namespace,
)
from ..spec import ADOPTED_ANNOTATION, JobSpec
from .admission import StorageAccess
from .config import OperatorConfig
from .crashloop import pod_death_cause
from .resources import (
    ADOPTED_LABEL,
    KEYS_ANNOTATION,
    POOL_SECRET,
    STANDBY_LABELS,
    pods_stuck,
    pool_secret,
    standby_account,
    standby_binding,
    standby_pod,
    standby_role,
)

log = logging.getLogger("kubemr.operator")

#: How often the pool is topped up whatever happened (an adoption tops it up at once).
REFILL_SECONDS = 2.0
#: The longest wait before replacing a standby that ended with no job (_failed_standby).
FAILED_BACKOFF_MAX = 300.0
#: The pool namespace runs tenants' code: its pods are held to Pod Security "restricted".
POOL_NAMESPACE_LABELS = {"app.kubernetes.io/name": "kubemr-async",
                         "pod-security.kubernetes.io/enforce": "restricted"}
_STANDBYS = ",".join(f"{key}={value}" for key, value in STANDBY_LABELS.items())
_ENDED = ("Succeeded", "Failed")


def may_adopt(mrj: KubeObject, config: OperatorConfig, storage: StorageAccess) -> bool:
    """Whether job ``mrj``'s worker pod would be exactly a standby's: the pool's image,
    no template overlay, the platform's storage credentials (not a tenant's Secret, not a
    workload identity)."""
    spec = JobSpec.from_dict(mrj["metadata"]["name"], mrj["spec"])
    return (config.warm_workers > 0 and spec.image == config.warm_image
            and not spec.template and storage.platform)


def _ended(pod: KubeObject) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp")) or (
        (pod.get("status") or {}).get("phase") in _ENDED)


class WarmPool:
    """Keeps ``config.warm_workers`` standbys waiting in ``config.pool_namespace``, and
    hands them to jobs."""

    def __init__(self, kube: Kube, config: OperatorConfig,
                 on_lost: Callable[[tuple[str, str]], None]) -> None:
        """``on_lost(key)``: a standby adopted by job ``key`` (namespace, name) has ended
        or is gone; the job is reconciled, which replaces it if the job is not decided."""
        self.kube = kube
        self.config = config
        self.namespace = config.pool_namespace
        self.on_lost = on_lost
        self._wake = anyio.Event()
        #: The adopted standbys seen working at the last refill, and their jobs.
        self._working: dict[str, tuple[str, str]] = {}
        #: The standbys told their job by this operator (assign writes it once).
        self._told: set[str] = set()
        #: Standbys that ended unadopted since one was last adopted, and when the next
        #: may start (see _failed_standby).
        self._failures = 0
        self._next_start = 0.0

    async def run(self) -> None:
        """Top the pool up now, after each adoption, and every REFILL_SECONDS; until
        cancelled. Trouble talking to the API server is logged and tried again."""
        if await self.kube.find(NAMESPACES, self.namespace) is None:  # the chart makes it
            await ensure_namespace(self.kube, self.namespace, POOL_NAMESPACE_LABELS,
                                   context=f"creating the warm pool's namespace "
                                           f"{self.namespace}")
        while True:
            try:
                await self.refill()
            except KubeApiError as exc:
                log.warning("topping up the warm pool failed; retrying",
                            extra={"namespace": self.namespace, "error": str(exc)})
            with anyio.move_on_after(REFILL_SECONDS):
                await self._wake.wait()
            self._wake = anyio.Event()

    async def refill(self) -> None:
        """Remove the standbys whose work is over, and start new ones until
        ``warm_workers`` are waiting; standbys that keep ending before any job adopted
        them (a bad image, say) are replaced ever more slowly, and reported. A waiting
        standby whose S3 keys are not the platform's current ones (rotated since it
        started: its env keeps the old) is replaced too, before a job adopts it."""
        secret, keys = await self._secret()
        pods, _ = await self.kube.list(PODS, self.namespace, label_selector=_STANDBYS)
        waiting: list[str] = []
        working: dict[str, tuple[str, str]] = {}
        for pod in pods:
            name = pod["metadata"]["name"]
            adopted = (pod["metadata"].get("annotations") or {}).get(ADOPTED_ANNOTATION)
            if (pod.get("status") or {}).get("phase") in _ENDED:
                # One that was deleted (replaced, say) ended because of that: no failure.
                if (ADOPTED_LABEL not in pod["metadata"]["labels"]
                        and not pod["metadata"].get("deletionTimestamp")):
                    self._failed_standby(pod)
                await self._remove(name)
            elif _ended(pod):
                pass
            elif adopted:
                namespace, _, job = adopted.partition("/")
                working[name] = (namespace, job)
            elif ADOPTED_LABEL not in pod["metadata"]["labels"]:
                if (pod["metadata"].get("annotations") or {}).get(KEYS_ANNOTATION) != keys:
                    await self._remove(name)
                    continue
                waiting.append(name)
                stuck = pods_stuck([pod])
                if stuck is not None:
                    log.warning("a standby cannot start", extra={
                        "namespace": self.namespace, "worker": name, "error": stuck})
        for name, key in self._working.items():
            if name not in working:
                self.on_lost(key)
        self._working = working
        metrics.STANDBYS.labels("waiting").set(len(waiting))
        metrics.STANDBYS.labels("working").set(len(working))
        live = {pod["metadata"]["name"] for pod in pods}
        accounts, _ = await self.kube.list(SERVICE_ACCOUNTS, self.namespace,
                                           label_selector=_STANDBYS)
        for account in accounts:  # left by an operator stopped between account and pod
            if account["metadata"]["name"] not in live:
                await self._remove(account["metadata"]["name"])
        for name in waiting[self.config.warm_workers:]:  # the pool was made smaller
            await self._remove(name)
        missing = self.config.warm_workers - len(waiting)
        if missing <= 0 or anyio.current_time() < self._next_start:
            return
        for _ in range(missing):
            await self._start(secret, keys)

    def _failed_standby(self, pod: KubeObject) -> None:
        """A standby ended with no job: wait twice as long as last time (up to
        FAILED_BACKOFF_MAX seconds) before the next start."""
        self._failures += 1
        delay = min(REFILL_SECONDS * 2 ** self._failures, FAILED_BACKOFF_MAX)
        self._next_start = anyio.current_time() + delay
        log.warning("a standby ended before any job adopted it; the next starts later",
                    extra={"namespace": self.namespace, "worker": pod["metadata"]["name"],
                           "error": pod_death_cause(pod), "seconds": delay})

    async def _secret(self) -> tuple[str | None, str | None]:
        """The pool's copy of the platform's S3 Secret, made or brought up to date, and
        its resourceVersion (which version of the keys a standby started with); Nones
        when the platform has none (the standbys use ambient credentials then)."""
        if not self.config.s3_secret:
            return None, None
        source = await self.kube.get(SECRETS, self.config.s3_secret,
                                     self.config.operator_namespace)
        copy = pool_secret(source.get("data") or {}, self.namespace)
        found = await self.kube.find(SECRETS, POOL_SECRET, self.namespace)
        if found is None:
            found = await self.kube.create(SECRETS, copy, self.namespace)
        elif found.get("data") != copy["data"]:  # the platform's keys were rotated
            found = await self.kube.patch(SECRETS, POOL_SECRET, {"data": copy["data"]},
                                          self.namespace)
        return POOL_SECRET, str(found["metadata"]["resourceVersion"])

    async def _start(self, secret: str | None, keys: str | None) -> None:
        """One new standby: its account and the Role to read its own pod, then the pod
        (with the keys of ``secret`` at resourceVersion ``keys``)."""
        name = f"kubemr-standby-{secrets.token_hex(5)}"
        ns = self.namespace
        await self.kube.create(SERVICE_ACCOUNTS, standby_account(name, ns), ns)
        await self.kube.create(ROLES, standby_role(name, ns), ns)
        await self.kube.create(ROLE_BINDINGS, standby_binding(name, ns), ns)
        await self.kube.create(PODS, standby_pod(name, ns, self.config, secret, keys), ns)
        log.info("standby started", extra={"namespace": ns, "worker": name})

    async def _remove(self, name: str) -> None:
        """A standby's pod, and then its account (which ends its tokens) and Role."""
        self._told.discard(name)
        for resource in (PODS, ROLE_BINDINGS, ROLES, SERVICE_ACCOUNTS):
            await self.kube.delete(resource, name, self.namespace)

    async def adopt(self, mrj: KubeObject, fresh: bool) -> str | None:
        """The standby that works for job ``mrj``: one adopted earlier, or (``fresh``: the
        job was planned in this reconcile) a waiting one claimed now; None if none.

        A standby claimed here is not told its job yet (:meth:`assign`, once the job's
        RoleBindings name it): told first, it would only be refused its first reads.
        """
        uid = mrj["metadata"]["uid"]
        mine = [pod for pod in await self._adopted(uid) if not _ended(pod)]
        if mine or not fresh:
            return str(mine[0]["metadata"]["name"]) if mine else None
        pods, _ = await self.kube.list(PODS, self.namespace,
                                       label_selector=f"{_STANDBYS},!{ADOPTED_LABEL}")
        # Only a running standby (imported and watching, or nearly): a pending one may
        # never start (a bad image), and the job would be a worker short meanwhile.
        running = [pod for pod in pods if not _ended(pod)
                   and (pod.get("status") or {}).get("phase") == "Running"]
        for pod in sorted(running, key=lambda pod: pod["metadata"]["creationTimestamp"]):
            name = str(pod["metadata"]["name"])
            claim = {"metadata": {"resourceVersion": pod["metadata"]["resourceVersion"],
                                  "labels": {ADOPTED_LABEL: uid}}}
            try:
                await self.kube.patch(PODS, name, claim, self.namespace)
            except (Conflict, NotFound):  # changed or gone since the list: the next one
                continue
            self._failures = 0  # standbys do start
            self._wake.set()
            metrics.ADOPTIONS.labels("adopted").inc()
            return name
        metrics.ADOPTIONS.labels("none").inc()
        return None

    async def assign(self, mrj: KubeObject, standby: str) -> None:
        """Tell the standby adopted for ``mrj`` its job (its rights are in place), once:
        a later reconcile of the job finds it told (an operator started since tells it
        again, which changes nothing)."""
        if standby in self._told:
            return
        meta = mrj["metadata"]
        job = f"{meta['namespace']}/{meta['name']}"
        await self.kube.patch(PODS, standby, {"metadata": {"annotations": {
            ADOPTED_ANNOTATION: job}}}, self.namespace)
        self._told.add(standby)
        log.info("standby adopted", extra={"job": meta["name"], "namespace": meta["namespace"],
                                           "worker": standby})

    async def release(self, uid: str) -> None:
        """Remove the standby a decided or deleted job adopted, if it is still there."""
        for pod in await self._adopted(uid):
            await self._remove(pod["metadata"]["name"])

    async def alive(self, name: str) -> bool:
        """Whether the adopted standby ``name`` is still working (not ended, not gone)."""
        pod = await self.kube.find(PODS, name, self.namespace)
        return pod is not None and not _ended(pod)

    async def _adopted(self, uid: str) -> list[KubeObject]:
        pods, _ = await self.kube.list(PODS, self.namespace,
                                       label_selector=f"{_STANDBYS},{ADOPTED_LABEL}={uid}")
        return pods
