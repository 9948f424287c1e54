"""The Kubernetes client layer: the only package that talks to the API server.

* :mod:`.config` -- where the API server is and our credentials (kubeconfig or in-cluster);
* :mod:`.client` -- :class:`Kube` (one aiohttp session per process, ``async with``), resource
  types as :class:`Resource` paths, verbs returning plain dicts, patch content types;
* :mod:`.errors` -- typed errors (NotFound, Conflict, Unprocessable...) raised in one place;
* :mod:`.watch` -- the one list-watch loop (bookmarks, resume, 410 re-list, backoff);
* :mod:`.backoff` -- the one retry-delay policy;
* :mod:`.namespaces` -- the one way kubemr makes a namespace for itself.

Nothing outside this package imports ``kubernetes_asyncio`` (an import-linter contract), and
inside it only :mod:`.config` does, for kubeconfigs whose credentials a plugin mints.
"""

from .backoff import Backoff
from .client import (
    APPLY_PATCH,
    BATCH_JOBS,
    CONFIG_MAPS,
    CRDS,
    EVENTS,
    JSON_PATCH,
    LEASES,
    MERGE_PATCH,
    NAMESPACES,
    NODES,
    PODS,
    ROLE_BINDINGS,
    ROLES,
    SECRETS,
    SELF_SUBJECT_REVIEWS,
    SERVICE_ACCOUNTS,
    STRATEGIC_MERGE_PATCH,
    Kube,
    KubeObject,
    Resource,
    Unreachable,
    kubeconfig_contexts,
)
from .config import KubeconfigError
from .errors import (
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    KubeApiError,
    NotFound,
    ServerError,
    TooManyRequests,
    Unauthorized,
    Unprocessable,
    error_for,
    status_message,
    transient_after_outage,
)
from .namespaces import ensure_namespace
from .watch import Changed, Listed, WatchCounters, list_watch

__all__ = [
    "APPLY_PATCH",
    "BATCH_JOBS",
    "CONFIG_MAPS",
    "CRDS",
    "EVENTS",
    "JSON_PATCH",
    "LEASES",
    "MERGE_PATCH",
    "NAMESPACES",
    "NODES",
    "PODS",
    "ROLES",
    "ROLE_BINDINGS",
    "SECRETS",
    "SELF_SUBJECT_REVIEWS",
    "SERVICE_ACCOUNTS",
    "STRATEGIC_MERGE_PATCH",
    "Backoff",
    "BadRequest",
    "Changed",
    "Conflict",
    "Forbidden",
    "Gone",
    "Kube",
    "KubeApiError",
    "KubeObject",
    "KubeconfigError",
    "Listed",
    "NotFound",
    "Resource",
    "ServerError",
    "TooManyRequests",
    "Unauthorized",
    "Unprocessable",
    "Unreachable",
    "WatchCounters",
    "ensure_namespace",
    "error_for",
    "kubeconfig_contexts",
    "list_watch",
    "status_message",
    "transient_after_outage",
]
