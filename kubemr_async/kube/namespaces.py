"""Namespaces kubemr creates for itself (a job's task namespace), made in one way."""

from __future__ import annotations

from collections.abc import Mapping

import anyio

from .client import NAMESPACES, Kube
from .errors import Conflict, KubeApiError


async def ensure_namespace(kube: Kube, name: str, labels: Mapping[str, str], *,
                           context: str, wait_terminating: float = 120.0) -> None:
    """Make sure namespace ``name`` exists and is usable; wait out a terminating one.

    A job deleted and re-created under the same name finds its old task namespace still
    terminating, where nothing can be created: we wait (up to ``wait_terminating``
    seconds) until it is gone, then create it anew. An existing live namespace is left as
    it is, labels included (it may not be ours to change).
    """
    deadline = anyio.current_time() + wait_terminating
    while True:
        try:
            await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace",
                                           "metadata": {"name": name, "labels": dict(labels)}},
                              context=context)
            return
        except Conflict:
            pass
        existing = await kube.find(NAMESPACES, name, context=context)
        if existing is None:
            continue
        if (existing.get("status") or {}).get("phase") != "Terminating":
            return
        if anyio.current_time() > deadline:
            raise KubeApiError(context, 409, "the namespace is still terminating")
        await anyio.sleep(0.5)
