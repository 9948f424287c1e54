"""Running one bound Pod as a local process, the way a kubelet runs its container.

The Pod's ServiceAccount gets a token from the TokenRequest API, bound to the Pod, handed to
the process as ``KUBECONFIG`` (the stand-in for the projected token), so RBAC applies to the
workload exactly as in a cluster. The first container's ``command`` + ``args`` run in a
fresh per-Pod working directory with ``env``/``envFrom`` resolved (values, fieldRefs, Secret
and ConfigMap keys), ``$(VAR)`` references expanded and ``HOSTNAME`` set to the Pod name;
phase Running, then Succeeded/Failed with the exit code (a death by signal N as 128 + N,
as container runtimes report it; 137 for SIGKILL), is reported through pods/status, with
the log's tail as the termination message of a failed container whose
``terminationMessagePolicy`` is ``FallbackToLogsOnError``, as a kubelet does.

In process mode (the default) images are not run, so the command's first word is mapped
onto this machine: ``kubemr`` becomes the console script of the current venv and
``python``/``python3`` the current interpreter; anything else is looked up on ``PATH``.
In container mode (a :class:`~.podman.Podman` given) the image runs with podman, the token
is mounted where in-cluster clients read it, and the limits and security settings hold
(see :mod:`.podman`); a kill by the memory cgroup is reported as ``OOMKilled``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import anyio
import yaml

from kubemr_async.kube import (
    CONFIG_MAPS,
    PODS,
    SECRETS,
    SERVICE_ACCOUNTS,
    STRATEGIC_MERGE_PATCH,
    Backoff,
    Kube,
    KubeApiError,
    KubeObject,
    NotFound,
    Resource,
)
from kubemr_async.spec import EKS_ROLE_ARN
from kubemr_async.testing import TestEnvError, utc_now
from kubemr_async.testing.podman import (
    OOM_KILLED,
    ContainerConfigError,
    OomWatch,
    Podman,
    run_argv,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


async def until_answered(call: Callable[[], Awaitable[T]], what: str) -> T:
    """``call()``, sent again while the API server does not answer (it is restarting), as
    a kubelet keeps trying to report a Pod's status: what the Pod did must not be lost."""
    backoff = Backoff()
    while True:
        await backoff.wait()
        try:
            return await call()
        except KubeApiError as exc:
            if not exc.transient:
                raise
            log.warning("%s: %s; trying again in %.1fs", what, exc, backoff.delay)

_TOKEN_SECONDS = 24 * 3600  # outlives any test or benchmark run; nothing rotates it
#: Cap on terminationGracePeriodSeconds; tests should not wait 30 s.
KILL_GRACE_MAX = 10.0
#: Where a Pod's API traffic goes: a server URL for this Pod, or None (the cluster's own).
ApiRoute = Callable[[KubeObject], str | None]
_PYTHON = re.compile(r"python(3(\.\d+)?)?")
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class PodConfigError(Exception):
    """The Pod cannot be run locally (missing Secret key, no command, ...)."""


@dataclass
class PodRun:
    """Bookkeeping for one Pod we took on."""

    proc: asyncio.subprocess.Process | None = None
    grace: float = KILL_GRACE_MAX
    killed: bool = False
    containers: tuple[str, ...] = ()
    log_path: Path | None = None
    #: The log file holds this run's output: the process started, or starting it failed.
    log_ready: bool = False
    #: Set once the process has exited (or will never run): ends follow=true streams.
    done: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set once the Pod is finished with: its final status reported (or never to be).
    ended: asyncio.Event = field(default_factory=asyncio.Event)


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


def _field_value(pod: KubeObject, path: str) -> str:
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


#: What a kubelet keeps of a failed container's log as its termination message under
#: ``terminationMessagePolicy: FallbackToLogsOnError``: the tail, at most this much.
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048


def log_tail(path: Path) -> str:
    """The termination message a kubelet makes of a failed container's log: its last
    ``FALLBACK_LOG_LINES`` lines, within ``FALLBACK_LOG_BYTES``."""
    with path.open("rb") as log_file:
        log_file.seek(0, os.SEEK_END)
        log_file.seek(max(0, log_file.tell() - FALLBACK_LOG_BYTES))
        tail = log_file.read()
    lines = tail.decode(errors="replace").splitlines()[-FALLBACK_LOG_LINES:]
    return "\n".join(lines)


async def kill(run: PodRun) -> None:
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


class PodRunner:
    """Runs Pods bound to our Node; output goes to ``<root>/<namespace>/<pod>.log``.

    ``kube`` carries the kubelet's (admin-like) credentials: it mints tokens, reads
    Secrets and ConfigMaps and writes Pod status on the workloads' behalf.
    """

    def __init__(self, kube: Kube, kubeconfig: Path, root: Path,
                 extra_env: Mapping[str, str],
                 identities: Mapping[str, Mapping[str, str]] | None = None,
                 podman: Podman | None = None,
                 api_routes: Sequence[ApiRoute] = ()) -> None:
        """``identities`` (held, not copied: a test may add to it) stands in for a cloud's
        workload-identity webhook: a Pod whose ServiceAccount is annotated
        ``eks.amazonaws.com/role-arn: <arn>`` gets ``identities[arn]`` (that role's
        credentials) as its ambient environment. With ``podman``, Pods run as containers
        from their images (container mode). ``api_routes`` (held, not copied: a test may
        add to it) may send a process-mode Pod's API traffic elsewhere: the first route
        that returns a URL for the Pod is its kubeconfig's server (a proxy a test can
        cut, say)."""
        self._api_routes = api_routes
        self._kube = kube
        self._kubeconfig = kubeconfig
        self._root = root
        self._extra_env = dict(extra_env)
        self._identities = identities if identities is not None else {}
        self._podman = podman

    async def run(self, pod: KubeObject, run: PodRun) -> None:
        """Start the Pod's process, report Running, wait for it, report how it ended."""
        meta = pod["metadata"]
        ns, name = meta["namespace"], meta["name"]
        container = pod["spec"]["containers"][0]
        log_path = run.log_path = self._root / ns / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        workdir = self._root / ".work" / ns / name  # "." keeps it apart from namespaces
        workdir.mkdir(parents=True, exist_ok=True)
        started = utc_now()
        cname = f"kubemr-pod-{meta['uid']}"  # the container's, in container mode
        watch: OomWatch | None = None
        try:
            if self._podman is None:
                argv, env = await self._process(pod, container, workdir)
            else:  # created first, so its memory cgroup can be watched from the start
                create, env = await self._container(pod, container, workdir, cname,
                                                   self._podman)
                cid = (await self._podman.output(*create, env=env)).strip()
                watch = OomWatch(cid) if OomWatch.supported() else None
                argv, env = ["podman", "start", "--attach", cid], self._podman.env()
            with log_path.open("wb") as out:
                run.proc = await asyncio.create_subprocess_exec(
                    *argv,
                    env=env,
                    cwd=workdir,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,  # own process group, so kill reaches children
                )
            run.log_ready = True
        except (PodConfigError, ContainerConfigError, TestEnvError, KubeApiError,
                OSError) as exc:
            message = f"FakeKubelet could not start {ns}/{name}: {exc}"
            log.warning("%s", message)
            log_path.write_text(message + "\n")
            run.log_ready = True
            if self._podman is not None:
                await self._podman.remove(cname)
                if watch is not None:
                    await watch.close()
            await self._set_status(pod, container, started, exit_code=128, message=message)
            return
        oom = False
        try:
            if run.killed:  # deleted while we were setting up
                await kill(run)
            await self._set_status(pod, container, started)
            code = await run.proc.wait()
            run.done.set()  # before the status call: log streams need not wait for it
            # A signal death is reported the way container runtimes do: 128 + signal number.
            code = code if code >= 0 else 128 - code
            if self._podman is not None:
                state = await self._podman.state(cname)
                if state is not None:  # else podman failed before starting it: its code
                    code, oom = state
        finally:
            if self._podman is not None:
                with anyio.CancelScope(shield=True):
                    await self._podman.remove(cname)
                    if watch is not None:
                        oom = await watch.close() or oom
        message = ""
        if code and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = log_tail(log_path)
        await self._set_status(pod, container, started, exit_code=code, message=message,
                               reason=OOM_KILLED if oom else None)

    async def _process(self, pod: KubeObject, container: KubeObject,
                       workdir: Path) -> tuple[list[str], dict[str, str]]:
        """Process mode: the argv on this machine and its environment (token as KUBECONFIG)."""
        kubeconfig = await self._pod_kubeconfig(pod, workdir)
        env = await self._env(pod, container, self._host_env())
        env["KUBECONFIG"] = str(kubeconfig)
        argv = [expand_refs(a, env) for a in container.get("command", [])]
        argv += [expand_refs(a, env) for a in container.get("args", [])]
        if not argv:
            raise PodConfigError("container has no command; process mode cannot use images")
        return local_argv(argv), env

    async def _container(self, pod: KubeObject, container: KubeObject, workdir: Path,
                         name: str, podman: Podman) -> tuple[list[str], dict[str, str]]:
        """Container mode: the ``podman create`` arguments and the container's environment,
        which podman takes from its own (see :func:`.podman.run_argv`)."""
        meta = pod["metadata"]
        ctx = {**(pod["spec"].get("securityContext") or {}),
               **(container.get("securityContext") or {})}
        if ctx.get("runAsNonRoot") and "runAsUser" not in ctx:
            user = (await podman.image_user(container["image"])).partition(":")[0]
            if not user.isdigit() or user == "0":  # as the kubelet: it must be verifiable
                raise PodConfigError(f"container has runAsNonRoot and image "
                                     f"{container['image']} has user {user or 'root'!r}")
        accounts = workdir / "serviceaccount"
        accounts.mkdir(exist_ok=True)
        kubeconfig = yaml.safe_load(self._kubeconfig.read_text())
        context = next(c["context"] for c in kubeconfig["contexts"]
                       if c["name"] == kubeconfig["current-context"])
        cluster = next(c["cluster"] for c in kubeconfig["clusters"]
                       if c["name"] == context["cluster"])
        files = {"token": (await self._token(pod)).encode(),
                 "namespace": meta["namespace"].encode(),
                 "ca.crt": base64.b64decode(cluster["certificate-authority-data"])}
        for file, data in files.items():  # readable by any uid, as the kubelet's default mode
            (accounts / file).write_bytes(data)
            (accounts / file).chmod(0o644)
        env = await self._env(pod, container, {})
        server = urlsplit(cluster["server"])
        env["KUBERNETES_SERVICE_HOST"] = server.hostname or "127.0.0.1"
        env["KUBERNETES_SERVICE_PORT"] = str(server.port or 443)
        command = [expand_refs(a, env) for a in container.get("command", [])]
        args = [expand_refs(a, env) for a in container.get("args", [])]
        argv = run_argv(pod, container, env, name=name, command=command, args=args,
                        volumes_dir=workdir / "volumes", service_account_dir=accounts)
        return argv, env

    @staticmethod
    def _host_env() -> dict[str, str]:
        """What a process-mode Pod inherits from us: enough to find programs and a home."""
        return {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}

    async def _pod_kubeconfig(self, pod: KubeObject, workdir: Path) -> Path:
        """Admin kubeconfig with the user swapped for a token bound to this Pod."""
        kubeconfig = yaml.safe_load(self._kubeconfig.read_text())
        current = next(
            c["context"]
            for c in kubeconfig["contexts"]
            if c["name"] == kubeconfig["current-context"]
        )
        kubeconfig["users"] = [{"name": current["user"], "user": {"token": await self._token(pod)}}]
        server = next((url for route in self._api_routes if (url := route(pod))), None)
        if server is not None:
            kubeconfig["clusters"] = [{**c, "cluster": {**c["cluster"], "server": server}}
                                      for c in kubeconfig["clusters"]]
        path = workdir / "kubeconfig"
        path.write_text(yaml.safe_dump(kubeconfig))
        path.chmod(0o600)
        return path

    async def _token(self, pod: KubeObject) -> str:
        """A token for the Pod's ServiceAccount from the TokenRequest API, bound to the Pod."""
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
        account = pod["spec"].get("serviceAccountName") or "default"
        context = f"requesting a token for ServiceAccount {meta['namespace']}/{account}"
        minted = await until_answered(lambda: self._kube.request(
            "POST", SERVICE_ACCOUNTS.path(meta["namespace"], account, "token"), body=body,
            context=context), context)
        return str(minted["status"]["token"])

    async def _env(self, pod: KubeObject, container: KubeObject,
                   base: Mapping[str, str]) -> dict[str, str]:
        """The container's environment over ``base``: ``extra_env``, then its own."""
        ns = pod["metadata"]["namespace"]
        env = dict(base)
        env["HOSTNAME"] = pod["metadata"]["name"]  # as in a container; often a worker id
        env.update(self._extra_env)
        env.update(await self._identity_env(pod))
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

    async def _identity_env(self, pod: KubeObject) -> Mapping[str, str]:
        """The ambient credentials of the role the Pod's ServiceAccount names, if any."""
        if not self._identities:
            return {}
        account = pod["spec"].get("serviceAccountName") or "default"
        found = await self._kube.find(SERVICE_ACCOUNTS, account, pod["metadata"]["namespace"])
        annotations = ((found or {}).get("metadata") or {}).get("annotations") or {}
        return self._identities.get(annotations.get(EKS_ROLE_ARN, ""), {})

    async def _secret_data(self, ns: str, name: str, optional: bool) -> dict[str, str]:
        data = await self._data(SECRETS, ns, name, optional)
        return {k: base64.b64decode(v).decode() for k, v in data.items()}

    async def _configmap_data(self, ns: str, name: str, optional: bool) -> dict[str, str]:
        return await self._data(CONFIG_MAPS, ns, name, optional)

    async def _data(self, resource: Resource, ns: str, name: str,
                    optional: bool) -> dict[str, str]:
        """The ``data`` of a Secret or ConfigMap ({} if it is missing but ``optional``)."""
        obj = await self._kube.find(resource, name, ns)
        if obj is None and not optional:
            raise PodConfigError(f"{resource.kind} {ns}/{name} not found")
        return dict((obj or {}).get("data") or {})

    async def _set_status(
        self,
        pod: KubeObject,
        container: KubeObject,
        started: str,
        exit_code: int | None = None,
        message: str = "",
        reason: str | None = None,
    ) -> None:
        """Patch pods/status to Running (``exit_code`` None) or to a terminal phase;
        ``reason`` overrides the terminated state's Completed/Error (``OOMKilled``)."""
        running = exit_code is None
        ready = "True" if running else "False"
        if running:
            state: KubeObject = {"running": {"startedAt": started}, "terminated": None}
            phase = "Running"
        else:
            state = {
                "running": None,
                "terminated": {
                    "exitCode": exit_code,
                    "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                    "message": message or None,
                    "startedAt": started,
                    "finishedAt": utc_now(),
                },
            }
            phase = "Succeeded" if exit_code == 0 else "Failed"
        body = {
            "status": {
                "phase": phase,
                "startTime": started,
                "conditions": [
                    {"type": t, "status": ready, "lastTransitionTime": utc_now()}
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
        # Strategic merge, as a kubelet patches: conditions merge by type (PodScheduled stays).
        with contextlib.suppress(NotFound):  # the Pod was deleted meanwhile: nothing to report
            await until_answered(lambda: self._kube.patch(
                PODS, meta["name"], body, meta["namespace"], subresource="status",
                content_type=STRATEGIC_MERGE_PATCH), f"reporting the status of Pod {meta['name']}")
