"""The Helm chart (charts/kubemr-async): lint, render, schemas, the real API server, and the
operator running with nothing but the chart's permissions.

Tiers:
* no cluster: `helm lint --strict`, values-schema checks, and checks of the rendered objects
  (labels, the operator Deployment, exact least-privilege RBAC, the S3 Secret modes);
* ``kube`` + ``slow``: kubeconform against JSON schemas generated from the test
  kube-apiserver's own /openapi/v2 (never kubeconform's default: a remote URL), a
  server-side dry run of every rendered object, `helm install` in both RBAC modes with
  access reviews as the operator's ServiceAccount, and the proof that the RBAC suffices:
  `kubemr operator`, started with the Deployment's own args and env and a token of the
  chart's ServiceAccount, runs examples/wordcount.yaml to success.

helm and kubeconform come from hack/ensure-helm-tools.sh (built with `go install` once,
cached). Helm's own state (repositories, cache) lives in a temp dir per session.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubemr_async.testing import run_ensure_script
from kubemr_async.testing.cluster import ApiError, TestCluster
from kubemr_async.testing.s3server import S3Server

from .test_metrics import free_port, wait_for_status

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "kubemr-async"
KUBEMR = str(Path(sys.executable).parent / "kubemr")
DATA = ROOT / "examples" / "data"
BUCKET = "kubemr-examples"
GROUP_PATH = "/apis/kubemr.io/v1alpha1"

Obj = dict[str, Any]

# Value sets every render-level test runs over. "<watch>" is replaced by a real namespace
# in the tests that talk to the API server.
VALUE_SETS: dict[str, Obj] = {
    "defaults": {},
    "cluster-wide-with-keys": {
        "s3": {"endpoint": "http://minio.storage:9000", "region": "eu-west-1",
               "accessKeyId": "AKIAEXAMPLE", "secretAccessKey": "example/secret+key"},
    },
    "namespaced-existing-secret": {
        "watchNamespace": "<watch>", "s3": {"existingSecret": "s3-credentials"},
    },
    "metrics-off": {"metrics": {"enabled": False}},
    "ha": {"replicaCount": 2, "leaderElection": {"leaseDuration": 20, "renewDeadline": 12,
                                                 "retryPeriod": 3}},
    "leader-election-off": {"leaderElection": {"enabled": False}},
    "external-service-account-no-rbac": {
        "serviceAccount": {"create": False, "name": "operator"},
        "rbac": {"create": False}, "admissionPolicy": {"enabled": False},
        "s3": {"existingSecret": "s3-credentials"},
    },
    "everything-set": {
        "fullnameOverride": "mr",
        "image": {"repository": "registry.example/kubemr-async", "tag": "1.2.3",
                  "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "replicaCount": 0,
        "watchNamespace": "<watch>",
        "operator": {"logLevel": "DEBUG", "workerBackoffLimit": 1,
                     "extraArgs": ["--context=in-cluster"],
                     "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
                     "httpPort": 9000},
        "metrics": {"enabled": True, "workerPort": 9191, "workerLingerSeconds": 5,
                    "service": {"annotations": {"example.com/team": "data"}},
                    "serviceMonitor": {"enabled": False, "interval": "1m",
                                       "labels": {"release": "prom"}}},
        "s3": {"accessKeyId": "a", "secretAccessKey": "b"},
        "serviceAccount": {"annotations": {"example.com/role": "kubemr"}},
        "commonLabels": {"team": "data"},
        "deploymentAnnotations": {"example.com/owner": "data"},
        "podAnnotations": {"example.com/scrape": "false"},
        "podLabels": {"tier": "control"},
        "livenessProbe": None,
        "priorityClassName": "system-cluster-critical",
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
        "tmpSizeLimit": "128Mi",
        "leaderElection": {"enabled": True, "leaseDuration": 30, "renewDeadline": 20,
                           "retryPeriod": 4},
        "podDisruptionBudget": {"enabled": True, "minAvailable": 1},
        "tenancy": {"platformCredentialsNamespaces": "kubemr.io/platform-storage=allowed",
                    "podSecurity": {"baselineNamespaces": "kubemr.io/pod-security in (baseline)",
                                    "privilegedNamespaces": "kubemr.io/pod-security=privileged"}},
    },
}

# What the operator needs, derived from kubemr_async/operator/ and state/kube.py (the
# calls it makes), plus what it must hold to grant its workers their Roles. Keys:
# (apiGroup, resource) -> verbs. Job side: every namespace holding MapReduceJobs.
JOB_SIDE_RULES: dict[tuple[str, str], set[str]] = {
    ("kubemr.io", "mapreducejobs"): {"get", "list", "watch", "patch", "delete"},
    ("kubemr.io", "mapreducejobs/status"): {"get", "list", "watch", "patch"},
    ("", "serviceaccounts"): {"create"},
    ("rbac.authorization.k8s.io", "roles"): {"create"},
    ("rbac.authorization.k8s.io", "rolebindings"): {"create"},
    ("batch", "jobs"): {"get", "create", "delete"},
    ("", "pods"): {"list"},
    # get: a job's own credentials Secret, named in spec.storage (issue 13); create: the
    # copy of the platform's, where the admin allowed it.
    ("", "secrets"): {"get", "create"},
    ("", "events"): {"create"},
}
# Task side: the per-job task namespaces (cluster-wide in both modes).
TASK_SIDE_RULES: dict[tuple[str, str], set[str]] = {
    ("", "namespaces"): {"get", "create", "delete"},
    ("kubemr.io", "mapreducetasks"): {"get", "list", "watch", "create", "patch"},
    ("rbac.authorization.k8s.io", "roles"): {"create"},
    ("rbac.authorization.k8s.io", "rolebindings"): {"create"},
}


# ------------------------------------------------------------------------------ helm


@dataclass(frozen=True)
class Tools:
    """helm and kubeconform, with helm's state kept in a private directory."""

    bin_dir: Path
    home: Path

    @property
    def helm_bin(self) -> str:
        return str(self.bin_dir / "helm")

    @property
    def kubeconform_bin(self) -> str:
        return str(self.bin_dir / "kubeconform")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HELM_", "KUBECONFIG"))}
        for kind in ("CACHE", "CONFIG", "DATA"):
            env[f"HELM_{kind}_HOME"] = str(self.home / kind.lower())
        return env

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([self.helm_bin, *args], capture_output=True, text=True,
                              env=self.env(), timeout=300)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc


@pytest.fixture(scope="session")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Tools:
    bin_dir = Path(run_ensure_script("ensure-helm-tools.sh"))
    return Tools(bin_dir, tmp_path_factory.mktemp("helm-home"))


def values_for(name: str, watch: str = "jobs") -> Obj:
    values = copy.deepcopy(VALUE_SETS[name])
    if values.get("watchNamespace") == "<watch>":
        values["watchNamespace"] = watch
    return values


def values_file(values: Obj, directory: Path) -> Path:
    path = directory / f"values-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def render(tools: Tools, values: Obj, tmp_path: Path, *, release: str = "kubemr",
           namespace: str = "kubemr-system", include_crds: bool = False) -> list[Obj]:
    args = ["template", release, str(CHART), "--namespace", namespace,
            "--values", str(values_file(values, tmp_path))]
    if include_crds:
        args.append("--include-crds")
    return [doc for doc in yaml.safe_load_all(tools.helm(*args).stdout) if doc]


def by_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[Obj], kind: str) -> Obj:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def rules_by_scope(objects: list[Obj]) -> dict[str, dict[tuple[str, str], set[str]]]:
    """Effective rules per scope ("cluster" or a namespace) of the rendered (Cluster)Roles."""
    scopes: dict[str, dict[tuple[str, str], set[str]]] = {}
    for role in by_kind(objects, "ClusterRole") + by_kind(objects, "Role"):
        scope = role["metadata"].get("namespace", "cluster")
        for rule in role["rules"]:
            if rule.get("resourceNames"):
                continue  # checked separately
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    scopes.setdefault(scope, {}).setdefault((group, resource), set()).update(
                        rule["verbs"])
    return scopes


def merged(*rule_sets: dict[tuple[str, str], set[str]]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rules in rule_sets:
        for key, verbs in rules.items():
            out.setdefault(key, set()).update(verbs)
    return out


def container(objects: list[Obj]) -> Obj:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["operator"]
    return dict(pod["containers"][0])


# ----------------------------------------------------------------- lint and render


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_strict_is_clean(tools: Tools, name: str, tmp_path: Path) -> None:
    proc = tools.helm("lint", "--strict", str(CHART), "--namespace", "kubemr-system",
                      "--values", str(values_file(values_for(name), tmp_path)))
    assert "0 chart(s) failed" in proc.stdout
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


@pytest.mark.parametrize(("values", "complaint"), [
    ({"replicaCount": -1}, "/replicaCount"),
    ({"leaderElection": {"leaseDuration": 1.5}}, "/leaderElection/leaseDuration"),
    ({"leaderElection": {"retryPeriod": 0}}, "/leaderElection/retryPeriod"),
    ({"podDisruptionBudget": {"minAvailable": 0}}, "/podDisruptionBudget/minAvailable"),
    ({"operator": {"logLevel": "TRACE"}}, "/operator/logLevel"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"watchNamespace": "Not_A_Namespace"}, "/watchNamespace"),
    ({"s3": {"accessKeyId": "only-half"}}, "/s3/secretAccessKey"),
    ({"s3": {"endpoint": "minio:9000"}}, "/s3/endpoint"),
    ({"resources": {"limit": {"cpu": 1}}}, "limit"),
    ({"rbac": {"create": "yes"}}, "/rbac/create"),
    ({"tmpSizeLimit": "lots"}, "/tmpSizeLimit"),
    ({"operator": {"httpPort": 0}}, "/operator/httpPort"),
    ({"metrics": {"workerPort": 70000}}, "/metrics/workerPort"),
    ({"metrics": {"serviceMonitor": {"interval": "soon"}}}, "/metrics/serviceMonitor/interval"),
    ({"replicas": 1}, "replicas"),  # a typo of replicaCount: unknown keys are refused
    ({"tenancy": {"platformCredentialsNamespaces": "a=b; rm -rf"}},
     "/tenancy/platformCredentialsNamespaces"),
    ({"tenancy": {"podSecurity": {"baselineNamespaces": "=b"}}},
     "/tenancy/podSecurity/baselineNamespaces"),
    ({"tenancy": {"podSecurity": {"privileged": "x"}}}, "privileged"),
])
def test_values_schema_rejects_bad_values(tools: Tools, values: Obj, complaint: str,
                                          tmp_path: Path) -> None:
    proc = tools.helm("template", "x", str(CHART), "--values", str(values_file(values, tmp_path)),
                      check=False)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert complaint in proc.stderr, proc.stderr


def test_half_given_keys_fail_even_without_the_schema(tools: Tools, tmp_path: Path) -> None:
    """The template guards the Secret too (a schema can be skipped: --skip-schema-validation)."""
    proc = tools.helm("template", "x", str(CHART), "--skip-schema-validation",
                      "--set", "s3.secretAccessKey=only-half", check=False)
    assert proc.returncode != 0
    assert "must be given together" in proc.stderr


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_object_carries_the_standard_labels(tools: Tools, name: str,
                                                  tmp_path: Path) -> None:
    objects = render(tools, values_for(name), tmp_path, release="rel")
    assert objects
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "kubemr-async", obj["kind"]
        assert labels["app.kubernetes.io/instance"] == "rel"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "kubemr-async-0.1.0"
        assert "app.kubernetes.io/version" in labels
        if obj["kind"] not in {"ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy",
                               "ValidatingAdmissionPolicyBinding"}:
            assert "namespace" in obj["metadata"], obj["kind"]
    deployment = one(objects, "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert selector == {"app.kubernetes.io/name": "kubemr-async",
                        "app.kubernetes.io/instance": "rel",
                        "app.kubernetes.io/component": "operator"}


def test_operator_deployment_defaults(tools: Tools, tmp_path: Path) -> None:
    objects = render(tools, {}, tmp_path, release="kubemr-async", namespace="ops")
    deployment = one(objects, "Deployment")
    assert deployment["metadata"]["name"] == "kubemr-async"  # not kubemr-async-kubemr-async
    assert deployment["spec"]["replicas"] == 1
    # Leader election is on by default: a new pod waits for the old one's Lease.
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    main = container(objects)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert main["image"] == f"kubemr-async:{chart['appVersion']}"
    assert main["imagePullPolicy"] == "IfNotPresent"
    assert main["command"] == ["kubemr", "operator"]
    assert main["args"] == ["--worker-backoff-limit=4", "--metrics-port=8080",
                            "--worker-metrics-port=9090", "--worker-metrics-linger=30",
                            "--leader-elect", "--leader-elect-lease-name=kubemr-async-leader",
                            "--leader-elect-lease-duration=15",
                            "--leader-elect-renew-deadline=10",
                            "--leader-elect-retry-period=2"]
    # (no --namespace: every namespace)
    security = main["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"cpu", "memory"} <= main["resources"]["requests"].keys()
    assert {"cpu", "memory"} <= main["resources"]["limits"].keys()
    assert main["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # A standby (whose /readyz fails its leader check) is a ready pod: see test_ha_...
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz?exclude=leader",
                                                 "port": "http"}
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    env = {e["name"]: e for e in main["env"]}
    assert env["KUBEMR_OPERATOR_NAMESPACE"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["AWS_REGION"]["value"] == "us-east-1"
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert not by_kind(objects, "PodDisruptionBudget"), "one replica: nothing to keep"
    assert not {"KUBEMR_S3_SECRET", "KUBEMR_S3_ENDPOINT", "AWS_ACCESS_KEY_ID"} & env.keys()


def test_ha_replicas_a_disruption_budget_and_a_rolling_update(tools: Tools,
                                                              tmp_path: Path) -> None:
    """Two replicas elect a leader; drains take them one at a time; an upgrade rolls."""
    objects = render(tools, values_for("ha"), tmp_path, release="rel", namespace="ops")
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate"}
    budget = one(objects, "PodDisruptionBudget")
    assert budget["spec"] == {"minAvailable": 1, "selector": {
        "matchLabels": deployment["spec"]["selector"]["matchLabels"]}}
    args = container(objects)["args"]
    assert args[-5:] == ["--leader-elect", "--leader-elect-lease-name=rel-kubemr-async-leader",
                         "--leader-elect-lease-duration=20",
                         "--leader-elect-renew-deadline=12", "--leader-elect-retry-period=3"]
    off = render(tools, values_for("leader-election-off"), tmp_path, release="rel")
    assert one(off, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    assert not any("--leader-elect" in arg for arg in container(off)["args"])
    assert "POD_NAME" not in {e["name"] for e in container(off)["env"]}
    assert not [r for r in by_kind(off, "Role") if "leader" in r["metadata"]["name"]]


@pytest.mark.parametrize(("values", "complaint"), [
    ({"replicaCount": 2, "leaderElection": {"enabled": False}},
     "replicaCount > 1 needs leaderElection.enabled"),
    ({"leaderElection": {"leaseDuration": 10}},
     "leaderElection.leaseDuration must be greater than leaderElection.renewDeadline"),
    ({"leaderElection": {"retryPeriod": 9}},
     "leaderElection.renewDeadline must be greater than 1.2 x leaderElection.retryPeriod"),
    ({"replicaCount": 2, "podDisruptionBudget": {"minAvailable": 2}},
     "podDisruptionBudget.minAvailable must be less than replicaCount"),
])
def test_ha_settings_that_cannot_work_fail_the_render(tools: Tools, values: Obj, complaint: str,
                                                      tmp_path: Path) -> None:
    proc = tools.helm("template", "x", str(CHART), "--values", str(values_file(values, tmp_path)),
                      check=False)
    assert proc.returncode != 0
    assert complaint in proc.stderr, proc.stderr


def test_metrics_service_and_service_monitor(tools: Tools, tmp_path: Path) -> None:
    """The Service selects the operator pod's `http` port; the ServiceMonitor (off by
    default: it needs the prometheus-operator's CRDs) scrapes that Service; metrics off
    leaves both out, and the workers' port unset, but keeps the probes' port."""
    objects = render(tools, {}, tmp_path, release="rel", namespace="ops")
    service = one(objects, "Service")
    assert service["metadata"]["name"] == "rel-kubemr-async-metrics"
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [{"name": "http-metrics", "port": 8080,
                                         "targetPort": "http", "protocol": "TCP"}]
    assert service["metadata"]["annotations"]["prometheus.io/port"] == "8080"
    assert not by_kind(objects, "ServiceMonitor")
    values = {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}}
    proc = tools.helm("lint", "--strict", str(CHART), "--values",
                      str(values_file(values, tmp_path)))
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout
    monitor = one(render(tools, values, tmp_path, release="rel", namespace="ops"),
                  "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"][
        "labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ops"]}
    assert monitor["spec"]["endpoints"] == [{"port": "http-metrics", "path": "/metrics",
                                             "interval": "30s"}]
    off = render(tools, values_for("metrics-off"), tmp_path)
    assert not by_kind(off, "Service") and not by_kind(off, "ServiceMonitor")
    main = container(off)
    assert main["args"][:2] == ["--worker-backoff-limit=4", "--metrics-port=8080"]
    assert not any(arg.startswith("--worker-metrics") for arg in main["args"])
    assert main["readinessProbe"]["httpGet"]["port"] == "http"


def test_everything_set_reaches_the_objects(tools: Tools, tmp_path: Path) -> None:
    objects = render(tools, values_for("everything-set", "jobs"), tmp_path, namespace="ops")
    deployment = one(objects, "Deployment")
    assert deployment["metadata"]["name"] == "mr"
    assert deployment["spec"]["replicas"] == 0
    assert deployment["metadata"]["annotations"] == {"example.com/owner": "data"}
    template = deployment["spec"]["template"]
    assert template["metadata"]["labels"]["tier"] == "control"
    assert template["metadata"]["annotations"]["example.com/scrape"] == "false"
    pod = template["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"][0]["key"] == "batch"
    assert "nodeAffinity" in pod["affinity"]
    assert pod["volumes"][0]["emptyDir"]["sizeLimit"] == "128Mi"
    main = container(objects)
    assert main["image"] == "registry.example/kubemr-async:1.2.3"
    assert main["imagePullPolicy"] == "Always"
    assert main["args"] == ["--namespace=jobs", "--worker-backoff-limit=1",
                            "--metrics-port=9000", "--worker-metrics-port=9191",
                            "--worker-metrics-linger=5", "--leader-elect",
                            "--leader-elect-lease-name=mr-leader",
                            "--leader-elect-lease-duration=30",
                            "--leader-elect-renew-deadline=20",
                            "--leader-elect-retry-period=4",
                            "--platform-credentials-namespaces=kubemr.io/platform-storage=allowed",
                            "--baseline-namespaces=kubemr.io/pod-security in (baseline)",
                            "--privileged-namespaces=kubemr.io/pod-security=privileged",
                            "--context=in-cluster"]
    assert main["ports"][0]["containerPort"] == 9000
    service = one(objects, "Service")
    assert service["spec"]["ports"][0]["port"] == 9000
    assert service["metadata"]["annotations"]["example.com/team"] == "data"
    assert "livenessProbe" not in main and "readinessProbe" in main
    env = {e["name"]: e for e in main["env"]}
    assert env["KUBEMR_LOG_LEVEL"]["value"] == "DEBUG"
    assert env["HTTPS_PROXY"]["value"] == "http://proxy:3128"
    for obj in objects:
        assert obj["metadata"]["labels"]["team"] == "data"
    account = one(objects, "ServiceAccount")
    assert account["metadata"]["annotations"] == {"example.com/role": "kubemr"}


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rbac_is_exactly_what_the_operator_needs(tools: Tools, name: str,
                                                 tmp_path: Path) -> None:
    values = values_for(name, "jobs")
    objects = render(tools, values, tmp_path, release="rel", namespace="ops")
    roles = by_kind(objects, "ClusterRole") + by_kind(objects, "Role")
    if not values.get("rbac", {}).get("create", True):
        assert not roles and not by_kind(objects, "ClusterRoleBinding")
        assert not by_kind(objects, "RoleBinding")
        return
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, []), (role["metadata"]["name"], rule)
            assert "nonResourceURLs" not in rule
    scopes = rules_by_scope(objects)
    electing = values.get("leaderElection", {}).get("enabled", True)
    # Leader election: create the Lease in the release namespace (create cannot be limited
    # by name), then get and update that one Lease by name (below).
    lease_side = {"ops": {("coordination.k8s.io", "leases"): {"create"}}} if electing else {}
    if values.get("watchNamespace"):
        assert scopes == {"cluster": TASK_SIDE_RULES, "jobs": JOB_SIDE_RULES, **lease_side}
    else:
        assert scopes == {"cluster": merged(JOB_SIDE_RULES, TASK_SIDE_RULES), **lease_side}
    # Secrets: create (the per-job copy) as above, plus get on the one S3 Secret by name.
    named = [(role["metadata"].get("namespace"), rule) for role in roles
             for rule in role["rules"] if rule.get("resourceNames")]
    env = {e["name"]: e.get("value") for e in container(objects)["env"]}
    secret = env.get("KUBEMR_S3_SECRET")
    expected = []
    if electing:
        lease = f"{values.get('fullnameOverride') or 'rel-kubemr-async'}-leader"
        expected.append(("ops", {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                                 "resourceNames": [lease], "verbs": ["get", "update"]}))
    if secret:
        expected.append(("ops", {"apiGroups": [""], "resources": ["secrets"],
                                 "resourceNames": [secret], "verbs": ["get"]}))
    assert named == expected
    # Every (Cluster)Role is bound to the operator's ServiceAccount and nothing else.
    account = one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    assert account == (values.get("fullnameOverride") or "rel-kubemr-async")
    bindings = by_kind(objects, "ClusterRoleBinding") + by_kind(objects, "RoleBinding")
    assert sorted((b["roleRef"]["kind"], b["roleRef"]["name"]) for b in bindings) == sorted(
        (r["kind"], r["metadata"]["name"]) for r in roles)
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account,
                                        "namespace": "ops"}]


@pytest.mark.parametrize(("name", "secret", "chart_made"), [
    ("defaults", None, False),
    ("cluster-wide-with-keys", "rel-kubemr-async-s3", True),
    ("namespaced-existing-secret", "s3-credentials", False),
])
def test_s3_settings_and_secret_modes(tools: Tools, name: str, secret: str | None,
                                      chart_made: bool, tmp_path: Path) -> None:
    values = values_for(name)
    objects = render(tools, values, tmp_path, release="rel", namespace="ops")
    env = {e["name"]: e for e in container(objects)["env"]}
    annotations = one(objects, "Deployment")["spec"]["template"]["metadata"].get(
        "annotations") or {}
    secrets = by_kind(objects, "Secret")
    if secret is None:
        assert not secrets and "KUBEMR_S3_SECRET" not in env
        assert "AWS_ACCESS_KEY_ID" not in env
        return
    assert env["KUBEMR_S3_SECRET"]["value"] == secret
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"] == {"secretKeyRef": {"name": secret, "key": key}}
    if chart_made:
        (made,) = secrets
        assert made["metadata"]["name"] == secret and made["type"] == "Opaque"
        s3 = values["s3"]
        assert base64.b64decode(made["data"]["AWS_ACCESS_KEY_ID"]).decode() == s3["accessKeyId"]
        assert base64.b64decode(made["data"]["AWS_SECRET_ACCESS_KEY"]).decode() == s3[
            "secretAccessKey"]
        assert env["KUBEMR_S3_ENDPOINT"]["value"] == s3["endpoint"]
        assert env["AWS_REGION"]["value"] == s3["region"]
        assert "checksum/s3-secret" in annotations
    else:
        assert not secrets, "an existing Secret is never rendered or overwritten"
        assert "checksum/s3-secret" not in annotations


def test_admission_policy_pins_the_operator_and_the_watched_namespace(
        tools: Tools, tmp_path: Path) -> None:
    objects = render(tools, values_for("namespaced-existing-secret", "jobs"), tmp_path,
                     release="rel", namespace="ops")
    policy = one(objects, "ValidatingAdmissionPolicy")
    (condition,) = policy["spec"]["matchConditions"]
    assert condition["expression"] == (
        "request.userInfo.username == 'system:serviceaccount:ops:rel-kubemr-async'")
    text = json.dumps(policy["spec"]["validations"])
    assert "labels['kubemr.io/job-namespace'] == 'jobs'" in text
    binding = one(objects, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": policy["metadata"]["name"],
                               "validationActions": ["Deny"]}
    off = render(tools, {"admissionPolicy": {"enabled": False}}, tmp_path)
    assert not by_kind(off, "ValidatingAdmissionPolicy")


def test_warm_pool_renders_its_namespace_its_rbac_and_the_operators_flags(
        tools: Tools, tmp_path: Path) -> None:
    values = {"warmPool": {"workers": 2, "image": "registry.example/wc:1", "namespace": "pool"}}
    objects = render(tools, values, tmp_path, release="rel", namespace="ops")
    (namespace,) = [o for o in by_kind(objects, "Namespace") if o["metadata"]["name"] == "pool"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    args = container(objects)["args"]
    assert {"--warm-workers=2", "--warm-image=registry.example/wc:1",
            "--pool-namespace=pool"} <= set(args)
    assert rules_by_scope(objects)["pool"] == {
        ("", "pods"): {"get", "list", "watch", "create", "patch", "delete"},
        ("", "serviceaccounts"): {"list", "create", "delete"},
        ("rbac.authorization.k8s.io", "roles"): {"create", "delete"},
        ("rbac.authorization.k8s.io", "rolebindings"): {"create", "delete"},
        ("", "secrets"): {"create"}}
    (role,) = [r for r in by_kind(objects, "Role") if r["metadata"]["namespace"] == "pool"]
    assert [r for r in role["rules"] if r.get("resourceNames")] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["kubemr-standby-s3"],
         "verbs": ["get", "patch"]}]
    policy = json.dumps(one(objects, "ValidatingAdmissionPolicy")["spec"]["validations"])
    assert "request.namespace == 'pool'" in policy
    # No pool: no namespace, no flags, and the policy allows job Secrets only.
    plain = render(tools, {}, tmp_path, release="rel", namespace="ops")
    assert not by_kind(plain, "Namespace")
    assert not any(a.startswith("--warm") for a in container(plain)["args"])
    assert "kubemr-standby-s3" not in json.dumps(one(plain, "ValidatingAdmissionPolicy"))
    proc = tools.helm("template", "x", str(CHART), "--values",
                      str(values_file({"warmPool": {"workers": 1}}, tmp_path)), check=False)
    assert proc.returncode != 0 and "warmPool.image is required" in proc.stderr


def test_chart_ships_the_generated_crds_as_they_are(tools: Tools, tmp_path: Path) -> None:
    """crds/ (written by kubemr_async.crd) is the only source: helm installs those files."""
    files = sorted(CHART.joinpath("crds").glob("*.yaml"))
    assert {p.name for p in files} == {"mapreducejobs.yaml", "mapreducetasks.yaml"}
    from_files = [yaml.safe_load(p.read_text()) for p in files]
    rendered = by_kind(render(tools, {}, tmp_path, include_crds=True),
                       "CustomResourceDefinition")
    key = lambda o: o["metadata"]["name"]  # noqa: E731
    assert sorted(rendered, key=key) == sorted(from_files, key=key)
    for path in CHART.rglob("*"):
        if path.is_file() and path.parent.name != "crds":
            assert "kind: CustomResourceDefinition" not in path.read_text(errors="replace"), path


def test_packaged_chart_holds_the_chart_and_nothing_else(tools: Tools, tmp_path: Path) -> None:
    tools.helm("package", str(CHART), "--destination", str(tmp_path))
    (package,) = tmp_path.glob("kubemr-async-*.tgz")
    with tarfile.open(package) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames()}
    expected = {"Chart.yaml", "values.yaml", "values.schema.json", "README.md", ".helmignore",
                *(p.relative_to(CHART).as_posix() for p in CHART.glob("crds/*.yaml")),
                *(p.relative_to(CHART).as_posix() for p in CHART.glob("templates/*"))}
    assert names == expected


# ------------------------------------------------------- schemas from the API server

OPENAPI_REF = "#/definitions/"
# Types the OpenAPI document declares as strings but that accept numbers in manifests.
_SPECIAL_TYPES: dict[str, Obj] = {
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString": {"type": ["string", "integer"]},
    "io.k8s.apimachinery.pkg.api.resource.Quantity": {"type": ["string", "number"]},
}


def _strict(schema: Any) -> Any:
    """A copy where every object schema with properties refuses unknown ones (kubeconform's
    "-strict" schema flavour); descriptions dropped. Walks schema keywords only, so a
    property that happens to be called "properties" is not mistaken for the keyword."""
    if not isinstance(schema, dict):
        return schema
    out = {k: v for k, v in schema.items()
           if k != "description" and k != "x-kubernetes-group-version-kind"}
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if ("additionalProperties" not in out
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = _strict(out["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(out.get(key), list):
            out[key] = [_strict(s) for s in out[key]]
    return out


def _refs(schema: Any) -> set[str]:
    if isinstance(schema, dict):
        found = {schema["$ref"][len(OPENAPI_REF):]} if isinstance(
            schema.get("$ref"), str) and schema["$ref"].startswith(OPENAPI_REF) else set()
        return found.union(*(_refs(v) for v in schema.values()))
    if isinstance(schema, list):
        return set().union(*(_refs(v) for v in schema))
    return set()


def openapi_to_json_schemas(openapi: Obj) -> dict[str, str]:
    """One standalone, strict JSON schema per kind of an OpenAPI v2 document, by file name
    as kubeconform looks them up: <kind>[-<group's first label>]-<version>.json.

    The approach of kubeconform's openapi2jsonschema, except that $refs are kept (with the
    referenced definitions copied into each file) instead of inlined, so recursive types
    such as a CRD's JSONSchemaProps stay finite.
    """
    definitions = {name: _SPECIAL_TYPES.get(name) or _strict(schema)
                   for name, schema in openapi["definitions"].items()}
    chosen: dict[str, tuple[int, str]] = {}
    for name, raw in openapi["definitions"].items():
        kinds = raw.get("x-kubernetes-group-version-kind") or []
        for gvk in kinds:
            group = gvk["group"].split(".")[0].lower()
            file = f"{gvk['kind'].lower()}{'-' + group if group else ''}-{gvk['version']}.json"
            # Shared types (DeleteOptions, WatchEvent) name many kinds; a kind's own wins.
            if file not in chosen or len(kinds) < chosen[file][0]:
                chosen[file] = (len(kinds), name)
    files = {}
    for file, (_, name) in sorted(chosen.items()):
        closure: set[str] = set()
        todo = [name]
        while todo:
            current = todo.pop()
            if current not in closure:
                closure.add(current)
                todo += _refs(definitions[current])
        schema = {**definitions[name],
                  "definitions": {n: definitions[n] for n in sorted(closure)}}
        files[file] = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    return files


@pytest.fixture(scope="module")
def kube_schemas(kube_cluster: TestCluster, crds: None) -> str:
    """kubeconform -schema-location for JSON schemas of every kind the test API server
    serves (the CRDs included), cached by content under $KUBEMR_CACHE/kube-schemas."""
    files = openapi_to_json_schemas(kube_cluster.api("GET", "/openapi/v2"))
    assert len(files) > 100 and "deployment-apps-v1.json" in files
    assert "mapreducejob-kubemr-v1alpha1.json" in files
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]
    version = kube_cluster.api("GET", "/version")["gitVersion"]
    cache = Path(os.environ.get("KUBEMR_CACHE") or Path.home() / ".cache" / "kubemr-async")
    target = cache / "kube-schemas" / f"{version}-{digest}"
    if not target.is_dir():
        stage = target.with_name(f"{target.name}.partial-{uuid.uuid4().hex[:8]}")
        stage.mkdir(parents=True)
        for file, text in files.items():
            (stage / file).write_text(text)
        try:
            stage.rename(target)
        except OSError:  # another session published the same schemas first
            shutil.rmtree(stage)
    return str(target / "{{ .ResourceKind }}{{ .KindSuffix }}.json")


def kubeconform(tools: Tools, schemas: str, manifests: str) -> Obj:
    proc = subprocess.run(
        [tools.kubeconform_bin, "-strict", "-summary", "-output", "json",
         "-schema-location", schemas, "-"],
        input=manifests, capture_output=True, text=True, timeout=120)
    report: Obj = json.loads(proc.stdout)
    report["returncode"] = proc.returncode
    return report


@pytest.mark.kube
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_manifests_pass_kubeconform(tools: Tools, kube_schemas: str, name: str,
                                             tmp_path: Path) -> None:
    objects = render(tools, values_for(name), tmp_path, include_crds=True)
    report = kubeconform(tools, kube_schemas, yaml.safe_dump_all(objects))
    assert report["returncode"] == 0, report["resources"]
    summary = report["summary"]
    assert summary["valid"] == len(objects), summary
    assert summary["invalid"] == summary["errors"] == summary["skipped"] == 0, summary


@pytest.mark.kube
@pytest.mark.slow
def test_kubeconform_with_these_schemas_catches_mistakes(tools: Tools, kube_schemas: str,
                                                         tmp_path: Path) -> None:
    """The generated schemas are strict and really used: typos and wrong types fail."""
    objects = render(tools, {}, tmp_path)
    deployment = one(objects, "Deployment")
    deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonroot"] = True
    role = one(objects, "ClusterRole")
    role["rules"][0]["verbs"] = "get"
    report = kubeconform(tools, kube_schemas, yaml.safe_dump_all(objects))
    assert report["returncode"] != 0
    invalid = {r["kind"]: r["msg"] for r in report["resources"] if r["status"] != "statusValid"}
    assert set(invalid) == {"Deployment", "ClusterRole"}, invalid
    assert "runAsNonroot" in invalid["Deployment"]


@pytest.mark.kube
@pytest.mark.slow
def test_example_job_manifest_passes_kubeconform(tools: Tools, kube_schemas: str) -> None:
    """The same schemas hold the CRDs' kinds: examples/wordcount.yaml is a valid job."""
    manifest = (ROOT / "examples" / "wordcount.yaml").read_text()
    report = kubeconform(tools, kube_schemas, manifest)
    assert report["returncode"] == 0 and report["summary"]["valid"] == 1, report
    broken = kubeconform(tools, kube_schemas, manifest.replace("reducers:", "reducer:"))
    assert broken["summary"]["invalid"] == 1, broken


# ------------------------------------------------------------- the real API server


def resource_paths(cluster: TestCluster) -> dict[tuple[str, str], tuple[str, bool]]:
    """(apiVersion, kind) -> (plural, namespaced), from the server's discovery documents."""
    found: dict[tuple[str, str], tuple[str, bool]] = {}
    versions = ["v1"] + [f"{g['name']}/{v['version']}"
                         for g in cluster.api("GET", "/apis")["groups"] for v in g["versions"]]
    for version in versions:
        base = "/api/v1" if version == "v1" else f"/apis/{version}"
        for res in cluster.api("GET", base)["resources"]:
            if "/" not in res["name"]:
                found[(version, res["kind"])] = (res["name"], res["namespaced"])
    return found


def object_path(paths: dict[tuple[str, str], tuple[str, bool]], obj: Obj) -> str:
    plural, namespaced = paths[(obj["apiVersion"], obj["kind"])]
    base = "/api/v1" if obj["apiVersion"] == "v1" else f"/apis/{obj['apiVersion']}"
    if namespaced:
        base += f"/namespaces/{obj['metadata']['namespace']}"
    return f"{base}/{plural}/{obj['metadata']['name']}"


def create_namespace(cluster: TestCluster, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    cluster.create_namespace(name)
    return name


def delete_namespace(cluster: TestCluster, name: str) -> None:
    try:
        cluster.api("DELETE", f"/api/v1/namespaces/{name}")
    except ApiError as exc:
        if exc.status != 404:
            raise


@pytest.mark.kube
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_objects_pass_a_server_side_dry_run(
        tools: Tools, kube_cluster: TestCluster, crds: None, kube_namespace: str, name: str,
        tmp_path: Path) -> None:
    """`kubectl apply --server-side --dry-run=server` for every object, over the REST API
    (a fresh machine may have no kubectl): full validation and admission, nothing stored."""
    watch = create_namespace(kube_cluster, "watch")
    try:
        objects = render(tools, values_for(name, watch), tmp_path,
                         release=f"dry{uuid.uuid4().hex[:6]}", namespace=kube_namespace,
                         include_crds=True)
        paths = resource_paths(kube_cluster)
        for obj in objects:
            applied = kube_cluster.api(
                "PATCH", object_path(paths, obj)
                + "?dryRun=All&fieldManager=kubemr-chart-test&force=true",
                obj, content_type="application/apply-patch+yaml")
            assert applied["kind"] == obj["kind"]
            assert applied["metadata"]["name"] == obj["metadata"]["name"]
    finally:
        delete_namespace(kube_cluster, watch)


def call_as(cluster: TestCluster, token: str, method: str, path: str, body: Any = None) -> Any:
    """``cluster.api`` with a ServiceAccount's token, retrying 429 Too Many Requests as
    every Kubernetes client does: API Priority and Fairness throttles ServiceAccounts
    (the admin is exempt) when a loaded test machine slows the server down."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return cluster.api(method, path, body, token=token)
        except ApiError as exc:
            if exc.status != 429 or time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def access(cluster: TestCluster, token: str, verb: str, resource: str, namespace: str = "",
           name: str = "") -> bool:
    """A SelfSubjectAccessReview as the token's owner. ``resource`` is
    ``[group/]plural[/subresource]`` ("" group for core)."""
    group, _, rest = resource.rpartition(":")
    plural, _, sub = rest.partition("/")
    attrs = {"verb": verb, "group": group, "resource": plural, "subresource": sub,
             "namespace": namespace, "name": name}
    review = call_as(cluster, token, "POST",
                     "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                     {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                      "spec": {"resourceAttributes": attrs}})
    return bool(review["status"].get("allowed"))


def status_of(cluster: TestCluster, token: str, method: str, path: str,
              body: Any = None) -> int:
    try:
        call_as(cluster, token, method, path, body)
    except ApiError as exc:
        return exc.status
    return 200


@dataclass
class Release:
    name: str
    namespace: str
    manifest: list[Obj]

    def account(self) -> str:
        return str(one(self.manifest, "ServiceAccount")["metadata"]["name"])



@contextlib.contextmanager
def installed(tools: Tools, cluster: TestCluster, values: Obj, namespace: str,
              tmp_path: Path) -> Iterator[Release]:
    """`helm install` into the test API server (helm 3 needs nothing in the cluster), and
    `helm uninstall` afterwards; yields the release with its manifest as installed."""
    name = f"mr{uuid.uuid4().hex[:6]}"
    kubeconfig = ("--kubeconfig", str(cluster.kubeconfig_path))
    tools.helm("install", name, str(CHART), "--namespace", namespace, *kubeconfig,
               "--values", str(values_file(values, tmp_path)), "--timeout", "2m")
    try:
        manifest = tools.helm("get", "manifest", name, "--namespace", namespace,
                              *kubeconfig).stdout
        yield Release(name, namespace, [doc for doc in yaml.safe_load_all(manifest) if doc])
    finally:
        tools.helm("uninstall", name, "--namespace", namespace, *kubeconfig, "--wait",
                   "--timeout", "2m")


def eventually(probe: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.3)


@pytest.mark.kube
@pytest.mark.slow
def test_notes_tell_how_to_run_the_example(tools: Tools, kube_cluster: TestCluster,
                                           tmp_path: Path) -> None:
    """NOTES.txt is rendered by install only, which wants a reachable cluster even for
    --dry-run=client."""
    for values, namespace_flag in (({}, ""), ({"watchNamespace": "jobs"}, " -n jobs")):
        proc = tools.helm("install", "demo", str(CHART), "--dry-run=client",
                          "--namespace", "ops", "--kubeconfig", str(kube_cluster.kubeconfig_path),
                          "--values", str(values_file(values, tmp_path)))
        notes = proc.stdout.split("NOTES:", 1)[1]
        assert f"kubectl create{namespace_flag} -f examples/wordcount.yaml" in notes
        assert f"kubectl get mrj{namespace_flag} -w" in notes
        assert "docker build -f examples/Dockerfile" in notes
        assert "Service demo-kubemr-async-metrics (port 8080, /metrics)" in notes


@pytest.mark.kube
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_installed_chart_grants_the_operator_what_it_needs_and_nothing_else(
        tools: Tools, kube_cluster: TestCluster, crds: None, kube_namespace: str, mode: str,
        tmp_path: Path) -> None:
    watch = create_namespace(kube_cluster, "jobs")
    other = create_namespace(kube_cluster, "other")
    values: Obj = {"replicaCount": 0, "s3": {"accessKeyId": "k", "secretAccessKey": "s"}}
    if mode == "namespaced":
        values["watchNamespace"] = watch
    try:
        with installed(tools, kube_cluster, values, kube_namespace, tmp_path) as release:
            check_operator_access(kube_cluster, release, mode, watch, other)
            cluster_objects = [o for o in release.manifest if "namespace" not in o["metadata"]]
            assert {o["kind"] for o in cluster_objects} == {
                "ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy",
                "ValidatingAdmissionPolicyBinding"}
            paths = resource_paths(kube_cluster)
        for obj in release.manifest:  # uninstalled: nothing is left behind
            with pytest.raises(ApiError) as gone:
                kube_cluster.api("GET", object_path(paths, obj))
            assert gone.value.status == 404, obj["kind"]
    finally:
        delete_namespace(kube_cluster, watch)
        delete_namespace(kube_cluster, other)


def check_operator_access(cluster: TestCluster, release: Release, mode: str, watch: str,
                          other: str) -> None:
    token = cluster.token_for(release.namespace, release.account())
    s3_secret = one(release.manifest, "Secret")["metadata"]["name"]
    task_ns = "kubemr-made-up-task-namespace-0a1b2c3d"  # names are made up per job
    lease = next(arg for arg in container(release.manifest)["args"]
                 if arg.startswith("--leader-elect-lease-name=")).partition("=")[2]
    job_namespaces = [watch] if mode == "namespaced" else [watch, other]

    allowed: list[tuple[str, str, str, str]] = [  # verb, [group:]resource, namespace, name
        ("get", ":secrets", release.namespace, s3_secret),
        ("create", ":namespaces", "", ""),
        ("get", ":namespaces", "", task_ns),
        ("delete", ":namespaces", "", task_ns),
        *[(verb, "kubemr.io:mapreducetasks", task_ns, "")
          for verb in ("get", "list", "watch", "create", "patch")],
        ("create", "rbac.authorization.k8s.io:roles", task_ns, ""),
        ("create", "rbac.authorization.k8s.io:rolebindings", task_ns, ""),
        ("create", "coordination.k8s.io:leases", release.namespace, ""),
        ("get", "coordination.k8s.io:leases", release.namespace, lease),
        ("update", "coordination.k8s.io:leases", release.namespace, lease),
    ]
    for ns in job_namespaces:
        allowed += [(verb, "kubemr.io:mapreducejobs", ns, "")
                    for verb in ("get", "list", "watch", "patch", "delete")]
        allowed += [(verb, "kubemr.io:mapreducejobs/status", ns, "")
                    for verb in ("get", "list", "watch", "patch")]
        allowed += [("create", ":serviceaccounts", ns, ""),
                    ("create", "rbac.authorization.k8s.io:roles", ns, ""),
                    ("create", "rbac.authorization.k8s.io:rolebindings", ns, ""),
                    ("get", "batch:jobs", ns, ""), ("create", "batch:jobs", ns, ""),
                    ("delete", "batch:jobs", ns, ""), ("list", ":pods", ns, ""),
                    ("create", ":secrets", ns, ""), ("create", ":events", ns, ""),
                    # A job's own credentials Secret, by name (spec.storage).
                    ("get", ":secrets", ns, "team-s3")]
    denied: list[tuple[str, str, str, str]] = [
        # Secrets: never listed or watched; read by name only the S3 Secret and, in job
        # namespaces, a job's credentials Secret.
        ("list", ":secrets", other, ""), ("list", ":secrets", watch, ""),
        ("watch", ":secrets", watch, ""),
        ("list", ":secrets", release.namespace, ""), ("watch", ":secrets", release.namespace, ""),
        ("list", ":secrets", "", ""),
        ("update", ":secrets", release.namespace, s3_secret),
        ("delete", ":secrets", release.namespace, s3_secret),
        # Nothing it does not use.
        ("get", ":configmaps", other, "kube-root-ca.crt"), ("list", ":configmaps", "", ""),
        ("delete", ":nodes", "", "node-1"), ("list", ":nodes", "", ""),
        ("create", ":pods", watch, ""), ("delete", ":pods", watch, ""),
        ("create", ":pods/exec", watch, ""), ("get", ":pods/log", watch, ""),
        ("create", ":serviceaccounts/token", watch, "default"),
        ("get", ":serviceaccounts", watch, ""), ("delete", ":serviceaccounts", watch, ""),
        ("list", ":namespaces", "", ""), ("patch", ":namespaces", "", task_ns),
        ("update", ":namespaces", "", task_ns),
        ("create", "kubemr.io:mapreducejobs", watch, ""),
        ("update", "kubemr.io:mapreducejobs", watch, ""),
        ("delete", "kubemr.io:mapreducetasks", task_ns, ""),
        ("deletecollection", "kubemr.io:mapreducetasks", task_ns, ""),
        ("update", "kubemr.io:mapreducetasks", task_ns, ""),
        ("create", "rbac.authorization.k8s.io:clusterroles", "", ""),
        ("create", "rbac.authorization.k8s.io:clusterrolebindings", "", ""),
        ("bind", "rbac.authorization.k8s.io:clusterroles", "", "cluster-admin"),
        ("escalate", "rbac.authorization.k8s.io:roles", watch, ""),
        ("delete", "rbac.authorization.k8s.io:roles", watch, ""),
        ("impersonate", ":users", "", "admin"),
        ("create", "apps:deployments", watch, ""), ("list", "batch:jobs", watch, ""),
        ("update", "batch:jobs", watch, ""),
        ("create", "apiextensions.k8s.io:customresourcedefinitions", "", ""),
        # Leases: only its own, and neither listed nor deleted.
        ("get", "coordination.k8s.io:leases", release.namespace, "some-other-lease"),
        ("update", "coordination.k8s.io:leases", release.namespace, "some-other-lease"),
        ("list", "coordination.k8s.io:leases", release.namespace, ""),
        ("watch", "coordination.k8s.io:leases", release.namespace, ""),
        ("delete", "coordination.k8s.io:leases", release.namespace, lease),
        ("patch", "coordination.k8s.io:leases", release.namespace, lease),
        ("create", "coordination.k8s.io:leases", other, ""),
    ]
    if mode == "namespaced":
        denied += [("list", "kubemr.io:mapreducejobs", "", ""),
                   ("watch", "kubemr.io:mapreducejobs", "", ""),
                   ("get", "kubemr.io:mapreducejobs", other, ""),
                   ("patch", "kubemr.io:mapreducejobs/status", other, ""),
                   ("create", ":secrets", other, ""), ("create", "batch:jobs", other, ""),
                   ("get", ":secrets", other, s3_secret),
                   # Cluster-wide, the release namespace may hold jobs too (and their
                   # credentials Secrets); namespaced, only the S3 Secret is readable there.
                   ("get", ":secrets", release.namespace, "some-other-secret"),
                   ("create", ":serviceaccounts", other, ""),
                   ("create", ":events", other, "")]
    else:
        allowed += [("list", "kubemr.io:mapreducejobs", "", ""),
                    ("watch", "kubemr.io:mapreducejobs", "", "")]
    wrong = [("should be allowed", a) for a in allowed if not access(cluster, token, *a)]
    wrong += [("should be denied", d) for d in denied if access(cluster, token, *d)]
    assert not wrong, wrong

    # The same through real requests.
    api = f"/api/v1/namespaces/{release.namespace}"
    assert status_of(cluster, token, "GET", f"{api}/secrets/{s3_secret}") == 200
    assert status_of(cluster, token, "GET", f"{api}/secrets") == 403
    assert status_of(cluster, token, "GET", f"/api/v1/namespaces/{other}/secrets") == 403
    if mode == "namespaced":
        assert status_of(cluster, token, "GET", f"/api/v1/namespaces/{other}/secrets/x") == 403
    assert status_of(cluster, token, "GET",
                     f"/api/v1/namespaces/{other}/configmaps/kube-root-ca.crt") == 403
    assert status_of(cluster, token, "DELETE", "/api/v1/nodes/node-1") == 403
    assert status_of(cluster, token, "GET", f"{GROUP_PATH}/namespaces/{watch}/mapreducejobs") \
        == 200
    assert status_of(cluster, token, "GET", f"{GROUP_PATH}/mapreducejobs") == (
        403 if mode == "namespaced" else 200)

    # The admission policy narrows what RBAC grants by name-less rules (dry runs: admission
    # runs, nothing is stored).
    def namespace(labels: dict[str, str]) -> Obj:
        return {"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": f"probe-{uuid.uuid4().hex[:8]}", "labels": labels}}

    def secret(kind: str, labels: dict[str, str]) -> Obj:
        return {"apiVersion": "v1", "kind": "Secret", "type": kind,
                "metadata": {"name": f"probe-{uuid.uuid4().hex[:8]}", "labels": labels,
                             "annotations": {"kubernetes.io/service-account.name": "default"}}}

    def dry(method: str, path: str, body: Obj | None = None) -> tuple[int, str]:
        try:
            call_as(cluster, token, method, f"{path}?dryRun=All", body)
        except ApiError as exc:
            return exc.status, str(exc)
        return 200, ""

    task_labels = {"kubemr.io/job": "wc", "kubemr.io/job-namespace": watch}
    eventually(lambda: dry("POST", "/api/v1/namespaces", namespace({}))[0] == 403,
               "the admission policy to take effect")
    _, message = dry("POST", "/api/v1/namespaces", namespace({}))
    assert "may only create or delete task namespaces" in message
    assert dry("POST", "/api/v1/namespaces", namespace(task_labels))[0] == 200
    assert dry("DELETE", f"/api/v1/namespaces/{other}")[0] == 403
    foreign = {**task_labels, "kubemr.io/job-namespace": other}
    assert dry("POST", "/api/v1/namespaces", namespace(foreign))[0] == (
        403 if mode == "namespaced" else 200)
    secrets = f"/api/v1/namespaces/{watch}/secrets"
    assert dry("POST", secrets, secret("Opaque", {"kubemr.io/job": "wc"}))[0] == 200
    assert dry("POST", secrets, secret("Opaque", {}))[0] == 403
    assert dry("POST", secrets, secret("kubernetes.io/service-account-token",
                                       {"kubemr.io/job": "wc"}))[0] == 403


# ------------------------------------------- the operator with the chart's credentials


def jobs_path(namespace: str, name: str = "") -> str:
    return f"{GROUP_PATH}/namespaces/{namespace}/mapreducejobs" + (f"/{name}" if name else "")


def upload_example_data(s3: S3Server) -> Any:
    import boto3  # type: ignore[import-untyped]

    client = boto3.client("s3", endpoint_url=s3.endpoint_url, aws_access_key_id=s3.access_key,
                          aws_secret_access_key=s3.secret_key, region_name=s3.region)
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou,
                             client.exceptions.BucketAlreadyExists):
        client.create_bucket(Bucket=BUCKET)
    for path in sorted(DATA.iterdir()):
        client.put_object(Bucket=BUCKET, Key=f"data/{path.name}", Body=path.read_bytes())
    return client


def operator_command(cluster: TestCluster, release: Release) -> tuple[list[str], dict[str, str]]:
    """The operator container's argv and environment, resolved the way a kubelet would
    (values, the namespace fieldRef, Secret keys), from the Deployment as installed."""
    deployment = one(release.manifest, "Deployment")
    main = deployment["spec"]["template"]["spec"]["containers"][0]
    argv = [*main["command"], *main.get("args", [])]
    assert argv[0] == "kubemr"
    # PYTHONPATH: this checkout's code (as the pods run it), not whatever the venv's
    # editable install points at (another worktree's).
    env = {"PATH": str(Path(KUBEMR).parent), "HOME": str(Path.home()), "PYTHONPATH": str(ROOT)}
    for var in main.get("env", []):
        source = var.get("valueFrom")
        if source is None:
            env[var["name"]] = var["value"]
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[var["name"]] = release.namespace
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[var["name"]] = f"{release.name}-operator-0"  # the pod this test plays
        else:
            ref = source["secretKeyRef"]
            data = cluster.api("GET", f"/api/v1/namespaces/{release.namespace}/secrets/"
                                      f"{ref['name']}")["data"]
            env[var["name"]] = base64.b64decode(data[ref["key"]]).decode()
    return [KUBEMR, *argv[1:]], env


@pytest.mark.kube
@pytest.mark.s3
@pytest.mark.slow
def test_operator_with_only_the_charts_permissions_runs_the_wordcount_example(
        tools: Tools, kube_cluster: TestCluster, crds: None, fake_kubelet: Any,
        s3_server: S3Server, tmp_path: Path) -> None:
    """THE proof that the chart's RBAC suffices: `kubemr operator` with the Deployment's
    args and env, authenticated as the chart's ServiceAccount and nothing else, runs
    `kubectl create -f examples/wordcount.yaml` to success, and cleans up after it.

    Namespaced mode, so that this operator (and only it) handles the job's namespace; the
    release lives in a namespace of its own (replicaCount 0: this test plays its pod).
    """
    operator_ns = create_namespace(kube_cluster, "kubemr-op")
    jobs_ns = create_namespace(kube_cluster, "kubemr-jobs")
    pool_ns = f"kubemr-pool-{uuid.uuid4().hex[:6]}"  # the chart makes it
    s3 = upload_example_data(s3_server)
    example = yaml.safe_load((ROOT / "examples" / "wordcount.yaml").read_text())
    http_port = free_port()
    values = {"replicaCount": 0, "watchNamespace": jobs_ns,
              "operator": {"logLevel": "DEBUG", "workerBackoffLimit": 1, "httpPort": http_port},
              # Worker pods of this machine's kubelet share one host: a free port for them.
              "metrics": {"enabled": True, "workerPort": free_port(),
                          "workerLingerSeconds": 30, "serviceMonitor": {"enabled": False}},
              "s3": {"endpoint": s3_server.endpoint_url, "region": s3_server.region,
                     "accessKeyId": s3_server.access_key,
                     "secretAccessKey": s3_server.secret_key},
              # The example names no credentials of its own: the admin allows the
              # platform's in its namespace.
              "tenancy": {"platformCredentialsNamespaces":
                          f"kubernetes.io/metadata.name={jobs_ns}"},
              # One standby, which the example (its image, no template, the platform's
              # credentials) adopts as one of its two workers.
              "warmPool": {"workers": 1, "image": example["spec"]["image"],
                           "namespace": pool_ns}}
    log = tmp_path / "operator.log"
    try:
        with installed(tools, kube_cluster, values, operator_ns, tmp_path) as release:
            argv, env = operator_command(kube_cluster, release)
            assert f"--namespace={jobs_ns}" in argv
            assert ("--platform-credentials-namespaces=kubernetes.io/metadata.name="
                    f"{jobs_ns}") in argv
            token = kube_cluster.token_for(operator_ns, release.account())
            kubeconfig = kube_cluster.kubeconfig_for_token(token, tmp_path / "op.kubeconfig")
            with log.open("wb") as out:
                proc = subprocess.Popen([*argv, "--kubeconfig", str(kubeconfig)], env=env,
                                        stdout=out, stderr=subprocess.STDOUT)
            try:
                # The probes' endpoints, where the Deployment's args put them.
                wait_for_status(f"http://127.0.0.1:{http_port}/healthz", 200)
                wait_for_status(f"http://127.0.0.1:{http_port}/readyz", 200)
                standby = eventually(lambda: waiting_standby(fake_kubelet, pool_ns),
                                     "a standby waiting in the warm pool", timeout=120)
                run_wordcount(kube_cluster, jobs_ns, s3, log)
                assert "standby adopted" in fake_kubelet.logs(pool_ns, standby), \
                    "the example adopted the standby (its RBAC granted by the operator)"
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        text = log.read_text(errors="replace")
        assert "Forbidden" not in text and " 403" not in text, text[-3000:]
    finally:
        delete_namespace(kube_cluster, jobs_ns)
        delete_namespace(kube_cluster, operator_ns)


def waiting_standby(kubelet: Any, namespace: str) -> str | None:
    """A standby of the pool in ``namespace`` that says it is waiting for a job."""
    for log in sorted((kubelet.log_dir / namespace).glob("kubemr-standby-*.log")):
        if "standby waiting" in log.read_text(errors="replace"):
            return log.stem
    return None


def run_wordcount(cluster: TestCluster, namespace: str, s3: Any, log: Path) -> None:
    manifest = yaml.safe_load((ROOT / "examples" / "wordcount.yaml").read_text())
    name = cluster.api("POST", jobs_path(namespace), manifest)["metadata"]["name"]

    def decided() -> Obj | None:
        job: Obj = cluster.api("GET", jobs_path(namespace, name))
        return job if (job.get("status") or {}).get("phase") in ("Succeeded", "Failed") else None

    try:
        job = eventually(decided, f"job {name} to finish", timeout=240)
    except AssertionError as exc:
        raise AssertionError(f"job {name} did not finish: "
                             f"{cluster.api('GET', jobs_path(namespace, name)).get('status')}"
                             f"\noperator log:\n{log.read_text(errors='replace')[-4000:]}") from exc
    status = job["status"]
    assert status["phase"] == "Succeeded", (status, log.read_text(errors="replace")[-4000:])
    counts: Counter[bytes] = Counter()
    for path in DATA.iterdir():
        counts.update(path.read_bytes().split())
    lines: list[bytes] = []
    assert len(status["results"]) == 2
    for url in status["results"]:
        key = url[len(f"s3://{BUCKET}/"):]
        lines += s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().splitlines()
    assert sorted(lines) == sorted(w + b"\t" + str(n).encode() for w, n in counts.items())
    # Events are written best-effort (errors swallowed): their presence shows the grant.
    events = cluster.api("GET", f"/api/v1/namespaces/{namespace}/events"
                         f"?fieldSelector=involvedObject.name%3D{name}")["items"]
    assert {"Planned", "Succeeded"} <= {e["reason"] for e in events}
    # The end of a job: its task namespace is deleted (namespaces delete + the policy).
    task_ns = status["taskNamespace"]

    def namespace_gone() -> bool:
        try:
            found = cluster.api("GET", f"/api/v1/namespaces/{task_ns}")
        except ApiError as exc:
            return exc.status == 404
        return bool(found["metadata"].get("deletionTimestamp"))

    eventually(namespace_gone, f"task namespace {task_ns} to be deleted", timeout=60)
    # Deleting the job: the operator removes its finalizer (patch), so the job goes.
    cluster.api("DELETE", jobs_path(namespace, name))

    def job_gone() -> bool:
        try:
            cluster.api("GET", jobs_path(namespace, name))
        except ApiError as exc:
            return exc.status == 404
        return False

    eventually(job_gone, f"job {name} to be deleted", timeout=60)
