"""Output formats, text-mode bytes and key types end to end: `kubemr run` in real processes,
and a worker against S3 whose result location `read_results` reads back."""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from kubemr_async import formats, protocol, read_results
from kubemr_async.api import load_job
from kubemr_async.errors import UsageError
from kubemr_async.inputs import plan_inputs
from kubemr_async.protocol import JobPhase
from kubemr_async.runtime import Worker
from kubemr_async.spec import JobSpec
from kubemr_async.state.sqlite import SQLiteStateStore
from kubemr_async.storage.s3 import S3BlobStore
from kubemr_async.testing.s3server import S3Server

from .backends import s3_config

ROOT = Path(__file__).resolve().parents[1]
KUBEMR = str(Path(sys.executable).parent / "kubemr")
DATA = ROOT / "examples" / "data"

TEXT_WORDS = """
from kubemr_async import Job
job = Job("textwords")

@job.map
async def m(text, ctx):
    for w in text.split():
        yield w, 1

job.reduce("sum")
"""

MIXED_KEYS = """
from kubemr_async import Job
job = Job("mixedkeys")

@job.map
async def m(text, ctx):
    for w in text.split():
        yield (int(w) if w.isdigit() else w), 1

job.reduce("sum")
"""

TAB_KEY = """
from kubemr_async import Job
job = Job("tabkey")

@job.map
async def m(text, ctx):
    for w in text.split():
        yield "with\\ttab", w

@job.reduce
async def r(key, values, ctx):
    for v in values:
        yield v
"""


def kubemr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KUBEMR, *args], capture_output=True, text=True, timeout=300)


def write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def as_bytes(word: Any) -> bytes:
    return word if isinstance(word, bytes) else str(word).encode("utf-8", "surrogateescape")


def counts(location: Path | str) -> dict[bytes, int]:
    pairs = list(read_results(location))
    result = {as_bytes(k): int(v) for k, v in pairs}
    assert len(result) == len(pairs), "a word appears in two parts"
    return result


# Bytes that str.split() treats as whitespace but bytes.split() does not are left out, so
# the job's str.split() and the bytes.split() reference agree on the words.
_STR_ONLY_SPACE = {0x1C, 0x1D, 0x1E, 0x1F, 0x85, 0xA0}


def corpus(kind: str) -> bytes:
    if kind == "latin1":
        return ("Café crème, naïve façade; déjà vu. Ça va? ÉTÉ été\n" * 50).encode("latin-1")
    raw = random.Random(11).randbytes(60_000)
    return bytes(b for b in raw if b not in _STR_ONLY_SPACE)


@pytest.mark.parametrize("kind", ["latin1", "random"])
def test_text_mode_words_are_the_input_bytes(tmp_path: Path, kind: str) -> None:
    data = corpus(kind)
    words = data.decode("utf-8", "surrogateescape").split()
    assert [w.encode("utf-8", "surrogateescape") for w in words] == data.split()
    reference = Counter(data.split())
    source = write(tmp_path / "in.bin", data)
    job = write(tmp_path / "job.py", TEXT_WORDS)
    out = tmp_path / "text"
    result = kubemr("run", str(job), "-i", str(source), "--output", str(out), "--reducers", "3",
                    "--chunk-size", "8k")
    assert result.returncode == 0, result.stderr
    lines = sorted(line for part in sorted(out.glob("part-*"))
                   for line in part.read_bytes().splitlines())
    assert lines == sorted(w + b"\t" + str(n).encode() for w, n in reference.items())
    assert counts(out) == reference
    out = tmp_path / "jsonl"
    result = kubemr("run", str(job), "-i", str(source), "--output", str(out), "--format", "jsonl")
    assert result.returncode == 0, result.stderr
    assert counts(out) == reference
    # A parquet string column holds UTF-8 only: the task fails naming an undecodable key.
    result = kubemr("run", str(job), "-i", str(source), "--output", str(tmp_path / "pq"),
                    "--format", "parquet")
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert re.search(r"task reduce-\d{5} attempt 1: FormatError: key '.*' holds bytes that "
                     r"are not UTF-8", error), error


@pytest.mark.parametrize("fmt", ["text", "jsonl", "parquet"])
def test_each_format_end_to_end(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "out"
    result = kubemr("run", str(ROOT / "examples" / "wordcount.py"), "-i", str(DATA),
                    "--output", str(out), "--reducers", "2", "--format", fmt)
    assert result.returncode == 0, result.stderr
    reference = Counter(w for path in sorted(DATA.iterdir()) for w in path.read_bytes().split())
    assert counts(out) == reference
    manifest = json.loads((out / "_SUCCESS").read_text())
    suffix = {"text": "", "jsonl": ".jsonl", "parquet": ".parquet"}[fmt]
    assert manifest["format"] == fmt
    assert manifest["parts"] == [f"part-0000{r}{suffix}" for r in range(2)]
    assert sorted(p.name for p in out.iterdir()) == sorted([*manifest["parts"], "_SUCCESS",
                                                            "_logs"])
    if fmt == "parquet":
        # Readable by another tool, with plain types: the example emits bytes words.
        tables = [pq.read_table(out / part) for part in manifest["parts"]]
        assert all(str(t.schema.field("key").type) == "binary" for t in tables)
        assert all(str(t.schema.field("value").type) == "int64" for t in tables)
        assert sum(sum(t.column("value").to_pylist()) for t in tables) == reference.total()


@pytest.mark.parametrize(("chunk_size", "workers"), [("64MiB", "1"), ("1k", "1"), ("1k", "3")])
def test_mixed_key_types_fail_at_a_map_naming_both(tmp_path: Path, chunk_size: str,
                                                   workers: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write(data / "a-numbers.txt", "".join(f"{i} {i * 7}\n" for i in range(600)))
    write(data / "b-words.txt", "some words here\n" * 300)
    result = kubemr("run", str(write(tmp_path / "job.py", MIXED_KEYS)), "-i", str(data),
                    "--output", str(tmp_path / "out"), "--chunk-size", chunk_size,
                    "--workers", workers, "--reducers", "2", "--max-attempts", "3")
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    # A map fails (or, if two maps committed at one instant, the reduce) at its first attempt.
    match = re.search(r"task (map|reduce)-\d{5} attempt 1: PermanentTaskError: (map-\d{5}) "
                      r"emitted keys of type (int|str) but (map-\d{5}) emitted (int|str); "
                      r"a job's keys must share one type", error)
    assert match, error
    assert match[3] != match[5] and match[2] != match[4]
    assert not (tmp_path / "out").exists()


def test_text_refuses_a_key_with_a_tab_and_jsonl_keeps_it(tmp_path: Path) -> None:
    source = write(tmp_path / "in.txt", "alpha beta\n")
    job = write(tmp_path / "job.py", TAB_KEY)
    result = kubemr("run", str(job), "-i", str(source), "--output", str(tmp_path / "text"))
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert re.search(r"task reduce-\d{5} attempt 1: FormatError: key 'with\\ttab' contains "
                     r"a TAB", error), error
    assert "use --format jsonl or parquet" in error
    result = kubemr("run", str(job), "-i", str(source), "--output", str(tmp_path / "jsonl"),
                    "--format", "jsonl")
    assert result.returncode == 0, result.stderr
    assert sorted(read_results(tmp_path / "jsonl")) == [("with\ttab", "alpha"),
                                                        ("with\ttab", "beta")]


def test_bad_format_flag_and_a_location_without_results(tmp_path: Path) -> None:
    result = kubemr("run", str(ROOT / "examples" / "wordcount.py"), "-i", str(DATA), "--output",
                    str(tmp_path / "out"), "--format", "csv")
    assert result.returncode == 2
    assert "spec.outputFormat" in result.stderr and "text, jsonl, parquet" in result.stderr
    (tmp_path / "half").mkdir()
    write(tmp_path / "half" / "part-00000", "a\t1\n")
    with pytest.raises(UsageError, match=r"half: no _SUCCESS manifest"):
        list(read_results(tmp_path / "half"))


def test_a_result_part_cut_short_since_is_refused_not_read(tmp_path: Path) -> None:
    """A part truncated at a line boundary (a failed copy, a disk that filled) still
    decodes; read_results must not present what is left as the job's result."""
    out = tmp_path / "out"
    result = kubemr("run", str(ROOT / "examples" / "wordcount.py"), "-i", str(DATA),
                    "--output", str(out), "--reducers", "2", "--no-progress")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "_SUCCESS").read_bytes())
    assert manifest["sizes"] == [(out / part).stat().st_size for part in manifest["parts"]]
    assert counts(out)  # as written, it reads
    part = out / manifest["parts"][0]
    data = part.read_bytes()
    part.write_bytes(data[:data.rindex(b"\n", 0, len(data) - 1) + 1])
    with pytest.raises(UsageError, match="bytes where the job wrote"):
        list(read_results(out))


@pytest.mark.anyio
@pytest.mark.parametrize("reducers", [2, 20])  # the parts' sizes: a HEAD each; a listing
async def test_a_worker_on_s3_leaves_a_self_describing_result_location(
        tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch,
        reducers: int) -> None:
    for key, value in s3_server.client_env().items():
        monkeypatch.setenv(key, value)
    for key in ("KUBEMR_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    blobs = S3BlobStore(bucket, s3_config(s3_server))
    client = await blobs._client()
    await client.create_bucket(Bucket=bucket)
    store = SQLiteStateStore(tmp_path / "state.db")
    try:
        job_ref = str(ROOT / "examples" / "wordcount.py")
        spec = JobSpec(name="wc-s3", job=job_ref, inputs=(str(DATA),), reducers=reducers,
                       chunk_size=4096, output_format="jsonl")
        splits = await plan_inputs(spec)
        await store.create(spec.name, [(protocol.JOB_KEY, protocol.new_job(spec))])
        await store.create(spec.name, protocol.plan(spec, splits))
        records, _ = await store.snapshot(spec.name)
        await store.patch(spec.name, protocol.start_job(records[protocol.JOB_KEY].body,
                                                        len(splits)))
        worker = Worker(spec.name, load_job(job_ref), store, blobs, "w-1",
                        data_prefix="results/wc-s3")
        assert await worker.run() == JobPhase.SUCCEEDED
        location = f"s3://{bucket}/results/wc-s3"
        manifest = json.loads(await blobs.get("results/wc-s3/_SUCCESS"))
        assert manifest["format"] == "jsonl" and manifest["job"] == "wc-s3"
        assert manifest["parts"] == [f"output/part-{r:05d}.attempt-1.jsonl"
                                     for r in range(reducers)]
        assert manifest["results"] == [f"{location}/{part}" for part in manifest["parts"]]
        reference = Counter(w for p in sorted(DATA.iterdir()) for w in p.read_bytes().split())
        assert counts(location) == reference
        sizes = [await blobs.size(f"results/wc-s3/{part}") for part in manifest["parts"]]
        assert manifest["sizes"] == sizes
        with pytest.raises(UsageError, match="no _SUCCESS manifest"):
            list(read_results(f"s3://{bucket}/results/elsewhere"))
        # A part rewritten since, one whole line shorter: never read as the result.
        cut = next(r for r, size in enumerate(sizes) if size)
        part = f"results/wc-s3/{manifest['parts'][cut]}"
        lines = (await blobs.get(part)).splitlines(keepends=True)
        await blobs.put(part, b"".join(lines[:-1]))
        with pytest.raises(UsageError, match=rf"part-{cut:05d}.*: "
                                             rf"{sizes[cut] - len(lines[-1])} bytes where the "
                                             rf"job wrote {sizes[cut]}"):
            await asyncio.to_thread(lambda: list(read_results(location)))
    finally:
        await store.aclose()
        await blobs.delete_prefix("")
        await client.delete_bucket(Bucket=bucket)
        await blobs.aclose()


@pytest.mark.anyio
async def test_an_s3_manifest_naming_a_local_file_is_refused(
        tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever can write a job's result location must not make ``read_results`` read the
    reader's own files: kubemr's S3 manifests name S3 parts only."""
    for key, value in s3_server.client_env().items():
        monkeypatch.setenv(key, value)
    private = tmp_path / "private.tsv"
    write(private, "secret\tvalue\n")
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    blobs = S3BlobStore(bucket, s3_config(s3_server))
    client = await blobs._client()
    await client.create_bucket(Bucket=bucket)
    try:
        await blobs.put("r/_SUCCESS", formats.manifest("j", "text", [], [str(private)], [0]))
        with pytest.raises(UsageError, match="names the local file"):
            await asyncio.to_thread(lambda: list(read_results(f"s3://{bucket}/r")))
    finally:
        await blobs.delete_prefix("")
        await client.delete_bucket(Bucket=bucket)
        await blobs.aclose()
