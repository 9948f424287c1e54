"""Counters: how long are the lines of a text, and how many are blank or not UTF-8?

Each line is one record (``input="lines"``); the map counts blank lines, lines that are not
valid UTF-8 and every line's bytes with ``ctx.counter``, and emits each non-blank line's
length in words; the built-in ``count`` reducer then says how many lines have each length.

    kubemr run examples/line_stats.py --input examples/data --output /tmp/line-stats

The counters are exact whatever failed and was retried (only a task's committed attempt
counts); ``kubemr run`` prints them after its summary and writes them to the result's
``_SUCCESS`` manifest (``kubemr status`` shows them for a cluster job)::

    Counters:
      kubemr
        ...
      lines
        blank=2
        bytes=102951
        not utf-8=50
"""

from collections.abc import Iterator

from kubemr_async import Job, TaskContext

job = Job("line-stats")


@job.map(input="lines")
def lengths(line: str, ctx: TaskContext) -> Iterator[tuple[int, int]]:
    data = line.encode("utf-8", "surrogateescape")
    ctx.counter("lines", "bytes", len(data) + 1)  # and its terminator (CRLF counts as 1)
    if line != data.decode("utf-8", "replace"):
        ctx.counter("lines", "not utf-8")
    words = len(line.split())
    if words == 0:
        ctx.counter("lines", "blank")
        return
    yield words, 1


job.reduce("count")
