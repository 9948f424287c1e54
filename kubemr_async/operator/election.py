"""Leader election's rules, without I/O: what a candidate makes of the Lease it reads, and
what it writes to take, renew or give up the lease (client-go's ``tryAcquireOrRenew``).

The one subtle rule is whose clock judges expiry. A Lease's ``renewTime`` is the holder's
wall clock, and two machines' wall clocks disagree; so, as client-go does, a candidate
never compares it with its own. It notes *when it saw the record change*, on its own
monotonic clock, and takes the lease once it has seen no change for the record's
``leaseDurationSeconds``. A holder that renews changes the record every retry period;
a dead one stops changing it, and every observer counts a whole lease from the last
change it saw. :mod:`.leader` does the reading and writing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


def micro_time(at: datetime | None = None) -> str:
    """A ``MicroTime``, as a Lease's ``acquireTime``/``renewTime`` are written (UTC, Z)."""
    return (at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """A Lease's ``spec``: who holds it, for how long, since when, how often it moved."""

    holder: str = ""
    duration: int = 0  # leaseDurationSeconds
    acquired: str | None = None
    renewed: str | None = None
    transitions: int = 0

    @classmethod
    def of(cls, lease: Mapping[str, Any]) -> LeaseRecord:
        spec = lease.get("spec") or {}
        return cls(holder=spec.get("holderIdentity") or "",
                   duration=int(spec.get("leaseDurationSeconds") or 0),
                   acquired=spec.get("acquireTime"), renewed=spec.get("renewTime"),
                   transitions=int(spec.get("leaseTransitions") or 0))

    def spec(self) -> dict[str, Any]:
        """The Lease ``spec`` that says this record."""
        return {"holderIdentity": self.holder, "leaseDurationSeconds": self.duration,
                "acquireTime": self.acquired, "renewTime": self.renewed,
                "leaseTransitions": self.transitions}


class Election:
    """One candidate's view of the lease: the record it last saw and when it saw it change.

    ``identity`` is the candidate's name; ``duration`` the lease it asks for, in seconds.
    Times passed in are the candidate's monotonic clock; ``stamp`` arguments are wall times
    (:func:`micro_time`), only written for people reading the Lease.
    """

    def __init__(self, identity: str, duration: int) -> None:
        self.identity = identity
        self.duration = duration
        self.observed: LeaseRecord | None = None
        self.observed_at = 0.0

    def observe(self, record: LeaseRecord, now: float) -> None:
        """Note the record read at ``now``; the clock restarts only when it changed."""
        if record != self.observed:
            self.observed, self.observed_at = record, now

    @property
    def leading(self) -> bool:
        """Whether the record last seen (or written) names this candidate."""
        return self.observed is not None and self.observed.holder == self.identity

    def held_by_another(self, now: float) -> bool:
        """Whether someone else holds the lease and it has not run out on this candidate's
        clock: then the candidate must not write. An empty holder (a released lease) is
        free at once; a lease that named this candidate may be renewed."""
        seen = self.observed
        if seen is None or not seen.holder or self.leading:
            return False
        return now < self.observed_at + seen.duration

    def claim(self, stamp: str) -> LeaseRecord:
        """The record to write to take the lease (a transition more) or renew it (the
        acquire time and the transitions kept)."""
        seen = self.observed
        if seen is None:  # no Lease yet: the first holder
            return LeaseRecord(self.identity, self.duration, stamp, stamp, 0)
        if self.leading:
            return LeaseRecord(self.identity, self.duration, seen.acquired, stamp,
                               seen.transitions)
        return LeaseRecord(self.identity, self.duration, stamp, stamp, seen.transitions + 1)

    def release(self, stamp: str) -> LeaseRecord | None:
        """The record that gives the lease up (client-go's ReleaseOnCancel: no holder, a
        one-second lease), or None if this candidate does not hold it."""
        seen = self.observed
        if seen is None or not self.leading:
            return None
        return LeaseRecord("", 1, stamp, stamp, seen.transitions)
