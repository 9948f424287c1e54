"""Vectorized shuffle: split, partition, sort, group, combine and the intermediate run format.

Everything here is pure (bytes in, bytes out; no network, no disk) and works on Arrow
columns, so the per-record cost is paid in C, not in the Python interpreter. A shuffle
table has two columns, ``key`` and ``value``. Each column has one *kind*:

=========  ==================  ===========================================================
kind       Arrow type          Python values
=========  ==================  ===========================================================
str        utf8                ``str`` that is valid Unicode
strbytes   binary + metadata   ``str`` holding undecodable bytes (see "Text is bytes")
bytes      binary              ``bytes``
int        int64               ``int`` in the int64 range
float      float64             ``float``
bool       bool                ``bool``
json       binary + metadata   ``None``, ``list``, ``tuple``, ``dict`` with str keys, nested;
                               and values of mixed kinds, each keeping its own type
=========  ==================  ===========================================================

JSON values are stored as their orjson encoding with sorted keys (equal dicts give equal
bytes, so they group and hash alike) and the field carries ``{b"kubemr.codec": b"json"}``
so readers turn them back into Python objects. A column with no rows has Arrow type null
and takes the kind of whatever it is concatenated with.

Values of different kinds in one column (e.g. ``1`` and ``0.5``, or ``1`` and ``"x"``) become
the JSON kind rather than being promoted: an int stays an int next to floats, so a value
reads back, and prints, the same whatever shares its column. The built-in ``sum``/``min``/
``max`` fold such columns with Python's own ``sum``/``min``/``max`` per key (slower, but
exact: a key whose values are all ints sums to an int). Bytes do not mix with other kinds
(JSON has no bytes), and keys never mix (they would have no common order).

Text is bytes
-------------
The map's default input is the split decoded as UTF-8 with ``surrogateescape``, so text
that is not UTF-8 reaches user code as a str holding U+DC80..U+DCFF code points. Everywhere
in the shuffle a str *is* its bytes under that one rule, ``str_to_bytes``/``bytes_to_str``
(UTF-8, ``surrogateescape``): such a str is a valid key or value, travels as those bytes
(kind ``strbytes``: binary with ``{b"kubemr.codec": b"str"}``), hashes and sorts exactly as
those bytes (so a word lands in the same partition and order whether or not the map that
emitted it also saw undecodable text), and comes back to reduce callbacks as the same
str. Valid-UTF-8 str columns keep the plain utf8 type and never go through per-item
Python; only a column Arrow rejects is encoded item by item. Any other lone surrogate,
or escapes of bytes that would decode to something else (a str no decoding produces), is
an error naming the value. Inside JSON values such a str is written with ``\\udcXX``
escapes (Python's ``json`` reads them back; orjson refuses them, so it falls back).

Run format (version 1)
----------------------
A run is a checksummed, self-describing piece of a sorted table: one *block* of a shuffle
object (below), a spill's block on local scratch, or a block of a streamed result part::

    offset  size  field
    0       6     magic b"KMRRUN"
    6       1     format version, 1
    7       8     payload length, uint64 little-endian
    15      4     CRC32 (zlib.crc32) of the payload, uint32 little-endian
    19      n     payload: an Arrow IPC stream (schema with field metadata + batches),
                  buffers compressed with lz4 or zstd

The IPC stream is self-describing, so a reader needs nothing but the bytes. The length and
CRC catch truncated or damaged objects before Arrow parses them; a damaged run raises
:class:`CorruptRunError`; the reduce that read it hands its claim back and re-opens the
map task that wrote it (``protocol.reopen``), which re-runs as a new attempt under new keys.

The codec is lz4 by default, zstd on request (``encode_run(table, compression=...)``).
Measured on a 16 MiB word-count map (``benchmarks/bench_shuffle.py``): lz4 costs ~3 ms of
encode + decode and shrinks the runs by 30%; zstd costs ~5-9 ms more and shrinks them by
58%, which wins only when storage moves bytes slower than ~300-500 MB/s (S3 over a
network, not local disk). No compression saves ~2 ms and writes 40% more bytes.

Shuffle object (format 1)
-------------------------
A map attempt writes ONE shuffle object, whatever the number of reducers (Spark's
sort-based shuffle): M objects instead of M x R, and a task record that names one key::

    blocks of partition 0 | blocks of partition 1 | ... | index | footer

Every partition's rows are contiguous and sorted by key, cut into *blocks*, each a run as
above (so each block carries its own length and CRC); a partition's blocks follow each
other in key order. The index has one entry per partition, ``SLICE_ENTRY`` (offset,
length, rows, CRC32 of the slice's bytes, and a CRC32 of the entry itself together with
its partition and the object's size, so a misplaced or stale read cannot pass). The
footer is fixed-size: magic ``b"KMRSHF"``, version, partitions, index offset. A reducer
that knows the object's size (recorded at commit) and R reads its own entry with one
32-byte ranged GET (:func:`entry_range`), then its slice with ranged GETs.

Merging sorted streams
----------------------
Sorted slices and spills are merged by ``merge.merge_sorted`` (a vectorized k-way merge)
and folded by ``merge.fold_sorted``; this module gives them :func:`sort_by_key`,
:func:`combine` and the run format.

Why the partition hash is our own
---------------------------------
Every map task must send a key to the same reducer, whichever process, machine or library
version computed it. Python's ``hash()`` of str is salted per process, and the hashes in
numpy, pyarrow and polars are internal details that change between releases. So keys are
hashed with FNV-1a 64 over a documented canonical byte form (see :func:`stable_hash`),
computed with numpy so that it stays vectorized.
"""

from __future__ import annotations

import json
import math
import reprlib
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeAlias

import numpy as np
import numpy.typing as npt
import orjson
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "RUN_HEADER_SIZE",
    "SLICE_ENTRY",
    "Combiner",
    "CorruptRunError",
    "Kind",
    "RunCompression",
    "ShuffleBudget",
    "ShuffleError",
    "SliceEntry",
    "Table",
    "blocks",
    "bytes_to_str",
    "column_kind",
    "combine",
    "concat_tables",
    "decode_entry",
    "decode_run",
    "dump_json",
    "encode_index",
    "encode_run",
    "entry_range",
    "group_starts",
    "is_non_finite",
    "iter_groups",
    "key_type",
    "kind_name",
    "load_json",
    "merge_combiner",
    "merge_runs",
    "pairs_to_table",
    "partition",
    "partition_for",
    "partition_ids",
    "prefix_order",
    "run_length",
    "sort_by_key",
    "split_words",
    "stable_hash",
    "str_to_bytes",
    "to_python",
]

Table: TypeAlias = pa.Table
Combiner = Literal["sum", "count", "min", "max"]
RunCompression = Literal["lz4", "zstd"] | None
_Kind = Literal["str", "strbytes", "bytes", "int", "float", "bool", "json", "null"]
Kind: TypeAlias = _Kind
_Role = Literal["key", "value"]


class ShuffleError(ValueError):
    """A key or value cannot be shuffled (unsupported type, mixed key types, out of range)."""


class CorruptRunError(ValueError):
    """An intermediate run failed its magic, version, length or checksum check."""


_CODEC = b"kubemr.codec"
_JSON_METADATA = {_CODEC: b"json"}
_STR_METADATA = {_CODEC: b"str"}
# Datetimes and dataclasses would encode as strings/objects and decode as something else,
# so make orjson reject them like any other unsupported type.
_JSON_OPTIONS = (
    orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
)

_ARROW_TYPES: dict[_Kind, pa.DataType] = {
    "str": pa.string(),
    "strbytes": pa.binary(),
    "bytes": pa.binary(),
    "json": pa.binary(),
    "int": pa.int64(),
    "float": pa.float64(),
    "bool": pa.bool_(),
    "null": pa.null(),
}
_KIND_NAMES: dict[_Kind, str] = {
    "str": "str",
    "strbytes": "str",
    "bytes": "bytes",
    "json": "JSON value",
    "int": "int",
    "float": "float",
    "bool": "bool",
    "null": "null",
}

_SHORT = reprlib.Repr()
_SHORT.maxstring = 40
_SHORT.maxother = 40

_INT32_MAX = 2**31 - 1

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_MASK64 = 0xFFFFFFFFFFFFFFFF
# Below this many strings still being hashed, one numpy call per byte position costs more
# than finishing those strings in plain Python.
_PYTHON_TAIL = 32

# Rows checked for duplicate keys before choosing how to hash and sort strings.
_DUPLICATE_SAMPLE = 1024

_MAGIC = b"KMRRUN"
_VERSION = 1
_HEADER = struct.Struct("<6sBQI")


# --------------------------------------------------------------------------- text is bytes


def str_to_bytes(text: str) -> bytes:
    """A str's bytes under the shuffle's one rule: UTF-8 with ``surrogateescape``.

    Raises ShuffleError for a str no decoding produces: a lone surrogate outside
    U+DC80..U+DCFF, or escapes of bytes that decode to other characters.
    """
    try:
        return text.encode()
    except UnicodeEncodeError:
        pass
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise ShuffleError(f"str is not serialisable: {_SHORT.repr(text)} ({exc.reason})") from exc
    if data.decode("utf-8", "surrogateescape") != text:
        raise ShuffleError(
            f"str is not serialisable: {_SHORT.repr(text)} (its surrogate escapes form "
            "valid UTF-8, so no bytes decode to it)"
        )
    return data


def bytes_to_str(data: bytes) -> str:
    """The inverse of :func:`str_to_bytes`: UTF-8 with ``surrogateescape``; never fails."""
    return data.decode("utf-8", "surrogateescape")


def dump_json(obj: Any) -> bytes:
    """The canonical JSON bytes of a value: orjson, sorted keys; ShuffleError if impossible.

    orjson refuses lone surrogates and silently writes NaN/Infinity as null, so values with
    either go through Python's json instead (``\\udcXX`` escapes, ``NaN``), which
    :func:`load_json` reads back to the same value.
    """
    try:
        encoded: bytes = orjson.dumps(obj, option=_JSON_OPTIONS)
    except orjson.JSONEncodeError as exc:
        if "surrogates" not in str(exc):
            raise ShuffleError(f"{_SHORT.repr(obj)} ({exc})") from exc
        return _python_json(obj)
    if b"null" in encoded and is_non_finite(obj):
        return _python_json(obj)
    return encoded


def load_json(data: bytes | str) -> Any:
    """Decode what :func:`dump_json` wrote."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def _python_json(obj: Any) -> bytes:
    _check_plain(obj)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _check_plain(obj: Any) -> None:
    """Python's json would quietly turn int dict keys into str; orjson's rules apply."""
    if isinstance(obj, str):
        str_to_bytes(obj)
    elif isinstance(obj, list | tuple):
        for item in obj:
            _check_plain(item)
    elif isinstance(obj, dict):
        for key, item in obj.items():
            if not isinstance(key, str):
                raise ShuffleError(f"{_SHORT.repr(obj)} (dict key must be str)")
            _check_plain(key)
            _check_plain(item)
    elif not (obj is None or isinstance(obj, bool | int | float)):
        raise ShuffleError(f"{_SHORT.repr(obj)} (type {type(obj).__name__})")


def is_non_finite(obj: Any) -> bool:
    """Whether a value is, or holds, a NaN or infinite float (JSON has neither)."""
    if isinstance(obj, float):
        return not math.isfinite(obj)
    if isinstance(obj, list | tuple):
        return any(is_non_finite(item) for item in obj)
    if isinstance(obj, dict):
        return any(is_non_finite(item) for item in obj.values())
    return False


# --------------------------------------------------------------------------- tokenising


def split_words(data: bytes) -> pa.Array:
    """Exactly the tokens of ``data.split()`` as an Arrow binary array.

    Words are maximal runs of bytes other than ASCII whitespace (space, \\t, \\n, \\r,
    \\x0b, \\x0c); bytes are kept as they are, valid UTF-8 or not.
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size > _INT32_MAX:
        raise ShuffleError(f"split_words takes chunks below 2 GiB, got {raw.size} bytes")
    # A non-word byte on either side makes every word start and end at an edge.
    padded = np.zeros(raw.size + 2, dtype=np.bool_)
    word = padded[1:-1]
    # The six ASCII whitespace bytes are 9..13 and 32; uint8 wrap-around makes 9..13 one
    # comparison, which is cheaper than a 256-entry lookup table.
    np.greater(raw - np.uint8(9), np.uint8(4), out=word)
    word &= raw != np.uint8(32)
    flags = padded.view(np.int8)
    edges = np.flatnonzero(flags[1:] != flags[:-1])
    offsets = np.zeros(edges.size // 2 + 1, dtype=np.int32)
    np.cumsum(edges[1::2] - edges[0::2], out=offsets[1:])
    mask = pa.Array.from_buffers(
        pa.bool_(), raw.size, [None, pa.py_buffer(np.packbits(word, bitorder="little"))]
    )
    # Arrow's filter compacts bytes about twice as fast as numpy boolean indexing.
    letters = pc.filter(pa.array(raw), mask).to_numpy()
    return pa.Array.from_buffers(
        pa.binary(), offsets.size - 1, [None, pa.py_buffer(offsets), pa.py_buffer(letters)]
    )


# --------------------------------------------------------------------------- building tables


def pairs_to_table(keys: Any, values: Any) -> Table:
    """Build a shuffle table from keys and values (or one value for every key).

    ``keys`` is a Python sequence, a numpy array or an Arrow array. ``values`` is the same
    or a single scalar; lists, tuples, ranges and arrays are taken as one value per key.
    """
    if isinstance(keys, str | bytes | bytearray) or not _is_column(keys, allow_sequence=True):
        raise ShuffleError(f"keys must be a sequence or an array, got {type(keys).__name__}")
    key_array, key_kind = _column(keys, "key")
    if key_kind == "float":
        key_array = pa.array(_canonical_floats(key_array.to_numpy()))
    if _is_column(values, allow_sequence=False):
        value_array, value_kind = _column(values, "value")
        if len(value_array) != len(key_array):
            raise ShuffleError(f"got {len(key_array)} keys but {len(value_array)} values")
    else:
        value_array, value_kind = _broadcast(values, len(key_array))
    return _make_table(key_array, key_kind, value_array, value_kind)


def text_table(keys: pa.Array, values: pa.Array) -> Table:
    """Text keys and values given as Arrow binary arrays (a shell command's output) as a
    table of str: a column of valid UTF-8 is ``str``, any other keeps its bytes as a str
    holding undecodable bytes (``strbytes``, "Text is bytes"), so no byte is lost."""
    columns: list[tuple[pa.Array, _Kind]] = []
    for array in (keys, values):
        try:
            columns.append((array.cast(pa.string()), "str"))
        except pa.ArrowInvalid:  # Arrow validates UTF-8 when it casts binary to string
            columns.append((array, "strbytes"))
    (key_array, key_kind), (value_array, value_kind) = columns
    return _make_table(key_array, key_kind, value_array, value_kind)


def concat_tables(tables: Sequence[Table]) -> Table:
    """Concatenate shuffle tables.

    Values of different kinds (other than bytes) become JSON, each keeping its type; keys
    of different kinds are an error because they have no common order. A str column with
    undecodable bytes turns the others' str columns into bytes of the same rule.
    """
    if not tables:
        return _make_table(pa.nulls(0), "null", pa.nulls(0), "null")
    key_kinds = [_kind(t.schema.field("key")) for t in tables]
    value_kinds = [_kind(t.schema.field("value")) for t in tables]
    key_kind = _unify(key_kinds, "key")
    value_kind = _unify(value_kinds, "value")
    schema = _schema(key_kind, value_kind)
    parts = [
        pa.table(
            [
                _convert(t.column("key"), k, key_kind),
                _convert(t.column("value"), v, value_kind),
            ],
            schema=schema,
        )
        for t, k, v in zip(tables, key_kinds, value_kinds, strict=True)
    ]
    return pa.concat_tables(parts)


def _is_column(obj: Any, *, allow_sequence: bool) -> bool:
    if isinstance(obj, pa.Array | pa.ChunkedArray | list | tuple | range):
        return True
    if isinstance(obj, np.ndarray):
        return obj.ndim > 0
    return allow_sequence and isinstance(obj, Sequence)


def _column(obj: Any, role: _Role) -> tuple[pa.Array, _Kind]:
    if isinstance(obj, pa.ChunkedArray):
        obj = single_array(obj)
    if isinstance(obj, pa.Array):
        return _from_arrow(obj, role)
    if isinstance(obj, np.ndarray):
        return _from_numpy(obj, role)
    return _from_python(list(obj), role)


def _from_arrow(array: pa.Array, role: _Role) -> tuple[pa.Array, _Kind]:
    kind = _arrow_kind(array.type)
    if array.null_count or kind is None:
        return _from_python(array.to_pylist(), role)
    if pa.types.is_uint64(array.type) and len(array):
        largest = int(pc.max(array).as_py())
        if largest >= 2**63:
            raise _out_of_range(role, largest)
    return array.cast(_ARROW_TYPES[kind]), kind


def _from_numpy(array: npt.NDArray[Any], role: _Role) -> tuple[pa.Array, _Kind]:
    if array.ndim != 1:
        raise ShuffleError(f"{role}s must be one-dimensional, got an array of shape {array.shape}")
    code = array.dtype.kind
    if code == "O":
        return _from_python(array.tolist(), role)
    if code == "u" and array.size and array.max() > np.iinfo(np.int64).max:
        raise _out_of_range(role, int(array.max()))
    conversions: dict[str, tuple[Any, _Kind]] = {
        "b": (np.bool_, "bool"),
        "i": (np.int64, "int"),
        "u": (np.int64, "int"),
        "f": (np.float64, "float"),
    }
    if code in conversions:
        dtype, kind = conversions[code]
        return pa.array(array.astype(dtype, copy=False)), kind
    if code == "U":
        try:
            return pa.array(array, pa.string()), "str"
        except (UnicodeEncodeError, pa.ArrowInvalid):
            return _from_python(array.tolist(), role)
    if code == "S":
        return pa.array(array, pa.binary()), "bytes"
    raise ShuffleError(f"{role} of numpy dtype {array.dtype} is not serialisable")


def _from_python(items: list[Any], role: _Role) -> tuple[pa.Array, _Kind]:
    kinds: dict[type, _Kind] = {}
    for cls in set(map(type, items)):
        kind = _python_kind(cls)
        if kind is None:
            example = next(x for x in items if type(x) is cls)
            raise ShuffleError(
                f"{role} of type {cls.__name__} is not serialisable: {_SHORT.repr(example)}"
            )
        kinds[cls] = kind
    distinct = set(kinds.values())
    if not distinct:
        return pa.nulls(0), "null"
    if len(distinct) == 1:
        (kind,) = distinct
    elif role == "value" and "bytes" not in distinct:
        kind = "json"
    else:
        first, second = _clashing_types(kinds, role)
        a = next(x for x in items if type(x) is first)
        b = next(x for x in items if type(x) is second)
        raise ShuffleError(
            f"{role}s mix types {first.__name__} and {second.__name__} "
            f"({_SHORT.repr(a)} and {_SHORT.repr(b)}); one table holds one {role} type"
        )
    return _encode_python(items, kind, role)


def _clashing_types(kinds: dict[type, _Kind], role: _Role) -> tuple[type, type]:
    """Two types of different kinds to name in the error: for values, bytes and another
    (other value kinds mix, as JSON; only bytes, which JSON cannot hold, clashes)."""
    ordered = sorted(kinds, key=lambda cls: (role == "value" and kinds[cls] != "bytes",
                                             cls.__name__))
    first = ordered[0]
    second = next(cls for cls in ordered if kinds[cls] != kinds[first])
    return first, second


def _python_kind(cls: type) -> _Kind | None:
    # bool before int: bool is an int subclass but a kind of its own.
    if issubclass(cls, bool | np.bool_):
        return "bool"
    if issubclass(cls, int | np.integer):
        return "int"
    if issubclass(cls, float | np.floating):
        return "float"
    if issubclass(cls, str):
        return "str"
    if issubclass(cls, bytes):
        return "bytes"
    if cls is type(None) or issubclass(cls, list | tuple | dict):
        return "json"
    return None


def _encode_python(items: list[Any], kind: _Kind, role: _Role) -> tuple[pa.Array, _Kind]:
    if kind == "json":
        encoded = []
        for item in items:
            try:
                encoded.append(dump_json(item))
            except ShuffleError as exc:
                raise ShuffleError(
                    f"{role} of type {type(item).__name__} is not serialisable: {exc}"
                ) from exc
        return pa.array(encoded, pa.binary()), kind
    try:
        return pa.array(items, _ARROW_TYPES[kind]), kind
    except UnicodeEncodeError:
        # Undecodable bytes kept by surrogateescape (module docstring: "Text is bytes").
        return _str_bytes(items, role), "strbytes"
    except (OverflowError, pa.ArrowInvalid) as exc:
        if kind == "int":
            bad = next(x for x in items if not -(2**63) <= x < 2**63)
            raise _out_of_range(role, int(bad)) from exc
        if kind != "float":
            raise
    # Arrow refuses ints that a float64 cannot hold exactly; Python rounds them.
    floats = []
    for item in items:
        try:
            floats.append(float(item))
        except OverflowError as exc:
            raise ShuffleError(
                f"{role} of type int is too large for a float: {_SHORT.repr(item)}"
            ) from exc
    return pa.array(floats, pa.float64()), kind


def _str_bytes(items: list[str], role: _Role) -> pa.Array:
    encoded = []
    for item in items:
        try:
            encoded.append(str_to_bytes(item))
        except ShuffleError as exc:
            raise ShuffleError(f"{role} of type {exc}") from exc
    return pa.array(encoded, pa.binary())


def _out_of_range(role: _Role, number: int) -> ShuffleError:
    return ShuffleError(f"{role} of type int is out of the int64 range: {_SHORT.repr(number)}")


def _broadcast(value: Any, length: int) -> tuple[pa.Array, _Kind]:
    if isinstance(value, np.ndarray):
        value = value.item()
    one, kind = _from_python([value], "value")
    return pa.repeat(one[0], length), kind


def _canonical_floats(numbers: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    # Equal keys must have equal bits, or they would group, sort and hash apart: -0.0
    # becomes 0.0 and every NaN numpy's one quiet NaN.
    canonical = numbers.copy()
    canonical[canonical == 0] = 0.0
    canonical[np.isnan(canonical)] = np.nan
    return canonical


def _arrow_kind(arrow_type: pa.DataType) -> _Kind | None:
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "str"
    if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type):
        return "bytes"
    if pa.types.is_integer(arrow_type):
        return "int"
    if pa.types.is_floating(arrow_type):
        return "float"
    if pa.types.is_boolean(arrow_type):
        return "bool"
    return None


def _kind(field: pa.Field) -> _Kind:
    if pa.types.is_null(field.type):
        return "null"
    codec = field.metadata.get(_CODEC) if field.metadata else None
    if codec == b"json":
        return "json"
    if codec == b"str":
        return "strbytes"
    kind = _arrow_kind(field.type)
    if kind is None:
        raise ShuffleError(f"column {field.name!r} has unsupported Arrow type {field.type}")
    return kind


def _field(name: _Role, kind: _Kind) -> pa.Field:
    metadata = {"json": _JSON_METADATA, "strbytes": _STR_METADATA}.get(kind)
    return pa.field(name, _ARROW_TYPES[kind], metadata=metadata)


def column_kind(table: Table, role: _Role) -> _Kind:
    """The kind of a shuffle table's ``key`` or ``value`` column."""
    return _kind(table.schema.field(role))


def kind_name(kind: _Kind) -> str:
    """The Python type a kind holds, as messages name it (``str`` for both str kinds)."""
    return _KIND_NAMES[kind]


def key_type(table: Table) -> str | None:
    """The Python type name of a table's keys (None when it has no rows to say)."""
    kind = column_kind(table, "key")
    return None if kind == "null" else _KIND_NAMES[kind]


def _schema(key_kind: _Kind, value_kind: _Kind) -> pa.Schema:
    return pa.schema([_field("key", key_kind), _field("value", value_kind)])


def _make_table(keys: Any, key_kind: _Kind, values: Any, value_kind: _Kind) -> Table:
    return pa.table([keys, values], schema=_schema(key_kind, value_kind))


def _unify(kinds: list[_Kind], role: _Role) -> _Kind:
    distinct = set(kinds) - {"null"}
    if {"str", "strbytes"} <= distinct:
        distinct.discard("str")
    if not distinct:
        return "null"
    if len(distinct) == 1:
        return distinct.pop()
    if role == "value" and "bytes" not in distinct:
        return "json"
    # For values the clash is bytes with any other kind (the others mix, as JSON).
    first, second = sorted(distinct, key=lambda k: (role == "value" and k != "bytes",
                                                     _KIND_NAMES[k]))[:2]
    raise ShuffleError(f"cannot concatenate {role}s of type {_KIND_NAMES[first]} and "
                       f"{_KIND_NAMES[second]}")


def _convert(column: pa.ChunkedArray, source: _Kind, target: _Kind) -> pa.ChunkedArray:
    if source == target:
        return column
    if source == "null" or (source, target) == ("str", "strbytes"):
        return column.cast(_ARROW_TYPES[target])
    return pa.chunked_array([_encode_python(to_python(column, source), "json", "value")[0]])


# --------------------------------------------------------------------------- hashing


def stable_hash(keys: pa.Array | pa.ChunkedArray) -> npt.NDArray[np.uint64]:
    """FNV-1a 64 of each key's canonical bytes, identical on every machine and version.

    Canonical bytes: the UTF-8 (surrogateescape) bytes of a str, the raw bytes of bytes
    and of JSON values,
    8 little-endian bytes of an int64 (two's complement), 8 little-endian bytes of a
    float64 with -0.0 as 0.0 and every NaN as 0x7ff8000000000000, and 1 byte for a bool.
    """
    array = single_array(keys)
    if array.null_count and not pa.types.is_null(array.type):
        raise ShuffleError("cannot hash null keys")
    kind = _arrow_kind(array.type)
    if len(array) == 0:
        return np.zeros(0, dtype=np.uint64)
    if kind in ("str", "bytes"):
        distinct, rows = _distinct_keys(array)
        hashes = _fnv_binary(distinct)
        return hashes if rows is None else hashes[rows]
    if kind == "int":
        return _fnv_words(array.cast(pa.int64()).to_numpy().view(np.uint64))
    if kind == "float":
        numbers = _canonical_floats(array.cast(pa.float64()).to_numpy())
        return _fnv_words(numbers.view(np.uint64))
    if kind == "bool":
        flags = np.asarray(array.to_numpy(zero_copy_only=False), dtype=np.uint64)
        return (_FNV_OFFSET ^ flags) * _FNV_PRIME
    raise ShuffleError(f"cannot hash keys of Arrow type {array.type}")


def partition_ids(keys: pa.Array | pa.ChunkedArray, partitions: int) -> npt.NDArray[np.int64]:
    """The reduce partition of each key: ``stable_hash(keys) % partitions``."""
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    return (stable_hash(keys) % np.uint64(partitions)).astype(np.int64)


def partition_for(key: Any, partitions: int) -> int:
    """The partition of one key, as :func:`partition` assigns it (for low-level jobs)."""
    keys = pairs_to_table([key], None).column("key")
    return int(partition_ids(keys, partitions)[0])


def _fnv_words(words: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    hashes = np.full(words.size, _FNV_OFFSET, dtype=np.uint64)
    for shift in range(0, 64, 8):
        hashes ^= (words >> np.uint64(shift)) & np.uint64(0xFF)
        hashes *= _FNV_PRIME
    return hashes


def _binary_layout(
    array: pa.Array,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    """Start and length of each string in ``data``, read straight from the Arrow buffers."""
    large = pa.types.is_large_binary(array.type) or pa.types.is_large_string(array.type)
    offset_type = np.dtype(np.int64 if large else np.int32)
    _, offset_buffer, data_buffer = array.buffers()
    offsets = np.frombuffer(
        offset_buffer,
        dtype=offset_type,
        count=len(array) + 1,
        offset=array.offset * offset_type.itemsize,
    ).astype(np.int64)
    data = np.frombuffer(data_buffer or b"", dtype=np.uint8)
    return offsets[:-1], np.diff(offsets), data


def _fnv_binary(array: pa.Array) -> npt.NDArray[np.uint64]:
    """Hash all strings at once, one byte position per step.

    Strings are ordered longest first, so the strings still being hashed at position j are
    always a prefix of that order and each step is a few whole-slice numpy operations; total
    work is the total number of bytes plus one step per byte of the longest string.
    """
    n = len(array)
    starts, lengths, data = _binary_layout(array)
    longest = int(lengths.max())
    # Stable argsort of a <= 16-bit key is a radix sort in numpy: much faster than int64.
    sort_key = (longest - lengths).astype(np.uint16) if longest < 2**16 else -lengths
    order = np.argsort(sort_key, kind="stable")
    starts = starts[order]
    sorted_lengths = lengths[order]
    # still[j] = how many strings are longer than j bytes.
    still = n - np.searchsorted(sorted_lengths[::-1], np.arange(longest), side="right")
    hashes = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    position = 0
    while position < longest and still[position] >= _PYTHON_TAIL:
        active = int(still[position])
        head = hashes[:active]
        head ^= data[starts[:active] + position]
        head *= _FNV_PRIME
        position += 1
    if position < longest:
        raw = data.data
        for i in range(int(still[position])):
            value = int(hashes[i])
            begin = int(starts[i])
            for byte in raw[begin + position : begin + int(sorted_lengths[i])]:
                value = ((value ^ byte) * 0x100000001B3) & _MASK64
            hashes[i] = value
    result = np.empty(n, dtype=np.uint64)
    result[order] = hashes
    return result


# --------------------------------------------------------------------------- group, sort, partition


def merge_combiner(combiner: Combiner) -> Combiner:
    """The combiner that merges already-combined values: counts add up, the rest repeat."""
    return "sum" if combiner == "count" else combiner


_COMBINABLE: dict[str, frozenset[_Kind]] = {
    "sum": frozenset({"int", "float", "bool", "json", "null"}),
    "count": frozenset({"str", "strbytes", "bytes", "int", "float", "bool", "json", "null"}),
    "min": frozenset({"str", "strbytes", "bytes", "int", "float", "bool", "json", "null"}),
    "max": frozenset({"str", "strbytes", "bytes", "int", "float", "bool", "json", "null"}),
}
_PYTHON_FOLDS: dict[str, Any] = {"sum": sum, "min": min, "max": max}


def combine(table: Table, combiner: Combiner) -> Table:
    """One row per distinct key, its values folded with ``combiner`` (in arbitrary key order)."""
    if combiner not in _COMBINABLE:
        raise ValueError(f"unknown combiner {combiner!r}; expected one of {sorted(_COMBINABLE)}")
    key_kind = _kind(table.schema.field("key"))
    value_kind = _kind(table.schema.field("value"))
    if value_kind not in _COMBINABLE[combiner]:
        raise ShuffleError(
            f"combiner {combiner!r} does not apply to values of type {_KIND_NAMES[value_kind]}"
        )
    summing_bools = combiner == "sum" and value_kind == "bool"
    result_kind: _Kind = "int" if combiner == "count" or summing_bools else value_kind
    if table.num_rows == 0:
        return _make_table(
            table.column("key"), key_kind, pa.nulls(0, _ARROW_TYPES[result_kind]), result_kind
        )
    if value_kind == "json" and combiner != "count":
        return _combine_python(table, combiner, key_kind)
    if summing_bools:
        table = table.set_column(1, "value", table.column("value").cast(pa.int64()))
    options = pc.CountOptions(mode="all") if combiner == "count" else None
    # One thread: workers already run one process per core, and the single-threaded hash
    # aggregation is both faster here and deterministic in its output order.
    grouped = table.group_by("key", use_threads=False).aggregate([("value", combiner, options)])
    return _make_table(
        grouped.column("key"), key_kind, grouped.column(f"value_{combiner}"), result_kind
    )


def _combine_python(table: Table, combiner: Combiner, key_kind: _Kind) -> Table:
    """Fold mixed-kind (JSON) values per key with Python's sum/min/max (module docstring)."""
    grouped = table.group_by("key", use_threads=False).aggregate([("value", "list")])
    fold = _PYTHON_FOLDS[combiner]
    results = []
    for position, encoded in enumerate(grouped.column("value_list").to_pylist()):
        values = [load_json(item) for item in encoded]
        try:
            results.append(fold(values))
        except TypeError as exc:
            key = to_python(grouped.column("key").slice(position, 1), key_kind)[0]
            raise ShuffleError(
                f"combiner {combiner!r} cannot fold the values of key {_SHORT.repr(key)}: {exc}"
            ) from exc
    values_array, value_kind = _from_python(results, "value")
    return _make_table(grouped.column("key"), key_kind, values_array, value_kind)


def sort_by_key(table: Table) -> Table:
    """Rows ordered by key (bytewise for str/bytes/JSON, numeric for numbers), stable."""
    if table.num_rows < 2:
        return table
    distinct, rows = _distinct_keys(single_array(table.column("key")))
    return _take(table, _sort_order(distinct), distinct, rows)


def in_key_order(table: Table) -> bool:
    """Whether the rows are in key order already, as :func:`sort_by_key` would leave them:
    a user combiner's output usually is, and then needs no sort. One vectorized pass, for
    str and bytes keys (compared bytewise, as they sort); other kinds answer False."""
    keys = single_array(table.column("key"))
    if _arrow_kind(keys.type) not in ("str", "bytes"):
        return False
    if len(keys) < 2:
        return True
    return bool(pc.all(pc.less_equal(keys.slice(0, len(keys) - 1), keys.slice(1))).as_py())


def single_array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A column as one Array; a column of one chunk (what a run decodes to) without a
    copy, which Arrow's ``combine_chunks`` always makes."""
    if not isinstance(column, pa.ChunkedArray):
        return column
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _sort_order(keys: pa.Array) -> npt.NDArray[np.int64]:
    """Stable ascending order of ``keys``."""
    if _arrow_kind(keys.type) in ("str", "bytes"):
        return prefix_order(keys)
    return np.asarray(pc.sort_indices(keys).to_numpy(), dtype=np.int64)


def _distinct_keys(keys: pa.Array) -> tuple[pa.Array, npt.NDArray[np.int64] | None]:
    """The distinct keys and each row's index into them; ``None`` if rows are their own keys.

    Hashing and sorting strings cost per byte and per comparison, so with duplicates (raw
    map output) they run on the distinct strings, found by one hash pass. Combined tables
    are already distinct and skip that pass: a duplicate among the first rows predicts
    many, and a wrong guess costs time, never correctness. Numbers are cheap to hash and
    sort as they are.
    """
    if _arrow_kind(keys.type) not in ("str", "bytes"):
        return keys, None
    sample = keys.slice(0, _DUPLICATE_SAMPLE)
    if pc.count_distinct(sample).as_py() == len(sample):
        return keys, None
    encoded = pc.dictionary_encode(keys)
    return encoded.dictionary, encoded.indices.to_numpy().astype(np.int64)


def _take(
    table: Table,
    order: npt.NDArray[np.int64],
    distinct: pa.Array,
    rows: npt.NDArray[np.int64] | None,
) -> Table:
    """The rows of ``table`` in the ``order`` of their distinct keys, equal keys in input order."""
    if rows is None:
        return table.take(order)
    row_order = _rows_in_order(order, rows)
    # Gathering from the distinct strings stays in cache; gathering the rows' own does not.
    keys = distinct.take(rows[row_order])
    return pa.table([keys, table.column("value").take(row_order)], schema=table.schema)


def _rows_in_order(order: npt.NDArray[np.int64],
                   rows: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The rows (each an index into distinct keys) ordered by the ``order`` of their
    distinct keys, equal keys in row order."""
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    ranks = rank[rows]
    # numpy's stable argsort is a radix sort for 16-bit keys: two passes cover any rank.
    row_order = np.argsort((ranks & 0xFFFF).astype(np.uint16), kind="stable")
    if order.size > 1 << 16:
        high = (ranks >> 16).astype(np.uint16)
        row_order = row_order[np.argsort(high[row_order], kind="stable")]
    return row_order


def key_order(keys: pa.Array) -> npt.NDArray[np.int64]:
    """The stable order of ``keys`` (as :func:`sort_by_key` sorts them), for a caller that
    gathers something other than the keys in that order (whole text lines, say)."""
    distinct, rows = _distinct_keys(keys)
    order = _sort_order(distinct)
    return order if rows is None else _rows_in_order(order, rows)


def prefix_order(strings: pa.Array) -> npt.NDArray[np.int64]:
    """Stable ascending order of strings, fast when few of them share their first 8 bytes.

    Sorting the first eight bytes as big-endian integers orders every pair of strings that
    differ there; only strings sharing their first eight bytes with another go through
    Arrow's comparison sort, with the row number last so that equal strings stay in order.
    """
    prefixes = _prefixes(*_binary_layout(strings))
    order = np.argsort(prefixes)
    ranked = prefixes[order]
    tie = ranked[1:] == ranked[:-1]
    in_tie = np.zeros(len(strings), dtype=np.bool_)
    in_tie[1:] = tie
    in_tie[:-1] |= tie
    tied = np.flatnonzero(in_tie)
    if tied.size:
        run_starts = np.ones(len(strings), dtype=np.bool_)
        run_starts[1:] = ~tie
        members = order[tied]
        tied_rows = pa.table(
            {"run": np.cumsum(run_starts)[tied], "key": strings.take(members), "row": members}
        )
        by = [("run", "ascending"), ("key", "ascending"), ("row", "ascending")]
        order[tied] = members[pc.sort_indices(tied_rows, sort_keys=by).to_numpy()]
    return order.astype(np.int64, copy=False)


def _prefixes(
    starts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64], data: npt.NDArray[np.uint8]
) -> npt.NDArray[np.uint64]:
    """The first eight bytes of each string as a big-endian number, zero-padded."""
    prefixes = np.zeros(starts.size, dtype=np.uint64)
    if data.size == 0:
        return prefixes
    last = data.size - 1
    for position in range(8):
        byte = np.take(data, np.minimum(starts + position, last)).astype(np.uint64)
        byte[lengths <= position] = 0
        prefixes |= byte << np.uint64(56 - 8 * position)
    return prefixes


def _radix_key(ids: npt.NDArray[np.int64], partitions: int) -> npt.NDArray[Any]:
    # numpy's stable argsort of a 16-bit array is one radix pass.
    return ids.astype(np.uint16) if partitions <= 1 << 16 else ids


Partitioner: TypeAlias = "Callable[[pa.Array, int], npt.NDArray[np.int64]]"


def partition(table: Table, partitions: int, partitioner: Partitioner | None = None, *,
              presorted: bool = False) -> list[Table]:
    """Split rows by ``partitioner`` (default ``partition_ids``, the hash); each of the
    ``partitions`` tables is sorted by key. The partitioner sees each distinct key once.

    With ``presorted`` the rows are already in order (by key, or by key and value for
    ``sort_values``) and keep that order within each partition.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    if table.num_rows == 0:
        return [table for _ in range(partitions)]
    distinct, rows = _distinct_keys(single_array(table.column("key")))
    ids = (partitioner or partition_ids)(distinct, partitions)
    bounds = np.zeros(partitions + 1, dtype=np.int64)
    np.cumsum(np.bincount(ids if rows is None else ids[rows], minlength=partitions), out=bounds[1:])
    if presorted:
        row_ids = ids if rows is None else ids[rows]
        # A total order's partitions already follow the key order: nothing to move.
        grouped = bool((row_ids[1:] >= row_ids[:-1]).all())
        shuffled = table if grouped else table.take(
            np.argsort(_radix_key(row_ids, partitions), kind="stable"))
    else:
        # Ordering by key and then stably by partition leaves every partition sorted.
        order = _sort_order(distinct)
        order = order[np.argsort(_radix_key(ids[order], partitions), kind="stable")]
        shuffled = _take(table, order, distinct, rows)
    return [
        shuffled.slice(int(bounds[i]), int(bounds[i + 1] - bounds[i])) for i in range(partitions)
    ]


# --------------------------------------------------------------------------- run format


def encode_run(table: Table, compression: RunCompression = "lz4") -> bytes:
    """Serialise a table as a checksummed run (format and codec choice: module docstring)."""
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression, use_threads=False)
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    payload = sink.getvalue()
    header = _HEADER.pack(_MAGIC, _VERSION, payload.size, zlib.crc32(payload))
    return b"".join((header, memoryview(payload)))


def decode_run(data: bytes | bytearray | memoryview) -> Table:
    """Parse a run written by :func:`encode_run`; damage raises :class:`CorruptRunError`."""
    view = memoryview(data)
    if len(view) < _HEADER.size:
        raise CorruptRunError(
            f"run is truncated: {len(view)} bytes, shorter than the {_HEADER.size}-byte header"
        )
    magic, version, length, crc = _HEADER.unpack_from(view)
    if magic != _MAGIC:
        raise CorruptRunError(f"not a kubemr run: magic {bytes(magic)!r}, expected {_MAGIC!r}")
    if version != _VERSION:
        raise CorruptRunError(
            f"unsupported run format version {version}, this reader knows {_VERSION}"
        )
    payload = view[_HEADER.size :]
    if len(payload) != length:
        raise CorruptRunError(
            f"run payload is {len(payload)} bytes, header says {length} (truncated or padded)"
        )
    actual = zlib.crc32(payload)
    if actual != crc:
        raise CorruptRunError(
            f"run checksum mismatch: crc32 {actual:#010x}, header says {crc:#010x}"
        )
    try:
        options = pa.ipc.IpcReadOptions(use_threads=False)
        return pa.ipc.open_stream(pa.py_buffer(payload), options=options).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise CorruptRunError(f"run payload is not a valid Arrow stream: {exc}") from exc


def merge_runs(tables: Sequence[Table], combiner: Combiner | None) -> Table:
    """The reduce input: all runs of one partition, combined if asked, sorted by key."""
    merged = concat_tables(tables)
    if combiner is not None:
        merged = combine(merged, merge_combiner(combiner))
    return sort_by_key(merged)


# --------------------------------------------------------------------------- reduce side


def iter_groups(table: Table) -> Iterator[tuple[Any, list[Any]]]:
    """Yield ``(key, values)`` in ascending key order, as Python objects."""
    if table.num_rows == 0:
        return
    key_kind = _kind(table.schema.field("key"))
    value_kind = _kind(table.schema.field("value"))
    keys = single_array(table.column("key"))
    if not _is_sorted(keys, key_kind):
        table = sort_by_key(table)
        keys = single_array(table.column("key"))
    starts = _group_starts(keys, key_kind)
    group_keys = to_python(keys.take(starts), key_kind)
    values = to_python(table.column("value"), value_kind)
    ends = [*starts[1:].tolist(), len(values)]
    for key, start, end in zip(group_keys, starts.tolist(), ends, strict=True):
        yield key, values[start:end]


def _is_sorted(keys: pa.Array, kind: _Kind) -> bool:
    # NaN compares false to everything, so float keys always go through the sort.
    if kind == "float":
        return False
    if len(keys) < 2:
        return True
    return bool(pc.all(pc.less_equal(keys.slice(0, len(keys) - 1), keys.slice(1))).as_py())


def _group_starts(keys: pa.Array, kind: _Kind) -> npt.NDArray[np.int64]:
    if kind == "float":
        # Compare bits: canonical NaN keys are one group although NaN != NaN.
        bits = keys.to_numpy().view(np.int64)
        changed = bits[1:] != bits[:-1]
    else:
        changed = pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1)).to_numpy(
            zero_copy_only=False
        )
    return np.concatenate(([0], np.flatnonzero(changed) + 1)).astype(np.int64)


def to_python(column: pa.Array | pa.ChunkedArray, kind: _Kind) -> list[Any]:
    """A column's values as the Python objects the map emitted."""
    if kind == "strbytes":
        try:
            # Columns whose bytes happen to be valid UTF-8 decode in C, all at once.
            return list(column.cast(pa.string()).to_pylist())
        except pa.ArrowInvalid:
            return [bytes_to_str(item) for item in column.to_pylist()]
    items: list[Any] = column.to_pylist()
    if kind == "json":
        return [load_json(item) for item in items]
    return items



# --------------------------------------------------------------------------- shuffle object

RUN_HEADER_SIZE = _HEADER.size
SLICE_ENTRY = struct.Struct("<QQQII")
_ENTRY_BODY = struct.Struct("<QQQI")
_ENTRY_CHECK = struct.Struct("<IQ")
_SHUFFLE_MAGIC = b"KMRSHF"
_SHUFFLE_VERSION = 1
_FOOTER = struct.Struct("<6sBxIQ")


def warm_up() -> None:
    """Run the hot path once on a few pairs, so that its first real use does not pay
    for what pyarrow and numpy load on first use: ``group_by`` imports Acero and the
    dataset module, masked arrays load on first access (~0.2 s together, measured in a
    warm pool's standby, which calls this before it has a job)."""
    table = pairs_to_table(split_words(b"warm up warm\n"), 1)
    for run in partition(combine(table, "sum"), 2):
        merged = merge_runs([decode_run(encode_run(sort_by_key(run)))], "sum")
        list(iter_groups(merged))


class SliceEntry(NamedTuple):
    """Where one partition's rows are in a shuffle object (module docstring)."""

    offset: int
    length: int
    rows: int
    crc: int


def run_length(header: bytes | memoryview) -> int:
    """The total size (header included) of the run whose header starts ``header``."""
    if len(header) < _HEADER.size:
        raise CorruptRunError(f"block header is truncated: {len(header)} bytes")
    magic, version, length, _ = _HEADER.unpack_from(header)
    if magic != _MAGIC or version != _VERSION:
        raise CorruptRunError(f"not a kubemr block: magic {bytes(magic)!r} version {version}")
    return _HEADER.size + int(length)


def _entry_crc(body: bytes, partition: int, object_size: int) -> int:
    return zlib.crc32(body + _ENTRY_CHECK.pack(partition, object_size))


def encode_index(entries: Sequence[SliceEntry], index_offset: int) -> bytes:
    """The index and footer that end a shuffle object whose blocks end at ``index_offset``."""
    size = index_offset + len(entries) * SLICE_ENTRY.size + _FOOTER.size
    parts = []
    for partition, entry in enumerate(entries):
        body = _ENTRY_BODY.pack(*entry)
        parts.append(body + struct.pack("<I", _entry_crc(body, partition, size)))
    parts.append(_FOOTER.pack(_SHUFFLE_MAGIC, _SHUFFLE_VERSION, len(entries), index_offset))
    return b"".join(parts)


def entry_range(partitions: int, partition: int, object_size: int) -> tuple[int, int]:
    """``(offset, length)`` of partition's index entry in an object of ``object_size``."""
    start = object_size - _FOOTER.size - (partitions - partition) * SLICE_ENTRY.size
    return start, SLICE_ENTRY.size


def decode_entry(data: bytes, partition: int, object_size: int) -> SliceEntry:
    """Check and parse one index entry read at :func:`entry_range`; CorruptRunError if bad."""
    if len(data) != SLICE_ENTRY.size:
        raise CorruptRunError(f"index entry of partition {partition} is truncated: "
                              f"{len(data)} of {SLICE_ENTRY.size} bytes")
    offset, length, rows, crc, check = SLICE_ENTRY.unpack(data)
    if _entry_crc(data[:_ENTRY_BODY.size], partition, object_size) != check:
        raise CorruptRunError(f"index entry of partition {partition} fails its checksum")
    if offset + length > object_size:
        raise CorruptRunError(f"index entry of partition {partition} points past the end")
    return SliceEntry(offset, length, rows, crc)


@dataclass(frozen=True)
class ShuffleBudget:
    """How one worker's memory budget is shared by the stages of the shuffle.

    The shares leave room for the copies each stage makes (combining, partitioning and
    sorting a buffer need about three times its size; a merge holds one block per input,
    as Arrow tables and as the comparable columns it searches, plus a bounded output
    chunk and its sorted copy).
    """

    memory: int

    @property
    def split_bytes(self) -> int:
        """The largest input split a map is given: the map callback holds its split whole
        (as bytes or str) next to what it emits, so splits are planned no larger than this
        when the job has a budget, whatever the chunk size asks."""
        return max(1 << 20, self.memory // 8)

    @property
    def map_buffer(self) -> int:
        """Bytes of emitted pairs (Arrow size) buffered before a spill."""
        return max(1 << 20, self.memory // 6)

    @property
    def block_bytes(self) -> int:
        """Target Arrow size of one block of a sorted slice."""
        return min(1 << 20, max(32 << 10, self.memory // 128))

    @property
    def merge_factor(self) -> int:
        """Sorted streams one merge pass holds open; more go through intermediate passes."""
        return max(2, self.memory // (6 * self.block_bytes))

    @property
    def merge_chunk(self) -> int:
        """Arrow bytes of one merge step's output: a few blocks, however many streams the
        merge holds open (a chunk is sorted, so it is held twice)."""
        return 4 * self.block_bytes

    @property
    def in_flight(self) -> int:
        """Bytes of a reducer's ranged GETs in flight (Spark's maxSizeInFlight, 48 MiB)."""
        return max(1 << 20, min(48 << 20, self.memory // 4))

    @property
    def kept_bytes(self) -> int:
        """Bytes of small shuffle objects a worker keeps for its next reduces (``kept``)."""
        return self.in_flight // 4

    @property
    def group_values(self) -> int:
        """Arrow bytes of one key's values held before they go to local scratch (lazy
        values); small, because as Python objects they take about five times as much."""
        return max(256 << 10, self.memory // 32)


def blocks(table: Table, block_bytes: int) -> Iterator[Table]:
    """``table`` cut into consecutive slices of about ``block_bytes`` (Arrow size) each."""
    rows = table.num_rows
    if rows == 0:
        return
    per_block = max(1, int(block_bytes * rows / max(1, table.nbytes)))
    for start in range(0, rows, per_block):
        yield table.slice(start, per_block)


def group_starts(table: Table) -> npt.NDArray[np.int64]:
    """Where each run of equal keys starts in a key-sorted table (empty for no rows)."""
    if table.num_rows == 0:
        return np.zeros(0, dtype=np.int64)
    return _group_starts(single_array(table.column("key")), column_kind(table, "key"))
