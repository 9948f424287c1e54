"""A Pod's container as a real container: the test kubelet's container mode, with podman.

Process mode (:mod:`.podrunner`) maps a container's command onto this machine and ignores
images, security settings and limits. Container mode runs the image itself, so what a
cluster enforces is enforced here too: ``securityContext`` (user, ``runAsNonRoot``,
read-only root filesystem, dropped capabilities, no privilege escalation), memory and CPU
limits (the memory cgroup kills the container: ``OOMKilled``), and only the volumes the Pod
declares (``emptyDir``; the ServiceAccount token where in-cluster clients look for it).

podman runs with the project's own configuration (``hack/ensure-container-tools.sh``) and
host networking, so the API server and the S3 server on loopback are reachable from inside
as ``KUBERNETES_SERVICE_HOST:PORT`` and the endpoint the test gave. Images are local only
(``--pull=never``): ``hack/build-images.sh`` builds them from the repository's Dockerfiles.

Out of memory: podman 4.3 with runc on a cgroup v1 host reports ``OOMKilled: false`` for a
container the memory cgroup killed, and the v1 ``oom_kill`` counter stays 0 on this kernel.
So the kubelet asks the memory cgroup itself, as container runtimes do on v1: the container
is created (``podman create``), its cgroup made in advance under ``/kubemr-pods``, an eventfd
registered on its ``memory.oom_control`` (:class:`OomWatch`), and only then started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from kubemr_async.kube import KubeObject
from kubemr_async.testing import TestEnvError, log_tail, run_ensure_script

#: Where in-cluster clients read the ServiceAccount's token, CA and namespace.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
#: What the memory cgroup's kill is reported as, in the container's terminated state.
OOM_KILLED = "OOMKilled"
#: The cgroup (under each v1 hierarchy) that holds the Pods' containers.
CGROUP_PARENT = "/kubemr-pods"
_MEMORY_CGROUPS = Path("/sys/fs/cgroup/memory")
#: How long to wait for the cgroup's removal notice before judging (it is sent once).
_REMOVAL_WAIT = 5.0

_QUANTITY = re.compile(r"([0-9.]+)([a-zA-Z]*)")
_SUFFIX: dict[str, Decimal] = {
    "": Decimal(1), "m": Decimal("0.001"), "k": Decimal(10**3), "M": Decimal(10**6),
    "G": Decimal(10**9), "T": Decimal(10**12),
    "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40)}


class ContainerConfigError(Exception):
    """The Pod asks for something container mode cannot give (an unknown volume type...)."""


def quantity(text: str | int | float) -> Decimal:
    """A Kubernetes resource quantity (``512Mi``, ``500m``, ``1``) as a number."""
    m = _QUANTITY.fullmatch(str(text).strip())
    if m is None or m.group(2) not in _SUFFIX:
        raise ContainerConfigError(f"bad resource quantity {text!r}")
    return Decimal(m.group(1)) * _SUFFIX[m.group(2)]


def security_args(pod: KubeObject, container: KubeObject) -> list[str]:
    """podman flags for the container's ``securityContext`` (over the Pod's)."""
    ctx = {**(pod["spec"].get("securityContext") or {}), **(container.get("securityContext") or {})}
    args: list[str] = []
    if "runAsUser" in ctx:
        user = str(ctx["runAsUser"])
        args += ["--user", f"{user}:{ctx['runAsGroup']}" if "runAsGroup" in ctx else user]
    if ctx.get("readOnlyRootFilesystem"):
        # podman would add its own writable /tmp, /var/tmp and /run; Kubernetes does not.
        args += ["--read-only", "--read-only-tmpfs=false"]
    if ctx.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    if ctx.get("privileged"):
        args += ["--privileged"]
    caps = ctx.get("capabilities") or {}
    args += [f"--cap-drop={c.lower()}" for c in caps.get("drop") or []]
    args += [f"--cap-add={c.lower()}" for c in caps.get("add") or []]
    return args


def limit_args(container: KubeObject) -> list[str]:
    """podman flags for ``resources.limits``: memory (no swap beyond it) and CPU."""
    limits = (container.get("resources") or {}).get("limits") or {}
    args: list[str] = []
    if "memory" in limits:
        memory = int(quantity(limits["memory"]))
        args += [f"--memory={memory}", f"--memory-swap={memory}"]
    if "cpu" in limits:
        args += [f"--cpus={quantity(limits['cpu'])}"]
    return args


def volume_args(pod: KubeObject, container: KubeObject, volumes_dir: Path,
                service_account_dir: Path) -> list[str]:
    """Bind mounts for the container's ``volumeMounts``: ``emptyDir`` (a fresh directory,
    world-writable as the kubelet makes it, or tmpfs for ``medium: Memory``) and the
    projected ServiceAccount token; the token also goes to its usual place when the Pod
    automounts it and declares no volume for it (no ServiceAccount admission plugin)."""
    declared = {v["name"]: v for v in pod["spec"].get("volumes") or []}
    args: list[str] = []
    token_mounted = False
    for mount in container.get("volumeMounts") or []:
        volume = declared.get(mount["name"])
        if volume is None:
            raise ContainerConfigError(f"volumeMount {mount['name']!r} names no volume")
        ro = ",ro" if mount.get("readOnly") else ""
        target = mount["mountPath"]
        if "emptyDir" in volume:
            if (volume["emptyDir"] or {}).get("medium") == "Memory":
                args += ["--mount", f"type=tmpfs,destination={target}"]
                continue
            source = volumes_dir / volume["name"]
            source.mkdir(parents=True, exist_ok=True)
            source.chmod(0o777)
            args += ["--mount", f"type=bind,source={source},destination={target}{ro}"]
        elif any("serviceAccountToken" in s for s in (volume.get("projected") or {})
                 .get("sources") or []):
            token_mounted = True
            args += ["--mount",
                     f"type=bind,source={service_account_dir},destination={target},ro"]
        else:
            raise ContainerConfigError(
                f"volume {volume['name']!r}: only emptyDir and the ServiceAccount token "
                f"are supported in container mode")
    if not token_mounted and pod["spec"].get("automountServiceAccountToken", True):
        args += ["--mount",
                 f"type=bind,source={service_account_dir},destination={SERVICE_ACCOUNT_DIR},ro"]
    return args


def run_argv(pod: KubeObject, container: KubeObject, env: Mapping[str, str], *,
             name: str, command: list[str], args: list[str], volumes_dir: Path,
             service_account_dir: Path) -> list[str]:
    """The ``podman create`` argv for a Pod's container (``command``/``args`` already have
    their ``$(VAR)`` references expanded). Environment values are not on the command line
    (Secrets would show in the process list): ``-e NAME`` takes each from podman's own
    environment, which the caller sets to ``env``."""
    argv = ["create", "--name", name, "--pull=never", "--network=host",
            f"--cgroup-parent={CGROUP_PARENT}",
            "--hostname", pod["metadata"]["name"], "--stop-timeout",
            str(int(pod["spec"].get("terminationGracePeriodSeconds", 30)))]
    argv += security_args(pod, container)
    argv += limit_args(container)
    argv += volume_args(pod, container, volumes_dir, service_account_dir)
    for key in env:
        argv += ["-e", key]
    if container.get("workingDir"):
        argv += ["--workdir", container["workingDir"]]
    if command:  # command replaces the image's ENTRYPOINT, args its CMD
        argv += ["--entrypoint", json.dumps(command)]
    return [*argv, container["image"], *args]


@dataclass(frozen=True)
class Podman:
    """podman with the project's configuration from ``hack/ensure-container-tools.sh``."""

    conf_dir: Path

    @classmethod
    def ensure(cls) -> Podman:
        """Install and configure podman (cached after the first run)."""
        return cls(Path(run_ensure_script("ensure-container-tools.sh")))

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment for a podman command: its configuration files and ``extra``."""
        return {**(extra or {}), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "CONTAINERS_CONF": str(self.conf_dir / "containers.conf"),
                "CONTAINERS_STORAGE_CONF": str(self.conf_dir / "storage.conf")}

    def build_images(self) -> tuple[str, str]:
        """Build (or reuse) the project image and the examples image; their names.

        ``KUBEMR_IMAGES`` ("<project> <examples>", set by scripts/test once it has built
        them) skips the build, which takes half a minute even when every layer is cached.
        """
        if built := os.environ.get("KUBEMR_IMAGES"):
            project, examples = built.split()
            return project, examples
        if pending := os.environ.get("KUBEMR_IMAGES_BUILD"):
            return _built_in_background(Path(pending))
        conf = {k: v for k, v in self.env().items() if k != "PATH"}
        project, examples = run_ensure_script("build-images.sh", env=conf).split()
        return project, examples

    async def image_user(self, image: str) -> str:
        """The image's ``USER`` ("" when it runs as root by default)."""
        out = await self.output("image", "inspect", "--format", "{{.Config.User}}", image)
        return out.strip()

    async def state(self, name: str) -> tuple[int, bool] | None:
        """A finished container's exit code and whether the memory cgroup killed it."""
        try:
            out = await self.output("inspect", "--format",
                                    "{{.State.ExitCode}} {{.State.OOMKilled}}", name)
        except TestEnvError:
            return None  # never created
        code, oom = out.split()
        return int(code), oom == "true"

    async def remove(self, name: str) -> None:
        """Remove the container, killing it first if it still runs."""
        proc = await asyncio.create_subprocess_exec(
            "podman", "rm", "--force", "--time", "0", "--ignore", name, env=self.env(),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await proc.wait()

    async def output(self, *args: str, env: Mapping[str, str] | None = None) -> str:
        """Run ``podman args...`` (``env`` added to its environment) and return its stdout;
        TestEnvError when it fails."""
        proc = await asyncio.create_subprocess_exec(
            "podman", *args, env=self.env(env), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise TestEnvError(f"podman {' '.join(args)} failed: {err.decode().strip()}")
        return out.decode()


class OomWatch:
    """Whether the memory cgroup of a container killed it (cgroup v1 OOM notification).

    An eventfd registered on ``memory.oom_control`` is signalled once per OOM in that
    cgroup and once more when the cgroup is removed (the notice that the event is gone).
    The removal notice comes after the container ended; so a signal seen while the cgroup
    still exists, or more than one signal in all, means an OOM kill.
    """

    def __init__(self, container_id: str) -> None:
        """Make the container's memory cgroup (runc uses the one it finds) and watch it."""
        self._cgroup = _MEMORY_CGROUPS / CGROUP_PARENT.strip("/") / f"libpod-{container_id}"
        self._cgroup.mkdir(parents=True, exist_ok=True)
        self.killed = False
        self._signals = 0
        self._removed = asyncio.Event()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._control = os.open(self._cgroup / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        (self._cgroup / "cgroup.event_control").write_text(f"{self._efd} {self._control}")
        asyncio.get_running_loop().add_reader(self._efd, self._on_signal)

    def _on_signal(self) -> None:
        try:
            count = os.eventfd_read(self._efd)
        except BlockingIOError:
            return
        self._signals += count
        if self._cgroup.exists() or self._signals > 1:
            self.killed = True
        if not self._cgroup.exists():
            self._removed.set()

    async def close(self) -> bool:
        """Once the container is removed: stop watching; whether an OOM killed it."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._removed.wait(), _REMOVAL_WAIT)
        asyncio.get_running_loop().remove_reader(self._efd)
        os.close(self._efd)
        os.close(self._control)
        with contextlib.suppress(OSError):  # runc removes it; a container never started not
            self._cgroup.rmdir()
        return self.killed

    @staticmethod
    def supported() -> bool:
        """A cgroup v1 memory hierarchy to watch (on v2 podman's own OOMKilled holds)."""
        return (_MEMORY_CGROUPS / "cgroup.event_control").exists()


#: The longest the container tests wait for scripts/test's background image build.
_BUILD_WAIT = 45 * 60.0


def _built_in_background(report: Path) -> tuple[str, str]:
    """The images scripts/test is building in the background (``KUBEMR_IMAGES_BUILD``):
    wait until ``build-images.sh`` has written its exit code beside its output."""
    deadline = time.monotonic() + _BUILD_WAIT
    while not (report / "rc").exists():
        if time.monotonic() > deadline:
            raise TestEnvError(f"the image build in {report} did not finish in "
                               f"{_BUILD_WAIT / 60:.0f} minutes")
        time.sleep(1.0)
    code = (report / "rc").read_text().strip()
    if code != "0":
        raise TestEnvError(f"hack/build-images.sh exited with {code}; log tail:\n"
                           + log_tail(report / "log"))
    project, examples = (report / "out").read_text().split()[-2:]
    return project, examples
