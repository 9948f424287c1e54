"""A stand-in kubelet that runs Pods as local processes.

The test cluster has no container runtime or scheduler, but the project's Jobs and workers
must really run for end-to-end tests. ``FakeKubelet`` registers a Node and, for each
unscheduled Pending Pod, does what a scheduler plus kubelet would do in the ways that
matter here:

* registers a Node ``fake-kubelet-<id>`` (InternalIP 127.0.0.1, generous capacity, Ready)
  and keeps it alive like a kubelet: renews its Lease in ``kube-node-lease`` and posts a
  Ready heartbeat every ``heartbeat_seconds``, so the controller-manager's node-lifecycle
  controller never taints it or evicts its Pods; the Node is deleted on stop;
* binds the Pod to that Node (``pods/binding``, which fails for all but one binder, so
  several FakeKubelets can share a cluster) before running it;
* mints a token for the Pod's ServiceAccount with the TokenRequest API, bound to the Pod,
  and hands it to the process as ``KUBECONFIG`` (the stand-in for the projected token), so
  RBAC applies to the workload exactly as in a cluster;
* runs the first container's ``command`` + ``args`` in a fresh per-Pod working directory,
  with the container's ``env``/``envFrom`` resolved (values, fieldRefs, Secret and
  ConfigMap keys), ``$(VAR)`` references expanded and ``HOSTNAME`` set to the Pod name;
* reports phase Running, then Succeeded/Failed with the exit code (128 + N for a death by
  signal N; the log's tail as the message under ``FallbackToLogsOnError``), through
  pods/status;
* keeps the output (``logs()``) and serves it over HTTPS at the kubelet's
  ``/containerLogs/{namespace}/{pod}/{container}``, so the real ``pods/log`` API (which
  the apiserver proxies to the Node's kubelet) works, ``follow`` and ``tailLines`` included;
* on graceful deletion (Pods bound to a Node are not deleted at once, they get a
  ``deletionTimestamp``) SIGTERMs the process group, SIGKILLs it after the grace period,
  reports the final status and then deletes the Pod with ``gracePeriodSeconds=0``, as the
  kubelet does, so garbage collection and namespace deletion still finish promptly.

The parts live in their own modules: :mod:`.node` (the Node and its Lease),
:mod:`.podrunner` (one Pod as a local process) and :mod:`.logserver` (``pods/log``). This
module watches Pods, binds the ones it takes, and kills and finalizes them on deletion.
``restartPolicy`` is treated as ``Never``; only the first container runs; probes are
ignored. In process mode (the default) so are images, volumes and resources; in container
mode (``podman=``) the image runs with its securityContext, limits and emptyDir volumes (see
:mod:`.podman`). A Pod whose ``nodeSelector`` the Node's labels do not match is left to
another kubelet: that is how a test sends Pods to a container-mode kubelet (with
``node_labels``) while a process-mode one shares the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Self, TypeVarTuple, Unpack

import anyio
import anyio.abc

from kubemr_async.kube import (
    PODS,
    Conflict,
    Kube,
    KubeObject,
    Listed,
    NotFound,
    list_watch,
)
from kubemr_async.testing import TestEnvError
from kubemr_async.testing.logserver import LogServer, cluster_ca
from kubemr_async.testing.node import CLAIM_ANNOTATION, Node
from kubemr_async.testing.podman import Podman
from kubemr_async.testing.podrunner import (
    KILL_GRACE_MAX,
    ApiRoute,
    PodRun,
    PodRunner,
    kill,
    until_answered,
)

log = logging.getLogger(__name__)

_WATCH_SECONDS = 240  # one watch request's length on the server; then it is resumed

Args = TypeVarTuple("Args")


async def _logged(what: str, fn: Callable[[Unpack[Args]], Awaitable[None]],
                  *args: *Args) -> None:
    """Run a background task whose failure is logged, not fatal: nobody awaits it."""
    try:
        await fn(*args)
    except Exception:
        log.exception("FakeKubelet %s failed", what)


class FakeKubelet:
    """Runs unscheduled Pods (in ``namespace``, or all namespaces) as local processes.

    Call ``start()``/``stop()`` (or use it as a context manager) to run it on a background
    thread with its own event loop, which works from sync and async tests alike; or await
    ``run()`` as a task in your own loop. ``kubeconfig`` must carry admin-like credentials:
    it registers a Node, binds Pods, reads Secrets and writes Pod status on the workloads'
    behalf, like a kubelet.
    """

    def __init__(
        self,
        kubeconfig: Path,
        *,
        namespace: str | None = None,
        log_dir: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
        node_name: str | None = None,
        heartbeat_seconds: float = 10.0,
        verify_clients: bool = True,
        podman: Podman | None = None,
        node_labels: Mapping[str, str] | None = None,
    ) -> None:
        """``extra_env`` is added to every Pod's environment (before the Pod's own env).

        ``node_name`` defaults to ``fake-kubelet-<random>``. ``heartbeat_seconds`` is how
        often the Node's Lease is renewed and its Ready condition posted. With
        ``verify_clients`` the log server demands a client cert signed by the kubeconfig's
        CA (the apiserver's ``--kubelet-client-certificate``), if the kubeconfig has a CA.
        With ``podman`` Pods run as containers; ``node_labels`` label the Node, and only
        Pods whose ``nodeSelector`` they match are taken.
        """
        self._kubeconfig = Path(kubeconfig)
        self._namespace = namespace
        self._own_root = log_dir is None
        self._root = (
            Path(tempfile.mkdtemp(prefix="kubemr-kubelet-")) if log_dir is None else log_dir
        )
        self._extra_env = dict(extra_env or {})
        #: Role ARN -> that role's credentials, given as ambient environment to Pods whose
        #: ServiceAccount names the role (a stand-in for EKS's workload-identity webhook).
        self.identities: dict[str, dict[str, str]] = {}
        #: Routes for Pods' API traffic (see PodRunner): a test appends one to send some
        #: Pods through a proxy it can cut (testing.tcpproxy), and removes it after.
        self.api_routes: list[ApiRoute] = []
        self._runs: dict[str, PodRun] = {}
        self._by_name: dict[tuple[str, str], PodRun] = {}
        self._finalizing: set[str] = set()
        self._synced = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._kube: Kube | None = None
        self._pods: PodRunner | None = None
        # Where the watch spawns its work: heartbeat, kills and finalizers in one group,
        # the Pods' own tasks in another, which outlives the first so they can be killed.
        self._group: anyio.abc.TaskGroup | None = None
        self._pod_group: anyio.abc.TaskGroup | None = None
        suffix = uuid.uuid4().hex[:8]
        self._id = f"{socket.gethostname()}/{os.getpid()}/{suffix}"
        self._node_name = node_name or f"fake-kubelet-{suffix}"
        self._heartbeat_seconds = heartbeat_seconds
        self._verify_clients = verify_clients
        self._port = 0
        self._podman = podman
        self._node_labels = dict(node_labels or {})

    # ---------------------------------------------------------------------- public API

    @property
    def log_dir(self) -> Path:
        """Per-Pod output files live at ``<log_dir>/<namespace>/<pod>.log``."""
        return self._root

    @property
    def node_name(self) -> str:
        """The Node this kubelet registers and binds its Pods to."""
        return self._node_name

    @property
    def port(self) -> int:
        """The port of the HTTPS log server on 127.0.0.1 (0 until started)."""
        return self._port

    def logs(self, namespace: str, pod: str) -> str:
        """Combined stdout+stderr of a Pod's process, like ``kubectl logs``."""
        return (self._root / namespace / f"{pod}.log").read_text(errors="replace")

    def start(self) -> Self:
        """Run on a background thread; returns once the Node is registered and the first
        Pod list is processed."""
        self._thread = threading.Thread(target=self._thread_main, name="FakeKubelet", daemon=True)
        self._thread.start()
        while not self._synced.wait(0.1):
            if not self._thread.is_alive():
                raise TestEnvError(f"FakeKubelet failed to start: {self._error!r}")
        return self

    def stop(self) -> None:
        """Kill the processes still running, delete the Node and stop. Idempotent."""
        if self._thread is not None:
            if self._thread.is_alive() and self._loop is not None and self._task is not None:
                self._loop.call_soon_threadsafe(self._task.cancel)
            self._thread.join()
            self._thread = None
        if self._own_root:
            shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def run(self) -> None:
        """Register the Node, watch and run Pods until cancelled; on the way out kill the
        remaining processes and delete the Node."""
        async with await Kube.connect(kubeconfig=str(self._kubeconfig)) as kube:
            self._kube = kube
            self._pods = PodRunner(kube, self._kubeconfig, self._root, self._extra_env,
                                   self.identities, self._podman, self.api_routes)
            ca = cluster_ca(self._kubeconfig) if self._verify_clients else None
            logs = LogServer(self._by_name, self._root / ".kubelet-pki", self._node_name, ca)
            self._port = await logs.start()
            node = Node(kube, self._node_name, self._id, self._port, self._node_labels)
            try:
                # Failing to register or to list (bad kubeconfig, no server) is fatal, and
                # start() reports it; after that list_watch rides out apiserver hiccups.
                await node.register()
                context = f"watching Pods for FakeKubelet {self._node_name}"
                pods, version = await kube.list(PODS, self._namespace, context=context)
                async with anyio.create_task_group() as self._pod_group:
                    try:
                        async with anyio.create_task_group() as self._group:
                            self._group.start_soon(_logged, "heartbeat",
                                                   node.heartbeat_forever, self._heartbeat_seconds)
                            self._sync(pods)
                            self._synced.set()
                            await self._watch_forever(kube, context, version)
                    finally:  # the watch, heartbeat and finalizers have stopped
                        with anyio.CancelScope(shield=True):
                            await self._kill_all()  # ends follow=true log streams, too
                        self._pod_group.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True):
                    await logs.close()
                    await node.delete()

    # ------------------------------------------------------------------------ plumbing

    def _thread_main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()
            await self.run()

        try:
            asyncio.run(main())
        except asyncio.CancelledError:
            pass
        except BaseException as exc:
            self._error = exc
            log.exception("FakeKubelet crashed")

    def _spawn(self, what: str, fn: Callable[[Unpack[Args]], Awaitable[None]],
               *args: *Args) -> None:
        """A background task that is logged if it fails and cancelled on shutdown."""
        assert self._group is not None
        self._group.start_soon(_logged, what, fn, *args)

    async def _watch_forever(self, kube: Kube, context: str, since: str) -> None:
        """Follow the Pods from the version we listed; a 410 Gone brings a fresh list."""
        async for event in list_watch(kube, PODS, self._namespace, context=context,
                                      since=since, timeout_seconds=_WATCH_SECONDS):
            if isinstance(event, Listed):
                self._sync(event.items)
            else:
                self._on_pod(event.type, event.object)

    def _sync(self, pods: list[KubeObject]) -> None:
        """Act on a full list: every Pod in it as if just added, the rest as gone."""
        for pod in pods:
            self._on_pod("ADDED", pod)
        live = {p["metadata"]["uid"] for p in pods}
        for uid in list(self._runs):
            if uid not in live:
                self._on_gone(uid)

    def _on_pod(self, event: str, pod: KubeObject) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        if event == "DELETED":
            self._on_gone(uid)
            return
        if meta.get("deletionTimestamp"):
            self._on_gone(uid, meta.get("deletionGracePeriodSeconds"))
            if pod["spec"].get("nodeName") == self._node_name and uid not in self._finalizing:
                self._finalizing.add(uid)
                self._spawn(f"finalizer of {meta['namespace']}/{meta['name']}",
                            self._finalize, pod)
            return
        if uid not in self._runs and self._wants(pod):
            run = PodRun(
                grace=min(
                    float(pod["spec"].get("terminationGracePeriodSeconds", 30)), KILL_GRACE_MAX
                ),
                containers=tuple(c["name"] for c in pod["spec"]["containers"]),
            )
            self._runs[uid] = run
            assert self._pod_group is not None
            self._pod_group.start_soon(_logged, f"pod {meta['namespace']}/{meta['name']}",
                                       self._run_pod, pod, run)

    def _wants(self, pod: KubeObject) -> bool:
        """A Pending Pod that is unscheduled (or bound to our Node), selects our Node's
        labels and is runnable."""
        spec = pod["spec"]
        selector = spec.get("nodeSelector") or {}
        return (
            spec.get("nodeName") in (None, "", self._node_name)
            and all(self._node_labels.get(k) == v for k, v in selector.items())
            and not pod["metadata"].get("deletionTimestamp")
            and not spec.get("schedulingGates")
            and (pod.get("status") or {}).get("phase", "Pending") == "Pending"
        )

    async def _claim(self, pod: KubeObject) -> bool:
        """Bind the Pod to our Node; False if it is gone or someone else bound it first.

        The apiserver binds a Pod at most once, so of several FakeKubelets watching the
        same namespace (a session-wide one and a test's own, say) exactly one wins. The
        binding also records which FakeKubelet runs the Pod in an annotation.
        """
        meta = pod["metadata"]
        if pod["spec"].get("nodeName") == self._node_name:
            return True  # created bound to us, as with a DaemonSet or kubectl --overrides
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {
                "name": meta["name"],
                "uid": meta["uid"],  # not a same-named successor of this Pod
                "annotations": {CLAIM_ANNOTATION: self._id},
            },
            "target": {"apiVersion": "v1", "kind": "Node", "name": self._node_name},
        }
        kube = self._kube
        assert kube is not None
        context = f"binding Pod {meta['namespace']}/{meta['name']} to Node {self._node_name}"
        try:
            await until_answered(lambda: kube.request(
                "POST", PODS.path(meta["namespace"], meta["name"], "binding"), body=body,
                context=context), context)
        except (NotFound, Conflict):  # gone, bound elsewhere or being deleted
            return False
        pod["spec"]["nodeName"] = self._node_name
        return True

    def _on_gone(self, uid: str, grace: float | None = None) -> None:
        run = self._runs.get(uid)
        if run is not None and not run.killed:
            run.killed = True
            if grace is not None:  # the deletion's own period, if shorter than the Pod's
                run.grace = min(run.grace, max(float(grace), 1.0))
            self._spawn("kill", kill, run)

    async def _finalize(self, pod: KubeObject) -> None:
        """Finish a graceful deletion of a Pod bound to our Node, as the kubelet does.

        Once the process is dead and its final status reported, delete the Pod with
        ``gracePeriodSeconds=0``; until then the object stays, with a deletionTimestamp.
        """
        meta = pod["metadata"]
        run = self._runs.get(meta["uid"])
        if run is not None:
            await run.ended.wait()
        assert self._kube is not None
        with contextlib.suppress(NotFound, Conflict):  # gone, or a same-named successor
            await self._kube.request(
                "DELETE", PODS.path(meta["namespace"], meta["name"]),
                query={"gracePeriodSeconds": 0},
                body={"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                      "preconditions": {"uid": meta["uid"]}},
                context=f"deleting {PODS.describe(meta['namespace'], meta['name'])}")

    async def _kill_all(self) -> None:
        """Kill every process we started, at once; their Pods' tasks are cancelled next."""
        async with anyio.create_task_group() as group:
            for run in self._runs.values():
                run.grace = min(run.grace, 2.0)
                run.killed = True
                group.start_soon(kill, run)

    async def _run_pod(self, pod: KubeObject, run: PodRun) -> None:
        meta = pod["metadata"]
        try:
            if await self._claim(pod):
                self._by_name[meta["namespace"], meta["name"]] = run
                assert self._pods is not None
                await self._pods.run(pod, run)
        finally:
            run.done.set()
            run.ended.set()
