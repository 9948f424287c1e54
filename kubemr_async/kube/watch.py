"""One list-watch loop for every follower of the API server (store, operator, CLI).

The rules every Kubernetes client learns the hard way live here once:

* start from a *list* (a consistent cut), then watch from the list's resourceVersion;
* ask for bookmarks, so a quiet stream still moves our version forward, and resume a
  broken or ended stream from the last version seen (no event is missed or repeated);
* a version that left the server's window is answered with 410 Gone: list again and say
  so (:class:`Listed`), since deletions in between cannot be replayed;
* transient trouble (a restarting server, a silent connection, 429, 5xx) is retried with
  backoff; what retrying cannot fix (401, 403, 400) is raised as its typed error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import aiohttp
import orjson

from .backoff import Backoff
from .client import Kube, KubeObject, Resource
from .errors import Gone, KubeApiError, error_for, transient_after_outage

log = logging.getLogger("kubemr.kube.watch")


@dataclass(frozen=True, slots=True)
class Listed:
    """Every object that matched at ``resource_version``; earlier state is superseded."""

    items: list[KubeObject]
    resource_version: str


@dataclass(frozen=True, slots=True)
class Changed:
    """One object added, modified or deleted, in the server's order."""

    type: Literal["ADDED", "MODIFIED", "DELETED"]
    object: KubeObject


class WatchCounters(Protocol):
    """Where a caller counts what its watches cost (the coordination benchmarks read it)."""

    watch_connects: int
    relists: int


class _Uncounted:
    watch_connects = 0
    relists = 0


async def list_watch(kube: Kube, resource: Resource, namespace: str | None = None, *,
                     context: str, since: str | None = None,
                     label_selector: str | None = None, field_selector: str | None = None,
                     timeout_seconds: int = 300, inactivity_timeout: float | None = None,
                     counters: WatchCounters | None = None,
                     backoff: Backoff | None = None,
                     on_progress: Callable[[], None] | None = None,
                     on_trouble: Callable[[], None] | None = None,
                     ) -> AsyncGenerator[Listed | Changed, None]:
    """Follow a collection forever: a :class:`Listed` first (unless resuming ``since`` a
    version the caller listed itself), then :class:`Changed` events, and a fresh
    :class:`Listed` after every 410 Gone.

    ``timeout_seconds`` bounds one watch request on the server, after which we resume;
    ``inactivity_timeout`` bounds silence on the client (a connection that died without a
    FIN), and must exceed the gap between the bookmarks the server sends.

    ``on_progress`` is called whenever the server shows the watch is current: a list, an
    event, a bookmark (which a caller never sees otherwise), a watch it ended on time.
    The operator's readiness is built on it. ``on_trouble`` is called whenever the server
    did not answer or the stream broke off: for a caller that must know it could not see
    (a worker judging leases).
    """
    progressed = on_progress or _nothing
    trouble_at: float | None = None

    def troubled() -> None:
        nonlocal trouble_at
        trouble_at = time.monotonic()
        (on_trouble or _nothing)()

    def retryable(exc: KubeApiError) -> bool:
        since = None if trouble_at is None else time.monotonic() - trouble_at
        return transient_after_outage(exc, since)

    counters = counters or _Uncounted()
    backoff = backoff or Backoff()
    silence = inactivity_timeout if inactivity_timeout is not None else timeout_seconds + 15.0
    selectors = {"labelSelector": label_selector, "fieldSelector": field_selector}
    current = since
    while True:
        await backoff.wait()
        if current is None:
            try:
                items, current = await kube.list(resource, namespace, context=context,
                                                 label_selector=label_selector,
                                                 field_selector=field_selector)
            except KubeApiError as exc:
                if not retryable(exc):
                    raise
                troubled()
                log.warning("%s; retrying in %.1fs", exc, backoff.delay)
                continue
            backoff.reset()
            progressed()
            yield Listed(items, current)
        counters.watch_connects += 1
        try:
            resp = await kube.open(
                "GET", resource.path(namespace), context=context,
                query={"watch": True, "allowWatchBookmarks": True, "resourceVersion": current,
                       "timeoutSeconds": timeout_seconds, **selectors},
                read_timeout=aiohttp.ClientTimeout(sock_connect=10, sock_read=silence))
        except Gone:
            counters.relists += 1
            current = None
            backoff.reset()
            continue
        except KubeApiError as exc:
            if not retryable(exc):
                raise
            troubled()
            log.warning("%s; reconnecting in %.1fs", exc, backoff.delay)
            continue
        error: KubeApiError | None = None
        try:
            while True:
                line = await resp.content.readline()
                if not line:  # the server ended the watch (timeoutSeconds): resume
                    backoff.reset()
                    progressed()
                    break
                event = orjson.loads(line)
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":
                    code = int(obj.get("code") or 0)
                    error = error_for(context, code, orjson.dumps(obj))
                    break
                backoff.reset()
                progressed()
                current = obj["metadata"]["resourceVersion"]
                if kind != "BOOKMARK":
                    yield Changed(kind, obj)
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            troubled()
            log.info("%s: stream interrupted (%s); resuming from %s", context,
                     type(exc).__name__, current)
        finally:
            resp.release()
        if isinstance(error, Gone):  # our version left the server's window: list again
            counters.relists += 1
            current = None
            backoff.reset()
        elif error is not None and not retryable(error):
            raise error
        elif error is not None:
            troubled()
            log.warning("%s; retrying in %.1fs", error, backoff.delay)


def _nothing() -> None:
    """The default ``on_progress``: nobody is listening."""
