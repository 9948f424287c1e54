"""The memory budget: one limit in the spec, `kubemr run --memory`, the container default."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubemr_async.spec import (
    DEFAULT_MEMORY,
    MEMORY_HEADROOM,
    MIN_MEMORY,
    InvalidSpec,
    JobSpec,
    memory_budget,
)

from .test_cli import run_kubemr
from .test_local_run import ROOT

MiB = 1024 * 1024


def test_the_spec_keeps_memory_and_refuses_too_little() -> None:
    spec = JobSpec(name="m", job="j.py", inputs=("a",), memory=256 * MiB)
    assert spec.to_dict()["memory"] == 256 * MiB
    assert JobSpec.from_dict("m", spec.to_dict()).memory == 256 * MiB
    assert "memory" not in JobSpec(name="m", job="j.py", inputs=("a",)).to_dict()
    with pytest.raises(InvalidSpec, match=r"^spec.memory: must be at least"):
        JobSpec(name="m", job="j.py", inputs=("a",), memory=MIN_MEMORY - 1)


def test_the_budget_is_the_spec_else_the_container_limit_less_headroom() -> None:
    assert memory_budget(64 * MiB, 4096 * MiB) == 64 * MiB
    assert memory_budget(None, 1024 * MiB) == 1024 * MiB - MEMORY_HEADROOM
    assert memory_budget(None, 100 * MiB) == MIN_MEMORY, "never below the minimum"
    assert memory_budget(None, None) == DEFAULT_MEMORY


@pytest.mark.parametrize(("value", "message"), [
    ("lots", "kubemr: error: --memory: invalid size 'lots'"),
    ("1MiB", "kubemr: error: spec.memory: must be at least 16777216, got 1048576 "
             "(the --memory flag)"),
])
def test_kubemr_run_refuses_a_bad_memory_in_one_line(tmp_path: Path, value: str,
                                                      message: str) -> None:
    data = tmp_path / "in.txt"
    data.write_text("a b a\n")
    result = run_kubemr("run", str(ROOT / "examples" / "wordcount.py"), "-i", str(data),
                        "--output", str(tmp_path / "out"), "--memory", value)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(message), result.stderr
    assert not (tmp_path / "out").exists()


COMBINED = """
from kubemr_async import Job

job = Job("combined")

@job.map
def ones(text, ctx):
    for _ in range(PAIRS):
        ctx.emit("k", 1)

@job.combine
async def partial(key, values, ctx):
    yield sum(values)

@job.reduce
def total(key, values, ctx):
    yield f"{len(values)} {sum(values)}"
"""


def test_a_user_combiner_runs_on_every_spill(tmp_path: Path) -> None:
    # ~13 MB of pairs against a 16 MiB budget's 2.7 MiB map buffer: several spills, each
    # combined to one row, so the reduce sees one value per spill (not 65,536-pair lists
    # of raw ones) and the total stays exact.
    pairs = 1_000_000
    (tmp_path / "job.py").write_text(COMBINED.replace("PAIRS", str(pairs)))
    data = tmp_path / "in.txt"
    data.write_text("x\n")
    result = run_kubemr("run", str(tmp_path / "job.py"), "-i", str(data), "--output",
                        str(tmp_path / "out"), "--memory", "16MiB", "--reducers", "1",
                        "--workers", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    values, total = (tmp_path / "out" / "part-00000").read_text().split("\t")[1].split()
    assert int(total) == pairs
    assert 2 <= int(values) <= 10
