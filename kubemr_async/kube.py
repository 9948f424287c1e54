"""Kubernetes client plumbing shared by the state store, the operator and the CLI.

One ``ApiClient`` per process: it owns an aiohttp connection pool, and every API object
(``CustomObjectsApi``, ``CoreV1Api``...) built on it shares that pool. :func:`api_client`
builds it from the environment the way kubectl and in-cluster clients do; whoever calls it
owns the client and must close it (``await client.close()`` or ``async with``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from kubernetes_asyncio.client import ApiClient, Configuration
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import load_incluster_config, load_kube_config

from .errors import KubemrError

#: A Kubernetes object as the API returns it (decoded JSON): unstructured, unlike records.
KubeObject = dict[str, Any]

#: The content type that makes the API server treat a PATCH body as RFC 6902 JSON Patch.
JSON_PATCH = "application/json-patch+json"


async def api_client(kubeconfig: str | None = None, context: str | None = None) -> ApiClient:
    """A client configured the way kubectl finds its cluster.

    An explicit ``kubeconfig``/``context`` or ``$KUBECONFIG`` wins; otherwise, in a Pod
    (``KUBERNETES_SERVICE_HOST`` set) the mounted ServiceAccount token is used and re-read
    as the kubelet rotates it; otherwise ``~/.kube/config``. The caller owns the returned
    client and must close it (``await client.close()`` or ``async with``).
    """
    config = Configuration()
    explicit = kubeconfig is not None or context is not None or os.environ.get("KUBECONFIG")
    if not explicit and os.environ.get("KUBERNETES_SERVICE_HOST"):
        load_incluster_config(client_configuration=config)
    else:
        # persist_config=False: never write refreshed credentials back into the user's file.
        await load_kube_config(config_file=kubeconfig, context=context,
                               client_configuration=config, persist_config=False)
    return ApiClient(configuration=config)


class KubeApiError(KubemrError):
    """An API call failed for a reason the caller cannot treat as normal.

    The message names what was being done (job, record, object) and carries the API
    server's own explanation (its Status message), never request headers or tokens.
    """

    def __init__(self, context: str, status: int, reason: str) -> None:
        super().__init__(f"{context}: HTTP {status}: {reason}")
        self.status = status
        self.reason = reason


def status_message(body: str | bytes | None, fallback: str = "") -> str:
    """The API server's explanation inside an error response body (a ``Status`` object)."""
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    if not body:
        return fallback
    try:
        decoded: Any = json.loads(body)
    except ValueError:
        return body[:500]
    if isinstance(decoded, dict) and decoded.get("message"):
        return str(decoded["message"])
    return body[:500]


def api_error(context: str, exc: ApiException) -> KubeApiError:
    """Wrap ``exc`` so the message says what failed (``context``) and why (server Status)."""
    return KubeApiError(context, int(exc.status or 0), status_message(exc.body, str(exc.reason)))
