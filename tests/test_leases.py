"""Clock-safe leases: a takeover is judged on the observer's own monotonic clock.

The pure rule first (JobView and protocol.claim, no I/O), then two real workers on one
SQLite store whose wall clocks are 60 s ahead and 60 s behind: neither may take over the
other's live lease, while a holder that really died is still taken over after a lease.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kubemr_async import Job, TaskContext, protocol, read_results
from kubemr_async.patch import apply_patch
from kubemr_async.protocol import JobPhase, JobView, TaskState
from kubemr_async.runtime import Worker
from kubemr_async.shuffle import split_words
from kubemr_async.spec import JobSpec
from kubemr_async.storage.fs import FileBlobStore

from .backends import StoreFactory
from .test_state_contract import kube_state_backend, state_backend  # noqa: F401 - fixtures
from .test_worker import TEXT, submit

LEASE = 10.0
SPEC = JobSpec(name="wc", job="wc.py", inputs=("a",), reducers=1, max_attempts=3,
               lease_seconds=LEASE)


def started_job() -> dict[str, Any]:
    records: dict[str, Any] = {protocol.JOB_KEY: protocol.new_job(SPEC)}
    records.update(protocol.plan(SPEC, [("in-0", (0, 10)), ("in-1", (0, 10))]))
    update = protocol.start_job(records[protocol.JOB_KEY], 2)
    records[protocol.JOB_KEY] = apply_patch(records[protocol.JOB_KEY], update.ops)
    return records


def held_by(records: dict[str, Any], worker: str, wall: float) -> dict[str, Any]:
    """map-00000 claimed by ``worker`` whose wall clock reads ``wall``."""
    update = protocol.claim(records["map-00000"], worker, wall, LEASE, 3)
    records["map-00000"] = apply_patch(records["map-00000"], update.ops)
    return dict(records["map-00000"])


@pytest.mark.parametrize("holder_skew", [-60.0, 60.0])
def test_a_live_lease_is_never_lapsed_by_a_skewed_clock_only_by_no_change(
        holder_skew: float) -> None:
    """The holder's clock is off by a minute: its leaseExpires is far in the observer's
    past (or future); only the observer's own clock since the last change decides."""
    true_now = 1_000_000.0
    records = started_job()
    body = held_by(records, "holder", true_now + holder_skew)
    view = JobView(records, seen=50.0)  # the observer saw it at 50 s on its monotonic clock
    # The old wall-clock rule would take a -60 s holder's live lease over at once.
    assert protocol.lease_expired(body, true_now) == (holder_skew < 0)
    for mono in (50.0, 55.0, 60.0):
        assert not view.lease_lapsed("map-00000", mono)
        assert body not in view.claimable(mono)
        with pytest.raises(ValueError, match="held by holder"):
            protocol.claim(body, "observer", true_now, LEASE, 3,
                           lapsed=view.lease_lapsed("map-00000", mono))
    # Unchanged for a whole lease on the observer's clock: a dead holder, whatever its clock.
    assert view.lease_lapsed("map-00000", 60.5)
    assert body in view.claimable(60.5)
    assert view.next_lease_expiry() == 60.0
    taken = apply_patch(body, protocol.claim(body, "observer", true_now, LEASE, 3,
                                             lapsed=True).ops)
    assert (taken["worker"], taken["attempt"], taken["failures"]) == ("observer", 2, 1)


def test_a_renewal_restarts_the_observation_and_a_redelivery_does_not() -> None:
    records = started_job()
    body = held_by(records, "holder", 0.0)
    view = JobView(records, seen=0.0)
    view.update("map-00000", body, seen=8.0)  # the same seq again: no change
    assert view.lease_lapsed("map-00000", 10.5)
    renewed = apply_patch(body, protocol.renew(body, "holder", 5.0, LEASE).ops)
    view.update("map-00000", renewed, seen=9.0)  # a new seq: the holder is alive
    assert not view.lease_lapsed("map-00000", 10.5)
    assert not view.lease_lapsed("map-00000", 19.0)
    assert view.lease_lapsed("map-00000", 19.5)
    committed = apply_patch(renewed, protocol.commit(renewed, "holder", {}, now=0.0).ops)
    view.update("map-00000", committed, seen=30.0)
    assert not view.lease_lapsed("map-00000", 100.0), "only running tasks lapse"
    assert view.next_lease_expiry() is None


def test_after_a_blind_spell_every_lease_is_judged_afresh() -> None:
    """An observer that could not reach its store saw no renewal, but none could happen:
    restarting the observation gives every holder a whole lease from then."""
    records = started_job()
    held_by(records, "holder", 0.0)
    view = JobView(records, seen=0.0)
    assert view.lease_lapsed("map-00000", 70.0)  # 60 s of "no change" seen from outside
    view.restart_observation(70.0)
    assert not view.lease_lapsed("map-00000", 79.0)
    assert view.lease_lapsed("map-00000", 80.5)
    assert view.next_lease_expiry() == 80.0


def test_a_view_that_observed_nothing_trusts_the_holders_lease() -> None:
    """Tools and the progress follower build views with no clock; they never claim."""
    records = started_job()
    held_by(records, "holder", 100.0)
    view = JobView(records)
    assert not view.lease_lapsed("map-00000", 109.0)
    assert view.lease_lapsed("map-00000", 110.5)


# --- two real workers with skewed wall clocks ------------------------------------------

#: Each map outlives a lease, so only its renewals keep it from being taken over.
E2E_LEASE = 3.0
MAP_SECONDS = 3.5


def slow_word_count() -> Job:
    job = Job("slow-wc")

    @job.map(input="bytes")
    async def words(chunk: bytes, ctx: TaskContext) -> None:
        await asyncio.sleep(MAP_SECONDS)
        ctx.emit_batch(split_words(chunk), 1)

    job.reduce("sum")
    return job


@pytest.mark.anyio
async def test_skewed_workers_take_over_no_live_lease_but_a_dead_holders(
        state_backend: StoreFactory, tmp_path: Path) -> None:  # noqa: F811 - the fixture
    """On SQLite and on the real API server: each worker has its own client."""
    store = await state_backend()
    spec = await submit(store, tmp_path, reducers=2, lease_seconds=E2E_LEASE)
    # A worker that claimed map-00002 with a clock an hour ahead, then died: its
    # leaseExpires says "an hour from now", yet a lease of silence must be enough.
    snapshot, _ = await store.snapshot(spec.name)
    ghost = protocol.claim(snapshot["map-00002"].task, "ghost", time.time() + 3600,
                           E2E_LEASE, spec.max_attempts)
    assert await store.patch(spec.name, ghost) is not None

    blobs = FileBlobStore(tmp_path / "blobs")
    ahead = Worker(spec.name, slow_word_count(), await state_backend(), blobs, "ahead",
                   clock=lambda: time.time() + 60)
    behind = Worker(spec.name, slow_word_count(), await state_backend(), blobs, "behind",
                    clock=lambda: time.time() - 60)
    began = time.monotonic()
    phases = await asyncio.wait_for(asyncio.gather(ahead.run(), behind.run()), 120)
    seconds = time.monotonic() - began
    assert list(phases) == [JobPhase.SUCCEEDED, JobPhase.SUCCEEDED]

    final, _ = await store.snapshot(spec.name)
    tasks = {key: rec.task for key, rec in final.items() if key != protocol.JOB_KEY}
    assert all(t["state"] == TaskState.COMMITTED for t in tasks.values())
    dead = tasks.pop("map-00002")
    assert (dead["attempt"], dead["failures"]) == (2, 1)
    assert dead["error"] == "lease expired: worker ghost stopped renewing during attempt 1"
    takeovers = {key: t["failures"] for key, t in tasks.items() if t["failures"]}
    assert takeovers == {}, "a live lease was taken over"
    assert {t["attempt"] for t in tasks.values()} == {1}
    assert {t["worker"] for t in tasks.values() if t["kind"] == "map"} == {"ahead", "behind"}
    words: Counter[str] = Counter()
    for word, count in read_results(tmp_path / "blobs" / spec.name):
        words[word] += int(count)
    assert words == Counter(w.decode() for text in TEXT for w in text.split())
    print(f"\n{type(store).__name__}: clock skew +60 s / -60 s, {len(final) - 1} tasks, "
          f"lease {E2E_LEASE} s: "
          f"live leases taken over 0, dead holder's task taken over 1 "
          f"(attempt {dead['attempt']}), job {seconds:.1f} s")
