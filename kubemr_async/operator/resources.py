"""What the operator writes, as plain objects: pure builders, no API calls.

Every object a reconcile creates or patches (the workers' ServiceAccount, Roles and
RoleBindings, the Secret copy, the batch Job, Events, status and finalizer patches) is built
here from the MapReduceJob and the configuration, so each can be tested without a cluster
and :mod:`.reconcile` is left with the order of the calls and what their answers mean.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from datetime import UTC, datetime

from .. import metrics, protocol
from ..conditions import job_conditions
from ..crd import API_VERSION, GROUP, JOB_KIND, JOB_PLURAL, TASK_PLURAL
from ..deaths import STUCK_EXIT_CODE
from ..kube import KubeObject
from ..protocol import JobPhase
from ..records import JobError
from ..scrub import CREDENTIAL_KEYS
from ..spec import (
    AZURE_CLIENT_ID,
    DEFAULT_WORKERS,
    STANDBY_NAMESPACE_ENV,
    STANDBY_POD_ENV,
    WORKER_PROCESS_ENV,
    JobSpec,
)
from .config import OperatorConfig

FINALIZER = "kubemr.io/cleanup"
RBAC_API = "rbac.authorization.k8s.io"
# Reasons a pod can sit in Waiting forever; the Job controller never fails such pods.
STUCK_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                 "CreateContainerConfigError", "CreateContainerError"}
#: Worker pods whose deaths the Job controller does not count toward ``backoffLimit`` (it
#: replaces them): killed (SIGKILL, 137: a node's OOM killer or an operator's ``kill``;
#: SIGTERM, 143: the pod deleted, its node drained) or disrupted (DisruptionTarget:
#: evicted, preempted, its node gone). A killed worker's tasks are taken over after a
#: lease and the job carries on, so such deaths must not fail it; the operator fails a job
#: whose workers keep dying with no task committing instead (:mod:`.crashloop`). Nor a
#: worker that left because a timed-out attempt's user code would not stop
#: (``STUCK_EXIT_CODE``): it failed that attempt first, so ``maxAttempts`` bounds those.
POD_FAILURE_POLICY: KubeObject = {"rules": [
    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
    {"action": "Ignore", "onExitCodes": {"containerName": "worker", "operator": "In",
                                         # ascending, as the API server requires
                                         "values": [STUCK_EXIT_CODE, 137, 143]}},
]}
#: The keys a credentials Secret must hold (AWS_SESSION_TOKEN is optional).
REQUIRED_KEYS = CREDENTIAL_KEYS[:2]
#: Azure's webhook acts only on pods labelled so; its annotation on the account is not
#: enough.
AZURE_USE_LABEL = "azure.workload.identity/use"
#: On a job's batch Job: the warm pool's pod adopted as one of its workers.
STANDBY_ANNOTATION = "kubemr.io/standby"


def now() -> str:
    """The current time as the API's timestamps are written (seconds, UTC, ``Z``)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def job_key(mrj: KubeObject) -> tuple[str, str]:
    """(namespace, name) of a MapReduceJob: the key the operator's queue and maps use."""
    meta = mrj["metadata"]
    return meta["namespace"], meta["name"]


# --- the workers' identity and objects ------------------------------------------------


def owner_reference(mrj: KubeObject) -> KubeObject:
    """Makes the MapReduceJob the controller of an object: deleting it collects the object."""
    meta = mrj["metadata"]
    return {"apiVersion": API_VERSION, "kind": JOB_KIND, "name": meta["name"],
            "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}


def worker_labels(name: str) -> dict[str, str]:
    """Labels of everything made for job ``name``'s workers (pods included)."""
    return {"app.kubernetes.io/name": "kubemr-async", "app.kubernetes.io/component": "worker",
            "kubemr.io/job": name}


def worker_names(name: str) -> tuple[str, str]:
    """(service account / role name, batch Job name) for a MapReduceJob."""
    return f"kubemr-worker-{name}"[:63].rstrip("-"), f"{name}-workers"[:63].rstrip("-")


def secret_copy_name(name: str) -> str:
    """The name of job ``name``'s copy of the S3 Secret (beside its pods)."""
    return f"{name}-s3"[:63].rstrip("-")


def _worker_meta(mrj: KubeObject, namespace: str, owned: bool = True) -> KubeObject:
    name = mrj["metadata"]["name"]
    meta: KubeObject = {"name": worker_names(name)[0], "namespace": namespace,
                        "labels": worker_labels(name)}
    if owned:
        meta["ownerReferences"] = [owner_reference(mrj)]
    return meta


def service_account(mrj: KubeObject, annotations: Mapping[str, str] | None = None
                    ) -> KubeObject:
    """The workers' ServiceAccount, beside the job and owned by it; ``annotations``: the
    job's workload identity (allow-listed by spec.IDENTITY_ANNOTATIONS), which a cloud's
    webhook turns into the pods' ambient credentials."""
    meta = _worker_meta(mrj, mrj["metadata"]["namespace"])
    if annotations:
        meta["annotations"] = dict(annotations)
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}


def job_role(mrj: KubeObject) -> KubeObject:
    """What workers may do in the job's namespace: read and patch this one job, no other."""
    name = mrj["metadata"]["name"]
    return {"apiVersion": f"{RBAC_API}/v1", "kind": "Role",
            "metadata": _worker_meta(mrj, mrj["metadata"]["namespace"]),
            "rules": [{"apiGroups": [GROUP], "resources": [JOB_PLURAL],
                       "resourceNames": [name], "verbs": ["get", "list", "watch", "patch"]},
                      {"apiGroups": [GROUP], "resources": [f"{JOB_PLURAL}/status"],
                       "resourceNames": [name], "verbs": ["get", "patch"]}]}


def task_role(mrj: KubeObject, task_namespace: str) -> KubeObject:
    """What workers may do in the job's task namespace: its tasks, which are all theirs.

    Not owned: an owner must live in the same namespace; the task namespace goes whole.
    """
    return {"apiVersion": f"{RBAC_API}/v1", "kind": "Role",
            "metadata": _worker_meta(mrj, task_namespace, owned=False),
            "rules": [{"apiGroups": [GROUP], "resources": [TASK_PLURAL],
                       "verbs": ["get", "list", "watch", "patch"]}]}


def role_binding(mrj: KubeObject, role: KubeObject,
                 standby: tuple[str, str] | None = None) -> KubeObject:
    """Binds ``role`` (built above) to the workers' ServiceAccount (which lives beside the
    job, wherever the role is), with the role's metadata; and to ``standby`` (its
    namespace and name), the account of a warm pool pod adopted as one of the workers."""
    account = role["metadata"]["name"]
    subjects = [{"kind": "ServiceAccount", "name": account,
                 "namespace": mrj["metadata"]["namespace"]}]
    if standby is not None:
        subjects.append({"kind": "ServiceAccount", "name": standby[1],
                         "namespace": standby[0]})
    return {"apiVersion": f"{RBAC_API}/v1", "kind": "RoleBinding",
            "metadata": copy.deepcopy(role["metadata"]),
            "roleRef": {"apiGroup": RBAC_API, "kind": "Role", "name": account},
            "subjects": subjects}


def secret_copy(mrj: KubeObject, data: dict[str, str]) -> KubeObject:
    """The job's copy of the platform's S3 Secret, made only in a namespace the admin
    allowed the platform's credentials (.tenancy): pods can only reference Secrets in
    their own namespace, so it is copied beside the job, owned by it."""
    name = mrj["metadata"]["name"]
    meta = _worker_meta(mrj, mrj["metadata"]["namespace"])
    meta["name"] = secret_copy_name(name)
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": meta,
            "data": dict(data)}


def worker_env(mrj: KubeObject, config: OperatorConfig,
               secret: str | None = None) -> list[KubeObject]:
    """The workers' environment; ``secret`` names the Secret, beside the job, holding
    their S3 keys (the tenant's own, or the copy of the platform's); none: workload
    identity, the pods' ambient credentials."""
    meta = mrj["metadata"]
    return [{"name": "KUBEMR_JOB", "value": meta["name"]},
            {"name": "KUBEMR_NAMESPACE", "value": meta["namespace"]},
            *_process_env(config, secret)]


def _process_env(config: OperatorConfig, secret: str | None) -> list[KubeObject]:
    """What every worker process gets, whatever its job: its id, the S3 endpoint and
    keys, the /metrics port, the allocator's settings."""
    env: list[KubeObject] = [
        {"name": "KUBEMR_WORKER_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "AWS_REGION", "value": config.s3_region},
        *({"name": name, "value": value} for name, value in WORKER_PROCESS_ENV.items()),
    ]
    if config.s3_endpoint:
        env.append({"name": "KUBEMR_S3_ENDPOINT", "value": config.s3_endpoint})
    if config.worker_metrics_port:
        env += [{"name": metrics.PORT_ENV, "value": str(config.worker_metrics_port)},
                {"name": metrics.LINGER_ENV, "value": str(config.worker_metrics_linger)}]
    return env + _secret_env(secret)


def _secret_env(secret: str | None) -> list[KubeObject]:
    """The S3 keys, by reference to the Secret ``secret`` (none: ambient credentials)."""
    if not secret:
        return []
    return [{"name": key, "valueFrom": {"secretKeyRef": {
                "name": secret, "key": key, **({} if key in REQUIRED_KEYS else
                                               {"optional": True})}}}
            for key in CREDENTIAL_KEYS]


# --- the warm pool's standbys (.pool) ------------------------------------------------

#: What marks a warm pool's objects; an adopted standby also carries its job's uid.
STANDBY_LABELS = {"app.kubernetes.io/name": "kubemr-async",
                  "app.kubernetes.io/component": "standby"}
ADOPTED_LABEL = "kubemr.io/adopted-by-uid"
#: The copy of the platform's S3 Secret in the pool namespace, for the standbys' env.
POOL_SECRET = "kubemr-standby-s3"
#: On a standby: the resourceVersion of POOL_SECRET when it started (its env has the keys
#: of that version; a pod's env never changes).
KEYS_ANNOTATION = "kubemr.io/keys-version"


def standby_meta(name: str, namespace: str) -> KubeObject:
    """A standby's objects (pod, ServiceAccount, Role, RoleBinding) share its name."""
    return {"name": name, "namespace": namespace, "labels": dict(STANDBY_LABELS)}


def standby_account(name: str, namespace: str) -> KubeObject:
    """A standby's own ServiceAccount: a job's RoleBindings name it when the job adopts
    the standby, and nothing else ever does (its name is random and never reused)."""
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": standby_meta(name, namespace)}


def standby_role(name: str, namespace: str) -> KubeObject:
    """What a standby may do before it is adopted: read and watch its own pod (where the
    operator writes the job it adopts it for), nothing else."""
    return {"apiVersion": f"{RBAC_API}/v1", "kind": "Role",
            "metadata": standby_meta(name, namespace),
            "rules": [{"apiGroups": [""], "resources": ["pods"], "resourceNames": [name],
                       "verbs": ["get", "list", "watch"]}]}


def standby_binding(name: str, namespace: str) -> KubeObject:
    return {"apiVersion": f"{RBAC_API}/v1", "kind": "RoleBinding",
            "metadata": standby_meta(name, namespace),
            "roleRef": {"apiGroup": RBAC_API, "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]}


def standby_pod(name: str, namespace: str, config: OperatorConfig,
                secret: str | None, keys: str | None = None) -> KubeObject:
    """A standby: a job's worker pod (:func:`worker_pod`) with no job yet, its identity
    its own account, its S3 keys the platform's (``secret``, the pool's copy, at
    resourceVersion ``keys``; None: ambient credentials). Only a job that would run
    exactly this pod may adopt it."""
    env: list[KubeObject] = [{"name": STANDBY_POD_ENV, "value": name},
                             {"name": STANDBY_NAMESPACE_ENV, "value": namespace},
                             *_process_env(config, secret)]
    pod = worker_pod(config, config.warm_image, name, STANDBY_LABELS, env)
    _add_scratch(pod["spec"])
    pod["metadata"].update(name=name, namespace=namespace)
    if keys is not None:
        pod["metadata"]["annotations"] = {KEYS_ANNOTATION: keys}
    return {"apiVersion": "v1", "kind": "Pod", **pod}


def pool_secret(data: Mapping[str, str], namespace: str) -> KubeObject:
    """The pool's copy of the platform's S3 Secret (pods reference Secrets of their own
    namespace only)."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": standby_meta(POOL_SECRET, namespace), "data": dict(data)}


def deep_merge(base: KubeObject, override: KubeObject) -> KubeObject:
    """Overlay a user's pod template; lists of containers merge by name, other lists replace."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        elif key == "containers" and isinstance(value, list):
            by_name = {c.get("name"): c for c in merged.get(key, [])}
            for container in value:
                name = container.get("name", "worker")
                by_name[name] = deep_merge(by_name.get(name, {}), container)
            merged[key] = list(by_name.values())
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def worker_pod(config: OperatorConfig, image: str | None, account: str, labels: Mapping[str, str],
               env: list[KubeObject]) -> KubeObject:
    """A worker's pod template as the operator makes it, before a job's overlay: the
    same for a job's own workers and for the warm pool's standbys (.pool), which is what
    lets a standby stand in for a job's worker."""
    pod: KubeObject = {
        "metadata": {"labels": dict(labels)},
        "spec": {
            "serviceAccountName": account,
            "restartPolicy": "Never",
            "containers": [{
                "name": "worker", "image": image,
                "imagePullPolicy": config.image_pull_policy,
                "command": list(config.worker_command), "env": env,
                # A worker that fails reports its log's tail as its termination message,
                # which names the cause when the job fails (.crashloop).
                "terminationMessagePolicy": "FallbackToLogsOnError",
                # Pod Security "restricted" as it stands; an overlay is checked against
                # the namespace's level before anything is created (.podsecurity).
                "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                                    "capabilities": {"drop": ["ALL"]},
                                    "seccompProfile": {"type": "RuntimeDefault"}},
            }],
            # Workers hand their claims back on SIGTERM; give them time to do it.
            "terminationGracePeriodSeconds": 30,
        },
    }
    if config.worker_metrics_port:
        _add_metrics_port(pod, config.worker_metrics_port)
    return pod


def worker_job(mrj: KubeObject, config: OperatorConfig, env: list[KubeObject],
               standby: str | None = None) -> KubeObject:
    """The batch/v1 Job whose pods are the workers: an Indexed Job, one index per worker,
    each done when its worker exits 0 (the job decided); kills are not counted as failures
    (:data:`POD_FAILURE_POLICY`), other deaths ``worker_backoff_limit`` times per worker.

    ``standby``: the warm pool's pod adopted as one of the job's workers (.pool). It
    stands for one of them, so the Job starts one pod fewer (none for a one-worker job);
    its name is kept in an annotation, and if it dies before the job is decided the
    reconciler gives the Job its whole parallelism back.
    """
    name = mrj["metadata"]["name"]
    account, job_name = worker_names(name)
    spec = JobSpec.from_dict(name, mrj["spec"])
    pod = worker_pod(config, spec.image, account, worker_labels(name), env)
    if spec.template:
        pod = deep_merge(pod, dict(spec.template))
        # A job may shape its pods, but never choose their identity: the account is the
        # one whose Role reaches only this job's objects.
        pod["spec"]["serviceAccountName"] = account
        pod["spec"].pop("serviceAccount", None)
        pod["spec"].pop("automountServiceAccountToken", None)
    if AZURE_CLIENT_ID in (spec.identity_annotations or {}):
        pod["metadata"].setdefault("labels", {})[AZURE_USE_LABEL] = "true"
    _add_scratch(pod["spec"])
    workers = spec.workers or DEFAULT_WORKERS
    job_spec: KubeObject = {"parallelism": workers - (standby is not None), "template": pod}
    if pod["spec"].get("restartPolicy") == "Never":  # the API refuses the policies otherwise
        # One index per worker, each with its own failure count and its own backoff
        # before a replacement: a work-queue Job's one backoff grows with every death
        # (10 s, 20 s, ... 6 min) until a pod succeeds, which a worker only does once the
        # job is decided, so a dozen kills would leave the job without workers for minutes.
        job_spec.update(completionMode="Indexed", completions=workers,
                        backoffLimitPerIndex=config.worker_backoff_limit, maxFailedIndexes=0,
                        podFailurePolicy=copy.deepcopy(POD_FAILURE_POLICY))
    else:
        job_spec["backoffLimit"] = config.worker_backoff_limit
    meta: KubeObject = {"name": job_name, "namespace": mrj["metadata"]["namespace"],
                        "labels": worker_labels(name), "ownerReferences": [owner_reference(mrj)]}
    if standby is not None:
        meta["annotations"] = {STANDBY_ANNOTATION: standby}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def workers_adopted(workers: KubeObject) -> str | None:
    """The standby a job's batch Job was made beside (``worker_job(standby=)``), if any."""
    return ((workers["metadata"].get("annotations") or {}).get(STANDBY_ANNOTATION))


def _add_metrics_port(pod: KubeObject, port: int) -> None:
    """Declare the worker's /metrics port and the scrape annotations that Prometheus's
    usual pod discovery (and most charts' scrape configs) follow."""
    pod["metadata"]["annotations"] = {"prometheus.io/scrape": "true",
                                      "prometheus.io/port": str(port),
                                      "prometheus.io/path": "/metrics"}
    pod["spec"]["containers"][0]["ports"] = [
        {"name": "metrics", "containerPort": port, "protocol": "TCP"}]


#: The volume under the worker's temp dir: spills, merge passes and parts being written.
SCRATCH_VOLUME = "kubemr-scratch"
SCRATCH_PATH = "/tmp"


def _add_scratch(pod: KubeObject) -> None:
    """Give the worker container an ``emptyDir`` at /tmp, its scratch (see ``spill``).

    The shuffle spills beyond the memory budget to the temp dir; in a container that is
    the image's writable layer (slow, and lost to ``readOnlyRootFilesystem``), so it gets
    a volume of its own, deleted with the pod. A template may define a volume of the same
    name (``medium: Memory``, a ``sizeLimit``, an ephemeral PVC) or mount its own at /tmp;
    then that one is used.
    """
    worker = next((c for c in pod.get("containers", []) if c.get("name") == "worker"), None)
    if worker is None:
        return
    mounts = worker.setdefault("volumeMounts", [])
    if any(m.get("mountPath", "").rstrip("/") == SCRATCH_PATH for m in mounts):
        return
    mounts.append({"name": SCRATCH_VOLUME, "mountPath": SCRATCH_PATH})
    volumes = pod.setdefault("volumes", [])
    if not any(v.get("name") == SCRATCH_VOLUME for v in volumes):
        volumes.append({"name": SCRATCH_VOLUME, "emptyDir": {}})


def workers_failed(workers: KubeObject) -> str | None:
    """Why the workers' batch Job failed (its pods failed too often), or None."""
    for condition in (workers.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            return (f"worker pods failed ({condition.get('reason')}): "
                    f"{condition.get('message') or 'no message'}")
    return None


def workers_ended_early(workers: KubeObject) -> str | None:
    """Why a job that is not decided has no workers left: its batch Job is Complete.

    A worker exits 0 only once it has seen the job's verdict, and the Job controller
    replaces no pod that succeeded: a Complete batch Job under an undecided job means its
    pods exited 0 before the verdict (user code calling ``os._exit(0)``, or a wrapper
    script that swallowed the worker's exit code), and no worker will ever finish it.
    None while it is not Complete.
    """
    for condition in (workers.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Complete" and condition.get("status") == "True":
            return ("every worker pod exited with code 0 before the job was decided, so "
                    "none is left to finish it (does the job's code end its process, e.g. "
                    "os._exit(0)?)")
    return None


def pods_out_of_memory(pods: list[KubeObject]) -> str | None:
    """Why the worker pods died, when the memory cgroup killed them: the Job controller's
    own reason (BackoffLimitExceeded) does not say, and a job that needs more memory than
    its pods' limit should say so. None if no worker container was ``OOMKilled``."""
    killed = [pod for pod in pods
              for status in (pod.get("status") or {}).get("containerStatuses") or []
              if ((status.get("state") or {}).get("terminated") or {}).get("reason")
              == "OOMKilled"]
    if not killed:
        return None
    limits = {str(((c.get("resources") or {}).get("limits") or {}).get("memory", "none"))
              for pod in killed for c in pod["spec"]["containers"]}
    return (f"{len(killed)} of {len(pods)} worker pods ran out of memory (OOMKilled; memory "
            f"limit {', '.join(sorted(limits))}): raise the workers' memory limit")


def pods_stuck(pods: list[KubeObject]) -> str | None:
    """Why no worker pod can ever start (every one waits for a reason that does not pass,
    and the Job controller never fails such pods), or None."""
    stuck = []
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (status.get("state") or {}).get("waiting")
            if waiting is not None and waiting.get("reason") in STUCK_REASONS:
                stuck.append(f"{waiting['reason']}: {waiting.get('message') or ''}".strip())
    if pods and len(stuck) == len(pods):
        return f"worker pods cannot start: {stuck[0]}"
    return None


# --- the MapReduceJob itself ----------------------------------------------------------


def add_finalizer(mrj: KubeObject) -> list[KubeObject] | None:
    """The JSON Patch that adds our finalizer, or None if the job carries it already."""
    finalizers = mrj["metadata"].get("finalizers") or []
    if FINALIZER in finalizers:
        return None
    return [{"op": "add", "path": "/metadata/finalizers", "value": [*finalizers, FINALIZER]}]


def remove_finalizer(mrj: KubeObject) -> list[KubeObject] | None:
    """The JSON Patch that removes our finalizer, guarded by a test of the list it read (a
    concurrent change makes it fail rather than drop someone else's), or None if absent."""
    finalizers = mrj["metadata"].get("finalizers") or []
    if FINALIZER not in finalizers:
        return None
    return [{"op": "test", "path": "/metadata/finalizers", "value": finalizers},
            {"op": "replace", "path": "/metadata/finalizers",
             "value": [f for f in finalizers if f != FINALIZER]}]


def invalid_job_status(mrj: KubeObject, reason: str) -> KubeObject:
    """The merge patch that fails a job nothing was planned for (so no worker holds a claim
    and a plain status write is safe)."""
    return {"status": {**protocol.new_status(), "phase": JobPhase.FAILED.value,
                       "error": {"task": "", "attempt": 0, "message": reason},
                       "seq": int((mrj.get("status") or {}).get("seq") or 0) + 1}}


def progress_fields(progress: protocol.Progress) -> KubeObject:
    """The status fields behind the printer columns."""
    return {"mapsDone": progress.maps_done, "reduces": progress.reduces_total,
            "reducesDone": progress.reduces_done}


def status_patch(mrj: KubeObject, phase: JobPhase, fields: KubeObject | None,
                 at: str) -> KubeObject | None:
    """The merge patch writing ``fields`` and the conditions of ``phase`` into the status;
    None when there are no fields and the conditions on the object are current."""
    status = mrj.get("status") or {}
    previous = status.get("conditions") or []
    conditions = job_conditions(phase, status.get("error"),
                                int(mrj["metadata"].get("generation") or 0), previous, at)
    if not fields and conditions == previous:
        return None
    return {"status": {**(fields or {}), "conditions": conditions}}


def finished_message(phase: JobPhase, error: JobError | None) -> str:
    """The message of the Event that says a job was decided."""
    message = f"job {phase.value.lower()}"
    if phase != JobPhase.SUCCEEDED:
        message += f": {protocol.format_error(error)}"
    return message


def ttl_remaining(mrj: KubeObject, at: datetime) -> float | None:
    """Seconds until a decided job's TTL deletes it (<= 0: due), None without a TTL."""
    ttl = JobSpec.from_dict(mrj["metadata"]["name"], mrj["spec"]).ttl_seconds_after_finished
    if ttl is None:
        return None
    stamped = (mrj.get("status") or {}).get("completionTime")
    finished = datetime.fromisoformat(stamped.replace("Z", "+00:00")) if stamped else at
    return ttl - (at - finished).total_seconds()


def event(meta: KubeObject, reason: str, message: str, warning: bool, at: str,
          related: KubeObject | None = None) -> KubeObject:
    """An Event about the MapReduceJob with metadata ``meta``, for ``kubectl describe``;
    ``related``: the other object it concerns (the standby an ``Adopted`` Event names,
    whose log ``kubemr logs`` then reads too)."""
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": API_VERSION, "kind": JOB_KIND, "name": meta["name"],
                           "namespace": meta["namespace"],
                           **({"uid": meta["uid"]} if meta.get("uid") else {})},
        "reason": reason, "message": message[:1024],
        "type": "Warning" if warning else "Normal",
        "firstTimestamp": at, "lastTimestamp": at, "count": 1,
        "source": {"component": "kubemr-operator"},
        **({"related": related} if related is not None else {}),
    }
