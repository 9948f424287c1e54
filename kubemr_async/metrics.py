"""Prometheus metrics and health checks: every metric kubemr exposes, defined once, and the
HTTP endpoint that serves them (``/metrics``, and the operator's ``/healthz``/``/readyz``).

The operator, the worker (a pod's or a ``kubemr run`` process's) and the entry points
count into the module-level metrics below; nothing else defines one, so a name, its help
and its labels live in one place. Labels take only bounded values (a task *kind*, a job
*phase*, an *outcome*), never a job, task or worker name: those would create a series
per job and grow without bound.

The endpoint is a small WSGI server in a daemon thread (prometheus_client's exposition
under the standard library's ``wsgiref``), not a server on the event loop, on purpose:

* ``/healthz`` must answer *while the loop is frozen* (that is what it detects): a
  server on the frozen loop would not answer at all, and the kubelet would see a
  timeout instead of a clear 503 with the reason;
* prometheus_client's collection is synchronous and thread-safe, so a scrape never
  waits for, nor slows, the loop;
* HTTP libraries are the kube layer's and storage's business (see the import contracts);
  this needs none.

``kubemr run`` runs workers as processes: they count into prometheus_client's
multiprocess files under :data:`MULTIPROCESS_ENV`, and the parent serves their sum
(:func:`multiprocess_registry`).
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import anyio
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger("kubemr.metrics")

#: The variable a worker pod's /metrics port comes in (set by the operator).
PORT_ENV = "KUBEMR_METRICS_PORT"
#: Seconds a worker pod keeps /metrics up once its work is done (until SIGTERM).
LINGER_ENV = "KUBEMR_METRICS_LINGER_SECONDS"
#: The directory worker processes of ``kubemr run`` count into (prometheus_client's name).
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

# --- the operator ------------------------------------------------------------------------

JOBS = Gauge("kubemr_operator_jobs", "MapReduceJobs the operator's watch holds, by phase.",
             ["phase"])
RECONCILES = Counter("kubemr_operator_reconciles", "Reconciles of a job, by result.",
                     ["result"])
RECONCILE_ERRORS = Counter("kubemr_operator_reconcile_errors",
                           "Reconciles that raised (retried with backoff).")
RECONCILE_SECONDS = Histogram("kubemr_operator_reconcile_duration_seconds",
                              "How long one reconcile of a job took.",
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                                       10, 30, 60))
QUEUE_DEPTH = Gauge("kubemr_operator_workqueue_depth",
                    "Job keys ready to reconcile, not yet taken by a reconcile worker.")
LEADER = Gauge("kubemr_operator_leader",
               "1 while this operator leads (holds the leader Lease, or runs without leader "
               "election) and reconciles; 0 on a standby.")
STANDBYS = Gauge("kubemr_operator_standbys",
                 "The warm pool's standby workers at its last look, by state (waiting: "
                 "ready for a job; working: adopted).", ["state"])
ADOPTIONS = Counter("kubemr_operator_adoptions",
                    "New jobs that could adopt a standby, by result (adopted; none: no "
                    "standby was waiting, so the job started cold).", ["result"])
API_RETRIES = Counter("kubemr_api_retries",
                      "Waits before retrying the API server after transient trouble (a "
                      "watch or read loop backing off).")

# --- the worker --------------------------------------------------------------------------

TASKS_CLAIMED = Counter("kubemr_tasks_claimed", "Task attempts this worker claimed.", ["kind"])
TASKS_COMMITTED = Counter("kubemr_tasks_committed", "Task attempts this worker committed.",
                          ["kind"])
TASKS_FAILED = Counter("kubemr_tasks_failed", "Task attempts that raised (recorded as "
                       "failed; retried unless permanent or out of attempts).", ["kind"])
TASKS_RELEASED = Counter("kubemr_tasks_released", "Task attempts handed back unfinished "
                         "(shutdown, or a reduce input to re-create).", ["kind"])
CLAIM_RACES_LOST = Counter("kubemr_claim_races_lost", "Claims another worker won first.",
                           ["kind"])
BACKUP_ATTEMPTS = Counter("kubemr_backup_attempts", "Backup attempts of straggling tasks "
                          "this worker ran, by outcome (launched; won: its commit was the "
                          "task's; lost: the original's was).", ["outcome"])
LEASE_RENEWALS = Counter("kubemr_lease_renewals", "Lease renewals of held tasks, by result "
                         "(renewed, lost: taken over, error: the store failed).", ["result"])
TASK_SECONDS = Histogram("kubemr_task_duration_seconds", "One task attempt, claim to outcome "
                         "(committed, failed, released, lost).", ["kind", "outcome"],
                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
                                  1800, 3600))
READ_BYTES = Counter("kubemr_read_bytes", "Bytes read: map input splits (decompressed) and "
                     "the shuffle slices reduces fetch.", ["source"])
WRITTEN_BYTES = Counter("kubemr_written_bytes", "Bytes written: shuffle objects and result "
                        "parts.", ["sink"])
RECORDS_READ = Counter("kubemr_records_read", "Records read by finished attempts (reduce "
                       "input records).", ["kind"])
RECORDS_WRITTEN = Counter("kubemr_records_written", "Records written by finished attempts "
                          "(map output pairs, reduce output records).", ["kind"])
SPILLS = Counter("kubemr_map_spills", "Sorted buffers a map wrote to local scratch.")
SPILLED_BYTES = Counter("kubemr_map_spilled_bytes", "Bytes of the spills maps wrote.")


# --- health ------------------------------------------------------------------------------


class Recent:
    """Whether something happened within the last ``window`` seconds (a check of health).

    :meth:`mark` is called on the event loop; calling the object (from the HTTP thread)
    reads one float, so neither side needs a lock.
    """

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._at: float | None = None

    def mark(self) -> None:
        self._at = self._clock()

    def __call__(self) -> bool:
        return self._at is not None and self._clock() - self._at <= self.window


Check = Callable[[], bool]


class Health:
    """Named checks for ``/healthz`` (liveness) and ``/readyz`` (readiness).

    Liveness starts with ``loop``: :meth:`heartbeat` marks it from the event loop every
    ``interval`` seconds, so a loop stuck for ``stall_seconds`` fails ``/healthz``. Whoever
    owns a readiness condition adds it with :meth:`add_readiness` (the operator's watch,
    and its leadership when it elects a leader).
    """

    def __init__(self, stall_seconds: float = 10.0, interval: float = 1.0) -> None:
        self.interval = interval
        self.loop = Recent(stall_seconds)
        self.liveness: dict[str, Check] = {"loop": self.loop}
        self.readiness: dict[str, Check] = {}

    def add_readiness(self, name: str, check: Check) -> None:
        self.readiness[name] = check

    async def heartbeat(self) -> None:
        """Mark the loop alive forever (run it as a task on the loop being watched)."""
        while True:
            self.loop.mark()
            await anyio.sleep(self.interval)


def _report(checks: dict[str, Check]) -> tuple[bool, bytes]:
    """Kubernetes' own /healthz?verbose style: one ``[+]name ok`` or ``[-]name failed``
    line per check, then the verdict."""
    results = [(name, check()) for name, check in checks.items()]
    ok = all(passed for _, passed in results)
    lines = [f"[{'+' if passed else '-'}]{name} {'ok' if passed else 'failed'}"
             for name, passed in results]
    return ok, ("\n".join([*lines, "ok" if ok else "failed"]) + "\n").encode()


def _without(checks: dict[str, Check], query: str) -> dict[str, Check]:
    """The checks less those named by ``?exclude=`` (Kubernetes' own /readyz parameter,
    repeatable): the chart's readiness probe excludes ``leader``, so a standby is a ready
    pod (rollouts and the PodDisruptionBudget count it) while /readyz itself says who
    leads. A name that is no check is ignored."""
    excluded = set(parse_qs(query).get("exclude", ()))
    return {name: check for name, check in checks.items() if name not in excluded}


# --- the endpoint ------------------------------------------------------------------------


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up shutdown


class _DualStackServer(_ThreadingServer):
    """Every address, IPv6 and IPv4 alike: a pod of an IPv6-only cluster is probed and
    scraped on its IPv6 address, and 127.0.0.1 still reaches it."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _server(host: str, port: int, app: WsgiApp) -> WSGIServer:
    """The server for ``host`` ("": every address, both IP versions where IPv6 exists)."""
    if not host:
        try:
            return make_server("::", port, app, _DualStackServer, handler_class=_QuietHandler)
        except OSError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise  # (a port in use is in use for IPv4 too)
    return make_server(host, port, app, _ThreadingServer, handler_class=_QuietHandler)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes and probes every few seconds are not worth a log line each."""


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def wsgi_app(registry: CollectorRegistry, health: Health | None) -> WsgiApp:
    """``/metrics`` from ``registry``; ``/healthz`` and ``/readyz`` from ``health``."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        if health is not None and path in ("/healthz", "/readyz"):
            checks = health.liveness if path == "/healthz" else health.readiness
            ok, body = _report(_without(checks, environ.get("QUERY_STRING", "")))
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics\n"]

    return app


class Endpoint:
    """The HTTP server of one process, in a daemon thread; :meth:`close` stops it.

    ``host`` "" (pods, the operator) is every address of both IP versions; ``kubemr run``
    passes 127.0.0.1, so a laptop's metrics stay on the laptop.
    """

    def __init__(self, port: int, host: str = "", registry: CollectorRegistry = REGISTRY,
                 health: Health | None = None) -> None:
        self._server = _server(host, port, wsgi_app(registry, health))
        #: The bound port (``port`` 0 picks a free one).
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="kubemr-metrics", daemon=True)
        self._thread.start()
        log.info("serving metrics", extra={"port": self.port})

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


def multiprocess_registry(directory: Path) -> CollectorRegistry:
    """The sum of what every process counting into ``directory`` counted."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return registry
