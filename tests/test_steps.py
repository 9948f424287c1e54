"""Multi-step jobs (``Pipeline``): `kubemr run` end to end with real worker processes, and
the one-line refusals of a bad pipeline or spec."""

from __future__ import annotations

import heapq
import json
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from kubemr_async import Job, Pipeline, Shell
from kubemr_async.api import load_job, load_spec_steps, load_steps, pipeline_reducers
from kubemr_async.errors import JobDefinitionError
from kubemr_async.manifests import SubmitOptions, build_manifest
from kubemr_async.progress import ProgressBar
from kubemr_async.spec import InvalidSpec, JobSpec
from tests.test_local_run import DATA, ROOT, kubemr

THREE = ROOT / "tests" / "jobs" / "three_steps.py"


@pytest.fixture(autouse=True)
def _failed_run_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Failed runs keep their logs here, not in the home directory."""
    logs = tmp_path.parent / f"{tmp_path.name}-logs"
    monkeypatch.setenv("KUBEMR_LOG_DIR", str(logs))
    return logs


def _word_counts() -> Counter[bytes]:
    counts: Counter[bytes] = Counter()
    for path in sorted(DATA.iterdir()):
        counts.update(path.read_bytes().split())
    return counts


def _leftovers(directory: Path) -> list[str]:
    """Hidden work or staging directories a run left next to its output."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def three_steps_reference() -> tuple[Counter[str], dict[int, list[str]], list[bytes]]:
    """tests/jobs/three_steps.py in plain Python over examples/data: the words as
    str.split() sees the text (surrogateescape), grouped by count, then the number of
    distinct words whose count is odd or even (the sorted result lines)."""
    words = Counter(w for p in sorted(DATA.iterdir())
                    for w in p.read_bytes().decode("utf-8", "surrogateescape").split())
    by_count: dict[int, list[str]] = {}
    for word, n in words.items():
        by_count.setdefault(n, []).append(word)
    parity: Counter[str] = Counter()
    for n, grouped in by_count.items():
        parity["odd" if n % 2 else "even"] += len(grouped)
    return words, by_count, sorted(f"{k}\t{v}".encode() for k, v in parity.items())


def test_three_steps_match_plain_python_and_drop_intermediate_parts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # Step 3's map itself fails the job if step 1's parts still exist (see the module).
    result = kubemr("run", str(THREE), "--input", str(DATA), "--output", str(out),
                    "--reducers", "3", "--workers", "2", "--chunk-size", "40k")
    assert result.returncode == 0, result.stderr
    words, by_count, expected = three_steps_reference()
    # The last step fixes reducers=2: two parts whatever --reducers says.
    parts = sorted(p.name for p in out.glob("part-*"))
    assert parts == ["part-00000", "part-00001"]
    got = sorted(line for p in parts for line in (out / p).read_bytes().splitlines())
    assert got == expected
    manifest = json.loads((out / "_SUCCESS").read_text())
    assert manifest["steps"] == 3 and manifest["parts"] == parts
    assert [s["kubemr"]["reduceOutputRecords"] for s in manifest["stepCounters"]] == [
        len(words), len(by_count), 2]
    assert _leftovers(tmp_path) == []


def test_topn_example_matches_plain_python(tmp_path: Path) -> None:
    out = tmp_path / "top"
    result = kubemr("run", str(ROOT / "examples" / "topn_words.py"), "--input", str(DATA),
                    "--output", str(out), "--reducers", "3", "--chunk-size", "16k",
                    "--arg", "n=7")
    assert result.returncode == 0, result.stderr
    top = heapq.nsmallest(7, _word_counts().items(), key=lambda kv: (-kv[1], kv[0]))
    assert [p.name for p in out.glob("part-*")] == ["part-00000"]  # the top step's 1 reducer
    assert (out / "part-00000").read_bytes().splitlines() == [
        word + b"\t" + str(n).encode() for word, n in top]


def test_a_failing_step_fails_the_job_naming_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = kubemr("run", str(THREE), "--input", str(DATA), "--output", str(out),
                    "--max-attempts", "1", "--arg", "fail=3")
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]
    assert "step 3/3 (histogram) failed" in error, error
    assert "ValueError: step 3 was told to fail" in error, error
    assert not out.exists() and _leftovers(tmp_path) == []


def test_a_shell_map_reads_the_previous_steps_pairs_as_lines(tmp_path: Path) -> None:
    module = tmp_path / "frequent.py"
    module.write_text(textwrap.dedent("""
        from kubemr_async import Job, Pipeline, Shell
        count = Job("count")
        @count.map(input="lines")
        def words(line, ctx):
            for word in line.split():
                yield word, 1
        count.reduce("sum")
        frequent = Job("frequent", reducers=0)
        frequent.map(Shell("awk -F'\\\\t' '$2 >= 3 { print $1 \\"\\\\t\\" $2 }'"))
        pipeline = Pipeline("frequent", [count, frequent])
    """))
    story = DATA / "kubemr-story.txt"
    out = tmp_path / "out"
    result = kubemr("run", str(module), "--input", str(story), "--output", str(out),
                    "--inline", "--reducers", "2")
    assert result.returncode == 0, result.stderr
    counts = Counter(story.read_bytes().split())
    expected = sorted(w + b"\t" + str(n).encode() for w, n in counts.items() if n >= 3)
    assert expected
    got = sorted(line for p in out.glob("part-*") for line in p.read_bytes().splitlines())
    assert got == expected


def _module(tmp_path: Path, body: str) -> str:
    path = tmp_path / "job.py"
    path.write_text("from kubemr_async import Job, Pipeline, Shell\n" + textwrap.dedent(body))
    return str(path)


@pytest.mark.parametrize(("body", "message"), [
    ("p = Pipeline('p', [])\n", "pipeline p has no steps; give it a list of at least one Job"),
    ("a = Job('a')\np = Pipeline('p', [a])\n",
     "pipeline p: step 1 (a) has no map callback"),
    ("a = Job('a')\na.map(Shell('cat'))\np = Pipeline('p', [a, 'b'])\n",
     "pipeline p: step 2 is a str, not a kubemr_async.Job"),
    ("a = Job('a')\na.map(Shell('cat'))\np = Pipeline('p', [a, a])\n",
     "pipeline p: step 2 is step 1's Job again"),
    ("a, b = Job('a'), Job('b')\na.map(Shell('cat'))\nb.map(Shell('cat'), input='lines')\n"
     "b.map(lambda line, ctx: None, input='lines')\np = Pipeline('p', [a, b])\n",
     "its map input must be 'pairs', not 'lines'"),
])
def test_a_bad_pipeline_is_refused_in_one_line(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(JobDefinitionError) as info:
        load_steps(_module(tmp_path, body), 1)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_step_the_pipeline_does_not_have_is_refused(tmp_path: Path) -> None:
    ref = _module(tmp_path, """
        a, b = Job('a'), Job('b')
        a.map(Shell('cat'))
        a.reduce(Shell('cat'))
        b.map(Shell('cat'))
        b.reduce(Shell('cat'))
        p = Pipeline('p', [a, b])
    """)
    assert load_job(ref, 1, step=1, steps=2).name == "b"
    with pytest.raises(JobDefinitionError, match="step 3 does not exist \\(pipeline p has 2 "):
        load_job(ref, 1, step=2, steps=2)
    with pytest.raises(JobDefinitionError, match="pipeline p has 2 steps but the job spec "
                                                 "says steps: 1"):
        load_job(ref, 1)  # a spec that does not say it has steps
    with pytest.raises(JobDefinitionError, match="defines a single-step job but the job spec "
                                                 "says steps: 2"):
        load_job(str(ROOT / "examples" / "wordcount.py"), 1, step=1, steps=2)


def test_a_step_fixing_its_reducers_refuses_another_count(tmp_path: Path) -> None:
    ref = _module(tmp_path, """
        a = Job('a', reducers=1)
        a.map(Shell('cat'))
        a.reduce(Shell('cat'))
    """)
    assert load_job(ref, 1).name == "a"
    with pytest.raises(JobDefinitionError, match="fixes reducers=1 but the spec has "
                                                 "reducers: 4"):
        load_job(ref, 4)
    with pytest.raises(JobDefinitionError, match="reducers must be an int >= 0"):
        Job("x", reducers=-1)


def test_kubemr_run_gives_a_single_job_the_reducers_it_fixes(tmp_path: Path) -> None:
    """``Job(reducers=N)`` wins over ``--reducers`` in `kubemr run` for a single job as for
    a pipeline's step (README, "Reducers per step"); it used to be refused at load with
    "the job fixes reducers=2 but the spec has reducers: 1" unless --reducers said 2."""
    ref = _module(tmp_path, """
        job = Job('fixed', reducers=2)

        @job.map(input='lines')
        def words(line, ctx):
            for word in line.split():
                yield word, 1

        job.reduce('sum')
    """)
    data = tmp_path / "in.txt"
    data.write_text("a b c d\ne f a b\n")
    out = tmp_path / "out"
    result = kubemr("run", ref, "--input", str(data), "--output", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000", "part-00001"]
    got = sorted(line for p in out.glob("part-*") for line in p.read_text().splitlines())
    counts = Counter(data.read_text().split())  # the reference, in plain Python
    assert got == sorted(f"{w}\t{n}" for w, n in counts.items())


def test_later_steps_read_pairs() -> None:
    first, second = Job("first"), Job("second")
    first.map(Shell("cat"))
    second.map(lambda pair, ctx: None)
    pipeline = Pipeline("p", [first, second])
    assert (first.map_input, second.map_input) == ("bytes", "pairs")
    assert pipeline.label(1) == "step 2/2 (second)"


def test_progress_names_the_step() -> None:
    bar = ProgressBar("step 2/3 (top)")
    try:
        assert [t.description for t in bar._progress.tasks] == [
            "step 2/3 (top) maps", "step 2/3 (top) reduces"]
    finally:
        bar.close()


def test_spec_steps_round_trip_and_limits() -> None:
    spec = JobSpec(name="j", job="m.py", inputs=("x",), steps=3, step=1)
    data = spec.to_dict()
    assert (data["steps"], data["step"]) == (3, 1)
    assert JobSpec.from_dict("j", data) == spec
    assert spec.part_format == "pairs"
    assert JobSpec(name="j", job="m.py", inputs=("x",), steps=3, step=2).part_format == "text"
    assert "steps" not in JobSpec(name="j", job="m.py", inputs=("x",)).to_dict()
    with pytest.raises(InvalidSpec, match=r"spec\.steps: must be between 1 and 100, got 0"):
        JobSpec(name="j", job="m.py", inputs=("x",), steps=0)
    with pytest.raises(InvalidSpec, match=r"spec\.step: must be between 0 and 1"):
        JobSpec(name="j", job="m.py", inputs=("x",), steps=2, step=2)


def test_step_reducers_are_one_count_per_step_and_agree_with_reducers() -> None:
    spec = JobSpec(name="j", job="m.py", inputs=("x",), reducers=2, steps=3,
                   step_reducers=(2, 0, 1))
    assert spec.to_dict()["stepReducers"] == [2, 0, 1]
    assert JobSpec.from_dict("j", spec.to_dict()) == spec
    assert [(s.step, s.reducers, s.part_format) for s in map(spec.at_step, range(3))] == [
        (0, 2, "pairs"), (1, 0, "pairs"), (2, 1, "text")]
    with pytest.raises(InvalidSpec, match=r"spec\.stepReducers: must give one count per step "
                                          r"\(3\), got 2"):
        JobSpec(name="j", job="m.py", inputs=("x",), steps=3, step_reducers=(1, 1))
    with pytest.raises(InvalidSpec, match=r"spec\.reducers: must equal "
                                          r"spec\.stepReducers\[0\] \(4\), got 1"):
        JobSpec(name="j", job="m.py", inputs=("x",), steps=2, step_reducers=(4, 1))
    with pytest.raises(InvalidSpec, match=r"spec\.stepReducers\[1\]: must be between 0"):
        JobSpec(name="j", job="m.py", inputs=("x",), steps=2, step_reducers=(1, -1))


def test_a_workers_steps_and_the_submitted_spec_come_from_the_module() -> None:
    spec = JobSpec(name="j", job=str(THREE), inputs=("x",), reducers=3, steps=3,
                   step_reducers=(3, 3, 2))
    assert [job.name for job in load_spec_steps(spec)] == ["count", "bycount", "histogram"]
    assert pipeline_reducers(str(THREE), 3) == (3, 3, 2)  # histogram fixes reducers=2
    assert pipeline_reducers(str(ROOT / "examples" / "wordcount.py"), 3) == ()
    manifest = build_manifest(SubmitOptions(image="i", job=str(THREE), inputs=["s3://bucket/in"],
                                            output="s3://bucket/out", reducers=3))
    assert (manifest["spec"]["steps"], manifest["spec"]["stepReducers"]) == (3, [3, 3, 2])
    missing = build_manifest(SubmitOptions(image="i", job="/app/only_in_image.py",
                                           inputs=["s3://bucket/in"], output="s3://bucket/out"))
    assert "steps" not in missing["spec"], "a module only in the image is not read"
    with pytest.raises(JobDefinitionError, match=r"pipeline three has 3 steps but the job "
                                                 r"spec says steps: 1; give spec\.steps"):
        load_spec_steps(JobSpec(name="j", job=str(THREE), inputs=("x",)))
    broken = build_manifest(SubmitOptions(image="i", job="tests.jobs.broken",
                                          inputs=["s3://bucket/in"], output="s3://bucket/out"))
    assert "steps" not in broken["spec"], "a module that fails here is the workers' to report"
