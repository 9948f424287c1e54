"""Result formats: how a shuffle table becomes the bytes of one result part, and back.

Pure, like the shuffle (bytes in, bytes out): the reduce writes its part with
:func:`encode`, map-only jobs can write each map's table the same way, and
:func:`decode` (used by :func:`kubemr_async.results.read_results`) reads any of them back.
Strings follow the shuffle's one rule, UTF-8 with ``surrogateescape``
(:func:`shuffle.str_to_bytes`), so text that was not UTF-8 comes out as the input's bytes.

``text`` (the default; files ``part-00000``)
    One ``key<TAB>value\\n`` line per pair. How a key or value is written depends only on
    that value, never on what shares its part: str as its bytes, bytes raw, int in decimal,
    float as ``repr()``, bool as ``true``/``false``, None/list/dict as compact JSON with
    sorted keys. Readers split lines on LF only and a line on its first TAB, so a key
    holding a TAB or LF, or a value holding an LF, cannot be written: the task fails
    naming the key and pointing at ``jsonl``/``parquet``.
``jsonl`` (``part-00000.jsonl``)
    One JSON array ``[key, value]`` per line. bytes, and str holding undecodable bytes,
    become JSON strings by UTF-8 ``surrogateescape`` decoding: undecodable bytes appear as
    ``\\udcXX`` escapes, which Python's ``json`` reads back and
    ``.encode("utf-8", "surrogateescape")`` turns into the exact bytes. JSON has no NaN or
    Infinity, so a non-finite float fails the task naming the key (rather than orjson's
    silent ``null``).
``pairs`` (``part-00000.parquet``; internal)
    What each step of a multi-step job but the last writes, for the next step's
    ``"pairs"`` map input: ``parquet``, except that a str column keeps the shuffle's own
    representation (binary with field metadata ``{"kubemr.codec": "str"}``), so str
    holding undecodable bytes round-trips. Never a job's output format.
``parquet`` (``part-00000.parquet``)
    Columns ``key`` and ``value`` with their Arrow types: string, binary, int64, float64,
    bool; mixed or structured values are a string column of JSON text whose field metadata
    ``{"kubemr.codec": "json"}`` tells this module's reader to decode it. A parquet string
    must be UTF-8, so a str holding undecodable bytes fails the task naming the key (emit
    bytes instead, or use text/jsonl).
"""

from __future__ import annotations

import io
import json
import reprlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Any, Literal

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import shuffle
from .shuffle import (
    Kind,
    Table,
    bytes_to_str,
    column_kind,
    dump_json,
    is_non_finite,
    load_json,
    str_to_bytes,
)
from .spec import DEFAULT_OUTPUT_FORMAT, OUTPUT_FORMATS, OutputFormat, PartFormat

__all__ = ["SUCCESS_MARKER", "FormatError", "decode", "encode", "manifest",
           "parquet_table", "part_name", "printable"]

#: The manifest a finished job leaves beside its parts: {"job", "format", "results", "parts"}.
SUCCESS_MARKER = "_SUCCESS"

_SUFFIXES: dict[PartFormat, str] = {"text": "", "jsonl": ".jsonl", "parquet": ".parquet",
                                    "pairs": ".parquet"}
#: The part formats written as Parquet files.
PARQUET_FORMATS: tuple[PartFormat, ...] = ("parquet", "pairs")
_ALTERNATIVES = "use --format jsonl or parquet"

_Role = Literal["key", "value"]
_SHORT = reprlib.Repr()
_SHORT.maxstring = 40
_SHORT.maxother = 40


class FormatError(shuffle.ShuffleError):
    """A pair cannot be written faithfully in the job's output format."""


def manifest(job: str, fmt: OutputFormat, results: Sequence[object], parts: Sequence[str],
             sizes: Sequence[int], **extra: object) -> bytes:
    """The ``_SUCCESS`` manifest, one shape for `kubemr run` and for cluster jobs on S3:
    the job, the format, the result URLs, the parts relative to the manifest and their
    sizes in bytes (what ``read_results`` follows and checks), plus any ``extra`` fields
    the writer knows."""
    body = {"job": job, "format": _checked(fmt), "results": list(results),
            "parts": list(parts), "sizes": list(sizes), **extra}
    return orjson.dumps(body, option=orjson.OPT_INDENT_2)


@dataclass(frozen=True)
class Manifest:
    """A ``_SUCCESS`` manifest as read back: what :func:`manifest` wrote. ``sizes``: each
    part's bytes, so a part cut short or rewritten since is not read as the result (None
    in a manifest written before they were recorded)."""

    job: str
    format: OutputFormat
    parts: tuple[str, ...]
    sizes: tuple[int, ...] | None = None


def read_manifest(data: bytes) -> Manifest:
    """Parse a ``_SUCCESS`` manifest; ValueError saying why if it is not one of ours."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("job"), str):
        raise ValueError("not a kubemr manifest (no job name)")
    fmt = body.get("format", DEFAULT_OUTPUT_FORMAT)
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"unknown format {fmt!r}")
    parts = body.get("parts")
    if not isinstance(parts, list) or not all(isinstance(p, str) and p for p in parts):
        raise ValueError("its parts are not a list of names")
    sizes = body.get("sizes")
    if sizes is not None and not (
            isinstance(sizes, list) and len(sizes) == len(parts)
            and all(type(n) is int and n >= 0 for n in sizes)):
        raise ValueError("its sizes are not one byte count per part")
    return Manifest(body["job"], fmt, tuple(parts), None if sizes is None else tuple(sizes))


def part_name(index: int, fmt: PartFormat) -> str:
    """The file name of result part ``index``: ``part-00000`` plus the format's extension."""
    return f"part-{index:05d}{_SUFFIXES[_checked(fmt)]}"


def encode(table: Table, fmt: PartFormat) -> bytes:
    """One result part holding ``table``'s rows in order; FormatError names the bad key."""
    fmt = _checked(fmt)
    if fmt in PARQUET_FORMATS:
        return _encode_parquet(table, lossless=fmt == "pairs")
    if table.num_rows == 0:
        return b""
    if fmt == "text":
        return _encode_text(table)
    return _encode_jsonl(table)


def decode(data: bytes, fmt: PartFormat) -> Iterator[tuple[Any, Any]]:
    """The ``(key, value)`` pairs of a part written by :func:`encode`, in order.

    text gives str keys and values (surrogateescape); jsonl the decoded JSON; parquet the
    typed values.
    """
    fmt = _checked(fmt)
    if fmt in PARQUET_FORMATS:
        table = pq.read_table(pa.BufferReader(data))
        keys = shuffle.to_python(table.column("key"), column_kind(table, "key"))
        values = shuffle.to_python(table.column("value"), column_kind(table, "value"))
        yield from zip(keys, values, strict=True)
        return
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for number, line in enumerate(lines, 1):
        if fmt == "jsonl":
            pair = load_json(line)
            if not (isinstance(pair, list) and len(pair) == 2):
                raise FormatError(f"jsonl line {number} is not a [key, value] array")
            yield pair[0], pair[1]
        else:
            key, tab, value = line.partition(b"\t")
            if not tab:
                raise FormatError(f"text line {number} has no TAB between key and value")
            yield bytes_to_str(key), bytes_to_str(value)


def printable(data: bytes, fmt: OutputFormat) -> bytes:
    """A part as lines a terminal can show: text and jsonl as they are, parquet as jsonl.

    What ``kubemr results --cat`` prints. JSON has no NaN, so a parquet part holding one is
    printed with the ``NaN``/``Infinity`` tokens Python's ``json`` reads (and says so here).
    """
    if _checked(fmt) != "parquet":
        return data
    table = pq.read_table(pa.BufferReader(data))
    try:
        return _encode_jsonl(table) if table.num_rows else b""
    except FormatError:
        return b"".join(
            json.dumps([_jsonable(k), _jsonable(v)], separators=(",", ":")).encode() + b"\n"
            for k, v in decode(data, fmt))


def _jsonable(value: Any) -> Any:
    return bytes_to_str(value) if isinstance(value, bytes) else value


def _checked(fmt: str) -> PartFormat:
    if fmt not in _SUFFIXES:
        raise ValueError(f"unknown output format {fmt!r}; expected one of "
                         f"{', '.join(OUTPUT_FORMATS)}")
    return fmt


def _key_at(table: Table, row: int) -> str:
    key = shuffle.to_python(table.column("key").slice(row, 1), column_kind(table, "key"))[0]
    return _SHORT.repr(key)


def _join(*parts: pa.Array | pa.Scalar) -> bytes:
    """Concatenate binary columns (and scalars) row by row, then all rows, in C."""
    lines = pc.binary_join_element_wise(*parts, pa.scalar(b""))
    _, offsets, data = lines.buffers()
    bounds = np.frombuffer(offsets, dtype=np.int32, count=len(lines) + 1,
                           offset=lines.offset * 4)
    if data is None:
        return b""
    text: bytes = data[int(bounds[0]) : int(bounds[-1])].to_pybytes()
    return text


# --------------------------------------------------------------------------- text


def _encode_text(table: Table) -> bytes:
    keys = _text_column(shuffle.single_array(table.column("key")), column_kind(table, "key"))
    values = _text_column(shuffle.single_array(table.column("value")), column_kind(table, "value"))
    text = _join(keys, pa.scalar(b"\t"), values, pa.scalar(b"\n"))
    # One LF per row means no key or value holds one (a memchr-speed count of the joined
    # text, where scanning each column would cost a pass per check); TABs matter in keys.
    checks = [(keys, "\t", "key {key} contains a TAB")]
    if text.count(b"\n") != table.num_rows:
        checks += [(keys, "\n", "key {key} contains a newline (LF)"),
                   (values, "\n", "the value of key {key} contains a newline (LF)")]
    for column, needle, what in checks:
        row = pc.index(pc.match_substring(column, needle), True).as_py()
        if row >= 0:
            raise FormatError(f"{what.format(key=_key_at(table, row))}: text output is one "
                              f"key<TAB>value line per pair, split on LF; {_ALTERNATIVES}")
    return text


def _text_column(column: pa.Array, kind: Kind) -> pa.Array:
    """Each value's text, by its own type only (module docstring)."""
    if kind == "int":
        return column.cast(pa.string()).cast(pa.binary())
    if kind == "float":
        # Arrow prints 1.0 as "1" and 1e-05 as "0.00001"; the output promises repr().
        return pa.array([repr(x).encode() for x in column.to_pylist()], pa.binary())
    if kind == "bool":
        return pc.if_else(column, pa.scalar(b"true"), pa.scalar(b"false"))
    if kind == "json":
        # Mixed kinds: every element is written as it would be in a column of its own.
        return pa.array([_render(load_json(x)) for x in column.to_pylist()], pa.binary())
    return column.cast(pa.binary())


def _render(value: Any) -> bytes:
    if isinstance(value, str):
        return str_to_bytes(value)
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, float):
        return repr(value).encode()
    return dump_json(value)


# --------------------------------------------------------------------------- jsonl


def _encode_jsonl(table: Table) -> bytes:
    keys = _json_column(table, "key")
    values = _json_column(table, "value")
    return _join(pa.scalar(b"["), keys, pa.scalar(b","), values, pa.scalar(b"]\n"))


def _json_column(table: Table, role: _Role) -> pa.Array:
    column = shuffle.single_array(table.column(role))
    kind = column_kind(table, role)
    if kind == "int":
        return column.cast(pa.string()).cast(pa.binary())
    if kind == "bool":
        return pc.if_else(column, pa.scalar(b"true"), pa.scalar(b"false"))
    if kind == "float":
        _require_finite(table, pc.indices_nonzero(pc.invert(pc.is_finite(column))), role)
        return pa.array([repr(x).encode() for x in column.to_pylist()], pa.binary())
    if kind == "json":
        # Only dump_json's fallback writes NaN/Infinity; check the few rows that may hold one.
        suspect = pc.or_(pc.match_substring(column, "NaN"),
                         pc.match_substring(column, "Infinity"))
        rows = pc.indices_nonzero(suspect).to_pylist()
        _require_finite(table, [r for r in rows if is_non_finite(load_json(column[r].as_py()))],
                        role)
        return column.cast(pa.binary())  # a parquet part read back holds it as string
    if kind in ("bytes", "strbytes"):
        try:
            # Valid UTF-8 (the usual case) decodes in C.
            texts = column.cast(pa.string()).to_pylist()
        except pa.ArrowInvalid:
            texts = [bytes_to_str(x) for x in column.to_pylist()]
    else:
        texts = column.to_pylist()
    return pa.array([_json_string(t) for t in texts], pa.binary())


def _json_string(text: str) -> bytes:
    """A JSON string literal; the stdlib's C escaper, measured ~15x faster per item here
    than one orjson call per string."""
    try:
        return encode_basestring(text).encode()
    except UnicodeEncodeError:
        # Undecodable bytes: \udcXX escapes, which Python's json reads back exactly.
        return encode_basestring_ascii(text).encode()


def _require_finite(table: Table, bad_rows: Any, role: _Role) -> None:
    rows = bad_rows.to_pylist() if isinstance(bad_rows, pa.Array) else list(bad_rows)
    if rows:
        what = "key" if role == "key" else "the value of key"
        raise FormatError(f"{what} {_key_at(table, rows[0])} is not a finite number; JSON has "
                          "no NaN or Infinity: use --format text or parquet")


# --------------------------------------------------------------------------- parquet


def _encode_parquet(table: Table, *, lossless: bool = False) -> bytes:
    sink = io.BytesIO()
    pq.write_table(parquet_table(table, lossless=lossless), sink)
    return sink.getvalue()


def parquet_table(table: Table, *, lossless: bool = False) -> pa.Table:
    """A shuffle table as a part's parquet columns (FormatError names an unwritable key).

    Also what a part streamed chunk by chunk writes through a ``pq.ParquetWriter``.
    ``lossless`` (the ``pairs`` format) keeps str columns as the shuffle holds them.
    """
    columns: list[pa.Array] = []
    fields: list[pa.Field] = []
    roles: tuple[_Role, _Role] = ("key", "value")
    for role in roles:
        field = table.schema.field(role)
        column = shuffle.single_array(table.column(role))
        kind = column_kind(table, role)
        if kind == "strbytes" and lossless:
            pass  # binary with the str codec: read back as the same str, any bytes
        elif kind == "strbytes":
            try:
                column = column.cast(pa.string())
            except pa.ArrowInvalid:
                row = next(i for i, x in enumerate(column.to_pylist()) if not _is_utf8(x))
                what = "key" if role == "key" else "the value of key"
                raise FormatError(
                    f"{what} {_key_at(table, row)} holds bytes that are not UTF-8, which a "
                    "parquet string cannot hold: emit bytes, or use --format text or jsonl"
                ) from None
            field = pa.field(role, pa.string())
        elif kind == "json":
            # dump_json writes UTF-8 (or ASCII escapes), so the cast always succeeds.
            column = column.cast(pa.string())
            field = pa.field(role, pa.string(), metadata=field.metadata)
        columns.append(column)
        fields.append(field)
    return pa.table(columns, schema=pa.schema(fields))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True
