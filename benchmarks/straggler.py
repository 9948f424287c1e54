"""Straggler benchmark: a job with one slowed worker, with and without backup tasks.

Usage::

    python benchmarks/straggler.py [--tasks 40] [--workers 4] [--work-ms 250]
                                   [--duty 0.05] [--period 1.0] [--repeat 1]

``kubemr run`` runs a CPU-bound job of ``--tasks`` maps (each hashes for about
``--work-ms`` of one core, then emits a few pairs; one reduce sums them) on ``--workers``
local workers. Once the workers are up, one of them is slowed to ``--duty`` of its speed
by a SIGSTOP/SIGCONT duty cycle of ``--period`` seconds (a noisy neighbour, a throttled
CPU: MapReduce's "straggler"). The lease (``--lease-seconds``, 300) is long enough that
the slowed worker, whose heartbeats are slowed too, never loses its tasks: it is slow, not
dead, and only backup tasks can help. The same job runs with backup tasks on (the default) and off
(``--no-speculative``), alternating, ``--repeat`` times each; the best wall time of each
(process start to exit), the ratio off / on (> 1: backups cut the wall time), the backups
``kubemr run`` reported, and the peak RSS of the process tree are printed. Every run's
result is checked against the sums computed here.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

try:  # imported as part of the repo (tests, `python -m benchmarks.straggler`)
    from benchmarks import wordcount
except ModuleNotFoundError:  # run as a script: make the sibling module importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import wordcount  # type: ignore[import-not-found,no-redef]

#: The job: each input file holds a seed and a number of rounds; the map hashes that many
#: rounds (CPU the duty cycle can slow) and emits (seed mod 8, the first digest byte). A
#: map first leaves its worker's pid in the ``pids`` directory: the first worker to run a
#: map is the one slowed (a worker slowed from its start might never claim a task).
JOB = '''
import hashlib, os
from kubemr_async import Job

job = Job("straggler")

@job.map
def burn(text, ctx):
    open(os.path.join(ctx.args["pids"], str(os.getpid())), "a").close()
    seed, rounds = (int(x) for x in text.split())
    digest = seed.to_bytes(8, "big")
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    yield seed % 8, digest[0]

job.reduce("sum")
'''
BACKUPS = re.compile(r"backup tasks: (\d+) launched, (\d+) won")


def burn(seed: int, rounds: int) -> int:
    """The map's value, computed here for the reference."""
    digest = seed.to_bytes(8, "big")
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return digest[0]


def rounds_for(ms: float) -> int:
    """How many hash rounds take ``ms`` milliseconds of this machine's CPU now."""
    rounds, started = 200_000, time.process_time()
    burn(0, rounds)
    return max(1, int(rounds * ms / 1000 / max(time.process_time() - started, 1e-6)))


class DutyCycle:
    """Slow the first worker that ran a map (its pid appears in ``pids``) to ``duty`` of
    its speed until the run ends."""

    def __init__(self, pids: Path, duty: float, period: float) -> None:
        self.pids, self.duty, self.period = pids, duty, period
        self.pid: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._cycle, daemon=True)

    def _worker(self) -> int | None:
        marks = sorted(self.pids.iterdir(), key=lambda path: path.stat().st_mtime_ns)
        return int(marks[0].name) if marks else None

    def _cycle(self) -> None:
        while self.pid is None and not self._stop.wait(0.05):
            self.pid = self._worker()
        while self.pid is not None and not self._stop.is_set():
            try:
                os.kill(self.pid, signal.SIGSTOP)
                self._stop.wait(self.period * (1 - self.duty))
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                return
            self._stop.wait(self.period * self.duty)

    def __enter__(self) -> DutyCycle:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)


@dataclass
class Row:
    name: str
    runs: list[float] = field(default_factory=list)
    backups: tuple[int, int] = (0, 0)
    peak_rss: int = 0

    @property
    def best(self) -> float:
        return min(self.runs)


def run_job(cmd: list[str], out: Path, pids: Path, expected: dict[int, int], duty: float,
            period: float) -> tuple[float, tuple[int, int], int]:
    """One `kubemr run`: its wall time, the backups it reported, its tree's peak RSS."""
    for mark in pids.iterdir():
        mark.unlink()
    with wordcount.PeakRSS() as memory:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        with DutyCycle(pids, duty, period) as slowed:
            _, stderr = proc.communicate()
        seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` exited {proc.returncode}:\n{stderr.decode()}")
    if slowed.pid is None:
        raise SystemExit("no worker ran a map: nothing was slowed")
    got = {}
    for part in sorted(out.glob("part-*")):
        for line in part.read_text().splitlines():
            key, value = line.split("\t")
            got[int(key)] = int(value)
    if got != expected:
        raise SystemExit(f"wrong result: {got} != {expected}")
    found = BACKUPS.search(stderr.decode())
    return seconds, (int(found[1]), int(found[2])) if found else (0, 0), memory.peak


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--tasks", type=int, default=40, help="map tasks (default 40)")
    p.add_argument("--workers", type=int, default=4, help="kubemr run --workers (default 4)")
    p.add_argument("--work-ms", type=float, default=250,
                   help="CPU milliseconds per map at full speed (default 250)")
    p.add_argument("--duty", type=float, default=0.05,
                   help="fraction of each period the slowed worker runs (default 0.05)")
    p.add_argument("--period", type=float, default=1.0,
                   help="seconds per stop/continue cycle (default 1.0)")
    p.add_argument("--lease-seconds", type=float, default=300,
                   help="kubemr run --lease-seconds (default 300: no takeover)")
    p.add_argument("--repeat", type=int, default=1, help="runs per setting; best reported")
    p.add_argument("--kubemr", default=None, help="kubemr executable (default: next to python)")
    args = p.parse_args(argv)
    if not 0 < args.duty <= 1 or args.period <= 0 or args.tasks < 1 or args.repeat < 1:
        p.error("--duty must be in (0, 1], --period > 0, --tasks and --repeat >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rounds = rounds_for(args.work_ms)
    expected: dict[int, int] = {}
    with tempfile.TemporaryDirectory(prefix="kubemr-straggler-") as tmp:
        root = Path(tmp)
        (root / "job.py").write_text(JOB)
        pids = root / "pids"
        pids.mkdir()
        inputs = []
        for seed in range(args.tasks):
            path = root / f"in-{seed:03d}.txt"
            path.write_text(f"{seed} {rounds}\n")
            inputs += ["--input", str(path)]
            expected[seed % 8] = expected.get(seed % 8, 0) + burn(seed, rounds)
        rows = {"backups on": Row("backups on"), "backups off": Row("backups off")}
        for round_no in range(args.repeat):
            for row in rows.values():
                out = root / "out"
                kubemr = args.kubemr or wordcount.default_kubemr()
                cmd = [kubemr, "run", str(root / "job.py"), *inputs,
                       "--output", str(out), "--overwrite", "--workers", str(args.workers),
                       "--reducers", "1", "--no-progress", "--arg", f"pids={pids}",
                       "--lease-seconds", str(args.lease_seconds)]
                if row.name == "backups off":
                    cmd.append("--no-speculative")
                seconds, backups, peak = run_job(cmd, out, pids, expected, args.duty,
                                                 args.period)
                print(f"  {row.name} round {round_no + 1}/{args.repeat}: {seconds:.2f} s, "
                      f"backups {backups[0]} launched / {backups[1]} won", file=sys.stderr)
                row.runs.append(seconds)
                row.backups = backups if seconds == row.best else row.backups
                row.peak_rss = max(row.peak_rss, peak)
    for line in wordcount.machine_info():
        print(line)
    print(f"job: {args.tasks} maps of ~{args.work_ms:.0f} ms CPU ({rounds} hash rounds), "
          f"{args.workers} workers, the first to run a map at {args.duty:.0%} speed "
          f"(SIGSTOP/SIGCONT, {args.period:g} s period), lease {args.lease_seconds:g} s, "
          f"best of {args.repeat}")
    print()
    print("| backup tasks | seconds | backups launched / won | peak RSS MiB |")
    print("|---|--:|--:|--:|")
    for row in rows.values():
        print(f"| {row.name.split()[1]} | {row.best:.2f} | {row.backups[0]} / {row.backups[1]} "
              f"| {row.peak_rss / 2**20:.0f} |")
    ratio = rows["backups off"].best / rows["backups on"].best
    print(f"\nwall time off / on: {ratio:.2f}x (> 1: backup tasks cut the slowed job's time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
