"""A reverse proxy in front of an S3 server that breaks requests the ways S3 and networks
break them, for fault tests.

:class:`FaultProxy` forwards every request byte for byte (headers included, so SigV4
signatures still verify upstream: the signed ``Host`` is the proxy's, passed on as is),
unless its ``rule`` decides otherwise for that request: answer with an S3 error instead,
``"truncate"`` (forward, then drop the connection halfway through the answer's body), or
``"reset"`` (hold the request a moment, then drop the connection with no answer, as a load
balancer that gives up on a silent connection does).

Rules are small: a test of one retry path writes its own (fail the second part upload),
and :class:`RandomFaults` fails a share of all requests at random for a whole job.
:func:`proxy_in_thread` runs a proxy on its own event loop, for synchronous tests whose
clients are other processes (worker pods).
"""

from __future__ import annotations

import asyncio
import io
import random
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import aiohttp
from aiohttp import web
from yarl import URL

from kubemr_async.testing import TestEnvError, free_port


@dataclass
class Seen:
    """One request as the proxy saw it; rules decide from these fields."""

    method: str
    path: str
    query: dict[str, str]
    n: int  # 1-based count of requests so far with the same (method, has-uploadId, part)
    status: int = 0  # what the client was sent (0: nothing, e.g. the connection was cut)


Verdict = web.StreamResponse | Literal["truncate", "reset"] | None
Rule = Callable[[Seen], Awaitable[Verdict]]
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade",
               "proxy-authorization", "proxy-authenticate", "content-length", "trailer"}


def s3_error(status: int, code: str) -> web.Response:
    """An S3 error answer, as S3 writes them."""
    body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>injected {code}</Message></Error>")
    return web.Response(status=status, body=body.encode(), content_type="application/xml")


class FaultProxy:
    """Forwards to ``upstream``; ``rule`` may answer instead, cut a body or drop the
    connection (see the module docstring). ``async with`` starts and stops it."""

    def __init__(self, upstream: str, rule: Rule | None = None,
                 stall_seconds: float = 1.0) -> None:
        self.upstream = URL(upstream)
        self.rule = rule
        self.stall_seconds = stall_seconds
        self.seen: list[Seen] = []
        self._counts: dict[tuple[str, bool, str], int] = {}
        self.endpoint_url = ""

    async def __aenter__(self) -> FaultProxy:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.endpoint_url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()
        await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        op = (request.method, "uploadId" in query, query.get("partNumber", ""))
        self._counts[op] = self._counts.get(op, 0) + 1
        seen = Seen(request.method, request.path, query, self._counts[op])
        self.seen.append(seen)
        verdict = await self.rule(seen) if self.rule else None
        if isinstance(verdict, web.StreamResponse):
            await request.read()
            seen.status = verdict.status
            return verdict
        data = await request.read()
        if verdict == "reset":
            await asyncio.sleep(self.stall_seconds)
            _drop(request)
            return web.Response()  # never sent: the connection is gone
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        async with self._session.request(
                request.method, self.upstream.with_path(request.raw_path, encoded=True),
                headers=headers, data=io.BytesIO(data), allow_redirects=False) as up:
            body = await up.read()
            seen.status = up.status
            out = {k: v for k, v in up.headers.items() if k.lower() not in _HOP_BY_HOP}
        if request.method == "HEAD":
            out["Content-Length"] = up.headers.get("Content-Length", "0")
            resp = web.StreamResponse(status=up.status, headers=out)
            await resp.prepare(request)
            return resp
        resp = web.StreamResponse(status=up.status, headers=out)
        resp.content_length = len(body)
        await resp.prepare(request)
        if verdict == "truncate" and len(body) > 1:
            await resp.write(body[:len(body) // 2])
            _drop(request)  # the client sees the body end early
            return resp
        await resp.write(body)
        await resp.write_eof()
        return resp

    def count(self, method: str, *, upload: bool = False) -> int:
        return sum(1 for s in self.seen if s.method == method and ("uploadId" in s.query) == upload)


def _drop(request: web.Request) -> None:
    """Close the client's connection at once, whatever was or was not sent on it."""
    if request.transport is not None:
        request.transport.abort()


#: What :class:`RandomFaults` picks from.
FAULTS = ("500", "503", "reset", "truncate")


class RandomFaults:
    """A rule failing ``rate`` of the requests (0 while off), each with a fault picked at
    random: ``500`` InternalError, ``503`` SlowDown, ``reset`` or ``truncate``.
    ``counts`` says how many requests it saw and how many of each fault it injected."""

    def __init__(self, rate: float = 0.0, seed: int = 0,
                 faults: tuple[str, ...] = FAULTS) -> None:
        if not faults or set(faults) - set(FAULTS):
            raise ValueError(f"faults must be some of {FAULTS}, got {faults}")
        self.rate = rate
        self.faults = faults
        self.counts: Counter[str] = Counter()
        self._random = random.Random(seed)

    @contextmanager
    def failing(self, rate: float) -> Iterator[None]:
        """Fail ``rate`` of the requests for the body of the ``with``."""
        self.rate = rate
        try:
            yield
        finally:
            self.rate = 0.0

    async def __call__(self, seen: Seen) -> Verdict:
        self.counts["requests"] += 1
        if self._random.random() >= self.rate:
            return None
        fault = self._random.choice(self.faults)
        self.counts[fault] += 1
        if fault == "500":
            return s3_error(500, "InternalError")
        if fault == "503":
            return s3_error(503, "SlowDown")
        return "reset" if fault == "reset" else "truncate"


@contextmanager
def proxy_in_thread(upstream: str, rule: Rule | None = None) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` serving from a thread of its own until the ``with`` ends."""
    proxy = FaultProxy(upstream, rule)
    started = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def serve() -> None:
        async with proxy:
            started.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),),
                              name="s3-fault-proxy", daemon=True)
    thread.start()
    try:
        if not started.wait(30):
            raise TestEnvError("the S3 fault proxy did not start")
        yield proxy
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
        loop.close()
