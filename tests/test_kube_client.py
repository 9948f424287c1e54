"""The kube layer (:mod:`kubemr_async.kube`) against a real API server.

What every other module relies on: each failure arrives as its typed error (NotFound,
Conflict, Unprocessable with ``lost_race``, Forbidden), the one list-watch loop yields a
list and then changes in order, resumes when the server ends a watch and re-lists after
410 Gone, and ``ensure_namespace`` waits out a terminating namespace.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from kubemr_async.crd import MAPREDUCE_JOBS, ensure_crds
from kubemr_async.kube import (
    JSON_PATCH,
    NAMESPACES,
    SECRETS,
    SERVICE_ACCOUNTS,
    Changed,
    Conflict,
    Forbidden,
    Kube,
    Listed,
    NotFound,
    Resource,
    Unprocessable,
    ensure_namespace,
    list_watch,
)
from kubemr_async.testing.cluster import TestCluster

pytestmark = [pytest.mark.anyio, pytest.mark.kube, pytest.mark.slow]

CONFIG_MAPS = Resource("", "v1", "configmaps", "ConfigMap")


@dataclass
class Counters:
    watch_connects: int = 0
    relists: int = 0


@pytest.fixture
async def kube(kube_cluster: TestCluster) -> AsyncIterator[Kube]:
    async with await Kube.connect(str(kube_cluster.kubeconfig_path)) as connection:
        yield connection


@pytest.fixture
async def namespace(kube: Kube) -> AsyncIterator[str]:
    name = f"kc-{uuid.uuid4().hex[:10]}"
    await kube.create(NAMESPACES, {"metadata": {"name": name}})
    yield name
    await kube.delete(NAMESPACES, name)


def config_map(name: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "labels": {"test": "kube-client"}}, "data": data}


#: Ours only: the controller-manager puts a kube-root-ca.crt ConfigMap in every namespace.
OURS = "test=kube-client"


async def test_typed_errors(kube: Kube, namespace: str) -> None:
    with pytest.raises(NotFound, match=rf"reading ConfigMap {namespace}/nope: HTTP 404"):
        await kube.get(CONFIG_MAPS, "nope", namespace)
    assert await kube.find(CONFIG_MAPS, "nope", namespace) is None

    created = await kube.create(CONFIG_MAPS, config_map("c", a="1"), namespace)
    with pytest.raises(Conflict) as conflict:
        await kube.create(CONFIG_MAPS, config_map("c", a="2"), namespace)
    assert conflict.value.status == 409 and not conflict.value.transient

    # A JSON Patch whose test fails: a bare 422, the lost race of the claim protocol.
    stale = [{"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
             {"op": "replace", "path": "/data/a", "value": "3"}]
    with pytest.raises(Unprocessable) as lost:
        await kube.patch(CONFIG_MAPS, "c", stale, namespace, content_type=JSON_PATCH)
    assert lost.value.lost_race
    fresh = [{"op": "test", "path": "/metadata/resourceVersion",
              "value": created["metadata"]["resourceVersion"]},
             {"op": "replace", "path": "/data/a", "value": "3"}]
    patched = await kube.patch(CONFIG_MAPS, "c", fresh, namespace, content_type=JSON_PATCH)
    assert patched["data"] == {"a": "3"}

    # Invalid against the schema: a 422 that lists its causes is no race.
    with pytest.raises(Unprocessable) as invalid:
        await kube.create(CONFIG_MAPS, config_map("d", **{"not a key!": "x"}), namespace)
    assert not invalid.value.lost_race
    assert "not a key!" in str(invalid.value)

    await kube.delete(CONFIG_MAPS, "c", namespace)
    await kube.delete(CONFIG_MAPS, "c", namespace)  # already gone: fine
    with pytest.raises(NotFound):
        await kube.delete(CONFIG_MAPS, "c", namespace, missing_ok=False)


async def test_forbidden_without_rbac(kube: Kube, kube_cluster: TestCluster, namespace: str,
                                      tmp_path: Path) -> None:
    await kube.create(SERVICE_ACCOUNTS, {"metadata": {"name": "nobody"}}, namespace)
    token = kube_cluster.token_for(namespace, "nobody")
    kubeconfig = kube_cluster.kubeconfig_for_token(token, tmp_path / "nobody.kubeconfig")
    async with await Kube.connect(str(kubeconfig)) as nobody:
        with pytest.raises(Forbidden) as err:
            await nobody.list(SECRETS, namespace)
    assert err.value.status == 403 and not err.value.transient
    assert "forbidden" in str(err.value) and token not in str(err.value)


async def collect(events: AsyncIterator[Listed | Changed], count: int) -> list[Listed | Changed]:
    """The next ``count`` events (within 30 s)."""
    seen: list[Listed | Changed] = []
    with anyio.fail_after(30):
        async for event in events:
            seen.append(event)
            if len(seen) == count:
                break
    return seen


def names(event: Listed | Changed) -> list[str]:
    objects = event.items if isinstance(event, Listed) else [event.object]
    return [obj["metadata"]["name"] for obj in objects]


async def test_list_watch_lists_then_follows_in_order(kube: Kube, namespace: str) -> None:
    await kube.create(CONFIG_MAPS, config_map("before"), namespace)
    counters = Counters()
    events = list_watch(kube, CONFIG_MAPS, namespace, context="watching", counters=counters,
                        label_selector=OURS)
    async with contextlib.aclosing(events):
        first = await collect(events, 1)
        assert isinstance(first[0], Listed) and names(first[0]) == ["before"]
        await kube.create(CONFIG_MAPS, config_map("one"), namespace)
        await kube.patch(CONFIG_MAPS, "one", {"data": {"k": "v"}}, namespace)
        await kube.delete(CONFIG_MAPS, "before", namespace)
        changes = await collect(events, 3)
    assert [(e.type, names(e)) for e in changes if isinstance(e, Changed)] == [
        ("ADDED", ["one"]), ("MODIFIED", ["one"]), ("DELETED", ["before"])]
    assert counters.watch_connects == 1 and counters.relists == 0


async def test_list_watch_resumes_when_the_server_ends_the_watch(
        kube: Kube, namespace: str) -> None:
    counters = Counters()
    progressed: list[int] = []  # on_progress calls, at each watch (re)connect count
    events = list_watch(kube, CONFIG_MAPS, namespace, context="watching", counters=counters,
                        label_selector=OURS, timeout_seconds=1,
                        on_progress=lambda: progressed.append(counters.watch_connects))
    changes: list[Listed | Changed] = []

    async def follow() -> None:  # consuming while the objects come, one watch apiece
        changes.extend(await collect(events, 3))

    async with contextlib.aclosing(events):
        listed = await collect(events, 1)
        assert isinstance(listed[0], Listed) and listed[0].items == []
        async with anyio.create_task_group() as group:
            group.start_soon(follow)
            for n in range(3):
                await anyio.sleep(1.5)  # longer than a watch request lives
                await kube.create(CONFIG_MAPS, config_map(f"m{n}"), namespace)
    assert [names(e) for e in changes] == [["m0"], ["m1"], ["m2"]]
    assert all(isinstance(e, Changed) and e.type == "ADDED" for e in changes)
    assert counters.watch_connects >= 3, "the server ended each watch; we resumed"
    assert counters.relists == 0, "resumed from the last version seen, no re-list"
    # The list, every event and every watch the server ended on time showed progress (a
    # bookmark would too): what the operator's /readyz is built on.
    assert progressed[0] == 0, "the list, before any watch"
    assert len(progressed) >= 1 + 3 + (counters.watch_connects - 1)


async def test_list_watch_relists_after_410(kube: Kube, namespace: str) -> None:
    # A resource type installed during the session: its watch cache starts far past version
    # 1 (the built-in types' caches may still reach back that far on a young cluster), so a
    # watch from 1 is answered 410 Gone.
    await ensure_crds(kube)
    counters = Counters()
    events = list_watch(kube, MAPREDUCE_JOBS, namespace, context="watching", since="1",
                        counters=counters)
    async with contextlib.aclosing(events):
        first = await collect(events, 1)
    assert isinstance(first[0], Listed) and first[0].items == []
    assert int(first[0].resource_version) > 1
    assert counters.relists == 1


async def test_ensure_namespace_waits_out_a_terminating_one(kube: Kube) -> None:
    name = f"kc-term-{uuid.uuid4().hex[:8]}"
    labels = {"app.kubernetes.io/managed-by": "kubemr-async"}
    await ensure_namespace(kube, name, labels, context="test")
    first = await kube.get(NAMESPACES, name)
    await ensure_namespace(kube, name, {"other": "x"}, context="test")  # live: left alone
    assert (await kube.get(NAMESPACES, name))["metadata"]["labels"].items() >= labels.items()
    # A finalizer on an object inside holds the namespace in Terminating until removed.
    held = config_map("held")
    held["metadata"]["finalizers"] = ["kubemr.io/test-hold"]
    await kube.create(CONFIG_MAPS, held, name)
    await kube.delete(NAMESPACES, name)
    assert (await kube.get(NAMESPACES, name))["status"]["phase"] == "Terminating"

    async def release() -> None:
        await anyio.sleep(2)
        await kube.patch(CONFIG_MAPS, "held", {"metadata": {"finalizers": None}}, name)

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(release)
            await ensure_namespace(kube, name, labels, context="test", wait_terminating=90)
        again = await kube.get(NAMESPACES, name)
        assert again["metadata"]["uid"] != first["metadata"]["uid"], "made anew"
        assert again["status"]["phase"] == "Active"
        assert again["metadata"]["labels"].items() >= labels.items()
    finally:
        await kube.delete(NAMESPACES, name)
