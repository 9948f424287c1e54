"""Records that poison a map or a reduce, for skip mode (``maxSkippedRecords``).

Input: JSON Lines ``{"id": n, "word": w}``. ``--arg poison=3,17`` makes the map raise on
the records with those ids; ``--arg poison_keys=w7,w13`` makes the reduce raise on those
keys. The result is each word's count.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kubemr_async import Job, TaskContext

job = Job("skipping")


def _chosen(ctx: TaskContext, name: str) -> set[str]:
    return {item for item in ctx.args.get(name, "").split(",") if item}


@job.map(input="jsonl")
def words(record: dict[str, Any], ctx: TaskContext) -> Iterator[tuple[str, int]]:
    yield record["word"], 1  # emitted before the raise: a skipped record's pairs are dropped
    if str(record["id"]) in _chosen(ctx, "poison"):
        raise ValueError(f"poison record {record['id']}")


@job.reduce
async def total(key: str, values: list[int], ctx: TaskContext) -> int:
    ctx.emit(f"{key}-seen", len(values))  # dropped too when the key is skipped
    if key in _chosen(ctx, "poison_keys"):
        raise KeyError(f"poison key {key}")
    return sum(values)
