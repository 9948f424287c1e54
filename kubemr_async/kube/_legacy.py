"""The ApiClient-based helpers that modules not yet moved onto :class:`Kube` still use.

Being retired: everything here has its replacement in :mod:`.client` and :mod:`.errors`.

One ``ApiClient`` per process: it owns an aiohttp connection pool, and every API object
(``CustomObjectsApi``, ``CoreV1Api``...) built on it shares that pool. :func:`api_client`
builds it from the environment the way kubectl and in-cluster clients do; whoever calls it
owns the client and must close it (``await client.close()`` or ``async with``).
"""

from __future__ import annotations

from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from .client import Kube, _configuration
from .errors import KubeApiError, status_message


async def api_client(kubeconfig: str | None = None, context: str | None = None) -> ApiClient:
    """A raw client found the way :meth:`Kube.connect` finds its server; the caller closes it."""
    return ApiClient(configuration=await _configuration(kubeconfig, context))


def api_error(context: str, exc: ApiException) -> KubeApiError:
    """Wrap ``exc`` so the message says what failed (``context``) and why (server Status)."""
    return KubeApiError(context, int(exc.status or 0), status_message(exc.body, str(exc.reason)))


#: What a caller not yet moved onto :class:`Kube` still holds (operator.py, issue 8).
LegacyApiClient = ApiClient


def as_kube(api: Kube | ApiClient) -> Kube:
    """``api`` itself if it is a :class:`Kube`, else a Kube sharing the raw client's pool.

    The wrapper does not own the client: nobody should :meth:`Kube.aclose` it.
    """
    return api if isinstance(api, Kube) else Kube(api)
