"""`kubemr run` end to end: real worker processes, the SQLite store, files on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KUBEMR = str(Path(sys.executable).parent / "kubemr")
DATA = ROOT / "examples" / "data"


@pytest.fixture(autouse=True)
def _failed_run_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Failed runs keep their logs here, not in the home directory."""
    logs = tmp_path.parent / f"{tmp_path.name}-logs"
    monkeypatch.setenv("KUBEMR_LOG_DIR", str(logs))
    return logs


def kubemr(*args: str, cwd: Path | None = None, stdin: str | None = None
           ) -> subprocess.CompletedProcess[str]:
    assert "KUBEMR_LOG_DIR" in os.environ
    return subprocess.run([KUBEMR, *args], capture_output=True, text=True, cwd=cwd,
                          input=stdin, timeout=300)


def reference_lines(files: list[Path]) -> list[bytes]:
    counts: Counter[bytes] = Counter()
    for path in files:
        counts.update(path.read_bytes().split())
    return sorted(word + b"\t" + str(n).encode() for word, n in counts.items())


def output_lines(out: Path) -> list[bytes]:
    lines: list[bytes] = []
    for part in sorted(out.glob("part-*")):
        lines += part.read_bytes().splitlines()
    return sorted(lines)


@pytest.mark.parametrize(("example", "extra"), [
    ("wordcount.py", ["--reducers", "3", "--chunk-size", "7k", "--workers", "3"]),
    ("wordcount.py", ["--reducers", "1", "--workers", "1"]),
    ("wordcount_lowlevel.py", ["--reducers", "2", "--workers", "2"]),
])
def test_examples_match_an_independent_reference(tmp_path: Path, example: str,
                                                 extra: list[str]) -> None:
    out = tmp_path / "out"
    # The low-level job gets one file path per input (as an unquoted shell glob gives);
    # directories and quoted globs for it are tested in test_input_formats.py.
    inputs = (["--input", str(DATA)] if example == "wordcount.py"
              else [arg for path in sorted(DATA.iterdir()) for arg in ("--input", str(path))])
    result = kubemr("run", str(ROOT / "examples" / example), *inputs, "--output", str(out),
                    *extra)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    files = sorted(DATA.iterdir())
    assert output_lines(out) == reference_lines(files)
    manifest = json.loads((out / "_SUCCESS").read_text())
    reducers = int(extra[extra.index("--reducers") + 1])
    assert manifest["parts"] == [f"part-{r:05d}" for r in range(reducers)]
    # They were the workers' paths in the work directory, which is gone by now.
    assert manifest["results"] == [str(out / part) for part in manifest["parts"]]
    assert not list(tmp_path.glob(".out.*")), "the work directory is cleaned up"


def test_key_value_outputs_are_sorted_within_each_partition(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = kubemr("run", str(ROOT / "examples" / "wordcount.py"), "-i", str(DATA),
                    "--output", str(out), "--reducers", "2")
    assert result.returncode == 0, result.stderr
    for part in out.glob("part-*"):
        words = [line.split(b"\t")[0] for line in part.read_bytes().splitlines()]
        assert words == sorted(words)


def test_non_utf8_bytes_and_case_are_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = kubemr("run", str(ROOT / "examples" / "wordcount.py"), "-i",
                    str(DATA / "mixed-bytes.txt"), "--output", str(out))
    assert result.returncode == 0, result.stderr
    lines = output_lines(out)
    assert b"caf\xe9\t100" in lines and b"CAF\xc3\x89\t50" in lines and b"caf\xc3\xa9\t50" in lines


JOB_RAISES = """
from kubemr_async import Job
job = Job("boom")

@job.map
async def m(text, ctx):
    if "poison" in text:
        raise ValueError("poison line found")
    for w in text.split():
        yield w, 1

job.reduce("sum")
"""

JOB_BAD_KEY = """
from kubemr_async import Job
job = Job("badkey")

@job.map
async def m(text, ctx):
    yield {1, 2}, 1

job.reduce("sum")
"""

JOB_USER_REDUCE = """
from kubemr_async import Job
job = Job("lengths")

@job.map
async def m(text, ctx):
    for w in text.split():
        ctx.emit(len(w), w)

@job.reduce
async def r(key, values, ctx):
    return ",".join(sorted(set(values)))
"""


def write_job(tmp_path: Path, source: str, name: str = "job.py") -> Path:
    path = tmp_path / name
    path.write_text(source)
    return path


def test_callback_errors_are_retried_then_fail_the_job_naming_the_task(tmp_path: Path) -> None:
    data = tmp_path / "in.txt"
    data.write_text("fine words\npoison here\n")
    out = tmp_path / "out"
    result = kubemr("run", str(write_job(tmp_path, JOB_RAISES)), "-i", str(data), "--output",
                    str(out), "--max-attempts", "2")
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("kubemr: error: job boom-")
    assert "task map-00000 attempt 2: ValueError: poison line found" in error
    assert not out.exists(), "no partial output may be presented"


def test_non_serialisable_key_fails_at_once_with_the_type(tmp_path: Path) -> None:
    data = tmp_path / "in.txt"
    data.write_text("x\n")
    result = kubemr("run", str(write_job(tmp_path, JOB_BAD_KEY)), "-i", str(data), "--output",
                    str(tmp_path / "out"), "--max-attempts", "5")
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert "task map-00000 attempt 1" in error, "a permanent error is not retried"
    assert "set" in error


def test_python_reduce_with_int_keys(tmp_path: Path) -> None:
    data = tmp_path / "in.txt"
    data.write_text("a bb cc ddd a\n")
    out = tmp_path / "out"
    result = kubemr("run", str(write_job(tmp_path, JOB_USER_REDUCE)), "-i", str(data), "--output",
                    str(out), "--reducers", "1")
    assert result.returncode == 0, result.stderr
    assert (out / "part-00000").read_bytes() == b"1\ta\n2\tbb,cc\n3\tddd\n"


@pytest.mark.parametrize(("args", "message"), [
    (["--input", "{tmp}/missing.txt"], "input {tmp}/missing.txt does not exist"),
    (["--input", "{tmp}/*.nomatch"], "matches no files"),
    (["--workers", "-1"], "--workers"),
    (["--workers", "1001"], "between 0 (runs --inline) and 1000, got 1001"),
    (["--reducers", "-1"], "spec.reducers"),  # spec limits name the field, as the CRD does
    (["--chunk-size", "0"], "spec.chunkSize"),
    (["--chunk-size", "lots"], "invalid size"),
    (["--max-attempts", "0"], "spec.maxAttempts"),
])
def test_bad_flags_and_inputs_fail_with_one_clear_line(tmp_path: Path, args: list[str],
                                                       message: str) -> None:
    data = tmp_path / "in.txt"
    data.write_text("a\n")
    argv = ["run", str(ROOT / "examples" / "wordcount.py"), "--output", str(tmp_path / "out")]
    if "--input" not in args:
        argv += ["--input", str(data)]
    result = kubemr(*argv, *[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2, result.stderr
    assert message.format(tmp=tmp_path) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("source", "message"), [
    (None, "does not exist"),
    ("x = 1\n", "defines no job"),
    ("import no_such_module_xyz\n", "failed to import: ModuleNotFoundError"),
    ("from kubemr_async import Job\njob = Job('j')\njob.reduce('sum')\n", "no map callback"),
])
def test_bad_job_modules(tmp_path: Path, source: str | None, message: str) -> None:
    module = tmp_path / "job.py" if source is None else write_job(tmp_path, source)
    data = tmp_path / "in.txt"
    data.write_text("a\n")
    result = kubemr("run", str(module), "-i", str(data), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1]


def test_existing_result_is_refused_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["run", str(ROOT / "examples" / "wordcount.py"), "-i",
            str(DATA / "kubemr-story.txt"), "--output", str(out)]
    first = kubemr(*argv)
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    refused = kubemr(*argv)
    assert refused.returncode == 2
    assert "already holds results of an earlier kubemr run; pass --overwrite" in refused.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    replaced = kubemr(*argv, "--overwrite", "--reducers", "2")
    assert replaced.returncode == 0, replaced.stderr
    assert output_lines(out) == reference_lines([DATA / "kubemr-story.txt"])
    assert sorted(p.name for p in out.iterdir()) == ["_SUCCESS", "_logs", "part-00000",
                                                     "part-00001"]


@pytest.mark.parametrize(("argv", "message"), [
    (["run", "--bogus"], "No such option: --bogus"),
    (["run", "job.py", "-i", "x", "--output", "y", "--workers", "zero"],
     "Invalid value for '--workers'"),
    (["run", "job.py", "-i", "x", "-o", "y"], "No such option: -o"),
    (["status"], "Missing argument 'NAME'"),
    (["frobnicate"], "No such command 'frobnicate'"),
])
def test_malformed_command_lines_fail_with_one_line(argv: list[str], message: str) -> None:
    result = kubemr(*argv)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kubemr: error: ") and message in lines[0]


@pytest.mark.parametrize(("url", "shown"), [
    ("https://reader:PLANTED-url-pass@127.0.0.1:1/data.txt",
     "input https://reader:***@127.0.0.1:1/data.txt does not exist"),
    ("s3://AKIAIOSFODNN7EXAMPLE:PLANTED-url-pass@bucket/x",
     "invalid S3 URL 's3://***@bucket/x': credentials do not belong in it; give them "
     "as AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
])
def test_an_input_url_with_a_password_is_refused_without_printing_it(
        tmp_path: Path, url: str, shown: str) -> None:
    """The error line quoted the URL as typed, password and all (and the bucket part of an
    s3:// one again on its own, key and secret)."""
    result = kubemr("run", str(ROOT / "examples" / "wordcount.py"), "--input", url,
                    "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr == f"kubemr: error: {shown}\n"


def test_a_callbacks_error_loses_a_url_password_everywhere(tmp_path: Path) -> None:
    """A driver's error names its connection URL: not in the error line, the worker logs
    or the timeline."""
    (tmp_path / "job.py").write_text("""
from kubemr_async import Job
job = Job("dburl")

@job.map
def words(text, ctx):
    raise ConnectionError("cannot reach postgresql://app:PLANTED-url-pass@db:5432/x")

job.reduce("sum")
""")
    (tmp_path / "in.txt").write_text("a b\n")
    logs = Path(os.environ["KUBEMR_LOG_DIR"])
    result = kubemr("run", str(tmp_path / "job.py"), "--input", str(tmp_path / "in.txt"),
                    "--output", str(tmp_path / "out"), "--max-attempts", "1",
                    "--timeline", str(tmp_path / "timeline.html"))
    assert result.returncode == 1
    assert "ConnectionError: cannot reach postgresql://app:***@db:5432/x" in result.stderr
    job = result.stderr.split("job ", 1)[1].split(" ", 1)[0]
    written = [*(logs / job).iterdir(), tmp_path / "timeline.html"]
    assert len(written) >= 2
    for path in written:
        assert "PLANTED-url-pass" not in path.read_text(), path
    assert "PLANTED-url-pass" not in result.stderr
