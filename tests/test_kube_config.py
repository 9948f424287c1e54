"""Finding the API server and our credentials (kubemr_async.kube.config), read as kubectl
reads them, each way proven against the real API server: a token, a token file the
kubelet rotates, a client certificate, an exec plugin, and a Pod's mounted ServiceAccount.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubemr_async.kube import (
    NAMESPACES,
    SELF_SUBJECT_REVIEWS,
    Forbidden,
    Kube,
    KubeconfigError,
    kubeconfig_contexts,
)
from kubemr_async.kube.config import Kubeconfig, environment_proxy, in_cluster
from kubemr_async.kube.errors import SETTLING_SECONDS, error_for, transient_after_outage
from kubemr_async.testing.cluster import TestCluster

pytestmark = [pytest.mark.anyio]


def _config(clusters: dict[str, dict[str, Any]], users: dict[str, dict[str, Any]],
            contexts: dict[str, dict[str, Any]], current: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": n, "cluster": c} for n, c in clusters.items()],
        "users": [{"name": n, "user": u} for n, u in users.items()],
        "contexts": [{"name": n, "context": c} for n, c in contexts.items()],
    }
    if current is not None:
        doc["current-context"] = current
    return doc


def _write(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


# --- reading, without a server ------------------------------------------------------


def test_merged_files_first_one_wins_and_paths_are_relative_to_their_file(
        tmp_path: Path, kube_ca: Path) -> None:
    (tmp_path / "a" / "certs").mkdir(parents=True)
    (tmp_path / "a" / "certs" / "ca.crt").write_bytes(kube_ca.read_bytes())
    first = _write(tmp_path / "a" / "config", _config(
        {"c": {"server": "https://first:6443", "certificate-authority": "certs/ca.crt"}},
        {"u": {"token": "first-token"}},
        {"main": {"cluster": "c", "user": "u", "namespace": "team-a"}}, current="main"))
    second = _write(tmp_path / "b" / "config", _config(
        {"c": {"server": "https://second:6443"}, "d": {"server": "https://d:6443/"}},
        {"u": {"token": "second-token"}},
        {"main": {"cluster": "d", "user": "u"}, "other": {"cluster": "d", "user": "u"}},
        current="other"))
    merged = Kubeconfig.read(f"{first}{os.pathsep}{tmp_path / 'missing'}{os.pathsep}{second}")
    endpoint = merged.endpoint()
    assert (endpoint.host, endpoint.namespace) == ("https://first:6443", "team-a")
    assert merged.endpoint("other").host == "https://d:6443"  # defined only in the second
    contexts, current = kubeconfig_contexts(f"{first}{os.pathsep}{second}")
    assert sorted(c["name"] for c in contexts) == ["main", "other"]
    assert current is not None and current["context"]["namespace"] == "team-a"


@pytest.mark.parametrize(("doc", "context", "message"), [
    (_config({"c": {"server": "https://x"}}, {}, {"m": {"cluster": "c"}}), None,
     "sets no current-context"),
    (_config({"c": {"server": "https://x"}}, {}, {"m": {"cluster": "c"}}, "m"), "nope",
     "context 'nope' not found"),
    (_config({}, {}, {"m": {"cluster": "gone"}}, "m"), None, "names cluster 'gone'"),
    (_config({"c": {}}, {}, {"m": {"cluster": "c"}}, "m"), None, "cluster 'c' has no server"),
    (_config({"c": {"server": "https://x", "certificate-authority-data": "%%%"}}, {},
             {"m": {"cluster": "c"}}, "m"), None, "certificate-authority-data is not valid"),
    (_config({"c": {"server": "https://x", "certificate-authority": "no/such.crt"}}, {},
             {"m": {"cluster": "c"}}, "m"), None, "cannot load the kubeconfig's TLS"),
])
def test_a_kubeconfig_that_cannot_work_is_one_line_naming_why(
        tmp_path: Path, doc: dict[str, Any], context: str | None, message: str) -> None:
    path = _write(tmp_path / "config", doc)
    with pytest.raises(KubeconfigError, match=message) as err:
        Kubeconfig.read(str(path)).endpoint(context)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("url", "proxied"), [
    ("https://127.0.0.1:6443", True),
    ("https://10.1.2.3", False),  # in a CIDR
    ("https://kubernetes.default.svc", False),  # a leading-dot domain covers subdomains
    ("https://api.example.com", False),  # example.com:443 covers its subdomains on 443
    ("https://example.com:6443", True),  # ... but not another port
    ("https://other.io", True),
])
def test_the_proxy_environment_is_honoured_as_client_go_honours_it(url: str,
                                                                   proxied: bool) -> None:
    environ = {"HTTPS_PROXY": "http://proxy:3128",
               "NO_PROXY": "localhost, .svc,10.0.0.0/8,example.com:443"}
    assert environment_proxy(url, environ) == ("http://proxy:3128" if proxied else None)
    assert environment_proxy(url, {"https_proxy": "http://p:1", "no_proxy": "*"}) is None
    assert environment_proxy(url, {}) is None


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "bad").write_text("clusters: [unclosed")
    with pytest.raises(KubeconfigError, match=r"cannot read kubeconfig .*bad"):
        Kubeconfig.read(str(tmp_path / "bad"))
    (tmp_path / "list").write_text("- 1\n- 2\n")
    with pytest.raises(KubeconfigError, match="is not a mapping"):
        Kubeconfig.read(str(tmp_path / "list"))
    with pytest.raises(KubeconfigError, match="no kubeconfig at"):
        Kubeconfig.read(str(tmp_path / "none"))


def test_client_key_files_written_for_loading_do_not_linger(
        tmp_path: Path, kube_pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    path = _write(tmp_path / "config", _cert_config(kube_pki, "https://127.0.0.1:1"))
    Kubeconfig.read(str(path)).endpoint()
    assert list(scratch.iterdir()) == []


# --- against the real API server ----------------------------------------------------


@pytest.fixture
def kube_ca(kube_cluster: TestCluster) -> Path:
    return kube_cluster.ca_file


@pytest.fixture
def kube_pki(kube_cluster: TestCluster) -> Path:
    return kube_cluster.ca_file.parent


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _cert_config(pki: Path, server: str) -> dict[str, Any]:
    # The API server's own client certificate for kubelets: signed by the cluster CA, in
    # group system:masters, so the API server takes it as a client identity.
    return _config(
        {"c": {"server": server, "certificate-authority-data": _b64(pki / "ca.crt")}},
        {"u": {"client-certificate-data": _b64(pki / "apiserver-kubelet-client.crt"),
               "client-key-data": _b64(pki / "apiserver-kubelet-client.key")}},
        {"m": {"cluster": "c", "user": "u"}}, "m")


async def _whoami(kubeconfig: Path | None = None, kube: Kube | None = None) -> str:
    if kube is None:
        assert kubeconfig is not None
        async with await Kube.connect(str(kubeconfig)) as connection:
            return await _whoami(kube=connection)
    review = await kube.create(SELF_SUBJECT_REVIEWS, {
        "apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
    return str(review["status"]["userInfo"]["username"])


@pytest.mark.kube
async def test_a_client_certificate_authenticates(tmp_path: Path, kube_cluster: TestCluster,
                                                  kube_pki: Path) -> None:
    path = _write(tmp_path / "config", _cert_config(kube_pki, kube_cluster.server))
    assert await _whoami(path) == "kube-apiserver-kubelet-client"


@pytest.mark.kube
async def test_a_rotated_token_file_is_read_again_when_the_server_refuses_the_old_one(
        tmp_path: Path, kube_cluster: TestCluster, kube_namespace: str) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("not-a-valid-token\n")
    path = _write(tmp_path / "config", _config(
        {"c": {"server": kube_cluster.server, "certificate-authority": str(kube_cluster.ca_file)}},
        {"u": {"tokenFile": "token"}},  # relative: next to the kubeconfig
        {"m": {"cluster": "c", "user": "u"}}, "m"))
    async with await Kube.connect(str(path)) as kube:
        # The kubelet rotates the token after we read it: the next call gets a 401, reads
        # the file again and goes through.
        token_file.write_text(kube_cluster.token_for(kube_namespace, "default"))
        assert await _whoami(kube=kube) == f"system:serviceaccount:{kube_namespace}:default"


@pytest.mark.kube
async def test_an_exec_plugin_mints_the_token(tmp_path: Path, kube_cluster: TestCluster,
                                              kube_namespace: str) -> None:
    token = kube_cluster.token_for(kube_namespace, "default")
    plugin = tmp_path / "plugin.py"
    plugin.write_text("import json\nprint(json.dumps(" + repr({
        "apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
        "status": {"token": token}}) + "))\n")
    path = _write(tmp_path / "config", _config(
        {"c": {"server": kube_cluster.server, "certificate-authority": str(kube_cluster.ca_file)}},
        {"u": {"exec": {"apiVersion": "client.authentication.k8s.io/v1",
                        "command": sys.executable, "args": [str(plugin)],
                        "interactiveMode": "Never"}}},
        {"m": {"cluster": "c", "user": "u"}}, "m"))
    assert await _whoami(path) == f"system:serviceaccount:{kube_namespace}:default"


@pytest.mark.kube
async def test_in_a_pod_the_mounted_service_account_is_used(
        tmp_path: Path, kube_cluster: TestCluster, kube_namespace: str) -> None:
    mount = tmp_path / "serviceaccount"
    mount.mkdir()
    (mount / "token").write_text(kube_cluster.token_for(kube_namespace, "default"))
    (mount / "ca.crt").write_bytes(kube_cluster.ca_file.read_bytes())
    (mount / "namespace").write_text(kube_namespace)
    environ = {"KUBERNETES_SERVICE_HOST": "127.0.0.1",
               "KUBERNETES_SERVICE_PORT": str(kube_cluster.port)}
    endpoint = in_cluster(environ, mount)
    assert endpoint.namespace == kube_namespace
    async with Kube(endpoint) as kube:
        assert await _whoami(kube=kube) == f"system:serviceaccount:{kube_namespace}:default"
        with pytest.raises(Forbidden):  # the ServiceAccount's own rights, not the admin's
            await kube.list(NAMESPACES)
    with pytest.raises(KubeconfigError, match="no ServiceAccount token"):
        in_cluster(environ, tmp_path / "nowhere")


def test_the_worker_and_the_store_do_not_import_the_generated_client() -> None:
    """A worker's first claim waits for its imports; the generated client alone was about
    half a second of them."""
    code = ("import sys, kubemr_async.runtime, kubemr_async.state.kube, kubemr_async.jobs; "
            "print('kubernetes_asyncio' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "False"


def test_a_plugin_kubeconfig_is_the_only_one_that_loads_the_generated_client(
        tmp_path: Path) -> None:
    path = _write(tmp_path / "config", _config(
        {"c": {"server": "https://127.0.0.1:1"}},
        {"u": {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "false"}}},
        {"m": {"cluster": "c", "user": "u"}}, "m"))
    code = ("import sys; from kubemr_async.kube.config import load; load(sys.argv[1]); "
            "print('kubernetes_asyncio' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == "False"  # reading it is not minting: that comes later


def test_refusals_right_after_an_outage_are_tried_again_for_a_while() -> None:
    """A restarted API server answers 401/403 until its caches catch up (seen in the
    control-plane restart tests): retried only within SETTLING_SECONDS of an outage."""
    forbidden = error_for("patching", 403, b"{}")
    assert transient_after_outage(forbidden, 1.0)
    assert not transient_after_outage(forbidden, SETTLING_SECONDS + 1)
    assert not transient_after_outage(forbidden, None)
    assert transient_after_outage(error_for("patching", 503, b"{}"), None)
    assert not transient_after_outage(error_for("patching", 404, b"{}"), 1.0)


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_a_server_that_accepts_and_never_answers_is_unreachable_not_a_hang(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheme: str) -> None:
    """A call that is not a stream waited for ever for an answer (`kubemr status` against
    a hung API server never ended), and a read was tried 8 times at up to 30 s each.
    The timeouts are shortened here; the server is a real socket that accepts, then says
    nothing (no TLS handshake either)."""
    import socket
    import time

    import aiohttp

    from kubemr_async import jobs
    from kubemr_async.errors import KubemrError
    from kubemr_async.kube import client

    monkeypatch.setattr(client, "ANSWER_TIMEOUT",
                        aiohttp.ClientTimeout(total=None, sock_connect=1, sock_read=1))
    monkeypatch.setattr(jobs, "READ_DEADLINE", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        kubeconfig = _write(tmp_path / "config", _config(
            {"c": {"server": f"{scheme}://127.0.0.1:{port}", "insecure-skip-tls-verify": True}},
            {"u": {"token": "t"}}, {"m": {"cluster": "c", "user": "u"}}, current="m"))
        started = time.monotonic()
        with pytest.raises(KubemrError, match=f"^cannot reach the Kubernetes API server at "
                                              f"{scheme}://127.0.0.1:{port}: "):
            async with jobs.connect(str(kubeconfig)) as jobs_client:
                await jobs_client.get("wordcount")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(("status", "body", "message"), [
    # What kube-apiserver's mux answers for a path it does not serve (no CRDs installed).
    (404, "404 page not found\n",
     "reading job wordcount in namespace default: the API server at {server} does not serve "
     "MapReduceJobs; install kubemr-async's CRDs and operator (its Helm chart) on this "
     "cluster"),
    # A proxy in front of the API server, with an HTML page.
    (401, "<html>\n<body>\n<h1>401 Unauthorized</h1>\n</body>\n</html>\n",
     "reading job wordcount in namespace default: HTTP 401: <html> <body> <h1>401 "
     "Unauthorized</h1> </body> </html>"),
])
def test_an_answer_that_is_not_a_status_is_one_clear_line(
        tmp_path: Path, status: int, body: str, message: str) -> None:
    """A 404 without a Status object said `job wordcount not found` (status) or printed
    the server's page with its newline (list, submit): two lines, and not the cause."""
    import http.server
    import threading

    class Plain(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: Any) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Plain) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        kubeconfig = _write(tmp_path / "config", _config(
            {"c": {"server": url}}, {"u": {"token": "t"}},
            {"m": {"cluster": "c", "user": "u"}}, current="m"))
        result = subprocess.run(
            [str(Path(sys.executable).parent / "kubemr"), "status", "wordcount",
             "--kubeconfig", str(kubeconfig)], capture_output=True, text=True, timeout=60)
        server.shutdown()
    assert result.returncode == 1
    assert result.stderr == f"kubemr: error: {message.format(server=url)}\n"
