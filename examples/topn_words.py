"""Top-N words: a two-step job (a :class:`~kubemr_async.Pipeline`).

Step 1 (``count``) is word count: words are ``bytes.split()`` tokens, kept byte for byte,
summed by the built-in ``sum`` (which also combines map-side). Step 2 (``top``) reads
step 1's ``(word, count)`` pairs as they were written (bytes and int, not text) and keeps
the N most frequent with a single reducer: each map keeps only its own top N
(``ctx.state``) and emits them from its teardown under the key ``-count``, so the one
reducer sees the most frequent counts first, words sorted within a count
(``sort_values``), and stops once it has N. Ties are broken by the word's bytes.

    kubemr run examples/topn_words.py --input examples/data --output /tmp/top --arg n=10

The output is one part of ``word<TAB>count`` lines, most frequent first. ``n`` defaults
to 10.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator

from kubemr_async import Job, Pipeline, TaskContext
from kubemr_async.shuffle import split_words

count = Job("count")


@count.map(input="bytes")
async def words(chunk: bytes, ctx: TaskContext) -> None:
    ctx.emit_batch(split_words(chunk), 1)


count.reduce("sum")

top = Job("top", reducers=1, sort_values=True)


def _n(ctx: TaskContext) -> int:
    return int(ctx.args.get("n", "10"))


def _best(pairs: list[tuple[bytes, int]], n: int) -> list[tuple[bytes, int]]:
    """The n most frequent (word, count) pairs, ties by word."""
    return heapq.nsmallest(n, pairs, key=lambda pair: (-pair[1], pair[0]))


@top.map_setup
def start(ctx: TaskContext) -> None:
    ctx.state["best"] = []


@top.map(input="pairs")
def candidates(pair: tuple[bytes, int], ctx: TaskContext) -> None:
    best: list[tuple[bytes, int]] = ctx.state["best"]
    best.append(pair)
    if len(best) > 4 * _n(ctx):  # keep memory bounded: only this map's top n can win
        ctx.state["best"] = _best(best, _n(ctx))


@top.map_teardown
def local_top(ctx: TaskContext) -> Iterator[tuple[int, bytes]]:
    for word, n in _best(ctx.state["best"], _n(ctx)):
        yield -n, word


@top.reduce_setup
def ranks(ctx: TaskContext) -> None:
    ctx.state["top"] = []


@top.reduce
def select(negative_count: int, words: list[bytes], ctx: TaskContext) -> None:
    chosen: list[tuple[bytes, int]] = ctx.state["top"]
    for word in itertools.islice(words, max(0, _n(ctx) - len(chosen))):
        chosen.append((word, -negative_count))


@top.reduce_teardown
def written(ctx: TaskContext) -> Iterator[tuple[bytes, int]]:
    yield from ctx.state["top"]


pipeline = Pipeline("topn", [count, top])
