"""Skip mode (``--max-skipped-records`` / ``spec.maxSkippedRecords``): bad records are
skipped, counted and reported, exactly once, with real `kubemr run` processes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from kubemr_async import TaskContext, counters, protocol, skips
from kubemr_async.errors import PermanentTaskError, SkipLimitExceeded
from kubemr_async.protocol import JobView

from .test_local_run import _failed_run_logs, kubemr, output_lines
from .test_protocol import new_records, write

__all__ = ["_failed_run_logs"]  # autouse: failed runs keep their logs in tmp, not ~

JOB = "tests.jobs.skipping"
RECORDS = 100_000
POISON = [7, 23_456, 50_001, 77_777, 99_998]  # record ids the map raises on


def _write_records(path: Path, bad_lines: dict[int, str] | None = None) -> dict[int, int]:
    """100,000 JSONL records (``bad_lines``: line number -> text instead); each record
    id's byte offset."""
    offsets: dict[int, int] = {}
    pos = 0
    with open(path, "wb") as f:
        for i in range(RECORDS):
            line = (bad_lines or {}).get(i + 1) or json.dumps({"id": i, "word": f"w{i % 997}"})
            data = (line + "\n").encode()
            offsets[i] = pos
            f.write(data)
            pos += len(data)
    return offsets


def _reference(skip_ids: set[int], skip_keys: frozenset[str] = frozenset()) -> list[bytes]:
    counts = Counter(f"w{i % 997}" for i in range(RECORDS) if i not in skip_ids)
    lines = []
    for word, n in counts.items():
        if word not in skip_keys:
            lines += [f"{word}\t{n}".encode(), f"{word}-seen\t{n}".encode()]
    return sorted(lines)


def _manifest(out: Path) -> dict[str, object]:
    body = json.loads((out / "_SUCCESS").read_text())
    assert isinstance(body, dict)
    return body


def test_poison_records_are_skipped_reported_and_left_out(tmp_path: Path) -> None:
    data = tmp_path / "records.jsonl"
    offsets = _write_records(data)
    out = tmp_path / "out"
    result = kubemr("run", JOB, "-i", str(data), "--output", str(out), "--chunk-size", "1MiB",
                    "--reducers", "2", "--max-skipped-records", "10",
                    "--arg", "poison=" + ",".join(map(str, POISON)))
    assert result.returncode == 0, result.stderr
    assert output_lines(out) == _reference(set(POISON))
    manifest = _manifest(out)
    assert manifest["counters"]["kubemr"][counters.SKIPPED_RECORDS] == 5  # type: ignore[index]
    sample = manifest["skipped"]
    assert isinstance(sample, list) and len(sample) == 5
    by_offset = {entry["offset"]: entry for entry in sample}
    assert sorted(by_offset) == sorted(offsets[i] for i in POISON)
    for i in POISON:
        entry = by_offset[offsets[i]]
        assert entry["error"] == f"ValueError: poison record {i}"
        assert entry["input"] == str(data)
        assert entry["task"].startswith("map-")
    # The first split starts the file, so its record also has the file's line number.
    assert by_offset[offsets[7]]["line"] == 8
    assert by_offset[offsets[7]]["task"] == "map-00000"
    assert "line" not in by_offset[offsets[99_998]], "a later split knows the offset only"
    # The summary: the counter and each skipped record's place and error.
    assert "    skippedRecords=5" in result.stderr.splitlines()
    assert "Skipped records (sample):" in result.stderr
    assert f"  map-00000 {data} line 8: ValueError: poison record 7" in result.stderr
    assert f"{data} byte {offsets[99_998]}: ValueError: poison record 99998" in result.stderr


def test_without_skip_mode_a_poison_record_fails_the_job(tmp_path: Path) -> None:
    data = tmp_path / "records.jsonl"
    _write_records(data)
    result = kubemr("run", JOB, "-i", str(data), "--output", str(tmp_path / "out"),
                    "--max-attempts", "2", "--arg", "poison=23456")
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert "task map-00000 attempt 2: ValueError: poison record 23456" in error, error
    assert not (tmp_path / "out").exists()


def test_more_poison_than_the_limit_fails_naming_the_limit(tmp_path: Path) -> None:
    data = tmp_path / "records.jsonl"
    _write_records(data)
    result = kubemr("run", JOB, "-i", str(data), "--output", str(tmp_path / "out"),
                    "--max-attempts", "2", "--max-skipped-records", "2",
                    "--arg", "poison=" + ",".join(map(str, POISON)))
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert ("task map-00000 attempt 2: SkipLimitExceeded: skip limit 2 exceeded "
            "(maxSkippedRecords): record 3 to skip, at " in error), error
    assert "line 50002: ValueError: poison record 50001" in error, error


def test_malformed_json_lines_are_skipped_and_reported(tmp_path: Path) -> None:
    data = tmp_path / "records.jsonl"
    bad = {10: '{"id": 9, "word": ', 60_000: "not json"}
    _write_records(data, bad)
    out = tmp_path / "out"
    result = kubemr("run", JOB, "-i", str(data), "--output", str(out),
                    "--max-skipped-records", "3")
    assert result.returncode == 0, result.stderr
    assert output_lines(out) == _reference({9, 59_999})
    sample = _manifest(out)["skipped"]
    assert [(e["line"], e["error"][:30]) for e in sample] == [  # type: ignore[union-attr]
        (10, "invalid JSON: Expecting value:"), (60_000, "invalid JSON: Expecting value:")]
    assert "map-00000" in result.stderr and "line 60000: invalid JSON" in result.stderr
    # Without skip mode the same input fails for good, on the first attempt.
    failed = kubemr("run", JOB, "-i", str(data), "--output", str(tmp_path / "out2"))
    assert failed.returncode == 1
    assert "attempt 1:" in failed.stderr and "line 10: invalid JSON" in failed.stderr


def test_a_reduce_skips_a_poison_key(tmp_path: Path) -> None:
    data = tmp_path / "records.jsonl"
    _write_records(data)
    out = tmp_path / "out"
    result = kubemr("run", JOB, "-i", str(data), "--output", str(out),
                    "--max-skipped-records", "1", "--arg", "poison_keys=w13")
    assert result.returncode == 0, result.stderr
    assert output_lines(out) == _reference(set(), frozenset({"w13"}))
    manifest = _manifest(out)
    assert manifest["skipped"] == [{"key": "'w13'", "error": "KeyError: 'poison key w13'",
                                    "task": "reduce-00000"}]
    assert manifest["counters"]["kubemr"][counters.SKIPPED_RECORDS] == 1  # type: ignore[index]
    assert "  reduce-00000 key 'w13': KeyError: 'poison key w13'" in result.stderr


# --- pure parts ------------------------------------------------------------------------


def test_the_limit_names_itself_and_only_unparsable_records_make_it_permanent() -> None:
    kept = skips.TaskSkips(1, "s3://b/in.jsonl")
    kept.skip(skips.map_place(10, 2), ValueError("x"))
    with pytest.raises(SkipLimitExceeded) as caught:
        kept.skip(skips.map_place(99, None), ValueError("boom\nline two"))
    assert str(caught.value) == ("skip limit 1 exceeded (maxSkippedRecords): record 2 to "
                                 "skip, at s3://b/in.jsonl byte 99: ValueError: boom line two")
    assert not isinstance(caught.value, PermanentTaskError), "retried as any failure"
    with pytest.raises(PermanentTaskError):
        kept.skip(skips.map_place(120, None), "invalid JSON: ...")
    assert kept.sample == [{"offset": 10, "line": 2, "error": "ValueError: x"}]


def test_only_the_committed_attempt_skips_count_and_records_stay_small() -> None:
    records = new_records(maps=2)
    kept = skips.TaskSkips(100)
    for i in range(20):  # long errors full of what JSON escapes, at the widest places
        kept.skip(skips.map_place(2**62 + i, 2**40), ValueError('é"\\\t\u2603' * 50))
    widest = kept.sample
    assert 1 <= len(widest) <= skips.MAX_TASK_SAMPLE
    assert len(json.dumps(widest, separators=(",", ":"))) <= skips.MAX_SAMPLE_BYTES
    held = write(records, protocol.claim(records["map-00000"], "w1", 0.0, 10.0, 3))
    assert held is not None
    # Attempt 1 skips a record and fails: its sample is never written.
    failed = write(records, protocol.fail(held, "w1", "boom", 3, now=0.0))
    assert failed is not None and "skipped" not in failed
    held = write(records, protocol.claim(records["map-00000"], "w2", 0.0, 10.0, 3))
    assert held is not None
    full = {"user": {f"c{i}": -(2**63 - 1) for i in range(16)},
            "kubemr": {name: 2**63 - 1 for name in ("mapInputBytes", "mapOutputRecords",
                                                     counters.SKIPPED_RECORDS)}}
    committed = write(records, protocol.commit(held, "w2", {"0": "s3://b/" + "x" * 100},
                                               full, widest, now=0.0))
    assert committed is not None
    size = len(json.dumps(committed, ensure_ascii=False).encode())
    assert size < 2048, size
    # A zombie (the lease lost to w2) cannot commit its own sample.
    assert write(records, protocol.commit(held, "w1", {"0": "x"}, {}, widest[:1], now=0.0)) is None
    view = JobView(records)  # type: ignore[arg-type]
    assert [e["task"] for e in view.skipped()] == ["map-00000"] * len(widest)
    assert all(e["input"] == "in-0" for e in view.skipped())


def test_task_context_has_skip_mode_off_by_default() -> None:
    assert TaskContext(job="j", task="map-00000", attempt=1, partitions=1)._skips is None


def test_the_spec_field_and_the_flag_refuse_a_negative_limit(tmp_path: Path) -> None:
    from kubemr_async.spec import InvalidSpec, JobSpec

    spec = JobSpec(name="j", job="m", inputs=("x",), max_skipped_records=4)
    assert spec.to_dict()["maxSkippedRecords"] == 4
    assert JobSpec.from_dict("j", spec.to_dict()).max_skipped_records == 4
    assert "maxSkippedRecords" not in JobSpec(name="j", job="m", inputs=("x",)).to_dict()
    with pytest.raises(InvalidSpec, match=r"spec.maxSkippedRecords: must be between 0"):
        JobSpec(name="j", job="m", inputs=("x",), max_skipped_records=-1)
    data = tmp_path / "records.jsonl"
    data.write_text('{"id": 1, "word": "a"}\n')
    result = kubemr("run", JOB, "-i", str(data), "--output", str(tmp_path / "out"),
                    "--max-skipped-records", "-1")
    assert result.returncode == 2, result.stderr
    assert "(the --max-skipped-records flag)" in result.stderr


def test_submit_flags_carry_the_limit_into_the_manifest() -> None:
    from kubemr_async.manifests import SubmitOptions, build_manifest

    body = build_manifest(SubmitOptions(image="img", job="m.job", inputs=["s3://bkt/x"],
                                        output="s3://bkt/out", max_skipped_records=7))
    assert body["spec"]["maxSkippedRecords"] == 7


def test_placed_csv_records_go_on_after_a_bad_row() -> None:
    from kubemr_async.recordio import BadRecord, TextSplit, placed_records

    huge = b"x" * 200_000  # past csv's field size limit: a csv.Error
    split = TextSplit("in.csv", b"a,b\n1,2\n3\n" + huge + b",4\n5,6\n", offset=0)
    placed = list(placed_records("csv", split))
    assert [(n, pos) for n, pos, _ in placed] == [(2, 4), (3, 8), (4, 10), (5, 200_013)]
    assert placed[0][2] == {"a": "1", "b": "2"} and placed[3][2] == {"a": "5", "b": "6"}
    assert isinstance(placed[1][2], BadRecord)
    assert placed[1][2].reason == "CSV row has 1 fields, the header has 2"
    assert isinstance(placed[2][2], BadRecord)
    assert placed[2][2].reason.startswith("malformed CSV: ")
    assert str(placed[2][2]).startswith("in.csv line 4: malformed CSV")
