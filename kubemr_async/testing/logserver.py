"""The stand-in kubelet's log server: what the apiserver proxies ``pods/log`` to.

The log server is a simplified kubelet API: its serving cert is self-signed (the apiserver
does not verify kubelet serving certs unless ``--kubelet-certificate-authority`` is set),
it accepts any client cert signed by the cluster CA from the kubeconfig (``TestCluster``
gives the apiserver one) and does no authorization beyond that. Stdout and stderr share one
file, so ``stream=Stdout|Stderr`` is refused (as a kubelet without the split-streams
feature does); ``timestamps=true`` prefixes each line with the time the kubelet *read* it,
not when it was written; ``sinceSeconds``/``sinceTime`` are accepted and ignored.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import yaml
from aiohttp import web

from kubemr_async.testing.pki import make_self_signed_cert
from kubemr_async.testing.podrunner import PodRun

_FOLLOW_POLL = 0.1  # how often a follow=true stream looks for new output


class _BadLogRequest(Exception):
    """Answered with ``status`` and the message as plain text, like the kubelet does."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _LogOptions:
    follow: bool = False
    previous: bool = False
    tail_lines: int | None = None
    limit_bytes: int | None = None
    timestamps: bool = False

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> _LogOptions:
        """The subset of v1.PodLogOptions the kubelet's containerLogs endpoint takes."""

        def flag(key: str) -> bool:
            value = query.get(key, "false")
            if value in ("1", "t", "T", "true", "TRUE", "True"):
                return True
            if value in ("0", "f", "F", "false", "FALSE", "False", ""):
                return False
            raise _BadLogRequest(400, f"invalid {key}={value!r}")

        def number(key: str, minimum: int) -> int | None:
            if key not in query:
                return None
            try:
                value = int(query[key])
            except ValueError:
                raise _BadLogRequest(400, f"invalid {key}={query[key]!r}") from None
            if value < minimum:
                raise _BadLogRequest(422, '{"message": "Invalid request."}')
            return value

        tail = query.get("tail")  # the kubelet's legacy spelling of tailLines
        if tail is not None and "tailLines" not in query and tail != "all":
            query = {**query, "tailLines": tail}
        if query.get("stream", "All") != "All":
            raise _BadLogRequest(400, f"unable to return the given log stream: {query['stream']!r}")
        number("sinceSeconds", 1)  # validated, then ignored (see the module docstring)
        return cls(
            follow=flag("follow"),
            previous=flag("previous"),
            tail_lines=number("tailLines", 0),
            limit_bytes=number("limitBytes", 1),
            timestamps=flag("timestamps"),
        )


def tail_offset(f: IO[bytes], lines: int) -> int:
    """Offset in ``f`` where its last ``lines`` lines start (a final partial line counts)."""
    end = f.seek(0, os.SEEK_END)
    if lines <= 0:
        return end
    pos, seen = end, 0
    # A newline ending the file terminates the last line; it does not start another one.
    limit = end - 1
    while pos > 0:
        size = min(65536, pos)
        pos -= size
        f.seek(pos)
        block = f.read(size)
        i = min(len(block), limit - pos)
        while (i := block.rfind(b"\n", 0, i)) >= 0:
            seen += 1
            if seen == lines:
                return pos + i + 1
    return 0


def stamp_lines(chunk: bytes, at_line_start: bool) -> tuple[bytes, bool]:
    """Prefix each line starting in ``chunk`` with an RFC 3339 timestamp and a space.

    ``at_line_start`` says whether the previous chunk ended a line; returns the stamped
    chunk and the same flag for the next one.
    """
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ ").encode()
    parts = chunk.split(b"\n")
    out = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if last and not part:
            break
        if i > 0 or at_line_start:
            out.append(stamp)
        out.append(part if last else part + b"\n")
    return b"".join(out), chunk.endswith(b"\n")


def cluster_ca(kubeconfig_path: Path) -> str | None:
    """The CA of the kubeconfig's current cluster, PEM, if it names one."""
    kubeconfig = yaml.safe_load(kubeconfig_path.read_text())
    context = next(
        c["context"]
        for c in kubeconfig["contexts"]
        if c["name"] == kubeconfig["current-context"]
    )
    cluster = next(
        c["cluster"] for c in kubeconfig["clusters"] if c["name"] == context["cluster"]
    )
    if "certificate-authority-data" in cluster:
        return base64.b64decode(cluster["certificate-authority-data"]).decode()
    if "certificate-authority" in cluster:
        return (kubeconfig_path.parent / str(cluster["certificate-authority"])).read_text()
    return None


class LogServer:
    """Serves ``/containerLogs/{namespace}/{pod}/{container}`` over HTTPS on 127.0.0.1.

    ``runs`` is the kubelet's live map of ``(namespace, pod)`` to the Pod's run, read on
    every request. With ``client_ca`` (PEM) a client must present a cert it signed, as the
    apiserver does with ``--kubelet-client-certificate``.
    """

    def __init__(self, runs: Mapping[tuple[str, str], PodRun], pki_dir: Path, node_name: str,
                 client_ca: str | None) -> None:
        self._runs = runs
        self._pki_dir = pki_dir
        self._node_name = node_name
        self._client_ca = client_ca
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> int:
        """Listen on a free loopback port; returns the port (the Node advertises it)."""
        cert, key = make_self_signed_cert(self._pki_dir, "kubelet", self._node_name)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
        tls.set_alpn_protocols(["http/1.1"])
        if self._client_ca is not None:
            tls.verify_mode = ssl.CERT_REQUIRED
            tls.load_verify_locations(cadata=self._client_ca)
        app = web.Application()
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self._handle_logs)
        app.router.add_get("/healthz", self._handle_healthz)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(runner, sock, ssl_context=tls).start()
        self._runner = runner
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle_healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _handle_logs(self, request: web.Request) -> web.StreamResponse:
        ns, name = request.match_info["namespace"], request.match_info["pod"]
        container = request.match_info["container"]
        try:
            opts = _LogOptions.parse(request.query)
            run = self._runs.get((ns, name))
            if run is None:
                raise _BadLogRequest(404, f"pod {name!r} does not exist")
            if container not in run.containers:
                raise _BadLogRequest(404, f"container {container!r} not found in pod {name!r}")
            if opts.previous:  # restartPolicy is Never here: there is no previous container
                raise _BadLogRequest(
                    400, f'previous terminated container "{container}" in pod "{name}" not found'
                )
            if container != run.containers[0] or not run.log_ready or run.log_path is None:
                raise _BadLogRequest(
                    400,
                    f'container "{container}" in pod "{name}" is waiting to start: '
                    "ContainerCreating",
                )
        except _BadLogRequest as exc:
            return web.Response(status=exc.status, text=str(exc))
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)  # headers now: a follow=true stream may idle a while
        with contextlib.suppress(ConnectionResetError):  # the client went away
            with run.log_path.open("rb") as f:
                await self._stream_log(request, resp, f, run, opts)
            await resp.write_eof()
        return resp

    @staticmethod
    async def _stream_log(
        request: web.Request,
        resp: web.StreamResponse,
        f: IO[bytes],
        run: PodRun,
        opts: _LogOptions,
    ) -> None:
        f.seek(0 if opts.tail_lines is None else tail_offset(f, opts.tail_lines))
        budget = opts.limit_bytes
        at_line_start, exited = True, False
        while True:
            chunk = f.read(65536)
            if chunk:
                if opts.timestamps:
                    chunk, at_line_start = stamp_lines(chunk, at_line_start)
                if budget is not None:
                    chunk = chunk[:budget]
                    budget -= len(chunk)
                await resp.write(chunk)
                if budget == 0:
                    return
                continue
            if not opts.follow or exited:
                return
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            # Once the process is gone, read what it wrote last, then end the stream.
            exited = run.done.is_set()
            if not exited:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.done.wait(), _FOLLOW_POLL)
