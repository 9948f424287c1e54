"""TCP proxies a test can cut, to partition one client from a server and let it back.

A :class:`TcpProxy` forwards bytes both ways untouched, so TLS passes through (the client
still checks the server's own certificate, which names 127.0.0.1 whatever the port): a
worker pod whose kubeconfig points at a proxy reaches the API server as before. Until the
test calls :meth:`TcpProxy.sever`: every open connection is reset at both ends and new ones
are reset as soon as they are accepted, as when a network partition (or a firewall that
rejects) cuts one pod off while the rest of the cluster carries on; :meth:`TcpProxy.restore`
lets connections through again.

:class:`TcpProxies` runs one proxy per key (a pod's name) on a thread of its own, for the
test kubelet (``FakeKubelet.api_routes``), which asks for a pod's URL as it starts the pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Self
from urllib.parse import urlsplit, urlunsplit

_CHUNK = 1 << 16


class TcpProxy:
    """Forwards connections on a loopback port to ``host``:``port`` until severed."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.upstream_port = port
        self.port = 0
        self.severed = False
        #: Connections refused or reset while severed (the client's retries, each one).
        self.cut = 0
        self._open: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen on a free loopback port; return it."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.sever()

    def sever(self) -> None:
        """Reset every open connection; reset new ones until :meth:`restore`."""
        self.severed = True
        for writer in list(self._open):
            self.cut += 1
            writer.transport.abort()
        self._open.clear()

    def restore(self) -> None:
        """Let connections through again."""
        self.severed = False

    async def _handle(self, client_reader: asyncio.StreamReader,
                      client: asyncio.StreamWriter) -> None:
        if self.severed:
            self.cut += 1
            client.transport.abort()
            return
        try:
            upstream_reader, upstream = await asyncio.open_connection(self.host,
                                                                      self.upstream_port)
        except OSError:
            client.transport.abort()
            return
        self._open.update((client, upstream))
        try:
            await asyncio.gather(_pipe(client_reader, upstream),
                                 _pipe(upstream_reader, client))
        finally:
            for writer in (client, upstream):
                self._open.discard(writer)
                writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until either side ends (a reset included); then end the other's writes."""
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while chunk := await reader.read(_CHUNK):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


class TcpProxies:
    """One :class:`TcpProxy` per key in front of ``upstream`` (a URL: its scheme and path
    are kept in the URLs handed out), run on a thread of their own; a context manager."""

    def __init__(self, upstream: str) -> None:
        self._upstream = urlsplit(upstream)
        self._proxies: dict[str, TcpProxy] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="TcpProxies",
                                        daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        async def close_all() -> None:
            for proxy in self._proxies.values():
                await proxy.close()
            # The connections' tasks end on their reset; let them, so none is left pending.
            pending = asyncio.all_tasks() - {asyncio.current_task()}
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    def url_for(self, key: str) -> str:
        """The URL that reaches the upstream through ``key``'s proxy (started on first use)."""
        proxy = self._proxies.get(key)
        if proxy is None:
            host = self._upstream.hostname or "127.0.0.1"
            proxy = TcpProxy(host, self._upstream.port or 443)
            asyncio.run_coroutine_threadsafe(proxy.start(), self._loop).result(timeout=30)
            self._proxies[key] = proxy
        netloc = f"127.0.0.1:{proxy.port}"
        return urlunsplit(self._upstream._replace(netloc=netloc))

    def sever(self, key: str) -> None:
        """Cut ``key`` off (its proxy must exist)."""
        self._call(self._proxies[key].sever)

    def restore(self, key: str) -> None:
        """Let ``key`` through again."""
        self._call(self._proxies[key].restore)

    def cut(self, key: str) -> int:
        """How many of ``key``'s connections were reset or refused while severed."""
        return self._proxies[key].cut

    def _call(self, fn: Callable[[], None]) -> None:
        async def run() -> None:
            fn()

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=30)
