"""Batched map tasks (``splitsPerTask``): one task record holds K consecutive splits.

Pure: how ``protocol.plan`` deals splits into records and reads them back, the spec's
bounds. End to end with real worker processes (`kubemr run`): a word count over many
small files gives exactly the K = 1 result and a Counter's, every input byte counted
once; a batch that fails half-way is re-mapped whole; a map-only batch's part keeps its
splits' order; skip mode names a later split's own input; the refusals are one line.
The same on a cluster is in tests/test_operator_batching.py.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from kubemr_async import protocol, skips
from kubemr_async.patch import PatchTestFailed, apply_patch
from kubemr_async.protocol import TaskKind
from kubemr_async.spec import MAX_SPLITS_PER_TASK, InvalidSpec, JobSpec
from kubemr_async.validate import check_sorted_copy

from . import test_local_run as local
from .test_local_run import _failed_run_logs

__all__ = ["_failed_run_logs"]  # an autouse fixture: failed runs' logs stay in tmp

EXAMPLES = local.ROOT / "examples"
JOBS = local.ROOT / "tests" / "jobs"


def spec(k: int, reducers: int = 2) -> JobSpec:
    return JobSpec(name="wc", job="wc.py", inputs=("a",), reducers=reducers,
                   splits_per_task=k)


SPLITS: list[protocol.Split] = [(f"s3://b/in-{i}", (0, 10 + i) if i % 3 else None)
                                for i in range(10)]


def maps_of(records: list[tuple[str, protocol.TaskRecord]]) -> list[protocol.TaskRecord]:
    return [body for _, body in records if body["kind"] == TaskKind.MAP]


# --- pure: planning and the spec ---------------------------------------------------------


def test_one_split_per_task_plans_exactly_the_records_of_before() -> None:
    records = protocol.plan(spec(1), SPLITS)
    assert [key for key, _ in records] == [*(protocol.map_key(i) for i in range(10)),
                                           "reduce-00000", "reduce-00001"]
    for i, body in enumerate(maps_of(records)):
        assert body == protocol.new_task(TaskKind.MAP, i, *SPLITS[i])
        assert "moreSplits" not in body
    assert protocol.map_count(spec(1), 10) == 10


@pytest.mark.parametrize(("k", "sizes"), [(2, [2, 2, 2, 2, 2]), (5, [5, 5]),
                                          (4, [4, 4, 2]), (3, [3, 3, 3, 1]),
                                          (64, [10])])
def test_consecutive_splits_are_dealt_into_records_of_at_most_k(k: int,
                                                                sizes: list[int]) -> None:
    maps = maps_of(protocol.plan(spec(k), SPLITS))
    assert [protocol.split_count(body) for body in maps] == sizes
    assert protocol.map_count(spec(k), len(SPLITS)) == len(sizes)
    # Planning order, each split once: the records' splits concatenated are the input.
    assert [s for body in maps for s in protocol.task_splits(body)] == SPLITS
    for body in maps:  # the first split is the record's own input and range, as before
        first = protocol.task_splits(body)[0]
        assert (body["input"], body["range"]) == (first[0], list(first[1]) if first[1]
                                                  else None)
        assert body["input"] not in [m["input"] for m in body.get("moreSplits", [])]


def test_a_batched_record_keeps_its_splits_through_claim_commit_and_retry() -> None:
    body: dict = dict(maps_of(protocol.plan(spec(4), SPLITS))[1])
    splits = protocol.task_splits(body)  # type: ignore[arg-type]
    held = apply_patch(body, protocol.claim(body, "w", 1.0, 30.0, 3).ops)  # type: ignore[arg-type]
    failed = apply_patch(held, protocol.fail(held, "w", "boom", 3, now=2.0).ops)
    again = apply_patch(failed, protocol.claim(failed, "v", 3.0, 30.0, 3).ops)
    done = apply_patch(again, protocol.commit(again, "v", {}, now=4.0).ops)
    assert protocol.task_splits(done) == splits == SPLITS[4:8]
    assert (done["state"], done["attempt"], done["failures"]) == ("committed", 2, 1)


def test_a_backed_up_batch_commits_whole_whichever_attempt_wins() -> None:
    body: dict = dict(maps_of(protocol.plan(spec(4), SPLITS))[0])
    held = apply_patch(body, protocol.claim(body, "w", 1.0, 30.0, 3).ops)  # type: ignore[arg-type]
    pair = apply_patch(held, protocol.backup(held, "b", 5.0, 30.0).ops)
    for winner in ("w", "b"):
        done = apply_patch(pair, protocol.commit(pair, winner, {}, now=6.0).ops)
        assert protocol.task_splits(done) == SPLITS[:4]
        loser = "b" if winner == "w" else "w"
        with pytest.raises(PatchTestFailed):  # the other attempt's commit is refused
            apply_patch(done, protocol.commit(done, loser, {}, now=7.0).ops)


def test_the_inputs_label_names_the_first_input_and_how_many_more() -> None:
    first, last = maps_of(protocol.plan(spec(4), SPLITS))[::2]
    assert protocol.inputs_label(first) == "s3://b/in-0 and 3 more"
    assert protocol.inputs_label(last) == "s3://b/in-8 and 1 more"
    single = maps_of(protocol.plan(spec(1), SPLITS))[0]
    assert protocol.inputs_label(single) == "s3://b/in-0"


@pytest.mark.parametrize(("k", "message"), [
    (0, "spec.splitsPerTask: must be between 1 and 512, got 0"),
    (MAX_SPLITS_PER_TASK + 1, "spec.splitsPerTask: must be between 1 and 512, got 513"),
])
def test_out_of_range_splits_per_task_is_refused_naming_the_field(k: int,
                                                                  message: str) -> None:
    with pytest.raises(InvalidSpec) as refused:
        spec(k)
    assert str(refused.value) == message


def test_unsplit_inputs_refuse_batching() -> None:
    with pytest.raises(InvalidSpec, match=r"^spec\.splitsPerTask: must be 1 when "
                                          r"spec\.splitInputs is false"):
        JobSpec(name="wc", job="wc.py", inputs=("a",), split_inputs=False, splits_per_task=2)


def test_the_field_round_trips_and_is_left_out_at_its_default() -> None:
    assert "splitsPerTask" not in spec(1).to_dict()
    assert spec(8).to_dict()["splitsPerTask"] == 8
    assert JobSpec.from_dict("wc", spec(8).to_dict()).splits_per_task == 8
    with pytest.raises(InvalidSpec, match=r"spec\.splitsPerTask: must be an integer"):
        JobSpec.from_dict("wc", {**spec(1).to_dict(), "splitsPerTask": "8"})


def test_skip_mode_names_a_later_split_s_own_input() -> None:
    place = skips.map_place(7, 2, "s3://b/in-3")
    sample = skips.job_sample([("map-00000", "s3://b/in-0",
                                [{**place, "error": "bad"}, {**skips.map_place(1, 1),
                                                             "error": "bad"}])])
    assert [entry["input"] for entry in sample] == ["s3://b/in-3", "s3://b/in-0"]


# --- kubemr run: real worker processes ---------------------------------------------------


def small_files(directory: Path, count: int, gzipped: tuple[int, ...] = ()) -> list[Path]:
    """``count`` small text files (a few hundred bytes each), some sharing words; those
    numbered in ``gzipped`` are written compressed (``.txt.gz``) beside the plain ones'
    names, and the plain file is kept outside ``directory`` as the reference."""
    directory.mkdir()
    plain = directory.parent / f"{directory.name}-plain"
    plain.mkdir()
    files = []
    for i in range(count):
        text = (" ".join(f"w{(i * 7 + j) % 23}" for j in range(i % 5 + 3)) + "\n"
                + f"only{i} shared\n").encode()
        path = directory / f"f{i:03d}.txt"
        if i in gzipped:
            (directory / f"f{i:03d}.txt.gz").write_bytes(gzip.compress(text))
            path = plain / path.name
        path.write_bytes(text)
        files.append(path)
    return files


def map_records(page: Path) -> set[str]:
    """The map tasks a timeline page draws (its bars' titles name them)."""
    return set(re.findall(r"map-\d{5}", page.read_text()))


def run_batched(tmp_path: Path, name: str, data: Path, k: int, *extra: str) -> Path:
    out = tmp_path / name
    result = local.kubemr("run", str(JOBS / "batched.py"), "-i", str(data),
                          "--output", str(out), "--workers", "2", "--reducers", "2",
                          "--splits-per-task", str(k), "--timeline", str(tmp_path / f"{name}.html"),
                          *extra)
    assert result.returncode == 0, result.stderr
    return out


def test_batched_wordcount_equals_one_split_per_task_and_counts_every_byte_once(
        tmp_path: Path) -> None:
    files = small_files(tmp_path / "data", 37, gzipped=(5, 9, 33))
    single = run_batched(tmp_path, "k1", tmp_path / "data", 1)
    batched = run_batched(tmp_path, "k8", tmp_path / "data", 8)
    assert (local.output_lines(batched) == local.output_lines(single)
            == local.reference_lines(files))
    assert len(map_records(tmp_path / "k1.html")) == 37
    assert map_records(tmp_path / "k8.html") == {protocol.map_key(i) for i in range(5)}
    page = (tmp_path / "k8.html").read_text()
    assert re.search(r"map-00004 attempt 1 on [^<]*; input "
                     + re.escape(f"{tmp_path / 'data' / 'f032.txt'} and 4 more<"), page)
    # Decompressed bytes count, as for one split per task: every split once.
    for out in (single, batched):
        totals = json.loads((out / "_SUCCESS").read_text())["counters"]
        assert totals["kubemr"]["mapInputBytes"] == sum(f.stat().st_size for f in files)
        assert totals["text"]["splits"] == 37
        assert totals["kubemr"]["mapOutputRecords"] == sum(len(f.read_bytes().split())
                                                           for f in files)


def test_a_batch_that_fails_half_way_is_re_mapped_whole(tmp_path: Path) -> None:
    files = small_files(tmp_path / "data", 20)
    log, seen = tmp_path / "failed.log", tmp_path / "splits.log"
    out = run_batched(tmp_path, "out", tmp_path / "data", 8, "--arg", "fail=f013.txt",
                      "--arg", f"log={log}", "--arg", f"splits={seen}")
    assert local.output_lines(out) == local.reference_lines(files)
    assert log.read_text().split()[:2] == ["map-00001", "1"], "the chosen attempt did fail"
    handed = [line.split() for line in seen.read_text().splitlines()]
    batch = [str(f) for f in files[8:16]]
    # Attempt 1 mapped f008..f013 in order and raised; attempt 2 mapped all eight again.
    assert [i for t, a, i in handed if (t, a) == ("map-00001", "1")] == batch[:6]
    assert [i for t, a, i in handed if (t, a) == ("map-00001", "2")] == batch
    totals = json.loads((out / "_SUCCESS").read_text())["counters"]
    assert totals["text"]["splits"] == 20, "only the committed attempt's splits count"
    assert totals["kubemr"]["mapInputBytes"] == sum(f.stat().st_size for f in files)


MAP_ONLY_JOB = """
from kubemr_async import Job
job = Job("tagged")

@job.map(input="lines")
def tag(line, ctx):
    yield ctx.input.rsplit("/", 1)[-1], line
"""


def test_a_multi_step_job_batches_every_step_s_maps(tmp_path: Path) -> None:
    from .test_steps import THREE, three_steps_reference

    out = tmp_path / "out"
    result = local.kubemr("run", str(THREE), "--input", str(EXAMPLES / "data"),
                          "--output", str(out), "--reducers", "3", "--workers", "2",
                          "--chunk-size", "20k", "--splits-per-task", "2")
    assert result.returncode == 0, result.stderr
    got = sorted(line for p in out.glob("part-*") for line in p.read_bytes().splitlines())
    assert got == three_steps_reference()[2]


def test_a_total_order_sort_in_batches_is_globally_sorted(tmp_path: Path) -> None:
    """The sample reads the planned splits, whatever records they are dealt into; each
    batched map partitions every split of its batch by the same boundaries."""
    from benchmarks.sort import ensure_sort_corpus

    from .test_sort import SORT_JOB

    corpus = ensure_sort_corpus(tmp_path / "data", 200_000, 3, seed=5, skew=0.0)
    out = tmp_path / "out"
    result = local.kubemr("run", SORT_JOB, "--input", str(corpus.directory), "--output",
                          str(out), "--reducers", "3", "--chunk-size", "40k",
                          "--splits-per-task", "3")
    assert result.returncode == 0, result.stderr
    check_sorted_copy(corpus.paths, [out / f"part-{i:05d}" for i in range(3)],
                      layout="kubemr")


PARQUET_JOB = """
from kubemr_async import Job
job = Job("keys")

@job.map(input="parquet")
def keys(batch, ctx):
    ctx.emit_batch(batch.column("k"), 1)

job.reduce("sum")
"""


def test_parquet_splits_in_batches_are_each_read_once(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    data.mkdir()
    expected: Counter[str] = Counter()
    for i in range(7):
        keys = [f"k{(i * 3 + j) % 5}" for j in range(i + 4)]
        expected.update(keys)
        pq.write_table(pa.table({"k": keys}), data / f"p{i}.parquet", row_group_size=2)
    out = tmp_path / "out"
    result = local.kubemr("run", str(local.write_job(tmp_path, PARQUET_JOB)), "-i", str(data),
                          "--output", str(out), "--splits-per-task", "3")
    assert result.returncode == 0, result.stderr
    assert local.output_lines(out) == sorted(f"{k}\t{n}".encode() for k, n in expected.items())


def test_a_map_only_batch_writes_one_part_with_its_splits_in_order(tmp_path: Path) -> None:
    files = small_files(tmp_path / "data", 11)
    out = tmp_path / "out"
    job = local.write_job(tmp_path, MAP_ONLY_JOB)
    result = local.kubemr("run", str(job), "-i", str(tmp_path / "data"),
                          "--output", str(out), "--reducers", "0", "--splits-per-task", "4")
    assert result.returncode == 0, result.stderr
    parts = sorted(out.glob("part-*"))
    assert [p.name for p in parts] == ["part-00000", "part-00001", "part-00002"]
    for index, part in enumerate(parts):
        expected = [f"{f.name}\t{line}".encode() for f in files[index * 4:index * 4 + 4]
                    for line in f.read_text().splitlines()]
        assert part.read_bytes().splitlines() == expected


SKIPPING_JOB = """
from kubemr_async import Job
job = Job("skipping")

@job.map(input="jsonl")
def read(event, ctx):
    yield event["k"], 1

job.reduce("sum")
"""


def test_skip_mode_in_a_batch_names_the_split_the_bad_record_was_in(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        bad = "not json\n" if i == 4 else ""
        (data / f"e{i}.jsonl").write_text(f'{{"k": "a"}}\n{bad}{{"k": "b{i}"}}\n')
    out = tmp_path / "out"
    result = local.kubemr("run", str(local.write_job(tmp_path, SKIPPING_JOB)), "-i", str(data),
                          "--output", str(out), "--splits-per-task", "3",
                          "--max-skipped-records", "1")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "_SUCCESS").read_text())
    [skipped] = manifest["skipped"]
    assert (skipped["task"], skipped["input"], skipped["line"]) == (
        "map-00001", str(data / "e4.jsonl"), 2)
    assert local.output_lines(out)[0] == b"a\t6"


LOW_LEVEL = str(EXAMPLES / "wordcount_lowlevel.py")


@pytest.mark.parametrize(("args", "message"), [
    (["--splits-per-task", "0"], "spec.splitsPerTask: must be between 1 and 512, got 0 "
                                 "(the --splits-per-task flag)"),
    (["--splits-per-task", "513"], "spec.splitsPerTask: must be between 1 and 512, got 513 "
                                   "(the --splits-per-task flag)"),
])
def test_kubemr_run_refuses_out_of_range_batches_in_one_line(tmp_path: Path, args: list[str],
                                                             message: str) -> None:
    result = local.kubemr("run", str(EXAMPLES / "wordcount.py"), "-i", str(EXAMPLES / "data"),
                          "--output", str(tmp_path / "out"), *args)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"kubemr: error: {message}"]
    assert not (tmp_path / "out").exists()


def test_a_low_level_job_refuses_batching_in_one_line(tmp_path: Path) -> None:
    result = local.kubemr("run", LOW_LEVEL, "-i", str(EXAMPLES / "data" / "kubemr-story.txt"),
                          "--output", str(tmp_path / "out"), "--splits-per-task", "4")
    assert result.returncode != 0
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("kubemr: error: spec.splitsPerTask: must be 1 when "
                           "spec.splitInputs is false"), line
    assert "--splits-per-task" in line


def test_kubemr_submit_refuses_to_batch_a_low_level_job_it_can_load() -> None:
    result = local.kubemr("submit", "--image", "x:1", "--job", LOW_LEVEL, "--input",
                          "s3://b/in", "--output", "s3://bkt/out", "--splits-per-task", "8")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "kubemr: error: spec.splitsPerTask: must be 1 for a low-level JobWorker job (it maps "
        "one input per task), got 8"]


def test_kubemr_submit_refuses_a_bad_batch_before_it_reaches_a_cluster() -> None:
    result = local.kubemr("submit", "--image", "x:1", "--job", "examples.wordcount", "--input",
                          "s3://b/in", "--output", "s3://bkt/out", "--splits-per-task", "600")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "kubemr: error: spec.splitsPerTask: must be between 1 and 512, got 600"]


def test_a_worker_refuses_a_batched_low_level_job_before_it_claims_anything() -> None:
    """A manifest applied with kubectl never met `kubemr submit`'s check: the worker's
    load of the job module refuses it (the pod then fails the job in that line) instead of
    the first map failing."""
    from kubemr_async.api import load_spec_steps
    from kubemr_async.errors import JobDefinitionError

    spec = JobSpec(name="lowlevel", job=LOW_LEVEL, inputs=("s3://bkt/in/",), reducers=2,
                   output="s3://bkt/out", splits_per_task=8)
    with pytest.raises(JobDefinitionError) as refused:
        load_spec_steps(spec)
    assert str(refused.value) == ("spec.splitsPerTask: must be 1 for a low-level JobWorker "
                                  "job (it maps one input per task), got 8")
    one = JobSpec(name="lowlevel", job=LOW_LEVEL, inputs=("s3://bkt/in/",), reducers=2,
                  output="s3://bkt/out")
    assert len(load_spec_steps(one)) == 1
