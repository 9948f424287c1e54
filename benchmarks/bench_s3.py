"""S3BlobStore throughput against the local S3 server: one request at a time vs many.

Usage::

    python benchmarks/bench_s3.py [--objects 64] [--size-mib 4] [--concurrency 1,16]
                                  [--repeat 2] [--big-mib 256] [--no-boto3]

Starts ``kubemr_async.testing.s3server.S3Server`` (versitygw when hack/ensure-s3-server.sh
could build it, else moto) unless ``--endpoint`` points at a running server (credentials
then come from the AWS_* environment variables). For each concurrency it PUTs every object,
then GETs every object back (checked byte for byte outside the timed region) and reports
MB/s (10^6 bytes per wall-clock second) with the speed-up over the first concurrency: the
ratio is the figure to compare across machines, as it survives their different speeds.

Also measured: PUTs without SigV4 payload hashing (``payload_signing=False``); one large
object written with multipart upload (parts in flight up to the pool size) and read back
with parallel ranged GETs, against the same object as one PUT and one GET; and, as an
outside reference, boto3 (synchronous, one request at a time) on the same objects.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from kubemr_async.storage.s3 import MiB, S3BlobStore, S3Config
from kubemr_async.testing.s3server import S3Server


@dataclass
class Row:
    op: str
    how: str
    nbytes: int
    seconds: float
    baseline: float | None = None  # seconds of the row this one is compared to

    @property
    def mbps(self) -> float:
        return self.nbytes / self.seconds / 1e6

    @property
    def ratio(self) -> str:
        return "1.00x" if self.baseline is None else f"{self.baseline / self.seconds:.2f}x"


async def bounded(n: int, jobs: Sequence[Callable[[], Awaitable[Any]]]) -> float:
    """Run ``jobs`` with at most ``n`` in flight; return the wall time."""
    sem = asyncio.Semaphore(n)

    async def one(job: Callable[[], Awaitable[Any]]) -> None:
        async with sem:
            await job()

    start = time.perf_counter()
    await asyncio.gather(*(one(j) for j in jobs))
    return time.perf_counter() - start


async def best(repeat: int, run: Callable[[], Awaitable[float]]) -> float:
    return min([await run() for _ in range(repeat)])


async def bench(config: S3Config, args: argparse.Namespace) -> list[Row]:
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    levels = [int(c) for c in args.concurrency.split(",")]
    config = config.with_options(max_pool_connections=max([*levels, 16]))
    store = S3BlobStore(bucket, config)
    client = await store._client()
    await client.create_bucket(Bucket=bucket)
    size = int(args.size_mib * MiB)
    payloads = [os.urandom(size) for _ in range(args.objects)]
    total = size * args.objects
    keys = [f"obj/{i:05d}" for i in range(args.objects)]
    rows: list[Row] = []
    got: dict[str, bytes] = {}

    async def fetch(key: str) -> None:
        got[key] = await store.get(key)

    def puts() -> list[Callable[[], Awaitable[Any]]]:
        return [partial(store.put, k, p) for k, p in zip(keys, payloads, strict=True)]

    def gets() -> list[Callable[[], Awaitable[Any]]]:
        return [partial(fetch, k) for k in keys]

    try:
        # Untimed warm-up: the server's first writes into a fresh bucket (directories,
        # heap growth) and our connection pool would otherwise be charged to row one.
        await bounded(max(levels), puts())
        await bounded(max(levels), gets())
        put_base = get_base = None
        for n in levels:
            put_s = await best(args.repeat, partial(bounded, n, puts()))
            got.clear()
            get_s = await best(args.repeat, partial(bounded, n, gets()))
            if [got[k] for k in keys] != payloads:
                raise SystemExit("GET returned different bytes than were PUT")
            how = f"{args.objects} x {args.size_mib:g} MiB, {n} in flight"
            rows.append(Row("put", how, total, put_s, put_base))
            rows.append(Row("get", how, total, get_s, get_base))
            put_base = put_base or put_s
            get_base = get_base or get_s

        # The same PUTs without SigV4 hashing each body (S3Config.payload_signing=False).
        unsigned = S3BlobStore(bucket, config.with_options(payload_signing=False))
        try:
            n = max(levels)
            jobs = [partial(unsigned.put, k, p) for k, p in zip(keys, payloads, strict=True)]
            await bounded(n, jobs[:n])  # open its connections untimed
            signed = next(r for r in rows if r.op == "put" and r.how.endswith(f" {n} in flight"))
            rows.append(Row("put", f"{args.objects} x {args.size_mib:g} MiB, {n} in flight, "
                            "unsigned", total, await best(args.repeat, partial(bounded, n, jobs)),
                            signed.seconds))
        finally:
            await unsigned.aclose()
        if args.big_mib:
            rows += await bench_big(store, config, bucket, args)
        if not args.no_boto3:
            rows += bench_boto3(config, bucket, keys, payloads, rows, args)
    finally:
        await store.delete_prefix("")
        await client.delete_bucket(Bucket=bucket)
        await store.aclose()
    return rows


async def bench_big(store: S3BlobStore, config: S3Config, bucket: str,
                    args: argparse.Namespace) -> list[Row]:
    """One big object: single PUT/GET vs multipart PUT and parallel ranged GETs."""
    big = os.urandom(args.big_mib * MiB)
    part = config.multipart_part_size
    single = S3BlobStore(bucket, config.with_options(multipart_threshold=len(big) + 1))
    try:
        one_put = await best(args.repeat, partial(bounded, 1, [partial(single.put, "big1", big)]))
        one_get = await best(args.repeat, partial(bounded, 1, [partial(single.get, "big1")]))
    finally:
        await single.aclose()
    mp_put = await best(args.repeat, partial(bounded, 1, [partial(store.put, "big2", big)]))
    pieces: dict[int, bytes] = {}

    async def piece(lo: int) -> None:
        pieces[lo] = await store.get("big2", lo, lo + part)

    ranged = [partial(piece, lo) for lo in range(0, len(big), part)]
    mp_get = await best(args.repeat, partial(bounded, config.max_pool_connections, ranged))
    if b"".join(pieces[k] for k in sorted(pieces)) != big:
        raise SystemExit("ranged GETs returned different bytes than were PUT")
    how = f"1 x {args.big_mib} MiB"
    parts = f"{-(-len(big) // part)} x {part // MiB} MiB"
    return [Row("put", f"{how}, one request", len(big), one_put),
            Row("get", f"{how}, one request", len(big), one_get),
            Row("put", f"{how}, multipart {parts}", len(big), mp_put, one_put),
            Row("get", f"{how}, ranged {parts}", len(big), mp_get, one_get)]


def bench_boto3(config: S3Config, bucket: str, keys: list[str], payloads: list[bytes],
                rows: list[Row], args: argparse.Namespace) -> list[Row]:
    """Reference: boto3's synchronous client, one request at a time, same objects."""
    try:
        import boto3  # type: ignore[import-untyped]
        from botocore.config import Config
    except ImportError:
        return []
    client = boto3.client(
        "s3", endpoint_url=config.endpoint_url, region_name=config.region,
        aws_access_key_id=config.access_key_id, aws_secret_access_key=config.secret_access_key,
        config=Config(s3={"addressing_style": config.resolved_addressing_style},
                      request_checksum_calculation="when_required",
                      response_checksum_validation="when_required"))
    start = time.perf_counter()
    for k, p in zip(keys, payloads, strict=True):
        client.put_object(Bucket=bucket, Key=f"boto3/{k}", Body=p)
    put_s = time.perf_counter() - start
    start = time.perf_counter()
    for k in keys:
        client.get_object(Bucket=bucket, Key=f"boto3/{k}")["Body"].read()
    get_s = time.perf_counter() - start
    client.close()
    total = sum(map(len, payloads))
    how = f"{len(keys)} x {args.size_mib:g} MiB, boto3 sync"
    return [Row("put", how, total, put_s, rows[0].seconds),
            Row("get", how, total, get_s, rows[1].seconds)]


def print_table(rows: list[Row], server: str) -> None:
    print(f"\nS3BlobStore throughput against {server} on {platform.node()} "
          f"({os.cpu_count()} CPUs, Python {platform.python_version()})")
    print("ratio: speed relative to the first row of the same kind (1 in flight for the "
          "small objects, one request for the big one; unsigned vs signed at the same "
          "concurrency; boto3 vs our 1 in flight)\n")
    header = f"{'op':<4} {'workload':<46} {'seconds':>8} {'MB/s':>8} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.op:<4} {r.how:<46} {r.seconds:>8.2f} {r.mbps:>8.1f} {r.ratio:>7}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=64)
    parser.add_argument("--size-mib", type=float, default=4)
    parser.add_argument("--concurrency", default="1,16",
                        help="comma-separated in-flight levels; the first is the baseline")
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs per row")
    parser.add_argument("--big-mib", type=int, default=256,
                        help="size of the multipart object (0 to skip)")
    parser.add_argument("--no-boto3", action="store_true", help="skip the boto3 reference")
    parser.add_argument("--endpoint", help="use a running server instead of starting one")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.endpoint:
        rows = asyncio.run(bench(S3Config.from_env(endpoint_url=args.endpoint), args))
        kind = args.endpoint
    else:
        with S3Server() as server:
            config = S3Config(endpoint_url=server.endpoint_url, region=server.region,
                              access_key_id=server.access_key,
                              secret_access_key=server.secret_key)
            rows = asyncio.run(bench(config, args))
            kind = f"{server.kind} at {server.endpoint_url}"
    print_table(rows, kind)
    print(f"\n(total {time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
