"""The search for planted credentials (kubemr_async.testing.planted, tests/leaks.py) finds
a leak: a value in any form it takes, a value a process wrote to a log, a value written to
the real API server, and, run as pytest runs it on the suite, a value in a test's output,
in a `kubemr` command's output or in a log file. The suite passing proves nothing unless
the search would have failed it."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kubemr_async.testing.cluster import TestCluster
from kubemr_async.testing.planted import GrowingFile, Planted, audit_leaks

from .test_local_run import KUBEMR, ROOT


def planted() -> tuple[Planted, str]:
    search = Planted()
    return search, search.plant("a test's secret key", "secret")


def test_a_planted_value_is_found_plain_and_in_every_base64_alignment() -> None:
    search, value = planted()
    assert value.startswith("planted-secret-")
    assert search.find("nothing here") is None
    assert search.find(f"error: denied for {value}!") == "a test's secret key"
    for prefix in ("", "u", "us", "user:"):  # a Secret's data, basic auth, any alignment
        blob = base64.b64encode(f"{prefix}{value}\n".encode())
        assert search.find(b'{"data": "' + blob + b'"}') == "a test's secret key (base64)"
        urlsafe = base64.urlsafe_b64encode(f"{prefix}{value}?".encode())
        assert search.find(urlsafe) == "a test's secret key (base64)", prefix


def test_redaction_leaves_the_label_and_no_form_of_the_value() -> None:
    search, value = planted()
    encoded = base64.b64encode(value.encode()).decode()
    text = search.redact(f"key={value} data={encoded}")
    # The encoding's last character mixes the value's last bits with padding: it stays.
    assert text.startswith("key=<a test's secret key> data=<a test's secret key (base64)>")
    assert len(text) <= len("key=<a test's secret key> data=<a test's secret key (base64)>") + 4
    assert search.find(text) is None


def test_a_value_too_short_to_search_for_is_refused() -> None:
    with pytest.raises(ValueError, match="shorter than 12 characters"):
        Planted().add("a short key", "abc")


def test_a_value_a_process_wrote_to_its_log_is_found_naming_the_file(tmp_path: Path) -> None:
    search, value = planted()
    clean, leaky = tmp_path / "clean.log", tmp_path / "leaky.log"
    for path, text in ((clean, "started\n"), (leaky, f"env AWS_SECRET_ACCESS_KEY={value}\n")):
        with path.open("w") as log:
            subprocess.run([sys.executable, "-c", f"print({text!r})"], stdout=log, check=True)
    assert list(search.find_in_files([clean, leaky, tmp_path / "gone.log"])) == [
        (leaky, "a test's secret key")]


@pytest.mark.kube
def test_a_value_written_to_the_api_server_is_found_in_its_audit_log(
        kube_cluster: TestCluster, kube_namespace: str) -> None:
    """A value of this test's own (not the session's: the suite must not fail) written into
    a ConfigMap and an Event on the real API server is named by object and writer."""
    search, value = planted()
    audit = GrowingFile(kube_cluster.audit_log)
    audit.new_lines()  # what other tests wrote before
    api = f"/api/v1/namespaces/{kube_namespace}"
    kube_cluster.api("POST", f"{api}/configmaps",
                     {"metadata": {"name": "clean"}, "data": {"k": "nothing"}})
    kube_cluster.api("POST", f"{api}/configmaps",
                     {"metadata": {"name": "leaky"}, "data": {"k": value}})
    kube_cluster.api("POST", f"{api}/events", {
        "metadata": {"name": "leaky.1"}, "message": f"failed with {value}", "type": "Warning",
        "involvedObject": {"kind": "ConfigMap", "name": "leaky", "namespace": kube_namespace},
        "reason": "Test"})
    leaks = audit_leaks(search, audit.new_lines())
    assert leaks == [
        f"create configmaps {kube_namespace}/leaky by kubemr-admin: a test's secret key",
        f"create events {kube_namespace}/leaky.1 by kubemr-admin: a test's secret key"]


INNER = '''
import subprocess, sys
from pathlib import Path

from tests.leaks import PLANTED

VALUE = PLANTED.plant("the inner session's secret key", "secret")


def test_prints_it():
    print("connecting with", VALUE)


def test_runs_a_kubemr_command_that_names_it():
    subprocess.run([{kubemr!r}, "run", "/nonexistent/" + VALUE + ".py", "-i", "x",
                    "--output", "y"], capture_output=True, text=True, timeout=120)


def test_a_process_logs_it(tmp_path):
    with (tmp_path / "worker.log").open("w") as log:
        subprocess.run([sys.executable, "-c", "import sys; print(sys.argv[1])", VALUE],
                       stdout=log, check=True)


def test_a_failed_local_run_logs_it(tmp_path):
    # Its output is discarded: only the worker log the failed run keeps holds the value.
    (tmp_path / "in.txt").write_text("x\\n")
    (tmp_path / "job.py").write_text(
        "from kubemr_async import Job\\njob = Job('leaky')\\n@job.map\\n"
        f"def m(text, ctx):\\n    print({{VALUE!r}})\\n    raise ValueError('no')\\n"
        "job.reduce('sum')\\n")
    assert subprocess.call([{kubemr!r}, "run", str(tmp_path / "job.py"), "--input",
                            str(tmp_path / "in.txt"), "--output", str(tmp_path / "out"),
                            "--max-attempts", "1"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=120) == 1


def test_clean():
    print("nothing secret")
'''


def test_the_plugin_fails_a_run_that_leaks_in_one_line_naming_where(tmp_path: Path) -> None:
    """tests/leaks.py on a session of its own (a subprocess: its failures are not ours)."""
    (tmp_path / "test_inner.py").write_text(INNER.format(kubemr=KUBEMR))
    report = tmp_path / "report.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.leaks", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), "-c", os.devnull, "--basetemp", str(tmp_path / "base"),
         "-q", "-rA", "--junit-xml", str(report), str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    found = [line for line in out.splitlines() if "planted credential found" in line]
    label = "the inner session's secret key"
    assert any(f"{label} in captured stdout call" in line for line in found), out
    assert any(f"{label} in the stderr of `kubemr run`" in line for line in found), out
    in_files = [line for line in found if "planted credential found in log files: " in line]
    assert any(f"{label} in test_a_process_logs_it0/worker.log" in line
               for line in in_files), out
    assert any(re.search(rf"{label} in kubemr-runs/leaky-[0-9a-f]{{6}}/worker-\d\.log", line)
               for line in in_files), out  # a failed local run's kept worker log
    assert out.splitlines()[-1].startswith("2 failed, 3 passed, 1 error"), out
    assert "ERROR test_inner.py::test_clean" in out, out  # the last teardown: session end
    # The reports (terminal, junit) name what was found, never the value.
    xml = report.read_text()
    assert f"{label} in captured stdout call" in xml
    assert "planted-secret-" not in out + xml, out
