"""Real test environment: a Kubernetes control plane, an S3 server and a stand-in kubelet.

The project tests against real servers instead of mocks, because a mock only answers what
its author believed the server does (conflicts, watch resumption, admission, RBAC, S3's
error codes are where those beliefs go wrong). ``TestCluster`` runs etcd, kube-apiserver
and kube-controller-manager on loopback, ``S3Server`` runs an S3-compatible server, and
``FakeKubelet`` plays the one part we cannot run here, turning Pods into local processes.
The binaries come from the ``hack/ensure-*`` scripts, which build them from the Go module
proxy once and cache them.

This package is not in the wheel (pyproject.toml excludes it): it runs the checkout's
``hack/`` scripts, so it works only from a source checkout, which is where tests and
benchmarks run.

The classes live in submodules that are imported lazily, so importing this package (as
every submodule does, for the helpers below) stays cheap.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import datetime
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from kubemr_async.testing.cluster import TestCluster
    from kubemr_async.testing.kubelet import FakeKubelet
    from kubemr_async.testing.s3server import S3Server

__all__ = ["FakeKubelet", "S3Server", "TestCluster", "TestEnvError", "free_port"]

#: The source checkout holding ``hack/``; the helpers are meant for an editable install.
REPO_ROOT = Path(__file__).resolve().parents[2]


class TestEnvError(RuntimeError):
    """A test server could not be obtained or started; the message says why."""

    __test__ = False  # not a pytest test class, despite the name


def utc_now() -> str:
    """The time as Kubernetes writes it in status fields (RFC 3339, whole seconds, UTC)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def free_port() -> int:
    """Return a loopback TCP port that is free right now.

    There is a small window before the server binds it; on a test machine that is an
    acceptable trade for not having to parse port numbers out of server logs.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_ensure_script(name: str, *args: str, env: Mapping[str, str] | None = None) -> str:
    """Run ``hack/<name>`` (with ``env`` added to ours) and return the last line of its stdout.

    The scripts may build binaries for many minutes on first use; their progress is
    echoed to our stderr so a person (or ``pytest -s``) sees what is happening, and the
    last lines go into the error if the script fails.
    """
    script = REPO_ROOT / "hack" / name
    if not script.is_file():
        raise TestEnvError(f"{script} not found: kubemr_async.testing needs a source checkout")
    with subprocess.Popen(
        ["bash", str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    ) as proc:
        assert proc.stderr is not None and proc.stdout is not None
        tail: collections.deque[str] = collections.deque(maxlen=20)
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line)
        lines = proc.stdout.read().strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise TestEnvError(f"{script} failed with exit code {proc.returncode}:\n{''.join(tail)}")
    return lines[-1]


def log_tail(path: Path, lines: int = 40) -> str:
    """Last lines of a server log, to put the actual cause into startup errors."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


class ServerProcesses:
    """Child server processes, each logging to ``<log_dir>/<name>.log``.

    Shared by the cluster and the S3 server so both fail the same way: a server that exits
    or never becomes ready raises TestEnvError carrying the tail of its log.
    """

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._argv: dict[str, list[str]] = {}

    def spawn(self, name: str, argv: list[str], *, append: bool = False) -> None:
        self._argv[name] = argv
        with (self._log_dir / f"{name}.log").open("ab" if append else "wb") as log:
            self._procs[name] = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._log_dir,
            )

    def wait_ready(self, name: str, ready: Callable[[], bool], timeout: float = 180.0) -> None:
        """Poll ``ready()`` (connection errors count as "not yet") until true."""
        proc = self._procs[name]
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise TestEnvError(
                    f"{name} exited with code {proc.returncode} during startup; log tail:\n"
                    + log_tail(self._log_dir / f"{name}.log")
                )
            try:
                if ready():
                    return
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                raise TestEnvError(
                    f"{name} not ready after {timeout:.0f}s; log tail:\n"
                    + log_tail(self._log_dir / f"{name}.log")
                )
            time.sleep(0.2)

    def kill(self, name: str) -> None:
        """SIGKILL one server (a crash, as a fault test wants it) and reap it."""
        proc = self._procs[name]
        proc.kill()
        proc.wait()

    def respawn(self, name: str) -> None:
        """Start a killed server again with the same arguments, appending to its log; the
        caller waits for it with :meth:`wait_ready`. Processes keep their start order, so
        :meth:`stop` still stops dependants first."""
        if self._procs[name].poll() is None:
            raise TestEnvError(f"{name} is still running")
        self.spawn(name, self._argv[name], append=True)

    def stop(self) -> None:
        """Stop each process in reverse start order, SIGKILL if it lingers for 15 s.

        One at a time, because later servers depend on earlier ones: an apiserver whose
        etcd vanished first hangs in its graceful shutdown.
        """
        for proc in reversed(self._procs.values()):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()


class ServerGroup:
    """What a running test server (the cluster, the S3 server) owns: its processes and a
    temp dir. Subclasses set both in ``start()``; ``stop()`` and the context manager are
    shared, and ``stop()`` is registered with atexit so no server outlives its tests."""

    def __init__(self) -> None:
        self._tmp: Path | None = None
        self._procs: ServerProcesses | None = None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the processes (newest first) and delete the temp dir. Idempotent."""
        atexit.unregister(self.stop)
        if self._procs is not None:
            self._procs.stop()
            self._procs = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM, so ``kill <pid>`` cleans up the servers like Ctrl-C.

    SIGINT is reset to Python's handler because shells start background jobs with it
    ignored.
    """

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


def __getattr__(name: str) -> object:
    if name == "TestCluster":
        from kubemr_async.testing.cluster import TestCluster

        return TestCluster
    if name == "S3Server":
        from kubemr_async.testing.s3server import S3Server

        return S3Server
    if name == "FakeKubelet":
        from kubemr_async.testing.kubelet import FakeKubelet

        return FakeKubelet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
