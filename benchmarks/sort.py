"""Sort benchmark: `kubemr run examples/sort.py` against GNU sort, DuckDB and polars.

Usage::

    python benchmarks/sort.py [--sizes 1GiB,4GiB] [--files 16] [--workers 2]
                              [--memory 256MiB] [--reducers 8] [--skew 0.0]
                              [--only kubemr,gnu-sort,duckdb,polars]

Every peer sorts the same cached corpus of 100-byte records (``examples/sort.py`` defines
the format) and every output is validated (``kubemr_async.validate``: globally sorted, same
record count and order-independent checksum as the input). Each peer runs as its own child
process, timed from spawn to exit, and the peak RSS (VmHWM) of every process in its tree is
sampled from /proc, so kubemr's parent and each worker are reported separately. The ratio
column is kubemr's speed over the peer's (> 1: kubemr is faster).

The peers:

* ``gnu-sort``: ``LC_ALL=C sort -S <memory> --parallel=<workers> -T <tmp> -o OUT FILES``
* ``duckdb``: ``COPY (SELECT line FROM read_csv(...) ORDER BY line) TO OUT`` with
  ``threads=<workers>``, spilling to a temp dir; tried at each ``--duckdb-memory`` limit,
  smallest first, and the smallest that completes is reported;
* ``polars``: ``read_csv`` of every file, ``sort``, ``write_csv``, all in memory;
* ``kubemr``: ``kubemr run examples/sort.py --workers N --reducers R`` (plus
  ``--memory`` when this kubemr's CLI has the flag; the table says whether it was used).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: import the repo's packages
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.corpus import default_data_dir  # noqa: E402
from benchmarks.wordcount import children_by_parent, default_kubemr, machine_info  # noqa: E402
from kubemr_async.validate import (  # noqa: E402
    KEY_SIZE,
    RECORD_SIZE,
    Layout,
    Summary,
    ValidationError,
    check_sorted_copy,
    summarize,
)

PEERS = ("gnu-sort", "duckdb", "polars", "kubemr")
GENERATOR_VERSION = 1
DEFAULT_SEED = 20261202
HOT_KEYS = 4  # with --skew, this many keys take that share of all records
_BATCH = 1 << 20  # records generated per numpy batch
_HEX = np.frombuffer(b"0123456789ABCDEF", dtype=np.uint8)


class PeerError(RuntimeError):
    """A peer could not produce a result; the message is shown in the report."""


# --------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SortCorpusSpec:
    """Parameters that fully determine the corpus bytes."""

    records: int
    files: int
    seed: int = DEFAULT_SEED
    skew: float = 0.0
    version: int = GENERATOR_VERSION

    @property
    def name(self) -> str:
        skew = f"-skew{self.skew:g}" if self.skew else ""
        return f"sort-v{self.version}-s{self.seed}-{self.records}r-{self.files}f{skew}"

    def file_records(self) -> list[int]:
        base, rem = divmod(self.records, self.files)
        return [base + (1 if i < rem else 0) for i in range(self.files)]


@dataclass(frozen=True)
class SortCorpus:
    spec: SortCorpusSpec
    directory: Path
    paths: list[Path]
    generated: bool

    @property
    def size_bytes(self) -> int:
        return self.spec.records * RECORD_SIZE


def render_records(seed: int, file_index: int, first: int, count: int, skew: float
                   ) -> npt.NDArray[np.uint8]:
    """``count`` records (rows of 100 bytes) starting at corpus ordinal ``first``.

    Keys are 10 uniform printable ASCII characters, except that a ``skew`` share of them
    are one of HOT_KEYS fixed keys. The payload carries the ordinal, so records are unique.
    """
    rows = np.empty((count, RECORD_SIZE), dtype=np.uint8)
    if count == 0:
        return rows
    rng = np.random.default_rng([seed, file_index, first])
    rows[:, :KEY_SIZE] = rng.integers(0x20, 0x7F, size=(count, KEY_SIZE), dtype=np.uint8)
    if skew:
        hot = np.random.default_rng([seed, 0x407]).integers(
            0x20, 0x7F, size=(HOT_KEYS, KEY_SIZE), dtype=np.uint8)
        chosen = rng.random(count) < skew
        rows[chosen, :KEY_SIZE] = hot[rng.integers(0, HOT_KEYS, int(chosen.sum()))]
    rows[:, 10:12] = ord(" ")
    rows[:, 12:28] = ord("0")
    ordinals = np.arange(first, first + count, dtype=np.uint64)
    for digit in range(16):
        shift = np.uint64(4 * (15 - digit))
        rows[:, 28 + digit] = _HEX[((ordinals >> shift) & np.uint64(15)).astype(np.intp)]
    rows[:, 44:46] = ord(" ")
    rows[:, 46:99] = rng.integers(ord("A"), ord("Z") + 1, size=(count, 53), dtype=np.uint8)
    rows[:, 99] = ord("\n")
    return rows


def ensure_sort_corpus(base_dir: Path, size_bytes: int, files: int, seed: int = DEFAULT_SEED,
                       skew: float = 0.0) -> SortCorpus:
    """The corpus for these parameters (size rounded down to whole records), cached.

    Layout: ``<base_dir>/<name>/records-NNNNN.txt`` and a JSON stamp beside the directory
    (so the directory itself is a clean ``--input``); regenerated if the stamp or a file
    size does not match.
    """
    spec = SortCorpusSpec(records=size_bytes // RECORD_SIZE, files=files, seed=seed, skew=skew)
    if files < 1 or spec.records < files:
        raise ValueError(f"need at least one record per file, got {spec.records}/{files}")
    directory = base_dir / spec.name
    stamp = base_dir / f"{spec.name}.json"
    paths = [directory / f"records-{i:05d}.txt" for i in range(files)]
    sizes = [n * RECORD_SIZE for n in spec.file_records()]
    with contextlib.suppress(OSError, ValueError):
        if json.loads(stamp.read_text()) == asdict(spec) and all(
                p.stat().st_size == s for p, s in zip(paths, sizes, strict=True)):
            return SortCorpus(spec, directory, paths, generated=False)
    stamp.unlink(missing_ok=True)  # an interrupted generation must not look valid
    directory.mkdir(parents=True, exist_ok=True)
    first = 0
    for index, (path, count) in enumerate(zip(paths, spec.file_records(), strict=True)):
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            for start in range(0, count, _BATCH):
                n = min(_BATCH, count - start)
                f.write(render_records(seed, index, first + start, n, skew).tobytes())
        tmp.replace(path)
        first += count
    stamp.write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return SortCorpus(spec, directory, paths, generated=True)


# --------------------------------------------------------------------------------------
# Peak memory of every process in a tree
# --------------------------------------------------------------------------------------


class TreePeaks:
    """Peak RSS (VmHWM) of every process descended from this one while a peer runs.

    The kernel keeps each process's high-water mark, so sampling every 50 ms only has to
    see a process once before it exits; each is named by its command line. Linux only.
    """

    def __init__(self) -> None:
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        children = children_by_parent()
        stack = list(children.get(os.getpid(), []))
        while stack:
            pid = stack.pop()
            stack += children.get(pid, [])
            try:
                with open(f"/proc/{pid}/status", "rb") as f:
                    status = f.read()
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith(b"VmHWM:"):
                    peak = int(line.split()[1]) * 1024
                    if peak >= self.peaks.get(pid, ("", 0))[1]:
                        self.peaks[pid] = (_short_name(cmdline), peak)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def __enter__(self) -> TreePeaks:
        if os.path.isdir("/proc"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()

    def top(self) -> list[tuple[str, int]]:
        """(name, peak bytes) for every process seen, largest first."""
        return sorted(self.peaks.values(), key=lambda item: -item[1])


def _short_name(cmdline: str) -> str:
    argv = cmdline.split()
    if "--peer-child" in argv[:-1]:
        return argv[argv.index("--peer-child") + 1]
    if "kubemr_async.local" in argv:
        return "kubemr worker"
    if (len(argv) > 2 and argv[1].endswith("/kubemr") and argv[2] == "run") or (
            len(argv) > 1 and argv[0].endswith("kubemr") and argv[1] == "run"):
        return "kubemr run"
    return argv[0].rsplit("/", 1)[-1] if argv else "?"


# --------------------------------------------------------------------------------------
# Peers: each is one command line; the output is the sorted records somewhere.
# --------------------------------------------------------------------------------------


@dataclass
class Options:
    workers: int = 2
    memory: str = "256MiB"
    reducers: int = 8
    kubemr: str = ""
    duckdb_memory: tuple[str, ...] = ("128MB", "256MB", "512MB", "1GB", "2GB", "4GB")
    work_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))
    kubemr_memory_flag: bool | None = None  # whether `kubemr run` has --memory (probed)


def _gnu_memory(memory: str) -> str:
    """256MiB -> 256M: sort's -S takes K/M/G suffixes (powers of 1024)."""
    return memory.removesuffix("iB").removesuffix("B")


def kubemr_has_memory_flag(executable: str) -> bool:
    proc = subprocess.run([executable, "run", "--help"], capture_output=True, text=True,
                          check=False)
    return "--memory" in proc.stdout


def peer_command(name: str, paths: Sequence[Path], directory: Path, out: Path, tmp: Path,
                 opts: Options, duckdb_memory: str = "") -> tuple[list[str], list[Path], Layout]:
    """The command to run, the output files it leaves (in order) and their line layout."""
    files = [str(p) for p in paths]
    if name == "gnu-sort":
        cmd = ["sort", "-S", _gnu_memory(opts.memory), f"--parallel={opts.workers}",
               "-T", str(tmp), "-o", str(out), *files]
        return cmd, [out], "records"
    if name in ("duckdb", "polars"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--peer-child", name,
               "--child-out", str(out), "--child-tmp", str(tmp),
               "--workers", str(opts.workers), "--child-memory", duckdb_memory, *files]
        return cmd, [out], "records"
    if name == "kubemr":
        cmd = [opts.kubemr or default_kubemr(), "run", str(REPO_ROOT / "examples" / "sort.py"),
               "--input", str(directory), "--output", str(out), "--workers",
               str(opts.workers), "--reducers", str(opts.reducers), "--no-progress"]
        if opts.kubemr_memory_flag:
            cmd += ["--memory", opts.memory]
        parts = [out / f"part-{i:05d}" for i in range(opts.reducers)]
        return cmd, parts, "kubemr"
    raise PeerError(f"unknown peer {name!r}")


def child_duckdb(files: Sequence[str], out: str, tmp: str, threads: int, memory: str) -> None:
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET threads={threads}")
    con.execute(f"SET memory_limit='{memory}'")
    con.execute(f"SET temp_directory='{tmp}'")
    con.execute("SET preserve_insertion_order=false")
    listing = ", ".join(f"'{f}'" for f in files)
    # One VARCHAR column per line: a delimiter and no quote character that never occur.
    con.execute(
        f"COPY (SELECT line FROM read_csv([{listing}], columns={{'line': 'VARCHAR'}}, "
        "header=false, delim=chr(1), quote='', escape='', auto_detect=false) ORDER BY line) "
        f"TO '{out}' (FORMAT csv, HEADER false, QUOTE '', ESCAPE '', DELIMITER chr(1))")


def child_polars(files: Sequence[str], out: str) -> None:
    import polars as pl

    frames = [pl.read_csv(f, has_header=False, separator="\x01", quote_char=None,
                          new_columns=["line"], schema={"line": pl.String}) for f in files]
    pl.concat(frames).sort("line").write_csv(out, include_header=False, quote_style="never",
                                             separator="\x01")


# --------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------


@dataclass
class Result:
    peer: str
    seconds: float | None = None
    correct: bool = False
    error: str | None = None
    processes: list[tuple[str, int]] = field(default_factory=list)
    note: str = ""

    @property
    def peak(self) -> int | None:
        return max((p for _, p in self.processes), default=None)


def run_peer(name: str, corpus: SortCorpus, expected: Summary, opts: Options) -> Result:
    """Run one peer in a child process, time it, sample its memory, validate its output."""
    if name == "duckdb":
        # The smallest memory limit it completes with: try them smallest first.
        failures = []
        for limit in opts.duckdb_memory:
            result = _run_once(name, corpus, expected, opts, limit)
            if result.seconds is not None:
                result.note = f"memory_limit={limit}"
                return result
            failures.append(f"{limit}: {(result.error or '').splitlines()[-1:]}")
        return Result(name, error="did not complete at any memory limit:\n" + "\n".join(failures))
    return _run_once(name, corpus, expected, opts)


def _run_once(name: str, corpus: SortCorpus, expected: Summary, opts: Options,
              duckdb_memory: str = "") -> Result:
    result = Result(name)
    with tempfile.TemporaryDirectory(prefix=f"sort-bench-{name}-", dir=opts.work_dir) as work:
        out, tmp = Path(work) / "out", Path(work) / "tmp"
        tmp.mkdir()
        cmd, outputs, layout = peer_command(name, corpus.paths, corpus.directory, out, tmp,
                                            opts, duckdb_memory)
        env = {**os.environ, "LC_ALL": "C"}
        print(f"  {name}{' ' + duckdb_memory if duckdb_memory else ''} ...", end="",
              flush=True, file=sys.stderr)
        with TreePeaks() as peaks, tempfile.TemporaryFile() as stderr:
            t0 = time.perf_counter()
            try:
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
            except OSError as exc:
                result.error = f"cannot start {cmd[0]}: {exc}"
                print(" failed", file=sys.stderr)
                return result
            # wait4 gives the child's own high-water mark even if it ended between samples.
            _, wait_status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - t0
            returncode = os.waitstatus_to_exitcode(wait_status)
            proc.returncode = returncode
            stderr.seek(0)
            errors = stderr.read()
        result.processes = peaks.top()
        if proc.pid not in peaks.peaks:
            result.processes.insert(0, (_short_name(" ".join(cmd)), usage.ru_maxrss * 1024))
        if returncode != 0:
            tail = errors.decode(errors="replace").strip().splitlines()[-15:]
            result.error = f"`{' '.join(cmd[:4])} ...` exited {returncode}\n" + "\n".join(tail)
            print(" failed", file=sys.stderr)
            return result
        print(f" {seconds:.2f} s", file=sys.stderr)
        result.seconds = seconds
        try:
            check_sorted_copy([], [p for p in outputs if p.exists()], layout, expected)
            result.correct = True
        except ValidationError as exc:
            result.error = str(exc)
    return result


def format_table(results: Sequence[Result], size_bytes: int) -> str:
    kubemr = next((r for r in results if r.peer == "kubemr" and r.seconds), None)
    header = ("peer", "seconds", "MB/s", "kubemr x faster", "peak RSS MiB (largest process)",
              "processes", "valid", "note")
    rows: list[tuple[str, ...]] = []
    for r in results:
        procs = len(r.processes)
        peak = f"{r.peak / 2**20:.0f}" if r.peak else "n/a"
        if r.seconds is None:
            rows.append((r.peer, "-", "-", "-", peak, str(procs), "ERROR", r.note))
            continue
        ratio = f"{r.seconds / kubemr.seconds:.2f}x" if kubemr and kubemr.seconds else "n/a"
        rows.append((r.peer, f"{r.seconds:.2f}", f"{size_bytes / 1e6 / r.seconds:.1f}", ratio,
                     peak, str(procs), "PASS" if r.correct else "FAIL", r.note))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i in (0, 7) else c.rjust(w) for i, (c, w)
                                 in enumerate(zip(cells, widths, strict=True))) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ("-" if i in (0, 7) else ":")
                         for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def parse_size(text: str) -> int:
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    lowered = text.strip().lower()
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if lowered.endswith(unit):
            return int(float(lowered[: -len(unit)]) * factor)
    return int(lowered)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1GiB,4GiB", help="corpus sizes (default 1GiB,4GiB)")
    p.add_argument("--files", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory", default="256MiB", help="per-worker budget (kubemr, GNU sort)")
    p.add_argument("--reducers", type=int, default=8)
    p.add_argument("--skew", type=float, default=0.0,
                   help=f"share of records whose key is one of {HOT_KEYS} hot keys")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--only", default=",".join(PEERS))
    p.add_argument("--duckdb-memory", default=",".join(Options().duckdb_memory),
                   help="memory limits DuckDB is tried at, smallest first")
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--kubemr", default=None, help="kubemr executable")
    # Internal: run one in-process peer (duckdb, polars) as its own child process.
    p.add_argument("--peer-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default="", help=argparse.SUPPRESS)
    p.add_argument("--child-tmp", default="", help=argparse.SUPPRESS)
    p.add_argument("--child-memory", default="", help=argparse.SUPPRESS)
    p.add_argument("files_", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.only) - set(PEERS))
    if unknown:
        p.error(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    return args


def run_child(args: argparse.Namespace) -> int:
    children: dict[str, Callable[[], None]] = {
        "duckdb": lambda: child_duckdb(args.files_, args.child_out, args.child_tmp,
                                       args.workers, args.child_memory),
        "polars": lambda: child_polars(args.files_, args.child_out),
    }
    children[args.peer_child]()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.peer_child:
        return run_child(args)
    t_start = time.perf_counter()
    opts = Options(workers=args.workers, memory=args.memory, reducers=args.reducers,
                   kubemr=args.kubemr or default_kubemr(),
                   duckdb_memory=tuple(s.strip() for s in args.duckdb_memory.split(",")),
                   work_dir=args.data_dir)
    if "kubemr" in args.only:
        opts.kubemr_memory_flag = kubemr_has_memory_flag(opts.kubemr)
    if "gnu-sort" in args.only and shutil.which("sort") is None:
        print("GNU sort not found; skipping it", file=sys.stderr)
        args.only.remove("gnu-sort")
    status = 0
    for size in [parse_size(s) for s in args.sizes.split(",") if s.strip()]:
        t0 = time.perf_counter()
        corpus = ensure_sort_corpus(args.data_dir, size, args.files, args.seed, args.skew)
        state = "generated" if corpus.generated else "cached"
        print(f"corpus: {corpus.directory} ({state} in {time.perf_counter() - t0:.1f} s)")
        t0 = time.perf_counter()
        expected = summarize(corpus.paths)  # also warms the page cache for every peer
        print(f"input summary: {expected.records} records in {time.perf_counter() - t0:.1f} s")
        print("running peers:", file=sys.stderr)
        results = [run_peer(name, corpus, expected, opts) for name in PEERS
                   if name in args.only]
        print()
        print(f"corpus:   {corpus.size_bytes / 2**20:.0f} MiB ({corpus.size_bytes} bytes, "
              f"{corpus.spec.records} records) in {len(corpus.paths)} files, seed "
              f"{corpus.spec.seed}, skew {corpus.spec.skew:g}")
        for ln in machine_info():
            print(ln)
        memory_flag = ("--memory " + opts.memory if opts.kubemr_memory_flag
                       else "no --memory flag in this kubemr: in-memory shuffle")
        print(f"settings: --workers {opts.workers}, kubemr --reducers {opts.reducers}, "
              f"{memory_flag}; GNU sort -S {_gnu_memory(opts.memory)}")
        print()
        print(format_table(results, corpus.size_bytes))
        print()
        print("MB/s = 10^6 input bytes per wall-clock second; 'kubemr x faster' = peer seconds"
              " / kubemr seconds; peak RSS = the largest VmHWM among the peer's processes.")
        for r in results:
            listed = ", ".join(f"{n} {p / 2**20:.0f}" for n, p in r.processes[:6])
            print(f"  {r.peer} processes (peak RSS MiB): {listed or 'n/a'}")
            if r.error:
                status = 1
                print(f"\n{r.peer}: {'ERROR' if r.seconds is None else 'FAIL'}\n{r.error}\n")
    print(f"\ntotal benchmark time: {time.perf_counter() - t_start:.1f} s")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
