"""A three-step job for tests/test_steps.py, each step checking what the previous one wrote.

1. ``count``: words of each line (``str``) counted with the built-in ``sum``.
2. ``bycount``: ``(word: str, n: int)`` pairs regrouped by count: key ``n``, value the
   sorted list of words with that count (a JSON value).
3. ``histogram``: ``(n: int, words: list)`` pairs to ``("even" | "odd", len(words))``
   summed; its map also checks that step 1's parts are gone (deleted once step 2
   committed) while step 2's, its input, are still there.

``--arg fail=N`` makes step N's map raise (the job must fail naming step N).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from kubemr_async import Job, Pipeline, TaskContext

count = Job("count")
bycount = Job("bycount")
histogram = Job("histogram", reducers=2)


def _maybe_fail(step: int, ctx: TaskContext) -> None:
    if ctx.args.get("fail") == str(step):
        raise ValueError(f"step {step} was told to fail")


@count.map(input="lines")
def words(line: str, ctx: TaskContext) -> Iterator[tuple[str, int]]:
    _maybe_fail(1, ctx)
    for word in line.split():
        yield word, 1


count.reduce("sum")


@bycount.map(input="pairs")
def invert(pair: tuple[str, int], ctx: TaskContext) -> Iterator[tuple[int, str]]:
    _maybe_fail(2, ctx)
    word, n = pair
    if type(word) is not str or type(n) is not int:
        raise TypeError(f"step 2 got {pair!r}: expected (str, int)")
    yield n, word


@bycount.reduce
def group(n: int, words: list[str], ctx: TaskContext) -> list[str]:
    return sorted(words)


@histogram.map(input="pairs")
def parity(pair: tuple[int, list[str]], ctx: TaskContext) -> Iterator[tuple[str, int]]:
    _maybe_fail(3, ctx)
    n, grouped = pair
    if type(n) is not int or not isinstance(grouped, list):
        raise TypeError(f"step 3 got {pair!r}: expected (int, list)")
    blobs = next(p for p in Path(ctx.input).parents if p.name.startswith("blobs-"))
    if blobs.name != "blobs-2" or not blobs.is_dir():
        raise RuntimeError(f"step 3 reads {ctx.input}, not step 2's parts")
    if (blobs.parent / "blobs-1").exists():
        raise RuntimeError("step 1's parts are still there after step 2 committed")
    yield ("odd" if n % 2 else "even"), len(grouped)


histogram.reduce("sum")

steps = Pipeline("three", [count, bycount, histogram])
