"""A real single-node Kubernetes control plane on loopback, for tests and local runs.

``TestCluster`` runs etcd, kube-apiserver and kube-controller-manager as local processes.
The apiserver is configured like a production one in the ways this project depends on:
TLS with a CA we generate, RBAC authorization, bound service-account tokens (TokenRequest)
and the default admission chain, including ServiceAccount admission. The controller-manager
makes batch Jobs create Pods and garbage-collects dependents by ownerReference. No kubelet or
scheduler runs; ``kubemr_async.testing.kubelet.FakeKubelet`` registers a Node, runs Pods as
local processes and serves their logs, which the apiserver proxies ``pods/log`` to with a
kubelet client cert from our CA.

Run ``python -m kubemr_async.testing.cluster`` to get a cluster to poke at by hand.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import http.client
import json
import secrets
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Self

import yaml

from kubemr_async.testing import (
    REPO_ROOT,
    ServerGroup,
    ServerProcesses,
    TestEnvError,
    free_port,
    run_ensure_script,
    wait_for_interrupt,
)
from kubemr_async.testing.pki import make_pki
from kubemr_async.testing.planted import audit_policy

#: Where the in-cluster "kubernetes" Service would live; part of the serving cert's SANs.
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
_ISSUER = "https://kubernetes.default.svc.cluster.local"


class ApiError(Exception):
    """A non-2xx answer from the apiserver; ``status`` lets tests assert on 403 vs 404."""

    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        super().__init__(f"{method} {path} -> HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


def pinned_versions() -> dict[str, str]:
    """The Kubernetes and etcd versions ``hack/ensure-k8s-binaries.sh`` builds.

    Read from the script so it stays the single place the versions are written down.
    """
    out = subprocess.run(
        ["bash", str(REPO_ROOT / "hack" / "ensure-k8s-binaries.sh"), "--print-versions"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(line.split("=", 1) for line in out.split())


def write_kubeconfig(path: Path, server: str, ca_pem: bytes, token: str) -> Path:
    """Write a kubeconfig that authenticates with a bearer token; returns ``path``."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kubemr-test",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": "kubemr-test-user", "user": {"token": token}}],
        "contexts": [
            {
                "name": "kubemr-test",
                "context": {"cluster": "kubemr-test", "user": "kubemr-test-user"},
            }
        ],
        "current-context": "kubemr-test",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


class TestCluster(ServerGroup):
    """etcd + kube-apiserver + kube-controller-manager on loopback, in a temp dir.

    Use as a context manager or call ``start()``/``stop()``. After start: ``server`` is the
    HTTPS URL, ``ca_file`` the CA bundle, ``admin_token`` a bearer token in group
    ``system:masters`` and ``kubeconfig_path`` an admin kubeconfig using both.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, bin_dir: Path | None = None, *, audit: bool = False) -> None:
        """``bin_dir`` defaults to what ``hack/ensure-k8s-binaries.sh`` provides. With
        ``audit`` the API server logs the body of every write of the objects a job is made
        of to :attr:`audit_log` (kubemr_async.testing.planted: what the leak search
        reads, since it sees objects that were deleted before anyone could list them)."""
        self._bin_dir = bin_dir
        self._audit = audit
        super().__init__()
        self.admin_token = ""
        self.etcd_url = ""
        self.server = ""
        self.port = 0

    # ----------------------------------------------------------------------- lifecycle

    @property
    def root(self) -> Path:
        """The temp dir holding data, certs and one ``<process>.log`` per process."""
        if self._tmp is None:
            raise TestEnvError("TestCluster is not started")
        return self._tmp

    @property
    def ca_file(self) -> Path:
        return self.root / "pki" / "ca.crt"

    @property
    def kubeconfig_path(self) -> Path:
        return self.root / "admin.kubeconfig"

    @property
    def audit_log(self) -> Path:
        """JSON lines, one audit event per write (only when made with ``audit=True``)."""
        return self.root / "audit.log"

    def kubectl(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Run the kubectl built beside the servers, as the admin; raises on a non-zero exit
        with kubectl's own stderr in the message."""
        if self._bin_dir is None:
            raise TestEnvError("TestCluster is not started")
        proc = subprocess.run([str(self._bin_dir / "kubectl"),
                               f"--kubeconfig={self.kubeconfig_path}", *args],
                              capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode:
            raise TestEnvError(f"kubectl {' '.join(args)} exited {proc.returncode}: "
                               f"{proc.stderr.strip()}")
        return proc

    def start(self) -> Self:
        """Start all processes and wait until Jobs can run; raise TestEnvError if not."""
        bin_dir = self._bin_dir or Path(run_ensure_script("ensure-k8s-binaries.sh"))
        self._bin_dir = bin_dir
        self._tmp = Path(tempfile.mkdtemp(prefix="kubemr-kube-"))
        self._procs = ServerProcesses(self._tmp)
        atexit.register(self.stop)  # no orphaned servers if the test process dies early
        try:
            self._start(bin_dir, self._procs)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, bin_dir: Path, procs: ServerProcesses) -> None:
        pki = self.root / "pki"
        make_pki(pki)

        etcd_port, peer_port = free_port(), free_port()
        etcd_url = self.etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        procs.spawn(
            "etcd",
            [
                str(bin_dir / "etcd"),
                "--name=kubemr-test",
                f"--data-dir={self.root / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=kubemr-test={peer_url}",
                # Test data is disposable; skipping fsync makes every API write much faster.
                "--unsafe-no-fsync",
            ],
        )
        procs.wait_ready("etcd", lambda: _http_ok(f"{etcd_url}/health"))

        self.admin_token = secrets.token_hex(20)
        (self.root / "tokens.csv").write_text(
            f'{self.admin_token},kubemr-admin,kubemr-admin,"system:masters"\n'
        )
        self.port = free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        audit = []
        if self._audit:
            (self.root / "audit-policy.json").write_text(audit_policy())
            # One file, never rotated (a rotation would move lines from under the search).
            audit = [f"--audit-policy-file={self.root / 'audit-policy.json'}",
                     f"--audit-log-path={self.audit_log}", "--audit-log-format=json",
                     "--audit-log-maxsize=100000"]
        procs.spawn(
            "kube-apiserver",
            [
                str(bin_dir / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--token-auth-file={self.root / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={_ISSUER}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                # The "kubernetes" Service endpoint would be 127.0.0.1, which Endpoints
                # validation rejects; nothing here needs that Service, so don't reconcile it.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                # pods/log (and exec, port-forward) are proxied to the Pod's kubelet. The
                # FakeKubelet advertises only an InternalIP, and authenticates this client
                # cert against ca.crt. Its serving cert is self-signed and not verified:
                # without --kubelet-certificate-authority the apiserver skips that check.
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
                *audit,
            ],
        )
        procs.wait_ready("kube-apiserver", lambda: self._request("GET", "/readyz")[0] == 200)
        write_kubeconfig(
            self.kubeconfig_path, self.server, self.ca_file.read_bytes(), self.admin_token
        )

        procs.spawn(
            "kube-controller-manager",
            [
                str(bin_dir / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig_path}",
                "--controllers=*",
                "--leader-elect=false",
                "--use-service-account-credentials=false",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--cluster-name=kubemr-test",
                # Nothing scrapes its metrics; not serving spares us its authn/z delegation.
                "--secure-port=0",
            ],
        )
        # The serviceaccount controller creating "default" shows the controllers run; Pods
        # cannot be admitted into a namespace before its default ServiceAccount exists.
        procs.wait_ready(
            "kube-controller-manager",
            lambda: (
                self._request("GET", "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200
            ),
        )

    @contextlib.contextmanager
    def outage(self, server: Literal["kube-apiserver", "etcd"]) -> Iterator[None]:
        """SIGKILL ``server`` for the body of the ``with``, then start it again with the same
        arguments (port, data, certificates) and wait until the API server is ready: a
        crash and restart, as a control-plane upgrade or a node failure brings them."""
        procs = self._procs
        if procs is None:
            raise TestEnvError("TestCluster is not started")
        procs.kill(server)
        try:
            yield
        finally:
            procs.respawn(server)
            if server == "etcd":
                procs.wait_ready("etcd", lambda: _http_ok(f"{self.etcd_url}/health"))
            procs.wait_ready("kube-apiserver",
                             lambda: self._request("GET", "/readyz")[0] == 200)

    # ---------------------------------------------------------------------- API access

    def _request(
        self,
        method: str,
        path: str,
        body: object = None,
        token: str | None = None,
        content_type: str = "application/json",
        accept: str = "application/json",
    ) -> tuple[int, bytes]:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=context, timeout=30)
        headers = {"Authorization": f"Bearer {token or self.admin_token}", "Accept": accept}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def api(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        token: str | None = None,
        content_type: str = "application/json",
        accept: str = "application/json",
    ) -> Any:
        """Call the REST API (as admin unless ``token`` is given) and return decoded JSON.

        A deliberately thin client: tests use it to set up and inspect state without
        depending on the code under test. Raises ApiError on non-2xx answers.
        """
        status, raw = self._request(method, path, body, token, content_type, accept)
        if not 200 <= status < 300:
            raise ApiError(status, method, path, raw.decode(errors="replace"))
        return json.loads(raw) if raw else None

    def create_namespace(self, name: str) -> None:
        """Create a namespace and wait for its default ServiceAccount, so Pods are admitted."""
        self.api("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
        self._get_once_answered(f"/api/v1/namespaces/{name}/serviceaccounts/default", 404,
                                time.monotonic() + 60, pause=0.1)

    def wait_until_listed(self, paths: Sequence[str], timeout: float = 60.0) -> None:
        """Wait until each collection can be listed: right after a CRD is established the
        API server answers 429 "storage is (re)initializing" for a while, and a client's
        first list (the operator's) does not survive that answer."""
        deadline = time.monotonic() + timeout
        for path in paths:
            self._get_once_answered(f"{path}?limit=1", 429, deadline, pause=0.2)

    def _get_once_answered(self, path: str, status: int, deadline: float,
                           pause: float) -> None:
        """GET ``path`` until it answers other than ``status`` (a state that passes), which
        is raised once ``deadline`` (monotonic) is past."""
        while True:
            try:
                self.api("GET", path)
                return
            except ApiError as exc:
                if exc.status != status or time.monotonic() > deadline:
                    raise
            time.sleep(pause)

    def token_for(
        self,
        namespace: str,
        service_account: str,
        audience: str | None = None,
        expiration_seconds: int = 3600,
    ) -> str:
        """Mint a bound token for a ServiceAccount with the TokenRequest API."""
        spec: dict[str, Any] = {"expirationSeconds": expiration_seconds}
        if audience is not None:
            spec["audiences"] = [audience]
        resp = self.api(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        token: str = resp["status"]["token"]
        return token

    def kubeconfig_for_token(self, token: str, path: Path) -> Path:
        """Write a kubeconfig for this cluster that authenticates with ``token``."""
        return write_kubeconfig(path, self.server, self.ca_file.read_bytes(), token)

    def account_with(self, namespace: str, name: str, rules: list[dict[str, Any]],
                     path: Path) -> tuple[str, Path]:
        """A ServiceAccount ``name`` in ``namespace`` that may do ``rules`` there (a Role
        and RoleBinding of its name) and nothing else: a token for it, and a kubeconfig
        with that token at ``path``."""
        rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}"
        self.api("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts",
                 {"metadata": {"name": name}})
        self.api("POST", f"{rbac}/roles", {"metadata": {"name": name}, "rules": rules})
        self.api("POST", f"{rbac}/rolebindings", {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]})
        token = self.token_for(namespace, name)
        return token, self.kubeconfig_for_token(token, path)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return bool(resp.status == 200)
    except urllib.error.URLError:
        return False


def main() -> None:
    """Start a cluster (and optionally a FakeKubelet) and keep it up until Ctrl-C/SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--kubelet", action="store_true", help="also run Pods as local processes (FakeKubelet)"
    )
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(TestCluster())
        print(f"export KUBECONFIG={cluster.kubeconfig_path}", flush=True)
        print(f"# server {cluster.server}, logs in {cluster.root}", flush=True)
        if args.kubelet:
            from kubemr_async.testing.kubelet import FakeKubelet

            stack.enter_context(FakeKubelet(cluster.kubeconfig_path, log_dir=cluster.root / "pods"))
            print(f"# FakeKubelet running; pod logs in {cluster.root / 'pods'}", flush=True)
        wait_for_interrupt()


if __name__ == "__main__":
    main()
