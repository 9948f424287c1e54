"""Shell commands as map, combine and reduce steps, with Hadoop Streaming's protocol.

A :class:`~kubemr_async.api.Shell` step runs ``/bin/sh -c COMMAND`` once per task (a
combiner: once per spill buffer) in its own process group, on the worker's user loop, so
the lease keeps being renewed while it runs. Its stdin is written and its stdout read
concurrently, a piece at a time, so neither is ever held whole and neither side can wait
forever on a full pipe:

* mapper: stdin is the split's bytes; stdout lines ``key<TAB>value`` are parsed into pairs
  (split on the first TAB; a line without one is all key, with an empty value), a few MiB
  at a time with numpy/Arrow (:func:`parse_pairs`), and emitted with ``ctx.emit_batch``,
  so the map sorts and spills them like any other map's;
* combiner: stdin is one spill buffer's rows sorted by key as ``key<TAB>value`` lines;
  stdout is parsed back into pairs the same way. Behind a shell mapper the buffer is the
  mapper's stdout lines themselves, held unparsed and handed over in key order
  (:func:`run_mapper_combined`);
* reducer: stdin is the partition's merged rows as ``key<TAB>value`` lines (sorted by key,
  groups contiguous); stdout is the result part's bytes as they are (text format), or
  parsed into pairs for the jsonl and parquet formats.

Output is text: lines split on LF, each on its first TAB. Its bytes are kept as they are,
as everywhere in kubemr ("Text is bytes"): keys and values are ``str``, and bytes that are
not UTF-8 stay undecodable escapes of themselves (a Python reducer sees surrogate escapes,
a text part gets the very bytes back). A NUL byte means the output is not text and fails
the task. ``reporter:counter:GROUP,NAME,N`` lines on
stderr call ``ctx.counter``, ``reporter:status:MSG`` lines set ``ctx.status`` (and are
logged); other stderr lines go to the worker's stderr, i.e. the task's log, as a Python
callback's ``print`` output does. The last lines are kept for the error of a failed
command, which says which task, attempt and command failed and how: not found (exit
127), not executable (126), a non-zero exit, a signal, or bad output. If the attempt is
cancelled (lease lost, shutdown) the command's process group is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from . import formats, shuffle, spill
from .api import Shell, TaskContext
from .errors import KubemrError, PermanentTaskError

Role = Literal["mapper", "combiner", "reducer"]

#: Bytes per write to the command's stdin and per read of its stdout and stderr.
_PIECE = 1 << 20
#: Complete stdout lines parsed into one batch of pairs once this many bytes are waiting.
_BATCH = 4 << 20
#: Lines of the command's stderr kept for the error of a failed command.
_TAIL = 20
_TAIL_LINE = 300
_REPORTER = b"reporter:"
#: What a held stdout line costs beyond its bytes: the two Arrow offsets of its pair, so
#: a buffer of lines spills about where the same buffer of pairs would.
_LINE_OVERHEAD = 8
#: Most bytes of stdout lines held for one combiner run: their offsets are 32-bit.
_HELD_LINES = 1 << 30


class CommandFailed(KubemrError):
    """A command exited non-zero or was killed: retried like a callback that raised."""


def _name(shell: Shell, ctx: TaskContext, role: Role) -> str:
    command = shell.command if len(shell.command) <= 120 else shell.command[:117] + "..."
    return f"{ctx.task} attempt {ctx.attempt}: {role} command {command!r}"


# --------------------------------------------------------------------------- parsing


def _layout(raw: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.int32], ...]:
    """Each line's start, key end, value start and end (its LF, or the data's end).

    Lines end at LF (a last line without one counts); a key ends at its line's first TAB,
    and a line with none is all key with an empty value (key end = value start = end).
    """
    # 32-bit positions (``_raw`` takes below 2 GiB): half the memory of numpy's own.
    ends = np.flatnonzero(raw == 10).astype(np.int32)
    if raw[-1] != 10:
        ends = np.append(ends, raw.size)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    tabs = np.flatnonzero(raw == 9).astype(np.int32)
    if tabs.size == ends.size and (tabs < ends).all() and (tabs[1:] > ends[:-1]).all():
        # One TAB in every line (plain key<TAB>value): no search for each line's first.
        return starts, tabs, tabs + 1, ends
    key_ends = ends.copy()
    value_starts = ends.copy()
    if tabs.size:
        line = np.searchsorted(ends, tabs)
        first = np.ones(tabs.size, dtype=np.bool_)
        first[1:] = line[1:] != line[:-1]
        key_ends[line[first]] = tabs[first]
        value_starts[line[first]] = tabs[first] + 1
    return starts, key_ends, value_starts, ends


def _raw(data: bytes) -> npt.NDArray[np.uint8]:
    if len(data) > shuffle._INT32_MAX:
        raise ValueError(f"text lines are parsed below 2 GiB at a time, got {len(data)} bytes")
    return np.frombuffer(data, dtype=np.uint8)


def _pieces_array(data: bytes, bounds: list[npt.NDArray[np.int32]]) -> pa.Array:
    """A zero-copy binary array cutting ``data`` at ``bounds`` (per line, in order): line
    i's pieces are ``data[bounds[0][i]:bounds[1][i]]``, ..., the last up to the next line."""
    per_line = len(bounds)
    lines = bounds[0].size
    offsets = np.empty(per_line * lines + 1, dtype=np.int32)
    for position, bound in enumerate(bounds):
        offsets[position:-1:per_line] = bound
    offsets[-1] = len(data)
    return pa.Array.from_buffers(pa.binary(), per_line * lines,
                                 [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def parse_pairs(data: bytes) -> tuple[pa.Array, pa.Array]:
    """The ``key<TAB>value`` lines of ``data`` as two Arrow binary arrays, vectorized.

    Lines end at LF (a last line without one counts); each splits at its first TAB, and a
    line with none is all key with an empty value. No byte is copied until the keys and
    values are taken out of one zero-copy array of 4 pieces per line.
    """
    raw = _raw(data)
    if raw.size == 0:
        return pa.array([], pa.binary()), pa.array([], pa.binary())
    starts, key_ends, value_starts, ends = _layout(raw)
    # Pieces per line: key, TAB, value, LF (each possibly empty).
    pieces = _pieces_array(data, [starts, key_ends, value_starts, ends])
    lines = starts.size
    keys = pieces.take(pa.array(np.arange(0, 4 * lines, 4)))
    values = pieces.take(pa.array(np.arange(2, 4 * lines, 4)))
    return keys, values


def _check_text(data: bytes, where: str) -> None:
    """PermanentTaskError if ``data`` holds a NUL byte: the command's output is not text."""
    if b"\0" in data:
        number = data[:data.index(b"\0")].count(b"\n")
        line = data.split(b"\n")[number]
        raise PermanentTaskError(
            f"{where} wrote a NUL byte in output line {number + 1} "
            f"({line[:60]!r}{'...' if len(line) > 60 else ''}): expected text lines "
            "key<TAB>value")


def text_pairs(data: bytes, where: str) -> shuffle.Table:
    """``data``'s lines as a table of str keys and values (their bytes kept as they are)."""
    _check_text(data, where)
    return shuffle.text_table(*parse_pairs(data))


class _Lines:
    """Stdout bytes, handed on as whole lines (at least ``batch`` bytes at a time)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.pieces: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> bytes | None:
        self.pieces.append(data)
        self.size += len(data)
        if self.size < self.batch or b"\n" not in data:
            return None
        joined = b"".join(self.pieces)
        cut = joined.rindex(b"\n") + 1
        rest = joined[cut:]
        self.pieces, self.size = ([rest], len(rest)) if rest else ([], 0)
        return joined[:cut]

    def rest(self) -> bytes:
        joined = b"".join(self.pieces)
        self.pieces, self.size = [], 0
        return joined


# --------------------------------------------------------------------------- one process


async def run(shell: Shell, ctx: TaskContext, role: Role, feed: Iterable[bytes | memoryview],
              sink: Callable[[bytes], Awaitable[None]], batch: int = _BATCH) -> None:
    """Run ``shell``: write ``feed`` to its stdin while whole stdout lines go to ``sink``.

    ``sink`` gets at least ``batch`` bytes of whole lines at a time, and the rest (which
    may end without LF) last; the command's stdout waits while ``sink`` runs (a mapper's
    combiner, say). Raises CommandFailed or PermanentTaskError naming the task, attempt
    and command; a cancelled call kills the command's process group.
    """
    where = _name(shell, ctx, role)
    env = {**os.environ, "KUBEMR_JOB": ctx.job, "KUBEMR_TASK": ctx.task,
           "KUBEMR_ATTEMPT": str(ctx.attempt), "KUBEMR_ROLE": role}
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", shell.command, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True, env=env)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    tail: deque[str] = deque(maxlen=_TAIL)
    writer = asyncio.create_task(_write(proc, feed))
    errors = asyncio.create_task(_stderr(proc.stderr, ctx, tail, where))
    lines = _Lines(batch)
    try:
        while data := await proc.stdout.read(_PIECE):
            whole = lines.add(data)
            if whole is not None:
                await sink(whole)
        await writer  # raises what encoding the input raised
        await errors
        code = await proc.wait()
    except BaseException:
        _kill(proc)
        for helper in (writer, errors):
            helper.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.shield(proc.wait())
        await asyncio.gather(writer, errors, return_exceptions=True)
        raise
    if code != 0:
        raise _exit_error(code, where, tail)
    rest = lines.rest()
    if rest:
        await sink(rest)


async def _write(proc: asyncio.subprocess.Process, feed: Iterable[bytes | memoryview]) -> None:
    """Feed stdin; a command that exits without reading it all is judged by its exit code."""
    assert proc.stdin is not None
    try:
        for data in feed:
            proc.stdin.write(data)
            await proc.stdin.drain()
        proc.stdin.close()
        await proc.stdin.wait_closed()
    except (BrokenPipeError, ConnectionResetError):
        pass
    except BaseException:
        _kill(proc)  # so the stdout loop ends and the error surfaces
        raise


async def _stderr(stream: asyncio.StreamReader, ctx: TaskContext, tail: deque[str],
                  where: str) -> None:
    """The command's stderr, line by line; a line longer than ``_PIECE`` (a command writing
    without newlines) is passed on a piece at a time, so it is never held whole nor copied
    again with every read."""
    partial = b""
    while data := await stream.read(_PIECE):
        *lines, partial = (partial + data).split(b"\n")
        for line in lines:
            _stderr_line(line, ctx, tail, where)
        if len(partial) >= _PIECE:
            _stderr_line(partial, ctx, tail, where)
            partial = b""
    if partial:
        _stderr_line(partial, ctx, tail, where)


def _stderr_line(line: bytes, ctx: TaskContext, tail: deque[str], where: str) -> None:
    if line.startswith(_REPORTER) and _report(line[len(_REPORTER):], ctx, where):
        return
    text = line.decode(errors="replace")
    tail.append(text if len(text) <= _TAIL_LINE else text[:_TAIL_LINE] + "...")
    out = sys.stderr
    out.write(text + "\n")
    out.flush()


def _report(line: bytes, ctx: TaskContext, where: str) -> bool:
    """A ``reporter:`` line (Hadoop Streaming's); False if it is not a valid one."""
    kind, _, rest = line.decode(errors="replace").rstrip("\r").partition(":")
    if kind == "counter":
        group, _, more = rest.partition(",")
        name, _, amount = more.rpartition(",")
        try:
            n = int(amount)
        except ValueError:
            return False
        if not group or not name:
            return False
        ctx.counter(group, name, n)
        return True
    if kind == "status":
        ctx.status = rest
        ctx.log.info(f"status: {rest}", extra={"status": rest})
        return True
    return False


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _exit_error(code: int, where: str, tail: deque[str]) -> Exception:
    stderr = f"; stderr: {' | '.join(tail)}" if tail else "; no stderr"
    if code == 127:
        return PermanentTaskError(f"{where} not found (exit 127: the shell could not find a "
                                  f"program it names){stderr}")
    if code == 126:
        return PermanentTaskError(f"{where} cannot be executed (exit 126){stderr}")
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return CommandFailed(f"{where} was killed by {name}{stderr}")
    if code > 128 and code - 128 in signal.Signals._value2member_map_:
        name = signal.Signals(code - 128).name
        return CommandFailed(f"{where} exited with code {code} (its program was killed by "
                             f"{name}?){stderr}")
    return CommandFailed(f"{where} exited with code {code}{stderr}")


# --------------------------------------------------------------------------- the three steps


def _pieces(data: bytes | pa.Buffer, size: int | None = None) -> Iterator[memoryview]:
    """The first ``size`` bytes of ``data`` (all of them by default), a piece at a time."""
    view = memoryview(data)[:size]
    for start in range(0, len(view), _PIECE):
        yield view[start:start + _PIECE]


def _rows(tables: Iterable[shuffle.Table]) -> Iterator[bytes]:
    """Rows as ``key<TAB>value`` lines (the text format), a few MiB at a time."""
    for table in tables:
        for piece in shuffle.blocks(table, _PIECE):
            yield formats.encode(piece, "text")


async def run_mapper(shell: Shell, data: bytes | Iterable[shuffle.Table],
                     ctx: TaskContext) -> None:
    """The split on stdin; stdout's pairs emitted as they come (the map spills them).

    ``data`` is the split's bytes, or (a later step of a multi-step job) the previous
    step's pairs, written to stdin as ``key<TAB>value`` lines like a reducer's.
    """
    where = _name(shell, ctx, "mapper")

    async def emit(lines: bytes) -> None:
        ctx._append(text_pairs(lines, where))

    feed = _pieces(data) if isinstance(data, bytes) else _rows(data)
    await run(shell, ctx, "mapper", feed, emit)


async def run_mapper_combined(mapper: Shell, combiner: Shell, data: bytes, ctx: TaskContext,
                              buffer_bytes: int,
                              spill: Callable[[shuffle.Table, int], None]) -> None:
    """A shell mapper whose output goes through a shell combiner as the very lines it wrote.

    Stdout is held as it came, up to ``buffer_bytes`` counted as the pairs the lines would
    be, and only the keys are parsed: the combiner's stdin is the held lines ordered stably
    by key, one gather, where a buffer of pairs is parsed into keys and values, sorted and
    encoded back to the same text. ``spill`` gets each buffer's combined pairs and how many
    lines went in. A buffer with a line without TAB is combined the general way (whose
    stdin line for it is ``key<TAB>``).
    """
    where = _name(mapper, ctx, "mapper")
    limit = min(buffer_bytes, _HELD_LINES)
    held: list[bytes] = []
    size = rows = 0

    async def combine() -> None:
        nonlocal held, size, rows
        data, count = b"".join(held), rows
        held, size, rows = [], 0, 0
        if not data:
            return
        ordered = _by_key(data)
        if ordered is None:  # a line without TAB: the general way, as pairs
            spill(await run_combiner(combiner, shuffle.sort_by_key(
                shuffle.text_table(*parse_pairs(data))), ctx), count)
            return
        del data  # the combiner's stdin is the ordered copy
        _, offsets, text = ordered.buffers()
        length = int(np.frombuffer(offsets, dtype=np.int32, count=len(ordered) + 1)[-1])
        spill(await _combined(combiner, ctx, _pieces(text, length)), count)

    async def hold(lines: bytes) -> None:
        nonlocal size, rows
        _check_text(lines, where)
        if not lines.endswith(b"\n"):  # the last line: held lines each end with LF
            lines += b"\n"
        held.append(lines)
        count = lines.count(b"\n")
        rows += count
        size += len(lines) + _LINE_OVERHEAD * count
        if size > limit:
            await combine()

    await run(mapper, ctx, "mapper", _pieces(data), hold)
    await combine()


def _by_key(data: bytes) -> pa.Array | None:
    """``data``'s lines (each ending with LF) stably sorted by key, as a binary array whose
    data is the sorted text; None if a line has no TAB."""
    starts, key_ends, _, ends = _layout(_raw(data))
    if (key_ends == ends).any():
        return None
    keys = _pieces_array(data, [starts, key_ends]).take(
        pa.array(np.arange(0, 2 * starts.size, 2)))
    order = pa.array(shuffle.key_order(keys))
    del keys, key_ends, ends
    return _pieces_array(data, [starts]).take(order)


async def run_combiner(shell: Shell, table: shuffle.Table, ctx: TaskContext) -> shuffle.Table:
    """One spill buffer (sorted by key) through the command; its output pairs."""
    return await _combined(shell, ctx, _rows([table]))


async def _combined(shell: Shell, ctx: TaskContext,
                    feed: Iterable[bytes | memoryview]) -> shuffle.Table:
    where = _name(shell, ctx, "combiner")
    tables: list[shuffle.Table] = []

    async def collect(lines: bytes) -> None:
        tables.append(text_pairs(lines, where))

    await run(shell, ctx, "combiner", feed, collect)
    return shuffle.concat_tables(tables)


async def run_reducer(shell: Shell, chunks: Iterable[shuffle.Table], ctx: TaskContext,
                      part: spill.PartWriter) -> None:
    """The partition's merged rows on stdin; stdout is the part (parsed unless text)."""
    where = _name(shell, ctx, "reducer")

    async def write(lines: bytes) -> None:
        if part.fmt == "text":
            _check_text(lines, where)
            # Only the command's last bytes may lack their LF: end the part's last line, so
            # that parts read one after another (`cat part-*`) never join two lines.
            part.write_bytes(lines if lines.endswith(b"\n") else lines + b"\n")
        else:
            part.write(text_pairs(lines, where))

    await run(shell, ctx, "reducer", _rows(chunks), write)
