"""S3BlobStore and expand_s3 against the real S3-compatible server (tests/fixtures_env.py).

Faults (throttling, 5xx, bodies cut off midway, a part that cannot be stored) come from
``FaultProxy``: a small HTTP proxy in front of the real server that forwards requests
untouched (the SigV4 signature covers the Host header, which it keeps) unless a rule
says otherwise. The config tests at the top need no server and are not marked.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from kubemr_async.errors import PermanentTaskError, UsageError
from kubemr_async.inputs import (
    expand_inputs,
    expand_s3,
    plan_splits,
    read_map_input,
    read_split,
    read_task_input,
)
from kubemr_async.storage.base import BlobNotFound
from kubemr_async.storage.s3 import MiB, S3BlobStore, S3Config, S3Error
from kubemr_async.storage.urls import open_url
from kubemr_async.testing import free_port
from kubemr_async.testing.faultproxy import FaultProxy, Seen, s3_error
from kubemr_async.testing.s3server import S3Server

from .backends import s3_config

pytestmark = pytest.mark.anyio

SECRET = "very-secret-value-0123456789"


def real_s3(fn: Any) -> Any:
    """Marks a test that needs the real S3 server."""
    return pytest.mark.s3(pytest.mark.slow(fn))


# -- configuration (no server) ----------------------------------------------------------


def test_config_from_env_reads_the_standard_variables() -> None:
    env = {"AWS_ENDPOINT_URL": "http://aws-endpoint:1", "AWS_DEFAULT_REGION": "eu-west-1",
           "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": SECRET}
    config = S3Config.from_env(env)
    assert (config.endpoint_url, config.region) == ("http://aws-endpoint:1", "eu-west-1")
    assert (config.access_key_id, config.secret_access_key) == ("AKIDEXAMPLE", SECRET)
    assert config.resolved_addressing_style == "path"
    env |= {"KUBEMR_S3_ENDPOINT": "http://kubemr:2", "AWS_REGION": "ap-south-1"}
    config = S3Config.from_env(env, max_pool_connections=4)
    assert (config.endpoint_url, config.region) == ("http://kubemr:2", "ap-south-1")
    assert config.max_pool_connections == 4
    # No endpoint: AWS itself, virtual-hosted style, credentials from botocore's chain.
    bare = S3Config.from_env({})
    assert bare.endpoint_url is None and bare.access_key_id is None
    assert bare.resolved_addressing_style == "auto"


def test_secret_never_appears_in_repr_or_str() -> None:
    config = S3Config(endpoint_url="http://127.0.0.1:9", access_key_id="AKIDEXAMPLE",
                      secret_access_key=SECRET, session_token=SECRET + "-token")
    store = S3BlobStore("bucket", config)
    for text in (repr(config), str(config), repr(store), str(store),
                 f"{config}", f"{store!r}", repr([config, store])):
        assert SECRET not in text
        assert "AKIDEXAMPLE" in text or "S3BlobStore" in text


def test_config_rejects_parts_smaller_than_s3_allows() -> None:
    with pytest.raises(ValueError, match="at least"):
        S3Config(multipart_part_size=MiB)


# -- fixtures ---------------------------------------------------------------------------


@dataclass
class Bucket:
    server: S3Server
    name: str
    stores: list[S3BlobStore] = field(default_factory=list)

    def store(self, **options: Any) -> S3BlobStore:
        store = S3BlobStore(self.name, s3_config(self.server, **options))
        self.stores.append(store)
        return store

    def url(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}"


@pytest.fixture
async def bucket(s3_server: S3Server) -> AsyncIterator[Bucket]:
    """A fresh, empty bucket; emptied (uploads aborted too) and removed afterwards."""
    b = Bucket(s3_server, f"t-{uuid.uuid4().hex[:16]}")
    admin = b.store()
    client = await admin._client()
    await client.create_bucket(Bucket=b.name)
    try:
        yield b
    finally:
        uploads = await client.list_multipart_uploads(Bucket=b.name)
        for up in uploads.get("Uploads", []):
            await client.abort_multipart_upload(Bucket=b.name, Key=up["Key"],
                                                UploadId=up["UploadId"])
        await admin.delete_prefix("")
        await client.delete_bucket(Bucket=b.name)
        for store in b.stores:
            await store.aclose()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point S3Config.from_env (what open_url / expand_s3 use) at the test server."""
    monkeypatch.delenv("KUBEMR_S3_ENDPOINT", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    for key, value in s3_server.client_env().items():
        monkeypatch.setenv(key, value)


# -- a fault-injecting proxy in front of the real server --------------------------------


@pytest.fixture
async def proxy(s3_server: S3Server) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(s3_server.endpoint_url) as p:
        yield p


def via(bucket: Bucket, proxy: FaultProxy, **options: Any) -> S3BlobStore:
    """A store that reaches the bucket through the proxy."""
    return bucket.store(endpoint_url=proxy.endpoint_url, **options)


# -- the store --------------------------------------------------------------------------


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@real_s3
async def test_multipart_round_trips_and_ranges_cross_part_boundaries(bucket: Bucket) -> None:
    store = bucket.store(multipart_threshold=MiB, multipart_part_size=5 * MiB,
                         max_pool_connections=2)
    data = payload(17 * MiB + 12345)
    await store.put("big/obj", data)
    head = await (await store._client()).head_object(Bucket=bucket.name, Key="big/obj")
    assert head["ETag"].strip('"').endswith("-4")  # really stored as 4 parts
    assert await store.size("big/obj") == len(data)
    assert await store.get("big/obj") == data
    b1, b2 = 5 * MiB, 10 * MiB
    for start, end in [(b1 - 10, b1 + 10), (b1 - 1, b1), (b1, b1 + 1), (b1 - 3, b2 + 3),
                       (2 * MiB, None), (len(data) - 5, len(data) + 100), (0, 1)]:
        assert await store.get("big/obj", start, end) == data[start:end], (start, end)
    # Several multipart uploads at once share the 2-connection part semaphore.
    others = [payload(6 * MiB, seed) for seed in range(1, 4)]
    await asyncio.gather(*(store.put(f"big/{i}", d) for i, d in enumerate(others)))
    for i, d in enumerate(others):
        assert await store.get(f"big/{i}") == d


@real_s3
async def test_edge_ranges_and_empty_objects(bucket: Bucket) -> None:
    store = bucket.store()
    await store.put("empty", b"")
    await store.put("ten", b"0123456789")
    assert await store.get("empty") == b""
    assert await store.get("empty", 0, 10) == b""
    assert await store.get("empty", 5) == b""
    assert await store.size("empty") == 0
    assert await store.get("ten", 10) == b""
    assert await store.get("ten", 50, 60) == b""
    assert await store.get("ten", 3, 3) == b""
    assert await store.get("ten", 9) == b"9"
    with pytest.raises(BlobNotFound, match=r"s3://.*/missing"):
        await store.get("missing", 3, 3)
    with pytest.raises(ValueError):
        await store.get("ten", -1)


@real_s3
async def test_delete_prefix_batches_past_1000_keys(bucket: Bucket, proxy: FaultProxy) -> None:
    store = via(bucket, proxy, max_pool_connections=64)
    keys = [f"many/{i:05d}" for i in range(1234)]
    await asyncio.gather(*(store.put(k, b"x") for k in keys))
    await store.put("keep/me", b"y")
    assert await store.list("many/") == keys
    assert await store.delete_prefix("many/") == 1234
    assert await store.list("") == ["keep/me"]
    deletes = [s for s in proxy.seen if s.method == "POST" and "delete" in s.query]
    assert len(deletes) == 2  # 1000 + 234


def delete_result(code: str) -> web.Response:
    """A DeleteObjects answer whose one per-key error is ``code``."""
    body = ('<?xml version="1.0" encoding="UTF-8"?><DeleteResult '
            'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Error><Key>race/a</Key>'
            f"<Code>{code}</Code><Message>injected {code}</Message></Error></DeleteResult>")
    return web.Response(status=200, body=body.encode(), content_type="application/xml")


@real_s3
@pytest.mark.parametrize(("code", "fails"), [("NoSuchKey", False), ("AccessDenied", True)])
async def test_delete_prefix_ignores_keys_another_worker_deleted_first(
        bucket: Bucket, proxy: FaultProxy, code: str, fails: bool) -> None:
    """Every worker cleans up a decided job, so a key can vanish while DeleteObjects runs;
    some S3 servers then answer NoSuchKey for it. That key is gone, as asked; any other
    per-key error is still a failure."""
    store = via(bucket, proxy)
    await store.put("race/a", b"1")

    async def answer(seen: Seen) -> web.Response | None:
        return delete_result(code) if seen.method == "POST" and "delete" in seen.query else None

    proxy.rule = answer
    if fails:
        with pytest.raises(S3Error, match=r"AccessDenied.*\(1 of 1 keys not deleted\)"):
            await store.delete_prefix("race/")
    else:
        assert await store.delete_prefix("race/") == 1


@real_s3
async def test_one_client_per_loop_for_the_store_life(bucket: Bucket) -> None:
    store = bucket.store()
    await store.put("a", b"1")
    client = await store._client()
    await asyncio.gather(*(store.get("a") for _ in range(20)))
    assert await store._client() is client
    await store.aclose()
    assert await store.get("a") == b"1"  # a closed store reopens lazily
    assert await store._client() is not client


@real_s3
def test_a_store_survives_being_used_from_two_event_loops(s3_server: S3Server) -> None:
    name = f"t-{uuid.uuid4().hex[:16]}"
    store = S3BlobStore(name, s3_config(s3_server))

    async def first() -> None:
        await (await store._client()).create_bucket(Bucket=name)
        await store.put("k", b"v")
        await store.aclose()  # a client is bound to its loop; the next loop opens its own

    async def second() -> bytes:
        try:
            return await store.get("k")
        finally:
            await store.delete_prefix("")
            await (await store._client()).delete_bucket(Bucket=name)
            await store.aclose()

    asyncio.run(first())
    assert asyncio.run(second()) == b"v"


# -- retries and errors -----------------------------------------------------------------


@real_s3
@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (500, "InternalError"),
                                              (400, "RequestTimeout")])
async def test_throttling_and_transient_errors_are_retried(
        bucket: Bucket, proxy: FaultProxy, status: int, code: str) -> None:
    async def flaky(seen: Seen) -> web.StreamResponse | None:
        return s3_error(status, code) if seen.n <= 2 else None

    proxy.rule = flaky
    store = via(bucket, proxy, max_attempts=4)
    await store.put("k", b"payload")
    assert await store.get("k", 1, 4) == b"ayl"
    assert proxy.count("PUT") == 3 and proxy.count("GET") == 3


@real_s3
async def test_a_throttled_part_is_retried_and_the_upload_completes(
        bucket: Bucket, proxy: FaultProxy) -> None:
    async def throttle_part_2(seen: Seen) -> web.StreamResponse | None:
        if seen.query.get("partNumber") == "2" and seen.n == 1:
            return s3_error(503, "SlowDown")
        return None

    proxy.rule = throttle_part_2
    store = via(bucket, proxy, multipart_threshold=MiB, multipart_part_size=5 * MiB)
    data = payload(12 * MiB)
    await store.put("mp", data)
    assert await store.get("mp") == data
    assert proxy.count("PUT", upload=True) == 4  # 3 parts + 1 retry


@real_s3
async def test_a_body_cut_off_midway_is_read_again(bucket: Bucket, proxy: FaultProxy) -> None:
    async def cut_first_get(seen: Seen) -> str | None:
        return "truncate" if seen.method == "GET" and seen.n == 1 else None

    proxy.rule = cut_first_get
    store = via(bucket, proxy)
    data = payload(3 * MiB)
    await store.put("obj", data)
    assert await store.get("obj", 100) == data[100:]
    assert proxy.count("GET") == 2


@real_s3
async def test_exhausted_retries_give_one_clear_line(bucket: Bucket, proxy: FaultProxy) -> None:
    async def always_slow(seen: Seen) -> web.StreamResponse:
        return s3_error(503, "SlowDown")

    proxy.rule = always_slow
    store = via(bucket, proxy, max_attempts=2)
    with pytest.raises(S3Error) as info:
        await store.put("dir/key", b"x")
    message = str(info.value)
    assert f"s3://{bucket.name}/dir/key" in message and "SlowDown" in message
    assert "PutObject" in message and "after 1 retries" in message and "\n" not in message
    assert proxy.count("PUT") == 2


@real_s3
async def test_a_failed_part_aborts_the_upload(bucket: Bucket, proxy: FaultProxy) -> None:
    async def reject_part_2(seen: Seen) -> web.StreamResponse | None:
        if seen.query.get("partNumber") == "2":
            return s3_error(400, "InvalidArgument")
        return None

    proxy.rule = reject_part_2
    store = via(bucket, proxy, multipart_threshold=MiB, multipart_part_size=5 * MiB)
    with pytest.raises(S3Error, match=rf"UploadPart 2 s3://{bucket.name}/mp .*InvalidArgument"):
        await store.put("mp", payload(12 * MiB))
    # AbortMultipartUpload; botocore may retry it when it races parts still being written.
    assert proxy.count("DELETE", upload=True) >= 1
    client = await bucket.store()._client()
    assert not (await client.list_multipart_uploads(Bucket=bucket.name)).get("Uploads")
    with pytest.raises(BlobNotFound):
        await store.size("mp")


@real_s3
async def test_a_cancelled_upload_is_aborted(bucket: Bucket, proxy: FaultProxy) -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def stall_parts(seen: Seen) -> None:
        if "partNumber" in seen.query:
            started.set()
            await release.wait()

    proxy.rule = stall_parts
    store = via(bucket, proxy, multipart_threshold=MiB, multipart_part_size=5 * MiB)
    task = asyncio.create_task(store.put("mp", payload(11 * MiB)))
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    assert proxy.count("DELETE", upload=True) >= 1
    client = await bucket.store()._client()
    assert not (await client.list_multipart_uploads(Bucket=bucket.name)).get("Uploads")


@real_s3
async def test_unreachable_endpoint_names_the_object(s3_server: S3Server) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    store = S3BlobStore("somebucket", s3_config(s3_server, endpoint_url=closed,
                                                 secret_access_key=SECRET,
                                                 max_attempts=2, connect_timeout=1.0))
    started = time.monotonic()
    try:
        with pytest.raises(S3Error) as info:
            await store.get("some/key")
    finally:
        await store.aclose()
    message = str(info.value)
    assert "s3://somebucket/some/key" in message and closed in message
    assert "Could not connect" in message and "2 attempts" in message
    assert SECRET not in message and "\n" not in message
    assert time.monotonic() - started < 10


@real_s3
async def test_wrong_secret_error_does_not_leak_it(bucket: Bucket) -> None:
    if bucket.server.kind == "moto":
        pytest.skip("moto's server mode accepts any signature")
    store = bucket.store(secret_access_key=SECRET)
    with pytest.raises(S3Error) as info:
        await store.put("k", b"x")
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    assert f"s3://{bucket.name}/k" in str(info.value)


@real_s3
async def test_missing_bucket(s3_server: S3Server) -> None:
    store = S3BlobStore("no-such-bucket-here", s3_config(s3_server))
    try:
        with pytest.raises(BlobNotFound):
            await store.get("k")
        with pytest.raises(S3Error, match="bucket 'no-such-bucket-here' does not exist"):
            await store.put("k", b"x")
    finally:
        await store.aclose()


# -- inputs -----------------------------------------------------------------------------


@pytest.fixture
async def inputs_bucket(bucket: Bucket) -> Bucket:
    store = bucket.store()
    objects = {"logs/2024-01.txt": b"a\n", "logs/2024-02.txt": b"bb\n",
               "logs/2023-12.txt": b"c\n", "logs/2024-03.csv": b"d\n",
               "logs/2024-sub/x.txt": b"e\n", "logs/.hidden.txt": b"h\n",
               "logs/folder/": b"", "data/part-1": b"1", "data/part-0": b"22",
               "data/.staging/part-9": b"9", "single.txt": b"xyz"}
    await asyncio.gather(*(store.put(k, v) for k, v in objects.items()))
    return bucket


@real_s3
async def test_expand_s3_key_prefix_and_glob(inputs_bucket: Bucket, s3_env: None) -> None:
    b = inputs_bucket
    assert await expand_s3(b.url("single.txt")) == [(b.url("single.txt"), 3)]
    expected_data = [(b.url("data/part-0"), 2), (b.url("data/part-1"), 1)]
    assert await expand_s3(b.url("data/")) == expected_data
    assert await expand_s3(b.url("data")) == expected_data  # not an object: a prefix
    assert await expand_s3(b.url("logs/2024-*.txt")) == [
        (b.url("logs/2024-01.txt"), 2), (b.url("logs/2024-02.txt"), 3)]
    assert [u for u, _ in await expand_s3(b.url("logs/**/*.txt"))] == [
        b.url(k) for k in ["logs/2023-12.txt", "logs/2024-01.txt", "logs/2024-02.txt",
                           "logs/2024-sub/x.txt"]]
    assert [u for u, _ in await expand_s3(b.url("logs/202?-0[13].*"))] == [
        b.url("logs/2024-01.txt"), b.url("logs/2024-03.csv")]
    assert len(await expand_s3(f"s3://{b.name}")) == 8  # whole bucket, hidden/markers skipped
    # The same through the generic input planner.
    assert await expand_inputs([b.url("single.txt"), b.url("data/")]) == \
        [(b.url("single.txt"), 3), *expected_data]


@real_s3
@pytest.mark.parametrize(("pattern", "message"), [
    ("s3://no-such-bucket-kubemr/x.txt", "bucket 'no-such-bucket-kubemr' does not exist"),
    ("s3://no-such-bucket-kubemr/logs/*.txt", "bucket 'no-such-bucket-kubemr' does not exist"),
    ("s3://no-such-bucket-kubemr/logs/", "bucket 'no-such-bucket-kubemr' does not exist"),
    ("{bucket}/logs/*.parquet", "matches no objects"),
    ("{bucket}/nothing/", "contains no objects"),
    ("{bucket}/missing.txt", "does not exist"),
    ("s3:///key", "invalid S3 URL"),
    ("s3://bad bucket!/key", "invalid S3 URL"),
])
async def test_expand_s3_names_the_problem(inputs_bucket: Bucket, s3_env: None, pattern: str,
                                           message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        await expand_s3(pattern.format(bucket=f"s3://{inputs_bucket.name}"))
    assert "\n" not in str(info.value)


@real_s3
async def test_s3_hidden_objects_are_skipped_and_compressed_ones_are_one_split(
        bucket: Bucket, s3_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import gzip

    from kubemr_async import inputs

    text = b"".join(b"word %d\n" % i for i in range(5000))
    packed = gzip.compress(text[:100]) + gzip.compress(text[100:])  # two members
    store = bucket.store()
    objects = {"run/part-00000.gz": packed, "run/part-00001": b"plain\n",
               "run/_SUCCESS": b'{"parts": []}', "run/.part-00000.crc": b"crc",
               "run/_temporary/0/part-9": b"partial", "run/sub/.hidden/x": b"x",
               "run/cut.gz": packed[:-10], "only-hidden/_SUCCESS": b"{}"}
    await asyncio.gather(*(store.put(k, v) for k, v in objects.items()))
    data = [(bucket.url("run/cut.gz"), len(packed) - 10),
            (bucket.url("run/part-00000.gz"), len(packed)), (bucket.url("run/part-00001"), 6)]
    assert await expand_s3(bucket.url("run/")) == data
    assert await expand_s3(bucket.url("run")) == data
    assert await expand_s3(bucket.url("run/*")) == data
    assert await expand_s3(bucket.url("run/_SUCCESS")) == [(bucket.url("run/_SUCCESS"), 13)]
    with pytest.raises(UsageError, match="contains no data objects \\(names starting with _"):
        await expand_s3(bucket.url("only-hidden/"))
    with pytest.raises(UsageError, match="matches no data objects"):
        await expand_s3(bucket.url("run/_*"))
    # The compressed object is one split, read in ranged windows (here, many: the members
    # end inside them) and decoded in pieces; a truncated one is an error.
    assert plan_splits(data, 1024)[:2] == [(data[0][0], (0, data[0][1])),
                                           (data[1][0], (0, len(packed)))]
    monkeypatch.setattr(inputs, "_COMPRESSED_WINDOW", 1000)
    pieces = [piece async for piece in
              read_map_input(store, "run/part-00000.gz", (0, len(packed)), "text", 4096)]
    assert len(pieces) > 5 and b"".join(pieces) == text
    with pytest.raises(PermanentTaskError, match=f"^input s3://{bucket.name}/run/cut.gz is "
                                                 "not valid gzip data: the file is truncated"):
        [_ async for _ in read_map_input(store, "run/cut.gz", (0, len(packed) - 10), "lines",
                                         4096)]


@real_s3
async def test_read_split_on_s3_matches_the_local_file(bucket: Bucket, s3_env: None,
                                                       tmp_path: Path) -> None:
    rng = random.Random(7)
    text = b"".join(b"line %d %s\n" % (i, b"x" * rng.randrange(0, 300)) for i in range(3000))
    text += b"last line without newline"
    local = tmp_path / "input.txt"
    local.write_bytes(text)
    await bucket.store().put("in/input.txt", text)

    async def lines(url: str) -> list[bytes]:
        [(found, size)] = await expand_inputs([url])
        store, key = open_url(found)
        try:
            out = []
            for _, (start, end) in plan_splits([(found, size)], 4096):  # type: ignore[misc]
                out.append(await read_split(store, key, start, end, size))
            return out
        finally:
            await store.aclose()

    s3_splits = await lines(bucket.url("in/input.txt"))
    local_splits = await lines(str(local))
    assert s3_splits == local_splits
    assert b"".join(s3_splits) == text
    assert len(s3_splits) > 50



@real_s3
async def test_an_input_shortened_or_replaced_after_planning_is_an_error(
        bucket: Bucket, s3_env: None) -> None:
    """Splits are cut from the sizes listed at planning: an object that is shorter when a
    task reads it (truncated, replaced) must fail that task naming it, not give its lost
    splits no lines (a job succeeding on part of its input)."""
    import gzip

    store = bucket.store()
    text = b"".join(b"line%05d\n" % i for i in range(3000))  # 30,000 bytes
    await store.put("in/log.txt", text)
    await store.put("in/log.gz", gzip.compress(text))
    splits = plan_splits(await expand_s3(bucket.url("in/")), 10_000)
    assert [rng for _, rng in splits][-1:] == [(20_000, 30_000)]
    await store.put("in/log.txt", text[:15_000])
    await store.put("in/log.gz", gzip.compress(text + text))
    with pytest.raises(PermanentTaskError, match="changed after the job was planned"):
        await read_task_input(store, "in/log.txt", splits[-1][1])
    for url, rng in (splits[0], splits[-1]):
        key = url[len(bucket.url()):]
        for kind in ("lines", "text"):
            with pytest.raises(PermanentTaskError, match=f"^input {url} changed after the "
                                                         "job was planned: it is .* bytes now"):
                [_ async for _ in read_map_input(store, key, rng, kind, 10_000)]
    # A split the shorter object still covers reads as before.
    assert splits[1][1] == (0, 10_000)
    assert await read_task_input(store, "in/log.txt", splits[1][1]) == text[:10_000]
