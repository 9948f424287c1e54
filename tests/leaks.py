"""The suite-wide search for planted credentials (docs/security.md, guarantee 3).

Every credential the test environment hands out is planted (kubemr_async.testing.planted):
the session's S3 server keys (the ``s3_server`` fixture, so also the platform Secret the
operator fixtures and the chart tests make from them), and what a module adds with
``PLANTED.add`` (tests/test_tenant_security.py: a tenant's keys, a wrong one). Loaded from
tests/conftest.py, this plugin fails a test in whose output a planted value shows up, in
one line naming where and what (never the value):

- the test's captured stdout, stderr and log sections, each phase; they are redacted in
  the report, so the failure's own output does not print the value;
- the stdout and stderr of every `kubemr` command the test ran: the CLI is run as a
  process (``subprocess.run`` or ``Popen.communicate``), whose output goes to the test,
  not to pytest's capture, so a tap on ``Popen.communicate`` records it;
- what the API server was asked to write meanwhile: the audit log of a cluster made by
  :func:`audited_cluster` holds the body of every write of Events, MapReduceJobs and their
  status, MapReduceTasks, Pods, batch Jobs, ConfigMaps and ServiceAccounts, in every
  namespace, including objects deleted before anyone could list them (a finished job's
  task namespace). It is read after each test, and once more before the cluster stops.

The log files the fixtures and tests write (the operators' logs, the pods' output as the
test kubelets keep it, the worker logs of local runs: a run that succeeded keeps them in its
output, one that failed in ``KUBEMR_LOG_DIR``, which the plugin points there) are searched
once, at the end of the session: every ``*.log`` under pytest's base temp dir. A hit there
fails the run as an error at the last test's teardown, naming each file.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from kubemr_async.testing.cluster import TestCluster
from kubemr_async.testing.planted import GrowingFile, Planted, audit_leaks

#: The session's planted values; fixtures plant theirs here.
PLANTED = Planted()
#: ("kubemr <command>", output) of every `kubemr` run since the last report.
_CLI_OUTPUT: list[tuple[str, Any]] = []
#: The audit logs of the running audited clusters, read after each test.
_AUDIT_LOGS: list[GrowingFile] = []
_communicate = subprocess.Popen.communicate


def _is_kubemr(args: Any) -> bool:
    first = args.split()[0] if isinstance(args, str) else (list(args) or [""])[0]
    return Path(str(first)).name == "kubemr"


def _tapped_communicate(self: subprocess.Popen[Any], input: Any = None,
                        timeout: float | None = None) -> tuple[Any, Any]:
    """``Popen.communicate`` recording a `kubemr` process's output for the search."""
    out = _communicate(self, input, timeout)
    if _is_kubemr(self.args):
        command = self.args[1] if not isinstance(self.args, str) and len(self.args) > 1 else ""
        _CLI_OUTPUT.append((f"kubemr {command}".strip(), out))
    return out


def pytest_configure(config: pytest.Config) -> None:
    subprocess.Popen.communicate = _tapped_communicate  # type: ignore[method-assign,assignment]


def pytest_unconfigure(config: pytest.Config) -> None:
    subprocess.Popen.communicate = _communicate  # type: ignore[method-assign]


def leaks_in_report(report: pytest.TestReport) -> list[str]:
    """Where a planted value shows up in this phase's output, the `kubemr` commands run
    and the API writes made since the last report; the report's sections are redacted."""
    leaks = []
    for title, content in report.sections:
        label = PLANTED.find(content)
        if label is not None and title.endswith(f" {report.when}"):
            leaks.append(f"{label} in {title.lower()}")
    report.sections = [(title, PLANTED.redact(content)) for title, content in report.sections]
    while _CLI_OUTPUT:
        command, streams = _CLI_OUTPUT.pop(0)
        for stream, text in zip(("stdout", "stderr"), streams, strict=True):
            label = PLANTED.find(text) if text else None
            if label is not None:
                leaks.append(f"{label} in the {stream} of `{command}`")
    for log in _AUDIT_LOGS:
        leaks += [f"{leak} (API server audit log)"
                  for leak in audit_leaks(PLANTED, log.new_lines())]
    return leaks


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    leaks = leaks_in_report(report)
    failure = report.longrepr
    if failure is not None and PLANTED.find(str(failure)) is not None:
        report.longrepr = PLANTED.redact(str(failure))
    if leaks:
        line = "planted credential found: " + "; ".join(leaks)
        report.outcome = "failed"
        report.longrepr = line if failure is None else f"{report.longrepr}\n{line}"
    return report


@contextlib.contextmanager
def audited_cluster() -> Iterator[TestCluster]:
    """A TestCluster whose API writes are searched after each test and before it stops."""
    with TestCluster(audit=True) as cluster:
        log = GrowingFile(cluster.audit_log)
        _AUDIT_LOGS.append(log)
        try:
            yield cluster
        finally:
            _AUDIT_LOGS.remove(log)
        leaks = audit_leaks(PLANTED, log.new_lines())
        if leaks:
            raise AssertionError("planted credential found in the API server's audit log: "
                                 + "; ".join(leaks))


@pytest.fixture(scope="session")
def planted() -> Planted:
    """The session's planted values, for a fixture or test that hands out a credential."""
    return PLANTED


@pytest.fixture(scope="session", autouse=True)
def _no_planted_value_in_log_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Last of all, every ``*.log`` the session wrote under pytest's temp dir; the logs a
    failed local run keeps (``KUBEMR_LOG_DIR``, else ~/.local/state) are kept there too."""
    base = tmp_path_factory.getbasetemp()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KUBEMR_LOG_DIR", str(base / "kubemr-runs"))
        yield
    found = [f"{label} in {path.relative_to(base)}"
             for path, label in PLANTED.find_in_files(sorted(base.rglob("*.log")))]
    if found:
        raise AssertionError("planted credential found in log files: " + "; ".join(found))
