"""A three-step job for tests/test_steps.py, each step checking what the previous one wrote.

1. ``count``: words of each line (``str``) counted with the built-in ``sum``.
2. ``bycount``: ``(word: str, n: int)`` pairs regrouped by count: key ``n``, value the
   sorted list of words with that count (a JSON value).
3. ``histogram``: ``(n: int, words: list)`` pairs to ``("even" | "odd", len(words))``
   summed; its map also checks that step 1's parts are gone (deleted once step 2
   committed) while step 2's, its input, are still there (`kubemr run`'s work directory;
   tests/test_cluster_steps.py checks the bucket itself).

``--arg fail=N`` makes step N's map raise (the job must fail naming step N);
``--arg fail_once=2`` makes step 2's first reduce raise PermanentTaskError on its first
attempt only (a retry, whose attempts count on, then succeeds); ``--arg log=PATH`` appends
``<task> <attempt>`` to PATH once per attempt of a task whose Python callback ran (so a
test sees which tasks ran again).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from kubemr_async import Job, Pipeline, TaskContext
from kubemr_async.errors import PermanentTaskError

count = Job("count")
bycount = Job("bycount")
histogram = Job("histogram", reducers=2)


_noted: set[tuple[str, int]] = set()


def _note(ctx: TaskContext) -> None:
    """``--arg log=PATH``: this attempt ran (once per attempt and worker process)."""
    log = ctx.args.get("log")
    if log and (ctx.task, ctx.attempt) not in _noted:
        _noted.add((ctx.task, ctx.attempt))
        with open(log, "a") as out:
            out.write(f"{ctx.task} {ctx.attempt}\n")


def _maybe_fail(step: int, ctx: TaskContext) -> None:
    _note(ctx)
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
    _note(ctx)
    if ctx.args.get("fail_once") == "2" and ctx.task.endswith("-00000") and ctx.attempt == 1:
        raise PermanentTaskError(f"step 2 was told to fail {ctx.task}'s first attempt")
    return sorted(words)


@histogram.map(input="pairs")
def parity(pair: tuple[int, list[str]], ctx: TaskContext) -> Iterator[tuple[str, int]]:
    _maybe_fail(3, ctx)
    n, grouped = pair
    if type(n) is not int or not isinstance(grouped, list):
        raise TypeError(f"step 3 got {pair!r}: expected (int, list)")
    if not ctx.input.startswith("s3://"):
        _check_local_parts(ctx.input)
    yield ("odd" if n % 2 else "even"), len(grouped)


def _check_local_parts(part: str) -> None:
    """`kubemr run`: step 3 reads step 2's parts, and step 1's are gone."""
    blobs = next(p for p in Path(part).parents if p.name.startswith("blobs-"))
    if blobs.name != "blobs-2" or not blobs.is_dir():
        raise RuntimeError(f"step 3 reads {part}, not step 2's parts")
    if (blobs.parent / "blobs-1").exists():
        raise RuntimeError("step 1's parts are still there after step 2 committed")


histogram.reduce("sum")

steps = Pipeline("three", [count, bycount, histogram])
