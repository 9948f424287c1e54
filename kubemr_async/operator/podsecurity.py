"""The Pod Security Standards, checked on a worker pod before the operator creates it.

The operator creates worker pods with its own rights, from a template the job may overlay.
Without a check, a tenant who may create MapReduceJobs but not privileged pods would get
them through the operator (a confused deputy), unless the namespace happens to enforce Pod
Security Admission. So the merged pod is held to a profile here, whatever the namespace
enforces: ``restricted`` unless the platform allows ``baseline`` or ``privileged`` for the
namespace (:mod:`.tenancy`). The rules are the Kubernetes Pod Security Standards
(https://kubernetes.io/docs/concepts/security/pod-security-standards/), each reported with
the field of the job's ``spec.template`` that breaks it. Pure: no I/O.

Some things no level allows, since the operator's guarantees rest on them: the overlay may
not choose the pod's ServiceAccount or its token's automount, nor the worker container's
image or command (:func:`overlay_violations`; the CRD's CEL rules refuse the same at
admission).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

from ..spec import TEMPLATE_IDENTITY_FIELDS, TEMPLATE_WORKER_FIELDS

Level = Literal["privileged", "baseline", "restricted"]
LEVELS: tuple[Level, ...] = ("privileged", "baseline", "restricted")
#: Where the job's overlay is, so each violation names the field the tenant wrote.
TEMPLATE = "spec.template.spec"

_BASELINE_CAPABILITIES = frozenset({
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"})
_SAFE_SYSCTLS = frozenset({
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"})
_SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t",
                            "container_engine_t"})
_RESTRICTED_VOLUMES = frozenset({"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                                 "persistentVolumeClaim", "projected", "secret"})
_CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")
WORKER = "worker"

Violation = tuple[str, str]  # (field, what is wrong)


def check(pod: Mapping[str, Any], level: Level) -> list[Violation]:
    """Every way the pod (``{"metadata": ..., "spec": ...}``) breaks ``level``."""
    if level == "privileged":
        return []
    found = list(_baseline(pod))
    if level == "restricted":
        found += _restricted(pod.get("spec") or {})
    return found


def overlay_violations(template: Mapping[str, Any]) -> list[Violation]:
    """What a job's ``spec.template`` sets that no namespace may: the identity fields and
    the worker container's image, command and args."""
    spec = template.get("spec") or {}
    found = [(f"{TEMPLATE}.{field}", "cannot be set: workers run as the job's own "
              "ServiceAccount, made by the operator") for field in TEMPLATE_IDENTITY_FIELDS
             if field in spec]
    for container in spec.get("containers") or []:
        if container.get("name", WORKER) == WORKER:
            found += [(f"{TEMPLATE}.containers[{WORKER}].{field}",
                       "cannot be set: the image is spec.image, the command is kubemr's")
                      for field in TEMPLATE_WORKER_FIELDS if field in container]
    return found


def describe(violations: list[Violation], level: Level) -> str:
    """One line naming every violation, for the job's status and its Event."""
    return f"Pod Security {level!r} forbids " + "; ".join(
        f"{field}: {problem}" for field, problem in violations)


def _containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(the field path of each container, the container)."""
    for kind in _CONTAINER_LISTS:
        for index, container in enumerate(spec.get(kind) or []):
            yield f"{TEMPLATE}.{kind}[{container.get('name', index)}]", container


def _baseline(pod: Mapping[str, Any]) -> Iterator[Violation]:
    spec = pod.get("spec") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            yield f"{TEMPLATE}.{field}", "must not be true"
    for volume in spec.get("volumes") or []:
        if "hostPath" in volume:
            yield f"{TEMPLATE}.volumes[{volume.get('name')}].hostPath", "is not allowed"
    pod_context = spec.get("securityContext") or {}
    yield from _context(f"{TEMPLATE}.securityContext", pod_context)
    for sysctl in pod_context.get("sysctls") or []:
        if sysctl.get("name") not in _SAFE_SYSCTLS:
            yield (f"{TEMPLATE}.securityContext.sysctls[{sysctl.get('name')}]",
                   "is not a safe sysctl")
    for key, value in ((pod.get("metadata") or {}).get("annotations") or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and \
                value not in ("runtime/default", "") and not value.startswith("localhost/"):
            yield f"spec.template.metadata.annotations[{key}]", "must not be unconfined"
    for path, container in _containers(spec):
        context = container.get("securityContext") or {}
        if context.get("privileged"):
            yield f"{path}.securityContext.privileged", "must not be true"
        added = set((context.get("capabilities") or {}).get("add") or []) - \
            _BASELINE_CAPABILITIES
        if added:
            yield (f"{path}.securityContext.capabilities.add",
                   f"must not add {', '.join(sorted(added))}")
        if context.get("procMount", "Default") != "Default":
            yield f"{path}.securityContext.procMount", "must be Default"
        yield from _context(f"{path}.securityContext", context)
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                yield f"{path}.ports[{port.get('containerPort')}].hostPort", "must not be set"


def _context(path: str, context: Mapping[str, Any]) -> Iterator[Violation]:
    """The rules a pod's and a container's securityContext share at baseline."""
    if (context.get("windowsOptions") or {}).get("hostProcess"):
        yield f"{path}.windowsOptions.hostProcess", "must not be true"
    if (context.get("seccompProfile") or {}).get("type") == "Unconfined":
        yield f"{path}.seccompProfile.type", "must not be Unconfined"
    if (context.get("appArmorProfile") or {}).get("type") == "Unconfined":
        yield f"{path}.appArmorProfile.type", "must not be Unconfined"
    selinux = context.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in _SELINUX_TYPES:
        yield f"{path}.seLinuxOptions.type", "is not an allowed container type"
    for field in ("user", "role"):
        if selinux.get(field):
            yield f"{path}.seLinuxOptions.{field}", "must not be set"


def _restricted(spec: Mapping[str, Any]) -> Iterator[Violation]:
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"} - _RESTRICTED_VOLUMES
        if kinds and "hostPath" not in kinds:  # hostPath: reported by baseline
            yield (f"{TEMPLATE}.volumes[{volume.get('name')}]",
                   f"volume type {', '.join(sorted(kinds))} is not allowed")
    pod_context = spec.get("securityContext") or {}
    if pod_context.get("runAsUser") == 0:
        yield f"{TEMPLATE}.securityContext.runAsUser", "must not be 0"
    if pod_context.get("runAsNonRoot") is False:
        yield f"{TEMPLATE}.securityContext.runAsNonRoot", "must be true"
    pod_seccomp = (pod_context.get("seccompProfile") or {}).get("type")
    for path, container in _containers(spec):
        context = container.get("securityContext") or {}
        if context.get("allowPrivilegeEscalation") is not False:
            yield f"{path}.securityContext.allowPrivilegeEscalation", "must be false"
        if context.get("runAsUser") == 0:
            yield f"{path}.securityContext.runAsUser", "must not be 0"
        non_root = context.get("runAsNonRoot", pod_context.get("runAsNonRoot"))
        if non_root is not True:
            yield f"{path}.securityContext.runAsNonRoot", "must be true"
        seccomp = (context.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            yield f"{path}.securityContext.seccompProfile.type", \
                "must be RuntimeDefault or Localhost"
        capabilities = context.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            yield f"{path}.securityContext.capabilities.drop", "must include ALL"
        added = set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}
        if added and not added - _BASELINE_CAPABILITIES:  # beyond baseline: reported there
            yield (f"{path}.securityContext.capabilities.add",
                   f"must not add {', '.join(sorted(added))}")
