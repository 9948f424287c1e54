"""The stand-in kubelet's Node: registered Ready, kept alive like a kubelet, deleted on stop.

The node-lifecycle controller taints a Node whose Lease stops being renewed and later
evicts its Pods, so the Node renews its Lease in ``kube-node-lease`` and posts a Ready
heartbeat every few seconds. It advertises InternalIP 127.0.0.1 and the log server's port,
which is where the apiserver proxies ``pods/log``.
"""

from __future__ import annotations

import datetime
import logging
import platform
import socket
import uuid
from collections.abc import Mapping

import anyio

from kubemr_async.kube import (
    LEASES,
    NODES,
    STRATEGIC_MERGE_PATCH,
    Conflict,
    Kube,
    KubeObject,
    NotFound,
)
from kubemr_async.testing import utc_now

log = logging.getLogger(__name__)

#: Set on the Node and on the Pods a FakeKubelet runs; the value identifies which one.
CLAIM_ANNOTATION = "testing.kubemr.io/fake-kubelet"
#: Where kubelets keep their Node's Lease (the node-lifecycle controller watches it).
NODE_LEASE_NAMESPACE = "kube-node-lease"
_LEASE_SECONDS = 40  # what the kubelet uses; the controller's grace period is 50 s
_NODE_RESOURCES = {"cpu": "64", "memory": "256Gi", "pods": "1000", "ephemeral-storage": "1Ti"}
_API_TIMEOUT = 10.0  # for the best-effort calls on the way out


def _utc_now_micro() -> str:
    """A MicroTime, as Lease renewTime requires."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _go_arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


class Node:
    """One Node named ``name``, owned by the kubelet ``owner_id``, serving logs on ``log_port``."""

    def __init__(self, kube: Kube, name: str, owner_id: str, log_port: int,
                 labels: Mapping[str, str] | None = None) -> None:
        """``labels`` are added to the Node's (Pods select it by them)."""
        self._kube = kube
        self.name = name
        self._labels = dict(labels or {})
        self._id = owner_id
        self._log_port = log_port
        self._uid = ""
        self._kubelet_version = ""
        self._ready_since = ""

    def status(self) -> KubeObject:
        now = utc_now()
        conditions = [
            ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID"),
            ("Ready", "True", "KubeletReady"),
        ]
        return {
            "capacity": _NODE_RESOURCES,
            "allocatable": _NODE_RESOURCES,
            "conditions": [
                {
                    "type": kind,
                    "status": status,
                    "reason": reason,
                    "message": "FakeKubelet is posting ready status",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": self._ready_since,
                }
                for kind, status, reason in conditions
            ],
            # Only an InternalIP: the apiserver reaches kubelets at the first address of
            # its preferred types, and a Hostname address would not resolve.
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self._log_port}},
            "nodeInfo": {
                "machineID": uuid.uuid5(uuid.NAMESPACE_DNS, socket.gethostname()).hex,
                "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, self.name)),
                "bootID": str(uuid.uuid5(uuid.NAMESPACE_DNS, self._id)),
                "kernelVersion": platform.release(),
                "osImage": "FakeKubelet (local processes)",
                "containerRuntimeVersion": "fake://0.0.0",
                "kubeletVersion": self._kubelet_version,
                "operatingSystem": "linux",
                "architecture": _go_arch(),
            },
        }

    async def register(self) -> None:
        """Create the Node (or take over one of the same name) and its Lease."""
        version = await self._kube.request("GET", "/version",
                                           context="reading the API server's version")
        self._kubelet_version = version["gitVersion"]  # as if built with the control plane
        self._ready_since = utc_now()
        status = self.status()
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": _go_arch(),
                    **self._labels,
                },
                "annotations": {CLAIM_ANNOTATION: self._id},
            },
            "status": status,
        }
        try:
            created = await self._kube.create(NODES, node)
        except Conflict:
            # An explicit node_name that exists (left over, say): take the Node over.
            created = await self._patch_status(status)
        self._uid = created["metadata"]["uid"]
        await self._renew_lease()

    async def _renew_lease(self) -> None:
        spec = {
            "holderIdentity": self.name,
            "leaseDurationSeconds": _LEASE_SECONDS,
            "renewTime": _utc_now_micro(),
        }
        try:
            await self._kube.patch(LEASES, self.name, {"spec": spec}, NODE_LEASE_NAMESPACE)
            return
        except NotFound:
            pass
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                # As the kubelet does: deleting the Node garbage-collects its Lease.
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "Node",
                        "name": self.name,
                        "uid": self._uid,
                    }
                ],
            },
            "spec": spec,
        }
        await self._kube.create(LEASES, lease, NODE_LEASE_NAMESPACE)

    async def heartbeat_forever(self, seconds: float) -> None:
        """Renew the Lease and post the Ready condition, so the node-lifecycle controller
        never finds the Node stale (which would taint it and, later, evict its Pods)."""
        while True:
            await anyio.sleep(seconds)
            try:
                await self._renew_lease()
                await self._post_node_status()
            except Exception:
                log.warning("FakeKubelet heartbeat failed", exc_info=True)

    async def _patch_status(self, status: KubeObject) -> KubeObject:
        # Strategic merge, as a kubelet patches: conditions merge by type.
        return await self._kube.patch(NODES, self.name, {"status": status},
                                      subresource="status", content_type=STRATEGIC_MERGE_PATCH)

    async def _post_node_status(self) -> None:
        try:
            await self._patch_status({"conditions": self.status()["conditions"]})
        except NotFound:
            log.warning("FakeKubelet's Node %s was deleted; registering it again", self.name)
            await self.register()

    async def delete(self) -> None:
        """Best effort: the cluster may be gone already. The Lease would be garbage-collected
        with the Node; deleting it is just tidier."""
        for resource, namespace in ((NODES, None), (LEASES, NODE_LEASE_NAMESPACE)):
            try:
                with anyio.fail_after(_API_TIMEOUT):
                    await self._kube.delete(resource, self.name, namespace)
            except Exception as exc:
                log.debug("FakeKubelet could not delete its %s: %r", resource.kind, exc)
