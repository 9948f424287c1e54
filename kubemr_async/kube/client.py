"""The one door to the API server: :class:`Kube`, a small aiohttp + orjson client.

Every call here is a path built from a :class:`Resource`, JSON bodies encoded and decoded
with orjson into plain dicts, and one error translation
(:func:`~kubemr_async.kube.errors.error_for`). Where the server is and who we are comes
from :mod:`.config` (kubeconfig or in-cluster). A generated client would cost a worker
half a second of imports before its first claim and ~3 ms of CPU per request on the hot
path (claims, renewals, commits, watches); this costs neither.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from . import config as _config
from .config import Endpoint
from .errors import Conflict, KubeApiError, NotFound, Unauthorized, error_for

#: A Kubernetes object as the API returns it (decoded JSON): unstructured, unlike records.
KubeObject = dict[str, Any]

# Content types of a PATCH body: they decide how the API server reads it.
#: RFC 6902 JSON Patch: ordered operations, ``test`` included (the claim protocol).
JSON_PATCH = "application/json-patch+json"
#: RFC 7386 merge patch: a partial object; ``null`` removes a field.
MERGE_PATCH = "application/merge-patch+json"
#: Strategic merge patch (built-in types only): lists with a merge key, such as
#: ``status.conditions`` by ``type``, are merged item by item instead of replaced.
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
#: Server-side apply: the whole intended object, owned by a field manager.
APPLY_PATCH = "application/apply-patch+yaml"


def kubeconfig_contexts(path: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The contexts of kubeconfig ``path`` (``os.pathsep``-separated files merge, as in
    ``$KUBECONFIG``) and the current one, as kubectl's ``config get-contexts`` reads them."""
    merged = _config.Kubeconfig.read(path)
    return list(merged.contexts.values()), merged.contexts.get(merged.current)


class Unreachable(KubeApiError):
    """No HTTP answer at all (connection refused or reset, DNS, timeout): transient."""

    def __init__(self, context: str, cause: BaseException) -> None:
        super().__init__(context, 0, f"{type(cause).__name__}: {cause}")

    @property
    def transient(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class Resource:
    """A resource type: where its objects live in the API's URL space."""

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        """The URL path; a namespaced resource without ``namespace`` means all namespaces."""
        path = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace is not None:
            path += f"/namespaces/{quote(namespace, safe='')}"
        path += f"/{self.plural}"
        if name is not None:
            path += f"/{quote(name, safe='')}"
        if subresource is not None:
            path += f"/{subresource}"
        return path

    def describe(self, namespace: str | None, name: str | None = None) -> str:
        """How an error message names an object or a collection: ``Kind ns/name``."""
        where = f"{namespace}/" if namespace and self.namespaced else ""
        if name:
            return f"{self.kind} {where}{name}"
        return f"{self.plural} in {namespace or 'all namespaces'}"


NAMESPACES = Resource("", "v1", "namespaces", "Namespace", namespaced=False)
NODES = Resource("", "v1", "nodes", "Node", namespaced=False)
PODS = Resource("", "v1", "pods", "Pod")
EVENTS = Resource("", "v1", "events", "Event")
SECRETS = Resource("", "v1", "secrets", "Secret")
CONFIG_MAPS = Resource("", "v1", "configmaps", "ConfigMap")
SERVICE_ACCOUNTS = Resource("", "v1", "serviceaccounts", "ServiceAccount")
BATCH_JOBS = Resource("batch", "v1", "jobs", "Job")
ROLES = Resource("rbac.authorization.k8s.io", "v1", "roles", "Role")
ROLE_BINDINGS = Resource("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding")
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease")
CRDS = Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions",
                "CustomResourceDefinition", namespaced=False)
SELF_SUBJECT_REVIEWS = Resource("authentication.k8s.io", "v1", "selfsubjectreviews",
                                "SelfSubjectReview", namespaced=False)

Query = Mapping[str, str | int | bool | None]

#: What an HTTP call raises when the server gave no (complete) answer.
_NO_ANSWER = (aiohttp.ClientError, TimeoutError, OSError)
#: How long a call that is not a stream (every verb but watches and logs) waits for each
#: piece of its answer. The API server ends such a request itself after 60 s (its
#: --request-timeout), so silence past that means no answer is coming: a server that
#: accepted the connection and hung, or a connection that died without a reset. Without
#: it such a call waited for ever.
ANSWER_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=75)


async def _read_all(resp: aiohttp.ClientResponse, context: str) -> bytes:
    """The whole body of ``resp``, which is released; a broken read is Unreachable."""
    try:
        return await resp.read()
    except _NO_ANSWER as exc:
        raise Unreachable(context, exc) from exc
    finally:
        resp.release()


def _query(query: Query | None) -> list[tuple[str, str]]:
    # Go's strconv.ParseBool reads "true"; Python's str(True) would be "True".
    return [(k, ("true" if v else "false") if isinstance(v, bool) else str(v))
            for k, v in (query or {}).items() if v is not None]


class Kube:
    """A connection to one API server; use with ``async with`` or close with :meth:`aclose`.

    One per process: it owns an aiohttp connection pool that every call shares.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=endpoint.ssl),
            # Not trust_env: aiohttp would read the proxy environment on every request
            # (1.2 ms of CPU each, as much as the rest of a PATCH); config.load has
            # resolved HTTPS_PROXY / NO_PROXY for our one server already.
            # A watch event holds a whole object; etcd allows 1.5 MiB.
            read_bufsize=2**21,
            # No overall deadline by default: a watch stays open as long as the server
            # keeps it; each call that wants one passes its own.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
        )

    @classmethod
    async def connect(cls, kubeconfig: str | None = None, context: str | None = None) -> Kube:
        """A connection found the way kubectl and in-cluster clients find theirs.

        An explicit ``kubeconfig``/``context`` or ``$KUBECONFIG`` wins; otherwise, in a Pod
        (``KUBERNETES_SERVICE_HOST`` set) the mounted ServiceAccount token is used and
        re-read as the kubelet rotates it; otherwise ``~/.kube/config``.
        """
        endpoint = _config.load(kubeconfig, context)
        await endpoint.authenticate(False)  # a plugin that cannot mint fails here, once
        return cls(endpoint)

    @property
    def host(self) -> str:
        """The API server's URL, for messages."""
        return self._endpoint.host

    async def aclose(self) -> None:
        await self._session.close()

    async def __aenter__(self) -> Kube:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    # --- raw requests --------------------------------------------------------------

    async def open(self, method: str, path: str, *, context: str, query: Query | None = None,
                   body: object = None, content_type: str = "application/json",
                   read_timeout: aiohttp.ClientTimeout | float | None = None,
                   accept: str = "application/json") -> aiohttp.ClientResponse:
        """Send a request; the caller reads and releases the response (a stream).

        An answer other than 2xx is raised as its typed error; no answer as Unreachable.
        """
        data = body if body is None or isinstance(body, bytes | str) else orjson.dumps(body)
        if isinstance(read_timeout, int | float):
            read_timeout = aiohttp.ClientTimeout(total=read_timeout)
        fresh = False
        while True:
            headers = {"Accept": accept, "Content-Type": content_type,
                       **await self._endpoint.authenticate(fresh)}
            try:
                resp = await self._session.request(
                    method, self._endpoint.host + path, params=_query(query), data=data,
                    headers=headers, proxy=self._endpoint.proxy,
                    server_hostname=self._endpoint.server_hostname,
                    timeout=self._session.timeout if read_timeout is None else read_timeout)
            except _NO_ANSWER as exc:
                raise Unreachable(context, exc) from exc
            if 200 <= resp.status < 300:
                return resp
            error = error_for(context, resp.status, await _read_all(resp, context),
                              str(resp.reason))
            if isinstance(error, Unauthorized) and not fresh:
                fresh = True  # a rotated token or an expired plugin token: renew once
                continue
            raise error

    async def request(self, method: str, path: str, *, context: str,
                      query: Query | None = None, body: object = None,
                      content_type: str = "application/json",
                      read_timeout: float | None = None,
                      accept: str = "application/json") -> KubeObject:
        """Send a request and return its decoded JSON answer (``accept`` may ask for
        another rendering, such as a ``kubectl get``-style Table); without
        ``read_timeout``, ANSWER_TIMEOUT bounds the wait."""
        resp = await self.open(method, path, context=context, query=query, body=body,
                               content_type=content_type,
                               read_timeout=ANSWER_TIMEOUT if read_timeout is None
                               else read_timeout, accept=accept)
        raw = await _read_all(resp, context)
        decoded: KubeObject = orjson.loads(raw) if raw else {}
        return decoded

    # --- verbs ---------------------------------------------------------------------

    async def get(self, resource: Resource, name: str, namespace: str | None = None, *,
                  context: str | None = None, subresource: str | None = None) -> KubeObject:
        """The object; NotFound if there is none."""
        return await self.request(
            "GET", resource.path(namespace, name, subresource),
            context=context or f"reading {resource.describe(namespace, name)}")

    async def find(self, resource: Resource, name: str, namespace: str | None = None, *,
                   context: str | None = None) -> KubeObject | None:
        """The object, or None if there is none."""
        try:
            return await self.get(resource, name, namespace, context=context)
        except NotFound:
            return None

    async def create(self, resource: Resource, body: Mapping[str, Any],
                     namespace: str | None = None, *, context: str | None = None,
                     query: Query | None = None) -> KubeObject:
        """POST a new object; Conflict if one of that name exists."""
        name = (body.get("metadata") or {}).get("name")
        return await self.request(
            "POST", resource.path(namespace), body=dict(body), query=query,
            context=context or f"creating {resource.describe(namespace, name or '(generated)')}")

    async def ensure(self, resource: Resource, body: Mapping[str, Any],
                     namespace: str | None = None, *, context: str | None = None) -> None:
        """Create the object unless one of its name exists (what a reconcile repeats)."""
        with contextlib.suppress(Conflict):
            await self.create(resource, body, namespace, context=context)

    async def patch(self, resource: Resource, name: str, body: object,
                    namespace: str | None = None, *, content_type: str = MERGE_PATCH,
                    subresource: str | None = None, context: str | None = None,
                    query: Query | None = None) -> KubeObject:
        """PATCH an object (or its ``status`` subresource); ``content_type`` picks the kind."""
        return await self.request(
            "PATCH", resource.path(namespace, name, subresource), body=body,
            content_type=content_type, query=query,
            context=context or f"patching {resource.describe(namespace, name)}")

    async def replace(self, resource: Resource, name: str, body: Mapping[str, Any],
                      namespace: str | None = None, *,
                      context: str | None = None) -> KubeObject:
        """PUT the whole object (an update). Its ``metadata.resourceVersion`` makes the write
        conditional: Conflict if the object changed since it was read, which is what a
        Lease election needs (two candidates cannot both win the same version)."""
        return await self.request(
            "PUT", resource.path(namespace, name), body=dict(body),
            context=context or f"updating {resource.describe(namespace, name)}")

    async def delete(self, resource: Resource, name: str, namespace: str | None = None, *,
                     context: str | None = None, propagation: str = "Background",
                     missing_ok: bool = True) -> None:
        """Delete an object; one already gone is fine unless ``missing_ok`` is False."""
        try:
            await self.request(
                "DELETE", resource.path(namespace, name),
                body={"kind": "DeleteOptions", "apiVersion": "v1",
                      "propagationPolicy": propagation},
                context=context or f"deleting {resource.describe(namespace, name)}")
        except NotFound:
            if not missing_ok:
                raise

    async def delete_collection(self, resource: Resource, namespace: str, *,
                                label_selector: str, context: str | None = None) -> None:
        """Delete every object matching ``label_selector`` in ``namespace``."""
        await self.request(
            "DELETE", resource.path(namespace), query={"labelSelector": label_selector},
            context=context or f"deleting {resource.describe(namespace)}")

    async def list(self, resource: Resource, namespace: str | None = None, *,
                   context: str | None = None, label_selector: str | None = None,
                   field_selector: str | None = None, page: int = 500,
                   most: int | None = None, cached: bool = False
                   ) -> tuple[list[KubeObject], str]:
        """Every matching object (paged) and the list's resourceVersion: a consistent cut
        a watch can start from. ``most``: only the first that many (one page).

        ``cached``: whatever the API server's watch cache holds (``resourceVersion=0``),
        possibly a little behind, never read from etcd. A list filtered by label that
        matches few of many objects is cheap from the cache; from etcd, paged, the server
        reads page after page of non-matching objects to fill one, and a busy server
        answers 504 after a minute (measured: 64 workers polling a 2,000-task job)."""
        items: list[KubeObject] = []
        revision = ""
        token: str | None = None
        while True:
            listing = await self.request(
                "GET", resource.path(namespace),
                query={"limit": most or page, "continue": token,
                       "labelSelector": label_selector, "fieldSelector": field_selector,
                       **({"resourceVersion": "0"} if cached and token is None else {})},
                context=context or f"listing {resource.describe(namespace)}")

            items += listing.get("items") or []
            revision = revision or listing["metadata"]["resourceVersion"]
            token = listing["metadata"].get("continue")
            if not token or most is not None:
                return items, revision

