"""The shuffle object, the k-way merge and merge passes, against plain-Python references."""

from __future__ import annotations

import itertools
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubemr_async import merge, shuffle, spill
from kubemr_async.shuffle import CorruptRunError, ShuffleBudget

KEYS = {
    "bytes": st.binary(max_size=12),
    "str": st.text(max_size=8),
    "int": st.integers(-(2**63), 2**63 - 1),
    "float": st.floats(allow_nan=False),
}

#: A merge step's chunk size: from a row or two (every step bounded by one stream's
#: share) to more than any test's streams hold (each step up to the smallest last row).
CHUNK_BYTES = st.sampled_from([1, 40, 300, 1 << 20])


def sorted_tables(keys: list[Any], cuts: list[int]) -> list[shuffle.Table]:
    """One sorted stream: keys sorted, values their position, cut into several tables."""
    table = shuffle.sort_by_key(shuffle.pairs_to_table(keys, list(range(len(keys)))))
    bounds = sorted({0, len(keys), *(c % (len(keys) + 1) for c in cuts)})
    return [table.slice(a, b - a) for a, b in itertools.pairwise(bounds)]


def rows(tables: Any) -> list[tuple[Any, Any]]:
    out: list[tuple[Any, Any]] = []
    for table in tables:
        out += zip(table.column("key").to_pylist(), table.column("value").to_pylist(),
                   strict=True)
    return out


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(sorted(KEYS)), data=st.data())
def test_merge_sorted_equals_concatenate_and_stable_sort(kind: str, data: Any) -> None:
    streams = data.draw(st.lists(st.lists(KEYS[kind], max_size=30), max_size=5))
    cuts = data.draw(st.lists(st.integers(0, 40), max_size=4))
    inputs = [sorted_tables(keys, cuts) for keys in streams if keys]
    merged = rows(merge.merge_sorted(inputs, chunk_bytes=data.draw(CHUNK_BYTES)))
    expected = rows([shuffle.merge_runs([t for s in inputs for t in s], None)]) if inputs else []
    assert merged == expected


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_merge_sorted_by_value_equals_a_stable_sort_by_key_and_value(data: Any) -> None:
    # Few distinct keys and values, so that equal keys, equal (key, value) rows and block
    # edges inside a key are common; values are their stream and position's tag in order
    # to see that ties keep stream order.
    pair = st.tuples(st.sampled_from([b"a", b"b", b"bb"]), st.integers(0, 3))
    streams = data.draw(st.lists(st.lists(pair, max_size=25), max_size=5))
    cuts = data.draw(st.lists(st.integers(0, 30), max_size=4))
    inputs, expected = [], []
    for number, pairs in enumerate(streams):
        pairs = sorted(pairs)
        expected += [(k, v, number, i) for i, (k, v) in enumerate(pairs)]
        table = shuffle.pairs_to_table([k for k, _ in pairs],
                                       [v * 1000 + number * 100 + i for i, (_, v) in
                                        enumerate(pairs)])
        bounds = sorted({0, len(pairs), *(c % (len(pairs) + 1) for c in cuts)})
        inputs.append([table.slice(a, b - a) for a, b in itertools.pairwise(bounds)])
    merged = rows(merge.merge_sorted(inputs, chunk_bytes=data.draw(CHUNK_BYTES), by_value=True))
    assert merged == [(k, v * 1000 + n * 100 + i) for k, v, n, i in sorted(expected)]


@settings(max_examples=40, deadline=None)
@given(keys=st.lists(st.sampled_from([b"a", b"b", b"c", b"dd"]), max_size=60),
       cuts=st.lists(st.integers(0, 60), max_size=6))
def test_fold_sorted_carries_a_key_across_chunks(keys: list[bytes], cuts: list[int]) -> None:
    table = shuffle.sort_by_key(shuffle.pairs_to_table(keys, 1))
    bounds = sorted({0, len(keys), *(c % (len(keys) + 1) for c in cuts)})
    chunks = [table.slice(a, b - a) for a, b in itertools.pairwise(bounds)]
    assert dict(rows(merge.fold_sorted(chunks, "count"))) == dict(Counter(keys))


def test_a_shuffle_file_holds_each_partition_contiguous_with_a_checked_index(
        tmp_path: Path) -> None:
    keys = [f"w{i % 97}" for i in range(5000)]
    parts = shuffle.partition(shuffle.pairs_to_table(keys, 1), 7)
    path = tmp_path / "obj"
    size = spill.write_shuffle_file(path, [[p] for p in parts], block_bytes=4096)
    assert size == path.stat().st_size
    data = path.read_bytes()
    for partition, source in enumerate(spill.read_index(path, 7)):
        blocks = list(spill.read_blocks(source))
        assert len(blocks) > 1 or parts[partition].num_rows < 500
        assert rows(blocks) == rows([parts[partition]])
        start, length = shuffle.entry_range(7, partition, size)
        entry = shuffle.decode_entry(data[start:start + length], partition, size)
        assert entry.rows == parts[partition].num_rows
        assert entry.crc == zlib.crc32(data[entry.offset:entry.offset + entry.length])
        with pytest.raises(CorruptRunError, match="checksum"):
            shuffle.decode_entry(data[start:start + length], (partition + 1) % 7, size)


def test_merge_passes_keep_the_order_of_equal_keys(tmp_path: Path) -> None:
    budget = ShuffleBudget(16 * 1024 * 1024)
    count = budget.merge_factor * 3 + 2  # two levels of passes
    sources: list[spill.Source] = []
    for i in range(count):
        table = shuffle.pairs_to_table([b"k", b"k", f"{i:04d}".encode()], [i, i, i])
        path = tmp_path / f"s{i}"
        source = spill.write_slice(path, [shuffle.sort_by_key(table)], budget.block_bytes)
        sources.append(lambda source=source: spill.read_blocks(source))
    merged = spill.merge_passes(sources, tmp_path, budget)
    assert len(merged) <= budget.merge_factor
    out = rows(merge.merge_sorted([source() for source in merged], chunk_bytes=budget.merge_chunk))
    assert [v for k, v in out if k == b"k"] == [i for i in range(count) for _ in (0, 1)]
    assert [k for k, _ in out if k != b"k"] == [f"{i:04d}".encode() for i in range(count)]


@pytest.mark.parametrize("key", [b"", 0.0, float("nan")])
def test_merge_keeps_stream_order_when_a_key_continues_in_a_streams_next_table(
        key: Any) -> None:
    """Stream 0's rows of a key arrive in two tables; stream 1's equal row must follow
    both, not slip in between (a case hypothesis found once)."""
    first = sorted_tables([key, key], [1])  # two tables of one row each
    second = sorted_tables([key], [])
    merged = rows(merge.merge_sorted([first, second], chunk_bytes=1 << 20))
    assert [value for _, value in merged] == [0, 1, 0]


def test_a_merge_step_is_bounded_by_the_chunk_size_not_the_number_of_streams() -> None:
    """Forty streams of one 1,000-row block each: a merge step takes about ``chunk_bytes``
    from all of them together, not a block's worth from each."""
    streams = [[shuffle.sort_by_key(shuffle.pairs_to_table(
        [f"{(i * 7919 + s) % 100_000:06d}".encode() for i in range(1000)], s))]
        for s in range(40)]
    row_bytes = streams[0][0].nbytes / 1000
    chunk_bytes = int(200 * row_bytes)
    chunks = list(merge.merge_sorted(streams, chunk_bytes=chunk_bytes))
    assert sum(c.num_rows for c in chunks) == 40_000
    assert max(c.num_rows for c in chunks) <= 200 + 40  # a share each, rounded up
    keys = [k for c in chunks for k in c.column("key").to_pylist()]
    assert keys == sorted(keys)
