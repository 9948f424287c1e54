"""A stand-in kubelet that runs Pods as local processes.

The test cluster has no nodes, container runtime or scheduler, but the project's Jobs and
workers must really run for end-to-end tests. ``FakeKubelet`` watches Pods and, for each
unscheduled Pending Pod, does what a kubelet would do in the ways that matter here:

* claims the Pod with an annotation, so several FakeKubelets can share a cluster;
* mints a token for the Pod's ServiceAccount with the TokenRequest API, bound to the Pod,
  and hands it to the process as ``KUBECONFIG`` (the stand-in for the projected token), so
  RBAC applies to the workload exactly as in a cluster;
* runs the first container's ``command`` + ``args`` in a fresh per-Pod working directory,
  with the container's ``env``/``envFrom`` resolved (values, fieldRefs, Secret and
  ConfigMap keys), ``$(VAR)`` references expanded and ``HOSTNAME`` set to the Pod name;
* reports phase Running, then Succeeded/Failed with the exit code, through pods/status;
* keeps the output (``logs()``), and kills the process group when the Pod is deleted.

Images cannot be run, so the command's first word is mapped onto this machine: ``kubemr``
becomes the console script of the current venv and ``python``/``python3`` the current
interpreter; anything else is looked up on ``PATH``. Pods are left unbound (no
``spec.nodeName``): binding would need a Node object kept alive with heartbeats, or the
pod-GC controller deletes the Pods. Unbound Pods are also deleted without a grace period,
so deleting a Job's Pods never waits for a kubelet acknowledgement. ``restartPolicy`` is
treated as ``Never``; volumes, probes and resources are ignored.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import yaml
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from kubemr_async.testing import TestEnvError

log = logging.getLogger(__name__)

#: Set on Pods a FakeKubelet runs; the value identifies which one.
CLAIM_ANNOTATION = "testing.kubemr.io/fake-kubelet"
_TOKEN_SECONDS = 24 * 3600  # outlives any test or benchmark run; nothing rotates it
_KILL_GRACE_MAX = 10.0  # cap on terminationGracePeriodSeconds; tests should not wait 30 s
_WATCH_SECONDS = 240  # relist this often, so a missed event cannot strand a Pod
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


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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


class FakeKubelet:
    """Runs unscheduled Pods (in ``namespace``, or all namespaces) as local processes.

    Call ``start()``/``stop()`` (or use it as a context manager) to run it on a background
    thread with its own event loop, which works from sync and async tests alike; or await
    ``run()`` as a task in your own loop. ``kubeconfig`` must carry admin-like credentials:
    it reads Secrets and writes Pod status on the workloads' behalf, like a kubelet.
    """

    def __init__(
        self,
        kubeconfig: Path,
        *,
        namespace: str | None = None,
        log_dir: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        """``extra_env`` is added to every Pod's environment (before the Pod's own env)."""
        self._kubeconfig = Path(kubeconfig)
        self._namespace = namespace
        self._own_root = log_dir is None
        self._root = (
            Path(tempfile.mkdtemp(prefix="kubemr-kubelet-")) if log_dir is None else log_dir
        )
        self._extra_env = dict(extra_env or {})
        self._runs: dict[str, _PodRun] = {}
        self._synced = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._core: Any = None
        self._api: Any = None
        self._id = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"

    # ---------------------------------------------------------------------- public API

    @property
    def log_dir(self) -> Path:
        """Per-Pod output files live at ``<log_dir>/<namespace>/<pod>.log``."""
        return self._root

    def logs(self, namespace: str, pod: str) -> str:
        """Combined stdout+stderr of a Pod's process, like ``kubectl logs``."""
        return (self._root / namespace / f"{pod}.log").read_text(errors="replace")

    def start(self) -> Self:
        """Run on a background thread; returns once the first Pod list is processed."""
        self._thread = threading.Thread(target=self._thread_main, name="FakeKubelet", daemon=True)
        self._thread.start()
        while not self._synced.wait(0.1):
            if not self._thread.is_alive():
                raise TestEnvError(f"FakeKubelet failed to start: {self._error!r}")
        return self

    def stop(self) -> None:
        """Stop watching and kill the processes still running. Idempotent."""
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
        """Watch and run Pods until cancelled; kills remaining processes on the way out."""
        cfg = client.Configuration()
        await config.load_kube_config(config_file=str(self._kubeconfig), client_configuration=cfg)
        async with client.ApiClient(cfg) as api:
            self._api, self._core = api, client.CoreV1Api(api)
            try:
                await self._watch_forever()
            finally:
                await asyncio.shield(self._kill_all())

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
        uid = pod["metadata"]["uid"]
        if event == "DELETED" or pod["metadata"].get("deletionTimestamp"):
            self._on_gone(uid)
            return
        if uid not in self._runs and self._wants(pod):
            run = _PodRun(
                grace=min(
                    float(pod["spec"].get("terminationGracePeriodSeconds", 30)), _KILL_GRACE_MAX
                )
            )
            self._runs[uid] = run
            run.task = asyncio.create_task(self._run_pod(pod, run))
            run.task.add_done_callback(_log_failure)

    def _wants(self, pod: Json) -> bool:
        """An unscheduled Pending Pod that no other FakeKubelet has claimed."""
        meta = pod["metadata"]
        return (
            not pod["spec"].get("nodeName")
            and not meta.get("deletionTimestamp")
            and pod.get("status", {}).get("phase", "Pending") == "Pending"
            and (meta.get("annotations") or {}).get(CLAIM_ANNOTATION, self._id) == self._id
        )

    async def _claim(self, pod: Json) -> bool:
        """Annotate the Pod as ours, conditional on its resourceVersion.

        Two FakeKubelets watching the same namespace (a session-wide one and a test's own,
        say) would otherwise both run the Pod; the precondition lets exactly one win.
        """
        meta = pod["metadata"]
        while True:
            patch = {
                "metadata": {
                    "annotations": {CLAIM_ANNOTATION: self._id},
                    "resourceVersion": meta["resourceVersion"],
                }
            }
            try:
                await self._core.patch_namespaced_pod(meta["name"], meta["namespace"], patch)
                return True
            except ApiException as exc:
                if exc.status == 404:
                    return False
                if exc.status != 409:
                    raise
            # Changed since we saw it (maybe by the Job controller): look again.
            fresh = await self._core.read_namespaced_pod(meta["name"], meta["namespace"])
            pod = self._api.sanitize_for_serialization(fresh)
            meta = pod["metadata"]
            if not self._wants(pod):
                return False

    def _on_gone(self, uid: str) -> None:
        run = self._runs.get(uid)
        if run is not None and not run.killed:
            run.killed = True
            kill = asyncio.create_task(self._kill(run))
            run.children.add(kill)
            kill.add_done_callback(run.children.discard)

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

    # ---------------------------------------------------------------------- one Pod

    async def _run_pod(self, pod: Json, run: _PodRun) -> None:
        meta = pod["metadata"]
        ns, name = meta["namespace"], meta["name"]
        container = pod["spec"]["containers"][0]
        if not await self._claim(pod):
            return
        log_path = self._root / ns / f"{name}.log"
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
        except (PodConfigError, ApiException, OSError) as exc:
            message = f"FakeKubelet could not start {ns}/{name}: {exc}"
            log.warning("%s", message)
            log_path.write_text(message + "\n")
            await self._set_status(pod, container, started, exit_code=128, message=message)
            return
        if run.killed:  # deleted while we were setting up
            await self._kill(run)
        await self._set_status(pod, container, started)
        code = await run.proc.wait()
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
