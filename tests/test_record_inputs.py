"""Per-record map inputs (lines, JSON Lines, CSV, Parquet) and setup/teardown hooks.

The end-to-end cases run the real `kubemr run` (worker processes, the SQLite store, files
on disk) with chunks small enough that files are split several ways, and compare the
results with a plain-Python reference computed here.
"""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubemr_async import read_results, recordio
from kubemr_async.errors import PermanentTaskError, UsageError
from kubemr_async.inputs import plan_parquet_splits, read_parquet_split
from kubemr_async.storage.urls import StoreCache

KUBEMR = str(Path(sys.executable).parent / "kubemr")


def kubemr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KUBEMR, *args], capture_output=True, text=True, timeout=300)


def run(tmp_path: Path, source: str, *inputs: Path, extra: tuple[str, ...] = ()
        ) -> subprocess.CompletedProcess[str]:
    (tmp_path / "job.py").write_text(source)
    args = [arg for path in inputs for arg in ("--input", str(path))]
    return kubemr("run", str(tmp_path / "job.py"), *args, "--output", str(tmp_path / "out"),
                  "--workers", "2", "--reducers", "2", "--chunk-size", "1k", *extra)


def results(tmp_path: Path) -> dict[object, object]:
    found: dict[object, object] = {}
    for key, value in read_results(tmp_path / "out"):
        assert key not in found, f"{key!r} twice"
        found[key] = value
    return found


LINES_JOB = """
from kubemr_async import Job
job = Job(sort_values=True)

@job.map(input="lines")
def per_line(line, ctx):
    assert "\\n" not in line and not line.endswith("\\r")
    yield "lines", 1
    yield "chars", len(line)
    if line:
        yield "first:" + line.split()[0], 1

job.reduce("sum")
"""


def test_lines_input_calls_the_map_once_per_line(tmp_path: Path) -> None:
    lines = [f"word{i % 7} and {'x' * (i % 23)}" for i in range(400)] + ["", "tail"]
    lf = tmp_path / "lf.txt"
    lf.write_text("\n".join(lines) + "\n")
    crlf = tmp_path / "crlf.txt"  # CRLF: the same records; no final terminator
    crlf.write_bytes("\r\n".join(lines).encode())
    result = run(tmp_path, LINES_JOB, lf, crlf, extra=("--format", "jsonl"))
    assert result.returncode == 0, result.stderr
    expected: Counter[str] = Counter()
    for line in lines * 2:
        expected["lines"] += 1
        expected["chars"] += len(line)
        if line:
            expected["first:" + line.split()[0]] += 1
    assert results(tmp_path) == dict(expected)


JSONL_JOB = """
from kubemr_async import Job
job = Job()

@job.map(input="jsonl")
async def amounts(event, ctx):
    ctx.emit(event["user"], event["amount"])

job.reduce("sum")
"""


def events(n: int, seed: int) -> list[dict[str, object]]:
    return [{"user": f"u{(i * 7 + seed) % 13}", "amount": i % 5, "note": "é" * (i % 3)}
            for i in range(n)]


def test_jsonl_input_decodes_one_value_per_line(tmp_path: Path) -> None:
    files = []
    expected: Counter[str] = Counter()
    for seed in range(3):
        path = tmp_path / f"events-{seed}.jsonl"
        records = events(300, seed)
        path.write_text("".join(json.dumps(r) + ("\n\n" if i % 50 == 0 else "\n")
                                for i, r in enumerate(records)))
        files.append(path)
        for r in records:
            expected[str(r["user"])] += int(str(r["amount"]))
    result = run(tmp_path, JSONL_JOB, *files, extra=("--format", "jsonl"))
    assert result.returncode == 0, result.stderr
    assert results(tmp_path) == dict(expected)


def test_a_malformed_json_line_fails_naming_the_file_and_its_byte_offset(
        tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    good = "".join(json.dumps(r) + "\n" for r in events(200, 0)).encode()
    bad = b'{"user": "u1", "amount": \n'
    path.write_bytes(good + bad + good)
    result = run(tmp_path, JSONL_JOB, path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"{path} byte {len(good)} (line " in result.stderr
    assert "invalid JSON" in result.stderr


def test_a_malformed_json_line_in_the_first_split_is_named_by_line_number(
        tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"user": "a", "amount": 1}\n\n[1, 2\n')
    result = run(tmp_path, JSONL_JOB, path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"{path} line 3: invalid JSON" in result.stderr


CSV_JOB = """
from kubemr_async import Job
job = Job()

@job.map(input="csv")
def rows(row, ctx):
    yield row["city"], float(row["amount"])
    yield "rows", 1
    yield "note chars", len(row["note"])

job.reduce("sum")
"""


def csv_text(rows: int, seed: int) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["city", "amount", "note"])
    for i in range(rows):
        writer.writerow([f"city{(i + seed) % 5}", f"{i % 9}.5", f'a, "quoted" note {i}'])
    return out.getvalue()


def test_csv_input_gives_rows_keyed_by_the_header_in_every_split(tmp_path: Path) -> None:
    files = []
    expected: defaultdict[str, float] = defaultdict(float)
    for seed in range(2):
        path = tmp_path / f"sales-{seed}.csv"
        text = csv_text(300, seed)
        path.write_text(text)
        assert path.stat().st_size > 8 * 1024, "several splits: later ones need the header"
        files.append(path)
        for row in csv.DictReader(io.StringIO(text)):
            expected[row["city"]] += float(row["amount"])
            expected["rows"] += 1
            expected["note chars"] += len(row["note"])
    result = run(tmp_path, CSV_JOB, *files, extra=("--format", "jsonl"))
    assert result.returncode == 0, result.stderr
    assert results(tmp_path) == dict(expected)


def test_a_csv_row_with_the_wrong_field_count_fails_naming_where(tmp_path: Path) -> None:
    path = tmp_path / "sales.csv"
    text = csv_text(300, 0).encode()
    cut = text.index(b"\n", 5000) + 1
    path.write_bytes(text[:cut] + b"city1,3\n" + text[cut:])
    result = run(tmp_path, CSV_JOB, path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"{path} byte {cut} (line " in result.stderr
    assert "CSV row has 2 fields, the header has 3" in result.stderr


def test_a_quoted_newline_straddling_a_split_fails_instead_of_making_rows(
        tmp_path: Path) -> None:
    """The split before the boundary ended inside the quotes and the next read the rest of
    the field as rows of its own: the job succeeded with rows no file holds."""
    path = tmp_path / "notes.csv"
    path.write_text("city,amount,note\n" + "".join(
        f'city{i % 3},1,"first line\nfake,9,row"\n' for i in range(300)))
    expected = Counter(row["city"] for row in csv.DictReader(path.open(newline="")))
    assert sorted(expected) == ["city0", "city1", "city2"]
    whole = recordio.TextSplit(str(path), path.read_bytes())
    assert Counter(row["city"] for row in recordio.records("csv", whole)) == expected
    result = run(tmp_path, CSV_JOB, path, extra=("--max-skipped-records", "5"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert (": a quoted CSV field opened in this row is not closed before the split ends: a "
            "quoted field holding a newline must not straddle a split") in result.stderr


PARQUET_JOB = """
import pyarrow.compute as pc
from kubemr_async import Job
job = Job()

@job.map(input="parquet")
def batches(batch, ctx):
    ctx.emit("rows", batch.num_rows)
    ctx.emit("total", pc.sum(batch.column("amount")).as_py())
    ctx.emit_batch(batch.column("user"), batch.column("amount"))

job.reduce("sum")
"""


def parquet_file(path: Path, rows: int, seed: int, group_rows: int = 100) -> pa.Table:
    table = pa.table({"user": [f"u{(i + seed) % 11}" for i in range(rows)],
                      "amount": [(i * 3 + seed) % 17 for i in range(rows)],
                      "pad": [f"{i:08d}" * 4 for i in range(rows)]})
    pq.write_table(table, path, row_group_size=group_rows, compression="none")
    return table


def test_parquet_input_reads_record_batches_split_by_row_group(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    expected: Counter[str] = Counter()
    for seed in range(3):
        table = parquet_file(inputs / f"part-{seed}.parquet", 1000 + seed * 37, seed)
        for user, amount in zip(table.column("user").to_pylist(),
                                table.column("amount").to_pylist(), strict=True):
            expected[user] += amount
            expected["total"] += amount
        expected["rows"] += table.num_rows
    result = run(tmp_path, PARQUET_JOB, inputs, extra=("--chunk-size", "8k"))
    assert result.returncode == 0, result.stderr
    assert {k: int(str(v)) for k, v in results(tmp_path).items()} == dict(expected)


def test_parquet_splits_own_each_row_group_once(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    table = parquet_file(path, 1000, 0)
    size = path.stat().st_size
    url = str(path)

    async def check() -> None:
        stores = StoreCache()
        planned = await plan_parquet_splits([(url, size)], 8 << 10, stores)
        assert len(planned) > 2 and planned[0][1] == (0, planned[0][1][1])
        bounds = [rng for _, rng in planned if rng is not None]
        assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
        assert bounds[-1][1] == size
        # Planned ranges, and plain byte ranges too (a cluster's planner), read every
        # row group exactly once.
        for ranges in (bounds, [(s, min(size, s + 3000)) for s in range(0, size, 3000)]):
            store, key = stores.open(url)
            groups: list[int] = []
            rows: list[pa.RecordBatch] = []
            for rng in ranges:
                split = await read_parquet_split(store, key, rng)
                groups += split.row_groups
                rows += list(split.batches())
            assert groups == list(range(10))
            assert pa.Table.from_batches(rows).equals(table)
        await stores.aclose()

    asyncio.run(check())


def test_a_file_that_is_not_parquet_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    path.write_text("a,b\n1,2\n")
    result = run(tmp_path, PARQUET_JOB, path)
    assert result.returncode == 2, result.stderr
    assert f"input {path} is not a Parquet file" in result.stderr
    with pytest.raises(UsageError, match="not a Parquet file"):
        asyncio.run(plan_parquet_splits([(str(path), path.stat().st_size)], 1 << 20))
    with pytest.raises(PermanentTaskError, match="not a Parquet file"):
        recordio.parquet_footer_length(b"12345678", str(path))


HOOKS_JOB = """
import os
from kubemr_async import Job
job = Job()

def note(ctx, what):
    with open(ctx.args["log"], "a") as f:
        f.write(f"{what} {ctx.task} {ctx.attempt}\\n")

@job.map_setup
def open_map(ctx):
    note(ctx, "map-setup")
    ctx.state["lines"] = 0

@job.map(input="lines")
async def count(line, ctx):
    if ctx.task == "map-00000" and ctx.attempt == 1:
        raise RuntimeError("first attempt fails")
    ctx.state["lines"] += 1
    yield line.split()[0], 1

@job.map_teardown
async def close_map(ctx):
    note(ctx, "map-teardown")
    yield "lines seen by " + ctx.task, ctx.state["lines"]

@job.reduce_setup
async def open_reduce(ctx):
    note(ctx, "reduce-setup")
    ctx.state["keys"] = 0

@job.reduce
def total(key, values, ctx):
    ctx.state["keys"] += 1
    return sum(values)

@job.reduce_teardown
def close_reduce(ctx):
    note(ctx, "reduce-teardown")
    ctx.emit("keys reduced by " + ctx.task, ctx.state["keys"])
"""


def test_setup_and_teardown_run_once_per_attempt_and_teardown_emits(tmp_path: Path) -> None:
    lines = [f"w{i % 6} filler {'y' * (i % 40)}" for i in range(300)]
    data = tmp_path / "in.txt"
    data.write_text("".join(f"{line}\n" for line in lines))
    log = tmp_path / "hooks.log"
    result = run(tmp_path, HOOKS_JOB, data, extra=("--arg", f"log={log}"))
    assert result.returncode == 0, result.stderr
    calls = Counter(log.read_text().splitlines())
    maps = -(-data.stat().st_size // 1024)
    assert maps > 3
    expected_calls = Counter({f"map-setup map-{i:05d} 1": 1 for i in range(maps)})
    expected_calls.update({f"map-teardown map-{i:05d} 1": 1 for i in range(maps)})
    # The failing first attempt of map 0 ran its teardown too; the retry is attempt 2.
    expected_calls.update(["map-setup map-00000 2", "map-teardown map-00000 2"])
    expected_calls.update(f"reduce-{hook} reduce-{i:05d} 1"
                          for i in range(2) for hook in ("setup", "teardown"))
    assert calls == expected_calls
    found = results(tmp_path)
    words = Counter(line.split()[0] for line in lines)
    assert {k: int(str(v)) for k, v in found.items() if str(k).startswith("w")} == words
    seen = {k: int(str(v)) for k, v in found.items() if str(k).startswith("lines seen")}
    assert len(seen) == maps and sum(seen.values()) == len(lines)
    reduced = {k: int(str(v)) for k, v in found.items() if str(k).startswith("keys reduced")}
    assert set(reduced) == {"keys reduced by reduce-00000", "keys reduced by reduce-00001"}
    assert sum(reduced.values()) == len(words) + maps, "every key once, in one reduce"


SORT_CSV_JOB = """
from kubemr_async import Job
job = Job()
job.partition("total-order")

@job.map(input="csv")
def rows(row, ctx):
    yield int(row["id"]), row["name"]

job.reduce("identity")
"""


def test_total_order_samples_csv_windows_with_the_header(tmp_path: Path) -> None:
    """The sample runs the per-record map on windows in the middle of the file: CSV rows
    there are keyed by the file's header, not by the window's first line."""
    path = tmp_path / "people.csv"
    ids = [(i * 7919) % 5003 for i in range(3000)]
    path.write_text("id,name\n" + "".join(f"{i},name{i}\n" for i in ids))
    result = run(tmp_path, SORT_CSV_JOB, path, extra=("--reducers", "3", "--chunk-size", "4k"))
    assert result.returncode == 0, result.stderr
    parts = sorted((tmp_path / "out").glob("part-*"))
    assert len(parts) == 3
    keys = [int(line.split("\t")[0]) for part in parts for line in part.read_text().splitlines()]
    assert keys == sorted(ids)
    assert all(part.stat().st_size > 0 for part in parts), "the sample found boundaries"


def test_total_order_sample_windows_may_end_inside_a_quoted_csv_field(tmp_path: Path) -> None:
    """A sampling window is not a split: its cut row is dropped, not a failed job (a split
    ending inside quotes fails its task)."""
    window = recordio.TextSplit("w.csv", b'1,ok\n2,"open\n', header=b"id,name", window=True)
    assert list(recordio.records("csv", window)) == [{"id": "1", "name": "ok"}]
    path = tmp_path / "notes.csv"
    ids = [f"{(i * 7919) % 50021:05}" for i in range(50000)]
    # A window may also start inside the quotes: its first row is then "x" and the rest.
    path.write_text("id,name\n" + "".join(f'{i},"one\nx,two {i}"\n' for i in ids))
    assert path.stat().st_size > 8 * (128 << 10), "sampled in windows, not read whole"
    source = SORT_CSV_JOB.replace('int(row["id"])', 'row["id"]')
    result = run(tmp_path, source, path, extra=("--reducers", "3", "--chunk-size", "64m",
                                                "--format", "jsonl"))
    assert result.returncode == 0, result.stderr
    assert list(read_results(tmp_path / "out")) == sorted((i, f"one\nx,two {i}") for i in ids)


def test_the_jsonl_grouping_example(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    events = root / "examples" / "events"
    result = kubemr("run", str(root / "examples" / "jsonl_grouping.py"), "--input",
                    str(events), "--output", str(tmp_path / "out"), "--format", "jsonl",
                    "--reducers", "2", "--chunk-size", "1k",
                    "--arg", "rates=EUR:1.1,USD:1.0,GBP:1.25")
    assert result.returncode == 0, result.stderr
    rates = {"EUR": 1.1, "USD": 1.0, "GBP": 1.25}
    amounts: defaultdict[str, list[float]] = defaultdict(list)
    lines = (events / "events.jsonl").read_text().splitlines()
    for line in lines:
        event = json.loads(line)
        amounts[event["user"]].append(round(event["amount"] * rates[event["currency"]], 2))
    found = results(tmp_path)
    assert found.pop("~events") == len(lines)
    users = {k: v for k, v in found.items() if not str(k).startswith("~users in")}
    assert users == {user: {"events": len(v), "usd": round(sum(v), 2), "largest": max(v)}
                     for user, v in amounts.items()}
    assert sum(int(str(v)) for k, v in found.items() if k not in users) == len(users)
