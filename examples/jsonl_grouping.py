"""Group JSON Lines events by user: per-record input, setup and teardown hooks.

    kubemr run examples/jsonl_grouping.py --input examples/events --output out/by-user \
        --format jsonl --arg rates=EUR:1.1,USD:1.0,GBP:1.25

Each line of the input is one event (``{"user": ..., "amount": ..., "currency": ...}``);
the map gets it decoded, once per line. ``map_setup`` parses the exchange rates once per
map attempt into ``ctx.state``, and ``map_teardown`` emits how many events the map read.
The reducer writes one summary per user; ``reduce_teardown`` adds a row counting the users
that reduce saw.
"""

from __future__ import annotations

from typing import Any

from kubemr_async import Job, TaskContext

job = Job("jsonl-grouping")


@job.map_setup
def load_rates(ctx: TaskContext) -> None:
    spec = ctx.args.get("rates", "USD:1.0")
    ctx.state["rates"] = {code: float(rate) for code, _, rate in
                          (item.partition(":") for item in spec.split(","))}
    ctx.state["events"] = 0


@job.map(input="jsonl")
def by_user(event: dict[str, Any], ctx: TaskContext) -> None:
    ctx.state["events"] += 1
    usd = event["amount"] * ctx.state["rates"].get(event["currency"], 1.0)
    ctx.emit(event["user"], round(usd, 2))


@job.map_teardown
def events_read(ctx: TaskContext) -> None:
    ctx.emit("~events", ctx.state["events"])  # "~" sorts after the users' names


@job.reduce_setup
def start(ctx: TaskContext) -> None:
    ctx.state["users"] = 0


@job.reduce
def summary(user: str, amounts: list[float], ctx: TaskContext) -> Any:
    if user == "~events":
        return sum(amounts)
    ctx.state["users"] += 1
    return {"events": len(amounts), "usd": round(sum(amounts), 2), "largest": max(amounts)}


@job.reduce_teardown
def users_seen(ctx: TaskContext) -> None:
    ctx.emit(f"~users in {ctx.task}", ctx.state["users"])
