"""Tenant security (issue 13) as pure functions: the Pod Security check, the admin's
namespace selectors, scrubbing, and what the builders write. The same rules end to end, on
the real API server and S3 server, as a tenant: tests/test_tenant_security.py."""

from __future__ import annotations

import copy
import logging
import subprocess
from typing import Any

import pytest

from kubemr_async.errors import UsageError
from kubemr_async.logs import JSONFormatter
from kubemr_async.manifests import SubmitOptions, build_manifest
from kubemr_async.operator import resources
from kubemr_async.operator.config import OperatorConfig
from kubemr_async.operator.podsecurity import check, overlay_violations
from kubemr_async.operator.tenancy import Selector, Tenancy
from kubemr_async.scrub import scrub
from kubemr_async.spec import InvalidSpec, JobSpec

from .test_local_run import KUBEMR

MRJ: dict[str, Any] = {
    "apiVersion": "kubemr.io/v1alpha1", "kind": "MapReduceJob",
    "metadata": {"name": "wc", "namespace": "team-a", "uid": "u-1"},
    "spec": {"image": "example/wc:1", "job": "examples.wordcount", "inputs": ["s3://b/in/"],
             "output": "s3://bkt/out"},
}


def pod_of(template: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    """The worker pod the operator would create for MRJ with ``template``."""
    mrj = copy.deepcopy(MRJ)
    mrj["spec"].update(spec)
    if template is not None:
        mrj["spec"]["template"] = template
    config = OperatorConfig()
    job = resources.worker_job(mrj, config, resources.worker_env(mrj, config, "team-a-s3"))
    pod: dict[str, Any] = job["spec"]["template"]
    return pod


def fields(violations: list[tuple[str, str]]) -> list[str]:
    return [field for field, _ in violations]


# --- Pod Security ------------------------------------------------------------------------


def test_the_operators_own_worker_pod_is_restricted() -> None:
    assert check(pod_of(), "restricted") == []


@pytest.mark.parametrize(("template", "field"), [
    ({"spec": {"hostNetwork": True}}, "spec.template.spec.hostNetwork"),
    ({"spec": {"hostPID": True}}, "spec.template.spec.hostPID"),
    ({"spec": {"hostIPC": True}}, "spec.template.spec.hostIPC"),
    ({"spec": {"volumes": [{"name": "n", "hostPath": {"path": "/"}}]}},
     "spec.template.spec.volumes[n].hostPath"),
    ({"spec": {"containers": [{"name": "worker", "securityContext": {"privileged": True}}]}},
     "spec.template.spec.containers[worker].securityContext.privileged"),
    ({"spec": {"containers": [{"name": "worker", "securityContext": {
        "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]}}}]}},
     "spec.template.spec.containers[worker].securityContext.capabilities.add"),
    ({"spec": {"initContainers": [{"name": "init", "image": "x",
                                   "securityContext": {"privileged": True}}]}},
     "spec.template.spec.initContainers[init].securityContext.privileged"),
    ({"spec": {"containers": [{"name": "worker", "ports": [
        {"containerPort": 80, "hostPort": 80}]}]}},
     "spec.template.spec.containers[worker].ports[80].hostPort"),
    ({"spec": {"securityContext": {"seccompProfile": {"type": "Unconfined"}}}},
     "spec.template.spec.securityContext.seccompProfile.type"),
    ({"spec": {"securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}]}}},
     "spec.template.spec.securityContext.sysctls[kernel.msgmax]"),
    ({"spec": {"containers": [{"name": "worker", "securityContext": {
        "seLinuxOptions": {"type": "spc_t"}}}]}},
     "spec.template.spec.containers[worker].securityContext.seLinuxOptions.type"),
])
def test_what_baseline_forbids_is_named_by_its_field(template: dict[str, Any],
                                                     field: str) -> None:
    pod = pod_of(template)
    assert field in fields(check(pod, "baseline"))
    assert field in fields(check(pod, "restricted"))
    assert check(pod, "privileged") == []


@pytest.mark.parametrize(("template", "field"), [
    ({"spec": {"securityContext": {"runAsUser": 0}}},
     "spec.template.spec.securityContext.runAsUser"),
    ({"spec": {"containers": [{"name": "worker", "securityContext": {"runAsUser": 0}}]}},
     "spec.template.spec.containers[worker].securityContext.runAsUser"),
    ({"spec": {"containers": [{"name": "worker", "securityContext": {
        "allowPrivilegeEscalation": True}}]}},
     "spec.template.spec.containers[worker].securityContext.allowPrivilegeEscalation"),
    ({"spec": {"containers": [{"name": "worker", "securityContext": {
        "runAsNonRoot": False}}]}},
     "spec.template.spec.containers[worker].securityContext.runAsNonRoot"),
    ({"spec": {"containers": [{"name": "worker", "securityContext": {
        "capabilities": {"drop": []}}}]}},
     "spec.template.spec.containers[worker].securityContext.capabilities.drop"),
    ({"spec": {"containers": [{"name": "worker", "securityContext": {
        "capabilities": {"add": ["CHOWN"]}}}]}},
     "spec.template.spec.containers[worker].securityContext.capabilities.add"),
    ({"spec": {"volumes": [{"name": "data", "nfs": {"server": "s", "path": "/"}}]}},
     "spec.template.spec.volumes[data]"),
    ({"spec": {"containers": [{"name": "sidecar", "image": "x"}]}},
     "spec.template.spec.containers[sidecar].securityContext.seccompProfile.type"),
])
def test_what_only_restricted_forbids_passes_baseline(template: dict[str, Any],
                                                      field: str) -> None:
    pod = pod_of(template)
    assert field in fields(check(pod, "restricted"))
    assert check(pod, "baseline") == []


def test_a_restricted_sidecar_and_volumes_are_allowed() -> None:
    sidecar = {"name": "sidecar", "image": "proxy:1", "securityContext": {
        "allowPrivilegeEscalation": False, "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
        "seccompProfile": {"type": "RuntimeDefault"}}}
    template = {"spec": {"containers": [sidecar, {"name": "worker", "resources": {
        "limits": {"memory": "1Gi"}}}],
        "volumes": [{"name": "cfg", "configMap": {"name": "c"}}]}}
    assert check(pod_of(template), "restricted") == []


@pytest.mark.parametrize(("template", "field"), [
    ({"spec": {"serviceAccountName": "admin"}}, "spec.template.spec.serviceAccountName"),
    ({"spec": {"serviceAccount": "admin"}}, "spec.template.spec.serviceAccount"),
    ({"spec": {"automountServiceAccountToken": False}},
     "spec.template.spec.automountServiceAccountToken"),
    ({"spec": {"containers": [{"name": "worker", "image": "evil:1"}]}},
     "spec.template.spec.containers[worker].image"),
    ({"spec": {"containers": [{"command": ["sh", "-c", "cat /var/run/secrets/*"]}]}},
     "spec.template.spec.containers[worker].command"),
    ({"spec": {"containers": [{"name": "worker", "args": ["x"]}]}},
     "spec.template.spec.containers[worker].args"),
])
def test_the_operator_refuses_an_overlay_of_identity_image_or_command(
        template: dict[str, Any], field: str) -> None:
    """What the CRD's CEL rules refuse at create time, refused again by the operator (a
    cluster with an older CRD, or objects created before it)."""
    assert fields(overlay_violations(template)) == [field]


def test_a_sidecars_own_image_is_no_overlay_of_the_worker() -> None:
    assert overlay_violations({"spec": {"containers": [{"name": "proxy", "image": "p:1",
                                                        "command": ["proxy"]}]}}) == []


# --- the admin's namespace selectors -----------------------------------------------------


@pytest.mark.parametrize(("selector", "labels", "matches"), [
    ("", {"a": "b"}, False),  # empty: no namespace, never all of them
    ("a=b", {"a": "b"}, True),
    ("a==b", {"a": "c"}, False),
    ("a!=b", {}, True),
    ("a", {"a": ""}, True),
    ("!a", {"a": "x"}, False),
    ("tier in (gold, silver),team", {"tier": "gold", "team": "x"}, True),
    ("tier in (gold, silver),team", {"tier": "gold"}, False),
    ("tier notin (gold)", {"tier": "bronze"}, True),
    ("kubernetes.io/metadata.name=team-a", {"kubernetes.io/metadata.name": "team-a"}, True),
])
def test_selectors_match_as_kubectl_does(selector: str, labels: dict[str, str],
                                         matches: bool) -> None:
    assert Selector.parse(selector, "--x").matches(labels) is matches


def test_a_bad_selector_names_its_flag() -> None:
    with pytest.raises(UsageError, match=r"^--baseline-namespaces: invalid label selector "
                                         r"requirement 'a in b'$"):
        Tenancy.of(OperatorConfig(baseline_namespaces="a in b"))


def test_the_operator_refuses_to_start_on_a_bad_selector() -> None:
    proc = subprocess.run([KUBEMR, "operator", "--platform-credentials-namespaces", "a=(b",
                           "--kubeconfig", "/nonexistent"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip() == ("kubemr: error: --platform-credentials-namespaces: "
                                   "invalid label selector requirement 'a=(b'")


def test_levels_default_to_restricted() -> None:
    tenancy = Tenancy.of(OperatorConfig(baseline_namespaces="ps=baseline",
                                        privileged_namespaces="ps=privileged",
                                        platform_credentials_namespaces="storage=platform"))
    assert tenancy.level({}) == "restricted"
    assert tenancy.level({"ps": "baseline"}) == "baseline"
    assert tenancy.level({"ps": "privileged"}) == "privileged"
    assert not tenancy.platform_credentials_allowed({"ps": "privileged"})
    assert tenancy.platform_credentials_allowed({"storage": "platform"})
    assert not Tenancy.of(OperatorConfig()).platform_credentials_allowed({})


# --- what the builders write ---------------------------------------------------------------


def test_workload_identity_goes_on_the_account_and_no_key_into_the_env() -> None:
    mrj = copy.deepcopy(MRJ)
    annotations = {"azure.workload.identity/client-id": "00000000-1111"}
    mrj["spec"]["storage"] = {"serviceAccountAnnotations": annotations}
    account = resources.service_account(mrj, annotations)
    assert account["metadata"]["annotations"] == annotations
    env = resources.worker_env(mrj, OperatorConfig())
    assert not {e["name"] for e in env} & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    pod = resources.worker_job(mrj, OperatorConfig(), env)["spec"]["template"]
    assert pod["metadata"]["labels"]["azure.workload.identity/use"] == "true"


def test_a_secret_is_referenced_with_the_session_token_optional() -> None:
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]
            for e in resources.worker_env(MRJ, OperatorConfig(), "team-a-s3")
            if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs == {
        "AWS_ACCESS_KEY_ID": {"name": "team-a-s3", "key": "AWS_ACCESS_KEY_ID"},
        "AWS_SECRET_ACCESS_KEY": {"name": "team-a-s3", "key": "AWS_SECRET_ACCESS_KEY"},
        "AWS_SESSION_TOKEN": {"name": "team-a-s3", "key": "AWS_SESSION_TOKEN",
                              "optional": True}}


def test_submit_writes_the_tenants_credentials_into_spec_storage() -> None:
    options = {"image": "i:1", "job": "m", "inputs": ["s3://b/x"], "output": "s3://bkt/o"}
    made = build_manifest(SubmitOptions(**options, credentials_secret="team-a-s3"))
    assert made["spec"]["storage"] == {"credentialsSecret": "team-a-s3"}
    role = {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/r"}
    made = build_manifest(SubmitOptions(**options, identity=role))
    assert made["spec"]["storage"] == {"serviceAccountAnnotations": role}
    assert "storage" not in build_manifest(SubmitOptions(**options))["spec"]
    with pytest.raises(InvalidSpec, match=r"^spec.storage: give credentialsSecret or "):
        build_manifest(SubmitOptions(**options, credentials_secret="s", identity=role))
    spec = JobSpec.from_resource("wc", made["spec"])
    assert "storage" not in spec.to_dict(cluster=False), "workers' records never carry it"


# --- scrubbing ----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "kept"), [
    ("GET https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAABCDEFGHIJKLMNOP%2F2024&"
     "X-Amz-Signature=abc123def failed", "GET https://b.s3.amazonaws.com/k?X-Amz-Credential=***"
     "&X-Amz-Signature=*** failed"),
    ("headers: {'Authorization': 'AWS4-HMAC-SHA256 Credential=x, Signature=y'}",
     "headers: {'Authorization': '***'}"),
    ("token rejected: Bearer eyJhbGciOiJSUzI1NiJ9.payload.sig", "token rejected: Bearer ***"),
    ("aws_secret_access_key=wJalrXUtnFEMI/K7MDENG and more",
     "aws_secret_access_key=*** and more"),
    ('{"secretAccessKey": "wJalrXUtnFEMI"}', '{"secretAccessKey": "***"}'),
    ("key AKIAIOSFODNN7EXAMPLE is unknown", "key *** is unknown"),
    ("input s3://b/x: access denied (AccessDenied)", "input s3://b/x: access denied "
                                                     "(AccessDenied)"),
    ("connect to postgresql://app:hunter2@db:5432/x failed",
     "connect to postgresql://app:***@db:5432/x failed"),
    ("input 'https://u:p%40ss@h/x' and s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI@b/k",
     "input 'https://u:***@h/x' and s3://***:***@b/k"),
    ("ssh://git@host/repo and http://host:8080/x@y keep their parts",
     "ssh://git@host/repo and http://host:8080/x@y keep their parts"),
    ("cannot open /etc/passwd: Permission denied", "cannot open /etc/passwd: Permission denied"),
    ("db_password=hunter2 was refused", "db_password=*** was refused"),
])
def test_credential_shapes_are_scrubbed(text: str, kept: str) -> None:
    assert scrub(text) == kept


def test_known_values_are_scrubbed_and_short_ones_left_alone() -> None:
    message = "user code printed PLANTED-secret-123 and the id team-a-key (a, b)"
    assert scrub(message, ["PLANTED-secret-123", "team-a-key", "a", ""]) == (
        "user code printed *** and the id *** (a, b)")


def test_log_lines_lose_the_processs_own_keys_and_credential_shapes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A library's debug lines (botocore prints request headers and error bodies) and the
    context fields are scrubbed as they are formatted."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "PLANTED-own-secret")
    record = logging.LogRecord(
        "botocore.endpoint", logging.DEBUG, __file__, 1,
        "Sending http request: headers={'Authorization': b'AWS4-HMAC-SHA256 "
        "Credential=team-a-key/20261202/us-east-1/s3/aws4_request, Signature=abc'}; "
        "<AWSAccessKeyId>team-a-key</AWSAccessKeyId> env PLANTED-own-secret", None, None)
    record.error = "user code printed PLANTED-own-secret"
    line = JSONFormatter().format(record)
    assert "team-a-key" not in line and "PLANTED-own-secret" not in line
    assert "Sending http request" in line and "user code printed ***" in line
