"""Streaming (shell-command) word count against the Python word count and a bare pipeline.

Usage::

    python benchmarks/streaming.py [--size-mib 256] [--files 16] [--workers 2] [--repeat 1]

On the word-count corpus of ``corpus.py`` (raw bytes, every ASCII whitespace kind), in one
run, each checked against the ``collections.Counter`` reference of ``wordcount.py``:

* ``kubemr-streaming``: ``kubemr run --mapper M --combiner R --reducer R`` with the
  commands below (Hadoop Streaming: text lines through pipes, parsed in batches);
* ``kubemr-python``: ``kubemr run examples/wordcount.py`` (vectorized map, built-in sum);
* ``pipeline``: ``cat FILES | M | LC_ALL=C sort | R``, the same commands with no
  framework: one process per step, one machine, one sort.

The mapper splits on exactly ``bytes.split()``'s whitespace (``[:space:]`` in the C
locale) and emits ``word<TAB>1``; the reducer sums the counts of each run of equal words.
Timings are wall-clock, best of --repeat; CPU is the user and system seconds of the
peer's whole process tree in that run (on a shared machine the wall clock depends on the
load, the CPU much less); peak RSS is the whole process tree's; ratios are the peer's time
over kubemr-streaming's. Exit status is non-zero if any disagreed.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

try:  # imported as part of the repo (tests, `python -m benchmarks.streaming`)
    from benchmarks import corpus, wordcount
except ModuleNotFoundError:  # run as a script: make the sibling modules importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import corpus  # type: ignore[no-redef]
    import wordcount  # type: ignore[no-redef]

PeerError = wordcount.PeerError
WordCounts = wordcount.WordCounts
REPO_ROOT = Path(__file__).resolve().parents[1]
MAPPER = "LC_ALL=C tr -s '[:space:]' '\\n' | LC_ALL=C awk 'NF { print $0 \"\\t1\" }'"
#: ``$1 ""`` compares words as strings: awk compares two numeric-looking fields as numbers.
REDUCER = ("LC_ALL=C awk -F'\\t' '($1 \"\") != k { if (NR > 1) print k \"\\t\" n; "
           "k = $1; n = 0 } { n += $2 } END { if (NR) print k \"\\t\" n }'")
PEERS = ("kubemr-streaming", "kubemr-python", "pipeline")


def kubemr_command(peer: str, executable: str, inputs: Path, output: Path,
                   workers: int) -> list[str]:
    common = ["--input", str(inputs), "--output", str(output), "--workers", str(workers),
              "--overwrite", "--no-progress"]
    if peer == "kubemr-python":
        return [executable, "run", str(REPO_ROOT / "examples" / "wordcount.py"), *common]
    return [executable, "run", "--mapper", MAPPER, "--combiner", REDUCER,
            "--reducer", REDUCER, *common]


def run_kubemr(peer: str, executable: str, inputs: Path, workers: int,
               work_dir: Path) -> WordCounts:
    with tempfile.TemporaryDirectory(prefix="kubemr-bench-out-", dir=work_dir) as tmp:
        output = Path(tmp) / "out"
        cmd = kubemr_command(peer, executable, inputs, output, workers)
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, check=False)
        if proc.returncode != 0:
            tail = proc.stderr.decode(errors="replace").strip().splitlines()[-10:]
            raise PeerError(f"{peer} exited {proc.returncode}: " + "\n".join(tail))
        return wordcount.parse_kubemr_output(output)


def run_pipeline(paths: Sequence[Path]) -> WordCounts:
    """``cat FILES | mapper | LC_ALL=C sort | reducer``; its output parsed like a part."""
    files = " ".join(f"'{path}'" for path in paths)
    script = f"set -o pipefail 2>/dev/null; cat {files} | {MAPPER} | LC_ALL=C sort | {REDUCER}"
    proc = subprocess.run(["bash", "-c", script], capture_output=True, check=False)
    if proc.returncode != 0:
        raise PeerError(f"pipeline exited {proc.returncode}: {proc.stderr[-500:]!r}")
    counts: WordCounts = {}
    for line in proc.stdout.splitlines():
        word, _, number = line.rpartition(b"\t")
        if word in counts:
            raise PeerError(f"duplicate word {word[:40]!r}")
        counts[word] = int(number)
    return counts


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(run: Callable[[], WordCounts]) -> tuple[float, float, int, WordCounts]:
    """Wall seconds, CPU seconds of the peer's (waited-for) process tree, peak RSS, counts."""
    cpu = _children_cpu()
    with wordcount.PeakRSS() as memory:
        started = time.perf_counter()
        counts = run()
        seconds = time.perf_counter() - started
    return seconds, _children_cpu() - cpu, memory.peak, counts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=float, default=256, help="corpus size (default 256)")
    p.add_argument("--files", type=int, default=16, help="number of input files (default 16)")
    p.add_argument("--workers", type=int, default=2, help="kubemr worker processes")
    p.add_argument("--repeat", type=int, default=1, help="runs per peer; best is reported")
    p.add_argument("--seed", type=int, default=corpus.DEFAULT_SEED)
    p.add_argument("--data-dir", type=Path, default=corpus.default_data_dir(),
                   help="where the corpus is cached")
    p.add_argument("--kubemr", default=None, help="kubemr executable (default: next to python)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data = corpus.ensure_corpus(args.data_dir, int(args.size_mib * 2**20), args.files,
                                args.seed)
    wordcount.warm_page_cache(data.paths)
    executable = args.kubemr or wordcount.default_kubemr()
    reference = wordcount.peer_counter([str(p) for p in data.paths], 1)
    runners: dict[str, Callable[[], WordCounts]] = {
        "kubemr-streaming": lambda: run_kubemr("kubemr-streaming", executable,
                                               data.directory, args.workers, args.data_dir),
        "kubemr-python": lambda: run_kubemr("kubemr-python", executable, data.directory,
                                            args.workers, args.data_dir),
        "pipeline": lambda: run_pipeline(data.paths),
    }
    best: dict[str, tuple[float, float, int]] = {}  # seconds, CPU seconds, peak RSS
    errors: dict[str, str] = {}
    for round_ in range(args.repeat):  # round-robin, so drifting load hits every peer alike
        for peer, run in runners.items():
            if peer in errors:
                continue
            print(f"  {peer} round {round_ + 1}/{args.repeat} ...", end="", flush=True,
                  file=sys.stderr)
            try:
                seconds, cpu, peak, counts = measure(run)
            except PeerError as exc:
                print(" failed", file=sys.stderr)
                errors[peer] = str(exc)
                continue
            print(f" {seconds:.2f} s", file=sys.stderr)
            if counts != reference:
                errors[peer] = wordcount.diff_summary(reference, counts)
            old = best.get(peer)
            fastest = old if old and old[0] <= seconds else (seconds, cpu, peak)
            best[peer] = (*fastest[:2], max(peak, old[2]) if old else peak)
    print(f"corpus:  {data.size_bytes / 2**20:.0f} MiB in {len(data.paths)} files, seed "
          f"{data.spec.seed}; {sum(reference.values())} words, {len(reference)} distinct")
    for line in wordcount.machine_info():
        print(line)
    print(f"settings: --workers {args.workers}, best of {args.repeat}")
    print(f"mapper:  {MAPPER}\nreducer: {REDUCER} (also the combiner)\n")
    base = best.get("kubemr-streaming", (0.0, 0.0, 0))
    print(f"{'peer':<18}{'seconds':>9}{'MB/s':>8}{'CPU s':>8}{'peak RSS MiB':>14}"
          f"{'x streaming':>13}{'CPU x':>7}  correct")
    for peer in PEERS:
        if peer not in best:
            print(f"{peer:<18}{'-':>9}{'-':>8}{'-':>8}{'-':>14}{'-':>13}{'-':>7}  ERROR")
            continue
        seconds, cpu, peak = best[peer]
        ratio = f"{seconds / base[0]:.2f}x" if base[0] else "n/a"
        cpu_ratio = f"{cpu / base[1]:.2f}x" if base[1] else "n/a"
        print(f"{peer:<18}{seconds:>9.2f}{data.size_bytes / 1e6 / seconds:>8.1f}{cpu:>8.1f}"
              f"{peak / 2**20:>14.0f}{ratio:>13}{cpu_ratio:>7}  "
              f"{'no' if peer in errors else 'yes'}")
    print("\nx streaming = peer seconds / kubemr-streaming seconds (<1: the peer is faster); "
          "CPU x likewise for CPU seconds")
    for peer, error in errors.items():
        print(f"\n{peer}: FAIL\n{error}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
