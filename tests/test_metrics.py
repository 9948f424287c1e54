"""Metrics and health checks (issue 15): the HTTP endpoint in-process (a frozen event loop
fails /healthz, /readyz follows its checks, the exposition passes Prometheus's linter) and
`kubemr run --metrics-port` scraped during a real run that is held half-way on purpose.

The operator's and a worker pod's endpoints on the real API server are in
tests/test_metrics_e2e.py, which uses the helpers here.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from kubemr_async import metrics
from kubemr_async.errors import UsageError
from kubemr_async.kube import Backoff, Kube
from kubemr_async.operator import Operator, OperatorConfig
from kubemr_async.testing import run_ensure_script

from .test_counters import COUNTING, expected_totals
from .test_local_run import DATA, KUBEMR

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="session")
def promlint() -> str:
    """Prometheus's exposition linter (what `promtool check metrics` runs), built once."""
    return run_ensure_script("ensure-promtool.sh")


def lint(promlint: str, exposition: str) -> None:
    proc = subprocess.run([promlint], input=exposition, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"promlint found problems:\n{proc.stdout}{proc.stderr}"


def get(url: str) -> tuple[int, str]:
    """The status and body of a GET (an error status is an answer, not an exception)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for_status(url: str, status: int, timeout: float = 60.0) -> str:
    """Poll ``url`` until it answers ``status``; its body then."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            code, body = get(url)
        except OSError:  # not listening yet
            code, body = 0, ""
        if code == status:
            return body
        assert time.monotonic() < deadline, f"{url} answered {code} {body!r}, not {status}"
        time.sleep(0.05)


def parse(exposition: str) -> Samples:
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(exposition)
            for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for a series not created yet (a counter never incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape_until(url: str, ready: Callable[[Samples], bool],
                 timeout: float = 240.0) -> tuple[str, Samples]:
    """Scrape ``url`` until its samples satisfy ``ready``: the exposition and samples."""
    deadline = time.monotonic() + timeout
    text, samples = "", {}
    while True:
        try:
            code, text = get(url)
            samples = parse(text) if code == 200 else {}
        except OSError:
            samples = {}
        if samples and ready(samples):
            return text, samples
        assert time.monotonic() < deadline, f"{url} never got there; last scrape:\n{text}"
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_healthz_fails_while_the_event_loop_is_frozen_and_recovers() -> None:
    """The endpoint's thread answers while the loop is stuck (time.sleep-like blocking in
    a callback) and says so; once the loop runs again, /healthz is 200 again."""

    async def main() -> None:
        health = metrics.Health(stall_seconds=0.5, interval=0.05)
        endpoint = metrics.Endpoint(0, "127.0.0.1", health=health)
        url = f"http://127.0.0.1:{endpoint.port}/healthz"
        beating = asyncio.create_task(health.heartbeat())
        try:
            assert await asyncio.to_thread(wait_for_status, url, 200) == "[+]loop ok\nok\n"
            seen: list[str] = []
            unhealthy = threading.Event()

            def watch() -> None:
                seen.append(wait_for_status(url, 503))
                unhealthy.set()

            threading.Thread(target=watch, daemon=True).start()
            # The loop is frozen: this blocks it (no await) until the thread saw a 503.
            assert unhealthy.wait(timeout=60), "/healthz stayed healthy on a frozen loop"
            assert seen == ["[-]loop failed\nfailed\n"]
            await asyncio.to_thread(wait_for_status, url, 200)
        finally:
            beating.cancel()
            endpoint.close()

    asyncio.run(main())


def test_readyz_follows_its_checks_and_metrics_pass_the_linter(promlint: str) -> None:
    health = metrics.Health()
    watch = metrics.Recent(60.0)
    health.add_readiness("watch", watch)
    endpoint = metrics.Endpoint(0, "127.0.0.1", health=health)
    base = f"http://127.0.0.1:{endpoint.port}"
    try:
        assert get(f"{base}/readyz") == (503, "[-]watch failed\nfailed\n")
        watch.mark()
        assert get(f"{base}/readyz") == (200, "[+]watch ok\nok\n")
        leading = [False]
        health.add_readiness("leader", lambda: leading[0])  # a standby
        assert get(f"{base}/readyz") == (503, "[+]watch ok\n[-]leader failed\nfailed\n")
        # Kubernetes' ?exclude= (the chart's readiness probe): a standby is a ready pod.
        assert get(f"{base}/readyz?exclude=leader") == (200, "[+]watch ok\nok\n")
        assert get(f"{base}/readyz?exclude=leader&exclude=watch") == (200, "ok\n")
        assert get(f"{base}/readyz?exclude=nothing")[0] == 503, "an unknown name is ignored"
        leading[0] = True
        assert get(f"{base}/readyz") == (200, "[+]watch ok\n[+]leader ok\nok\n")
        assert get(f"{base}/nothing")[0] == 404
        code, exposition = get(f"{base}/metrics")
        assert code == 200
        lint(promlint, exposition)
        ours = {family.name for family in text_string_to_metric_families(exposition)
                if not family.name.startswith(("python_", "process_"))}
        assert "kubemr_tasks_committed" in ours  # (the parser drops counters' _total)
        assert all(name.startswith("kubemr_") for name in ours), ours
    finally:
        endpoint.close()


def test_the_every_address_endpoint_answers_on_ipv4_and_ipv6_loopback() -> None:
    """Pods and the operator bind every address: both IP versions where IPv6 exists, so
    an IPv6-only cluster's probes reach it too."""
    endpoint = metrics.Endpoint(0)
    try:
        assert get(f"http://127.0.0.1:{endpoint.port}/metrics")[0] == 200
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError:
            return  # no IPv6 on this machine: IPv4 was all there was to serve
        assert get(f"http://[::1]:{endpoint.port}/metrics")[0] == 200
    finally:
        endpoint.close()


def test_api_retries_count_the_waits_of_a_backoff() -> None:
    """The first wait after a reset does not sleep (nothing to retry yet); each one after
    is a retry."""
    def retries() -> float:
        return REGISTRY.get_sample_value("kubemr_api_retries_total") or 0.0

    backoff = Backoff(initial=0.001, maximum=0.001)
    before = retries()

    async def waits() -> None:
        for _ in range(3):
            await backoff.wait()

    asyncio.run(waits())
    assert retries() - before == 2


@pytest.mark.parametrize("workers", [["--workers", "2"], ["--inline"]])
def test_kubemr_run_metrics_port_serves_what_the_workers_did(tmp_path: Path, promlint: str,
                                                             workers: list[str]) -> None:
    """Scraped through `kubemr run` while the job is held half-way (two worker processes,
    summed; or the one inline worker, whose held reduce blocks the loop but not the
    endpoint's thread): every map committed, the injected reduce failure counted once,
    every input byte read."""
    port, gate = free_port(), tmp_path / "gate"
    env = {**os.environ, "KUBEMR_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.Popen(
        [KUBEMR, "run", COUNTING, "-i", str(DATA), "--output", str(tmp_path / "out"),
         *workers, "--reducers", "1", "--arg", "fail=reduce-00000",
         "--arg", f"gate={gate}", "--metrics-port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        text, samples = scrape_until(
            f"http://127.0.0.1:{port}/metrics",
            lambda s: value(s, "kubemr_tasks_claimed_total", kind="reduce") == 2)
        lint(promlint, text)
        totals = expected_totals()["kubemr"]
        maps = len(list(DATA.iterdir()))  # one split per file
        assert value(samples, "kubemr_tasks_claimed_total", kind="map") == maps
        assert value(samples, "kubemr_tasks_committed_total", kind="map") == maps
        assert value(samples, "kubemr_tasks_committed_total", kind="reduce") == 0
        assert value(samples, "kubemr_tasks_failed_total", kind="reduce") == 1
        assert value(samples, "kubemr_tasks_failed_total", kind="map") == 0
        assert value(samples, "kubemr_task_duration_seconds_count", kind="map",
                     outcome="committed") == maps
        assert value(samples, "kubemr_read_bytes_total", source="input") == totals[
            "mapInputBytes"]
        assert value(samples, "kubemr_records_written_total", kind="map") == totals[
            "mapOutputRecords"]
        assert value(samples, "kubemr_map_spills_total") >= maps
        gate.touch()
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_a_busy_port_is_one_usage_error_not_a_traceback(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # The endpoint comes first in run(): no API call is made, so no server is needed.
        operator = Operator(cast(Kube, None), OperatorConfig(metrics_port=port))
        with pytest.raises(UsageError, match=f"--metrics-port {port}: Address already in use"):
            asyncio.run(operator.run())
        out = tmp_path / "out"
        run = subprocess.run([KUBEMR, "run", COUNTING, "-i", str(DATA), "--output", str(out),
                              "--metrics-port", str(port)], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "KUBEMR_LOG_DIR": str(tmp_path)})
    assert run.returncode == 2
    assert run.stderr == f"kubemr: error: --metrics-port {port}: Address already in use\n"
    assert not out.exists()


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_a_port_out_of_range_is_one_usage_error_not_a_traceback(tmp_path: Path,
                                                                port: str) -> None:
    """bind() raised OverflowError, which escaped as a traceback."""
    out = tmp_path / "out"
    run = subprocess.run([KUBEMR, "run", COUNTING, "-i", str(DATA), "--output", str(out),
                          "--metrics-port", port], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "KUBEMR_LOG_DIR": str(tmp_path)})
    assert run.returncode == 2
    assert run.stderr == (f"kubemr: error: Invalid value for '--metrics-port': {port} is not "
                          "in the range 0<=x<=65535. (see kubemr run --help)\n")
    assert not out.exists()
