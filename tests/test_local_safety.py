"""`kubemr run` on real data: it never deletes what it did not write, one run writes an
output at a time, nothing is left behind, workers die with their parent, signals give the
shell's exit codes, and users see (and can debug) their own code. Real processes and files.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kubemr_async.outdir import remove_stale

from .test_local_run import (  # noqa: F401 - the fixture keeps failed runs' logs in tmp
    DATA,
    KUBEMR,
    ROOT,
    _failed_run_logs,
    kubemr,
    output_lines,
    reference_lines,
    write_job,
)

WORDCOUNT = str(ROOT / "examples" / "wordcount.py")
DEADLINE = 60.0


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and directory (None) under ``root``, by relative path."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def wait_for(condition: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def worker_pids(parent: int) -> list[int]:
    """The `python -m kubemr_async.local` children of ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if ppid == parent and b"kubemr_async.local" in cmdline:
            found.append(int(entry.name))
    return found


def user_data(tmp_path: Path) -> Path:
    docs = tmp_path / "data" / "docs"
    docs.mkdir(parents=True)
    (docs / "a.txt").write_bytes(b"alpha beta\n")
    (docs / "b.txt").write_bytes(b"beta gamma\xff\n")
    (tmp_path / "data" / "notes.md").write_bytes(b"my notes\n")
    return docs


# --- never delete what kubemr did not write ---------------------------------------------


def test_overwrite_into_the_inputs_parent_is_refused(tmp_path: Path) -> None:
    docs = user_data(tmp_path)
    before = snapshot(tmp_path / "data")
    result = kubemr("run", WORDCOUNT, "--input", str(docs), "--output", str(tmp_path / "data"),
                    "--overwrite")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"kubemr: error: output {tmp_path / 'data'} contains "
                                     f"input {docs}")
    assert snapshot(tmp_path / "data") == before
    assert hidden(tmp_path) == []


def test_output_inside_an_input_directory_is_refused(tmp_path: Path) -> None:
    docs = user_data(tmp_path)
    before = snapshot(tmp_path / "data")
    result = kubemr("run", WORDCOUNT, "--input", str(docs), "--output", str(docs / "out"))
    assert result.returncode == 2
    assert f"output {docs / 'out'} lies inside input {docs}" in result.stderr
    assert snapshot(tmp_path / "data") == before, "not even the output directory is created"


def test_output_that_is_an_expanded_input_file_is_refused(tmp_path: Path) -> None:
    docs = user_data(tmp_path)
    before = snapshot(tmp_path / "data")
    result = kubemr("run", WORDCOUNT, "--input", str(docs / "*.txt"), "--output",
                    str(docs / "a.txt"), "--overwrite")
    assert result.returncode == 2
    assert f"output {docs / 'a.txt'} is one of the inputs" in result.stderr
    assert snapshot(tmp_path / "data") == before


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_users_own_non_empty_directory_is_refused(tmp_path: Path, overwrite: list[str]
                                                    ) -> None:
    docs = user_data(tmp_path)
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "part-00000").write_bytes(b"looks like a result, is not\n")
    (mine / "sub" / "thesis.tex").write_bytes(b"\\begin{document}\n")
    before = snapshot(mine)
    result = kubemr("run", WORDCOUNT, "--input", str(docs), "--output", str(mine), *overwrite)
    assert result.returncode == 2
    assert "is a non-empty directory without a kubemr _SUCCESS manifest" in result.stderr
    assert snapshot(mine) == before
    assert hidden(tmp_path) == []


def test_an_output_that_is_a_file_is_refused(tmp_path: Path) -> None:
    docs = user_data(tmp_path)
    target = tmp_path / "report.txt"
    target.write_bytes(b"precious\n")
    result = kubemr("run", WORDCOUNT, "--input", str(docs), "--output", str(target),
                    "--overwrite")
    assert result.returncode == 2
    assert f"output {target} is a file, not a directory" in result.stderr
    assert target.read_bytes() == b"precious\n"


@pytest.mark.parametrize("extra", ["mine.txt", "_logs/notes.txt"])
def test_a_result_holding_a_user_file_is_refused_naming_it(tmp_path: Path, extra: str) -> None:
    docs = user_data(tmp_path)
    out = tmp_path / "out"
    assert kubemr("run", WORDCOUNT, "--input", str(docs), "--output", str(out)).returncode == 0
    (out / extra).write_bytes(b"added by the user\n")
    before = snapshot(out)
    result = kubemr("run", WORDCOUNT, "--input", str(docs), "--output", str(out), "--overwrite")
    assert result.returncode == 2
    assert f"output {out} holds {extra}, which" in result.stderr
    assert snapshot(out) == before


@pytest.mark.parametrize(("output", "message"), [
    ("loop", "output {tmp}/loop cannot be resolved: "),
    ("report.txt/out", "output {tmp}/report.txt/out cannot be a directory: Not a directory"),
    (os.fsdecode(b"caf\xe9"), "output {tmp}/caf\\xe9 has a name that is not valid UTF-8"),
    ("job", "job module {tmp}/caf\\xe9.py has a name that is not valid UTF-8"),
])
def test_an_output_or_job_path_that_cannot_be_used_is_one_line(tmp_path: Path, output: str,
                                                                message: str) -> None:
    """Each used to end `kubemr run` in a traceback (the last two after every map ran:
    the workers could not write the name into their records)."""
    docs = user_data(tmp_path)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "report.txt").write_bytes(b"precious\n")
    job = Path(WORDCOUNT)
    if output == "job":
        job = tmp_path / os.fsdecode(b"caf\xe9.py")
        job.write_bytes(Path(WORDCOUNT).read_bytes())
        output = "out"
    before = snapshot(tmp_path)
    result = kubemr("run", str(job), "--input", str(docs), "--output", str(tmp_path / output))
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"kubemr: error: {message.format(tmp=tmp_path)}")
    assert snapshot(tmp_path) == before


# --- one writer per output ---------------------------------------------------------------

JOB_GATED = """
import asyncio, os
from pathlib import Path
from kubemr_async import Job

job = Job("gated")

@job.map(input="bytes")
async def m(chunk, ctx):
    Path(ctx.args["started"], f"{ctx.task}-{os.getpid()}").write_text("")
    while ctx.args.get("gate") and not Path(ctx.args["gate"]).exists():
        await asyncio.sleep(0.05)
    ctx.emit_batch(chunk.split(), 1)

job.reduce("sum")
"""


def start_gated(tmp_path: Path, docs: Path, out: Path) -> tuple[subprocess.Popen[str], Path, Path]:
    """A `kubemr run` whose maps wait for a gate file: (process, started dir, gate)."""
    started = tmp_path / "started"
    started.mkdir(exist_ok=True)
    gate = tmp_path / "gate"
    proc = subprocess.Popen(
        [KUBEMR, "run", str(write_job(tmp_path, JOB_GATED)), "--input", str(docs), "--output",
         str(out), "--workers", "2", "--arg", f"started={started}", "--arg", f"gate={gate}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(list(started.iterdir())) == 2 or proc.poll() is not None,
             "both maps to start")
    assert proc.poll() is None, proc.communicate()
    return proc, started, gate


def test_a_second_run_into_the_same_output_fails_at_once(tmp_path: Path) -> None:
    docs = user_data(tmp_path)
    out = tmp_path / "out"
    first, _, gate = start_gated(tmp_path, docs, out)
    try:
        second = kubemr("run", WORDCOUNT, "--input", str(docs), "--output", str(out),
                        "--overwrite")
        assert second.returncode == 1
        assert second.stderr.strip() == (
            f"kubemr: error: output {out} is being written by another kubemr run "
            f"(pid {first.pid} on host {socket.gethostname()})")
    finally:
        gate.write_text("open")
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert output_lines(out) == reference_lines(sorted(docs.iterdir()))
    assert hidden(tmp_path) == [], "lock and work directory removed"


@pytest.mark.parametrize("stale", ["dead pid", "old mtime"])
def test_a_stale_lock_is_taken_over(tmp_path: Path, stale: str) -> None:
    docs = user_data(tmp_path)
    out = tmp_path / "out"
    lock = tmp_path / ".out.kubemr-lock"
    if stale == "dead pid":
        dead = subprocess.Popen(["true"])
        dead.wait()
        owner = {"pid": dead.pid, "host": socket.gethostname(), "token": "x"}
        lock.write_text(json.dumps(owner))
    else:  # a live pid, but on another host and untouched for long
        lock.write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere", "token": "x"}))
        os.utime(lock, (time.time() - 3600, time.time() - 3600))
    result = kubemr("run", WORDCOUNT, "--input", str(docs), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert output_lines(out) == reference_lines(sorted(docs.iterdir()))
    assert hidden(tmp_path) == []


def test_a_fresh_lock_of_a_live_run_is_respected(tmp_path: Path) -> None:
    docs = user_data(tmp_path)
    lock = tmp_path / ".out.kubemr-lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere", "token": "x"}))
    result = kubemr("run", WORDCOUNT, "--input", str(docs), "--output", str(tmp_path / "out"))
    assert result.returncode == 1
    assert f"(pid {os.getpid()} on host elsewhere)" in result.stderr
    assert json.loads(lock.read_text())["token"] == "x", "the owner's lock is untouched"


# --- workers die with their parent; signals; no junk ---------------------------------------


def test_sigkilled_parent_leaves_no_orphans_and_the_next_run_cleans_up(tmp_path: Path) -> None:
    docs = user_data(tmp_path)
    out = tmp_path / "out"
    parent, _, gate = start_gated(tmp_path, docs, out)
    wait_for(lambda: len(worker_pids(parent.pid)) == 2, "two workers")
    workers = worker_pids(parent.pid)
    parent.send_signal(signal.SIGKILL)
    parent.communicate(timeout=60)
    wait_for(lambda: not any(alive(pid) for pid in workers), "the workers to exit")
    assert ".out.kubemr-lock" in hidden(tmp_path), "the killed run could not clean up"
    assert any(re.fullmatch(r"\.out\.kubemr-work-[0-9a-f]{12}", n) for n in hidden(tmp_path))
    (tmp_path / "keep").mkdir()
    (tmp_path / ".out.kubemr-work-mine").write_bytes(b"not ours by name\n")
    gate.write_text("open")
    result = kubemr("run", WORDCOUNT, "--input", str(docs), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert output_lines(out) == reference_lines(sorted(docs.iterdir()))
    assert hidden(tmp_path) == [".out.kubemr-work-mine"], "only exact names are removed"


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_stop_workers_clean_up_and_exit_like_a_shell(tmp_path: Path, sig: int,
                                                           code: int) -> None:
    docs = user_data(tmp_path)
    out = tmp_path / "out"
    parent, _, _ = start_gated(tmp_path, docs, out)
    wait_for(lambda: len(worker_pids(parent.pid)) == 2, "two workers")
    workers = worker_pids(parent.pid)
    parent.send_signal(sig)
    _, stderr = parent.communicate(timeout=120)
    assert parent.returncode == code, stderr
    assert stderr.strip().splitlines()[-1] == "kubemr: error: interrupted"
    assert not any(alive(pid) for pid in workers)
    assert hidden(tmp_path) == [] and not out.exists()


# --- see your own code ---------------------------------------------------------------------

JOB_CHATTY = """
import subprocess, sys
from kubemr_async import Job

job = Job("chatty")

@job.map
async def m(text, ctx):
    print("hello from", ctx.task)
    print("to stderr", file=sys.stderr)
    ctx.log.info("logged %s", ctx.attempt)
    subprocess.run(["echo", "from a child process"], check=True)
    if "boom" in text:
        raise ValueError("boom")
    for w in text.split():
        yield w, 1

job.reduce("sum")
"""


@pytest.mark.parametrize("verbose", [[], ["-v"]])
def test_what_callbacks_print_is_streamed_with_prefixes_and_kept(tmp_path: Path,
                                                                 verbose: list[str]) -> None:
    data = tmp_path / "in.txt"
    data.write_text("some words\n")
    out = tmp_path / "out"
    result = kubemr("run", str(write_job(tmp_path, JOB_CHATTY)), "--input", str(data),
                    "--output", str(out), *verbose)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    for text in ("hello from map-00000", "to stderr", "logged 1", "from a child process"):
        assert any(re.fullmatch(rf"\[w\d map-00000\] {text}", line) for line in lines), \
            (text, result.stderr)
    framework = [line for line in lines if '"logger":"kubemr.worker"' in line]
    assert bool(framework) == bool(verbose), "framework logs only with -v"
    kept = "".join(p.read_text() for p in (out / "_logs").glob("worker-*.log"))
    assert "hello from map-00000" in kept and '"msg":"claimed"' in kept


def test_a_failure_names_task_attempt_and_the_log_holding_it(tmp_path: Path) -> None:
    data = tmp_path / "in.txt"
    data.write_text("boom\n")
    out = tmp_path / "out"
    job = write_job(tmp_path, JOB_CHATTY)
    result = kubemr("run", str(job), "--input", str(data), "--output", str(out),
                    "--max-attempts", "2")
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    match = re.fullmatch(
        rf"kubemr: error: job (chatty-[0-9a-f]{{6}}) failed: task map-00000 attempt 2: "
        rf"ValueError: boom \(at {re.escape(str(job))}:\d+\); log: (.+/worker-\d\.log)", error)
    assert match, error
    log = Path(match.group(2))
    assert log.parent == Path(os.environ["KUBEMR_LOG_DIR"]) / match.group(1)
    assert "hello from map-00000" in log.read_text()
    assert '"attempt":2' in log.read_text()
    assert not out.exists() and hidden(tmp_path) == []


# --- debugging: --inline, breakpoint() -------------------------------------------------------

JOB_BREAKPOINT = """
from kubemr_async import Job

job = Job("debugged")

@job.map(input="bytes")
async def m(chunk, ctx):
    breakpoint()
    ctx.emit_batch(chunk.split(), 1)

job.reduce("sum")
"""


@pytest.mark.parametrize("mode", [["--inline"], ["--workers", "0"]])
def test_breakpoint_works_inline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 mode: list[str]) -> None:
    monkeypatch.delenv("PYTHONBREAKPOINT", raising=False)
    docs = user_data(tmp_path)
    out = tmp_path / "out"
    result = kubemr("run", str(write_job(tmp_path, JOB_BREAKPOINT)), "--input", str(docs),
                    "--output", str(out), *mode, stdin="c\nc\n")
    assert result.returncode == 0, result.stderr
    assert "(Pdb)" in result.stdout, "pdb prompted on this terminal"
    assert output_lines(out) == reference_lines(sorted(docs.iterdir()))


def test_breakpoint_in_a_worker_process_fails_at_once_pointing_to_inline(tmp_path: Path
                                                                        ) -> None:
    data = tmp_path / "in.txt"
    data.write_text("x\n")
    result = kubemr("run", str(write_job(tmp_path, JOB_BREAKPOINT)), "--input", str(data),
                    "--output", str(tmp_path / "out"), "--max-attempts", "3")
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert "task map-00000 attempt 1: PermanentTaskError: breakpoint()" in error, error
    assert "kubemr run --inline" in error


# --- the command line ----------------------------------------------------------------------


def test_unquoted_shell_glob_after_input_is_all_inputs(tmp_path: Path) -> None:
    files = sorted(DATA.glob("*.txt"))
    out = tmp_path / "out"
    result = kubemr("run", WORDCOUNT, "--input", *map(str, files), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert output_lines(out) == reference_lines(files)
    assert json.loads((out / "_SUCCESS").read_text())["parts"] == ["part-00000"], \
        "one reducer by default"


def test_version_flag() -> None:
    flag, command = kubemr("--version"), kubemr("version")
    assert flag.returncode == 0 and command.returncode == 0
    assert flag.stdout == command.stdout and re.fullmatch(r"\d+\.\d+\.\d+.*\n", flag.stdout)


def test_a_result_moved_aside_by_a_killed_publish_is_restored_not_deleted(tmp_path: Path
                                                                          ) -> None:
    # The state a `kubemr run` SIGKILLed mid-publish leaves: no output, the old result aside.
    aside = tmp_path / ".out.kubemr-old-0123456789ab"
    aside.mkdir()
    (aside / "part-00000").write_bytes(b"a\t1\n")
    (aside / "_SUCCESS").write_bytes(b'{"job": "earlier", "parts": ["part-00000"]}')
    out = tmp_path / "out"
    removed = remove_stale(out)
    assert removed == []
    assert (out / "part-00000").read_bytes() == b"a\t1\n"
    assert not aside.exists()
