"""Result formats against plain-Python references: every kind, every format, both directions.

Pure code: tables are built with the shuffle, encoded with kubemr_async.formats, and read
back with formats.decode and, for parquet, with pyarrow.parquet as another tool would.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubemr_async import formats, shuffle
from kubemr_async.formats import FormatError
from kubemr_async.spec import OUTPUT_FORMATS, OutputFormat

LATIN1 = "Café crème, naïve façade; déjà vu. Ça va? ÉTÉ été été\n".encode("latin-1")


def ref_text(value: Any) -> bytes:
    """The documented text rendering of one value, whatever shares its column."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, bytes):
        return value
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, float):
        return repr(value).encode()
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def as_json(value: Any) -> Any:
    """What a value reads back as from JSON: bytes as surrogateescape str, tuples as lists."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, list | tuple):
        return [as_json(v) for v in value]
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    return value


def table(keys: list[Any], values: list[Any]) -> shuffle.Table:
    return shuffle.pairs_to_table(keys, values)


def same(a: Any, b: Any) -> bool:
    """Equality that also checks types (1 vs 1.0 vs True) and treats NaN as equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


# Every kind as values, with str keys (and some keys of every kind further down).
VALUE_COLUMNS: dict[str, list[Any]] = {
    "str": ["plain", "café", "true", "1", "tab\tinside", ""],
    "strbytes": ["caf\udce9", "ok", "\udcff\udcfe"],
    "bytes": [b"raw", b"caf\xe9", b"\x00\xff", b""],
    "int": [0, -1, 2**63 - 1, -(2**63)],
    "float": [1.0, -0.0, 1e-05, 1e16, 0.1, 2.5],
    "bool": [True, False],
    "json": [None, [1, "a"], {"b": [True, None], "a": 1}, []],
    "mixed": [1, 2.5, "true", True, None, [1], "caf\udce9", 7],
}


@pytest.mark.parametrize("kind", sorted(VALUE_COLUMNS))
def test_text_renders_every_value_by_its_own_type(kind: str) -> None:
    values = VALUE_COLUMNS[kind]
    keys = [f"k{i}" for i in range(len(values))]
    data = formats.encode(table(keys, values), "text")
    assert data == b"".join(k.encode() + b"\t" + ref_text(v) + b"\n"
                            for k, v in zip(keys, values, strict=True))
    decoded = list(formats.decode(data, "text"))
    assert decoded == [(k, ref_text(v).decode("utf-8", "surrogateescape"))
                       for k, v in zip(keys, values, strict=True)]


@pytest.mark.parametrize("kind", sorted(VALUE_COLUMNS))
def test_jsonl_round_trips_every_value(kind: str) -> None:
    values = VALUE_COLUMNS[kind]
    keys = [f"k{i}" for i in range(len(values))]
    data = formats.encode(table(keys, values), "jsonl")
    lines = data.splitlines()
    assert len(lines) == len(values)
    # Python's json reads every line, and the undecodable bytes come back exactly.
    for line, key, value in zip(lines, keys, values, strict=True):
        assert same(json.loads(line), [key, as_json(value)])
    decoded = list(formats.decode(data, "jsonl"))
    assert all(same(list(got), [k, as_json(v)])
               for got, k, v in zip(decoded, keys, values, strict=True))


@pytest.mark.parametrize("kind", sorted(set(VALUE_COLUMNS) - {"strbytes", "mixed"}))
def test_parquet_round_trips_typed_values(kind: str) -> None:
    values = VALUE_COLUMNS[kind]
    keys = [f"k{i}" for i in range(len(values))]
    data = formats.encode(table(keys, values), "parquet")
    decoded = list(formats.decode(data, "parquet"))
    expected = [as_json(v) if kind == "json" else v for v in values]
    assert all(same(got, (k, v)) or (got[0] == k and same(got[1], v))
               for got, k, v in zip(decoded, keys, expected, strict=True))
    # Another reader sees plain Arrow types; JSON values are JSON text.
    read = pq.read_table(io.BytesIO(data))
    assert read.schema.field("key").type == pa.string()
    arrow_types = {"str": pa.string(), "bytes": pa.binary(), "int": pa.int64(),
                   "float": pa.float64(), "bool": pa.bool_(), "json": pa.string()}
    assert read.schema.field("value").type == arrow_types[kind]
    if kind == "json":
        assert [json.loads(t) for t in read.column("value").to_pylist()] == expected


def test_parquet_mixed_values_keep_their_types() -> None:
    values = [v for v in VALUE_COLUMNS["mixed"] if v != "caf\udce9"]
    data = formats.encode(table([f"k{i}" for i in range(len(values))], values), "parquet")
    got = [v for _, v in formats.decode(data, "parquet")]
    assert all(same(g, as_json(v)) for g, v in zip(got, values, strict=True))


@pytest.mark.parametrize("keys", [
    [1, -5, 2**62], [0.5, -0.0, 1e16], [True, False], [b"k\xff", b"a"], [(1, "a"), None],
])
@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_keys_of_every_kind(keys: list[Any], fmt: OutputFormat) -> None:
    data = formats.encode(table(keys, 1), fmt)
    decoded = list(formats.decode(data, fmt))
    # Float keys are canonical (-0.0 is 0.0), so that equal keys group together.
    keys = [k + 0.0 if isinstance(k, float) else k for k in keys]
    if fmt == "text":
        expected: list[Any] = [ref_text(k).decode("utf-8", "surrogateescape") for k in keys]
    else:
        expected = [as_json(k) for k in keys]
    if fmt == "parquet" and isinstance(keys[0], bytes):
        expected = keys
    assert [k for k, _ in decoded] == expected


def test_rendering_does_not_depend_on_neighbours() -> None:
    """A value prints the same alone and in a column its neighbours made mixed (JSON)."""
    alone = [formats.encode(table(["k"], [v]), "text") for v in VALUE_COLUMNS["mixed"]]
    together = formats.encode(
        table(["k"] * len(VALUE_COLUMNS["mixed"]), VALUE_COLUMNS["mixed"]), "text"
    )
    assert together == b"".join(alone)
    assert b"k\ttrue\n" in together and b"k\t1\n" in together and b'"' not in together
    # Across maps: an int from one table, a float from another, a str from a third.
    merged = shuffle.merge_runs([table(["a"], [1]), table(["b"], [0.5]), table(["c"], ["1"])],
                                None)
    assert formats.encode(merged, "text") == b"a\t1\nb\t0.5\nc\t1\n"
    assert [v for _, v in formats.decode(formats.encode(merged, "jsonl"), "jsonl")] == [
        1, 0.5, "1"]


@pytest.mark.parametrize(("keys", "values", "message"), [
    (["a\tb"], [1], r"key 'a\\tb' contains a TAB"),
    (["a\nb"], [1], r"key 'a\\nb' contains a newline \(LF\)"),
    ([b"x\ty"], [1], r"key b'x\\ty' contains a TAB"),
    (["k"], ["two\nlines"], r"the value of key 'k' contains a newline \(LF\)"),
    (["k", "j"], [1, "mixed\nlines"], r"the value of key 'j' contains a newline"),
])
def test_text_refuses_tabs_and_newlines_naming_the_key(keys: list[Any], values: list[Any],
                                                       message: str) -> None:
    with pytest.raises(FormatError, match=message) as caught:
        formats.encode(table(keys, values), "text")
    assert "use --format jsonl or parquet" in str(caught.value)
    assert "\n" not in str(caught.value)
    # The other two formats hold them exactly.
    data = formats.encode(table(keys, values), "parquet")
    assert list(formats.decode(data, "parquet")) == list(zip(keys, values, strict=True))
    data = formats.encode(table(keys, values), "jsonl")
    assert list(formats.decode(data, "jsonl")) == [(as_json(k), v)
                                                    for k, v in zip(keys, values, strict=True)]


def test_a_tab_in_a_value_is_fine_in_text() -> None:
    data = formats.encode(table(["k"], ["a\tb"]), "text")
    assert data == b"k\ta\tb\n"
    assert list(formats.decode(data, "text")) == [("k", "a\tb")]


def test_jsonl_refuses_non_finite_floats_naming_the_key() -> None:
    for values in ([math.nan], [math.inf], [[1, -math.inf]], [1, math.nan]):
        with pytest.raises(FormatError, match=r"the value of key 'k\d' is not a finite number"):
            formats.encode(table([f"k{i}" for i in range(len(values))], values), "jsonl")
    with pytest.raises(FormatError, match=r"key nan is not a finite number"):
        formats.encode(table([math.nan], [1]), "jsonl")
    # text and parquet hold NaN.
    assert formats.encode(table(["k"], [math.nan]), "text") == b"k\tnan\n"
    (got,) = formats.decode(formats.encode(table(["k"], [math.nan]), "parquet"), "parquet")
    assert math.isnan(got[1])


def test_parquet_refuses_undecodable_str_naming_the_key() -> None:
    with pytest.raises(FormatError, match=r"key 'caf\\udce9' holds bytes that are not UTF-8"):
        formats.encode(table(["caf\udce9"], [1]), "parquet")
    with pytest.raises(FormatError, match=r"the value of key 'k' holds bytes that are not UTF"):
        formats.encode(table(["k"], ["\udcff"]), "parquet")


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_empty_parts(fmt: OutputFormat) -> None:
    assert list(formats.decode(formats.encode(table([], []), fmt), fmt)) == []


def test_part_names() -> None:
    assert formats.part_name(0, "text") == "part-00000"
    assert formats.part_name(12, "jsonl") == "part-00012.jsonl"
    assert formats.part_name(3, "parquet") == "part-00003.parquet"
    with pytest.raises(ValueError, match="unknown output format 'csv'"):
        formats.part_name(0, "csv")  # type: ignore[arg-type]


@pytest.mark.parametrize("source", ["latin1", "random"])
@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_text_mode_words_round_trip_byte_exact(source: str, fmt: OutputFormat) -> None:
    """What a text-mode map sees (surrogateescape str) comes out as the input's bytes."""
    data = LATIN1 * 3 if source == "latin1" else random.Random(5).randbytes(20_000)
    reference = Counter(data.split())
    words = [w.decode("utf-8", "surrogateescape") for w in data.split()]
    counted = shuffle.merge_runs([shuffle.combine(table(words, 1), "count")], "count")
    if fmt == "parquet" and any(not w.isascii() for w in words):
        with pytest.raises(FormatError, match="not UTF-8"):
            formats.encode(counted, fmt)
        return
    got = {k.encode("utf-8", "surrogateescape"): int(v)
           for k, v in formats.decode(formats.encode(counted, fmt), fmt)}
    assert got == reference
    if fmt == "text":
        lines = formats.encode(counted, fmt).splitlines()
        assert sorted(lines) == sorted(w + b"\t" + str(n).encode() for w, n in reference.items())


@pytest.mark.parametrize("values", [[1, 2.5, None], [1.5, math.nan, 2.0]])
def test_printable_shows_a_parquet_part_as_json_lines(values: list[Any]) -> None:
    table = shuffle.pairs_to_table(["a", "b", "c"], values)
    printed = formats.printable(formats.encode(table, "parquet"), "parquet")
    lines = [json.loads(line) for line in printed.decode().splitlines()]
    expected = [[k, v] for k, v in zip(["a", "b", "c"], values, strict=True)]
    assert [k for k, _ in lines] == ["a", "b", "c"]
    for (_, got), (_, want) in zip(lines, expected, strict=True):
        assert got == want or (math.isnan(got) and math.isnan(want))
    text = formats.encode(table, "text") if not any(
        isinstance(v, float) and math.isnan(v) for v in values) else b"a\t1\n"
    assert formats.printable(text, "text") == text, "text parts print as they are"


def test_a_manifest_reads_back_as_written_and_anything_else_says_why() -> None:
    written = formats.manifest("wc", "jsonl", ["s3://b/p/part-00000.jsonl"],
                               ["part-00000.jsonl"], [17], rows=3)
    assert formats.read_manifest(written) == formats.Manifest("wc", "jsonl",
                                                              ("part-00000.jsonl",), (17,))
    older = b'{"job": "x", "parts": ["part-00000"]}'  # written before sizes were recorded
    assert formats.read_manifest(older) == formats.Manifest("x", "text", ("part-00000",))
    for data, reason in [(b"{", "not JSON"), (b"[]", "no job name"),
                         (b'{"job": "x", "format": "csv", "parts": []}', "unknown format"),
                         (b'{"job": "x", "parts": "part-00000"}', "not a list of names"),
                         (b'{"job": "x", "parts": ["p"], "sizes": [1, 2]}', "sizes"),
                         (b'{"job": "x", "parts": ["p"], "sizes": [-1]}', "sizes"),
                         (b'{"job": "x", "parts": ["p"], "sizes": [true]}', "sizes")]:
        with pytest.raises(ValueError, match=reason):
            formats.read_manifest(data)
