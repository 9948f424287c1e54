"""Leader election's I/O: read and write the Lease, on client-go's schedule.

:class:`LeaderElector` takes the lease (:meth:`~LeaderElector.acquire`: a try every retry
period, jittered), keeps it (:meth:`~LeaderElector.hold`: a renewal every retry period,
:class:`LeadershipLost` raised once one has not succeeded within the renew deadline or
another holder is seen) and gives it up on a clean stop (:meth:`~LeaderElector.release`).
The rules are :mod:`.election`'s; every write is a PUT of the version read, so of two
candidates that read the same record only one can write it (the other gets a Conflict).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any, NoReturn

import anyio

from .. import metrics
from ..errors import KubemrError
from ..kube import LEASES, Conflict, Kube, KubeApiError, KubeObject, Unprocessable
from .config import JITTER, LeaderElection
from .election import Election, LeaseRecord, micro_time

log = logging.getLogger("kubemr.operator")

#: The label on a Lease kubemr created; one without it is never taken over (or released).
MANAGED_BY = {"app.kubernetes.io/managed-by": "kubemr-async"}


class LeadershipLost(KubemrError):
    """This operator stopped leading; it must stop reconciling at once (it exits)."""


class LeaseNotOurs(KubemrError):
    """The Lease of that name exists and kubemr did not create it."""


class LeaderElector:
    """One candidate for leading: ``config`` says which Lease, who, and the three times.

    ``clock`` is monotonic (it judges expiry and deadlines); it is a parameter so a test can
    drive it.
    """

    def __init__(self, kube: Kube, config: LeaderElection,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.config = config
        self.clock = clock
        self.election = Election(config.identity, config.lease_duration)
        self._lease: KubeObject | None = None  # the Lease as last written by us
        self._renewed = -float("inf")  # when the last write of ours succeeded
        self._lost = False

    @property
    def where(self) -> str:
        return f"Lease {self.config.namespace}/{self.config.lease_name}"

    def leading(self) -> bool:
        """Whether this candidate holds the lease now: it last wrote it within the renew
        deadline (a readiness check, read from the HTTP thread: no lock needed)."""
        return (not self._lost and self.election.leading
                and self.clock() - self._renewed < self.config.renew_deadline)

    async def acquire(self) -> None:
        """Return once this candidate holds the lease (a standby waits here)."""
        log.info("waiting for the leader lease",
                 extra={"lease": self.where, "identity": self.config.identity})
        while not await self._try():
            period = self.config.retry_period
            await anyio.sleep(period * (1 + JITTER * random.random()))
        metrics.LEADER.set(1)
        log.info("leading", extra={"lease": self.where, "identity": self.config.identity,
                                   "transitions": self._transitions()})

    async def hold(self) -> NoReturn:
        """Renew the lease every retry period until leadership is lost, then raise
        :class:`LeadershipLost` (run it beside the loops that must stop with it)."""
        config = self.config
        while True:
            await anyio.sleep(config.retry_period)
            if self.clock() - self._renewed >= config.renew_deadline:  # a loop held up
                self._stop(f"{self.where} not renewed for {self.clock() - self._renewed:.1f}s"
                           f" (the renew deadline is {config.renew_deadline}s)")
            with anyio.move_on_after(config.renew_deadline):
                while not await self._try():
                    self._give_up_if_taken()
                    await anyio.sleep(config.retry_period)
                continue  # renewed
            self._stop(f"{self.where} not renewed within the renew deadline "
                       f"({config.renew_deadline}s)")

    async def release(self) -> None:
        """Give the lease up (holder cleared, a one-second lease) so a standby takes it at
        its next try instead of waiting out the lease. Best effort: a leader that lost it,
        or a write that fails, leaves the lease to expire."""
        metrics.LEADER.set(0)
        record = None if self._lost else self.election.release(micro_time())
        if record is None or self._lease is None:
            return
        try:
            await self._write(self._lease, record, "releasing")
        except KubeApiError as exc:
            log.warning("releasing the leader lease failed; it will expire",
                        extra={"lease": self.where, "error": str(exc)})
            return
        log.info("released the leader lease", extra={"lease": self.where})

    # --- one try (client-go's tryAcquireOrRenew) ---------------------------------------

    async def _try(self) -> bool:
        """Read the Lease and, unless another holder's lease still runs, write it naming
        this candidate. True if the write succeeded; a lost race or a transient failure is
        False (tried again later); any other API error is raised."""
        try:
            lease = await self.kube.find(LEASES, self.config.lease_name, self.config.namespace,
                                         context=f"reading {self.where}")
            now = self.clock()
            if lease is None:
                await self._create(self.election.claim(micro_time()))
                return True
            _check_ours(lease, self.where)
            self.election.observe(LeaseRecord.of(lease), now)
            if self.election.held_by_another(now):
                return False
            await self._write(lease, self.election.claim(micro_time()),
                              "renewing" if self.election.leading else "taking")
            return True
        except (Conflict, Unprocessable) as exc:  # another candidate wrote first
            log.debug("lost a race for the leader lease", extra={"error": str(exc)})
        except KubeApiError as exc:
            if not exc.transient:
                raise
            log.warning("leader lease: the API server failed; trying again",
                        extra={"lease": self.where, "error": str(exc)})
        return False

    async def _create(self, record: LeaseRecord) -> None:
        written = self.clock()
        body = {"apiVersion": LEASES.api_version, "kind": LEASES.kind,
                "metadata": {"name": self.config.lease_name,
                             "namespace": self.config.namespace, "labels": MANAGED_BY},
                "spec": record.spec()}
        self._wrote(await self.kube.create(LEASES, body, self.config.namespace,
                                           context=f"creating {self.where}"), record, written)

    async def _write(self, lease: KubeObject, record: LeaseRecord, doing: str) -> None:
        """PUT ``record`` over the version of ``lease`` read (Conflict if it moved)."""
        written = self.clock()
        body = {**lease, "spec": record.spec()}
        self._wrote(await self.kube.replace(LEASES, self.config.lease_name, body,
                                            self.config.namespace,
                                            context=f"{doing} {self.where}"), record, written)

    def _wrote(self, lease: KubeObject, record: LeaseRecord, written: float) -> None:
        """The write sent at ``written`` succeeded: the lease runs from when it was sent."""
        self._lease = lease
        self.election.observe(record, written)
        self._renewed = written

    def _give_up_if_taken(self) -> None:
        seen = self.election.observed
        if seen is not None and seen.holder and not self.election.leading:
            self._stop(f"{self.where} was taken by {seen.holder}")

    def _stop(self, reason: str) -> NoReturn:
        self._lost = True
        metrics.LEADER.set(0)
        log.error("stopped leading", extra={"lease": self.where, "error": reason})
        raise LeadershipLost(f"{reason}: stopped leading")

    def _transitions(self) -> int:
        seen = self.election.observed
        return seen.transitions if seen is not None else 0


def _check_ours(lease: KubeObject, where: str) -> None:
    """Refuse a Lease kubemr did not create: never overwrite what is not ours."""
    labels: dict[str, Any] = lease.get("metadata", {}).get("labels") or {}
    if any(labels.get(key) != value for key, value in MANAGED_BY.items()):
        raise LeaseNotOurs(f"{where} exists and was not created by kubemr (no "
                           "app.kubernetes.io/managed-by=kubemr-async label); choose "
                           "another --leader-elect-lease-name")
