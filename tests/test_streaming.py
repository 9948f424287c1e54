"""Shell commands as map, combine and reduce steps (Hadoop Streaming), with real processes."""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from collections import Counter
from pathlib import Path

import pytest

import kubemr_async
from kubemr_async import (
    Job,
    PermanentTaskError,
    Shell,
    TaskContext,
    counters,
    execute,
    formats,
    shuffle,
    spill,
)
from kubemr_async.errors import JobDefinitionError
from kubemr_async.spec import InvalidSpec, JobSpec
from kubemr_async.streaming import (
    CommandFailed,
    parse_pairs,
    run_mapper,
    run_mapper_combined,
    run_reducer,
    text_pairs,
)

from .test_local_run import DATA, ROOT, _failed_run_logs, kubemr, output_lines

__all__ = ["_failed_run_logs"]  # the autouse fixture keeping failed runs' logs in tmp

#: UTF-8 inputs, and one file whose words are not UTF-8 (its bytes are kept as they are).
TEXT_INPUTS = [DATA / "generated-log.txt", DATA / "kubemr-story.txt"]
MAPPER = "LC_ALL=C tr -s '[:space:]' '\\n' | awk 'NF { print $0 \"\\t1\" }'"
SUMMER = ("awk -F'\\t' '$1 != k { if (NR > 1) print k \"\\t\" n; k = $1; n = 0 } "
          "{ n += $2 } END { if (NR) print k \"\\t\" n }'")


def reference(files: list[Path]) -> list[bytes]:
    counts: Counter[bytes] = Counter()
    for path in files:
        counts.update(path.read_bytes().split())
    return sorted(word + b"\t" + str(n).encode() for word, n in counts.items())


def inputs(files: list[Path]) -> list[str]:
    return [arg for path in files for arg in ("--input", str(path))]


def context(task: str = "map-00001", attempt: int = 2) -> TaskContext:
    return TaskContext(job="streaming-test", task=task, attempt=attempt, partitions=1)


def mapped(command: str, data: bytes) -> tuple[TaskContext, list[tuple[str, str]]]:
    ctx = context()
    asyncio.run(run_mapper(Shell(command), data, ctx))
    table = ctx._emitted()
    return ctx, list(zip(table.column("key").to_pylist(), table.column("value").to_pylist(),
                         strict=True))


# --- parsing --------------------------------------------------------------------------


def test_lines_split_on_the_first_tab_and_a_line_without_one_is_all_key() -> None:
    keys, values = parse_pairs(b"a\t1\nb\nc\t2\t3\n\nd\t\nlast\tno-newline")
    assert keys.to_pylist() == [b"a", b"b", b"c", b"", b"d", b"last"]
    assert values.to_pylist() == [b"1", b"", b"2\t3", b"", b"", b"no-newline"]


def test_output_bytes_are_kept_and_a_nul_byte_fails_naming_the_line() -> None:
    table = text_pairs(b"caf\xe9\t1\nok\t2\n", "w")
    assert shuffle.key_type(table) == "str"
    keys = table.column("key").to_pylist()
    assert [shuffle.str_to_bytes(shuffle.bytes_to_str(k)) for k in keys] == [b"caf\xe9", b"ok"]
    with pytest.raises(PermanentTaskError, match=r"w wrote a NUL byte in output line 2 "
                                                 r".*expected text lines key<TAB>value"):
        text_pairs(b"ok\t1\nz\x00\t2\n", "w")


# --- the Python API -------------------------------------------------------------------


def test_shell_is_public_and_takes_any_step() -> None:
    assert "Shell" in kubemr_async.__all__
    job = Job("mixed")
    job.map(Shell("cat"))
    job.combine(Shell("uniq"))
    job.reduce(Shell("uniq -c"))
    assert (job.map_fn, job.combiner, job.reducer) == (Shell("cat"), Shell("uniq"),
                                                       Shell("uniq -c"))
    assert job.map_input == "bytes" and job.folding_reducer is None
    with pytest.raises(JobDefinitionError, match="Shell needs a command"):
        Shell("  ")


def test_spec_takes_commands_instead_of_a_job_module() -> None:
    spec = JobSpec(name="s", job="", inputs=("x",), mapper="cat", reducer="uniq")
    assert spec.to_dict()["mapper"] == "cat" and "job" not in spec.to_dict()
    assert JobSpec.from_dict("s", spec.to_dict()) == spec
    with pytest.raises(InvalidSpec, match=r"spec.job: a job module \(or spec.mapper"):
        JobSpec(name="s", job="", inputs=("x",), reducer="uniq")
    with pytest.raises(InvalidSpec, match=r"spec\.reducer: a shell command must not be empty"):
        JobSpec(name="s", job="", inputs=("x",), mapper="cat", reducer=" ")


# --- one process ----------------------------------------------------------------------


def test_mapper_streams_large_input_and_output_without_deadlock() -> None:
    data = b"".join(b"key%07d\tvalue\n" % i for i in range(400_000))  # ~7 MiB each way
    _, pairs = mapped("cat", data)
    assert len(pairs) == 400_000
    assert pairs[0] == ("key0000000", "value") and pairs[-1] == ("key0399999", "value")


def combined(data: bytes, combiner: str, buffer_bytes: int = 1 << 20,
             ) -> list[tuple[list[tuple[str, str]], int]]:
    """``cat`` as the mapper of ``data``, then ``combiner``: each spill's pairs and rows."""
    spills: list[tuple[list[tuple[str, str]], int]] = []

    def spill(table: shuffle.Table, rows: int) -> None:
        keys, values = (shuffle.to_python(table.column(name), shuffle.column_kind(table, name))
                        for name in ("key", "value"))
        pairs = zip(keys, values, strict=True)
        spills.append((list(pairs), rows))

    asyncio.run(run_mapper_combined(Shell("cat"), Shell(combiner), data, context(),
                                    buffer_bytes, spill))
    return spills


def test_a_mapper_s_lines_reach_the_combiner_as_they_are_stably_sorted_by_key(
        tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    lines = b"b\t1\ncaf\xe9\tx\ta\\b\r\na\t2\nb\t3\n\t4\na\t1"  # no LF at the end
    assert combined(lines, f"tee {seen}") == [(
        [("", "4"), ("a", "2"), ("a", "1"), ("b", "1"), ("b", "3"),
         (shuffle.bytes_to_str(b"caf\xe9"), "x\ta\\b\r")], 6)]
    assert seen.read_bytes() == (b"\t4\na\t2\na\t1\nb\t1\nb\t3\ncaf\xe9\tx\ta\\b\r\n")


def test_a_full_buffer_of_lines_is_combined_and_spilled_on_its_own() -> None:
    rows = 1_500_000  # 9 MB: stdout comes a few MiB at a time
    data = b"k%d\t1\n" * rows % tuple(i % 7 for i in range(rows))
    spills = combined(data, SUMMER, buffer_bytes=1 << 20)
    assert len(spills) > 1
    assert sum(count for _, count in spills) == rows
    totals: Counter[str] = Counter()
    for pairs, _ in spills:
        assert [key for key, _ in pairs] == sorted(key for key, _ in pairs)
        totals.update({key: int(value) for key, value in pairs})
    assert totals == {f"k{i}": len(range(i, rows, 7)) for i in range(7)}


def test_a_line_without_tab_reaches_the_combiner_as_key_and_empty_value() -> None:
    # A pair's line, as every combiner input is written: "zz<TAB>", two fields.
    assert combined(b"b\t1\nzz\na\t2\n", "awk -F'\\t' '{ print $1 \"\\t\" NF }'") == [
        ([("a", "2"), ("b", "2"), ("zz", "2")], 3)]


def test_a_combiner_s_output_is_sorted_unless_it_is_in_key_order_already(
        tmp_path: Path) -> None:
    job = Job("combined")
    job.map(Shell("cat"))
    job.combine(Shell("sort -r"))  # its output runs against the key order
    job.reduce(Shell("cat"))
    ctx = TaskContext(job="combined", task="map-00000", attempt=1, partitions=2)
    data = b"".join(b"k%02d\t%d\n" % (i % 13, i) for i in range(100))
    written, kind = asyncio.run(execute.run_map(job, [execute.MapSplit.held("", data)], ctx,
                                                tmp_path,
                                                shuffle.ShuffleBudget(64 << 20)))
    assert written is not None and kind == "str"
    parts = [[row for block in spill.read_blocks(piece)
              for row in zip(block.column("key").to_pylist(), block.column("value").to_pylist(),
                             strict=True)]
             for piece in spill.read_index(written[0], 2)]
    assert all(part == sorted(part, key=lambda row: row[0]) for part in parts)
    assert sorted(row for part in parts for row in part) == sorted(
        (f"k{i % 13:02d}", str(i)) for i in range(100))
    assert ctx._counters.snapshot()[counters.FRAMEWORK_GROUP][counters.MAP_OUTPUT_RECORDS] == 100
    sorted_keys = shuffle.pairs_to_table(["a", "a", "b\udcff"], [2, 1, 3])
    assert shuffle.in_key_order(sorted_keys)
    assert not shuffle.in_key_order(shuffle.pairs_to_table(["b", "a"], [1, 2]))
    assert not shuffle.in_key_order(shuffle.pairs_to_table([1, 2], [1, 2]))  # numbers: sort


def test_reducer_gets_sorted_lines_and_its_output_is_the_part(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the command's `tee seen`
    rows = shuffle.pairs_to_table([b"a", b"a", b"b"], [1, 2, 3])  # bytes keys, int values
    command = Shell("tee seen | cut -f1 | uniq -c | awk '{ print $2 \"\\t\" $1 }'")
    parts = {}
    for fmt in ("text", "jsonl"):
        part = spill.PartWriter(tmp_path / f"part.{fmt}", fmt)
        asyncio.run(run_reducer(command, [rows], context("reduce-00000"), part))
        part.close()
        parts[fmt] = part.path.read_bytes()
        assert (tmp_path / "seen").read_bytes() == b"a\t1\na\t2\nb\t3\n"
    assert parts["text"] == b"a\t2\nb\t1\n"
    assert list(formats.decode(parts["jsonl"], "jsonl")) == [("a", "2"), ("b", "1")]
    # A reducer whose last line has no LF: the part's last line is ended all the same.
    part = spill.PartWriter(tmp_path / "unended", "text")
    asyncio.run(run_reducer(Shell("cat >/dev/null; printf 'x\\t1\\ny\\t2'"), [rows],
                            context("reduce-00000"), part))
    part.close()
    assert part.path.read_bytes() == b"x\t1\ny\t2\n"


def test_nonexistent_command_fails_permanently_naming_task_attempt_and_command() -> None:
    with pytest.raises(PermanentTaskError) as caught:
        mapped("no-such-command-kubemr-xyz", b"a\n")
    message = str(caught.value)
    assert message.startswith("map-00001 attempt 2: mapper command "
                              "'no-such-command-kubemr-xyz' not found (exit 127")
    assert "no-such-command-kubemr-xyz" in message.partition("stderr:")[2]
    assert "\n" not in message


def test_nonzero_exit_carries_the_last_twenty_stderr_lines() -> None:
    command = "cat >/dev/null; for i in $(seq 1 30); do echo oops$i >&2; done; exit 3"
    with pytest.raises(CommandFailed) as caught:
        mapped(command, b"x\n")
    message = str(caught.value)
    assert message.startswith("map-00001 attempt 2: mapper command ")
    assert "exited with code 3; stderr: oops11 | oops12" in message
    assert message.endswith("| oops30") and "oops10 |" not in message
    assert "\n" not in message


def test_killed_by_a_signal_names_the_signal() -> None:
    with pytest.raises(CommandFailed, match=r"mapper command 'kill -TERM \$\$' was killed by "
                                            r"SIGTERM"):
        mapped("kill -TERM $$", b"x\n")


def test_malformed_output_fails_saying_what_was_expected() -> None:
    with pytest.raises(PermanentTaskError, match=r"map-00001 attempt 2: mapper command "
                                                 r".* wrote a NUL byte in output line 1 .*"
                                                 r"expected text lines key<TAB>value"):
        mapped("printf 'a\\000b\\t1\\n'", b"")


def test_reporter_lines_reach_counters_and_status_and_other_stderr_is_passed_through(
        capfd: pytest.CaptureFixture[str]) -> None:
    command = ("echo 'reporter:counter:Words,Seen,5' >&2; echo 'reporter:status:halfway' >&2;"
               " echo 'a user message' >&2; echo 'reporter:counter:Words,Seen,2' >&2; cat")
    ctx, pairs = mapped(command, b"k\tv\n")
    assert pairs == [("k", "v")]
    assert ctx._counters.snapshot() == {"Words": {"Seen": 7}}
    assert ctx.status == "halfway"
    err = capfd.readouterr().err
    assert "a user message" in err and "reporter:counter" not in err


def test_a_long_stderr_line_is_passed_on_in_pieces_not_held_whole(
        capfd: pytest.CaptureFixture[str]) -> None:
    """A command writing stderr without newlines used to be held whole and copied on every
    read: 100 MB took 95 s and 477 MB of RSS in the worker (16 s and 99 MB as lines)."""
    size = 8 << 20
    _, pairs = mapped(f"head -c {size} /dev/zero | tr '\\0' x >&2; printf '\\ndone\\n' >&2; cat",
                      b"k\tv\n")
    assert pairs == [("k", "v")]
    lines = capfd.readouterr().err.splitlines()
    assert lines[-1] == "done"
    assert "".join(lines[:-1]) == "x" * size
    assert max(map(len, lines)) <= 2 << 20


def test_a_worker_stopping_lets_a_cancelled_command_be_reaped_before_its_loop_stops(
        tmp_path: Path) -> None:
    """The user loop used to be stopped under the attempt it had just cancelled (its
    command being killed and reaped): at exit Python printed "Task was destroyed but it is
    pending!" and "Event loop is closed" tracebacks on the user's terminal."""
    from kubemr_async.runtime import UserLoop

    pid_file = tmp_path / "pid"

    def started() -> None:
        while not pid_file.exists() or not pid_file.read_text().strip():
            time.sleep(0.01)

    async def stop_while_running() -> UserLoop:
        user = UserLoop()
        attempt = asyncio.ensure_future(user.run(run_mapper(
            Shell(f"echo $$ > {pid_file}; exec sleep 30"), b"", context())))
        await asyncio.to_thread(started)
        attempt.cancel()  # what Worker.stop does to the current attempt
        await user.aclose()
        return user

    user = asyncio.run(stop_while_running())
    assert asyncio.all_tasks(user.loop) == set(), "nothing left pending on the user loop"
    pid = int(pid_file.read_text())
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped already
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_cancelling_the_attempt_kills_the_command_process_group(tmp_path: Path) -> None:
    child = tmp_path / "child"

    async def cancel() -> int:
        task = asyncio.create_task(run_mapper(
            Shell(f"sleep 60 & echo $! > {shlex.quote(str(child))}; wait"), b"", context()))
        deadline = time.monotonic() + 20
        while not (child.exists() and child.read_text().strip()):
            assert time.monotonic() < deadline, "the command never started"
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return int(child.read_text())

    pid = asyncio.run(cancel())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # gone, or a zombie nobody has reaped yet
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    raise AssertionError("the command's child survived the cancelled attempt")


# --- whole jobs with `kubemr run` -------------------------------------------------------


def test_streaming_wordcount_equals_the_python_wordcount(tmp_path: Path) -> None:
    python_out, shell_out = tmp_path / "python", tmp_path / "shell"
    common = [*inputs(TEXT_INPUTS), "--reducers", "2", "--chunk-size", "16k", "--workers", "2"]
    python = kubemr("run", str(ROOT / "examples" / "wordcount.py"), *common,
                    "--output", str(python_out))
    assert python.returncode == 0, python.stderr
    shell = kubemr("run", "--mapper", MAPPER, "--combiner", f"{SUMMER}; echo combined >&2",
                   "--reducer", SUMMER, *common, "--output", str(shell_out))
    assert shell.returncode == 0, shell.stderr
    assert "combined" in shell.stderr, "the combiner ran, its stderr shown as the task's"
    for name in ("part-00000", "part-00001"):  # same partitions, same bytes
        assert (shell_out / name).read_bytes() == (python_out / name).read_bytes()
    assert output_lines(shell_out) == reference(TEXT_INPUTS)


def test_shell_mapper_with_a_python_reducer_and_python_mapper_with_a_shell_reducer(
        tmp_path: Path) -> None:
    module = tmp_path / "mixed.py"
    module.write_text(
        "from kubemr_async import Job, Shell\n"
        "job = Job('mixed')\n"
        f"job.map(Shell({MAPPER!r}))\n"
        "@job.reduce\n"
        "def total(word, counts, ctx):\n"
        "    assert all(isinstance(c, str) for c in counts)\n"
        "    return sum(int(c) for c in counts)\n")
    files = [*TEXT_INPUTS, DATA / "mixed-bytes.txt"]  # non-UTF-8 words keep their bytes
    result = kubemr("run", str(module), *inputs(files), "--reducers", "2",
                    "--output", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    assert output_lines(tmp_path / "a") == reference(files)
    # The Python wordcount's map (bytes keys, int values) feeding a shell reducer.
    result = kubemr("run", str(ROOT / "examples" / "wordcount.py"), "--reducer", SUMMER,
                    *inputs(files), "--reducers", "2", "--output", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    assert output_lines(tmp_path / "b") == reference(files)


def test_a_missing_command_fails_the_run_in_one_line(tmp_path: Path) -> None:
    result = kubemr("run", "--mapper", "no-such-command-kubemr-xyz", "--reducer", "cat",
                    *inputs(TEXT_INPUTS[1:]), "--output", str(tmp_path / "out"))
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("kubemr: error: job streaming-")
    assert ("map-00000 attempt 1: mapper command 'no-such-command-kubemr-xyz' not found"
            in line)
