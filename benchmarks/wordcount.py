"""Word-count benchmark: `kubemr run` against local peers on the same corpus.

Usage::

    python benchmarks/wordcount.py [--size-mib 256] [--files 16] [--workers 2]
                                   [--repeat 1] [--only kubemr,counter,mp-pool,dask-bag]
                                   [--formats text,jsonl,parquet] [--no-speculative-row]

Every peer counts the same cached corpus (see ``corpus.py``) and must produce exactly the
``collections.Counter`` reference: a word is a maximal run of non-whitespace bytes, i.e.
``bytes.split()``, case-sensitive, raw bytes. Timings are wall-clock, best of --repeat;
the ratio column is kubemr's speed over the peer's, because ratios survive the drift of
shared machines better than absolute times.
``--formats`` also runs kubemr with ``--format jsonl``/``parquet`` (rows ``kubemr-jsonl``,
``kubemr-parquet``); their results are read back with ``kubemr_async.read_results`` and
checked against the same reference, so the table shows what each format costs.
``--no-speculative-row`` also runs kubemr with ``--no-speculative`` (row
``kubemr-nospec``), round-robin with the others, and prints both kubemr rows' ratio
against the ``multiprocessing.Pool`` peer: what backup tasks cost a fault-free job.
Exit status is non-zero if any peer failed or disagreed with the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

try:  # imported as part of the repo (tests, `python -m benchmarks.wordcount`)
    from benchmarks.corpus import DEFAULT_SEED, Corpus, default_data_dir, ensure_corpus
except ModuleNotFoundError:  # run as a script: make the sibling module importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from corpus import (  # type: ignore[import-not-found,no-redef]
        DEFAULT_SEED,
        Corpus,
        default_data_dir,
        ensure_corpus,
    )

REPO_ROOT = Path(__file__).resolve().parents[1]
PEERS = ("counter", "mp-pool", "dask-bag", "kubemr")
FORMATS = ("text", "jsonl", "parquet")
#: The row of kubemr with backup tasks off (--no-speculative-row).
NO_SPEC = "kubemr-nospec"

WordCounts = dict[bytes, int]


class PeerError(RuntimeError):
    """A peer could not produce a result; the message is shown in the report."""


# --------------------------------------------------------------------------------------
# Peers. Each takes the corpus file paths and returns {word: count}. All of them read the
# files inside the timed region: reading is part of the job for every contender.
# --------------------------------------------------------------------------------------


def count_file(path: str) -> Counter[bytes]:
    with open(path, "rb") as f:
        return Counter(f.read().split())


def read_split(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        return f.read().split()


def peer_counter(paths: Sequence[str], workers: int) -> WordCounts:
    del workers  # the single-process baseline, by definition
    c: Counter[bytes] = Counter()
    for p in paths:
        with open(p, "rb") as f:
            c.update(f.read().split())
    return dict(c)


def peer_mp_pool(paths: Sequence[str], workers: int) -> WordCounts:
    # What one would hand-write: a Pool mapping a per-file Counter, merged in the parent.
    # Pool start-up is inside the timed region because the user pays it too.
    total: Counter[bytes] = Counter()
    with multiprocessing.Pool(workers) as pool:
        for partial in pool.imap_unordered(count_file, paths):
            total.update(partial)
    return dict(total)


def peer_dask_bag(paths: Sequence[str], workers: int) -> WordCounts:
    # The textbook dask word count is
    #     db.read_text(paths).str.split().flatten().frequencies()
    # but read_text decodes (UTF-8, strict by default), which fails on the corpus's
    # non-UTF-8 bytes, and str.split() splits on more than bytes.split() (\x1c-\x1f,
    # \x85, \xa0 after a latin-1 decode). So the bag is built from the paths and each
    # partition reads and splits raw bytes; flatten().frequencies() is then the idiomatic
    # dask reduction (per-partition dicts, tree-merged). One partition per file, the
    # process scheduler (the threaded one would serialise on the GIL) with dask's default
    # "spawn" context, as a dask user would get it.
    import dask.bag as db

    bag = db.from_sequence(list(paths), npartitions=len(paths))  # type: ignore[no-untyped-call]
    freqs = bag.map(read_split).flatten().frequencies()
    pairs = freqs.compute(scheduler="processes", num_workers=workers)
    return dict(pairs)


def children_by_parent() -> dict[int, list[int]]:
    """Every process's children, from /proc (Linux): {parent pid: [child pids]}."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces; the fields after its ')' are fixed.
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


class PeakRSS:
    """Peak resident memory of this process and all its descendants while a peer runs.

    A thread samples ``/proc`` every 20 ms and sums the resident set of the whole process
    tree (kubemr's parent and worker processes, a Pool's children, dask's workers); the
    figure reported is the peak above the tree's size just before the peer started, so the
    benchmark's own memory (the reference counts) is not charged to the peer. Linux only:
    elsewhere it reports nothing.
    """

    _PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @classmethod
    def _tree_bytes(cls) -> int:
        children = children_by_parent()
        total, stack = 0, [os.getpid()]
        while stack:
            pid = stack.pop()
            stack += children.get(pid, [])
            try:
                with open(f"/proc/{pid}/statm", "rb") as f:
                    total += int(f.read().split()[1]) * cls._PAGE
            except OSError:
                continue
        return total

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._tree_bytes() - self._base)

    def __enter__(self) -> PeakRSS:
        self._available = os.path.isdir("/proc")
        if self._available:
            self._base = self._tree_bytes()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._available:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._tree_bytes() - self._base)


@dataclass
class KubemrOptions:
    executable: str
    workers: int
    reducers: int | None = None
    chunk_size: str | None = None
    extra_args: list[str] = field(default_factory=list)
    work_dir: Path | None = None  # where the temporary output directory is created
    keep_output: bool = False
    output_format: str = "text"


def kubemr_command(opts: KubemrOptions, input_dir: Path, output_dir: Path) -> list[str]:
    cmd = [
        opts.executable,
        "run",
        str(REPO_ROOT / "examples" / "wordcount.py"),
        "--input",
        str(input_dir),
        "--workers",
        str(opts.workers),
        "--output",
        str(output_dir),
        "--overwrite",
    ]
    if opts.reducers is not None:
        cmd += ["--reducers", str(opts.reducers)]
    if opts.chunk_size is not None:
        cmd += ["--chunk-size", opts.chunk_size]
    if opts.output_format != "text":
        cmd += ["--format", opts.output_format]
    return cmd + opts.extra_args


def parse_kubemr_output(output_dir: Path) -> WordCounts:
    """Read ``part-NNNNN`` files (``word<TAB>count\\n``, word raw bytes) into one dict."""
    if not (output_dir / "_SUCCESS").is_file():
        raise PeerError(f"no _SUCCESS in {output_dir}")
    parts = sorted(output_dir.glob("part-*"))
    if not parts:
        raise PeerError(f"no part-* files in {output_dir}")
    counts: WordCounts = {}
    for part in parts:
        data = part.read_bytes()
        if data and not data.endswith(b"\n"):
            raise PeerError(f"{part.name}: last line not newline-terminated")
        for lineno, line in enumerate(data.splitlines(), 1):
            # Words never contain \t or \n (both are whitespace), so the last tab splits.
            word, tab, num = line.rpartition(b"\t")
            if not tab or not word:
                raise PeerError(f"{part.name}:{lineno}: malformed line {line[:80]!r}")
            if word in counts:
                # A word in two parts (or twice in one) means partitioning is broken.
                raise PeerError(f"{part.name}:{lineno}: duplicate word {word[:40]!r}")
            counts[word] = int(num)
    return counts


def read_kubemr_results(output_dir: Path) -> WordCounts:
    """Any format, through the public reader: jsonl words come back as surrogateescape str."""
    from kubemr_async import read_results

    counts: WordCounts = {}
    try:
        for word, count in read_results(output_dir):
            raw = word if isinstance(word, bytes) else word.encode("utf-8", "surrogateescape")
            if raw in counts:
                raise PeerError(f"duplicate word {raw[:40]!r}")
            counts[raw] = int(count)
    except Exception as exc:  # any failure to read is this peer's failure
        if isinstance(exc, PeerError):
            raise
        raise PeerError(f"cannot read results in {output_dir}: {exc}") from exc
    return counts


def run_kubemr(opts: KubemrOptions, input_dir: Path) -> tuple[float, WordCounts]:
    """Run the CLI end to end; the time is process start to exit, what a user waits for."""
    with tempfile.TemporaryDirectory(prefix="kubemr-bench-out-", dir=opts.work_dir) as tmp:
        output_dir = Path(tmp) / "out"
        cmd = kubemr_command(opts, input_dir, output_dir)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, check=False)
        except OSError as exc:
            raise PeerError(f"cannot start {cmd[0]}: {exc}") from exc
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise PeerError(
                f"`{' '.join(cmd)}` exited {proc.returncode}\n"
                f"--- stderr (tail) ---\n{_tail(proc.stderr)}"
                f"--- stdout (tail) ---\n{_tail(proc.stdout)}"
            )
        backups = re.search(rb"backup tasks: \d+ launched, \d+ won", proc.stderr)
        if backups is not None:  # a fault-free run should launch none, or few
            print(f" ({backups[0].decode()})", end="", file=sys.stderr)
        if opts.output_format == "text":
            counts = parse_kubemr_output(output_dir)
        else:
            counts = read_kubemr_results(output_dir)
        if opts.keep_output:
            kept = Path(tempfile.mkdtemp(prefix="kubemr-bench-kept-", dir=opts.work_dir))
            shutil.copytree(output_dir, kept / "out")
            print(f"kubemr output kept in {kept / 'out'}", file=sys.stderr)
        return seconds, counts


def _tail(data: bytes, lines: int = 30) -> str:
    text = data.decode("utf-8", errors="replace").rstrip("\n")
    return "\n".join(text.splitlines()[-lines:]) + "\n" if text else "(empty)\n"


# --------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------


@dataclass
class Result:
    peer: str
    seconds: float | None = None  # best of the successful repeats
    correct: bool = True
    error: str | None = None
    runs: list[float] = field(default_factory=list)
    peak_rss: int | None = None  # bytes, the largest of the runs (see PeakRSS)


def diff_summary(ref: WordCounts, got: WordCounts, examples: int = 5) -> str:
    missing = [w for w in ref if w not in got]
    extra = [w for w in got if w not in ref]
    wrong = [w for w in ref if w in got and got[w] != ref[w]]
    lines = [
        f"{len(missing)} words missing, {len(extra)} extra, {len(wrong)} with wrong counts "
        f"(reference {len(ref)} words / {sum(ref.values())} tokens, "
        f"got {len(got)} / {sum(got.values())})"
    ]
    lines += [f"  missing {w!r} (ref {ref[w]})" for w in missing[:examples]]
    lines += [f"  extra   {w!r} (got {got[w]})" for w in extra[:examples]]
    lines += [f"  wrong   {w!r}: ref {ref[w]}, got {got[w]}" for w in wrong[:examples]]
    return "\n".join(lines)


def warm_page_cache(paths: Sequence[Path]) -> None:
    # Read everything once, untimed, so no peer pays (or is spared) cold-cache I/O just
    # because of the order it runs in. 24 GB of RAM holds the corpus comfortably.
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def timed(fn: Callable[[], WordCounts]) -> tuple[float, WordCounts]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run_once(
    name: str, corpus: Corpus, workers: int, kubemr: KubemrOptions
) -> tuple[float, WordCounts]:
    paths = [str(p) for p in corpus.paths]
    if name == "kubemr":
        return run_kubemr(kubemr, corpus.directory)
    if name == NO_SPEC:
        return run_kubemr(replace(kubemr, extra_args=[*kubemr.extra_args, "--no-speculative"]),
                          corpus.directory)
    if name.startswith("kubemr-"):
        return run_kubemr(replace(kubemr, output_format=name.removeprefix("kubemr-")),
                          corpus.directory)
    if name == "counter":
        return timed(lambda: peer_counter(paths, workers))
    if name == "mp-pool":
        return timed(lambda: peer_mp_pool(paths, workers))
    if name == "dask-bag":
        return timed(lambda: peer_dask_bag(paths, workers))
    raise PeerError(f"unknown peer {name!r}")


def record_run(
    result: Result,
    label: str,
    run: Callable[[], tuple[float, WordCounts]],
    reference: WordCounts | None,
) -> WordCounts | None:
    """Run once, append the time to `result`, check against `reference` if given."""
    print(f"  {result.peer} {label} ...", end="", flush=True, file=sys.stderr)
    try:
        with PeakRSS() as memory:
            seconds, counts = run()
    except Exception as exc:  # any failure is reported in the table, not a crash
        print(" failed", file=sys.stderr)
        result.error = str(exc) if isinstance(exc, PeerError) else f"{type(exc).__name__}: {exc}"
        result.correct = False
        result.seconds = None
        return None
    print(f" {seconds:.2f} s", file=sys.stderr)
    result.runs.append(seconds)
    result.seconds = min(result.runs)
    if memory.peak:
        result.peak_rss = max(result.peak_rss or 0, memory.peak)
    if reference is not None and counts != reference:
        result.correct = False
        result.error = diff_summary(reference, counts)
    return counts


def machine_info() -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            models = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if models:
            cpu = models[0]
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    mem = ""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem = f", {pages / 2**30:.1f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        pass
    load = ""
    with contextlib.suppress(OSError):
        # Other work on a 2-core machine skews the parallel peers most; show it.
        load = ", load avg {:.1f} {:.1f} {:.1f} at start".format(*os.getloadavg())
    return [
        f"machine: nproc={usable} ({cpu}){mem}{load}",
        f"python:  {platform.python_implementation()} {platform.python_version()} "
        f"on {platform.system()} {platform.release()}",
    ]


def format_table(results: Sequence[Result], size_bytes: int) -> str:
    kubemr = next((r for r in results if r.peer == "kubemr" and r.seconds), None)
    header = ("peer", "seconds", "MB/s", "kubemr x faster", "peak RSS MiB", "correct")
    rows: list[tuple[str, ...]] = []
    for r in results:
        if r.seconds is None:
            rows.append((r.peer, "-", "-", "-", "-", "ERROR"))
            continue
        ratio = f"{r.seconds / kubemr.seconds:.2f}x" if kubemr and kubemr.seconds else "n/a"
        rows.append(
            (
                r.peer,
                f"{r.seconds:.2f}",
                f"{size_bytes / 1e6 / r.seconds:.1f}",
                ratio,
                f"{r.peak_rss / 2**20:.0f}" if r.peak_rss else "n/a",
                "PASS" if r.correct else "FAIL",
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    sep = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Word-count benchmark: kubemr run vs Counter, multiprocessing, dask.bag."
    )
    p.add_argument("--size-mib", type=float, default=256, help="corpus size (default 256)")
    p.add_argument("--files", type=int, default=16, help="number of input files (default 16)")
    p.add_argument("--workers", type=int, default=2, help="parallelism for every peer")
    p.add_argument("--repeat", type=int, default=1, help="runs per peer; best is reported")
    p.add_argument(
        "--only",
        default=",".join(PEERS),
        help=f"comma-separated subset of {','.join(PEERS)} (counter always runs as the "
        "reference; it is only listed if selected)",
    )
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="corpus cache (default $KUBEMR_BENCH_DATA or ~/.cache/kubemr-async/bench)",
    )
    p.add_argument("--kubemr", default=None, help="kubemr executable (default: next to python)")
    p.add_argument("--reducers", type=int, default=None, help="pass --reducers to kubemr run")
    p.add_argument("--chunk-size", default=None, help="pass --chunk-size to kubemr run")
    p.add_argument(
        "--kubemr-arg",
        action="append",
        default=[],
        help="extra argument for kubemr run (repeatable)",
    )
    p.add_argument("--keep-output", action="store_true", help="keep kubemr's output directory")
    p.add_argument(
        "--formats",
        default="text",
        help=f"comma-separated kubemr output formats to run, of {','.join(FORMATS)}; formats "
        "other than text add rows kubemr-FORMAT (default text)",
    )
    p.add_argument("--no-speculative-row", action="store_true",
                   help=f"also run kubemr with backup tasks off (row {NO_SPEC})")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(PEERS))
    if unknown:
        p.error(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    if args.repeat < 1 or args.workers < 1:
        p.error("--repeat and --workers must be >= 1")
    args.only = only
    formats = [s.strip() for s in args.formats.split(",") if s.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        p.error(f"--formats: unknown {', '.join(unknown) or '(none)'}; "
                f"choose from {', '.join(FORMATS)}")
    args.formats = formats
    return args


def default_kubemr() -> str:
    # Prefer the kubemr installed next to the running interpreter (the project venv).
    beside = Path(sys.executable).parent / "kubemr"
    if beside.exists():
        return str(beside)
    return shutil.which("kubemr") or str(beside)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    machine = machine_info()
    size_bytes = int(args.size_mib * 2**20)

    t0 = time.perf_counter()
    corpus = ensure_corpus(args.data_dir, size_bytes, args.files, args.seed)
    state = "generated" if corpus.generated else "cached"
    print(f"corpus: {corpus.directory} ({state} in {time.perf_counter() - t0:.1f} s)")
    warm_page_cache(corpus.paths)

    kubemr = KubemrOptions(
        executable=args.kubemr or default_kubemr(),
        workers=args.workers,
        reducers=args.reducers,
        chunk_size=args.chunk_size,
        extra_args=list(args.kubemr_arg),
        work_dir=args.data_dir,
        keep_output=args.keep_output,
    )
    if "kubemr" in args.only:
        print("kubemr: " + " ".join(kubemr_command(kubemr, corpus.directory, Path("<tmp>"))))

    # The Counter result is the reference, so it runs first; it is only reported when
    # selected. Repeats go round-robin over the peers rather than peer by peer, so load
    # drifting on a shared machine hits every peer alike and the ratios stay fair.
    print("running peers:", file=sys.stderr)
    results = {name: Result(name) for name in PEERS if name in args.only}
    if "kubemr" in args.only:
        if "text" not in args.formats:
            del results["kubemr"]
        results.update({f"kubemr-{f}": Result(f"kubemr-{f}") for f in args.formats
                        if f != "text"})
        if args.no_speculative_row:
            results[NO_SPEC] = Result(NO_SPEC)
    ref_result = results.get("counter", Result("counter"))
    reference = record_run(
        ref_result,
        f"round 1/{args.repeat} (reference)",
        partial(run_once, "counter", corpus, args.workers, kubemr),
        None,
    )
    if reference is None:
        print(f"reference (counter) failed: {ref_result.error}", file=sys.stderr)
        return 2
    for rnd in range(args.repeat):
        for name, res in results.items():
            if (rnd == 0 and name == "counter") or (res.error and res.seconds is None):
                continue  # already ran as the reference / failed to run: do not retry
            record_run(
                res,
                f"round {rnd + 1}/{args.repeat}",
                partial(run_once, name, corpus, args.workers, kubemr),
                reference,
            )

    tokens = sum(reference.values())
    print()
    print(
        f"corpus:  {corpus.size_bytes / 2**20:.0f} MiB ({corpus.size_bytes} bytes) in "
        f"{len(corpus.paths)} files, seed {corpus.spec.seed}; {tokens} words, "
        f"{len(reference)} distinct"
    )
    for ln in machine:
        print(ln)
    print(f"settings: --workers {args.workers}, best of {args.repeat}")
    print()
    print(format_table(list(results.values()), corpus.size_bytes))
    print()
    print(
        "MB/s = 10^6 bytes of input per wall-clock second; 'kubemr x faster' = peer seconds "
        "/ kubemr seconds (>1: kubemr is faster); peak RSS = the peer's whole process tree, "
        "sampled every 20 ms, above the benchmark's own."
    )
    pool = results.get("mp-pool")
    if pool is not None and pool.seconds:
        ratios = [f"{name} {pool.seconds / r.seconds:.2f}x" for name in ("kubemr", NO_SPEC)
                  if (r := results.get(name)) is not None and r.seconds]
        print("against mp-pool (mp-pool seconds / kubemr seconds): " + ", ".join(ratios))
    failed = [r for r in results.values() if not r.correct]
    for r in failed:
        print(f"\n{r.peer}: {'ERROR' if r.seconds is None else 'FAIL'}\n{r.error}")
    print(f"\ntotal benchmark time: {time.perf_counter() - t_start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
