"""BlobStore on S3 (or any S3-compatible server) over aiobotocore.

Why it is shaped this way:

* **One client per event loop.** An aiobotocore client owns an aiohttp connection pool,
  and aiohttp objects are bound to the loop that created them. The store therefore opens
  its client lazily, on first use inside the running loop, and keeps it (and its warm
  keep-alive connections) for the store's life; ``aclose`` closes it. A store used from a
  second loop (e.g. two ``asyncio.run`` calls) gets a second client rather than a
  "attached to a different loop" crash.
* **Cheap stores.** The runtime opens a store per input URL, so creating one must not
  reparse botocore's service model (~50-100 ms): every session shares one botocore data
  loader, and each loop has one session, so credentials from the default chain (IRSA,
  instance profile) are resolved once per loop, not once per store.
* **Retries live in botocore.** ``retries={"mode": "standard"}`` already retries
  throttling (SlowDown, 503), 500s, RequestTimeout and connection errors with exponential
  backoff and jitter, for every request including each multipart part (its body is bytes,
  so botocore can resend it). botocore cannot retry a GET whose *body* breaks off midway,
  because that happens after it returned; ``get`` retries those itself.
* **Large objects go up in parts**, concurrently, bounded by one semaphore per loop sized
  to the connection pool, so parts never queue for a connection long enough to time out
  and at most that many part-sized copies of the payload exist at once. A failed or
  cancelled upload is aborted so its parts do not linger (and cost money) on the server.
* **Reads stream in large chunks** (1 MiB by default); the body's default async iterator
  yields 1 KiB at a time, which costs a Python round trip per KiB.
* **No secrets in text.** ``S3Config``'s repr hides the secret and session token, and
  errors are built from the operation, the ``s3://`` URL, the endpoint and the server's
  error code/message, never from request headers or credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal, Self

import aiohttp
import anyio
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.loaders import create_loader

from ..errors import KubemrError, UsageError
from ..scrub import scrub
from .base import BlobNotFound

log = logging.getLogger(__name__)

MiB = 1024 * 1024
#: S3's floor for every part but the last, and its cap on parts per upload.
MIN_PART_SIZE = 5 * MiB
MAX_PARTS = 10_000
#: DeleteObjects accepts at most this many keys per request.
DELETE_BATCH = 1000
#: Parts a streamed upload (``open_writer``) keeps in flight; its memory is this many parts
#: plus the one being filled.
_WRITER_PARTS_IN_FLIGHT = 2

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_ACCESS_CODES = frozenset({"AccessDenied", "403", "InvalidAccessKeyId",
                           "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"})
# botocore's own (lenient) bucket-name rule: legacy buckets may have capitals/underscores.
_BUCKET_RE = re.compile(r"^[A-Za-z0-9.\-_]{1,255}$")


def valid_bucket_name(bucket: str) -> bool:
    return bool(_BUCKET_RE.match(bucket))


class S3Error(KubemrError):
    """An S3 request failed after retries; the message names the operation and object.

    ``code`` is the server's error code when it answered with one, so callers that turn
    errors into advice for the user (input expansion) need not parse botocore's errors.
    """

    def __init__(self, message: str, code: str | None = None) -> None:
        # botocore's messages can carry a request's signature or a pre-signed URL.
        super().__init__(scrub(message))
        self.code = code

    @property
    def bucket_missing(self) -> bool:
        return self.code == "NoSuchBucket"

    @property
    def access_denied(self) -> bool:
        return self.code in _ACCESS_CODES


@dataclass(frozen=True, repr=False)
class S3Config:
    """How to reach S3. Credentials left as None come from botocore's default chain.

    That chain covers IRSA / web identity tokens, ``~/.aws`` and instance metadata, so a
    worker pod with a ServiceAccount role needs no keys in its environment.
    """

    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    #: None means "path" when ``endpoint_url`` is set (MinIO, versitygw, moto, Ceph on an IP
    #: or a name without wildcard DNS) and botocore's "auto" (virtual-hosted) for AWS.
    addressing_style: Literal["auto", "path", "virtual"] | None = None
    #: Connections per client; also bounds concurrent multipart parts per loop.
    max_pool_connections: int = 32
    #: Objects larger than this are uploaded in parts of ``multipart_part_size``.
    multipart_threshold: int = 16 * MiB
    multipart_part_size: int = 16 * MiB
    #: Bytes per read from a GET body.
    read_chunk_size: int = 1 * MiB
    #: Total attempts per request (botocore's ``max_attempts``, first try included), also
    #: used for our own retries of GET bodies that break off.
    max_attempts: int = 5
    retry_mode: Literal["standard", "adaptive", "legacy"] = "standard"
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    #: botocore >= 1.36 adds CRC checksums to every request it can ("when_supported"). AWS
    #: checks them (and over https they let botocore skip hashing the payload for SigV4),
    #: but several S3-compatible servers reject or mishandle them. None: on for AWS (no
    #: ``endpoint_url``), only where an operation requires one for custom endpoints.
    checksums: bool | None = None
    #: Whether SigV4 covers the body's SHA-256. None is botocore's rule: always over http,
    #: skipped over https when a checksum header protects the body. False saves the hashing
    #: CPU (~40% of a PUT's client time on loopback) at the price of integrity over http.
    payload_signing: bool | None = None

    def __post_init__(self) -> None:
        if self.multipart_part_size < MIN_PART_SIZE:
            raise ValueError(f"multipart_part_size must be at least {MIN_PART_SIZE} bytes "
                             f"(S3's minimum part size), got {self.multipart_part_size}")
        for name in ("max_pool_connections", "multipart_threshold", "read_chunk_size",
                     "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """Read the endpoint, region and credentials from the standard AWS variables.

        ``KUBEMR_S3_ENDPOINT`` (what the operator sets on worker pods) wins over
        ``AWS_ENDPOINT_URL_S3`` and ``AWS_ENDPOINT_URL``; keyword overrides win over all.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {
            "endpoint_url": (env.get("KUBEMR_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL_S3")
                             or env.get("AWS_ENDPOINT_URL") or None),
            "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            "access_key_id": env.get("AWS_ACCESS_KEY_ID") or None,
            "secret_access_key": env.get("AWS_SECRET_ACCESS_KEY") or None,
            "session_token": env.get("AWS_SESSION_TOKEN") or None,
        }
        values.update(overrides)
        return cls(**values)

    def with_options(self, **changes: Any) -> Self:
        """A copy with some fields changed (e.g. a low multipart threshold in a test)."""
        return replace(self, **changes)

    @property
    def resolved_addressing_style(self) -> str:
        if self.addressing_style is not None:
            return self.addressing_style
        return "path" if self.endpoint_url else "auto"

    def __repr__(self) -> str:
        # Hand-written so that no future field or dataclass default can leak a secret.
        secret = "<set>" if self.secret_access_key else None
        token = "<set>" if self.session_token else None
        return (f"S3Config(endpoint_url={self.endpoint_url!r}, region={self.region!r}, "
                f"access_key_id={self.access_key_id!r}, secret_access_key={secret}, "
                f"session_token={token}, "
                f"addressing_style={self.resolved_addressing_style!r}, "
                f"max_pool_connections={self.max_pool_connections}, "
                f"multipart_threshold={self.multipart_threshold}, "
                f"multipart_part_size={self.multipart_part_size}, "
                f"read_chunk_size={self.read_chunk_size}, max_attempts={self.max_attempts}, "
                f"retry_mode={self.retry_mode!r})")

    __str__ = __repr__

    def _aio_config(self) -> AioConfig:
        checksums = self.checksums if self.checksums is not None else not self.endpoint_url
        checksum = "when_supported" if checksums else "when_required"
        s3: dict[str, Any] = {"addressing_style": self.resolved_addressing_style}
        if self.payload_signing is not None:
            s3["payload_signing_enabled"] = self.payload_signing
        return AioConfig(
            region_name=self.region,
            signature_version="s3v4",
            s3=s3,
            retries={"mode": self.retry_mode, "total_max_attempts": self.max_attempts},
            max_pool_connections=self.max_pool_connections,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            request_checksum_calculation=checksum,
            response_checksum_validation=checksum,
        )


# One parsed copy of botocore's JSON models for the whole process: loaders are plain
# synchronous caches, safe to share across sessions and loops.
_LOADER = create_loader()
# One session per loop: sessions cache credentials behind asyncio locks, which are bound
# to the loop that first waits on them.
_SESSIONS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AioSession] = (
    weakref.WeakKeyDictionary())


def _session() -> AioSession:
    loop = asyncio.get_running_loop()
    session = _SESSIONS.get(loop)
    if session is None:
        session = AioSession()
        session.register_component("data_loader", _LOADER)
        _SESSIONS[loop] = session
    return session


class _LoopClient:
    """The client of one event loop, and the semaphore bounding its multipart parts."""

    def __init__(self, max_parts: int) -> None:
        self.lock = asyncio.Lock()
        self.parts = asyncio.Semaphore(max_parts)
        self.client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None

    async def open(self, config: S3Config) -> Any:
        async with self.lock:
            if self.client is None:
                stack = contextlib.AsyncExitStack()
                self.client = await stack.enter_async_context(_session().create_client(
                    "s3",
                    endpoint_url=config.endpoint_url,
                    region_name=config.region,
                    aws_access_key_id=config.access_key_id,
                    aws_secret_access_key=config.secret_access_key,
                    aws_session_token=config.session_token,
                    config=config._aio_config(),
                ))
                self._stack = stack
            return self.client

    async def close(self) -> None:
        stack, self._stack, self.client = self._stack, None, None
        if stack is not None:
            await stack.aclose()


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "Unknown"))


def _describe(exc: BaseException) -> str:
    """One line from a botocore/aiohttp error: the server's code and message, or the text.

    A ClientError's str() starts with "An error occurred (Code) when calling ...", which is
    noise once our message names the operation; botocore never puts credentials in either.
    """
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        retries = exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
        text = f"{error.get('Code', 'Unknown')}: {error.get('Message') or 'no message'}"
        return f"{text} (after {retries} retries)" if retries else text
    return str(exc) or type(exc).__name__


def _backoff(attempt: int, base: float = 0.1, cap: float = 10.0) -> float:
    """Full-jitter exponential backoff: spreads retries of many workers over time."""
    return random.uniform(0, min(cap, base * 2**attempt))


class S3BlobStore:
    """Objects live in one bucket; keys are S3 keys. See the module docstring for why."""

    def __init__(self, bucket: str, config: S3Config | None = None) -> None:
        if not valid_bucket_name(bucket):
            raise UsageError(f"invalid S3 bucket name {bucket!r}")
        self.bucket = bucket
        self.config = config if config is not None else S3Config()
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClient] = (
            weakref.WeakKeyDictionary())
        self._borrowed = False  # clients of another store (for_bucket): not ours to close

    @classmethod
    def from_env(cls, bucket: str) -> S3BlobStore:
        """A store for ``bucket`` configured from the environment (``S3Config.from_env``)."""
        return cls(bucket, S3Config.from_env())

    def for_bucket(self, bucket: str) -> S3BlobStore:
        """A store for ``bucket`` over this store's clients (and their warm connections),
        borrowed: closing it does nothing, closing this store closes them."""
        borrowed = S3BlobStore(bucket, self.config)
        borrowed._clients = self._clients
        borrowed._borrowed = True
        return borrowed

    async def warm_up(self) -> None:
        """Do now, on this loop, what a first request costs (~0.1 s: botocore parses its
        service model, the session resolves credentials, aiohttp makes its TLS context
        and connects): a warm pool's standby does it before any job exists, and the stores
        its job needs are then :meth:`for_bucket` of this one. The request is a
        ListBuckets (no bucket named, nothing written); its answer, a refusal included,
        does not matter."""
        client = await self._client()
        with contextlib.suppress(ClientError, BotoCoreError, aiohttp.ClientError):
            await client.list_buckets()

    def __repr__(self) -> str:
        return f"S3BlobStore(bucket={self.bucket!r}, config={self.config!r})"

    __str__ = __repr__

    # -- plumbing ---------------------------------------------------------------------

    def _loop_client(self) -> _LoopClient:
        loop = asyncio.get_running_loop()
        state = self._clients.get(loop)
        if state is None:
            state = _LoopClient(self.config.max_pool_connections)
            self._clients[loop] = state
        return state

    async def _client(self) -> Any:
        state = self._loop_client()
        return state.client if state.client is not None else await state.open(self.config)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _where(self, key: str | None) -> str:
        where = self.url(key) if key is not None else f"bucket {self.bucket!r}"
        if self.config.endpoint_url:
            where += f" at {self.config.endpoint_url}"
        return where

    @contextlib.contextmanager
    def _errors(self, op: str, key: str | None = None) -> Iterator[None]:
        """Turn botocore errors into BlobNotFound or one-line S3Errors naming the object."""
        try:
            yield
        except ClientError as exc:
            code = _error_code(exc)
            if key is not None and code in _NOT_FOUND_CODES:
                raise BlobNotFound(f"no object {self.url(key)}") from exc
            if code == "NoSuchBucket":
                raise S3Error(f"S3 {op} {self._where(key)} failed: bucket {self.bucket!r} "
                              f"does not exist", code) from exc
            raise S3Error(f"S3 {op} {self._where(key)} failed: {_describe(exc)}",
                          code) from exc
        except (BotoConnectionError, HTTPClientError) as exc:
            # Network-level failures: botocore already retried them max_attempts times.
            raise S3Error(f"S3 {op} {self._where(key)} failed after "
                          f"{self.config.max_attempts} attempts: {_describe(exc)}") from exc
        except BotoCoreError as exc:  # no credentials, invalid parameters, ...: not retried
            raise S3Error(f"S3 {op} {self._where(key)} failed: {_describe(exc)}") from exc

    # -- the BlobStore protocol -------------------------------------------------------

    async def put(self, key: str, data: bytes) -> None:
        """Write ``data``; S3 makes an object (multipart or not) visible only when complete."""
        if len(data) > self.config.multipart_threshold:
            await self._put_multipart(key, data)
            return
        client = await self._client()
        with self._errors("PutObject", key):
            await client.put_object(Bucket=self.bucket, Key=key, Body=data)

    async def _put_multipart(self, key: str, data: bytes) -> None:
        # Grow parts for huge objects so they fit S3's 10,000-part limit.
        part_size = max(self.config.multipart_part_size, -(-len(data) // MAX_PARTS))
        upload = await _Upload.create(self, key)
        try:
            async with anyio.create_task_group() as group:
                for number, offset in enumerate(range(0, len(data), part_size), start=1):
                    # The slice (a copy) is only made once the part may be sent.
                    group.start_soon(upload.send, number,
                                     partial(_slice, data, offset, part_size))
            await upload.complete()
        except BaseException:
            await upload.abort()
            raise

    @contextlib.asynccontextmanager
    async def open_writer(self, key: str) -> AsyncIterator[_S3Writer]:
        """A streamed upload: one PutObject if it stays small, else a multipart upload.

        At most ``_WRITER_PARTS_IN_FLIGHT`` parts are in flight (``write`` waits for a slot),
        so the writer holds a bounded number of part-sized buffers whatever the object's
        size. On failure in-flight parts are let finish before the abort (below).
        """
        writer = _S3Writer(self, key)
        failure: BaseException | None = None
        async with anyio.create_task_group() as group:
            writer.group = group
            try:
                yield writer
                await writer.flush(final=True)
            except BaseException as exc:
                failure = exc
                writer.stopped = True
                if isinstance(exc, anyio.get_cancelled_exc_class()):
                    group.cancel_scope.cancel()
        upload = writer.upload
        failure = failure or (upload.error if upload is not None else None)
        if failure is not None:
            if upload is not None:
                await upload.abort()
            raise failure
        if upload is None:
            client = await self._client()
            with self._errors("PutObject", key):
                await client.put_object(Bucket=self.bucket, Key=key, Body=bytes(writer.buffer))
        else:
            await upload.complete()

    async def _abort(self, client: Any, key: str, upload_id: str) -> None:
        """Best effort: the upload's stored parts are billed until aborted or expired.

        A part the server was still receiving when the abort arrived can be stored after it
        (S3 documents this), leaving the upload listed; so the abort is checked with
        ListParts and repeated until the upload is gone.
        """
        abort = asyncio.ensure_future(self._abort_until_gone(client, key, upload_id))
        try:
            await asyncio.shield(abort)  # a second cancel must not stop the abort itself
        except asyncio.CancelledError:
            log.warning("cancelled while aborting the multipart upload of %s; the abort "
                        "continues in the background", self.url(key))
            raise
        except Exception as exc:  # the original error matters more; this one is logged
            log.warning("could not abort the multipart upload of %s: %s", self.url(key),
                        _describe(exc))

    async def _abort_until_gone(self, client: Any, key: str, upload_id: str) -> None:
        for attempt in range(self.config.max_attempts):
            await client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            try:
                await client.list_parts(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except ClientError as exc:
                if _error_code(exc) in ("NoSuchUpload", "404"):
                    return
                raise
            await asyncio.sleep(_backoff(attempt))

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        """Bytes ``[start, end)``, clipped to the object; one ranged GET, read in big chunks."""
        if start < 0 or (end is not None and end < 0):
            raise ValueError(f"negative range [{start}, {end}) for {self.url(key)}")
        if end is not None and end <= start:
            await self.size(key)  # an empty range still says whether the object exists
            return b""
        attempt = 0
        while True:
            try:
                return await self._get_once(key, start, end)
            except (BotoCoreError, aiohttp.ClientError, TimeoutError) as exc:
                # Only body errors reach here (request errors are S3Errors already):
                # a connection dropped mid-stream. Retry the whole range.
                attempt += 1
                if attempt >= self.config.max_attempts:
                    raise S3Error(f"S3 GetObject {self._where(key)} failed reading the body "
                                  f"after {attempt} attempts: {_describe(exc)}") from exc
                log.debug("retrying GET %s after a broken body: %s", self.url(key),
                          _describe(exc))
                await asyncio.sleep(_backoff(attempt))

    async def _get_once(self, key: str, start: int, end: int | None) -> bytes:
        client = await self._client()
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        ranged = start > 0 or end is not None
        if ranged:
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            with self._errors("GetObject", key):
                resp = await client.get_object(**kwargs)
        except S3Error as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and _error_code(cause) == "InvalidRange":
                return b""  # start at or past the end (or an empty object): nothing to read
            if isinstance(cause, ClientError) and _error_code(cause) == "NoSuchBucket":
                raise BlobNotFound(f"no object {self.url(key)}: bucket {self.bucket!r} "
                                   f"does not exist") from cause
            raise
        chunks = []
        async with resp["Body"] as body:
            while chunk := await body.read(self.config.read_chunk_size):
                chunks.append(chunk)
        data = b"".join(chunks)
        if ranged and not resp.get("ContentRange"):
            # A server may ignore Range and send the whole object (200, not 206).
            return data[start:end]
        return data

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)``, clipped to the object: one ranged GET."""
        if length < 0:
            raise ValueError(f"negative length {length} for {self.url(key)}")
        return await self.get(key, offset, offset + length)

    async def size(self, key: str) -> int:
        client = await self._client()
        with self._errors("HeadObject", key):
            resp = await client.head_object(Bucket=self.bucket, Key=key)
        return int(resp["ContentLength"])

    async def list_sized(self, prefix: str) -> list[tuple[str, int]]:
        client = await self._client()
        found: list[tuple[str, int]] = []
        with self._errors(f"ListObjectsV2 prefix {prefix!r}"):
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                found.extend((obj["Key"], int(obj["Size"])) for obj in page.get("Contents", ()))
        # S3 already returns UTF-8 byte order, which equals str order; sort for other servers.
        found.sort()
        return found

    async def list(self, prefix: str) -> list[str]:
        return [key for key, _ in await self.list_sized(prefix)]

    async def delete_prefix(self, prefix: str) -> int:
        """Delete in DeleteObjects batches of 1000 (S3's cap), one request per batch."""
        keys = await self.list(prefix)
        client = await self._client()
        for lo in range(0, len(keys), DELETE_BATCH):
            batch = keys[lo:lo + DELETE_BATCH]
            with self._errors(f"DeleteObjects prefix {prefix!r}"):
                resp = await client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": k} for k in batch], "Quiet": True})
            # Another worker may have deleted some of these meanwhile (every worker cleans
            # up a decided job). S3 reports deleting a missing key as success; some
            # compatible servers answer NoSuchKey, which means the same here: it is gone.
            errors = [e for e in resp.get("Errors") or [] if e.get("Code") != "NoSuchKey"]
            if errors:
                first = errors[0]
                raise S3Error(f"S3 DeleteObjects {self._where(first.get('Key', ''))} failed: "
                              f"{first.get('Code')}: {first.get('Message')} "
                              f"({len(errors)} of {len(batch)} keys not deleted)")
        return len(keys)

    async def bucket_missing(self) -> bool:
        """Whether HeadBucket says the bucket does not exist (an empty listing cannot tell).

        Other answers (403 without ListBucket permission, ...) count as "not known to be
        missing": the caller's "contains no objects" is still true from where the user stands.
        """
        client = await self._client()
        try:
            with self._errors("HeadBucket"):
                await client.head_bucket(Bucket=self.bucket)
        except S3Error as exc:
            return exc.code in _NOT_FOUND_CODES
        return False

    async def aclose(self) -> None:
        """Close this loop's client; clients of other, still running loops close there."""
        if self._borrowed:
            return
        current = asyncio.get_running_loop()
        states = list(self._clients.items())
        self._clients.clear()
        for loop, state in states:
            if loop is current:
                await state.close()
            elif loop.is_running():
                asyncio.run_coroutine_threadsafe(state.close(), loop)
            # A stopped loop's client cannot be closed from here; dropping it is all we can do.


def _slice(data: bytes, offset: int, size: int) -> bytes:
    return data[offset:offset + size]


class _Upload:
    """One multipart upload: its parts are sent concurrently, completed or aborted once.

    A failed part does not cancel its siblings: a part cancelled on our side may still be
    stored by the server after the abort (the known flake of a failed upload staying
    listed), so parts already sent finish, parts not yet started are skipped, and the
    abort comes after all of them.
    """

    def __init__(self, store: S3BlobStore, client: Any, key: str, upload_id: str) -> None:
        self.store, self.client, self.key, self.upload_id = store, client, key, upload_id
        self.parts: list[dict[str, Any]] = []
        self.error: BaseException | None = None

    @classmethod
    async def create(cls, store: S3BlobStore, key: str) -> _Upload:
        client = await store._client()
        with store._errors("CreateMultipartUpload", key):
            created = await client.create_multipart_upload(Bucket=store.bucket, Key=key)
        return cls(store, client, key, created["UploadId"])

    async def send(self, number: int, body: Callable[[], bytes]) -> None:
        async with self.store._loop_client().parts:
            if self.error is not None:
                return
            try:
                with self.store._errors(f"UploadPart {number}", self.key):
                    resp = await self.client.upload_part(
                        Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id,
                        PartNumber=number, Body=body())
            except Exception as exc:
                self.error = self.error or exc
                return
        self.parts.append({"PartNumber": number, "ETag": resp["ETag"]})

    async def complete(self) -> None:
        if self.error is not None:
            raise self.error
        parts = sorted(self.parts, key=lambda part: int(part["PartNumber"]))
        with self.store._errors("CompleteMultipartUpload", self.key):
            await self.client.complete_multipart_upload(
                Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id,
                MultipartUpload={"Parts": parts})

    async def abort(self) -> None:
        await self.store._abort(self.client, self.key, self.upload_id)


class _S3Writer:
    """What ``S3BlobStore.open_writer`` yields: buffers to a part, then sends it."""

    def __init__(self, store: S3BlobStore, key: str) -> None:
        self.store, self.key = store, key
        self.buffer = bytearray()
        self.upload: _Upload | None = None
        self.group: Any = None
        self.stopped = False
        self._parts = 0
        self._slots = anyio.Semaphore(_WRITER_PARTS_IN_FLIGHT)

    async def write(self, data: bytes) -> None:
        if self.upload is not None and self.upload.error is not None:
            raise self.upload.error
        self.buffer += data
        await self.flush(final=False)

    async def flush(self, *, final: bool) -> None:
        """Send every full part; with ``final``, the rest too (unless one PutObject will do)."""
        small = len(self.buffer) <= self.store.config.multipart_threshold
        if final and self.upload is None and small:
            return
        part_size = self.store.config.multipart_part_size
        while len(self.buffer) >= part_size or (final and self.buffer):
            if self.upload is None:
                self.upload = await _Upload.create(self.store, self.key)
            body = bytes(self.buffer[:part_size])
            del self.buffer[:part_size]
            self._parts += 1
            await self._slots.acquire()
            self.group.start_soon(self._send, self._parts, body)

    async def _send(self, number: int, body: bytes) -> None:
        assert self.upload is not None
        try:
            if not self.stopped:
                await self.upload.send(number, lambda: body)
        finally:
            self._slots.release()
