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
* reports phase Running, then Succeeded/Failed with the exit code, through pods/status;
* keeps the output (``logs()``) and serves it over HTTPS at the kubelet's
  ``/containerLogs/{namespace}/{pod}/{container}``, so the real ``pods/log`` API (which
  the apiserver proxies to the Node's kubelet) works, ``follow`` and ``tailLines`` included;
* on graceful deletion (Pods bound to a Node are not deleted at once, they get a
  ``deletionTimestamp``) SIGTERMs the process group, SIGKILLs it after the grace period,
  reports the final status and then deletes the Pod with ``gracePeriodSeconds=0``, as the
  kubelet does, so garbage collection and namespace deletion still finish promptly.

Images cannot be run, so the command's first word is mapped onto this machine: ``kubemr``
becomes the console script of the current venv and ``python``/``python3`` the current
interpreter; anything else is looked up on ``PATH``. ``restartPolicy`` is treated as
``Never``; only the first container runs; volumes, probes, resources and node selectors
are ignored.

The log server is a simplified kubelet API: its serving cert is self-signed (the apiserver
does not verify kubelet serving certs unless ``--kubelet-certificate-authority`` is set),
it accepts any client cert signed by the cluster CA from the kubeconfig (``TestCluster``
gives the apiserver one) and does no authorization beyond that. Stdout and stderr share one
file, so ``stream=Stdout|Stderr`` is refused (as a kubelet without the split-streams
feature does); ``timestamps=true`` prefixes each line with the time the kubelet *read* it,
not when it was written; ``sinceSeconds``/``sinceTime`` are accepted and ignored.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import logging
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Self

import yaml
from aiohttp import web
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from kubemr_async.testing import TestEnvError
from kubemr_async.testing.pki import make_self_signed_cert

log = logging.getLogger(__name__)

#: Set on Pods a FakeKubelet runs; the value identifies which one.
CLAIM_ANNOTATION = "testing.kubemr.io/fake-kubelet"
_TOKEN_SECONDS = 24 * 3600  # outlives any test or benchmark run; nothing rotates it
_KILL_GRACE_MAX = 10.0  # cap on terminationGracePeriodSeconds; tests should not wait 30 s
_WATCH_SECONDS = 240  # relist this often, so a missed event cannot strand a Pod
#: Where kubelets keep their Node's Lease (the node-lifecycle controller watches it).
NODE_LEASE_NAMESPACE = "kube-node-lease"
_LEASE_SECONDS = 40  # what the kubelet uses; the controller's grace period is 50 s
_NODE_RESOURCES = {"cpu": "64", "memory": "256Gi", "pods": "1000", "ephemeral-storage": "1Ti"}
_FOLLOW_POLL = 0.1  # how often a follow=true stream looks for new output
_API_TIMEOUT = 10.0  # for the best-effort calls on the way out
_PYTHON = re.compile(r"python(3(\.\d+)?)?")
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")

Json = dict[str, Any]


class PodConfigError(Exception):
    """The Pod cannot be run locally (missing Secret key, no command, ...)."""


@dataclass
class _PodRun:
    """Bookkeeping for one Pod we took on."""

    task: asyncio.Task[None] | None = None
    proc: asyncio.subprocess.Process | None = None
    grace: float = _KILL_GRACE_MAX
    killed: bool = False
    children: set[asyncio.Task[None]] = field(default_factory=set)
    containers: tuple[str, ...] = ()
    log_path: Path | None = None
    #: The log file holds this run's output: the process started, or starting it failed.
    log_ready: bool = False
    #: Set once the process has exited (or will never run): ends follow=true streams.
    done: asyncio.Event = field(default_factory=asyncio.Event)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now_micro() -> str:
    """A MicroTime, as Lease renewTime requires."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _go_arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def expand_refs(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known vars are replaced, ``$$`` escapes ``$``."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(sub, text)


def local_argv(argv: list[str]) -> list[str]:
    """Map a container command onto this machine (see the module docstring)."""
    first = Path(argv[0]).name
    if first == "kubemr":
        return [str(Path(sys.executable).parent / "kubemr"), *argv[1:]]
    if _PYTHON.fullmatch(first):
        return [sys.executable, *argv[1:]]
    return argv


def _field_value(pod: Json, path: str) -> str:
    meta = pod["metadata"]
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "status.podIP": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
    }
    if path in simple:
        return str(simple[path])
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    raise PodConfigError(f"unsupported fieldRef {path!r}")


def _log_failure(task: asyncio.Task[None]) -> None:
    """Surface errors of a Pod's task in the log; nobody awaits it to see them."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("FakeKubelet pod task failed", exc_info=exc)


class _BadLogRequest(Exception):
    """Answered with ``status`` and the message as plain text, like the kubelet does."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _LogOptions:
    follow: bool = False
    previous: bool = False
    tail_lines: int | None = None
    limit_bytes: int | None = None
    timestamps: bool = False

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> _LogOptions:
        """The subset of v1.PodLogOptions the kubelet's containerLogs endpoint takes."""

        def flag(key: str) -> bool:
            value = query.get(key, "false")
            if value in ("1", "t", "T", "true", "TRUE", "True"):
                return True
            if value in ("0", "f", "F", "false", "FALSE", "False", ""):
                return False
            raise _BadLogRequest(400, f"invalid {key}={value!r}")

        def number(key: str, minimum: int) -> int | None:
            if key not in query:
                return None
            try:
                value = int(query[key])
            except ValueError:
                raise _BadLogRequest(400, f"invalid {key}={query[key]!r}") from None
            if value < minimum:
                raise _BadLogRequest(422, '{"message": "Invalid request."}')
            return value

        tail = query.get("tail")  # the kubelet's legacy spelling of tailLines
        if tail is not None and "tailLines" not in query and tail != "all":
            query = {**query, "tailLines": tail}
        if query.get("stream", "All") != "All":
            raise _BadLogRequest(400, f"unable to return the given log stream: {query['stream']!r}")
        number("sinceSeconds", 1)  # validated, then ignored (see the module docstring)
        return cls(
            follow=flag("follow"),
            previous=flag("previous"),
            tail_lines=number("tailLines", 0),
            limit_bytes=number("limitBytes", 1),
            timestamps=flag("timestamps"),
        )


def tail_offset(f: IO[bytes], lines: int) -> int:
    """Offset in ``f`` where its last ``lines`` lines start (a final partial line counts)."""
    end = f.seek(0, os.SEEK_END)
    if lines <= 0:
        return end
    pos, seen = end, 0
    # A newline ending the file terminates the last line; it does not start another one.
    limit = end - 1
    while pos > 0:
        size = min(65536, pos)
        pos -= size
        f.seek(pos)
        block = f.read(size)
        i = min(len(block), limit - pos)
        while (i := block.rfind(b"\n", 0, i)) >= 0:
            seen += 1
            if seen == lines:
                return pos + i + 1
    return 0


def stamp_lines(chunk: bytes, at_line_start: bool) -> tuple[bytes, bool]:
    """Prefix each line starting in ``chunk`` with an RFC 3339 timestamp and a space.

    ``at_line_start`` says whether the previous chunk ended a line; returns the stamped
    chunk and the same flag for the next one.
    """
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ ").encode()
    parts = chunk.split(b"\n")
    out = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if last and not part:
            break
        if i > 0 or at_line_start:
            out.append(stamp)
        out.append(part if last else part + b"\n")
    return b"".join(out), chunk.endswith(b"\n")


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
    ) -> None:
        """``extra_env`` is added to every Pod's environment (before the Pod's own env).

        ``node_name`` defaults to ``fake-kubelet-<random>``. ``heartbeat_seconds`` is how
        often the Node's Lease is renewed and its Ready condition posted. With
        ``verify_clients`` the log server demands a client cert signed by the kubeconfig's
        CA (the apiserver's ``--kubelet-client-certificate``), if the kubeconfig has a CA.
        """
        self._kubeconfig = Path(kubeconfig)
        self._namespace = namespace
        self._own_root = log_dir is None
        self._root = (
            Path(tempfile.mkdtemp(prefix="kubemr-kubelet-")) if log_dir is None else log_dir
        )
        self._extra_env = dict(extra_env or {})
        self._runs: dict[str, _PodRun] = {}
        self._by_name: dict[tuple[str, str], _PodRun] = {}
        self._finalizing: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._synced = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._core: Any = None
        self._leases: Any = None
        self._api: Any = None
        suffix = uuid.uuid4().hex[:8]
        self._id = f"{socket.gethostname()}/{os.getpid()}/{suffix}"
        self._node_name = node_name or f"fake-kubelet-{suffix}"
        self._heartbeat_seconds = heartbeat_seconds
        self._verify_clients = verify_clients
        self._port = 0
        self._node_uid = ""
        self._kubelet_version = ""
        self._ready_since = ""

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
        cfg = client.Configuration()
        await config.load_kube_config(config_file=str(self._kubeconfig), client_configuration=cfg)
        async with client.ApiClient(cfg) as api:
            self._api, self._core = api, client.CoreV1Api(api)
            self._leases = client.CoordinationV1Api(api)
            runner = await self._serve_logs()
            try:
                await self._register_node()
                self._spawn(self._heartbeat_forever())
                await self._watch_forever()
            finally:
                await asyncio.shield(self._shutdown(runner))

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

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """A background task that is logged if it fails and cancelled on shutdown."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)

    async def _shutdown(self, runner: web.AppRunner) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._kill_all()  # ends follow=true log streams, too
        await runner.cleanup()
        # The Lease would be garbage-collected with the Node; deleting it is just tidier.
        for what, delete, args in (
            ("Node", self._core.delete_node, (self._node_name,)),
            (
                "Lease",
                self._leases.delete_namespaced_lease,
                (self._node_name, NODE_LEASE_NAMESPACE),
            ),
        ):
            try:
                await asyncio.wait_for(delete(*args), _API_TIMEOUT)
            except Exception as exc:  # best effort: the cluster may be gone already
                log.debug("FakeKubelet could not delete its %s: %r", what, exc)

    async def _watch_forever(self) -> None:
        args: tuple[str, ...] = ()
        if self._namespace is None:
            list_fn = self._core.list_pod_for_all_namespaces
        else:
            list_fn, args = self._core.list_namespaced_pod, (self._namespace,)
        first = True
        while True:
            try:
                listing = self._api.sanitize_for_serialization(await list_fn(*args))
                for pod in listing["items"]:
                    self._on_pod("ADDED", pod)
                live = {p["metadata"]["uid"] for p in listing["items"]}
                for uid in list(self._runs):
                    if uid not in live:
                        self._on_gone(uid)
                self._synced.set()
                first = False
                async with watch.Watch() as w:
                    async for event in w.stream(
                        list_fn,
                        *args,
                        resource_version=listing["metadata"]["resourceVersion"],
                        timeout_seconds=_WATCH_SECONDS,
                    ):
                        self._on_pod(event["type"], event["raw_object"])
            except Exception:
                # A kubelet must outlive apiserver hiccups and expired resourceVersions;
                # only a failing first list (bad kubeconfig, no server) is fatal.
                if first:
                    raise
                log.warning("FakeKubelet watch failed; relisting", exc_info=True)
                await asyncio.sleep(1)

    def _on_pod(self, event: str, pod: Json) -> None:
        if event not in ("ADDED", "MODIFIED", "DELETED"):
            return  # BOOKMARK / ERROR carry no Pod to act on
        meta = pod["metadata"]
        uid = meta["uid"]
        if event == "DELETED":
            self._on_gone(uid)
            return
        if meta.get("deletionTimestamp"):
            self._on_gone(uid, meta.get("deletionGracePeriodSeconds"))
            if pod["spec"].get("nodeName") == self._node_name and uid not in self._finalizing:
                self._finalizing.add(uid)
                self._spawn(self._finalize(pod))
            return
        if uid not in self._runs and self._wants(pod):
            run = _PodRun(
                grace=min(
                    float(pod["spec"].get("terminationGracePeriodSeconds", 30)), _KILL_GRACE_MAX
                ),
                containers=tuple(c["name"] for c in pod["spec"]["containers"]),
            )
            self._runs[uid] = run
            run.task = asyncio.create_task(self._run_pod(pod, run))
            run.task.add_done_callback(_log_failure)

    def _wants(self, pod: Json) -> bool:
        """A Pending Pod that is unscheduled (or bound to our Node) and runnable."""
        spec = pod["spec"]
        return (
            spec.get("nodeName") in (None, "", self._node_name)
            and not pod["metadata"].get("deletionTimestamp")
            and not spec.get("schedulingGates")
            and (pod.get("status") or {}).get("phase", "Pending") == "Pending"
        )

    async def _claim(self, pod: Json) -> bool:
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
        # The answer is a Status, which the generated client fails to read as a Binding.
        resp = await self._core.create_namespaced_pod_binding(
            meta["name"], meta["namespace"], body, _preload_content=False
        )
        try:
            if resp.status in (404, 409):  # gone, bound elsewhere or being deleted
                return False
            if not 200 <= resp.status < 300:
                raise ApiException(status=resp.status, reason=(await resp.text())[:500])
        finally:
            resp.release()
        pod["spec"]["nodeName"] = self._node_name
        return True

    def _on_gone(self, uid: str, grace: float | None = None) -> None:
        run = self._runs.get(uid)
        if run is not None and not run.killed:
            run.killed = True
            if grace is not None:  # the deletion's own period, if shorter than the Pod's
                run.grace = min(run.grace, max(float(grace), 1.0))
            kill = asyncio.create_task(self._kill(run))
            run.children.add(kill)
            kill.add_done_callback(run.children.discard)

    async def _finalize(self, pod: Json) -> None:
        """Finish a graceful deletion of a Pod bound to our Node, as the kubelet does.

        Once the process is dead and its final status reported, delete the Pod with
        ``gracePeriodSeconds=0``; until then the object stays, with a deletionTimestamp.
        """
        meta = pod["metadata"]
        run = self._runs.get(meta["uid"])
        if run is not None and run.task is not None:
            await asyncio.wait({run.task})
        try:
            await self._core.delete_namespaced_pod(
                meta["name"],
                meta["namespace"],
                grace_period_seconds=0,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
            )
        except ApiException as exc:
            if exc.status not in (404, 409):  # gone already, or a same-named successor
                raise

    async def _kill(self, run: _PodRun) -> None:
        """SIGTERM the process group, SIGKILL it after the (capped) grace period."""
        proc = run.proc
        if proc is None or proc.returncode is not None:
            return  # not started yet: _run_pod sees ``killed`` once it has a process
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), run.grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def _kill_all(self) -> None:
        for run in self._runs.values():
            run.grace = min(run.grace, 2.0)
            run.killed = True
        await asyncio.gather(*(self._kill(r) for r in self._runs.values()))
        tasks = [r.task for r in self._runs.values() if r.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -------------------------------------------------------------------------- Node

    def _node_status(self) -> Json:
        now = _now()
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
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self._port}},
            "nodeInfo": {
                "machineID": uuid.uuid5(uuid.NAMESPACE_DNS, socket.gethostname()).hex,
                "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, self._node_name)),
                "bootID": str(uuid.uuid5(uuid.NAMESPACE_DNS, self._id)),
                "kernelVersion": platform.release(),
                "osImage": "FakeKubelet (local processes)",
                "containerRuntimeVersion": "fake://0.0.0",
                "kubeletVersion": self._kubelet_version,
                "operatingSystem": "linux",
                "architecture": _go_arch(),
            },
        }

    async def _register_node(self) -> None:
        version = await client.VersionApi(self._api).get_code()
        self._kubelet_version = version.git_version  # as if built with the control plane
        self._ready_since = _now()
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self._node_name,
                "labels": {
                    "kubernetes.io/hostname": self._node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": _go_arch(),
                },
                "annotations": {CLAIM_ANNOTATION: self._id},
            },
            "status": self._node_status(),
        }
        try:
            created = await self._core.create_node(node)
        except ApiException as exc:
            if exc.status != 409:
                raise
            # An explicit node_name that exists (left over, say): take the Node over.
            await self._core.patch_node_status(self._node_name, {"status": node["status"]})
            created = await self._core.read_node(self._node_name)
        self._node_uid = created.metadata.uid
        await self._renew_lease()

    async def _renew_lease(self) -> None:
        spec = {
            "holderIdentity": self._node_name,
            "leaseDurationSeconds": _LEASE_SECONDS,
            "renewTime": _now_micro(),
        }
        try:
            await self._leases.patch_namespaced_lease(
                self._node_name, NODE_LEASE_NAMESPACE, {"spec": spec}
            )
            return
        except ApiException as exc:
            if exc.status != 404:
                raise
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self._node_name,
                # As the kubelet does: deleting the Node garbage-collects its Lease.
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "Node",
                        "name": self._node_name,
                        "uid": self._node_uid,
                    }
                ],
            },
            "spec": spec,
        }
        await self._leases.create_namespaced_lease(NODE_LEASE_NAMESPACE, lease)

    async def _heartbeat_forever(self) -> None:
        """Renew the Lease and post the Ready condition, so the node-lifecycle controller
        never finds the Node stale (which would taint it and, later, evict its Pods)."""
        while True:
            await asyncio.sleep(self._heartbeat_seconds)
            try:
                await self._renew_lease()
                await self._post_node_status()
            except Exception:
                log.warning("FakeKubelet heartbeat failed", exc_info=True)

    async def _post_node_status(self) -> None:
        body = {"status": {"conditions": self._node_status()["conditions"]}}
        try:
            await self._core.patch_node_status(self._node_name, body)
        except ApiException as exc:
            if exc.status != 404:
                raise
            log.warning("FakeKubelet's Node %s was deleted; registering it again", self._node_name)
            await self._register_node()

    # ---------------------------------------------------------------------- log server

    def _cluster_ca(self) -> str | None:
        """The CA of the kubeconfig's current cluster, PEM, if it names one."""
        kubeconfig = yaml.safe_load(self._kubeconfig.read_text())
        context = next(
            c["context"]
            for c in kubeconfig["contexts"]
            if c["name"] == kubeconfig["current-context"]
        )
        cluster = next(
            c["cluster"] for c in kubeconfig["clusters"] if c["name"] == context["cluster"]
        )
        if "certificate-authority-data" in cluster:
            return base64.b64decode(cluster["certificate-authority-data"]).decode()
        if "certificate-authority" in cluster:
            return (self._kubeconfig.parent / str(cluster["certificate-authority"])).read_text()
        return None

    async def _serve_logs(self) -> web.AppRunner:
        """Start the HTTPS server the apiserver proxies ``pods/log`` to."""
        cert, key = make_self_signed_cert(self._root / ".kubelet-pki", "kubelet", self._node_name)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
        tls.set_alpn_protocols(["http/1.1"])
        ca = self._cluster_ca() if self._verify_clients else None
        if ca is not None:
            tls.verify_mode = ssl.CERT_REQUIRED
            tls.load_verify_locations(cadata=ca)
        app = web.Application()
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self._handle_logs)
        app.router.add_get("/healthz", self._handle_healthz)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        await web.SockSite(runner, sock, ssl_context=tls).start()
        return runner

    async def _handle_healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _handle_logs(self, request: web.Request) -> web.StreamResponse:
        ns, name = request.match_info["namespace"], request.match_info["pod"]
        container = request.match_info["container"]
        try:
            opts = _LogOptions.parse(request.query)
            run = self._by_name.get((ns, name))
            if run is None:
                raise _BadLogRequest(404, f"pod {name!r} does not exist")
            if container not in run.containers:
                raise _BadLogRequest(404, f"container {container!r} not found in pod {name!r}")
            if opts.previous:  # restartPolicy is Never here: there is no previous container
                raise _BadLogRequest(
                    400, f'previous terminated container "{container}" in pod "{name}" not found'
                )
            if container != run.containers[0] or not run.log_ready or run.log_path is None:
                raise _BadLogRequest(
                    400,
                    f'container "{container}" in pod "{name}" is waiting to start: '
                    "ContainerCreating",
                )
        except _BadLogRequest as exc:
            return web.Response(status=exc.status, text=str(exc))
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)  # headers now: a follow=true stream may idle a while
        with contextlib.suppress(ConnectionResetError):  # the client went away
            with run.log_path.open("rb") as f:
                await self._stream_log(request, resp, f, run, opts)
            await resp.write_eof()
        return resp

    @staticmethod
    async def _stream_log(
        request: web.Request,
        resp: web.StreamResponse,
        f: IO[bytes],
        run: _PodRun,
        opts: _LogOptions,
    ) -> None:
        f.seek(0 if opts.tail_lines is None else tail_offset(f, opts.tail_lines))
        budget = opts.limit_bytes
        at_line_start, exited = True, False
        while True:
            chunk = f.read(65536)
            if chunk:
                if opts.timestamps:
                    chunk, at_line_start = stamp_lines(chunk, at_line_start)
                if budget is not None:
                    chunk = chunk[:budget]
                    budget -= len(chunk)
                await resp.write(chunk)
                if budget == 0:
                    return
                continue
            if not opts.follow or exited:
                return
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            # Once the process is gone, read what it wrote last, then end the stream.
            exited = run.done.is_set()
            if not exited:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.done.wait(), _FOLLOW_POLL)

    # ---------------------------------------------------------------------- one Pod

    async def _run_pod(self, pod: Json, run: _PodRun) -> None:
        try:
            await self._run_pod_inner(pod, run)
        finally:
            run.done.set()

    async def _run_pod_inner(self, pod: Json, run: _PodRun) -> None:
        meta = pod["metadata"]
        ns, name = meta["namespace"], meta["name"]
        container = pod["spec"]["containers"][0]
        if not await self._claim(pod):
            return
        log_path = run.log_path = self._root / ns / f"{name}.log"
        self._by_name[ns, name] = run
        log_path.parent.mkdir(parents=True, exist_ok=True)
        workdir = self._root / ".work" / ns / name  # "." keeps it apart from namespaces
        workdir.mkdir(parents=True, exist_ok=True)
        started = _now()
        try:
            kubeconfig = await self._pod_kubeconfig(pod, workdir)
            env = await self._env(pod, container)
            env["KUBECONFIG"] = str(kubeconfig)
            argv = [expand_refs(a, env) for a in container.get("command", [])]
            argv += [expand_refs(a, env) for a in container.get("args", [])]
            if not argv:
                raise PodConfigError("container has no command; FakeKubelet cannot use images")
            with log_path.open("wb") as out:
                run.proc = await asyncio.create_subprocess_exec(
                    *local_argv(argv),
                    env=env,
                    cwd=workdir,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,  # own process group, so kill reaches children
                )
            run.log_ready = True
        except (PodConfigError, ApiException, OSError) as exc:
            message = f"FakeKubelet could not start {ns}/{name}: {exc}"
            log.warning("%s", message)
            log_path.write_text(message + "\n")
            run.log_ready = True
            await self._set_status(pod, container, started, exit_code=128, message=message)
            return
        if run.killed:  # deleted while we were setting up
            await self._kill(run)
        await self._set_status(pod, container, started)
        code = await run.proc.wait()
        run.done.set()  # before the status call: log streams need not wait for it
        # A signal death is reported the way container runtimes do: 128 + signal number.
        await self._set_status(pod, container, started, exit_code=code if code >= 0 else 128 - code)

    async def _pod_kubeconfig(self, pod: Json, workdir: Path) -> Path:
        """Admin kubeconfig with the user swapped for a token bound to this Pod."""
        meta = pod["metadata"]
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": _TOKEN_SECONDS,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        resp = await self._core.create_namespaced_service_account_token(
            pod["spec"].get("serviceAccountName") or "default", meta["namespace"], body
        )
        kubeconfig = yaml.safe_load(self._kubeconfig.read_text())
        current = next(
            c["context"]
            for c in kubeconfig["contexts"]
            if c["name"] == kubeconfig["current-context"]
        )
        kubeconfig["users"] = [{"name": current["user"], "user": {"token": resp.status.token}}]
        path = workdir / "kubeconfig"
        path.write_text(yaml.safe_dump(kubeconfig))
        path.chmod(0o600)
        return path

    async def _env(self, pod: Json, container: Json) -> dict[str, str]:
        ns = pod["metadata"]["namespace"]
        env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
        env["HOSTNAME"] = pod["metadata"]["name"]  # as in a container; often a worker id
        env.update(self._extra_env)
        for source in container.get("envFrom", []):
            optional = (source.get("secretRef") or source.get("configMapRef") or {}).get(
                "optional", False
            )
            if "secretRef" in source:
                data = await self._secret_data(ns, source["secretRef"]["name"], optional)
            else:
                data = await self._configmap_data(ns, source["configMapRef"]["name"], optional)
            prefix = source.get("prefix", "")
            env.update({prefix + k: v for k, v in data.items()})
        for var in container.get("env", []):
            name, value_from = var["name"], var.get("valueFrom")
            if value_from is None:
                env[name] = expand_refs(var.get("value", ""), env)
                continue
            if "fieldRef" in value_from:
                env[name] = _field_value(pod, value_from["fieldRef"]["fieldPath"])
                continue
            ref = value_from.get("secretKeyRef") or value_from.get("configMapKeyRef")
            if ref is None:
                raise PodConfigError(f"unsupported valueFrom for env {name}: {value_from}")
            optional = bool(ref.get("optional", False))
            if "secretKeyRef" in value_from:
                data = await self._secret_data(ns, ref["name"], optional)
            else:
                data = await self._configmap_data(ns, ref["name"], optional)
            if ref["key"] in data:
                env[name] = data[ref["key"]]
            elif not optional:
                raise PodConfigError(f"key {ref['key']!r} not in {ref['name']} (env {name})")
        return env

    async def _secret_data(self, ns: str, name: str, optional: bool) -> dict[str, str]:
        secret = await self._read_optional(self._core.read_namespaced_secret, ns, name, optional)
        data = (secret.data if secret else None) or {}
        return {k: base64.b64decode(v).decode() for k, v in data.items()}

    async def _configmap_data(self, ns: str, name: str, optional: bool) -> dict[str, str]:
        cm = await self._read_optional(self._core.read_namespaced_config_map, ns, name, optional)
        return dict((cm.data if cm else None) or {})

    @staticmethod
    async def _read_optional(read: Any, ns: str, name: str, optional: bool) -> Any:
        try:
            return await read(name, ns)
        except ApiException as exc:
            if exc.status == 404 and optional:
                return None
            if exc.status == 404:
                raise PodConfigError(f"{ns}/{name} not found") from exc
            raise

    async def _set_status(
        self,
        pod: Json,
        container: Json,
        started: str,
        exit_code: int | None = None,
        message: str = "",
    ) -> None:
        """Patch pods/status to Running (``exit_code`` None) or to a terminal phase."""
        running = exit_code is None
        ready = "True" if running else "False"
        if running:
            state: Json = {"running": {"startedAt": started}, "terminated": None}
            phase = "Running"
        else:
            state = {
                "running": None,
                "terminated": {
                    "exitCode": exit_code,
                    "reason": "Completed" if exit_code == 0 else "Error",
                    "message": message or None,
                    "startedAt": started,
                    "finishedAt": _now(),
                },
            }
            phase = "Succeeded" if exit_code == 0 else "Failed"
        body = {
            "status": {
                "phase": phase,
                "startTime": started,
                "conditions": [
                    {"type": t, "status": ready, "lastTransitionTime": _now()}
                    for t in ("Ready", "ContainersReady")
                ],
                "containerStatuses": [
                    {
                        "name": container["name"],
                        "image": container.get("image", ""),
                        "imageID": "",
                        "ready": running,
                        "started": running,
                        "restartCount": 0,
                        "state": state,
                    }
                ],
            }
        }
        meta = pod["metadata"]
        try:
            await self._core.patch_namespaced_pod_status(meta["name"], meta["namespace"], body)
        except ApiException as exc:
            if exc.status != 404:  # 404: the Pod was deleted meanwhile; nothing to report
                raise
