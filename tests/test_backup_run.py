"""Backup tasks end to end: `kubemr run` with a straggler, real worker processes.

One map's first attempt stalls (the job's callback sleeps only on attempt 1 of one
input, as a slow node would); every attempt appends a line to a log kept outside the
store (O_APPEND), so the test sees what really ran independently of the records. The
run also writes its timeline (`--timeline`), drawn from the task records' attempt
histories, so one run shows what the workers did, what the records kept, and both
agree.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import test_local_run as local
from .test_local_run import _failed_run_logs  # noqa: F401 - keeps failed runs' logs in tmp

pytestmark = pytest.mark.slow

JOB_STRAGGLER = """
import asyncio, os
from kubemr_async import Job

job = Job("straggler")

def record(ctx, what):
    fd = os.open(ctx.args["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    name = os.path.basename(ctx.input)
    os.write(fd, f"{name} {ctx.attempt} {what}\\n".encode())
    os.close(fd)

@job.map
async def words(text, ctx):
    record(ctx, "start")
    if ctx.input.endswith("in-5.txt") and ctx.attempt == 1:
        await asyncio.sleep(float(ctx.args["stall"]))  # the straggler
    ctx.counter("test", "maps")
    for word in text.split():
        yield word, 1
    record(ctx, "done")

job.reduce("sum")
"""


def straggler_run(tmp_path: Path, stall: float, *flags: str
                  ) -> tuple[str, Counter[tuple[str, int, str]], Path, list[Path]]:
    """Run the straggler job on 8 inputs with 3 workers: its stderr, the attempt log
    (input file, attempt, start/done) as counts, the output directory and the inputs."""
    log = tmp_path / "attempts.log"
    inputs = []
    for i in range(8):
        path = tmp_path / f"in-{i}.txt"
        path.write_text(" ".join(f"w{(i * 7 + j) % 13}" for j in range(50 + i)) + "\n")
        inputs.append(path)
    out = tmp_path / "out"
    argv = ["run", str(local.write_job(tmp_path, JOB_STRAGGLER)), "--output", str(out),
            "--workers", "3", "--reducers", "2", "--lease-seconds", "3",
            "--arg", f"log={log}", "--arg", f"stall={stall}", *flags]
    for path in inputs:
        argv += ["-i", str(path)]
    result = local.kubemr(*argv)
    assert result.returncode == 0, result.stderr
    seen: Counter[tuple[str, int, str]] = Counter()
    for line in log.read_text().splitlines():
        task, attempt, what = line.split()
        seen[(task, int(attempt), what)] += 1
    return result.stderr, seen, out, inputs


Run = tuple[str, Counter[tuple[str, int, str]], Path, list[Path]]


@pytest.fixture(scope="module")
def won_by_backup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """One run whose straggler stalls 240 s, far longer than the whole job takes
    otherwise: the job can only finish because a backup committed. Its timeline is
    ``timeline.html`` beside the output."""
    tmp = tmp_path_factory.mktemp("won-by-backup")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KUBEMR_LOG_DIR", str(tmp / "logs"))
        yield straggler_run(tmp, 240.0, "--timeline", str(tmp / "timeline.html"))


def test_a_backup_of_the_straggler_wins_and_the_output_is_exact(won_by_backup: Run) -> None:
    stderr, seen, out, inputs = won_by_backup
    summary = re.search(r"backup tasks: (\d+) launched, (\d+) won", stderr)
    assert summary is not None, stderr
    assert int(summary[1]) >= int(summary[2]) >= 1
    straggler = {key[1:]: n for key, n in seen.items() if key[0] == "in-5.txt"}
    assert straggler == {(1, "start"): 1, (2, "start"): 1, (2, "done"): 1}, straggler
    print(f"straggler run: {summary[0]}; attempts of the straggler {straggler}")
    assert local.output_lines(out) == local.reference_lines(inputs)
    manifest = json.loads((out / "_SUCCESS").read_text())
    assert manifest["counters"]["test"]["maps"] == 8, "the loser's counters never count"


def test_the_timeline_shows_both_attempts_of_the_backup_pair(won_by_backup: Run) -> None:
    """The straggler's two attempts are two bars on two workers' rows: the backup
    (attempt 2) committed, the stalled original (attempt 1) lost to it; every other task
    is one committed bar, and any other backup pair likewise ends one committed, one lost
    to its twin (the run may launch more than one under load)."""
    _, seen, out, _ = won_by_backup
    html = (out.parent / "timeline.html").read_text()
    bars = re.findall(r'<g class="bar" data-outcome="([^"]+)"><title>(\S+) attempt (\d+) on '
                      r'([^:<]+): [^<]*?, ([^<;]+?)(?:; slowest #\d)?(?:; input [^<]+)?</title>',
                      html)
    attempts: dict[str, dict[int, tuple[str, str, str]]] = {}
    for outcome, task, attempt, worker, label in bars:
        attempts.setdefault(task, {})[int(attempt)] = (outcome, worker, label)
    straggler = attempts["map-00005"]
    assert {n: (o, label) for n, (o, _, label) in straggler.items()} == {
        1: ("backup", "lost to backup attempt 2"), 2: ("committed", "committed")}, straggler
    assert straggler[1][1] != straggler[2][1], "the backup ran on another worker"
    assert set(attempts) == {f"map-{i:05d}" for i in range(8)} | {"reduce-00000",
                                                                  "reduce-00001"}
    for task, runs in attempts.items():
        outcomes = sorted(o for o, _, _ in runs.values())
        assert outcomes in (["committed"], ["backup", "committed"]), (task, runs)
    # The attempts drawn are those that ran: the log kept outside the store agrees.
    drawn_maps = {(f"in-{int(task[4:])}.txt", n) for task, runs in attempts.items()
                  if task.startswith("map-") for n in runs}
    started = {(task, n) for task, n, what in seen if what == "start"}
    assert started <= drawn_maps, (started, drawn_maps)


def test_without_speculation_the_straggler_runs_alone(tmp_path: Path) -> None:
    stderr, seen, out, inputs = straggler_run(tmp_path, 3.0, "--no-speculative")
    assert "backup tasks" not in stderr
    assert not [key for key in seen if key[1] > 1], f"no second attempt: {seen}"
    assert sum(n for (_, _, what), n in seen.items() if what == "done") == 8
    assert local.output_lines(out) == local.reference_lines(inputs)
