"""The vectorized shuffle against plain-Python references: dicts, sorted(), bytes.split().

Pure code, no network and no disk; the only subprocesses check that partitioning does not
depend on the process (hash seed).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import struct
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubemr_async import shuffle
from kubemr_async.shuffle import Combiner, CorruptRunError, ShuffleError

REPO_ROOT = Path(__file__).resolve().parents[1]
WHITESPACE = b" \t\n\r\x0b\x0c"
# Arrow's first call into a kernel can take longer than hypothesis' default deadline.
PROPERTY = settings(deadline=None, max_examples=100)


# --------------------------------------------------------------------------- references


def fnv1a64(data: bytes) -> int:
    value = 0xCBF29CE484222325
    for byte in data:
        value = ((value ^ byte) * 0x100000001B3) % 2**64
    return value


def canonical_bytes(key: Any) -> bytes:
    """The documented canonical form that stable_hash hashes."""
    if isinstance(key, bool):
        return bytes([key])
    if isinstance(key, int):
        return key.to_bytes(8, "little", signed=True)
    if isinstance(key, float):
        if math.isnan(key):
            return struct.pack("<Q", 0x7FF8000000000000)
        return struct.pack("<d", key + 0.0)
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, bytes):
        return key
    return orjson.dumps(key, option=orjson.OPT_SORT_KEYS)


def ref_key(key: Any) -> Any:
    """A hashable, orderable identity for a key: JSON by its encoding, -0.0 as 0.0."""
    if key is None or isinstance(key, list | tuple | dict):
        return orjson.dumps(key, option=orjson.OPT_SORT_KEYS)
    if isinstance(key, float):
        return key + 0.0
    return key


def json_round_trip(value: Any) -> Any:
    """What a JSON-coded value reads back as (tuples become lists)."""
    return orjson.loads(orjson.dumps(value))


def identity(value: Any) -> Any:
    return value


def is_json(table: pa.Table, name: str) -> bool:
    metadata = table.schema.field(name).metadata or {}
    return metadata.get(b"kubemr.codec") == b"json"


def column(table: pa.Table, name: str) -> list[Any]:
    items: list[Any] = table.column(name).to_pylist()
    return [orjson.loads(x) for x in items] if is_json(table, name) else items


def as_dict(table: pa.Table) -> dict[Any, Any]:
    keys = [ref_key(k) for k in column(table, "key")]
    assert len(set(keys)) == len(keys), "a combined table has one row per key"
    return dict(zip(keys, column(table, "value"), strict=True))


REFERENCE_COMBINERS: dict[str, Callable[[list[Any]], Any]] = {
    "sum": sum,
    "count": len,
    "min": min,
    "max": max,
}


def reference_combine(keys: list[Any], values: list[Any], combiner: str) -> dict[Any, Any]:
    groups: dict[Any, list[Any]] = defaultdict(list)
    for key, value in zip(keys, values, strict=True):
        groups[ref_key(key)].append(value)
    return {k: REFERENCE_COMBINERS[combiner](vs) for k, vs in groups.items()}


def strictly_ascending(items: list[Any]) -> bool:
    return all(a < b for a, b in itertools.pairwise(items))


# --------------------------------------------------------------------------- strategies

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.text("ab", max_size=2)
    | st.sampled_from([0.5, -0.0, 1e300])
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text("ab", max_size=2), inner, max_size=3)
    ),
    max_leaves=6,
)
# Top-level JSON keys are containers or None: a bare int or str key is its own kind.
json_key = (
    st.none()
    | st.lists(json_value, max_size=3)
    | st.dictionaries(st.text("abc", max_size=2), json_value, max_size=3)
)
KEY_ELEMENTS: dict[str, st.SearchStrategy[Any]] = {
    "str": st.text(st.sampled_from("ab\x00\u00e9\U0001f600 "), max_size=4) | st.text(max_size=6),
    # Long runs over a tiny alphabet share 8-byte prefixes, which the string sort treats
    # specially; b"\x00" checks that zero padding does not confuse "a" and "a\x00".
    "bytes": st.binary(max_size=4)
    | st.lists(st.sampled_from(b"\x00a\xff"), max_size=12).map(bytes),
    "int": st.integers(-3, 3) | st.integers(-(2**63), 2**63 - 1),
    "float": st.sampled_from([0.0, -0.0, 1.5, -2.25, math.inf, -math.inf])
    | st.floats(allow_nan=False),
    "bool": st.booleans(),
    "json": json_key,
}
key_lists = st.sampled_from(sorted(KEY_ELEMENTS)).flatmap(
    lambda kind: st.lists(KEY_ELEMENTS[kind], max_size=60)
)
# Sums of multiples of 1/4 are exact in any order, so float sums compare with ==.
quarters = st.integers(-4000, 4000).map(lambda n: n / 4)
VALUE_ELEMENTS: dict[str, list[st.SearchStrategy[Any]]] = {
    "sum": [st.integers(-(10**9), 10**9), quarters, st.booleans()],
    "count": [st.integers(-(2**63), 2**63 - 1), st.text(max_size=3), json_value],
    "min": [st.integers(-(2**63), 2**63 - 1), quarters, st.text(max_size=4), st.binary(max_size=4)],
    "max": [st.integers(-(2**63), 2**63 - 1), quarters, st.text(max_size=4), st.binary(max_size=4)],
}
any_values = st.sampled_from(
    [st.integers(-5, 5), quarters, st.text(max_size=3), st.binary(max_size=3), json_value]
)
combiners = st.sampled_from(["sum", "count", "min", "max"])


def draw_values(data: st.DataObject, elements: st.SearchStrategy[Any], n: int) -> list[Any]:
    return data.draw(st.lists(elements, min_size=n, max_size=n))


def split_at(items: list[Any], cuts: list[int]) -> list[list[Any]]:
    bounds = [0, *sorted(c % (len(items) + 1) for c in cuts), len(items)]
    return [items[a:b] for a, b in itertools.pairwise(bounds)]


# --------------------------------------------------------------------------- split_words

whitespace_heavy = st.lists(
    st.sampled_from(
        [
            *(bytes([b]) for b in WHITESPACE),
            b"a",
            b"\xff",
            b"\x00",
            b"\x1c",
            b"\x85",
            b"\xa0",
            b"ab",
        ]
    )
).map(b"".join)


@PROPERTY
@given(st.binary(max_size=200) | whitespace_heavy)
def test_split_words_is_bytes_split(data: bytes) -> None:
    words = shuffle.split_words(data)
    assert words.type == pa.binary()
    assert words.to_pylist() == data.split()


@pytest.mark.parametrize(
    "data",
    [b"", b" \t\n\r\x0b\x0c", b"  a", b"a  ", b"a", b"caf\xe9 \xff\xfe\tx", b"a\x1cb\x85c\xa0d e"],
)
def test_split_words_edge_cases(data: bytes) -> None:
    assert shuffle.split_words(data).to_pylist() == data.split()


# --------------------------------------------------------------------------- building tables


def test_pairs_to_table_kinds_and_broadcast() -> None:
    table = shuffle.pairs_to_table(["a", "b"], 1)
    assert table.schema.field("key").type == pa.string()
    assert table.column("value").to_pylist() == [1, 1]
    assert table.schema.field("value").type == pa.int64()
    # Mixed numbers are not promoted: the int stays exact and an int.
    mixed = shuffle.pairs_to_table([b"x", b"y"], [2**60 + 1, 2.5])
    assert mixed.schema.field("key").type == pa.binary()
    assert is_json(mixed, "value")
    assert column(mixed, "value") == [2**60 + 1, 2.5]
    assert [type(v) for v in column(mixed, "value")] == [int, float]
    as_json = shuffle.pairs_to_table([(1, "a"), {"b": 2, "a": 1}], [1, "one"])
    assert is_json(as_json, "key") and is_json(as_json, "value")
    assert as_json.column("key").to_pylist() == [b'[1,"a"]', b'{"a":1,"b":2}']
    assert column(as_json, "value") == [1, "one"]
    broadcast = shuffle.pairs_to_table([1, 2, 3], {"n": [1]})
    assert column(broadcast, "value") == [{"n": [1]}] * 3


def test_pairs_to_table_accepts_numpy_and_arrow() -> None:
    table = shuffle.pairs_to_table(
        np.array([3, 1], dtype=np.int32), np.array([0.5, 1], dtype=np.float32)
    )
    assert table.schema.field("key").type == pa.int64()
    assert table.schema.field("value").type == pa.float64()
    text = shuffle.pairs_to_table(np.array(["x", "yz"]), np.array([True, False]))
    assert text.column("key").to_pylist() == ["x", "yz"]
    assert text.schema.field("value").type == pa.bool_()
    chunked = pa.chunked_array(
        [pa.array(["a"], pa.large_string()), pa.array(["b"], pa.large_string())]
    )
    from_arrow = shuffle.pairs_to_table(chunked, pa.array([7, 8], pa.uint8()))
    assert from_arrow.schema.field("key").type == pa.string()
    assert from_arrow.column("value").to_pylist() == [7, 8]
    with_nulls = shuffle.pairs_to_table(pa.array(["a", "b"]), pa.array([1, None]))
    assert is_json(with_nulls, "value") and column(with_nulls, "value") == [1, None]


def test_float_keys_are_canonical() -> None:
    nans = np.array([0x7FF8000000000000, 0x7FF0000000000001, 0xFFF8000000000123], dtype=np.uint64)
    keys = np.concatenate([nans.view(np.float64), [-0.0, 0.0]])
    combined = shuffle.combine(shuffle.pairs_to_table(keys, 1), "count")
    keys_and_counts = zip(map(str, column(combined, "key")), column(combined, "value"), strict=True)
    assert sorted(keys_and_counts) == [("0.0", 2), ("nan", 3)]


@pytest.mark.parametrize(
    ("keys", "values", "message"),
    [
        ([{1, 2}], 1, r"key of type set is not serialisable: \{1, 2\}"),
        ([object()], 1, r"key of type object is not serialisable: <object object"),
        ([1j], 1, r"key of type complex is not serialisable: 1j"),
        (["a"], [{3}], r"value of type set is not serialisable: \{3\}"),
        ([1, "a"], 1, r"keys mix types int and str \(1 and 'a'\)"),
        ([b"x", "a", b"y"], 1, r"keys mix types bytes and str"),
        ([2**63], 1, r"key of type int is out of the int64 range: 9223372036854775808"),
        ([-(2**63) - 1], 1, r"key of type int is out of the int64 range: -9223372036854775809"),
        (np.array([2**64 - 1], dtype=np.uint64), 1, r"key of type int is out of the int64 range"),
        (pa.array([2**64 - 1], pa.uint64()), 1, r"key of type int is out of the int64 range"),
        ([1], [2**64], r"value of type int is out of the int64 range"),
        ([{1: "a"}], 1, r"key of type dict is not serialisable"),
        (["a"], [[b"raw"]], r"value of type list is not serialisable"),
        (["a"], [[1, b"raw"]], r"value of type list is not serialisable"),
        (["a", "b"], [b"x", 1], r"values mix types bytes and int"),
        # None, True and 0.5 mix fine (as JSON): the clash named is the bytes one.
        (["a", "b", "c", "d"], [None, True, 0.5, b"x"],
         r"values mix types bytes and NoneType \(b'x' and None\)"),
        (["\ud800"], 1, r"key of type str is not serialisable: '\\ud800' \(surrogates"),
        (["a", "b"], [0.5, 2**64], r"value of type int is not serialisable: 1844"),
        (["\udcc3\udca9"], 1, r"key of type str is not serialisable: .*no bytes decode to it"),
        (["a", "b"], [1], r"got 2 keys but 1 values"),
        ("ab", 1, r"keys must be a sequence or an array, got str"),
        (np.zeros((2, 2)), 1, r"keys must be one-dimensional"),
    ],
)
def test_unsupported_pairs_raise_shuffle_error(keys: Any, values: Any, message: str) -> None:
    with pytest.raises(ShuffleError, match=message):
        shuffle.pairs_to_table(keys, values)


def test_concat_tables_unifies_values_and_rejects_mixed_keys() -> None:
    ints = shuffle.pairs_to_table(["a"], [1])
    floats = shuffle.pairs_to_table(["b"], [0.5])
    texts = shuffle.pairs_to_table(["c"], ["x"])
    empty = shuffle.pairs_to_table([], [])
    numbers = shuffle.concat_tables([empty, ints, floats])
    assert is_json(numbers, "value")
    assert column(numbers, "value") == [1, 0.5]
    assert type(column(numbers, "value")[0]) is int
    mixed = shuffle.concat_tables([ints, texts])
    assert is_json(mixed, "value") and column(mixed, "value") == [1, "x"]
    assert shuffle.concat_tables([]).num_rows == 0
    with pytest.raises(ShuffleError, match="int and str"):
        shuffle.concat_tables([ints, shuffle.pairs_to_table([1], [1])])
    with pytest.raises(ShuffleError, match="bytes and int"):
        shuffle.concat_tables([ints, shuffle.pairs_to_table(["d"], [b"x"])])
    # JSON values and bools mix; the clash named is the bytes one.
    lists = shuffle.pairs_to_table(["e"], [[1]])
    bools = shuffle.pairs_to_table(["f"], [True])
    with pytest.raises(ShuffleError, match="values of type bytes and JSON value"):
        shuffle.concat_tables([lists, bools, shuffle.pairs_to_table(["d"], [b"x"])])


# --------------------------------------------------------------------------- hashing


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", 0xCBF29CE484222325), ("a", 0xAF63DC4C8601EC8C), ("foobar", 0x85944171F73967E8)],
)
def test_stable_hash_published_fnv1a_vectors(text: str, expected: int) -> None:
    for array in (pa.array([text]), pa.array([text.encode()]), pa.array([text], pa.large_string())):
        assert shuffle.stable_hash(array).tolist() == [expected]


@PROPERTY
@given(key_lists)
def test_stable_hash_matches_reference_on_canonical_bytes(keys: list[Any]) -> None:
    hashes = shuffle.stable_hash(shuffle.pairs_to_table(keys, None).column("key"))
    assert hashes.dtype == np.uint64
    assert hashes.tolist() == [fnv1a64(canonical_bytes(k)) for k in keys]


@PROPERTY
@given(st.lists(st.floats(), max_size=20))
def test_stable_hash_of_raw_floats_normalises_zero_and_nan(keys: list[float]) -> None:
    assert shuffle.stable_hash(pa.array(keys, pa.float64())).tolist() == [
        fnv1a64(canonical_bytes(k)) for k in keys
    ]


@PROPERTY
@given(st.lists(st.binary(max_size=80), max_size=120), st.integers(0, 5))
def test_stable_hash_of_long_and_sliced_strings(keys: list[bytes], skip: int) -> None:
    # Many strings go through the vectorized loop, the last few long ones through the
    # Python tail; a slice checks that the Arrow array offset is honoured.
    array = pa.array([b"pad"] * skip + keys, pa.binary()).slice(skip)
    assert shuffle.stable_hash(array).tolist() == [fnv1a64(k) for k in keys]
    chunked = pa.chunked_array(
        [array.slice(0, len(keys) // 2), array.slice(len(keys) // 2)], pa.binary()
    )
    assert shuffle.stable_hash(chunked).tolist() == [fnv1a64(k) for k in keys]


def test_stable_hash_of_a_very_long_key() -> None:
    rng = random.Random(5)
    keys = [rng.randbytes(rng.randrange(300)) for _ in range(100)] + [rng.randbytes(5000)]
    assert shuffle.stable_hash(pa.array(keys)).tolist() == [fnv1a64(k) for k in keys]


def test_partition_ids_and_partition_for_agree_with_the_hash() -> None:
    keys = ["the", "quick", "brown", "fox", "\u00e9"]
    ids = shuffle.partition_ids(pa.array(keys), 7)
    assert ids.tolist() == [fnv1a64(k.encode()) % 7 for k in keys]
    assert [shuffle.partition_for(k, 7) for k in keys] == ids.tolist()
    with pytest.raises(ValueError, match="at least 1"):
        shuffle.partition_ids(pa.array(keys), 0)


_CHILD = """
import json
import pyarrow as pa
from kubemr_async.shuffle import partition_for, partition_ids
scalars = ["the", "\\u00e9t\\u00e9", b"\\xff\\x00", 0, -1, 2**62, 1.5, -0.0, True, None,
           {"b": [1], "a": 2}]
words = pa.array([f"word{i}" for i in range(500)])
print(json.dumps([[partition_for(k, 97) for k in scalars], partition_ids(words, 13).tolist()]))
"""


def _partitions_in_child(hash_seed: str) -> list[list[int]]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, check=True, timeout=120
    )
    result: list[list[int]] = json.loads(done.stdout)
    return result


def test_partitions_are_identical_across_processes() -> None:
    first = _partitions_in_child("1")
    second = _partitions_in_child("2")
    assert first == second
    words = [fnv1a64(f"word{i}".encode()) % 13 for i in range(500)]
    assert first[1] == words
    assert first[0][0] == fnv1a64(b"the") % 97


# --------------------------------------------------------------------------- combine


@PROPERTY
@given(key_lists, combiners, st.data())
def test_combine_matches_dict_reference(
    keys: list[Any], combiner: Combiner, data: st.DataObject
) -> None:
    elements = data.draw(st.sampled_from(VALUE_ELEMENTS[combiner]))
    values = draw_values(data, elements, len(keys))
    combined = shuffle.combine(shuffle.pairs_to_table(keys, values), combiner)
    assert as_dict(combined) == reference_combine(keys, values, combiner)


def test_combine_result_types_and_errors() -> None:
    bools = shuffle.combine(shuffle.pairs_to_table(["a", "a"], [True, True]), "sum")
    assert bools.schema.field("value").type == pa.int64() and column(bools, "value") == [2]
    counted = shuffle.combine(shuffle.pairs_to_table(["a"], ["x"]), "count")
    assert counted.schema.field("value").type == pa.int64()
    empty = shuffle.combine(shuffle.pairs_to_table([], []), "count")
    assert empty.num_rows == 0 and empty.schema.field("value").type == pa.int64()
    with pytest.raises(ShuffleError, match="'sum' does not apply to values of type str"):
        shuffle.combine(shuffle.pairs_to_table(["a"], ["x"]), "sum")
    # JSON values fold with Python's own max/sum, which compare lists but cannot add them.
    highest = shuffle.combine(shuffle.pairs_to_table(["a", "a"], [[1], [2, 0]]), "max")
    assert column(highest, "value") == [[2, 0]]
    with pytest.raises(ShuffleError, match=r"'sum' cannot fold the values of key 'a'"):
        shuffle.combine(shuffle.pairs_to_table(["a", "a"], [[1], [2]]), "sum")
    with pytest.raises(ValueError, match="unknown combiner 'avg'"):
        shuffle.combine(shuffle.pairs_to_table(["a"], [1]), "avg")  # type: ignore[arg-type]


def test_merge_combiner() -> None:
    assert shuffle.merge_combiner("count") == "sum"
    assert [shuffle.merge_combiner(c) for c in ("sum", "min", "max")] == ["sum", "min", "max"]


@PROPERTY
@given(key_lists, combiners, st.data(), st.lists(st.integers(0, 100), max_size=4))
def test_merge_runs_of_map_side_combines_matches_reference(
    keys: list[Any], combiner: Combiner, data: st.DataObject, cuts: list[int]
) -> None:
    elements = data.draw(st.sampled_from(VALUE_ELEMENTS[combiner]))
    values = draw_values(data, elements, len(keys))
    runs = [
        shuffle.decode_run(
            shuffle.encode_run(shuffle.combine(shuffle.pairs_to_table(k, v), combiner))
        )
        for k, v in zip(split_at(keys, cuts), split_at(values, cuts), strict=True)
    ]
    merged = shuffle.merge_runs(runs, combiner)
    assert strictly_ascending([ref_key(k) for k in column(merged, "key")])
    assert as_dict(merged) == reference_combine(keys, values, combiner)


@PROPERTY
@given(key_lists, any_values, st.data(), st.lists(st.integers(0, 100), max_size=4))
def test_merge_runs_without_combiner_is_a_stable_sort(
    keys: list[Any], elements: st.SearchStrategy[Any], data: st.DataObject, cuts: list[int]
) -> None:
    values = draw_values(data, elements, len(keys))
    runs = [
        shuffle.pairs_to_table(k, v)
        for k, v in zip(split_at(keys, cuts), split_at(values, cuts), strict=True)
    ]
    merged = shuffle.merge_runs(runs, None)
    normalise = json_round_trip if is_json(merged, "value") else identity
    expected = sorted(
        ((ref_key(k), normalise(v)) for k, v in zip(keys, values, strict=True)),
        key=lambda kv: kv[0],
    )
    got = list(
        zip((ref_key(k) for k in column(merged, "key")), column(merged, "value"), strict=True)
    )
    assert got == expected


@PROPERTY
@given(key_lists, any_values, st.data())
def test_iter_groups_matches_dict_of_lists(
    keys: list[Any], elements: st.SearchStrategy[Any], data: st.DataObject
) -> None:
    values = draw_values(data, elements, len(keys))
    table = shuffle.pairs_to_table(keys, values)
    decode_value = json_round_trip if is_json(table, "value") else identity
    decode_key = json_round_trip if is_json(table, "key") else ref_key
    expected: dict[Any, tuple[Any, list[Any]]] = {}
    for key, value in zip(keys, values, strict=True):
        expected.setdefault(ref_key(key), (decode_key(key), []))[1].append(decode_value(value))
    groups = list(shuffle.iter_groups(table))
    assert [ref_key(k) for k, _ in groups] == sorted(expected)
    for key, group in groups:
        expected_key, expected_values = expected[ref_key(key)]
        assert key == expected_key and type(key) is type(expected_key)
        assert group == expected_values


def test_iter_groups_on_an_empty_table() -> None:
    assert list(shuffle.iter_groups(shuffle.pairs_to_table([], []))) == []


# --------------------------------------------------------------------------- sort and partition


@PROPERTY
@given(key_lists)
def test_sort_by_key_is_a_stable_sort(keys: list[Any]) -> None:
    table = shuffle.pairs_to_table(keys, list(range(len(keys))))
    ordered = shuffle.sort_by_key(table)
    expected = sorted(range(len(keys)), key=lambda i: ref_key(keys[i]))
    assert column(ordered, "value") == expected


@pytest.mark.parametrize("distinct", [100, 70_001])
@pytest.mark.parametrize("head", [[b"dup", b"dup"], [b"%05d" % i for i in range(2000)]])
def test_sort_by_key_with_many_duplicates(distinct: int, head: list[bytes]) -> None:
    # String sorting picks its method from the first rows: a duplicate there means ranking
    # the distinct strings (70,001 of them need both 16-bit radix passes); distinct first
    # rows mean sorting rows directly, duplicates later still in input order.
    rng = random.Random(distinct)
    keys = head + [b"k%d" % rng.randrange(distinct) for _ in range(3 * distinct)]
    ordered = shuffle.sort_by_key(shuffle.pairs_to_table(keys, list(range(len(keys)))))
    assert column(ordered, "value") == sorted(range(len(keys)), key=keys.__getitem__)


@PROPERTY
@given(key_lists, st.integers(1, 7))
def test_partition_places_every_row_once_by_key(keys: list[Any], partitions: int) -> None:
    table = shuffle.pairs_to_table(keys, list(range(len(keys))))
    parts = shuffle.partition(table, partitions)
    assert len(parts) == partitions
    assert sorted(i for part in parts for i in column(part, "value")) == list(range(len(keys)))
    home: dict[Any, int] = {}
    for index, part in enumerate(parts):
        part_keys = column(part, "key")
        rows = list(zip((ref_key(k) for k in part_keys), column(part, "value"), strict=True))
        assert rows == sorted(rows), "sorted by key, equal keys in input order"
        for key, (identity, _) in zip(part_keys, rows, strict=True):
            assert home.setdefault(identity, index) == index
            assert shuffle.partition_for(key, partitions) == index


def test_partition_of_an_empty_table() -> None:
    parts = shuffle.partition(shuffle.pairs_to_table([], []), 3)
    assert [p.num_rows for p in parts] == [0, 0, 0]


# --------------------------------------------------------------------------- run format


@PROPERTY
@given(key_lists, any_values, st.data())
def test_encode_decode_round_trip(
    keys: list[Any], elements: st.SearchStrategy[Any], data: st.DataObject
) -> None:
    table = shuffle.pairs_to_table(keys, draw_values(data, elements, len(keys)))
    run = shuffle.encode_run(table)
    assert run[:7] == b"KMRRUN\x01"
    decoded = shuffle.decode_run(run)
    assert decoded.equals(table, check_metadata=True)
    assert decoded.schema.field("key").metadata == table.schema.field("key").metadata


RUN = shuffle.encode_run(shuffle.pairs_to_table(["apple", "pear", "apple"], [{"n": 1}, None, [2]]))


@PROPERTY
@given(st.integers(0, len(RUN) - 1), st.integers(1, 255))
def test_any_flipped_byte_is_detected(position: int, mask: int) -> None:
    damaged = bytearray(RUN)
    damaged[position] ^= mask
    with pytest.raises(CorruptRunError):
        shuffle.decode_run(bytes(damaged))


@PROPERTY
@given(st.integers(0, len(RUN) - 1))
def test_any_truncation_is_detected(length: int) -> None:
    with pytest.raises(CorruptRunError):
        shuffle.decode_run(RUN[:length])


def test_corrupt_run_messages() -> None:
    with pytest.raises(CorruptRunError, match="truncated"):
        shuffle.decode_run(RUN[:10])
    with pytest.raises(CorruptRunError, match="not a kubemr run"):
        shuffle.decode_run(b"PARQUET" + RUN[6:])
    with pytest.raises(CorruptRunError, match="version 2"):
        shuffle.decode_run(RUN[:6] + b"\x02" + RUN[7:])
    with pytest.raises(CorruptRunError, match="truncated or padded"):
        shuffle.decode_run(RUN + b"\x00")
    with pytest.raises(CorruptRunError, match="checksum"):
        shuffle.decode_run(RUN[:-1] + bytes([RUN[-1] ^ 1]))


# --------------------------------------------------------------------------- text is bytes


def test_undecodable_str_is_its_bytes_on_both_sides_of_the_shuffle() -> None:
    rng = random.Random(7)
    raw = [rng.randbytes(rng.randrange(1, 6)) for _ in range(300)] + [b"caf\xe9", b"plain"]
    words = [w.decode("utf-8", "surrogateescape") for w in raw]
    # One map's keys all valid UTF-8 (plain utf8 column), another's not: they must agree.
    valid = [w for w in words if w.isascii()]
    runs = [shuffle.pairs_to_table(valid, 1), shuffle.pairs_to_table(words, 1)]
    assert runs[0].schema.field("key").type == pa.string()
    assert runs[1].schema.field("key").metadata == {b"kubemr.codec": b"str"}
    for run, emitted in zip(runs, (valid, words), strict=True):
        assert shuffle.to_python(run.column("key"), shuffle.column_kind(run, "key")) == emitted
        expected = [fnv1a64(w.encode("utf-8", "surrogateescape")) for w in emitted]
        assert shuffle.stable_hash(run.column("key")).tolist() == expected
    merged = shuffle.merge_runs([shuffle.combine(r, "count") for r in runs], "count")
    counts: dict[bytes, int] = defaultdict(int)
    for word in valid + words:
        counts[word.encode("utf-8", "surrogateescape")] += 1
    groups = list(shuffle.iter_groups(merged))
    assert [k.encode("utf-8", "surrogateescape") for k, _ in groups] == sorted(counts)
    assert {k: v for k, (v,) in groups} == {
        w.decode("utf-8", "surrogateescape"): n for w, n in counts.items()
    }
    values = shuffle.iter_groups(shuffle.pairs_to_table(["k"] * 2, ["caf\udce9", "x"]))
    assert list(values) == [("k", ["caf\udce9", "x"])]


def test_mixed_numbers_keep_their_types_through_built_in_folds() -> None:
    first = shuffle.combine(shuffle.pairs_to_table(["a", "b", "c"], [1, 2, 0.5]), "sum")
    second = shuffle.combine(shuffle.pairs_to_table(["a", "b"], [2, 0.25]), "sum")
    merged = dict(
        (k, v) for k, (v,) in shuffle.iter_groups(shuffle.merge_runs([first, second], "sum"))
    )
    assert merged == {"a": 3, "b": 2.25, "c": 0.5} and type(merged["a"]) is int
    lowest = shuffle.combine(shuffle.pairs_to_table(["a", "a"], [3, 2.5]), "min")
    assert column(lowest, "value") == [2.5]
    with pytest.raises(ShuffleError, match=r"combiner 'sum' cannot fold the values of key 'a'"):
        shuffle.combine(shuffle.pairs_to_table(["a", "a"], [1, "x"]), "sum")
