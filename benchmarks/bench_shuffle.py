"""Micro-benchmark of the vectorized shuffle against plain-Python peers, in one run.

Usage::

    python benchmarks/bench_shuffle.py [--pairs 5000000] [--partitions 8] [--repeat 3]

Three parts, each timing kubemr's shuffle and a plain-Python peer on the same data:

1. A word-count map and reduce task on one 16 MiB file of the word-count corpus (the
   same bytes as file 0 of the headline benchmark), stage by stage, against
   ``Counter(data.split())`` and a ``Counter``-merging reduce.
2. Five million Zipf-distributed (word, int) pairs through combine, partition and
   encode, in pairs per second, against a dict-based shuffle.
3. The codec inside the run format: encode + decode time and size for none/lz4/zstd,
   and the storage throughput below which the smaller codec wins end to end.

Ratios matter more than absolute times on shared machines: other load slows both sides.
Nothing is asserted; ``tests/test_shuffle.py`` checks correctness.
"""

from __future__ import annotations

import argparse
import itertools
import pickle
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa

from kubemr_async import formats, shuffle

try:  # imported as part of the repo
    from benchmarks.corpus import default_data_dir, ensure_corpus
except ModuleNotFoundError:  # run as a script: make the sibling module importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from corpus import default_data_dir, ensure_corpus  # type: ignore[import-not-found,no-redef]

T = TypeVar("T")
CHUNK_BYTES = 16 << 20
VOCABULARY = 200_000
# Reduce tasks read one run from each of this many maps (the headline job's map count).
MAPS_PER_REDUCE = 16


def best_of(repeat: int, fn: Callable[[], T]) -> tuple[float, T]:
    """Fastest of ``repeat`` calls (seconds) and the last result."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for row in [header, ["-" * w for w in widths], *rows]:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        print("  " + "  ".join(cells))


# --------------------------------------------------------------------------- 1. word-count task


def map_task(data: bytes, partitions: int, repeat: int) -> tuple[dict[str, float], list[bytes]]:
    """Time each stage of a word-count map; each stage is timed on the previous one's output."""
    seconds: dict[str, float] = {}
    seconds["split_words"], words = best_of(repeat, lambda: shuffle.split_words(data))
    seconds["pairs_to_table(words, 1)"], table = best_of(
        repeat, lambda: shuffle.pairs_to_table(words, 1)
    )
    seconds['combine("sum")'], combined = best_of(repeat, lambda: shuffle.combine(table, "sum"))
    seconds["partition"], parts = best_of(repeat, lambda: shuffle.partition(combined, partitions))
    seconds["encode_run x partitions"], runs = best_of(
        repeat, lambda: [shuffle.encode_run(part) for part in parts]
    )
    return seconds, runs


def reduce_task(runs: list[bytes], repeat: int) -> dict[str, float]:
    seconds: dict[str, float] = {}
    seconds["decode_run x maps"], tables = best_of(
        repeat, lambda: [shuffle.decode_run(r) for r in runs]
    )
    seconds['merge_runs(..., "sum")'], merged = best_of(
        repeat, lambda: shuffle.merge_runs(tables, "sum")
    )
    for fmt in ("text", "jsonl", "parquet"):
        seconds[f'formats.encode(..., "{fmt}")'], _ = best_of(
            repeat, partial(formats.encode, merged, fmt)
        )
    return seconds


def counter_reduce(counters: list[Counter[bytes]]) -> bytes:
    total: Counter[bytes] = Counter()
    for counter in counters:
        total.update(counter)
    return b"".join(b"%s\t%d\n" % item for item in sorted(total.items()))


def wordcount_task(partitions: int, repeat: int) -> None:
    corpus = ensure_corpus(default_data_dir(), CHUNK_BYTES, 1)
    data = corpus.paths[0].read_bytes()
    counter_s, counts = best_of(repeat, lambda: Counter(data.split()))
    seconds, runs = map_task(data, partitions, repeat)
    total = sum(seconds.values())
    rows = [[stage, f"{s * 1000:.1f}", f"{s / total:.0%}"] for stage, s in seconds.items()]
    rows.append(["map task total", f"{total * 1000:.1f}", "100%"])
    rows.append(
        ["Counter(data.split()) (peer)", f"{counter_s * 1000:.1f}", f"{counter_s / total:.2f}x"]
    )
    print_table(
        f"1. word-count map task, one 16 MiB corpus file ({len(counts):,} distinct words, "
        f"{partitions} partitions); last column: share, or peer time / kubemr time",
        ["stage", "ms", ""],
        rows,
    )

    # The reduce for partition 0 reads one run per map; the maps' files share a Zipf
    # vocabulary, so this map's run stands in for each of theirs.
    reduce_runs = [runs[0]] * MAPS_PER_REDUCE
    reduce_seconds = reduce_task(reduce_runs, repeat)
    reduce_total = sum(reduce_seconds.values())
    in_partition = [
        Counter({w: c for w, c in counts.items() if shuffle.partition_for(w, partitions) == 0})
    ] * MAPS_PER_REDUCE
    peer_s, _ = best_of(repeat, lambda: counter_reduce(in_partition))
    rows = [[stage, f"{s * 1000:.1f}"] for stage, s in reduce_seconds.items()]
    rows.append(["reduce task total", f"{reduce_total * 1000:.1f}"])
    rows.append(["Counter merge + sorted + join (peer)", f"{peer_s * 1000:.1f}"])
    rows.append(["peer time / kubemr time", f"{peer_s / reduce_total:.2f}x"])
    print_table(f"   reduce task: {MAPS_PER_REDUCE} runs of partition 0", ["stage", "ms"], rows)


# --------------------------------------------------------------------------- 2. pairs


def zipf_pairs(n: int, seed: int = 1) -> tuple[list[bytes], pa.Array, list[int], pa.Array]:
    """``n`` (word, count) pairs: words Zipf-distributed over a 200k vocabulary."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 12, VOCABULARY)
    letters = rng.integers(ord("a"), ord("z") + 1, int(lengths.sum()), dtype=np.uint8).tobytes()
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    # Index-suffixed so that all 200k words are distinct.
    vocabulary = [letters[a:b] + b"%d" % i for i, (a, b) in enumerate(itertools.pairwise(bounds))]
    weights = 1.0 / np.arange(1, VOCABULARY + 1)
    ranks = np.searchsorted(np.cumsum(weights / weights.sum()), rng.random(n), side="right")
    keys = [vocabulary[r] for r in np.minimum(ranks, VOCABULARY - 1).tolist()]
    values = rng.integers(1, 10, n)
    return keys, pa.array(keys, pa.binary()), values.tolist(), pa.array(values)


def py_combine(keys: list[bytes], values: list[int]) -> dict[bytes, int]:
    totals: dict[bytes, int] = {}
    get = totals.get
    for key, value in zip(keys, values, strict=True):
        totals[key] = get(key, 0) + value
    return totals


def py_partition(
    pairs: Sequence[tuple[bytes, int]], partitions: int
) -> list[list[tuple[bytes, int]]]:
    parts: list[list[tuple[bytes, int]]] = [[] for _ in range(partitions)]
    for pair in pairs:
        parts[hash(pair[0]) % partitions].append(pair)
    for part in parts:
        part.sort(key=lambda pair: pair[0])
    return parts


def py_shuffle(keys: list[bytes], values: list[int], partitions: int) -> list[bytes]:
    parts = py_partition(list(py_combine(keys, values).items()), partitions)
    return [pickle.dumps(part, protocol=pickle.HIGHEST_PROTOCOL) for part in parts]


def kubemr_shuffle(table: pa.Table, partitions: int) -> list[bytes]:
    parts = shuffle.partition(shuffle.combine(table, "sum"), partitions)
    return [shuffle.encode_run(part) for part in parts]


def pairs_benchmark(n: int, partitions: int, repeat: int) -> None:
    keys, key_array, values, value_array = zipf_pairs(n)
    table = shuffle.pairs_to_table(key_array, value_array)
    pairs = list(zip(keys, values, strict=True))
    cases: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
        (
            "combine (group + sum)",
            lambda: shuffle.combine(table, "sum"),
            lambda: py_combine(keys, values),
        ),
        (
            "partition + sort, no combine",
            lambda: shuffle.partition(table, partitions),
            lambda: py_partition(pairs, partitions),
        ),
        (
            "combine + partition + encode",
            lambda: kubemr_shuffle(table, partitions),
            lambda: py_shuffle(keys, values, partitions),
        ),
    ]
    rows = []
    for name, ours, peer in cases:
        ours_s, _ = best_of(repeat, ours)
        # The Python peers take seconds each; one run is plenty against their variance.
        peer_s, _ = best_of(1, peer)
        rows.append(
            [name, f"{n / ours_s / 1e6:.1f}", f"{n / peer_s / 1e6:.2f}", f"{peer_s / ours_s:.1f}x"]
        )
    print_table(
        f"2. {n:,} Zipf (word, int) pairs, {len(set(keys)):,} distinct words, "
        f"{partitions} partitions",
        ["stage", "kubemr Mpairs/s", "dict Mpairs/s", "kubemr x faster"],
        rows,
    )


# --------------------------------------------------------------------------- 3. codec


def encode_all(parts: list[pa.Table], codec: shuffle.RunCompression) -> list[bytes]:
    return [shuffle.encode_run(part, compression=codec) for part in parts]


def decode_all(runs: list[bytes]) -> list[pa.Table]:
    return [shuffle.decode_run(run) for run in runs]


def codec_benchmark(partitions: int, repeat: int) -> None:
    data = ensure_corpus(default_data_dir(), CHUNK_BYTES, 1).paths[0].read_bytes()
    combined = shuffle.combine(shuffle.pairs_to_table(shuffle.split_words(data), 1), "sum")
    parts = shuffle.partition(combined, partitions)
    codecs: tuple[shuffle.RunCompression, ...] = (None, "lz4", "zstd")
    measured = []
    for codec in codecs:
        encode_s, runs = best_of(repeat, partial(encode_all, parts, codec))
        decode_s, _ = best_of(repeat, partial(decode_all, runs))
        measured.append((codec or "none", encode_s + decode_s, sum(map(len, runs))))
    base_name, base_s, base_bytes = measured[1]
    rows = []
    for name, seconds, size in measured:
        extra_s, saved = seconds - base_s, base_bytes - size
        # A codec that costs more CPU but writes fewer bytes wins when storage moves those
        # bytes (written once, read once) slower than this.
        break_even = f"{2 * saved / extra_s / 1e6:.0f}" if saved > 0 and extra_s > 0 else "-"
        rows.append([name, f"{seconds * 1000:.1f}", f"{size / 1e6:.2f}", break_even])
    print_table(
        f"3. run codec: encode_run + decode_run of one map's {partitions} runs",
        ["compression", "ms", "MB", f"beats {base_name} below MB/s"],
        rows,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5_000_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="kubemr stages: best of this many")
    args = parser.parse_args(argv)
    print(f"pyarrow {pa.__version__}, numpy {np.__version__}, Python {sys.version.split()[0]}")
    wordcount_task(args.partitions, args.repeat)
    pairs_benchmark(args.pairs, args.partitions, args.repeat)
    codec_benchmark(args.partitions, args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
