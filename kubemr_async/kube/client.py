"""The one door to the API server: :class:`Kube`, over kubernetes_asyncio's transport.

kubernetes_asyncio gives us what is hard to get right (kubeconfig and in-cluster
credentials, token rotation, TLS, the aiohttp pool); its generated per-type API classes
and models we do not use. Every call here is a path built from a :class:`Resource`, JSON
bodies decoded with orjson into plain dicts, and one error translation
(:func:`~kubemr_async.kube.errors.error_for`). That keeps the store's hot path (claims,
renewals, watches) lean, and keeps ``kubernetes_asyncio`` out of every other module.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from kubernetes_asyncio.client import ApiClient, Configuration
from kubernetes_asyncio.config import (
    ConfigException,
    list_kube_config_contexts,
    load_incluster_config,
    load_kube_config,
)

from ..errors import KubemrError
from .errors import Conflict, KubeApiError, NotFound, error_for

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


class KubeconfigError(KubemrError):
    """A kubeconfig (or in-cluster configuration) that cannot be used: missing, malformed,
    no such context, no credentials."""


def kubeconfig_contexts(path: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The contexts of kubeconfig ``path`` (``os.pathsep``-separated files merge, as in
    ``$KUBECONFIG``) and the current one, as kubectl's ``config get-contexts`` reads them."""
    try:
        contexts, current = list_kube_config_contexts(path)
    except ConfigException as exc:
        raise KubeconfigError(str(exc)) from None
    return list(contexts), current


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


async def _configuration(kubeconfig: str | None, context: str | None) -> Configuration:
    config = Configuration()
    explicit = kubeconfig is not None or context is not None or os.environ.get("KUBECONFIG")
    if not explicit and os.environ.get("KUBERNETES_SERVICE_HOST"):
        load_incluster_config(client_configuration=config)
    else:
        # persist_config=False: never write refreshed credentials back into the user's file.
        await load_kube_config(config_file=kubeconfig, context=context,
                               client_configuration=config, persist_config=False)
    return config


class Kube:
    """A connection to one API server; use with ``async with`` or close with :meth:`aclose`.

    One per process: it owns an aiohttp connection pool that every call shares.
    """

    def __init__(self, api: ApiClient) -> None:
        self._api = api

    @classmethod
    async def connect(cls, kubeconfig: str | None = None, context: str | None = None) -> Kube:
        """A connection found the way kubectl and in-cluster clients find theirs.

        An explicit ``kubeconfig``/``context`` or ``$KUBECONFIG`` wins; otherwise, in a Pod
        (``KUBERNETES_SERVICE_HOST`` set) the mounted ServiceAccount token is used and
        re-read as the kubelet rotates it; otherwise ``~/.kube/config``.
        """
        try:
            config = await _configuration(kubeconfig, context)
        except ConfigException as exc:
            raise KubeconfigError(str(exc)) from None
        return cls(ApiClient(configuration=config))

    @property
    def host(self) -> str:
        """The API server's URL, for messages."""
        return str(self._api.configuration.host)

    async def aclose(self) -> None:
        await self._api.close()

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
        try:
            resp: aiohttp.ClientResponse = await self._api.call_api(
                path, method, query_params=_query(query),
                header_params={"Accept": accept, "Content-Type": content_type},
                body=body, auth_settings=["BearerToken"], _preload_content=False,
                _request_timeout=read_timeout)
        except _NO_ANSWER as exc:
            raise Unreachable(context, exc) from exc
        if not 200 <= resp.status < 300:
            raise error_for(context, resp.status, await _read_all(resp, context),
                            str(resp.reason))
        return resp

    async def request(self, method: str, path: str, *, context: str,
                      query: Query | None = None, body: object = None,
                      content_type: str = "application/json",
                      read_timeout: float | None = None,
                      accept: str = "application/json") -> KubeObject:
        """Send a request and return its decoded JSON answer (``accept`` may ask for
        another rendering, such as a ``kubectl get``-style Table)."""
        resp = await self.open(method, path, context=context, query=query, body=body,
                               content_type=content_type, read_timeout=read_timeout,
                               accept=accept)
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
                   ) -> tuple[list[KubeObject], str]:
        """Every matching object (paged) and the list's resourceVersion: a consistent cut
        a watch can start from."""
        items: list[KubeObject] = []
        revision = ""
        token: str | None = None
        while True:
            listing = await self.request(
                "GET", resource.path(namespace),
                query={"limit": page, "continue": token, "labelSelector": label_selector,
                       "fieldSelector": field_selector},
                context=context or f"listing {resource.describe(namespace)}")
            items += listing.get("items") or []
            revision = revision or listing["metadata"]["resourceVersion"]
            token = listing["metadata"].get("continue")
            if not token:
                return items, revision
