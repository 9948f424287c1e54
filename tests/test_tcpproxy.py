"""The test environment's cuttable TCP proxy (kubemr_async.testing.tcpproxy), on real
loopback sockets: bytes pass both ways; severed, open connections are reset and new ones
too; restored, connections pass again. The proxy under a real job:
tests/test_kills_cluster.py."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from kubemr_async.testing.tcpproxy import TcpProxies


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(1024):
            self.request.sendall(data)


@pytest.fixture
def echo_port() -> Iterator[int]:
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo) as server:
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield int(server.server_address[1])
        server.shutdown()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _echoes(port: int) -> bool:
    """Whether a new connection through ``port`` echoes (False: reset or closed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"ping")
            return conn.recv(4) == b"ping"
    except OSError:
        return False


def test_a_severed_proxy_resets_its_connections_until_restored(echo_port: int) -> None:
    with TcpProxies(f"https://127.0.0.1:{echo_port}") as proxies:
        url = proxies.url_for("pod-a")
        assert url.startswith("https://127.0.0.1:") and _port(url) != echo_port
        assert proxies.url_for("pod-a") == url, "one proxy per key"
        port = _port(url)
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.sendall(b"ping")
        assert held.recv(4) == b"ping"
        assert _echoes(_port(proxies.url_for("pod-b")))

        proxies.sever("pod-a")
        try:
            held.sendall(b"ping")
            assert held.recv(4) == b"", "an open connection is cut"
        except ConnectionResetError:
            pass
        held.close()
        assert not _echoes(port), "a new connection is cut too"
        assert _echoes(_port(proxies.url_for("pod-b"))), "another key's proxy is not cut"
        assert proxies.cut("pod-a") >= 2

        proxies.restore("pod-a")
        assert _echoes(port)
