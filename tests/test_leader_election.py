"""Leader election (issue 15): client-go's rules as plain functions (a fake clock), then the
elector against the real API server's Lease, each candidate with a clock the test moves,
so a takeover is decided by the rule and not by how long the test waited.

Two operator processes, one killed or stopped mid-job, are in tests/test_operator_ha.py;
here, an Operator that loses its lease stops with LeadershipLost, in process.
"""

from __future__ import annotations

import anyio
import pytest
from prometheus_client import REGISTRY

from kubemr_async.errors import UsageError
from kubemr_async.kube import LEASES, Conflict, Kube
from kubemr_async.operator import LeaderElection, LeadershipLost, Operator, OperatorConfig
from kubemr_async.operator.election import Election, LeaseRecord, micro_time
from kubemr_async.operator.leader import LeaderElector, LeaseNotOurs

from .test_cli import run_kubemr
from .test_kube_client import kube, namespace

__all__ = ["kube", "namespace"]  # fixtures, used by name

FAR_FUTURE = "2999-01-01T00:00:00.000000Z"  # a holder's wall clock is never trusted


# --- the rules ---------------------------------------------------------------------------


def test_a_lease_runs_out_on_the_observers_clock_counted_from_the_last_change_seen() -> None:
    standby = Election("b", 15)
    held = LeaseRecord("a", 15, FAR_FUTURE, FAR_FUTURE, 3)
    standby.observe(held, 100.0)
    assert standby.held_by_another(114.9), "renewTime in the future does not matter"
    standby.observe(held, 110.0)  # read again, unchanged: the clock does not restart
    assert not standby.held_by_another(115.0), "15 s without a change: it ran out"
    renewed = LeaseRecord("a", 15, FAR_FUTURE, "2999-01-01T00:00:02.000000Z", 3)
    standby.observe(renewed, 112.0)  # a renewal seen restarts it
    assert standby.held_by_another(126.9)
    assert not standby.held_by_another(127.0)


def test_the_records_written_to_take_renew_and_release() -> None:
    first = Election("a", 15)
    assert first.claim("t0") == LeaseRecord("a", 15, "t0", "t0", 0), "no Lease yet"
    assert first.release("t1") is None, "nothing held, nothing to release"
    first.observe(LeaseRecord("a", 15, "t0", "t0", 0), 0.0)
    assert first.leading
    assert first.claim("t2") == LeaseRecord("a", 15, "t0", "t2", 0), "a renewal keeps both"
    assert first.release("t3") == LeaseRecord("", 1, "t3", "t3", 0)

    standby = Election("b", 10)
    standby.observe(LeaseRecord("a", 15, "t0", "t2", 4), 0.0)
    assert not standby.leading
    assert standby.claim("t9") == LeaseRecord("b", 10, "t9", "t9", 5), "one transition more"
    standby.observe(LeaseRecord("", 1, "t3", "t3", 4), 1.0)
    assert not standby.held_by_another(1.0), "a released lease is free at once"


def test_a_lease_spec_round_trips() -> None:
    record = LeaseRecord("pod-1", 15, "t0", "t1", 2)
    assert LeaseRecord.of({"spec": record.spec()}) == record
    assert LeaseRecord.of({}) == LeaseRecord()


@pytest.mark.parametrize(("times", "message"), [
    ((10, 10.0, 2.0), "the lease duration (10s) must be greater than the renew deadline (10.0s)"),
    ((15, 2.0, 2.0), "the renew deadline (2.0s) must be greater than 1.2 x the retry period"),
    ((15, 10.0, 0.0), "must be greater than zero"),
])
def test_times_that_cannot_work_are_refused_in_one_line(
        times: tuple[int, float, float], message: str) -> None:
    duration, deadline, retry = times
    with pytest.raises(UsageError, match=r"^leader election: ") as caught:
        LeaderElection("a", lease_duration=duration, renew_deadline=deadline,
                       retry_period=retry)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(UsageError, match="identity"):
        LeaderElection("")


@pytest.mark.parametrize(("args", "message"), [
    (["--leader-elect-lease-duration", "10"], "the lease duration (10s) must be greater than "
                                              "the renew deadline (10.0s)"),
    (["--leader-elect-retry-period", "9"], "the renew deadline (10.0s) must be greater than "
                                           "1.2 x the retry period (9.0s)"),
])
def test_kubemr_operator_refuses_leader_election_that_cannot_work_in_one_line(
        args: list[str], message: str) -> None:
    result = run_kubemr("operator", "--leader-elect", *args)
    assert result.returncode == 2
    assert result.stderr == f"kubemr: error: leader election: {message}\n"


# --- on the real API server ---------------------------------------------------------------


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def candidate(kube: Kube, namespace: str, identity: str, clock: Clock) -> LeaderElector:
    config = LeaderElection(identity, namespace=namespace, lease_name="op", lease_duration=15,
                            renew_deadline=1.0, retry_period=0.05)
    return LeaderElector(kube, config, clock=clock)


async def spec(kube: Kube, namespace: str) -> LeaseRecord:
    return LeaseRecord.of(await kube.get(LEASES, "op", namespace))


@pytest.mark.anyio
@pytest.mark.kube
@pytest.mark.slow
async def test_a_standby_takes_the_lease_only_once_it_ran_out_on_its_own_clock(
        kube: Kube, namespace: str) -> None:
    a_clock, b_clock = Clock(), Clock()
    a, b = (candidate(kube, namespace, "a", a_clock), candidate(kube, namespace, "b", b_clock))
    await a.acquire()
    assert a.leading() and REGISTRY.get_sample_value("kubemr_operator_leader") == 1
    first = await spec(kube, namespace)
    assert (first.holder, first.duration, first.transitions) == ("a", 15, 0)

    assert not await b._try(), "a holds it: b waits"
    assert not b.leading()
    b_clock.now += 14.9
    assert not await b._try(), "not run out yet on b's clock"
    b_clock.now += 0.1  # a (stopped, as if killed) renewed nothing for a whole lease
    assert await b._try(), "a whole lease without a change: b takes it"
    taken = await spec(kube, namespace)
    assert (taken.holder, taken.transitions) == ("b", 1)
    assert taken.acquired != first.acquired

    # a wakes up: its next renewal sees b and it stops leading at once.
    with pytest.raises(LeadershipLost, match="was taken by b: stopped leading"):
        await a.hold()
    assert not a.leading()
    await a.release()
    assert (await spec(kube, namespace)).holder == "b", "a loser releases nothing"


@pytest.mark.anyio
@pytest.mark.kube
@pytest.mark.slow
async def test_a_released_lease_is_taken_at_the_next_try(kube: Kube, namespace: str) -> None:
    clock = Clock()  # never moves: only the release can free the lease
    a, b = candidate(kube, namespace, "a", clock), candidate(kube, namespace, "b", clock)
    await a.acquire()
    assert not await b._try()
    await a.release()
    released = await spec(kube, namespace)
    assert (released.holder, released.duration) == ("", 1)
    assert not a.leading()
    assert await b._try(), "no holder: free at once"
    assert (await spec(kube, namespace)).holder == "b"


@pytest.mark.anyio
@pytest.mark.kube
@pytest.mark.slow
async def test_of_two_candidates_that_read_the_same_version_only_one_writes(
        kube: Kube, namespace: str) -> None:
    clock = Clock()
    a, b, c = (candidate(kube, namespace, name, clock) for name in "abc")
    await a.acquire()
    await a.release()
    lease = await kube.get(LEASES, "op", namespace)  # both read the released lease
    for elector in (b, c):
        elector.election.observe(LeaseRecord.of(lease), clock())
    await b._write(lease, b.election.claim(micro_time()), "taking")
    with pytest.raises(Conflict):
        await c._write(lease, c.election.claim(micro_time()), "taking")
    assert (await spec(kube, namespace)).holder == "b"
    assert not await c._try(), "c reads b's fresh lease and waits"


@pytest.mark.anyio
@pytest.mark.kube
@pytest.mark.slow
async def test_a_lease_kubemr_did_not_create_is_never_taken(kube: Kube, namespace: str) -> None:
    await kube.create(LEASES, {"metadata": {"name": "op"},
                               "spec": {"holderIdentity": "someone-else"}}, namespace)
    with pytest.raises(LeaseNotOurs, match=f"Lease {namespace}/op exists and was not created"):
        await candidate(kube, namespace, "a", Clock()).acquire()
    assert (await spec(kube, namespace)).holder == "someone-else"


@pytest.mark.anyio
@pytest.mark.kube
@pytest.mark.slow
async def test_a_leader_whose_renewal_is_overdue_stops_at_once(kube: Kube, namespace: str) -> None:
    """A loop held up past the renew deadline (a clock that jumped) must not go on leading
    on a lease others may already count as expired: the next round stops it, unwritten."""
    clock = Clock()
    a = candidate(kube, namespace, "a", clock)
    await a.acquire()
    written = await spec(kube, namespace)
    clock.now += 1.0  # the renew deadline
    with pytest.raises(LeadershipLost, match=r"not renewed for 1\.0s \(the renew deadline"):
        await a.hold()
    assert not a.leading()
    assert await spec(kube, namespace) == written, "nothing written after the deadline"


@pytest.mark.anyio
@pytest.mark.kube
@pytest.mark.slow
async def test_an_operator_that_loses_the_lease_stops_reconciling_with_the_error(
        kube: Kube, namespace: str, crds: None) -> None:
    """Operator.run with leader election: ready once it leads; another holder written
    into the Lease (as if this operator's renewals had stalled) ends every loop of it, and
    run() raises LeadershipLost (the CLI exits with it, one line, non-zero)."""
    election = LeaderElection("a", namespace=namespace, lease_name="op", lease_duration=15,
                              renew_deadline=1.0, retry_period=0.05)
    operator = Operator(kube, OperatorConfig(namespace=namespace, operator_namespace=namespace,
                                             leader_election=election))
    assert operator.elector is not None
    ended: list[BaseException] = []

    async def run() -> None:
        try:
            await operator.run()
        except LeadershipLost as exc:
            ended.append(exc)

    with anyio.fail_after(120):
        async with anyio.create_task_group() as group:
            group.start_soon(run)
            while True:  # leading, and its watch has listed
                if operator.elector.leading() and operator.watch_current():
                    break
                await anyio.sleep(0.05)
            assert all(check() for check in operator.health.readiness.values())
            while True:  # another holder, written over whichever renewal is current
                lease = await kube.get(LEASES, "op", namespace)
                taken = LeaseRecord("b", 15, micro_time(), micro_time(), 1)
                try:
                    await kube.replace(LEASES, "op", {**lease, "spec": taken.spec()}, namespace)
                    break
                except Conflict:
                    continue
    assert len(ended) == 1 and "was taken by b: stopped leading" in str(ended[0])
    assert not operator.health.readiness["leader"]()
    assert REGISTRY.get_sample_value("kubemr_operator_leader") == 0
    assert (await spec(kube, namespace)).holder == "b", "a loser releases nothing"
