"""Where the API server is and how to prove who we are: kubeconfig or in-cluster, read
the way kubectl and client-go read them.

Why our own reader: importing kubernetes_asyncio (its generated client comes with its
config package) costs a worker about half a second before its first claim and the CLI as
much before its first request, and its REST layer spends ~3 ms of CPU per call. What a
connection needs is small: a URL, a TLS context, and a bearer token or client
certificate. The cases that need a program to mint credentials (a kubeconfig ``exec``
plugin, as EKS and GKE write them, or a legacy ``auth-provider``) still go through
kubernetes_asyncio's loader, imported only then, and re-run before its token ages out.

Rules kept from client-go:

* ``$KUBECONFIG`` may list several files (``os.pathsep``); the first file that sets a
  value wins, for each named cluster, user and context and for ``current-context``;
* relative paths in a file are relative to that file's directory;
* ``*-data`` fields are base64 and win over their file-path twins;
* a Pod's ServiceAccount token is re-read from disk every minute (the kubelet rotates
  it), as client-go's cached token source does.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import os
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from ..errors import KubemrError

#: Where the kubelet mounts a Pod's ServiceAccount credentials.
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
#: How long a token read from a file is trusted before it is read again (client-go: 1 min).
TOKEN_FILE_TTL = 60.0
#: How long a token minted by an exec plugin or auth provider is used before the plugin is
#: asked again: under the 15-minute lifetime of EKS and GKE tokens, with room to spare.
PLUGIN_TOKEN_TTL = 5 * 60.0


class KubeconfigError(KubemrError):
    """A kubeconfig (or in-cluster configuration) that cannot be used: missing, malformed,
    no such context, no credentials."""


#: Headers that authenticate one request; ``fresh=True`` asks a token source that can
#: renew (a file, a plugin) to do so now (the server just answered 401).
Authenticator = Callable[[bool], Awaitable[Mapping[str, str]]]


async def _anonymous(fresh: bool) -> Mapping[str, str]:
    return {}


@dataclass
class Endpoint:
    """An API server and our credentials for it."""

    host: str  # https://host:port, no trailing slash
    ssl: ssl.SSLContext
    authenticate: Authenticator = _anonymous
    server_hostname: str | None = None  # tls-server-name: the name the certificate holds
    proxy: str | None = None
    #: The kubeconfig context's namespace ("" if it names none).
    namespace: str = ""
    _temp: list[str] = field(default_factory=list, repr=False)


def load(kubeconfig: str | None = None, context: str | None = None,
         environ: Mapping[str, str] = os.environ) -> Endpoint:
    """The endpoint kubectl would talk to: an explicit ``kubeconfig``/``context`` or
    ``$KUBECONFIG`` first, then (in a Pod) the mounted ServiceAccount, then
    ``~/.kube/config``."""
    explicit = kubeconfig is not None or context is not None or environ.get("KUBECONFIG")
    if not explicit and environ.get("KUBERNETES_SERVICE_HOST"):
        endpoint = in_cluster(environ)
    else:
        paths = kubeconfig or environ.get("KUBECONFIG") or "~/.kube/config"
        endpoint = Kubeconfig.read(paths).endpoint(context)
    endpoint.proxy = endpoint.proxy or environment_proxy(endpoint.host, environ)
    return endpoint


def environment_proxy(url: str, environ: Mapping[str, str]) -> str | None:
    """The proxy ``HTTPS_PROXY`` (or ``https_proxy``) names for ``url``, unless
    ``NO_PROXY`` exempts its host: client-go's ``http.ProxyFromEnvironment``, read once."""
    parts = urlsplit(url)
    names = (f"{parts.scheme.upper()}_PROXY", f"{parts.scheme}_proxy")
    proxy = next((environ[name] for name in names if environ.get(name)), None)
    no_proxy = environ.get("NO_PROXY") or environ.get("no_proxy") or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if proxy is None or any(_exempt(entry.strip(), parts.hostname or "", port)
                            for entry in no_proxy.split(",")):
        return None
    return proxy


def _exempt(entry: str, host: str, port: int) -> bool:
    """Whether one ``NO_PROXY`` entry covers ``host`` (Go's rules: ``*``, an IP or CIDR,
    a domain and its subdomains with or without a leading dot, an optional ``:port``)."""
    if not entry:
        return False
    if entry == "*":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False)
    name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
    if entry_port and entry_port != str(port):
        return False
    domain = name.lstrip(".").lower()
    return host.lower() == domain or host.lower().endswith("." + domain)


def in_cluster(environ: Mapping[str, str] = os.environ,
               directory: Path = SERVICE_ACCOUNT_DIR) -> Endpoint:
    """A Pod's own credentials: the service's address from the environment, the mounted
    CA and the token (re-read as the kubelet rotates it)."""
    host = environ.get("KUBERNETES_SERVICE_HOST", "")
    port = environ.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise KubeconfigError("in a Pod, but KUBERNETES_SERVICE_HOST/PORT are not set")
    token = directory / "token"
    if not token.is_file():
        raise KubeconfigError(f"in a Pod, but no ServiceAccount token at {token}")
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    namespace = ""
    with contextlib.suppress(OSError):
        namespace = (directory / "namespace").read_text().strip()
    try:
        context = ssl.create_default_context(cafile=str(directory / "ca.crt"))
    except (OSError, ssl.SSLError) as exc:
        raise KubeconfigError(f"in a Pod, but the ServiceAccount CA cannot be read: {exc}"
                              ) from None
    return Endpoint(f"https://{host}:{port}", context, _TokenFile(token), namespace=namespace)


class _TokenFile:
    """A bearer token kept in a file that something else rotates."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._token = ""
        self._read_at = -TOKEN_FILE_TTL

    async def __call__(self, fresh: bool) -> Mapping[str, str]:
        now = time.monotonic()
        if fresh or now - self._read_at >= TOKEN_FILE_TTL:
            try:
                self._token = self._path.read_text().strip()
            except OSError as exc:
                if not self._token:
                    raise KubeconfigError(f"cannot read token file {self._path}: "
                                          f"{exc.strerror}") from None
            self._read_at = now
        return {"Authorization": f"Bearer {self._token}"}


def _static(headers: Mapping[str, str]) -> Authenticator:
    async def authenticate(fresh: bool) -> Mapping[str, str]:
        return headers
    return authenticate


class _Plugin:
    """Credentials an exec plugin or auth provider mints: kubernetes_asyncio's loader runs
    it (imported only for such a kubeconfig) and is asked again before the token ages."""

    def __init__(self, path: str, context: str | None) -> None:
        self._path = path
        self._context = context
        self._headers: Mapping[str, str] = {}
        self._minted_at = -PLUGIN_TOKEN_TTL

    async def __call__(self, fresh: bool) -> Mapping[str, str]:
        now = time.monotonic()
        if fresh or now - self._minted_at >= PLUGIN_TOKEN_TTL:
            from kubernetes_asyncio.client import Configuration
            from kubernetes_asyncio.config import ConfigException, load_kube_config

            config = Configuration()
            try:
                # persist_config=False: never write minted credentials into the user's file.
                await load_kube_config(config_file=self._path, context=self._context,
                                       client_configuration=config, persist_config=False)
            except ConfigException as exc:
                raise KubeconfigError(" ".join(str(exc).split())) from None
            token = config.api_key.get("BearerToken") or config.api_key.get("authorization")
            self._headers = {"Authorization": str(token)} if token else {}
            self._minted_at = now
        return self._headers


@dataclass
class Kubeconfig:
    """One or more kubeconfig files, merged as kubectl merges ``$KUBECONFIG``."""

    paths: str
    clusters: dict[str, tuple[dict[str, Any], Path]]
    users: dict[str, tuple[dict[str, Any], Path]]
    contexts: dict[str, dict[str, Any]]
    current: str

    @classmethod
    def read(cls, paths: str) -> Kubeconfig:
        clusters: dict[str, tuple[dict[str, Any], Path]] = {}
        users: dict[str, tuple[dict[str, Any], Path]] = {}
        contexts: dict[str, dict[str, Any]] = {}
        current = ""
        found = False
        for raw in paths.split(os.pathsep):
            if not raw:
                continue
            path = Path(raw).expanduser()
            if not path.is_file():
                continue
            found = True
            try:
                doc = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise KubeconfigError(f"cannot read kubeconfig {path}: "
                                      f"{' '.join(str(exc).split())}") from None
            if not isinstance(doc, dict):
                raise KubeconfigError(f"kubeconfig {path} is not a mapping")
            base = path.resolve().parent
            for name, body in _named(doc, "clusters", "cluster", path):
                clusters.setdefault(name, (body, base))
            for name, body in _named(doc, "users", "user", path):
                users.setdefault(name, (body, base))
            for name, body in _named(doc, "contexts", "context", path):
                contexts.setdefault(name, {"name": name, "context": body})
            current = current or str(doc.get("current-context") or "")
        if not found:
            raise KubeconfigError(f"no kubeconfig at {paths}")
        return cls(paths, clusters, users, contexts, current)

    def endpoint(self, context: str | None = None) -> Endpoint:
        name = context or self.current
        if not name:
            raise KubeconfigError(f"kubeconfig {self.paths} sets no current-context; "
                                  "pass --context")
        if name not in self.contexts:
            raise KubeconfigError(f"context {name!r} not found in kubeconfig {self.paths}")
        ctx = self.contexts[name]["context"]
        cluster_name = str(ctx.get("cluster") or "")
        if cluster_name not in self.clusters:
            raise KubeconfigError(f"context {name!r} names cluster {cluster_name!r}, "
                                  f"which kubeconfig {self.paths} does not define")
        cluster, cluster_base = self.clusters[cluster_name]
        user, user_base = self.users.get(str(ctx.get("user") or ""), ({}, cluster_base))
        server = str(cluster.get("server") or "").rstrip("/")
        if not server:
            raise KubeconfigError(f"cluster {cluster_name!r} has no server")
        temp: list[str] = []
        try:
            tls = _tls(cluster, cluster_base, user, user_base, temp)
        finally:
            for path in temp:  # the context has loaded them: keys never linger on disk
                with contextlib.suppress(OSError):
                    os.unlink(path)
        return Endpoint(server, tls, self._authenticator(name, user, user_base),
                        server_hostname=cluster.get("tls-server-name") or None,
                        proxy=cluster.get("proxy-url") or None,
                        namespace=str(ctx.get("namespace") or ""))

    def _authenticator(self, context: str, user: dict[str, Any], base: Path) -> Authenticator:
        if "exec" in user or "auth-provider" in user:
            return _Plugin(self.paths, context)
        if user.get("token"):
            return _static({"Authorization": f"Bearer {user['token']}"})
        if user.get("tokenFile"):
            return _TokenFile(_resolve(str(user["tokenFile"]), base))
        if user.get("username") and user.get("password"):
            basic = base64.b64encode(f"{user['username']}:{user['password']}".encode()).decode()
            return _static({"Authorization": f"Basic {basic}"})
        return _anonymous


def _named(doc: dict[str, Any], section: str, item: str,
           path: Path) -> list[tuple[str, dict[str, Any]]]:
    entries = doc.get(section) or []
    if not isinstance(entries, list):
        raise KubeconfigError(f"kubeconfig {path}: {section} is not a list")
    named = []
    for entry in entries:
        if not isinstance(entry, dict) or not entry.get("name"):
            raise KubeconfigError(f"kubeconfig {path}: an entry of {section} has no name")
        body = entry.get(item) or {}
        if not isinstance(body, dict):
            raise KubeconfigError(f"kubeconfig {path}: {section} {entry['name']!r} has no "
                                  f"{item} mapping")
        named.append((str(entry["name"]), body))
    return named


def _resolve(path: str, base: Path) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else base / candidate


def _material(body: dict[str, Any], key: str, base: Path, temp: list[str]) -> str | None:
    """A PEM file's path for ``key``: its ``-data`` twin (base64, written to a private
    temporary file that the caller removes once loaded) or the path, made absolute."""
    data = body.get(f"{key}-data")
    if data:
        try:
            pem = base64.b64decode(str(data), validate=True)
        except ValueError:
            raise KubeconfigError(f"{key}-data is not valid base64") from None
        fd, name = tempfile.mkstemp(prefix="kubemr-", suffix=".pem")  # mode 0600
        temp.append(name)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
        return name
    path = body.get(key)
    return str(_resolve(str(path), base)) if path else None


def _tls(cluster: dict[str, Any], cluster_base: Path, user: dict[str, Any],
         user_base: Path, temp: list[str]) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(
            cafile=_material(cluster, "certificate-authority", cluster_base, temp))
        cert = _material(user, "client-certificate", user_base, temp)
        if cert:
            context.load_cert_chain(cert, _material(user, "client-key", user_base, temp))
    except (OSError, ssl.SSLError) as exc:
        raise KubeconfigError(f"cannot load the kubeconfig's TLS material: {exc}") from None
    if cluster.get("insecure-skip-tls-verify"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
