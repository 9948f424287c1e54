"""Whether, and with which credentials, a job may run: decided before anything is made.

The operator acts with its own rights, so everything a tenant's job asks for is judged
here first (docs/security.md has the threat model):

- **storage credentials** are the tenant's own: a Secret named in ``spec.storage`` from
  the job's own namespace (referenced by the pods, never copied), or workload identity
  (allow-listed annotations on the job's ServiceAccount, no keys at all). A job naming
  neither gets the platform's credentials only in a namespace the admin allowed
  (:mod:`.tenancy`); anywhere else it is refused;
- **the worker pod**, as the job's ``template`` overlay leaves it, must meet the
  namespace's Pod Security level (:mod:`.podsecurity`), and the overlay may not touch the
  workers' identity, image or command.

A refusal is a :class:`Refused` whose message names the spec field; the reconciler fails
the job with it at once and records a Warning Event.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import KubemrError
from ..kube import NAMESPACES, SECRETS, Forbidden, Kube, KubeObject, NotFound
from ..scrub import CREDENTIAL_KEYS
from ..spec import JobSpec
from . import podsecurity
from .config import OperatorConfig
from .podsecurity import Level
from .resources import REQUIRED_KEYS, secret_copy, secret_copy_name, worker_env, worker_job
from .tenancy import Tenancy


class Refused(KubemrError):
    """The job asks for what its namespace is not allowed; the message names the field."""


@dataclass(frozen=True)
class StorageAccess:
    """How a job's workers, and the operator planning it, reach storage."""

    #: The Secret beside the job that the workers' env references (the tenant's own, or
    #: the copy of the platform's); None: workload identity or ambient credentials.
    secret: str | None
    #: The copy of the platform's Secret to make (only where the admin allowed it).
    platform_copy: KubeObject | None
    #: Workload identity: annotations for the job's ServiceAccount.
    annotations: Mapping[str, str] | None
    #: The environment the operator plans (lists inputs) with: the job's credentials.
    environ: Mapping[str, str] = field(repr=False)
    #: Credential values known to the operator for this job, scrubbed from its messages.
    secrets: tuple[str, ...] = field(repr=False, default=())
    #: The platform's credentials (neither the tenant's Secret nor a workload identity):
    #: what a warm pool's standby holds, so such a job may adopt one (.pool).
    platform: bool = False


@dataclass(frozen=True)
class Admission:
    """What an admitted job runs with: its storage access and the Pod Security level its
    worker pod met."""

    storage: StorageAccess
    level: Level


async def admit(kube: Kube, config: OperatorConfig, tenancy: Tenancy,
                mrj: KubeObject) -> Admission:
    """Judge job ``mrj``: its Admission, or Refused naming the field."""
    namespace, name = mrj["metadata"]["namespace"], mrj["metadata"]["name"]
    spec = JobSpec.from_dict(name, mrj["spec"])
    violations = podsecurity.overlay_violations(spec.template or {})
    if violations:
        raise Refused("; ".join(f"{path}: {problem}" for path, problem in violations))
    labels = ((await kube.get(NAMESPACES, namespace)).get("metadata") or {}).get(
        "labels") or {}
    storage = await _storage(kube, config, tenancy, mrj, spec, labels)
    level = tenancy.level(labels)
    pod = worker_job(mrj, config, worker_env(mrj, config, storage.secret))
    violations = podsecurity.check(pod["spec"]["template"], level)
    if violations:
        raise Refused(podsecurity.describe(violations, level))
    return Admission(storage, level)


async def _storage(kube: Kube, config: OperatorConfig, tenancy: Tenancy, mrj: KubeObject,
                   spec: JobSpec, labels: Mapping[str, str]) -> StorageAccess:
    namespace = mrj["metadata"]["namespace"]
    ambient = dict(os.environ)
    if spec.credentials_secret is not None:
        keys = await _tenant_keys(kube, namespace, spec.credentials_secret)
        environ = {k: v for k, v in ambient.items() if k not in CREDENTIAL_KEYS} | keys
        return StorageAccess(spec.credentials_secret, None, None, environ,
                             tuple(keys.values()))
    if spec.identity_annotations is not None:
        # The pods get the identity's credentials from the cloud; the operator plans with
        # its own (docs/security.md: what that lets a tenant learn).
        return StorageAccess(None, None, spec.identity_annotations, ambient)
    if not tenancy.platform_credentials_allowed(labels):
        raise Refused(
            f"spec.storage: namespace {namespace} may not use the platform's storage "
            "credentials: name a Secret of your own (spec.storage.credentialsSecret) or a "
            "workload identity (spec.storage.serviceAccountAnnotations)")
    if not config.s3_secret:
        return StorageAccess(None, None, None, ambient, platform=True)
    source = await kube.get(SECRETS, config.s3_secret, config.operator_namespace)
    data = source.get("data") or {}
    return StorageAccess(secret_copy_name(mrj["metadata"]["name"]), secret_copy(mrj, data),
                         None, ambient, tuple(_decode(data).values()), platform=True)


async def _tenant_keys(kube: Kube, namespace: str, name: str) -> dict[str, str]:
    """The S3 keys in the tenant's Secret ``name``; Refused naming what is wrong."""
    where = f"spec.storage.credentialsSecret: Secret {name} in namespace {namespace}"
    try:
        secret = await kube.get(SECRETS, name, namespace)
    except NotFound:
        raise Refused(f"{where} does not exist") from None
    except Forbidden:
        raise Refused(f"{where} cannot be read by the operator (RBAC)") from None
    keys = _decode(secret.get("data") or {})
    missing = [key for key in REQUIRED_KEYS if not keys.get(key)]
    if missing:
        raise Refused(f"{where} lacks {', '.join(missing)}")
    return keys


def _decode(data: Mapping[str, str]) -> dict[str, str]:
    """The credential keys of a Secret's ``data`` (base64), decoded; others ignored."""
    keys = {}
    for key in CREDENTIAL_KEYS:
        if key in data:
            try:
                keys[key] = base64.b64decode(data[key]).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise Refused(f"spec.storage.credentialsSecret: {key} is not valid "
                              "base64 text") from None
    return keys
