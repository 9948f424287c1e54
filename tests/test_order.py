"""The key order and the total-order partitioner against plain-Python references."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubemr_async import order, shuffle

# Arrow's first call into a kernel can take longer than hypothesis' default deadline.
SETTINGS = settings(max_examples=200, deadline=None)

# Few distinct byte values and short keys make ties, shared prefixes, trailing NULs and
# prefix relations (b"a" < b"a\x00") common, which is where byte orders go wrong.
small_bytes = st.binary(max_size=6).map(lambda b: bytes(x % 4 * 60 for x in b))
any_bytes = st.one_of(small_bytes, st.binary(max_size=12))
ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
floats = st.floats(allow_nan=True, allow_infinity=True)


def py_key(value: Any) -> Any:
    """The reference order: bytes as Python compares them, NaN after everything."""
    if isinstance(value, float):
        return (1, 0.0) if math.isnan(value) else (0, value + 0.0)
    return value


def ref_rank(boundaries: list[Any], key: Any) -> int:
    return sum(py_key(b) <= py_key(key) for b in boundaries)


def as_list(values: Any) -> list[Any]:
    return values.to_pylist() if isinstance(values, pa.Array) else values.tolist()


# --------------------------------------------------------------------------- sort, compare


@SETTINGS
@given(st.lists(any_bytes, max_size=40))
def test_sort_bytes_matches_sorted(keys: list[bytes]) -> None:
    assert as_list(order.sort_keys(pa.array(keys, pa.binary()))) == sorted(keys)


@SETTINGS
@given(st.lists(st.text(max_size=6), max_size=30))
def test_str_keys_sort_as_their_utf8_bytes(keys: list[str]) -> None:
    got = as_list(order.sort_keys(pa.array(keys, pa.string())))
    assert got == sorted(k.encode() for k in keys)


def test_undecodable_str_sorts_as_its_bytes() -> None:
    keys = ["caf\udce9", "café", "cafe"]  # b"caf\xe9", b"caf\xc3\xa9", b"cafe"
    got = as_list(order.sort_keys(keys))
    assert got == sorted(shuffle.str_to_bytes(k) for k in keys)


@SETTINGS
@given(st.lists(ints, max_size=40))
def test_sort_ints_matches_sorted(keys: list[int]) -> None:
    assert as_list(order.sort_keys(keys)) == sorted(keys)


@SETTINGS
@given(st.lists(floats, min_size=1, max_size=40))
def test_sort_floats_numeric_with_nan_last(keys: list[float]) -> None:
    got = as_list(order.sort_keys(np.array(keys, dtype=np.float64)))
    assert [py_key(x) for x in got] == sorted(py_key(x) for x in keys)


@SETTINGS
@given(st.lists(st.tuples(any_bytes, any_bytes), max_size=30))
def test_compare_bytes(pairs: list[tuple[bytes, bytes]]) -> None:
    left = pa.array([a for a, _ in pairs], pa.binary())
    right = pa.array([b for _, b in pairs], pa.binary())
    expected = [(a > b) - (a < b) for a, b in pairs]
    assert order.compare(left, right).tolist() == expected


@SETTINGS
@given(st.lists(st.tuples(floats, floats), max_size=30))
def test_compare_floats(pairs: list[tuple[float, float]]) -> None:
    left = np.array([a for a, _ in pairs], dtype=np.float64)
    right = np.array([b for _, b in pairs], dtype=np.float64)
    expected = [(py_key(a) > py_key(b)) - (py_key(a) < py_key(b)) for a, b in pairs]
    assert order.compare(left, right).tolist() == expected


def test_keys_of_different_domains_do_not_compare() -> None:
    with pytest.raises(order.OrderError, match="one type"):
        order.compare([b"a"], [1])


@SETTINGS
@given(st.lists(any_bytes, max_size=30))
def test_agrees_with_the_shuffle_sort(keys: list[bytes]) -> None:
    # One order everywhere: the map side's sort_by_key sorts as order.sort_keys.
    table = shuffle.pairs_to_table(pa.array(keys, pa.binary()), 1)
    assert shuffle.sort_by_key(table).column("key").to_pylist() == as_list(
        order.sort_keys(pa.array(keys, pa.binary())))


@SETTINGS
@given(st.lists(st.tuples(small_bytes, st.integers(-5, 5)), max_size=30))
def test_sort_by_key_and_value(rows: list[tuple[bytes, int]]) -> None:
    table = shuffle.pairs_to_table(pa.array([k for k, _ in rows], pa.binary()),
                                   pa.array([v for _, v in rows], pa.int64()))
    got = order.sort_by_key_and_value(table)
    assert list(zip(got.column("key").to_pylist(), got.column("value").to_pylist(),
                    strict=True)) == sorted(rows)


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from([b"k", b"k\x00", b"", b"z"]),
                          st.one_of(floats, st.integers(-3, 3).map(float))), max_size=40))
def test_sort_by_key_and_value_is_stable_and_puts_nan_last(rows: list[tuple[bytes, float]]
                                                           ) -> None:
    # Row numbers ride along as a third column to see that equal (key, value) rows keep
    # their order; values are floats with NaN and -0.0 (canonicalised as the map does).
    table = shuffle.pairs_to_table(pa.array([k for k, _ in rows], pa.binary()),
                                   [v for _, v in rows])
    order_ = order.key_and_value_order(table)
    got = [(rows[i][0], py_key(table.column("value")[i].as_py()), i) for i in order_]
    expected = sorted(((k, py_key(table.column("value")[i].as_py()), i)
                       for i, (k, _) in enumerate(rows)))
    assert got == expected


@SETTINGS
@given(st.lists(st.tuples(st.integers(-3, 3), st.text(max_size=3)), max_size=40))
def test_sort_by_key_and_value_orders_str_values_by_their_bytes(
        rows: list[tuple[int, str]]) -> None:
    table = shuffle.pairs_to_table([k for k, _ in rows], [v for _, v in rows])
    got = order.sort_by_key_and_value(table)
    assert list(zip(got.column("key").to_pylist(), got.column("value").to_pylist(),
                    strict=True)) == sorted(rows, key=lambda r: (r[0], r[1].encode()))


# --------------------------------------------------------------------------- searchsorted


@SETTINGS
@given(st.lists(any_bytes, max_size=8), st.lists(any_bytes, max_size=30),
       st.booleans())
def test_searchsorted_bytes(bounds: list[bytes], keys: list[bytes], long_path: bool,
                            ) -> None:
    bounds = sorted(bounds)
    limit = order.FIXED_WIDTH_LIMIT
    try:
        if long_path:  # the Arrow merge path, normally only for keys over the limit
            order.FIXED_WIDTH_LIMIT = -1
        got = order.searchsorted(pa.array(bounds, pa.binary()), pa.array(keys, pa.binary()))
    finally:
        order.FIXED_WIDTH_LIMIT = limit
    assert got.tolist() == [ref_rank(bounds, k) for k in keys]


@SETTINGS
@given(st.lists(floats, max_size=6), st.lists(floats, max_size=30))
def test_searchsorted_floats(bounds: list[float], keys: list[float]) -> None:
    bounds = sorted(bounds, key=py_key)
    got = order.searchsorted(np.array(bounds, np.float64), np.array(keys, np.float64))
    assert got.tolist() == [ref_rank(bounds, k) for k in keys]


# --------------------------------------------------------------------------- the partitioner

# Skewed samples: a few heavy keys repeated many times among a tail of distinct ones.
skewed = st.tuples(
    st.lists(st.tuples(st.binary(min_size=1, max_size=4), st.integers(1, 400)), max_size=4),
    st.lists(st.binary(max_size=5), max_size=200),
).map(lambda t: [k for k, n in t[0] for _ in range(n)] + t[1]).filter(bool)


def check_partitioner(sample: list[Any], keys: list[Any], partitions: int) -> None:
    total = order.TotalOrder.from_sample(sample, partitions)
    assert len(total.boundaries) == partitions - 1
    bounds = as_list(total.boundaries)
    assert [py_key(b) for b in bounds] == sorted(py_key(b) for b in bounds)
    ids = total.partition_ids(keys, partitions)
    # Every key lands in exactly one partition, in range.
    assert ids.shape == (len(keys),)
    assert ((ids >= 0) & (ids < partitions)).all()
    parts: dict[int, list[Any]] = {}
    for key, pid in zip(keys, ids.tolist(), strict=True):
        parts.setdefault(pid, []).append(key)
    # Partitions are ordered: max(part i) <= min(part j) for i < j; hence no key is split.
    for i in parts:
        for j in parts:
            if i < j:
                assert max(map(py_key, parts[i])) < min(map(py_key, parts[j]))
    # A key always goes to the same partition.
    where: dict[Any, set[int]] = {}
    for key, pid in zip(keys, ids.tolist(), strict=True):
        where.setdefault(py_key(key), set()).add(pid)
    assert all(len(p) == 1 for p in where.values())


@SETTINGS
@given(skewed, st.lists(st.binary(max_size=5), max_size=50), st.integers(1, 9))
def test_total_order_bytes(sample: list[bytes], extra: list[bytes], partitions: int) -> None:
    check_partitioner(sample, sample + extra, partitions)


@SETTINGS
@given(st.lists(ints, min_size=1, max_size=100), st.lists(ints, max_size=30),
       st.integers(1, 9))
def test_total_order_ints(sample: list[int], extra: list[int], partitions: int) -> None:
    check_partitioner(sample, sample + extra, partitions)


@SETTINGS
@given(st.lists(floats, min_size=1, max_size=100), st.integers(1, 9))
def test_total_order_floats(sample: list[float], partitions: int) -> None:
    check_partitioner(sample, sample, partitions)


@SETTINGS
@given(skewed, st.integers(2, 9))
def test_skewed_partitions_are_bounded(sample: list[bytes], partitions: int) -> None:
    # On the sample itself, no part holds more than its share plus the heaviest key.
    ids = order.TotalOrder.from_sample(sample, partitions).partition_ids(sample, partitions)
    sizes = np.bincount(ids, minlength=partitions)
    heaviest = max(Counter(sample).values())
    assert sizes.max() <= len(sample) / partitions + heaviest


def test_a_heavy_key_owns_its_partition_and_spares_its_neighbours() -> None:
    sample = [b"m"] * 5000 + [bytes([c]) + b"x" for c in range(ord("a"), ord("z") + 1)] * 100
    ids = order.TotalOrder.from_sample(sample, 4).partition_ids(sample, 4)
    heavy = set(ids[: 5000].tolist())
    assert len(heavy) == 1
    (pid,) = heavy
    others = [k for k, p in zip(sample, ids.tolist(), strict=True) if p == pid and k != b"m"]
    assert not others
    sizes = np.bincount(ids, minlength=4)
    assert sizes.max() == 5000
    assert sizes.min() > 0


def test_uniform_sample_splits_evenly() -> None:
    rng = np.random.default_rng(1)
    sample = [bytes(r) for r in rng.integers(32, 127, size=(20000, 10), dtype=np.uint8)]
    ids = order.TotalOrder.from_sample(sample, 8).partition_ids(sample, 8)
    sizes = np.bincount(ids, minlength=8)
    assert sizes.max() - sizes.min() <= 2


def test_partition_file_round_trip_and_checks() -> None:
    total = order.TotalOrder.from_sample([b"b", b"a", b"c", b"d"] * 3, 3, "bytes")
    again = order.TotalOrder.from_bytes(total.to_bytes())
    assert as_list(again.boundaries) == as_list(total.boundaries)
    assert (again.partitions, again.domain, again.key_type) == (3, "bytes", "bytes")
    with pytest.raises(order.OrderError, match="for 3 partitions"):
        again.partition_ids([b"a"], 4)
    with pytest.raises(order.OrderError, match="int keys"):
        again.partition_ids([1, 2], 3)
    damaged = bytearray(total.to_bytes())
    damaged[-1] ^= 1
    with pytest.raises(order.OrderError, match="damaged"):
        order.TotalOrder.from_bytes(bytes(damaged))
    numbers = order.TotalOrder.from_sample([3.5, -1.0, 2.0, float("nan")], 2, "float")
    assert as_list(order.TotalOrder.from_bytes(numbers.to_bytes()).boundaries) == as_list(
        numbers.boundaries)


def test_empty_sample_is_refused() -> None:
    with pytest.raises(order.OrderError, match="empty sample"):
        order.choose_boundaries(pa.array([], pa.binary()), 3)


# --------------------------------------------------------------------------- sampling plan


@SETTINGS
@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=50), st.integers(1, 12),
       st.integers(1, 5), st.integers(1, 3000))
def test_sample_windows(sizes: list[int], splits: int, per_split: int, window: int) -> None:
    plan = order.sample_windows(sizes, splits, per_split, window)
    assert plan == order.sample_windows(sizes, splits, per_split, window)
    chosen = {index for index, _, _ in plan}
    assert len(chosen) == min(splits, len(sizes))
    for index, begin, end in plan:
        assert 0 <= begin <= end <= sizes[index]


def test_subsample_is_deterministic_and_bounded() -> None:
    keys = pa.array([str(i).encode() for i in range(1000)], pa.binary())
    a = order.subsample(keys, 100, seed=3)
    assert len(a) == 100 and as_list(a) == as_list(order.subsample(keys, 100, seed=3))
    assert as_list(order.subsample(keys, 5000)) == as_list(keys)
